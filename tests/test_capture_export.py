"""The torch.export front end: Hugging Face transformers (BERT, GPT-2, a Llama-style decoder with
grouped-query attention, ViT) and models fx cannot trace are captured, transformed exactly,
pruned validly, trained, saved and loaded, exported to ONNX and written as .pt2 files plain
PyTorch runs."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from hf_models import NAMES, build, main_output
from torch import nn

import qcd_fx
from qcd_fx.errors import TraceError, UsageError

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _linear_macs(gm: torch.fx.GraphModule, x) -> int:
    """MACs of the linear layers alone (aten.linear / addmm), from a run with the flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        gm(x)
    aten = torch.ops.aten
    counts = counter.get_flop_counts()["Global"]
    return sum(v for k, v in counts.items() if k in (aten.mm, aten.addmm, aten.bmm, aten.linear)) // 2


@pytest.fixture(scope="module", params=NAMES)
def hf(request):
    model, x = build(request.param)
    return request.param, model, x


def test_auto_capture_falls_back_to_export_and_identity_qci_is_exact(hf):
    name, model, x = hf
    with torch.no_grad():
        ref = main_output(model(x))
    result = qcd_fx.transform(model, "qci{min_width=8}", example_inputs=x)
    cap = result.report.capture
    assert cap["front_end"] == "export" and cap["reason"].startswith("torch.fx failed")
    assert any("dim 0" in d for d in cap["dynamic"]) and not cap["specialized"]
    assert result.report.passes[0].stats["gates"] >= 8
    assert result.report.passes[0].drift_abs == 0.0
    gm = result.graph_module
    with torch.no_grad():
        assert torch.equal(main_output(gm(x)), ref)
        other = torch.cat([x, x[:1]])  # a batch size the capture did not see
        assert torch.equal(main_output(gm(other))[:2], main_output(model(other))[:2])


def test_prune_halves_heads_and_mlp(hf):
    name, model, x = hf
    result = qcd_fx.transform(model, "cdg-prune{ratio=0.5,criterion=l1}", example_inputs=x)
    gm = result.graph_module
    before = _linear_macs(qcd_fx.trace(model, x, capture="export"), x)
    after = _linear_macs(gm, x)
    assert before / after >= 1.8, (name, before, after)
    assert not [n for n in result.report.notes() if "no pruning rule" in n or "not tracked" in n]
    out = gm(x)
    assert main_output(out).shape == main_output(model(x)).shape  # the classifier / vocabulary keeps its width
    assert type(out) is type(model(x))  # a ModelOutput stays a ModelOutput


def test_grouped_query_attention_prunes_whole_key_value_groups():
    model, x = build("llama")
    gm = qcd_fx.transform(model, "cdg-prune{ratio=0.5,criterion=l1}", example_inputs=x).graph_module
    params = dict(gm.named_parameters())
    for layer in range(2):
        q = params[f"model.layers.{layer}.self_attn.q_proj.weight"].shape[0]
        k = params[f"model.layers.{layer}.self_attn.k_proj.weight"].shape[0]
        v = params[f"model.layers.{layer}.self_attn.v_proj.weight"].shape[0]
        o = params[f"model.layers.{layer}.self_attn.o_proj.weight"].shape[1]
        head_dim = 8
        assert k == v and q == o and q % head_dim == 0 and k % head_dim == 0
        assert q // k == 2  # 2 query heads per key/value head, as before
        assert q < 32


def test_mixture_of_experts_prunes_every_expert_alike_and_keeps_the_experts():
    """Mixtral: the router's top-2 picks among its 4 experts, whose weights are 3-d parameters fed
    to transformers' grouped matmul; the hidden and intermediate channels of every expert are
    pruned together, the experts themselves (the router's outputs) all stay."""
    model, x = build("mixtral")
    result = qcd_fx.transform(model, "cdg-prune{ratio=0.5,criterion=l1}", example_inputs=x)
    gm = result.graph_module
    params = dict(gm.named_parameters())
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        assert params[f"{p}.gate.weight"].shape == (4, 16)  # 4 experts, half the hidden width
        assert params[f"{p}.experts.gate_up_proj"].shape == (4, 64, 16)
        assert params[f"{p}.experts.down_proj"].shape == (4, 16, 32)
    before = _linear_macs(qcd_fx.trace(model, x, capture="export"), x)
    assert before / _linear_macs(gm, x) >= 1.8
    assert not [n for n in result.report.notes() if "no pruning rule" in n]
    assert any("top-k along the channel axis" in n for n in result.report.notes())
    assert main_output(gm(x)).shape == main_output(model(x)).shape
    if importlib.util.find_spec("onnxruntime"):  # the grouped matmul has our own ONNX translation
        parity = qcd_fx.export_onnx(gm, (x,), None).to_dict()["parity"]
        assert len(parity) >= 2 and all(p["ok"] for p in parity), parity


def test_keyword_inputs_attention_mask():
    model, ids = build("bert")
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    result = qcd_fx.transform(model, "cdg-prune{ratio=0.5}", example_inputs=inputs)
    gm = result.graph_module
    assert result.report.capture["front_end"] == "export"
    out = gm(input_ids=ids, attention_mask=mask)
    assert out.logits.shape == (2, 2)
    fx_model = _ShapeBranch().fc  # an fx-traceable module: keyword inputs bind by name
    assert qcd_fx.transform(fx_model, "qci", example_inputs={"input": torch.randn(2, 8)}).report.capture["front_end"] == "fx"
    with pytest.raises(UsageError, match="no input named 'inp'"):
        qcd_fx.transform(fx_model, "qci", example_inputs={"inp": torch.randn(2, 8)})


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_pruned_export_graph_trains_saves_loads_and_switches_dropout(name, tmp_path):
    model, x = build(name)
    gm = qcd_fx.transform(model, "qci,cdg-prune{ratio=0.5}", example_inputs=x).graph_module
    assert not gm.training  # as the model was
    if name == "bert":  # dropout is a module again: train() turns it on, eval() off
        assert any(isinstance(m, nn.Dropout) for m in gm.modules())
        gm.train()
        torch.manual_seed(1)
        a = main_output(gm(x))
        b = main_output(gm(x))
        assert not torch.equal(a, b)
        gm.eval()
        assert torch.equal(main_output(gm(x)), main_output(gm(x)))
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    before = [p.detach().clone() for p in gm.parameters()]
    loss = main_output(gm(x)).float().pow(2).mean()
    loss.backward()
    opt.step()
    assert any(not torch.equal(p0, p) for p0, p in zip(before, gm.parameters()))
    gm.eval()
    path = tmp_path / "m.qcd.pt"
    assert qcd_fx.save(gm, path) == "safe"
    loaded = qcd_fx.load(path)
    with torch.no_grad():
        assert torch.equal(main_output(loaded(x)), main_output(gm(x)))
    assert type(loaded(x)) is type(gm(x))


def test_onnx_parity_on_two_batch_sizes(tmp_path):
    pytest.importorskip("onnxruntime")
    for name in ("gpt2", "vit"):
        model, x = build(name)
        gm = qcd_fx.transform(model, "qci,cdg-prune{ratio=0.5}", example_inputs=x).graph_module
        report = qcd_fx.export_onnx(gm, (x,), str(tmp_path / f"{name}.onnx"))
        batches = {p.batch for p in report.parity}
        assert len(batches) >= 2 and all(p.ok for p in report.parity), report.parity


_PLAIN_TORCH = """
import sys
sys.modules["qcd_fx"] = None  # qcd-fx is not installed here
import torch
m = torch.export.load(sys.argv[1]).module()
x = torch.load(sys.argv[2])
ref = torch.load(sys.argv[3])
out = m(x)
out = out["logits"] if isinstance(out, dict) else out
assert torch.allclose(out, ref, atol=1e-5), float((out - ref).abs().max())
bigger = m(torch.cat([x, x, x]))  # the batch dimension stayed dynamic
bigger = bigger["logits"] if isinstance(bigger, dict) else bigger
assert bigger.shape[0] == 3 * x.shape[0]
print("ok")
"""


@pytest.mark.parametrize("name", ["llama", "digits"])
def test_pt2_runs_in_plain_pytorch_without_qcd_fx(name, tmp_path, digits_cnn):
    if name == "digits":
        model, x = digits_cnn, torch.randn(2, 1, 8, 8)
    else:
        model, x = build(name)
    gm = qcd_fx.transform(model, "qci,cdg-prune{ratio=0.5}", example_inputs=x).graph_module
    with torch.no_grad():
        ref = gm(x)
    ref = main_output(ref) if isinstance(ref, dict) else ref
    path = tmp_path / "m.pt2"
    assert qcd_fx.save(gm, path) == "pt2"
    torch.save(x, tmp_path / "x.pt")
    torch.save(ref, tmp_path / "ref.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _PLAIN_TORCH, str(path), str(tmp_path / "x.pt"), str(tmp_path / "ref.pt")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
    back = qcd_fx.load(path)  # and qcd-fx reads it back as a GraphModule
    assert isinstance(back, torch.fx.GraphModule)


class _ShapeBranch(nn.Module):
    """fx cannot trace ``if`` on a size; torch.export decides it at capture time."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.shape[0] > 1:  # Python control flow on a (symbolic) size
            y = torch.relu(y)
        return self.head(y)


def test_fx_untraceable_model_is_captured_by_export_with_what_it_fixed():
    model = _ShapeBranch().eval()
    x = torch.randn(4, 8)
    with pytest.raises(TraceError, match="--capture export"):
        qcd_fx.trace(model, x, capture="fx")
    gm = qcd_fx.trace(model, x)
    info = gm.meta["capture"]
    assert info.front_end == "export" and "control flow" in info.reason
    assert info.dynamic == ["x dim 0"]
    assert torch.equal(gm(x), model(x))
    result = qcd_fx.transform(model, "qci,cdg-prune{ratio=0.5}", example_inputs=x)
    assert result.report.passes[0].drift_abs == 0.0
    assert result.graph_module.get_parameter("fc.weight").shape[0] < 16


def test_batch_norm_and_dropout_become_modules_that_follow_train_and_eval():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = qcd_fx.trace(model, x, capture="export")
    bns = [m for m in gm.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20
    assert not any(getattr(n.target, "__name__", "") == "batch_norm.default" for n in gm.graph.nodes)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    gm.train()
    before = bns[0].running_mean.clone()
    gm(x)
    assert not torch.equal(before, bns[0].running_mean)  # training mode updates the running statistics
    result = qcd_fx.transform(model, "qci,cdg-prune{ratio=0.5}", example_inputs=x, capture="export")
    assert result.report.passes[0].drift_abs == 0.0
    assert result.report.baseline.macs / result.report.final.macs >= 1.8


def test_capture_errors_are_one_line():
    model, x = build("gpt2")
    with pytest.raises(UsageError, match="capture must be one of"):
        qcd_fx.trace(model, x, capture="dynamo")
    with pytest.raises(UsageError, match="needs example inputs"):
        qcd_fx.trace(model, capture="export")
    with pytest.raises(TraceError, match="decorator"):
        qcd_fx.trace(model, x, capture="fx")
    with pytest.raises(UsageError, match="leaf_modules"):
        qcd_fx.trace(model, ["transformer"])


@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_transformed_and_pruned_graphs_run_under_torch_compile(front_end, digits_cnn):
    x = torch.randn(4, 1, 8, 8)
    for spec in ("qci,csc", "cdg-prune{ratio=0.5}"):
        gm = qcd_fx.transform(digits_cnn, spec, example_inputs=x, capture=front_end).graph_module.eval()
        compiled = torch.compile(gm, backend="aot_eager", dynamic=False)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), gm(x), rtol=1e-5, atol=1e-6)


# --- the CLI: transformers directories and config files, --capture, --dtype, -o .pt2 ----------


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    model, _ = build("llama")
    model.save_pretrained(root / "llama")  # config.json + model.safetensors
    vit, _ = build("vit")
    (root / "vitcfg").mkdir()
    vit.config.save_pretrained(root / "vitcfg")  # a bare config.json: random weights
    return root


def test_cli_transforms_a_save_pretrained_directory_to_pt2_and_onnx(hf_dirs, tmp_path):
    from helpers import run

    pytest.importorskip("onnxruntime")
    out, onnx_file = tmp_path / "small.pt2", tmp_path / "small.onnx"
    result = run("transform", str(hf_dirs / "llama"), "-p", "qci,cdg-prune{ratio=0.5}", "-o", str(out), "--onnx", str(onnx_file))
    assert result.exit_code == 0, result.stderr
    assert "captured with torch.export" in result.stdout and "co_varnames" in result.stdout
    assert out.exists() and onnx_file.exists()
    program = torch.export.load(str(out)).module()
    logits = program(torch.randint(0, 100, (3, 16)))["logits"]  # token ids by default, any batch
    assert logits.shape == (3, 16, 100)


def test_cli_config_json_dtype_and_capture_errors(hf_dirs, tmp_path):
    from helpers import one_line_error, run

    cfg = str(hf_dirs / "vitcfg" / "config.json")
    result = run("transform", cfg, "-p", "cdg-prune", "--report", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.stderr
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["capture"]["front_end"] == "export" and report["input_shapes"] == [[1, 3, 32, 32]]
    one_line_error(run("transform", cfg, "--capture", "dynamo"), 2, "capture must be one of auto, fx, export")
    one_line_error(run("transform", cfg, "--capture", "fx"), 1, "cannot trace", "--capture export")
    one_line_error(run("transform", str(hf_dirs / "llama"), "--dtype", "int8"), 2, "--dtype 'int8'")
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dirs / "llama" / "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes(b"not read")
    one_line_error(run("transform", str(bad)), 1, "only pickled weights")


@pytest.mark.zoo
@pytest.mark.parametrize("name", __import__("qcd_fx.zoo", fromlist=["zoo"]).classification_models())
def test_every_torchvision_classifier_through_torch_export(name):
    """``pytest -m zoo``: each of torchvision's classifiers captured with torch.export, identity
    QCI exact, cdg-prune valid."""
    from qcd_fx import zoo

    model, shape = zoo.build(name, small=True)
    x = torch.randn((2, *shape[1:]))
    result = qcd_fx.transform(model, "qci", example_inputs=x, capture="export")
    assert result.report.capture["front_end"] == "export"
    assert result.report.passes[0].drift_abs == 0.0, name
    pruned = qcd_fx.transform(model, "cdg-prune{ratio=0.5,criterion=l1}", example_inputs=x, capture="export")
    with torch.no_grad():
        assert pruned.graph_module(x).shape == model(x).shape
