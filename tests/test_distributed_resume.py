"""Per-epoch checkpoints of ``fit``: a resumed run ends where an uninterrupted one does, also after
a worker of a 2-process gloo group is killed mid-epoch and ``torch.distributed.run`` restarts it."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import one_line_error, run

from qcd_fx.cli.train import launcher
from qcd_fx.datasets import load_data
from qcd_fx.train import fit, make_optimizer
from qcd_fx.train.checkpoint import CheckpointError


def _model(hidden=16):
    # dropout: the torch RNG is part of the trajectory
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.1), torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def _train(epochs, checkpoint=None, optimizer="adam", stop_after=None, scheduler=False):
    torch.manual_seed(0)
    model = _model()
    train, val = load_data("digits").loaders(128, seed=0)
    opt = make_optimizer(optimizer, model.parameters(), lr=0.01, seed=0, **({"num_agents": 4} if optimizer == "qimad" else {}))
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7) if scheduler else None

    def stop(record):
        if record.epoch == stop_after:
            raise KeyboardInterrupt  # the process dies after the epoch's checkpoint

    history = fit(model, train, opt, epochs, val_loader=val, progress=False, checkpoint=checkpoint, scheduler=sched, on_epoch=stop)
    return model.state_dict(), history


def _same_history(a, b):
    for x, y in zip(a.epochs, b.epochs, strict=True):
        assert (x.epoch, x.train_loss, x.train_accuracy, x.val_loss, x.val_accuracy, x.lr) == (
            y.epoch,
            y.train_loss,
            y.train_accuracy,
            y.val_loss,
            y.val_accuracy,
            y.lr,
        )


@pytest.mark.parametrize("optimizer", ["adam", "cce"])
def test_resumed_fit_equals_uninterrupted_bit_for_bit(tmp_path, optimizer):
    ref_w, ref_h = _train(3, optimizer=optimizer, scheduler=True)
    path = tmp_path / "run.ckpt"
    _, first = _train(1, path, optimizer=optimizer, scheduler=True)  # a run of 1 epoch, then asked for 3
    assert len(first.epochs) == 1 and path.exists()
    w, h = _train(3, path, optimizer=optimizer, scheduler=True)
    assert [k for k in w] == [k for k in ref_w]
    for k in ref_w:
        assert torch.equal(w[k], ref_w[k]), k
    _same_history(h, ref_h)
    again_w, again_h = _train(3, path, optimizer=optimizer, scheduler=True)  # complete: nothing left to run
    assert all(torch.equal(again_w[k], ref_w[k]) for k in ref_w) and len(again_h.epochs) == 3
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temporary files left


def test_qimad_swarm_resumes_after_an_interrupted_epoch(tmp_path):
    ref_w, ref_h = _train(3, optimizer="qimad")
    path = tmp_path / "qimad.ckpt"
    with pytest.raises(KeyboardInterrupt):
        _train(3, path, optimizer="qimad", stop_after=2)
    w, h = _train(3, path, optimizer="qimad")
    for k in ref_w:
        assert torch.equal(w[k], ref_w[k]), k
    _same_history(h, ref_h)


def test_bad_checkpoints_are_refused_in_one_line(tmp_path):
    path = tmp_path / "run.ckpt"
    _train(2, path)
    train, _ = load_data("digits").loaders(128, seed=0)
    other = _model(hidden=8)
    with pytest.raises(CheckpointError, match=r"different model \('2.weight' is \[16, 64\] float32 there, \[8, 64\] float32 here\)$"):
        fit(other, train, make_optimizer("adam", other.parameters()), 3, progress=False, checkpoint=path)
    model = _model()
    with pytest.raises(CheckpointError, match=r"written with optimizer Adam .* this run uses SGD"):
        fit(model, train, make_optimizer("sgd", model.parameters()), 3, progress=False, checkpoint=path)
    with pytest.raises(CheckpointError, match="holds 2 epochs, more than the 1 asked for"):
        fit(model, train, make_optimizer("adam", model.parameters()), 1, progress=False, checkpoint=path)
    bad = tmp_path / "bad.ckpt"
    for content, message in [
        (b"not a checkpoint", "cannot read checkpoint"),
        (path.read_bytes()[:1000], "cannot read checkpoint"),  # truncated
    ]:
        bad.write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            fit(model, train, make_optimizer("adam", model.parameters()), 3, progress=False, checkpoint=bad)
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match="is not a qcd-fx checkpoint"):
        fit(model, train, make_optimizer("adam", model.parameters()), 3, progress=False, checkpoint=bad)
    torch.save({"format": "qcd-fx checkpoint", "obj": torch.nn.Linear(2, 2)}, bad)  # a pickled module: never unpickled
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*Weights only load failed"):
        fit(model, train, make_optimizer("adam", model.parameters()), 3, progress=False, checkpoint=bad)


def test_cli_checkpoint_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.ckpt").write_bytes(b"garbage")
    one_line_error(run("train", "--example", "-O", "sgd", "-e", "1", "-q", "--checkpoint", "bad.ckpt"), 1, "cannot read checkpoint bad.ckpt")
    one_line_error(run("train", "--example", "-e", "1", "--checkpoint", "nodir/run.ckpt"), 2, "--checkpoint", "nodir")
    one_line_error(run("train", "--example", "-e", "1", "--max-restarts", "1"), 2, "--max-restarts", "--nproc")
    one_line_error(run("train", "--example", "-e", "1", "-o", "run", "--checkpoint", "run.pt"), 2, "--checkpoint run.pt is one of the output files")


WORKER = r"""
import os, signal, sys
import torch
torch.set_num_threads(1)
from qcd_fx import distributed
from qcd_fx.datasets import load_data
from qcd_fx.examples import digits_mlp
from qcd_fx.train import fit, make_optimizer

out, checkpoint, kill, optimizer = sys.argv[1], sys.argv[2], sys.argv[3] == "kill", sys.argv[4]
assert distributed.init_from_env("gloo")
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
torch.manual_seed(0)
model = digits_mlp(hidden=32)
train, val = load_data("digits").loaders(64, seed=0)
steps, done = [0], [0]


def die_mid_epoch_2(module, inputs):  # the first attempt's rank 1 dies halfway through epoch 2
    if module.training and done[0] == 1:
        steps[0] += 1
        if steps[0] == len(train) // 2:
            os.kill(os.getpid(), signal.SIGKILL)


if kill and attempt == 0 and distributed.rank() == 1:
    model.register_forward_pre_hook(die_mid_epoch_2)


def log(record):  # after the epoch's checkpoint
    done[0] = record.epoch
    if distributed.is_main():
        with open(out + ".log", "a") as f:
            f.write(f"attempt {attempt} epoch {record.epoch}\n")


opt = make_optimizer(optimizer, model.parameters(), lr=0.01, seed=0, **({"num_agents": 4} if optimizer == "qimad" else {}))
history = fit(model, train, opt, 3, val_loader=val, progress=False, checkpoint=checkpoint, on_epoch=log)
if distributed.is_main():
    torch.save({"weights": model.state_dict(), "losses": torch.tensor(history.column("train_loss"), dtype=torch.float64)}, out + ".pt")
distributed.finish()
"""


def _torchrun(tmp_path, name: str, kill: bool, optimizer: str) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out, checkpoint = str(tmp_path / name), str(tmp_path / f"{name}.ckpt")
    cmd, env = launcher(2, max_restarts=1)  # what `qcd-fx train --nproc 2 --max-restarts 1` runs
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.Popen(
        [*cmd, str(script), out, checkpoint, "kill" if kill else "-", optimizer], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # the launcher and its workers: one process group, killed together on a timeout
    )  # fmt: skip


@pytest.mark.parametrize("optimizer", ["adam", "qimad"])  # DDP; QIMAD's agents split over the ranks, its swarm checkpointed
def test_killed_worker_restarts_and_resumes_from_the_last_checkpoint(tmp_path, optimizer):
    # two launches side by side: uninterrupted, and one whose rank 1 is SIGKILLed halfway through epoch 2
    procs = {name: _torchrun(tmp_path, name, kill=name == "killed", optimizer=optimizer) for name in ("whole", "killed")}
    errors = {}
    try:
        for name, p in procs.items():
            errors[name] = p.communicate(timeout=300)[1]
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    for name, p in procs.items():
        log = tmp_path / f"{name}.log"
        epochs = log.read_text().splitlines() if log.exists() else []
        # the launcher's failure table ("Root Cause") names the attempt's failing rank and signal
        assert p.returncode == 0, (name, epochs, errors[name][-4000:])
    # the killed run: epoch 1 on the first attempt; the restarted group resumed after it and ran 2 and 3
    assert (tmp_path / "killed.log").read_text().splitlines() == ["attempt 0 epoch 1", "attempt 1 epoch 2", "attempt 1 epoch 3"]
    assert (tmp_path / "whole.log").read_text().splitlines() == [f"attempt 0 epoch {e}" for e in (1, 2, 3)]
    whole, killed = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "killed.pt")
    for k, w in whole["weights"].items():
        assert torch.equal(killed["weights"][k], w), k  # bit for bit: the same reduction order on both runs
    assert torch.equal(killed["losses"], whole["losses"])


def _group_run(cmd, timeout, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` of a launcher: on a timeout its whole process group (the workers too) is killed."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def test_cli_nproc_passes_max_restarts_to_the_elastic_launcher(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "qcd_fx.cli", "train", "--example", "-O", "sgd", "--lr", "0.05", "-e", "1", "-q",
           "--nproc", "2", "--max-restarts", "1", "--checkpoint", "run.ckpt"]  # fmt: skip
    proc = _group_run(cmd, 240, cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert (saved["epoch"], saved["world"], len(saved["rng"]), len(saved["history"]["epochs"])) == (1, 2, 2, 1)
    assert sorted(os.listdir(tmp_path)) == ["run.ckpt"]
    (tmp_path / "run.ckpt").write_bytes(b"garbage")  # checked before any worker starts: one line
    bad = _group_run(cmd, 120, cwd=tmp_path, env=env)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert bad.stderr.startswith("error: cannot read checkpoint run.ckpt")
