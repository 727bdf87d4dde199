"""Loading models and saving/loading GraphModules, safely by default, with atomic writes.

Model sources (:func:`load_model`):

* ``torchvision:NAME`` — a torchvision classification model with ``weights=None`` (no download);
* ``package.module:factory`` — import and call ``factory()``; ``weights=`` loads a state dict
  from ``.safetensors`` or from a ``.pt`` read with ``torch.load(weights_only=True)``;
* ``FILE.pt`` — a GraphModule saved by :func:`save` (safe), or a whole pickled ``nn.Module``,
  which executes code from the file when loaded and therefore needs ``trust_pickle=True``.

The qcd-fx GraphModule format (:func:`save` / :func:`load`) is a ``torch.save`` of plain data
— the graph as a node list, each module as its class name and plain attributes, the tensors —
that ``torch.load(weights_only=True)`` reads without unpickling code. On load, module classes
and called functions are resolved by name against an allow-list (``torch``, ``torchvision``,
``qcd_fx`` and what the caller adds with ``allow=``), so a file cannot make qcd-fx import or
call arbitrary code. Files that cannot be expressed that way (a module with hooks or with an
attribute of an unknown type) are refused with an error that names the culprit, unless
``allow_pickle=True`` is given, which writes an ordinary pickled GraphModule instead.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import math
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.graph import CodeGen
from torch.fx.node import _get_qualified_name

from .errors import ModelLoadError, UnsafeLoadError, UsageError
from .tracing import FastModuleAccess, fast_module_access

FORMAT = "qcd-fx.graphmodule"
VERSION = 1

DEFAULT_ALLOW = ("torch", "torchvision", "qcd_fx")
_SAFE_TORCH = {"torch._assert", "torch.Tensor.size", "torch.Tensor.dim"}
_SAFE_BUILTINS = {"getattr", "len", "int", "float", "bool", "min", "max", "abs", "round", "pow", "range", "slice", "tuple", "list", "isinstance"}
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


# ---------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary name ends like the target (``.tmp-XXXX-model.pt``), for writers that look at
    suffixes, and gets the usual permissions (``mkstemp`` creates 0600). On any failure the
    temporary file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{os.path.basename(path)}", dir=directory)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_path(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), force: bool = False, what: str = "output") -> str:
    """Validate an output path: its directory exists, it is no input, it does not exist unless
    ``force``. Returns the path; raises :class:`UsageError` with a one-line reason."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"{what} directory {os.path.dirname(path) or '.'!r} does not exist; create it first")
    for src in inputs:
        src = os.fspath(src)
        if os.path.abspath(src) == os.path.abspath(path) or (os.path.exists(src) and os.path.exists(path) and os.path.samefile(src, path)):
            raise UsageError(f"{what} {path!r} is the input file; choose another path so the input is kept")
    if os.path.isdir(path):
        raise UsageError(f"{what} {path!r} is a directory; give a file name")
    if os.path.exists(path) and not force:
        raise UsageError(f"{what} {path!r} exists; pass --force to overwrite it or choose another path")
    return path


# ---------------------------------------------------------------------------------------------
# Model sources


def load_model(
    source: str,
    *,
    weights: str | None = None,
    trust_pickle: bool = False,
    allow: Iterable[str] = (),
) -> nn.Module:
    """Load a model from ``source`` (see module docstring). Errors are :class:`ModelLoadError`."""
    if source.startswith("torchvision:"):
        model = _torchvision_model(source.split(":", 1)[1])
        if weights:
            load_weights(model, weights)
        return model
    if _FACTORY_RE.match(source) and not os.path.exists(source):
        model = _factory_model(source)
        if weights:
            load_weights(model, weights)
        return model
    if weights:
        raise UsageError("--weights applies to a torchvision:NAME or package.module:factory model, not to a model file")
    return load(source, trust_pickle=trust_pickle, allow=allow)


def _torchvision_model(name: str) -> nn.Module:
    try:
        import torchvision.models as tvm
    except ImportError:
        raise ModelLoadError("torchvision is not installed; pip install 'qcd-fx[vision]' to use torchvision:NAME models") from None
    names = tvm.list_models(module=tvm)
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ModelLoadError(f"torchvision has no classification model '{name}'{hint}; see torchvision.models.list_models()")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet/inception init-weights notices
        return tvm.get_model(name, weights=None)


def _factory_model(source: str) -> nn.Module:
    module_name, attr = source.split(":", 1)
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ModelLoadError(f"cannot import '{module_name}' for model {source!r}: {e}") from None
    except Exception as e:
        raise ModelLoadError(f"importing '{module_name}' failed: {type(e).__name__}: {e}") from e
    finally:
        if added:
            sys.path.remove(cwd)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"'{module_name}' has no attribute '{attr}' (model {source!r})")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelLoadError(f"{source!r} is neither an nn.Module nor a callable that returns one")
    try:
        model = obj()
    except Exception as e:
        raise ModelLoadError(f"calling {source}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{source}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pt``/``.pth`` file (``weights_only=True``)."""
    if not os.path.exists(path):
        raise ModelLoadError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"weights file {path!r} is not a valid safetensors file ({e})") from None
    obj = _torch_load_safe(path, "weights file")
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and set(obj) == {key} and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ModelLoadError(f"weights file {path!r} holds {_describe_obj(obj)}, not a state dict (name -> tensor)")
    return obj


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict file into ``model`` (strict: every key must match)."""
    state = read_state_dict(path)
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise ModelLoadError(f"weights {path!r} do not fit {type(model).__name__}: {', '.join(parts)} keys")


def _describe_obj(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        return f"a dict with {len(obj)} entries"
    return f"a {type(obj).__name__}"


def _torch_load_safe(path: str, what: str) -> Any:
    if not os.path.exists(path):
        raise ModelLoadError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise ModelLoadError(f"{what} {path!r} is a directory, not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise UnsafeLoadError(
                f"{what} {path!r} holds a pickled object; loading it executes code from the file. "
                "Pass --trust-pickle (trust_pickle=True) only if you trust its source, or save a state dict and use --weights"
            ) from None
        raise ModelLoadError(f"{what} {path!r} is corrupt or truncated ({_first_line(e)})") from None
    except Exception as e:  # torch.load raises many types on junk input (KeyError, RuntimeError, …)
        msg = _first_line(e)
        if "central directory" in msg or "zip archive" in msg or isinstance(e, EOFError):
            raise ModelLoadError(f"{what} {path!r} is truncated or corrupt (not a complete PyTorch file)") from None
        raise ModelLoadError(f"{what} {path!r} is not a PyTorch file ({msg})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# GraphModule save / load


INPUT_SHAPES_KEY = "qcd_fx_input_shapes"
"""``gm.meta`` key of the example input shapes a file was saved with (CLI default shapes)."""


def save(gm: GraphModule, path: str | os.PathLike, *, allow_pickle: bool = False, input_shapes: list[list[int]] | None = None) -> str:
    """Save ``gm`` atomically in the qcd-fx GraphModule format; returns ``"safe"`` or ``"pickle"``.

    ``input_shapes`` (example input shapes) are stored with the graph and restored as
    ``gm.meta["qcd_fx_input_shapes"]`` on load, so the CLI needs no ``--input-shape`` for it.
    Raises :class:`UsageError` naming what cannot be saved safely unless ``allow_pickle`` (then
    the GraphModule is pickled with ``torch.save``).
    """
    if not isinstance(gm, GraphModule):
        raise TypeError(f"save expects a torch.fx.GraphModule, got {type(gm).__name__}")
    try:
        payload = _encode_graph_module(gm)
        if input_shapes is not None:
            payload["input_shapes"] = [[int(d) for d in shape] for shape in input_shapes]
        kind = "safe"
    except _Unsafe as e:
        if not allow_pickle:
            raise UsageError(f"cannot save the GraphModule in the safe format: {e}; allow a pickled file with --pickle (allow_pickle=True)") from None
        payload, kind = gm, "pickle"
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return kind


def load(path: str | os.PathLike, *, trust_pickle: bool = False, allow: Iterable[str] = ()) -> nn.Module:
    """Load a model file: a qcd-fx GraphModule (safe) or, with ``trust_pickle``, a pickled module.

    ``allow``: extra top-level package names whose module classes and functions the file may
    name (besides ``torch``, ``torchvision`` and ``qcd_fx``).
    """
    path = os.fspath(path)
    try:
        obj = _torch_load_safe(path, "model file")
    except UnsafeLoadError:
        if not trust_pickle:
            raise
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ModelLoadError(f"model file {path!r} could not be unpickled ({type(e).__name__}: {_first_line(e)})") from None
        if not isinstance(obj, nn.Module):
            raise ModelLoadError(f"model file {path!r} holds {_describe_obj(obj)}, not a torch.nn.Module")
        return obj
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        gm = _decode_graph_module(obj, path, (*DEFAULT_ALLOW, *allow))
        if obj.get("input_shapes"):
            gm.meta[INPUT_SHAPES_KEY] = [tuple(s) for s in obj["input_shapes"]]
        return gm
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(
            f"model file {path!r} holds a state dict ({len(obj)} tensors), not a model; "
            "give the model's factory as package.module:factory and this file as --weights"
        )
    raise ModelLoadError(f"model file {path!r} holds {_describe_obj(obj)}, not a model")


class _Unsafe(Exception):
    pass


_MODULE_INTERNALS = set(nn.Module().__dict__) - {"training", "_non_persistent_buffers_set"}
_HOOK_DICTS = [k for k in _MODULE_INTERNALS if "hook" in k]


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


class _Encoder:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self._ids: dict[int, str] = {}

    def tensor(self, t: torch.Tensor, key: str) -> dict:
        if id(t) in self._ids:  # shared (tied) tensors stay shared
            return {"$tensor": self._ids[id(t)]}
        data = t.detach() if not isinstance(t, nn.Parameter) else t.data
        self.tensors[key] = data
        self._ids[id(t)] = key
        return {"$tensor": key}

    def value(self, v: Any, where: str) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, Node):
            return {"$node": v.name}
        if isinstance(v, torch.Size):
            return {"$size": list(v)}
        if isinstance(v, tuple):
            return {"$tuple": [self.value(x, where) for x in v]}
        if isinstance(v, list):
            return [self.value(x, where) for x in v]
        if isinstance(v, (set, frozenset)):
            return {"$set": [self.value(x, where) for x in sorted(v, key=repr)]}
        if isinstance(v, dict):
            return {"$dict": [[self.value(k, where), self.value(x, where)] for k, x in v.items()]}
        if isinstance(v, slice):
            return {"$slice": [self.value(v.start, where), self.value(v.stop, where), self.value(v.step, where)]}
        if v is Ellipsis:
            return {"$ellipsis": True}
        if isinstance(v, torch.dtype):
            return {"$dtype": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"$device": str(v)}
        if isinstance(v, torch.memory_format):
            return {"$memory_format": str(v).removeprefix("torch.")}
        if isinstance(v, torch.layout):
            return {"$layout": str(v).removeprefix("torch.")}
        if isinstance(v, torch.Tensor):
            return self.tensor(v, f"{where}")
        if callable(v) and hasattr(v, "__name__"):
            return {"$fn": _function_name(v)}
        raise _Unsafe(f"{where} holds a {type(v).__name__}, which the safe format cannot store")


def _function_name(fn: Callable) -> str:
    try:
        return _get_qualified_name(fn)
    except Exception as e:
        raise _Unsafe(f"function {fn!r} has no importable name ({e})") from None


def _encode_graph_module(gm: GraphModule) -> dict:
    enc = _Encoder()
    modules = []
    seen: dict[int, str] = {}
    for name, m in gm.named_modules(remove_duplicate=False):
        if id(m) in seen:  # one module object under several paths: keep it one object
            modules.append({"name": name, "alias_of": seen[id(m)]})
            continue
        seen[id(m)] = name
        label = name or "<root>"
        for hook_dict in _HOOK_DICTS:
            if getattr(m, hook_dict, None):
                raise _Unsafe(f"module '{label}' ({type(m).__name__}) has {hook_dict.strip('_')} registered, which are code")
        if name and isinstance(m, GraphModule):
            raise _Unsafe(f"module '{label}' is a nested GraphModule")
        attrs = {}
        if name:
            for key, val in m.__dict__.items():
                if key in _MODULE_INTERNALS:
                    continue
                attrs[key] = enc.value(val, f"{label}.{key}")
        else:
            attrs["training"] = m.training
            attrs["_non_persistent_buffers_set"] = enc.value(m._non_persistent_buffers_set, "<root>")
        params = {
            k: None if p is None else {"tensor": enc.tensor(p, f"{name}.{k}" if name else k), "requires_grad": p.requires_grad}
            for k, p in m._parameters.items()
        }
        buffers = {k: None if b is None else enc.tensor(b, f"{name}.{k}" if name else k) for k, b in m._buffers.items()}
        modules.append(
            {
                "name": name,
                "class": "" if not name else _qualname(type(m)),
                "attrs": attrs,
                "params": params,
                "buffers": buffers,
            }
        )
    nodes = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function":
            target = {"$fn": _function_name(target)}
        nodes.append(
            {
                "op": node.op,
                "name": node.name,
                "target": target,
                "args": enc.value(node.args, f"node '{node.name}'"),
                "kwargs": enc.value(node.kwargs, f"node '{node.name}'"),
                "type": _TYPES_BY_OBJ.get(node.type),  # annotations other than these are dropped
            }
        )
    if type(gm.graph._codegen) not in (CodeGen, FastModuleAccess):
        raise _Unsafe(f"the graph uses {type(gm.graph._codegen).__name__} code generation")
    return {
        "format": FORMAT,
        "version": VERSION,
        "torch": str(torch.__version__),
        "class_name": type(gm).__name__,
        "modules": modules,
        "nodes": nodes,
        "tensors": enc.tensors,
    }


class _Resolver:
    def __init__(self, allow: tuple[str, ...], path: str):
        self.allow = tuple(a.rstrip(".") for a in allow)
        self.path = path
        self._overridable: set[int] | None = None

    def _allowed_root(self, qualname: str) -> bool:
        return any(qualname == a or qualname.startswith(a + ".") for a in self.allow)

    def _import(self, qualname: str) -> Any:
        parts = qualname.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for p in parts[i:]:
                    obj = getattr(obj, p)
            except AttributeError:
                break
            return obj
        raise ModelLoadError(f"model file {self.path!r} names '{qualname}', which cannot be imported here")

    def module_class(self, qualname: str) -> type[nn.Module]:
        if not self._allowed_root(qualname):
            raise ModelLoadError(
                f"model file {self.path!r} uses module class '{qualname}', outside the allowed packages "
                f"({', '.join(self.allow)}); allow its package explicitly (load(..., allow=[...]) / --allow PKG) if you trust it"
            )
        cls = self._import(qualname)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ModelLoadError(f"model file {self.path!r}: '{qualname}' is not a torch.nn.Module class")
        return cls

    def function(self, qualname: str) -> Callable:
        if "." not in qualname:
            if qualname in _SAFE_BUILTINS:
                return getattr(builtins, qualname)
            raise ModelLoadError(f"model file {self.path!r} calls builtin '{qualname}', which is not allowed")
        root = qualname.split(".")[0]
        if root in ("operator", "_operator"):
            return self._import(qualname)
        if root == "math":
            return getattr(math, qualname.split(".", 1)[1])
        if root == "torch":
            fn = self._import(qualname)
            if qualname in _SAFE_TORCH or qualname.startswith(("torch.nn.functional.", "torch._C._nn.", "torch.ops.aten.")) or id(fn) in self._torch_ops():
                return fn
            raise ModelLoadError(f"model file {self.path!r} calls '{qualname}', which is not a tensor operation")
        if root != "torch" and self._allowed_root(qualname):
            return self._import(qualname)
        raise ModelLoadError(
            f"model file {self.path!r} calls '{qualname}', outside the allowed packages ({', '.join(self.allow)}); "
            "allow its package explicitly if you trust it"
        )

    def _torch_ops(self) -> set[int]:
        if self._overridable is None:
            from torch.overrides import get_overridable_functions

            self._overridable = {id(f) for fns in get_overridable_functions().values() for f in fns}
        return self._overridable


def _decode_graph_module(payload: dict, path: str, allow: tuple[str, ...]) -> GraphModule:
    if payload.get("version") != VERSION:
        raise ModelLoadError(f"model file {path!r} has qcd-fx format version {payload.get('version')}; this qcd-fx reads version {VERSION}")
    res = _Resolver(allow, path)
    tensors: dict[str, torch.Tensor] = payload["tensors"]
    made: dict[str, torch.Tensor] = {}

    def tensor(ref: dict, param: bool = False, requires_grad: bool = True) -> torch.Tensor:
        key = ref["$tensor"]
        if key not in made:
            t = tensors[key]
            made[key] = nn.Parameter(t, requires_grad=requires_grad) if param else t
        return made[key]

    def value(v: Any, nodes: dict[str, Node] | None = None) -> Any:
        if isinstance(v, list):
            return [value(x, nodes) for x in v]
        if not isinstance(v, dict):
            return v
        ((tag, x),) = v.items()
        if tag == "$node":
            if nodes is None or x not in nodes:
                raise ModelLoadError(f"model file {path!r} is inconsistent: node '{x}' used before it is defined")
            return nodes[x]
        if tag == "$tuple":
            return tuple(value(i, nodes) for i in x)
        if tag == "$size":
            return torch.Size(x)
        if tag == "$set":
            return {value(i, nodes) for i in x}
        if tag == "$dict":
            return {value(k, nodes): value(i, nodes) for k, i in x}
        if tag == "$slice":
            return slice(*(value(i, nodes) for i in x))
        if tag == "$ellipsis":
            return Ellipsis
        if tag == "$dtype":
            return _torch_constant(x, torch.dtype, path)
        if tag == "$device":
            return torch.device(x)
        if tag == "$memory_format":
            return _torch_constant(x, torch.memory_format, path)
        if tag == "$layout":
            return _torch_constant(x, torch.layout, path)
        if tag == "$tensor":
            return tensor(v)
        if tag == "$fn":
            return res.function(x)
        raise ModelLoadError(f"model file {path!r} has an unknown value tag {tag!r}")

    root = nn.Module()
    by_name: dict[str, nn.Module] = {"": root}
    for entry in payload["modules"]:
        name = entry["name"]
        if "alias_of" in entry:
            parent, _, child = name.rpartition(".")
            by_name[name] = by_name[parent]._modules[child] = by_name[entry["alias_of"]]
            continue
        if name:
            cls = res.module_class(entry["class"])
            m = cls.__new__(cls)
            nn.Module.__init__(m)
            by_name[name] = m
        else:
            m = root
        for key, val in entry["attrs"].items():
            m.__dict__[key] = value(val)
        for key, p in entry["params"].items():
            m._parameters[key] = None if p is None else tensor(p["tensor"], param=True, requires_grad=p["requires_grad"])
        for key, b in entry["buffers"].items():
            m._buffers[key] = None if b is None else tensor(b)
        if name:
            parent, _, child = name.rpartition(".")
            by_name[parent]._modules[child] = m

    graph = Graph()
    nodes: dict[str, Node] = {}
    for n in payload["nodes"]:
        op, name = n["op"], n["name"]
        args, kwargs = value(n["args"], nodes), value(n["kwargs"], nodes)
        target = n["target"]
        if op == "call_function":
            target = res.function(target["$fn"])
        elif op == "call_method" and target.startswith("__") and target not in _SAFE_DUNDERS:
            raise ModelLoadError(f"model file {path!r} calls method '{target}', which is not allowed")
        elif op not in ("placeholder", "get_attr", "call_module", "call_method", "output"):
            raise ModelLoadError(f"model file {path!r} has a node of unknown kind {op!r}")
        if op == "output":
            graph.output(args[0])
            continue
        node = graph.create_node(op, target, tuple(args), dict(kwargs), name=name, type_expr=_TYPES.get(n.get("type")))
        nodes[name] = node
    try:
        graph.lint()
        gm = fast_module_access(GraphModule(root, graph, payload.get("class_name", "GraphModule")))
    except Exception as e:
        raise ModelLoadError(f"model file {path!r} does not form a valid graph ({type(e).__name__}: {_first_line(e)})") from None
    return gm


_TYPES = {"torch.Tensor": torch.Tensor, "int": int, "float": float, "bool": bool, "str": str}
_TYPES_BY_OBJ = {v: k for k, v in _TYPES.items()}
_SAFE_DUNDERS = {"__getitem__", "__add__", "__sub__", "__mul__", "__truediv__", "__floordiv__", "__mod__", "__pow__", "__matmul__",
                 "__neg__", "__and__", "__or__", "__xor__", "__invert__", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__",
                 "__radd__", "__rsub__", "__rmul__", "__rtruediv__"}  # fmt: skip


def _torch_constant(name: str, kind: type, path: str) -> Any:
    obj = getattr(torch, name, None)
    if not isinstance(obj, kind):
        raise ModelLoadError(f"model file {path!r} names an unknown {kind.__name__} '{name}'")
    return obj


__all__ = [
    "FORMAT",
    "atomic_path",
    "check_output_path",
    "load",
    "load_model",
    "load_weights",
    "read_state_dict",
    "save",
]
