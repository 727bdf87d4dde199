"""Population optimizers across ``torch.distributed`` ranks: QIMAD's agents and QuantumDynamics'
walkers split over 2 gloo processes on loopback follow the one-process trajectory bit for bit, and
every rank's ``state_dict`` is the whole one-process swarm."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import start_workers, wait_workers
from torch.utils.data import DataLoader

from qcd_fx import distributed
from qcd_fx.distributed import ShardedBatches

TIMEOUT = 300  # seconds, per run (each takes ~10-30 s on the loaded 2-core machine)

WORKER = r"""
import json, sys
import torch
import torch.nn.functional as F
torch.set_num_threads(1)
from qcd_fx import distributed
from qcd_fx.datasets import load_data
from qcd_fx.examples import digits_cnn, digits_mlp
from qcd_fx.optim import QIMAD, QuantumDynamics, QuantumLangevin
from qcd_fx.train import fit

out = sys.argv[1]
distributed.init_from_env("gloo")  # False in the one-process run (no RANK / WORLD_SIZE)
r = distributed.rank()
data = load_data("digits")
train, _ = data.loaders(64, seed=0)  # under 2 ranks: sharded (half batches); fit unshards it for QIMAD
whole = distributed.whole_batches(train)  # for the loops below


class Flat(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x.flatten(1))


res, states = {}, {}
# QIMAD through fit: 4 agents, one epoch (23 steps); rank 1 passes no seed (it takes rank 0's);
# patience 0 so that agents tunnel (the jumps draw from the generator on every rank)
torch.manual_seed(0)
mlp = digits_mlp(hidden=16)
opt = QIMAD(mlp.parameters(), num_agents=4, seed=None if r else 3, evaluation="loop", patience=0)
opt.enable_tracking()
hist = fit(Flat(mlp), train, opt, 1, progress=False)
res["qimad_log"] = {k: opt.get_log()[k] for k in ("losses", "alphas", "betas", "best", "tunnels")}
res["qimad_train_loss"] = hist.epochs[0].train_loss
states["qimad"], states["mlp"] = opt.state_dict(), mlp.state_dict()

# QIMAD on the digits CNN (BatchNorm: per-agent statistics exchanged), 3 of 4 agents per step
# (round-robin windows that wrap: blocks of 2 and 1 agents, the gradient cache), 4 steps
torch.manual_seed(1)
cnn = digits_cnn(width=4)
opt = QIMAD(cnn.parameters(), num_agents=4, k_eval=3, seed=4, total_steps=4)
for step, (x, y) in enumerate(whole):
    res.setdefault("cnn_losses", []).append(opt.step(model=cnn, batch=(x, y), loss_fn=F.cross_entropy))
    if step == 3:
        break
res["cnn_mode"] = opt.evaluation_mode
states["cnn_qimad"], states["cnn"] = opt.state_dict(), cnn.state_dict()

# QIMAD with a closure (the seed's way): 3 agents (blocks of 2 and 1), 3 steps on one batch
torch.manual_seed(3)
small = digits_mlp(hidden=8)
xb, yb = next(iter(whole))
opt = QIMAD(small.parameters(), num_agents=3, seed=7, total_steps=3)


def closure():
    loss = F.cross_entropy(small(xb.flatten(1)), yb)
    loss.backward()
    return loss


res["closure_losses"] = [opt.step(closure) for _ in range(3)]
states["closure_qimad"], states["closure_mlp"] = opt.state_dict(), small.state_dict()

# QuantumDynamics: 6 walkers on the digits MLP (model path; 13 evaluations a pass split 7/6)
torch.manual_seed(2)
net = Flat(digits_mlp(hidden=8))
qd = QuantumDynamics(net.parameters(), num_centres=6, sigma=0.05, evaluation="loop", seed=5)
for step, (x, y) in enumerate(whole):
    res.setdefault("qd_values", []).append(qd.step(model=net, batch=(x, y), loss_fn=F.cross_entropy))
    if step == 8:
        break
states["qd"] = qd.state_dict()

# QuantumDynamics on a test function (loss_fn path): stable events evaluate one row (blocks 1/0)
x = torch.zeros(5, dtype=torch.float64)
qf = QuantumDynamics([x], num_centres=7, sigma=1.0, seed=6)
for _ in range(40):
    qf.step(loss_fn=lambda p: ((p - 0.3) ** 2).sum(1) + 0.1 * torch.cos(7 * p).sum(1))
res["qf"] = [qf.best_value, qf.evaluations, qf.stable_events]
states["qf"] = qf.state_dict()

if distributed.active():  # population optimizers that do not split their agents are refused
    try:
        fit(Flat(digits_mlp(hidden=8)), train, QuantumLangevin(digits_mlp(hidden=8).parameters()), 1, progress=False)
    except ValueError as e:
        res["refused"] = str(e)

torch.save(states, f"{out}-{r}.pt")
with open(f"{out}-{r}.json", "w") as f:
    json.dump(res, f)
distributed.finish()
"""


def _start(tmp_path, world: int) -> tuple[str, list[subprocess.Popen]]:
    """Start the worker in ``world`` processes (one: no process group)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = str(tmp_path / f"run{world}")
    return out, start_workers(script, world, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(results, states) of the one-process run and of each rank of the 2-process run (run side by side)."""
    tmp = tmp_path_factory.mktemp("distributed_qimad")
    started = [_start(tmp, 1), _start(tmp, 2)]
    wait_workers([p for _, ps in started for p in ps], timeout=TIMEOUT)
    (single,), ranks = (
        [(json.loads(open(f"{out}-{r}.json").read()), torch.load(f"{out}-{r}.pt", weights_only=False)) for r in range(len(ps))] for out, ps in started
    )
    return single, ranks


def _assert_identical(a, b, path="state"):
    """Equal bit for bit: tensors with torch.equal, floats with == (NaN equal to NaN), recursively."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_identical(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, path


def test_qimad_agents_split_over_two_ranks_follow_the_one_process_trajectory(runs):
    (single, single_states), ranks = runs
    for res, states in ranks:  # both ranks: the same trajectory and the same whole swarm
        _assert_identical(res["qimad_log"], single["qimad_log"], "log")
        assert res["qimad_train_loss"] == single["qimad_train_loss"]
        _assert_identical(states["qimad"], single_states["qimad"], "qimad")
        _assert_identical(states["mlp"], single_states["mlp"], "mlp")
    assert sum(single["qimad_log"]["tunnels"]) > 0  # the tunnelling draws were exercised
    assert states["qimad"]["qimad"]["positions"].shape[0] == 4  # rank 0's (and 1's) state: all agents


def test_qimad_exchanges_batchnorm_statistics_uneven_blocks_and_closures(runs):
    (single, single_states), ranks = runs
    assert single["cnn_mode"] == "loop"  # what auto picks for the CNN on CPU
    for res, states in ranks:
        assert res["cnn_losses"] == single["cnn_losses"]
        _assert_identical(states["cnn_qimad"], single_states["cnn_qimad"], "cnn_qimad")  # per-agent buffers, gradient cache
        _assert_identical(states["cnn"], single_states["cnn"], "cnn")
        assert res["closure_losses"] == single["closure_losses"]
        _assert_identical(states["closure_qimad"], single_states["closure_qimad"], "closure_qimad")
        _assert_identical(states["closure_mlp"], single_states["closure_mlp"], "closure_mlp")


def test_quantum_dynamics_walkers_split_over_two_ranks_follow_the_one_process_trajectory(runs):
    (single, single_states), ranks = runs
    assert single["qf"][2] > 0  # stable events: one-row evaluations (a block of 1 and one of 0)
    for res, states in ranks:
        assert res["qd_values"] == single["qd_values"]
        assert res["qf"] == single["qf"]
        _assert_identical(states["qd"], single_states["qd"], "qd")
        _assert_identical(states["qf"], single_states["qf"], "qf")


def test_fit_refuses_population_optimizers_that_do_not_split(runs):
    _, ranks = runs
    for res, _ in ranks:
        assert "QuantumLangevin runs in one process" in res["refused"]


def test_helpers_without_a_process_group():
    assert not distributed.active()
    assert distributed.split_counts(7, 2) == [4, 3] and distributed.split_counts(1, 2) == [1, 0]
    assert distributed.split_counts(6) == [6] and distributed.my_block(6) == (0, 6)
    t = torch.arange(6.0).view(3, 2)
    assert distributed.all_gather_rows(t, [3]) is t
    assert distributed.broadcast_(t) is t and distributed.broadcast_int(5) == 5
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    plain = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    assert distributed.whole_batches(plain) is plain
    # a rank's sharded loader becomes the one-process loader: whole batches, the same order
    half = DataLoader(torch.utils.data.TensorDataset(x, y), sampler=ShardedBatches(10, 4, seed=3, rank_=1, world_=2), batch_size=None)
    one = DataLoader(torch.utils.data.TensorDataset(x, y), sampler=ShardedBatches(10, 4, seed=3, rank_=0, world_=1), batch_size=None)
    whole = distributed.whole_batches(half)
    for _epoch in range(2):
        assert [b[1].tolist() for b in whole] == [b[1].tolist() for b in one]


def test_cli_train_qimad_runs_its_agents_on_two_workers(tmp_path):
    """``qcd-fx train -O qimad --nproc 2`` (refused before): two workers, one summary and one
    epoch line (rank 0's), the files written once. (That the trajectory is the one-process one is
    the tests above, through the same fit; ~15 s of each run here is start-up.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "qcd_fx.cli", "train", "--example", "-O", "qimad", "-e", "1", "-b", "512", "--nproc", "2", "-o", "run"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test accuracy") == 1
    assert proc.stderr.count("epoch 1/1: loss") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.curve.png", "run.history.json", "run.pt"]
    (epoch,) = json.loads((tmp_path / "run.history.json").read_text())["epochs"]
    assert math.isfinite(epoch["train_loss"]) and epoch["val_accuracy"] > 0.1
