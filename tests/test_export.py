"""ONNX export (qcd_fx.export, `qcd-fx export`, `qcd-fx run`), verified against onnxruntime.

:func:`assert_onnx_parity` takes any GraphModule and its example inputs; other test modules
(pruning) reuse it: ``from test_export import assert_onnx_parity``.
"""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from helpers import leftovers, one_line_error, run
from torch import nn

import qcd_fx
import qcd_fx.cli  # noqa: F401 - registers `export` and `run` on the app
from qcd_fx import zoo
from qcd_fx.errors import ExportError
from qcd_fx.examples import digits_cnn
from qcd_fx.export import ExportReport, export_onnx

ATOL, RTOL = 1e-4, 1e-5  # the criterion: within ATOL absolute, or RTOL relative to the output's magnitude
SANITY_RTOL = 1e-4  # and never worse than this relative error, so near-zero outputs cannot pass vacuously


def _leaves(out):
    return [t for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _new_batch(inputs, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn((batch, *t.shape[1:]), generator=gen, dtype=t.dtype) if t.is_floating_point() else t[torch.arange(batch) % t.shape[0]] for t in inputs
    )


def assert_onnx_parity(gm, inputs, path, *, atol=ATOL, rtol=RTOL, extra_batch=None, **kwargs) -> ExportReport:
    """Export ``gm`` with :func:`export_onnx` and check the file independently of qcd-fx's own
    verification: onnx.checker on the written file, plain-ONNX ops only, a symbolic batch axis,
    and a fresh onnxruntime session whose outputs match PyTorch eager on the example inputs and
    on another batch size (``extra_batch``, default batch + 2: not one of the export's own)."""
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    report = qcd_fx.export_onnx(gm, inputs, path, **kwargs)  # the public API
    assert os.path.isfile(path) and leftovers(os.path.dirname(os.path.abspath(path))) == []
    # qcd-fx's report
    dynamic = kwargs.get("dynamic_batch", True)
    assert report.checked and report.checker_ok and report.ok, report
    if dynamic:
        sets = [p.inputs for p in report.parity]
        assert sets[0] == "example" and sets[1].startswith("batch ") and report.parity[0].batch != report.parity[1].batch, report.parity
        assert set(sets[2:]) <= {"|x|", "-|x|", "10x"}, sets  # the sign and scale variants (integer-only inputs have none)
        assert report.dynamic_batch and all(isinstance(s[0], str) for s in report.input_shapes), report.input_shapes
    assert report.domains == [""], f"custom-domain ops: {report.domains}"
    # the file itself
    onnx.checker.check_model(path, full_check=True)
    model = onnx.load(path, load_external_data=False)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert [o.name for o in model.graph.output] == report.output_names
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == report.input_names
    b = inputs[0].shape[0]
    batches = [inputs, _new_batch(inputs, extra_batch or b + 2, seed=7)] if dynamic else [inputs]
    gm.eval()
    for batch in batches:
        with torch.no_grad():
            expected = _leaves(gm(*batch))
        got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), batch)})
        assert len(got) == len(expected)
        for name, g, e in zip(report.output_names, got, expected):
            e = e.numpy()
            assert g.shape == e.shape, (name, g.shape, e.shape)
            diff = float(np.max(np.abs(g.astype(np.float64) - e.astype(np.float64)))) if e.size else 0.0
            scale = float(np.max(np.abs(e))) if e.size else 0.0
            rel = diff / scale if scale else diff
            assert diff <= atol or rel <= rtol, f"{name} at batch {batch[0].shape[0]}: max abs {diff:.3g}, rel {rel:.3g}"
            assert rel <= max(SANITY_RTOL, rtol), f"{name} at batch {batch[0].shape[0]}: relative error {rel:.3g} (outputs ~{scale:.3g})"
    return report


# ---------------------------------------------------------------------------------------------
# The CI subset after qci,csc


# zoo.CI_SUBSET without GoogLeNet: its Inception blocks (conv, BN, ReLU, pooling, concat) add no
# operator the others lack (DenseNet and SqueezeNet concatenate branches too), and each dynamo
# export costs 5-70 s here. DenseNet, ShuffleNet and Swin run with `-m slow` (the default run
# exports them pruned, tests/test_prune.py); `pytest -m zoo` exports every model.
ONNX_CI_SUBSET = tuple(name for name in zoo.CI_SUBSET if name != "googlenet")
ONNX_SLOW = ("densenet121", "shufflenet_v2_x0_5", "swin_t")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ONNX_SLOW else n for n in ONNX_CI_SUBSET])
def test_ci_subset_exports_after_qci_csc(name, tmp_path):
    model, shape = zoo.build(name, small=True)
    x = torch.randn(shape)
    gm = qcd_fx.transform(model, "qci,csc", (x,)).graph_module
    report = assert_onnx_parity(gm, (x,), str(tmp_path / f"{name}.onnx"))
    assert report.exporter == "dynamo" and report.fallback_reason is None
    assert report.input_names == ["x"] and report.output_names == ["output"]
    assert report.opset >= 18 and report.nodes > 0 and report.file_bytes == os.path.getsize(tmp_path / f"{name}.onnx")


@pytest.mark.parametrize(
    "spec, masks",
    [("qci{rank=4},csc{hard=true}", 1), ("qci{init=seed,min_width=8},csc{target=activations,hard=true}", 3)],
    ids=["low-rank-gates+hard-output-csc", "seed-gates+hard-activation-csc"],
)
def test_hard_csc_and_low_rank_gates_export(spec, masks, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    result = qcd_fx.transform(digits_cnn().eval(), spec, (x,))
    gm = result.graph_module
    assert result.report.passes[0].stats["gates"] > 0 and result.report.passes[1].stats["masks"] == masks
    report = assert_onnx_parity(gm, (x,), str(tmp_path / "digits.onnx"))
    assert [p.batch for p in report.parity] == [4, 5]  # the example and a second batch (torch.export: no value variants)
    # the hard masks zero the same entries in onnxruntime as in PyTorch. Compared on the masks'
    # own outputs (an activation mask's zeros do not reach the logits), and only after checking
    # that each mask really zeroes entries its input had non-zero (after a ReLU, zeros alone
    # would prove nothing: the ReLU made them)
    from qcd_fx.nn import StateCompression

    graph, env, leaves = torch.fx.Graph(), {}, []  # the graph up to the masks, returning (input, output) of each
    for node in gm.graph.nodes:
        if node.op != "output":
            env[node] = graph.node_copy(node, env.__getitem__)
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), StateCompression):
                leaves += [env[node.args[0]], env[node]]
    graph.output(tuple(leaves))
    probe = torch.fx.GraphModule(gm, graph).eval()
    export_onnx(probe, (x,), str(tmp_path / "masks.onnx"))
    session = ort.InferenceSession(str(tmp_path / "masks.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = [t.numpy() for t in probe(x)]
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert len(got) == len(expected) == 2 * masks
    for i in range(0, 2 * masks, 2):
        before, after = expected[i], expected[i + 1]
        zeroed = (after == 0) & (before != 0)
        assert zeroed.sum() >= 0.05 * after.size, f"mask {i // 2} zeroed only {zeroed.sum()} of {after.size} entries"
        assert np.array_equal(got[i] != 0, before != 0)
        assert np.array_equal(got[i + 1] == 0, after == 0), f"mask {i // 2}: zero patterns differ"
        assert np.array_equal((got[i + 1] == 0) & (got[i] != 0), zeroed)


def test_csc_on_saturated_logits_keeps_its_epsilon(tmp_path):
    """Logits ~1e8 (as random-init Inception-v3's) saturate the softmax: s = -0.0 at the
    largest logit, and only the seed's ``+ 1e-8`` keeps the CSC mask at 1 there. onnxscript's
    optimizer would delete ``+ 1e-8`` as ``+ 0`` (and onnxruntime's output would differ by ~100 %)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32)).eval()  # wider than 10: it gets a gate
    with torch.no_grad():
        model[0].weight.mul_(3e7)
    x = torch.randn(3, 16)
    gm = qcd_fx.transform(model, "qci,csc", (x,)).graph_module
    with torch.no_grad():
        logits = model(x)
        assert logits.abs().max() > 1e7 and torch.equal(gm(x).argmax(-1), logits.argmax(-1))
    report = assert_onnx_parity(gm, (x,), str(tmp_path / "saturated.onnx"))
    assert report.op_types.get("Add", 0) >= 2  # the gate's and the mask's epsilon are still there


class TwoInOut(nn.Module):
    """Two inputs, a dict output holding a tensor and a tuple."""

    def __init__(self):
        super().__init__()
        self.image = nn.Conv2d(3, 16, 3, padding=1)
        self.side = nn.Linear(5, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, image, extra):
        feats = self.image(image).mean((2, 3)) + self.side(extra)
        logits = self.head(torch.relu(feats))
        return {"logits": logits, "aux": (feats, logits.softmax(-1))}


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 24)

    def forward(self, x):
        y = self.fc(x)
        return y, y.tanh()


def test_multiple_inputs_and_dict_outputs_get_readable_names(tmp_path):
    torch.manual_seed(0)
    inputs = (torch.randn(2, 3, 8, 8), torch.randn(2, 5))
    gm = qcd_fx.transform(TwoInOut().eval(), "qci{min_width=8},csc", inputs).graph_module
    report = assert_onnx_parity(gm, inputs, str(tmp_path / "two.onnx"))
    assert report.input_names == ["image", "extra"]
    assert report.output_names == ["logits", "aux_0", "aux_1"]
    assert report.input_shapes == [["batch", 3, 8, 8], ["batch", 5]]


def test_tuple_outputs_and_static_batch(tmp_path):
    gm = qcd_fx.trace(Pair())
    gm.train()  # exported in eval mode; the module's own mode and code are left as they were
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    x = torch.randn(3, 12)
    report = assert_onnx_parity(gm, (x,), str(tmp_path / "pair.onnx"))
    assert report.output_names == ["output_0", "output_1"]
    gm.train()
    static = export_onnx(gm, (x,), str(tmp_path / "static.onnx"), dynamic_batch=False)
    assert static.input_shapes == [[3, 12]] and not static.dynamic_batch and [p.inputs for p in static.parity] == ["example"]
    assert gm.training and gm.code == code and all(torch.equal(state[k], v) for k, v in gm.state_dict().items())


class PerRow(nn.Module):
    """Adds a (2, 4) buffer: the batch axis can only be 2."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.register_buffer("rows", torch.randn(2, 4))

    def forward(self, x):
        return self.fc(x) + self.rows


def test_batch_axis_that_cannot_be_dynamic(tmp_path):
    gm = qcd_fx.trace(PerRow().eval())
    with pytest.raises(ExportError, match="batch axis of PerRow static; export with a static batch"):
        export_onnx(gm, (torch.randn(2, 16),), str(tmp_path / "rows.onnx"))
    assert leftovers(tmp_path) == [] and not (tmp_path / "rows.onnx").exists()
    report = export_onnx(gm, (torch.randn(2, 16),), str(tmp_path / "rows.onnx"), dynamic_batch=False)
    assert report.ok and report.input_shapes == [[2, 16]]


# ---------------------------------------------------------------------------------------------
# Failures: one line, no file


class Bessel(nn.Module):
    """``torch.special.bessel_j0`` has no ONNX implementation in either exporter."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return torch.special.bessel_j0(self.fc(x)) + 1


class Erfinv(nn.Module):
    def forward(self, x):
        return torch.erfinv(x.tanh())


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.inner = Erfinv()

    def forward(self, x):
        return self.inner(self.fc(x))


def test_unsupported_operator_names_operator_and_node(tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError) as info:
        export_onnx(qcd_fx.trace(Bessel().eval()), (torch.randn(2, 16),), str(path))
    message = str(info.value)
    assert "\n" not in message
    assert "bessel_j0" in message and "graph node 'special_bessel_j0'" in message and "TorchScript exporter fails too" in message
    assert not path.exists() and leftovers(tmp_path) == []
    # an operator inside a leaf module: the node is the module call; the decomposed operator is traced back
    with pytest.raises(ExportError) as info:
        export_onnx(qcd_fx.trace(Wrapped().eval(), leaf_modules=["inner"]), (torch.randn(2, 16),), str(path))
    message = str(info.value)
    assert "prims.erf_inv" in message and "decomposed from aten.erfinv" in message and "graph node 'inner' (Erfinv)" in message
    assert not path.exists() and leftovers(tmp_path) == []


class Pairwise(nn.Module):
    """``torch.cdist``: the dynamo exporter has no ONNX function for it, the TorchScript one does."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return torch.cdist(self.proj(x), x)


def test_torchscript_fallback_is_recorded(tmp_path):
    gm = qcd_fx.trace(Pairwise().eval())
    x = torch.randn(2, 5, 8)
    report = assert_onnx_parity(gm, (x,), str(tmp_path / "cdist.onnx"))
    assert report.exporter == "torchscript" and "_cdist_forward" in report.fallback_reason and "'cdist'" in report.fallback_reason
    with pytest.raises(ExportError, match="_cdist_forward.*graph node 'cdist'"):
        export_onnx(gm, (x,), str(tmp_path / "nofallback.onnx"), fallback=False)
    assert not (tmp_path / "nofallback.onnx").exists() and leftovers(tmp_path) == []


def test_parity_failure_leaves_no_file(tmp_path):
    torch.manual_seed(0)
    gm = qcd_fx.transform(digits_cnn().eval(), "qci,csc", (torch.randn(1, 1, 8, 8),)).graph_module
    path = tmp_path / "strict.onnx"
    # onnxruntime rounds differently from PyTorch (~1e-7 here): zero tolerance, without the
    # float64 judgement, is a real failure
    with pytest.raises(ExportError, match="differs from PyTorch by .* the file was not written"):
        export_onnx(gm, (torch.randn(2, 1, 8, 8),), str(path), atol=0.0, rtol=0.0, float64_factor=0)
    assert not path.exists() and leftovers(tmp_path) == []


class Noisy(nn.Module):
    """Adds Gaussian noise in its forward (as VITS does before its flow)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x):
        h = self.fc(x)
        return h + 0.1 * torch.randn_like(h)


def test_a_model_that_draws_random_numbers_is_not_called_checked(tmp_path):
    """onnxruntime's random draws are not PyTorch's: no parity check can pass honestly (the
    float64 judgement would compare two different draws), so the export says so instead of
    writing a file it calls checked; unchecked, the file is written and runs."""
    gm = qcd_fx.transform(Noisy().eval(), "qci", (torch.randn(2, 8),), capture="export").graph_module
    path = tmp_path / "noisy.onnx"
    with pytest.raises(ExportError, match=r"draws random numbers \(RandomNormalLike at node '.*'\).*check=False \(--no-check\).*the file was not written"):
        export_onnx(gm, (torch.randn(2, 8),), str(path))
    assert not path.exists() and leftovers(tmp_path) == []
    report = export_onnx(gm, (torch.randn(2, 8),), str(path), check=False)
    assert path.exists() and not report.checked
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: np.ones((3, 8), np.float32)})
    assert out.shape == (3, 16)


def test_large_weights_go_to_a_data_file_atomically(tmp_path, monkeypatch):
    from qcd_fx.export import core

    monkeypatch.setattr(core, "_PROTO_LIMIT", 10_000)  # the real limit is ~1.8 GB; digits_cnn has ~300 kB of weights
    torch.manual_seed(0)
    gm = qcd_fx.trace(digits_cnn().eval())
    x = torch.randn(2, 1, 8, 8)
    report = assert_onnx_parity(gm, (x,), str(tmp_path / "big.onnx"))
    assert report.external_data and (tmp_path / "big.onnx.data").exists()
    assert report.file_bytes == os.path.getsize(tmp_path / "big.onnx") + os.path.getsize(tmp_path / "big.onnx.data")
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_onnx(gm, (x,), str(tmp_path / "strict.onnx"), atol=0.0, rtol=0.0, float64_factor=0)
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]


def test_serialize_once_gives_the_bytes_of_the_full_proto():
    """export_onnx serializes once, splicing the weights' bytes in at the protobuf wire level:
    the file must be byte for byte what ``model_proto.SerializeToString()`` gives, and the
    model is left unchanged; the hollow copy has every initializer, the large ones empty."""
    from qcd_fx.export.write import serialize_model

    torch.manual_seed(0)
    gm = qcd_fx.transform(digits_cnn().eval(), "qci,csc", (torch.randn(1, 1, 8, 8),)).graph_module
    program = torch.onnx.export(gm, (torch.randn(2, 1, 8, 8),), dynamo=True, optimize=False, verbose=False)
    program.optimize()  # constant folding leaves numpy-backed tensors beside torch-backed ones
    expected = program.model_proto.SerializeToString()
    for limit in (0, 1024, 10**12):
        data, hollow, large = serialize_model(program.model, limit)
        assert data == expected
        assert (len(large) > 0) == (limit < 10**12) and (len(hollow) < len(data)) == bool(large)
        proto = onnx.load_model_from_string(hollow)
        full = onnx.load_model_from_string(data)
        assert [i.name for i in proto.graph.initializer] == [i.name for i in full.graph.initializer]
        assert all(not i.raw_data for i in proto.graph.initializer if i.name in large)
    assert program.model_proto.SerializeToString() == expected


def test_the_check_session_reads_the_files_weight_bytes_in_place():
    """The checks' onnxruntime session takes the large weights as views into the file's bytes
    (no parse, no copy): its outputs are those of a session on the whole file, bit for bit;
    the views share the file's memory; a byte changed in one weight of the file changes them."""
    import numpy as np
    import onnxruntime

    from qcd_fx.export import onnxruntime_session
    from qcd_fx.export.verify import in_memory_weights
    from qcd_fx.export.write import serialize_model

    torch.manual_seed(0)
    gm = qcd_fx.transform(digits_cnn().eval(), "qci,csc", (torch.randn(1, 1, 8, 8),)).graph_module
    program = torch.onnx.export(gm, (torch.randn(2, 1, 8, 8),), dynamo=True, verbose=False)
    data, hollow, large = serialize_model(program.model, 1024)
    data = bytearray(data)  # changed below, in place
    weights = in_memory_weights(onnx.load_model_from_string(hollow), data, large)
    assert weights is not None and set(weights.arrays) == set(large) and len(large) > 3
    assert all(np.shares_memory(a, np.frombuffer(data, np.uint8)) for a in weights.arrays.values())
    assert len(weights.graph) < len(hollow) + 64 * len(large)  # the graph and a location per weight, not its bytes
    x = {"x": np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32)}
    session = onnxruntime_session(weights)
    feed = {session.get_inputs()[0].name: x["x"]}
    whole = onnxruntime.InferenceSession(bytes(data), providers=["CPUExecutionProvider"]).run(None, feed)
    in_place = session.run(None, feed)
    assert all(np.array_equal(a, b) for a, b in zip(whole, in_place))
    name, array = max(weights.arrays.items(), key=lambda kv: kv[1].nbytes)
    offset = array.ctypes.data - np.frombuffer(data, np.uint8).ctypes.data
    data[offset : offset + array.nbytes] = bytes(array.nbytes)  # that weight zeroed in the file's bytes
    changed = onnxruntime_session(in_memory_weights(onnx.load_model_from_string(hollow), data, large)).run(None, feed)
    assert not all(np.array_equal(a, b) for a, b in zip(whole, changed))
    assert all(np.array_equal(a, b) for a, b in zip(onnxruntime.InferenceSession(bytes(data), providers=["CPUExecutionProvider"]).run(None, feed), changed))


def test_the_serialized_pieces_read_as_the_files_bytes_and_hold_the_weights_in_place():
    """serialized_pieces: the pieces joined are the file's bytes; read in place (index, slice,
    the framing's spans) they give the same values as the joined bytes; a contiguous weight's
    piece is a view of the tensor's own memory (no copy); the check session built on the pieces
    computes what a session on the joined bytes does, bit for bit."""
    from qcd_fx.export import onnxruntime_session
    from qcd_fx.export.verify import in_memory_weights
    from qcd_fx.export.write import initializer_spans, serialize_model, serialized_pieces

    torch.manual_seed(0)
    gm = qcd_fx.transform(digits_cnn().eval(), "qci,csc", (torch.randn(1, 1, 8, 8),)).graph_module
    program = torch.onnx.export(gm, (torch.randn(2, 1, 8, 8),), dynamo=True, verbose=False)
    pieces, hollow, large = serialized_pieces(program.model, 1024)
    data = pieces.join()
    assert (data, hollow, large) == serialize_model(program.model, 1024) and len(pieces) == len(data) and len(large) > 3
    rng = np.random.default_rng(0)
    for a in rng.integers(0, len(data), 200):
        b = int(a + rng.integers(0, 5000))
        assert pieces[int(a)] == data[int(a)] and pieces[int(a) : b] == data[int(a) : b]
    assert initializer_spans(pieces, large) == initializer_spans(data, large)
    tensors = {v.name: v.const_value for v in program.model.graph.initializers.values() if v.name in large}
    shared = [n for n, t in tensors.items() if isinstance(t.raw, torch.Tensor) and t.raw.is_contiguous()]
    weights = in_memory_weights(onnx.load_model_from_string(hollow), pieces, large)
    assert shared and all(np.shares_memory(weights.arrays[n], tensors[n].raw.detach().numpy()) for n in shared)
    feed = {"x": np.random.default_rng(1).standard_normal((2, 1, 8, 8), dtype=np.float32)}
    whole = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    feed = {whole.get_inputs()[0].name: feed["x"]}
    assert all(np.array_equal(a, b) for a, b in zip(whole.run(None, feed), onnxruntime_session(weights).run(None, feed)))
    with pytest.raises(IndexError):
        pieces[len(data)]


def test_the_check_runs_are_shared_and_come_back_in_order():
    """_OnnxChecks runs its batches largest first, on its thread and the caller's: each output
    still belongs to its own batch, and a batch onnxruntime rejects gives its exception in place."""
    from qcd_fx.export.core import _OnnxChecks

    gm = digits_cnn().eval()
    path_bytes = torch.onnx.export(
        gm, (torch.randn(2, 1, 8, 8),), dynamo=True, verbose=False, dynamic_shapes=({0: torch.export.Dim("batch")},)
    ).model_proto.SerializeToString()
    batches = [(torch.randn(b, 1, 8, 8),) for b in (1, 5, 2, 7, 3)] + [(torch.randn(2, 1, 9, 9),)]
    timings: dict[str, float] = {}
    checks = _OnnxChecks(path_bytes, path_bytes, batches, timings)
    outputs = checks.outputs(gm, None)
    with torch.no_grad():
        for (x,), got in list(zip(batches, outputs))[:-1]:
            assert torch.allclose(torch.from_numpy(got[0]), gm(x), atol=1e-5)
    assert isinstance(outputs[-1], Exception)  # a wrong spatial size: onnxruntime's own error, in its place
    assert {"checker", "session", "onnxruntime", "checks_wait"} <= set(timings)
    assert not checks.thread.is_alive() and checks.session is None


def test_a_file_that_runs_on_the_example_batch_only_is_not_written(tmp_path, monkeypatch):
    """A file whose batch size was fixed inside the graph (TorchScript's fallback traces sizes
    read from shapes as constants) runs on the example but not on the second batch: the error
    says so and what to do; onnxruntime's failure on that batch is injected."""
    import onnxruntime

    gm = qcd_fx.trace(digits_cnn().eval())
    path = tmp_path / "m.onnx"
    run = onnxruntime.InferenceSession.run

    def example_batch_only(self, names, feed, *args, **kwargs):
        if any(v.shape[0] != 2 for v in feed.values()):
            raise RuntimeError("Attempting to broadcast an axis by a dimension other than 1. 256 by 384")
        return run(self, names, feed, *args, **kwargs)

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", example_batch_only)
    with pytest.raises(ExportError, match=r"runs the exported \w+ on the example's batch but fails on batch 3: .*256 by 384.*--static-batch"):
        export_onnx(gm, (torch.randn(2, 1, 8, 8),), str(path))
    assert leftovers(tmp_path) == [] and not path.exists()
    assert export_onnx(gm, (torch.randn(2, 1, 8, 8),), str(path), dynamic_batch=False).ok


def test_background_check_failures_are_reported_in_order(tmp_path, monkeypatch):
    """onnx.checker, the onnxruntime session and its runs happen in a thread while PyTorch
    computes the references: a failure of each still raises its own one-line error, a rejected
    file is reported before a PyTorch failure, and nothing is left behind (file or thread)."""
    import threading

    import onnxruntime

    from qcd_fx.export import core

    torch.manual_seed(0)
    gm = qcd_fx.trace(digits_cnn().eval())
    x = torch.randn(2, 1, 8, 8)
    path = tmp_path / "m.onnx"

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    with monkeypatch.context() as m:
        m.setattr(onnx.checker, "check_model", boom)
        with pytest.raises(ExportError, match=r"onnx.checker rejects the exported \w+: injected failure"):
            export_onnx(gm, (x,), str(path))
    with monkeypatch.context() as m:
        m.setattr(core, "onnxruntime_session", boom)
        with pytest.raises(ExportError, match=r"onnxruntime cannot load the exported \w+: injected failure"):
            export_onnx(gm, (x,), str(path))
    with monkeypatch.context() as m:
        m.setattr(onnxruntime.InferenceSession, "run", boom)
        with pytest.raises(ExportError, match=r"onnxruntime fails to run the exported \w+: injected failure"):
            export_onnx(gm, (x,), str(path))
    armed = []  # set once the checks make their second batch: PyTorch fails from then on

    class FailsInTheChecks(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = gm

        def forward(self, t):
            if armed:
                raise RuntimeError("torch fails")
            return self.inner(t)

    second_batch = core._second_batch
    with monkeypatch.context() as m:
        m.setattr(core, "_second_batch", lambda *a, **k: (armed.append(1), second_batch(*a, **k))[1])
        with pytest.raises(RuntimeError, match="torch fails"):  # a PyTorch failure on the second batch propagates
            export_onnx(FailsInTheChecks().eval(), (x,), str(path))
        armed.clear()
        m.setattr(onnx.checker, "check_model", boom)
        with pytest.raises(ExportError, match="onnx.checker rejects"):  # but a rejected file is reported first
            export_onnx(FailsInTheChecks().eval(), (x,), str(path))
    assert armed
    assert not path.exists() and leftovers(tmp_path) == []
    assert not any(t.name == "qcd_fx-onnx-checks" for t in threading.enumerate())
    report = export_onnx(gm, (x,), str(path))  # and it works again
    assert report.ok and [p.inputs for p in report.parity] == ["example", "batch 3"]  # torch.export keeps no value: no sign/scale variants
    assert {"checker", "session", "onnxruntime", "checks_wait"} <= set(report.timings)


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "onnx_user_models.py").write_text(  # not user_models: test_cli imports a module of that name
        "import torch\n"
        "from torch import nn\n"
        "class Bessel(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(16, 16)\n"
        "    def forward(self, x):\n"
        "        return torch.special.bessel_j0(self.fc(x))\n"
        "def bessel():\n"
        "    return Bessel()\n"
    )
    return tmp_path


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    """A saved qci,csc digits GraphModule (remembers its input shape) and its ONNX export."""
    directory = tmp_path_factory.mktemp("digits")
    torch.manual_seed(0)
    result = qcd_fx.transform(digits_cnn().eval(), "qci,csc", (torch.randn(1, 1, 8, 8),))
    qcd_fx.save(result.graph_module, str(directory / "digits.pt"), input_shapes=[[1, 1, 8, 8]])
    export_onnx(result.graph_module, (torch.randn(1, 1, 8, 8),), str(directory / "digits.onnx"))
    return directory / "digits.pt", directory / "digits.onnx"


def test_cli_export(workdir, digits_files):
    gm_file, _ = digits_files
    res = run("export", str(gm_file), "digits.onnx", "--report", "export.json")  # the input shape comes from the file
    assert res.exit_code == 0, res.stderr
    assert "ONNX model written to digits.onnx: dynamo exporter" in res.stdout and "onnx.checker ok" in res.stdout
    report = json.loads((workdir / "export.json").read_text())
    assert report["ok"] and report["input_shapes"] == [["batch", 1, 8, 8]] and len(report["parity"]) == 2
    assert report["input_names"] == ["x"] and report["domains"] == [""]


def test_cli_run(digits_files):
    gm_file, onnx_file = map(str, digits_files)
    res = run("run", onnx_file, "--model", gm_file, "--repeats", "5")
    assert res.exit_code == 0, res.stderr
    assert "onnxruntime (CPU)" in res.stdout and "PyTorch eager" in res.stdout and "onnxruntime/eager" in res.stdout
    assert "outputs match" in res.stdout and "1 thread" in res.stdout
    res = run("run", onnx_file, "-s", "3,1,8,8", "--repeats", "3", "--threads", "2")  # another batch size; no PyTorch model
    assert res.exit_code == 0 and "inputs 3x1x8x8" in res.stdout and "2 threads" in res.stdout and "PyTorch" not in res.stdout, res.stderr


def test_cli_export_options(workdir):
    res = run("export", "--example", "ex.onnx", "--static-batch", "--no-check", "--opset", "18")
    assert res.exit_code == 0, res.stderr
    model = onnx.load("ex.onnx")
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_cli_unsupported_operator_one_line_no_file(workdir):
    res = run("export", "onnx_user_models:bessel", "out.onnx", "-s", "2,16")
    one_line_error(res, 1, "no ONNX implementation of operator", "bessel_j0", "graph node 'special_bessel_j0'")
    assert not (workdir / "out.onnx").exists() and leftovers(workdir) == []


def test_cli_export_bad_inputs(workdir):
    (workdir / "keep.onnx").write_text("precious")
    one_line_error(run("export", "--example", "keep.onnx"), 2, "exists; pass --force")
    assert (workdir / "keep.onnx").read_text() == "precious"
    one_line_error(run("export", "--example", "out.pt"), 2, "must end in .onnx")
    one_line_error(run("export", "--example", "missing/out.onnx"), 2, "does not exist; create it first")
    one_line_error(run("export", "--example"), 2, "missing OUT.onnx")
    one_line_error(run("export", "nope.pt", "o.onnx", "-s", "1,1,8,8"), 1, "'nope.pt' does not exist")
    one_line_error(run("export", "--example", "o.onnx", "-s", "1,3,8,8"), 1, "fails on the example inputs")
    one_line_error(run("export", "--example", "o.onnx", "--opset", "99"), 2, "opset 99")
    assert sorted(os.listdir(workdir)) == ["keep.onnx", "onnx_user_models.py"]
    assert run("export", "--example", "keep.onnx", "--force", "--no-check").exit_code == 0
    assert onnx.load("keep.onnx").graph.node


def test_cli_run_bad_inputs(workdir, digits_files):
    gm_file, onnx_file = map(str, digits_files)
    one_line_error(run("run", "absent.onnx"), 1, "'absent.onnx' does not exist")
    (workdir / "junk.onnx").write_bytes(b"\x00\x01 not onnx")
    one_line_error(run("run", "junk.onnx"), 1, "onnxruntime cannot load 'junk.onnx'")
    one_line_error(run("run", onnx_file, "-s", "1,3,8,8"), 1, "input 'x'", "has shape batchx1x8x8")
    one_line_error(run("run", onnx_file, "-s", "1,1,8,8", "-s", "1,1,8,8"), 2, "takes 1 input(s) (x); got 2")
    one_line_error(run("run", onnx_file, "--model", "onnx_user_models:bessel"), 1, "fails on the inputs")
    one_line_error(run("run", onnx_file, "--repeats", "0"), 2, "--repeats")
    one_line_error(run("run"), 2, "missing ONNX file")


def test_export_after_transform_dry_run_writes_nothing(workdir):
    from io import StringIO

    from rich.console import Console

    from qcd_fx.cli.export import check_onnx_output, export_after_transform

    torch.manual_seed(0)
    x = torch.randn(1, 1, 8, 8)
    gm = qcd_fx.transform(digits_cnn().eval(), "qci,csc", (x,)).graph_module
    buf = StringIO()
    report = export_after_transform(gm, (x,), "t.onnx", dry_run=True, console=Console(file=buf))
    assert report.ok and report.path is None and "dry run" in buf.getvalue()
    assert not (workdir / "t.onnx").exists() and leftovers(workdir) == []
    check_onnx_output("t.onnx", [], force=False)
    export_after_transform(gm, (x,), "t.onnx", console=Console(file=buf))
    assert (workdir / "t.onnx").exists() and "ONNX model written to t.onnx" in buf.getvalue()
    with pytest.raises(qcd_fx.errors.UsageError, match="exists"):
        check_onnx_output("t.onnx", [], force=False)


# ---------------------------------------------------------------------------------------------
# The whole zoo (pytest -m zoo): records results in the test's output directory


ZOO_RESULTS = os.environ.get("QCD_FX_ZOO_ONNX_RESULTS")  # append one JSON line per model here, if set
EXPORT_MEMORY_FACTOR = 20  # peak bytes per parameter: fp32 weights in torch, the serialized model, onnxruntime's copy and prepacking


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


@pytest.mark.zoo
@pytest.mark.parametrize("name", zoo.classification_models())
def test_zoo_exports_after_qci_csc(name, tmp_path, record_property):
    model, shape = zoo.build(name, small=True)
    x = torch.randn(shape)
    gm = qcd_fx.transform(model, "qci,csc", (x,)).graph_module
    del model
    params = sum(p.numel() for p in gm.parameters())
    row = {"model": name, "input": list(shape), "params": params}
    need, available = EXPORT_MEMORY_FACTOR * params, _available_memory()
    try:
        if available is not None and need > available:
            row.update(ok=None, skipped=f"needs ~{need / 1e9:.0f} GB, {available / 1e9:.0f} GB available")
            pytest.skip(f"{name} with full-rank gates ({params / 1e6:.0f} M parameters) {row['skipped']}")
        try:
            report = assert_onnx_parity(gm, (x,), str(tmp_path / f"{name}.onnx"))
        except BaseException as e:
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            raise
        row.update(
            ok=True,
            exporter=report.exporter,
            nodes=report.nodes,
            mb=report.file_bytes / 1e6,
            external_data=report.external_data,
            export_s=report.export_seconds,
            total_s=report.total_seconds,
            max_abs=report.max_abs,
            max_rel=report.max_rel,
            batches=[p.batch for p in report.parity],
        )
    finally:
        record_property("onnx", row)
        if ZOO_RESULTS:
            with open(ZOO_RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")


class WindowAttention5d(nn.Module):
    """Attention with windows as an extra batch axis, (B, windows, heads, N, d) -- timm's Hiera,
    NesT, Twins, SAM's ViT: torch's ONNX library takes 4-D attention only; the export merges the
    leading axes around it and keeps the batch axis dynamic."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):  # (B, 4 windows, 6 tokens, 8)
        b, w, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, w, n, 3, 2, 4).permute(3, 0, 1, 4, 2, 5).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, w, n, c)
        return self.proj(y)


class MergedHeadsAttention(nn.Module):
    """SAM's ViT: batch and heads merged, (B * heads, N, d), with a float position-bias mask."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
        self.bias = nn.Parameter(torch.randn(6, 6))

    def forward(self, x):  # (B, 6 tokens, 8)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).reshape(3, b * 2, n, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias.expand(b * 2, n, n))
        return self.proj(y.reshape(b, 2, n, 4).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("model, shape", [(WindowAttention5d, (2, 4, 6, 8)), (MergedHeadsAttention, (2, 6, 8))], ids=["5d", "3d-mask"])
def test_attention_of_other_ranks_exports_with_a_dynamic_batch(tmp_path, model, shape):
    torch.manual_seed(0)
    gm = qcd_fx.trace(model().eval())
    report = export_onnx(gm, (torch.randn(*shape),), str(tmp_path / "w.onnx"))
    assert report.ok and report.exporter == "dynamo" and report.dynamic_batch, report
    assert [p.inputs for p in report.parity][:2] == ["example", "batch 3"]
