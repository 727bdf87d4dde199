"""Data-parallel fit with real ``torch.distributed`` process groups: 2 gloo processes on loopback
follow the single-process trajectory with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import start_workers, wait_workers

from qcd_fx.distributed import ShardedBatches

WORKER = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
from qcd_fx import distributed
from qcd_fx.datasets import load_data
from qcd_fx.examples import digits_mlp
from qcd_fx.train import fit, make_optimizer

optimizer, out = sys.argv[1], sys.argv[2]
assert distributed.init_from_env("gloo")
torch.manual_seed(0)
model = digits_mlp(hidden=32)  # no batch norm: its batch statistics are per rank (as under DDP without SyncBatchNorm)
data = load_data("digits")
train, val = data.loaders(64, seed=0)
history = fit(model, train, make_optimizer(optimizer, model.parameters(), lr=0.05, seed=0), 2, val_loader=val, progress=False)
if distributed.is_main():
    torch.save(model.state_dict(), out + ".pt")
    with open(out + ".json", "w") as f:
        json.dump([e.train_loss for e in history.epochs] + [history.final_val_accuracy], f)
distributed.finish()
"""


def _run(tmp_path, world: int, optimizer: str, worker: str = WORKER) -> tuple[dict, list]:
    script = tmp_path / "worker.py"
    script.write_text(worker)
    out = str(tmp_path / f"{optimizer}-{world}")
    wait_workers(start_workers(script, world, optimizer, out))
    return torch.load(out + ".pt"), json.loads(open(out + ".json").read())


@pytest.mark.parametrize("optimizer", ["sgd", "cce"])
def test_two_gloo_ranks_follow_the_single_process_trajectory(tmp_path, optimizer):
    # one process: no process group (init_from_env returns False), the same global batch of 64
    single_w, single_h = _run_single(tmp_path, optimizer)
    ddp_w, ddp_h = _run(tmp_path, 2, optimizer)
    for k in single_w:
        torch.testing.assert_close(ddp_w[k], single_w[k], rtol=1e-4, atol=2e-5)
    assert ddp_h[:2] == pytest.approx(single_h[:2], rel=1e-4)  # training losses, all-reduced
    assert ddp_h[2] == pytest.approx(single_h[2], abs=2 / 360)  # test accuracy


def _run_single(tmp_path, optimizer):
    script = tmp_path / "worker_single.py"
    script.write_text(WORKER.replace('assert distributed.init_from_env("gloo")', ""))  # finish() is a no-op off a group
    out = str(tmp_path / f"{optimizer}-single")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, str(script), optimizer, out], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out + ".pt"), json.loads(open(out + ".json").read())


def test_sharded_batches_split_every_global_batch():
    one = ShardedBatches(10, 4, seed=3, rank_=0, world_=1)
    halves = [ShardedBatches(10, 4, seed=3, rank_=r, world_=2) for r in range(2)]
    for _epoch in range(3):  # a new permutation every epoch, the same on every rank
        whole = list(one)
        a, b = (list(h) for h in halves)
        assert [sorted(x + y) for x, y in zip(a, b)] == [sorted(batch) for batch in whole]
        assert sorted(i for batch in whole for i in batch) == list(range(10))
    with pytest.raises(ValueError, match="multiple of the 2 ranks"):
        ShardedBatches(10, 5, rank_=0, world_=2)


def test_cli_train_nproc_launches_two_workers_and_rank0_writes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    cmd = [sys.executable, "-m", "qcd_fx.cli", "train", "--example", "-O", "sgd", "--lr", "0.05", "-e", "1", "--nproc", "2", "-o", "run"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test accuracy") == 1  # one summary: rank 0's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.curve.png", "run.history.json", "run.pt"]
    bad = subprocess.run([*cmd[:-2], "-b", "63"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: --batch-size 63 (the global batch) must be a multiple of --nproc 2"]


FSDP_WORKER = (
    WORKER.replace(
        "history = fit(",
        """from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
fully_shard(model, mesh=init_device_mesh("cpu", (distributed.world(),)))
try:
    make_optimizer("cce", model.parameters())
    raise SystemExit("CCE accepted sharded parameters")
except ValueError as e:
    assert "sharded (FSDP / fully_shard)" in str(e), e
history = fit(""",
    )
    .replace('torch.save(model.state_dict(), out + ".pt")', "pass")
    .replace(
        "if distributed.is_main():\n    pass",
        'full = {k: v.full_tensor() for k, v in model.state_dict().items()}\nif distributed.is_main():\n    torch.save(full, out + ".pt")',
    )
)


def test_fully_shard_on_cpu_gloo_trains_like_one_process_and_cce_refuses_it(tmp_path):
    """FSDP2 (``fully_shard``) runs on CPU with gloo: ``fit`` adds no DDP around it (FSDP reduces
    the gradients itself) and Adam follows the one-process trajectory; CCE, whose per-tensor
    statistics need whole gradients, refuses sharded parameters in one line."""
    assert "full_tensor" in FSDP_WORKER and "fully_shard(model" in FSDP_WORKER
    single_w, single_h = _run_single(tmp_path, "adam")
    fsdp_w, fsdp_h = _run(tmp_path, 2, "adam", FSDP_WORKER)
    for k in single_w:
        torch.testing.assert_close(fsdp_w[k], single_w[k], rtol=1e-4, atol=2e-5)
    assert fsdp_h[:2] == pytest.approx(single_h[:2], rel=1e-4)
