"""The per-layer latency table behind ``cdg-prune{target_latency=…}``: what it keys, that it is
measured once and cached, and that a broken cache is re-measured rather than trusted."""

import json

import pytest
import torch
from torch import nn

import qcd_fx
from qcd_fx.examples import digits_cnn
from qcd_fx.latency import LatencyTable, Predictor, layer_key, profile


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QCD_FX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cnn():
    torch.manual_seed(0)
    return digits_cnn(width=8).eval(), torch.randn(1, 1, 8, 8)


@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_every_linear_and_conv_is_a_layer_in_both_front_ends(front_end, cache):
    model, x = _cnn()
    gm = qcd_fx.trace(model, (x,), capture=front_end)
    table = LatencyTable()
    p = profile(gm, (x,), table)
    assert p.layers == 4  # three convolutions and the classifier
    assert table.measured == 4 and all(v > 0 for v in table.entries.values())
    kinds = sorted(json.loads(k)[0] for k in table.entries)
    assert kinds == ["conv", "conv", "conv", "linear"]
    assert p.other_elements > 0
    assert layer_key(gm, next(n for n in gm.graph.nodes if n.op == "placeholder")) is None


def test_the_table_is_measured_once_and_read_back(cache):
    model, x = _cnn()
    gm = qcd_fx.trace(model, (x,))
    first = Predictor(gm, (x,), repeats=3)
    assert first.table.measured == 4 and first.measured_s > 0 and first(gm) > 0
    first.table.save()
    again = LatencyTable()
    assert again.path == first.table.path and again.entries == first.table.entries
    second = Predictor(gm, (x,), table=again, repeats=3)
    assert second.table.measured == 0  # nothing timed again
    assert second(gm) == pytest.approx(second.measured_s, rel=1e-9) or second.other_s == 0.0  # the original predicts its own measured time
    pruned = qcd_fx.transform(model, "cdg-prune{ratio=0.5,criterion=l1}", example_inputs=(x,)).graph_module
    assert second(pruned) < second(gm)
    assert second.table.measured > 0  # the pruned widths are new keys


def test_a_broken_cache_is_measured_again(cache):
    model, x = _cnn()
    gm = qcd_fx.trace(model, (x,))
    table = LatencyTable()
    cache.mkdir(parents=True)
    with open(table.path, "w") as f:
        f.write("{not json")
    table = LatencyTable()
    assert table.entries == {}
    profile(gm, (x,), table)
    assert table.measured == 4


def test_a_layer_key_names_what_decides_its_cost(cache):
    gm = qcd_fx.trace(nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3, bias=False)))
    x = torch.randn(2, 3, 9, 9)
    profile(gm, (x,), table := LatencyTable())
    (key,) = table.entries
    assert json.loads(key) == ["conv", [2, 3, 9, 9], [6, 1, 3, 3], False, [2, 2], [1, 1], [1, 1], 3, "float32"]


def test_cdg_prune_to_a_latency_target_reports_predicted_and_measured(cache):
    model, x = _cnn()
    spec = "cdg-prune{target_latency=0.5,criterion=l1}"
    result = qcd_fx.transform(model, spec, example_inputs=(x,))
    p = result.report.passes[0]
    lat = p.stats["latency"]
    assert lat["predicted_s"] <= lat["target_s"] == pytest.approx(0.5 * lat["original_s"])
    assert lat["measured_s"] > 0 and lat["layers_timed"] > 0 and 0 < lat["ratio"] < 0.95
    assert p.stats["channels_removed"] > 0
    assert any(n.startswith("latency: predicted") for n in p.notes)
    again = qcd_fx.transform(model, spec, example_inputs=(x,)).report.passes[0].stats["latency"]
    assert again["table"] == lat["table"]
    from qcd_fx.errors import PipelineSpecError

    for bad, message in (("target_latency=1.5", "fraction in"), ("target_latency=0.5,ratio=0.3", "only one of")):
        with pytest.raises((ValueError, PipelineSpecError), match=message):
            qcd_fx.transform(model, f"cdg-prune{{{bad}}}", example_inputs=(x,))
