"""Distributed cdg-prune calibration: per-channel sums of ``|a|`` and of the seed's entropy term
(and their counts) are accumulated batch by batch and all-reduced, so 2 gloo ranks over 2 shards
of the calibration batches prune exactly as one process over all of them."""

import subprocess

import numpy as np
import pytest
import torch
from helpers import start_workers, wait_workers

import qcd_fx
from qcd_fx.examples import digits_cnn
from qcd_fx.passes.dependency import analyze
from qcd_fx.passes.prune import Calibration, Moments, _calibrate, _ensure_shapes, _scores, channel_efficiency

WORKER = r"""
import sys
import torch
torch.set_num_threads(1)
import torchvision
import qcd_fx
from qcd_fx import distributed
from qcd_fx.examples import digits_cnn

out = sys.argv[1]
distributed.init_from_env("gloo")
rank, world = distributed.rank(), distributed.world()

def batches(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    every = [torch.randn(shape, generator=g) for _ in range(n)]
    return every[rank::world]  # this rank's shard (all of them on one process)

def scaled(model, head, by):  # larger logits: a higher output efficiency, so threshold=auto and scope=nodes remove something
    with torch.no_grad():
        getattr(model, head).weight.mul_(by)
    return model

def digits(seed=0, by=1.0):
    torch.manual_seed(seed)
    return scaled(digits_cnn(width=16), "classifier", by)

CONFIGS = {
    # name: (model, spec, calibration batches, example input)
    "digits-ratio": (digits, "cdg-prune{ratio=0.5}", (2, 1, 8, 8), 8),
    "digits-auto": (lambda: digits(by=10.0), "cdg-prune{threshold=auto}", (2, 1, 8, 8), 8),
    # every rank starts from other weights: rank 0's decision and pruned weights are broadcast
    "digits-unseeded": (lambda: digits(seed=rank), "cdg-prune{ratio=0.5}", (2, 1, 8, 8), 8),
    "resnet18-both": (lambda: scaled(torchvision.models.resnet18(num_classes=10), "fc", 30.0), "cdg-prune{scope=both,ratio=0.5}", (2, 3, 32, 32), 4),
}
results = {}
for name, (make, spec, shape, n) in CONFIGS.items():
    torch.manual_seed(0)
    model = make().eval()
    example = torch.zeros((2,) + shape[1:])
    result = qcd_fx.transform(model, spec, example_inputs=(example,), calibration=[(b,) for b in batches(shape, n, seed=1)])
    stats = result.report.passes[0].stats
    results[name] = {"state": result.graph_module.state_dict(), "stats": stats, "code": result.graph_module.code}
torch.save(results, f"{out}-{world}-rank{rank}.pt")
distributed.finish()
"""


def _launch(tmp_path, world: int) -> list[subprocess.Popen]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return start_workers(script, world, tmp_path / "out")


def _same_state(a: dict, b: dict, exact: bool = True) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7), k


def test_two_gloo_ranks_over_two_shards_keep_the_channels_of_one_process(tmp_path):
    procs = _launch(tmp_path, 1) + _launch(tmp_path, 2)  # the single process and the 2 ranks run side by side
    wait_workers(procs)
    one = torch.load(tmp_path / "out-1-rank0.pt", weights_only=False)
    r0 = torch.load(tmp_path / "out-2-rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "out-2-rank1.pt", weights_only=False)
    for name in ("digits-ratio", "digits-auto", "resnet18-both"):
        s1, s2 = one[name]["stats"], r0[name]["stats"]
        assert s2["calibration_batches"] == {"resnet18-both": 4}.get(name, 8), name  # the union of the shards
        assert s1["widths"] == s2["widths"] and s1["channels_removed"] == s2["channels_removed"] > 0, name
        assert s1.get("branches_removed") == s2.get("branches_removed") and (s2["branches_removed"] if name == "resnet18-both" else True), name
        assert one[name]["code"] == r0[name]["code"], name
        # the same channels of the same weights: equal bit for bit
        _same_state(one[name]["state"], r0[name]["state"])
        if name == "digits-auto":
            assert s2["output_efficiency"] == pytest.approx(s1["output_efficiency"], rel=1e-12, abs=1e-15)
    for name in r0:  # every rank holds rank 0's pruned model, even when the ranks' weights differed
        assert r0[name]["code"] == r1[name]["code"] and r0[name]["stats"]["widths"] == r1[name]["stats"]["widths"], name
        _same_state(r0[name]["state"], r1[name]["state"])


def test_streamed_moments_equal_the_concatenated_computation():
    g = torch.Generator().manual_seed(0)
    for shape, axis in (((3, 5, 4, 4), 1), ((2, 7, 6), 2), ((4, 9), 1), ((6, 3, 5), 0)):
        parts = [torch.randn(shape, generator=g) * 3 for _ in range(3)]
        m = Moments(shape[axis])
        for p in parts:
            m.add_channels(p, axis)
        whole = torch.cat(parts, dim=0 if axis else 1)
        assert float((m.efficiency() - channel_efficiency(whole, axis)).abs().max()) <= 3e-7
        # two shards summed (what the all-reduce does) == the union, up to float64 rounding
        a, b = Moments(shape[axis]), Moments(shape[axis])
        a.add_channels(parts[0], axis)
        for p in parts[1:]:
            b.add_channels(p, axis)
        assert torch.allclose(a.abs_sum + b.abs_sum, m.abs_sum, rtol=1e-14, atol=0)
        assert torch.allclose(a.ent_sum + b.ent_sum, m.ent_sum, rtol=1e-14, atol=0)
        assert a.count + b.count == m.count
        # whole-tensor totals (residual branches): the seed's efficiency of the concatenation
        w = Moments(1)
        for p in parts:
            w.add_whole(p, axis)
        ref = qcd_fx.measures.efficiency(whole, dim=axis)
        assert float(w.efficiency()[0]) == pytest.approx(float(ref), abs=3e-7)


def test_calibration_streams_the_scores_of_the_concatenated_activations():
    torch.manual_seed(0)
    gm = qcd_fx.trace(digits_cnn(width=16).eval())
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(3, 1, 8, 8, generator=g),) for _ in range(4)]
    _ensure_shapes(gm, calib, "test", force=True)
    deps = analyze(gm)
    cal = _calibrate(gm, calib, deps.producers)
    assert isinstance(cal, Calibration) and cal.batches == 4 and set(cal.efficiencies()) == set(deps.producers)
    # the reference: every activation concatenated (what calibration kept before it streamed)
    acts: dict[str, list] = {}
    for (x,) in calib:
        values = {}
        for name, module in gm.named_modules():
            if name and name.replace(".", "_") in deps.producers:
                module.register_forward_hook(lambda m, i, o, name=name: values.__setitem__(name.replace(".", "_"), o.detach().clone()))
        with torch.no_grad():
            out = gm(x)
        for h in [m for _, m in gm.named_modules()]:
            h._forward_hooks.clear()
        for k, v in values.items():
            acts.setdefault(k, []).append(v)
        acts.setdefault("__out__", []).append(float(qcd_fx.measures.efficiency(out, dim=-1)))
    assert set(acts) - {"__out__"} == set(deps.producers)
    ref = _scores(gm, deps, "cdg", {k: torch.cat(v) for k, v in acts.items() if k != "__out__"}, 0)
    got = _scores(gm, deps, "cdg", cal.efficiencies(), 0)
    np.testing.assert_allclose(got, ref, rtol=0, atol=3e-7)
    assert cal.output_efficiency == sum(acts["__out__"]) / 4  # the mean of the per-batch efficiencies, as before
    # the all-reduce payload: 2 float64 sums per channel and one count per node, 3 totals
    widths = sum(len(c.atoms) for c in deps.producers.values())
    assert cal.payload().numel() == 2 * widths + len(deps.producers) + 3
