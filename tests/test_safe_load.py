"""Adversarial tests of the safe GraphModule format: malicious files are refused with one line and
never run code, whether they load directly, through ``save``, or through the CLI.

Each hand-written file is loaded in a fresh process (forked from a server that has torch
imported) that loads it, runs the model forward and backward if it loaded, and reports whether
the attack's sentinel file appeared.
"""

import multiprocessing
import operator
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from load_child import load_and_run
from torch import nn
from torch.fx import Graph, GraphModule

import qcd_fx
from qcd_fx import io, safe_graph
from qcd_fx.errors import ModelLoadError, UnsafeLoadError, UsageError

SHAPE = (2, 4)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x):
        b = x.shape[0]
        y = torch.relu(self.lin(x)).view(b, -1)
        return self.seq(y).sum(dim=1, keepdim=True) + x.mean()


def net_payload() -> dict:
    return safe_graph._encode(qcd_fx.trace(Net()))


def graph_payload(build) -> dict:
    """The payload of a hand-built graph over ``Net``'s modules, written without any checks."""
    g = Graph()
    x = g.placeholder("x")
    g.output(build(g, x))
    return safe_graph._encode(GraphModule(Net(), g))


def node(payload, op, name=None):
    return next(n for n in payload["nodes"] if n["op"] == op and (name is None or n["name"] == name))


def fn(name):
    return {"$fn": name}


def _exec_chain(sentinel):
    """The issue's exploit: from a tensor to ``exec`` through getattr and getitem."""

    def build(g, x):
        cls = g.call_function(getattr, (x, "__class__"))
        red = g.call_function(getattr, (cls, "__reduce_ex__"))
        glb = g.call_function(getattr, (red, "__globals__"))
        bi = g.call_function(operator.getitem, (glb, "__builtins__"))
        ex = g.call_function(operator.getitem, (bi, "exec"))
        g.call_function(operator.call, (ex, f"open({sentinel!r}, 'w').write('x')"))
        return g.call_function(operator.add, (x, 1))

    return graph_payload(build)


def _attrgetter_chain(sentinel):
    def build(g, x):
        get = g.call_function(operator.attrgetter, ("__class__.__reduce_ex__.__globals__",))
        glb = g.call_function(operator.call, (get, x))
        bi = g.call_function(operator.getitem, (glb, "__builtins__"))
        ex = g.call_function(operator.getitem, (bi, "exec"))
        g.call_function(operator.call, (ex, f"open({sentinel!r}, 'w').write('x')"))
        return x

    return graph_payload(build)


def _methodcaller_chain(sentinel):
    def build(g, x):
        get = g.call_function(operator.methodcaller, ("__getattribute__", "__class__"))
        cls = g.call_function(operator.call, (get, x))
        return g.call_function(operator.add, (x, g.call_function(len, (g.call_function(str, (cls,)),))))

    return graph_payload(build)


def _computed_getattr_name(sentinel):
    def build(g, x):
        name = g.call_function(operator.add, ("__cla", "ss__"))
        return g.call_function(getattr, (x, name))

    return graph_payload(build)


def _method_dunder(sentinel):
    return graph_payload(lambda g, x: g.call_method("__reduce_ex__", (x, 2)))


def _method_with_callable(method):
    def case(sentinel):
        p = graph_payload(lambda g, x: g.call_method(method, (x, "FN")))
        node(p, "call_method")["args"]["$tuple"][1] = fn("torch.relu")  # fx cannot print a function argument
        return p

    return case


def _tampered(change):
    """A case: ``Net``'s valid payload with ``change(payload, sentinel)`` applied (a decorator too)."""

    def case(sentinel):
        p = net_payload()
        change(p, sentinel)
        return p

    return case


@_tampered
def _method_code_injection(p, sentinel):
    node(p, "call_method")["target"] = f"view(2, -1); open({sentinel!r}, 'w').write('x'); x.view"


@_tampered
def _fn_value_argument(p, sentinel):
    node(p, "call_method")["args"]["$tuple"].append(fn("_operator.call"))


def _function(name):
    return _tampered(lambda p, s: node(p, "call_function").update(target=fn(name)))


def _module_attr(key, value):
    return _tampered(lambda p, s: p["modules"][1]["attrs"].update({key: value}))


def _module_class(qualname):
    return _tampered(lambda p, s: p["modules"][1].update({"class": qualname}))


@_tampered
def _placeholder_injection(p, sentinel):
    node(p, "placeholder")["target"] = f"x, _=open({sentinel!r}, 'w').write('x')"


@_tampered
def _module_path_injection(p, sentinel):
    assert "." not in sentinel
    evil = f'lin"),print(1,file=open("{sentinel}","w")),getattr(self,"lin'
    p["modules"][1]["name"] = evil
    node(p, "call_module")["target"] = evil


@_tampered
def _kwarg_injection(p, sentinel):
    sum_node = next(n for n in p["nodes"] if n["target"] == "sum")
    sum_node["kwargs"] = {"$dict": [[f"dim=print(1,file=open({sentinel!r},'w')) or 1, keepdim", True]]}


@_tampered
def _node_name_injection(p, sentinel):
    node(p, "call_function")["name"] = f"y = open({sentinel!r}, 'w'); z"


@_tampered
def _class_name_injection(p, sentinel):
    p["class_name"] = f"G(); open({sentinel!r}, 'w')"


def _get_attr_module(sentinel):
    def build(g, x):
        lin = g.get_attr("lin")
        return g.call_method("forward", (lin, x))

    return graph_payload(build)


def _from_file(sentinel):
    def build(g, x):
        f = g.call_function(torch.from_file, (sentinel,), {"shared": True, "size": 4})
        return g.call_method("add_", (f, 1.0))

    return graph_payload(build)


def _aten_from_file(sentinel):
    p = _from_file(sentinel)
    node(p, "call_function")["target"] = fn("torch.ops.aten.from_file.default")
    return p


@_tampered
def _deep_nesting(p, sentinel):
    deep = 0
    for _ in range(200):
        deep = [deep]
    node(p, "call_method")["args"]["$tuple"].append(deep)


@_tampered
def _huge_name(p, sentinel):
    node(p, "call_function")["name"] = "n" * 1_000_000


def _set(key, value):
    return _tampered(lambda p, s: p.update({key: value}))


def _nodes(change):
    return _tampered(lambda p, s: change(p["nodes"]))


# (case, error class, fragment of the one-line message)
REFUSED = {
    "issue exec chain": (_exec_chain, UnsafeLoadError, "reads attribute '__class__'"),
    "attrgetter": (_attrgetter_chain, UnsafeLoadError, "'operator.attrgetter', which is not"),
    "methodcaller": (_methodcaller_chain, UnsafeLoadError, "'operator.methodcaller', which is not"),
    "getattr computed name": (_computed_getattr_name, UnsafeLoadError, "reads attribute 'a computed name'"),
    "getattr dunder": (lambda s: graph_payload(lambda g, x: g.call_function(getattr, (x, "__dict__"))), UnsafeLoadError, "'__dict__'"),
    "getattr grad_fn": (lambda s: graph_payload(lambda g, x: g.call_function(getattr, (x, "grad_fn"))), UnsafeLoadError, "'grad_fn'"),
    "method dunder": (_method_dunder, UnsafeLoadError, "method '__reduce_ex__', which is not"),
    "method register_hook": (_method_with_callable("register_hook"), UnsafeLoadError, "method 'register_hook'"),
    "method apply_": (_method_with_callable("apply_"), UnsafeLoadError, "method 'apply_'"),
    "method map_": (_method_with_callable("map_"), UnsafeLoadError, "method 'map_'"),
    "method untyped_storage": (lambda s: graph_payload(lambda g, x: g.call_method("untyped_storage", (x,))), UnsafeLoadError, "untyped_storage"),
    "method code injection": (_method_code_injection, UnsafeLoadError, "is not an allowed torch.Tensor method"),
    "fn value operator.call": (_fn_value_argument, UnsafeLoadError, "holds function '_operator.call'"),
    "builtin exec": (_function("exec"), UnsafeLoadError, "calls 'exec', which is not"),
    "builtin __import__": (_function("__import__"), UnsafeLoadError, "'__import__'"),
    "os.system": (_function("os.system"), UnsafeLoadError, "'os.system'"),
    "through qcd_fx's imports": (_function("qcd_fx.io.os.system"), UnsafeLoadError, "'qcd_fx.io.os.system'"),
    "through torch.nn.functional's imports": (_function("torch.nn.functional.torch.load"), UnsafeLoadError, "torch.load"),
    "torchvision file writer": (_function("torchvision.utils.save_image"), UnsafeLoadError, "save_image"),
    "torch.save": (_function("torch.save"), UnsafeLoadError, "'torch.save'"),
    "torch.from_file": (_from_file, UnsafeLoadError, "'torch.from_file'"),
    "aten.from_file": (_aten_from_file, UnsafeLoadError, "not an ATen operator the format allows"),
    "aten namespace dunder": (_function("torch.ops.aten.__class__.__init__"), UnsafeLoadError, "torch.ops.aten.__class__"),
    "hook dict attribute": (_module_attr("_forward_hooks", {"$dict": [[0, fn("torch.relu")]]}), UnsafeLoadError, "'_forward_hooks' is nn.Module's own"),
    "callable attribute": (_module_attr("forward", fn("qcd_fx.io.os.system")), UnsafeLoadError, "'qcd_fx.io.os.system'"),
    "dunder attribute": (_module_attr("__class__", "x"), UnsafeLoadError, "'__class__' is not a plain identifier"),
    "class subprocess.Popen": (_module_class("subprocess.Popen"), UnsafeLoadError, "outside the allowed packages"),
    "class GraphModule": (_module_class("torch.fx.graph_module.GraphModule"), UnsafeLoadError, "not one of torch.nn's layers"),
    "class DataParallel": (_module_class("torch.nn.parallel.data_parallel.DataParallel"), UnsafeLoadError, "not one of torch.nn's layers"),
    "class via __main__": (_module_class("qcd_fx.__main__.app"), UnsafeLoadError, "not a dotted name of identifiers"),
    "class not a module": (_module_class("qcd_fx.io.UsageError"), UnsafeLoadError, "not an nn.Module layer class"),
    "placeholder injection": (_placeholder_injection, UnsafeLoadError, "is not a plain identifier"),
    "module path injection": (_module_path_injection, UnsafeLoadError, "its path"),
    "keyword injection": (_kwarg_injection, UnsafeLoadError, "keyword"),
    "node name injection": (_node_name_injection, UnsafeLoadError, "its name"),
    "class name injection": (_class_name_injection, UnsafeLoadError, "the class name"),
    "get_attr of a module": (_get_attr_module, UnsafeLoadError, "not a parameter, buffer or plain attribute"),
    "deep nesting": (_deep_nesting, ModelLoadError, "nests values more than"),
    "huge name": (_huge_name, UnsafeLoadError, "not a plain identifier"),
    "node before definition": (_nodes(lambda ns: ns.reverse()), ModelLoadError, "malformed"),
    "duplicate node": (_nodes(lambda ns: ns.insert(1, dict(ns[1]))), ModelLoadError, "defined twice"),
    "no output": (_nodes(lambda ns: ns.pop()), ModelLoadError, "no output node"),
    "output not last": (_nodes(lambda ns: ns.insert(len(ns) - 1, dict(ns[-1], name="out2"))), ModelLoadError, "must be last"),
    "unknown node kind": (_nodes(lambda ns: ns[1].update(op="call_python")), ModelLoadError, "unknown kind"),
    "unknown tag": (_nodes(lambda ns: ns[2].update(args={"$pickle": "x"})), ModelLoadError, "unknown value tag"),
    "missing tensor": (_tampered(lambda p, s: p["tensors"].clear()), ModelLoadError, "tensor the file does not hold"),
    "unhashable set": (_nodes(lambda ns: ns[2]["args"]["$tuple"].append({"$set": [[1]]})), ModelLoadError, "TypeError"),
    "bad size": (_nodes(lambda ns: ns[2]["args"]["$tuple"].append({"$size": ["1"]})), ModelLoadError, "size holds"),
    "bad device": (_nodes(lambda ns: ns[2]["args"]["$tuple"].append({"$device": "cpu; rm"})), ModelLoadError, "names a device"),
    "future version": (_set("version", 99), ModelLoadError, "format version 99"),
    "no modules": (_set("modules", []), ModelLoadError, "root module"),
    "tensors not a dict": (_set("tensors", [1]), ModelLoadError, "'tensors' is a list"),
}


@pytest.fixture(scope="module")
def fresh_process():
    """Run a function in a fresh process per call, forked from a server with torch imported."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "qcd_fx.io", "load_child"])
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}  # 3.10 reuses the two workers
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx, **fresh) as pool:
        yield lambda *args: pool.submit(load_and_run, *args)


@pytest.fixture
def sentinel_dir():
    d = tempfile.mkdtemp(prefix="qcdfx")  # no dots: the module-path attack must not contain any
    yield d
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


def test_every_malicious_file_is_refused_with_one_line_in_a_fresh_process(fresh_process, sentinel_dir):
    jobs = {}
    for i, (label, (case, _, _)) in enumerate(REFUSED.items()):
        sentinel = os.path.join(sentinel_dir, f"pwned{i}")
        path = os.path.join(sentinel_dir, f"evil{i}")
        torch.save(case(sentinel), path)
        jobs[label] = (fresh_process(path, sentinel, SHAPE), sentinel)
    failures = []
    for label, (job, sentinel) in jobs.items():
        report = job.result(timeout=300)
        _, error, fragment = REFUSED[label]
        assert not report["sentinel"] and not os.path.exists(sentinel), f"{label}: the attack ran code"
        ok = (
            not report["loaded"]
            and not report["unexpected"]
            and report["error"] in {c.__name__ for c in error.__mro__ if issubclass(c, ModelLoadError)} | {error.__name__}
            and "\n" not in report["message"]
            and fragment in report["message"]
        )
        if not ok or report["error"] != error.__name__:
            failures.append(f"{label}: {report}")
    assert not failures, "\n".join(failures)


def test_the_harness_sees_an_attack_that_runs(fresh_process, sentinel_dir, tmp_path):
    """A pickled module whose unpickling writes the sentinel, loaded with trust_pickle: the
    fresh-process check reports it (so the check above can fail)."""
    sentinel = os.path.join(sentinel_dir, "pwned")
    path = tmp_path / "trusted.pt"
    torch.save(_Writer(sentinel), path)
    report = fresh_process(str(path), sentinel, SHAPE, True).result(timeout=300)
    assert report["sentinel"] and report["loaded"] and report["ran"]
    good = tmp_path / "good.pt"
    io.save(qcd_fx.trace(Net()), good)
    report = fresh_process(str(good), os.path.join(sentinel_dir, "none"), SHAPE).result(timeout=300)
    assert report["loaded"] and report["ran"] and not report["sentinel"], report


class _Writer(nn.Module):
    def __init__(self, sentinel):
        super().__init__()
        self.sentinel = sentinel

    def __reduce__(self):
        return (_write_and_make, (self.sentinel,))

    def forward(self, x):
        return x


def _write_and_make(sentinel):
    with open(sentinel, "w") as f:
        f.write("x")
    return nn.Identity()


@pytest.mark.parametrize("label", ["issue exec chain", "attrgetter", "method apply_", "torch.from_file", "get_attr of a module"])
def test_save_refuses_what_load_refuses_and_names_the_node(label, tmp_path):
    bad = _graph_module_of(label, str(tmp_path / "pwned"))
    with pytest.raises(UsageError, match=r"cannot save the GraphModule in the safe format: node '\w+'"):
        io.save(bad, tmp_path / "out.pt")
    assert not os.listdir(tmp_path)


def _graph_module_of(label, sentinel):
    builders = {
        "issue exec chain": lambda g, x: g.call_function(getattr, (g.call_function(getattr, (x, "__class__")), "__reduce_ex__")),
        "attrgetter": lambda g, x: g.call_function(operator.attrgetter, ("__class__",)),
        "method apply_": lambda g, x: g.call_method("apply_", (x, "FN")),
        "torch.from_file": lambda g, x: g.call_function(torch.from_file, (sentinel,), {"shared": True, "size": 4}),
        "get_attr of a module": lambda g, x: g.call_method("forward", (g.get_attr("lin"), x)),
    }
    g = Graph()
    x = g.placeholder("x")
    g.output(builders[label](g, x))
    return GraphModule(Net(), g)


def test_the_cli_refuses_the_issue_file_without_running_it(tmp_path, sentinel_dir):
    sentinel = os.path.join(sentinel_dir, "pwned")
    evil = tmp_path / "evil.pt"
    torch.save(_exec_chain(sentinel), evil)
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from qcd_fx.cli import main; sys.exit(main())", "transform", str(evil), "-s", "2,4", "-p", "csc", "--dry-run"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refused" in lines[0], proc.stderr
    assert not os.path.exists(sentinel)


def test_legitimate_constructs_round_trip(tmp_path):
    """What traced models need still loads: attributes, methods, getattr names, factories,
    function-valued module attributes (TransformerEncoderLayer.activation), root constants."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")

        def forward(self, x):
            b, n = x.shape[0], x.size(1)
            pos = torch.arange(n, dtype=x.dtype, device=x.device).view(1, n, 1)
            y = self.enc(x + pos)
            z = self.conv(y.reshape(b, 2, 2, -1)).flatten(1)
            return z.to(x.dtype) * 0.5 + y.mean() + torch.tensor([1.0, 2.0]).sum()

    model = M().eval()
    gm = qcd_fx.trace(model)
    path = tmp_path / "m.pt"
    io.save(gm, path)
    loaded = io.load(path)
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    assert loaded.enc.activation is torch.nn.functional.relu


def test_allow_rejects_names_that_are_not_packages(tmp_path):
    io.save(qcd_fx.trace(Net()), tmp_path / "m.pt")
    with pytest.raises(UsageError, match="is not a package name"):
        io.load(tmp_path / "m.pt", allow=["os; rm"])


# ---------------------------------------------------------------------------------------------
# Mutations of valid files


_POOL = [
    "exec", "eval", "getattr", "__import__", "_operator.call", "_operator.methodcaller", "os.system",
    "qcd_fx.io.os.system", "torch.load", "torch.from_file", "torch.ops.aten.from_file.default",
    "__class__", "__globals__", "__reduce_ex__", "register_hook", "apply_", "relu", "view", "add",
    "torch.relu", "_operator.add", "lin", "seq.0", "seq", "x", "y", "", "0", "subprocess.Popen",
    "torch.nn.modules.linear.Linear", "torch.nn.modules.activation.ReLU", "torch.fx.graph_module.GraphModule",
    "$fn", "$node", "$tensor", "$pickle",
]  # fmt: skip


def _injections(sentinel):
    return [
        f"x=open({sentinel!r},'w')",
        f'lin"),print(1,file=open("{sentinel}","w")),getattr(self,"lin',
        f"view(2,-1); open({sentinel!r},'w'); x.view",
        f"dim=print(1,file=open({sentinel!r},'w')) or 1, keepdim",
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_files_never_run_code_and_fail_with_one_line(data):
    with tempfile.TemporaryDirectory(prefix="qcdfx") as d:
        sentinel = os.path.join(d, "pwned")
        pool = _POOL + _injections(sentinel)
        payload = net_payload()
        for _ in range(data.draw(st.integers(1, 3))):
            _mutate(payload, data, pool)
        path = os.path.join(d, "m")
        torch.save(payload, path)
        try:
            model = io.load(path)
        except ModelLoadError as e:
            assert "\n" not in str(e)
            model = None
        if model is not None:
            try:
                model(torch.randn(SHAPE)).sum().backward()
            except Exception:  # noqa: BLE001 - a mutated graph may fail to run; it must not run code
                pass
        assert not os.path.exists(sentinel)


def _mutate(payload, data, pool):
    pick = st.sampled_from(pool)
    what = data.draw(st.sampled_from(["target", "name", "op", "arg", "tag", "class", "attr", "module"]))
    nodes = payload["nodes"]
    n = nodes[data.draw(st.integers(0, len(nodes) - 1))]
    if what == "target":
        n["target"] = {"$fn": data.draw(pick)} if n["op"] == "call_function" and data.draw(st.booleans()) else data.draw(pick)
    elif what == "name":
        n["name"] = data.draw(pick)
    elif what == "op":
        n["op"] = data.draw(st.sampled_from(["placeholder", "get_attr", "call_function", "call_method", "call_module", "output"]))
    elif what == "arg":
        n["args"].setdefault("$tuple", []).append({data.draw(st.sampled_from(["$fn", "$node", "$tensor", "$dtype"])): data.draw(pick)})
    elif what == "tag":
        n["args"] = {data.draw(pick): n["args"].get("$tuple", [])}
    elif what == "class":
        payload["modules"][data.draw(st.integers(1, len(payload["modules"]) - 1))]["class"] = data.draw(pick)
    elif what == "attr":
        payload["modules"][data.draw(st.integers(0, len(payload["modules"]) - 1))]["attrs"][data.draw(pick)] = data.draw(
            st.sampled_from([1, "x", {"$fn": data.draw(pick)}, {"$dict": [[0, {"$fn": data.draw(pick)}]]}])
        )
    else:
        payload["modules"][data.draw(st.integers(1, len(payload["modules"]) - 1))]["name"] = data.draw(pick)
