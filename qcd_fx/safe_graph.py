"""The safe GraphModule file format: what a file may hold and do, checked in one place.

A file is a ``torch.save`` of plain data (read back with ``torch.load(weights_only=True)``):
the graph as a node list, each module as its class name and plain attributes, and the tensors.
Loading a file runs no code from it, and the model it yields can only compute: the rules below
bound what the graph may call, whatever the file says. :func:`encode` and :func:`decode` apply
the same rules, so a file :func:`encode` accepts is one :func:`decode` accepts.

What a graph may do
-------------------
* **Call** (``call_function`` targets and function values ``$fn``): tensor operations — the
  functions PyTorch dispatches through ``__torch_function__`` (``torch.*``, ``torch.nn.functional``,
  ``torch.linalg``/``fft``/``special``, public ``torch.Tensor`` methods), tensor factories
  (``torch.zeros``, ``torch.arange``, …), ATen operators ``torch.ops.aten.NAME.OVERLOAD`` (none
  that reads files or storages); value-level operators of :mod:`operator` (arithmetic,
  comparison, bitwise, ``getitem``/``setitem``; not ``call``, ``methodcaller``, ``attrgetter``,
  ``itemgetter``); :mod:`math` functions; the builtins in :data:`BUILTINS`; and functions that a
  package allowed for this load registers as fx leaf functions with ``torch.fx.wrap``.
  Everything else is refused, the names are matched exactly, and nothing is imported to find a
  function except a module of an allowed package that such a leaf function names.
* **getattr** only with a constant name from :data:`GETATTR_NAMES` (``shape``, ``dtype``, …).
* **call_method** only with a public ``torch.Tensor`` method outside :data:`DENIED_METHODS`
  (hooks, callables, storages, ``numpy``, …) or an operator dunder (``__add__``, …).
* **Read** (``get_attr``) only parameters, buffers and plain attributes, never a module.
* **Run** (``call_module``) only modules of ``nn.Module`` subclasses from the allowed packages
  (``torch.nn``/``torch.ao.nn`` within ``torch``; not ``GraphModule``, ``ScriptModule`` or
  ``torch.nn.parallel``), constructed without calling their ``__init__``, whose attributes are
  plain data: numbers, strings, ``None``, tensors, dtypes, devices, sizes, slices and tuples,
  lists, dicts and sets of them, plus functions from the list above (e.g. the ``activation`` of
  ``nn.TransformerEncoderLayer``). ``nn.Module``'s own slots (hook dicts, ``_modules``, …)
  cannot be set from a file; names starting with ``__`` are refused.

Every value a graph computes therefore comes from the inputs, tensors, plain constants or an
allowed operation on them, so ``getitem`` and ``getattr`` never reach a function, a module or
its globals. Every name that ends up in generated Python code (node names, placeholders,
method names, keyword names) must be an identifier, and module path parts printable ASCII
without quotes, backslashes or dots, so no text from the file is executed as code.

What it does not guarantee: resources. A file can hold huge tensors, a graph can allocate
huge ones (``torch.zeros(10**12)``) or run for a long time. And the allowed modules' own code
runs with the file's attribute values, so ``--allow PKG`` trusts PKG's modules with
file-chosen attributes, lets the file import any module of PKG, and lets the graph call the
functions PKG registers with ``torch.fx.wrap``.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import keyword
import math
import operator
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo
from torch.fx.node import _get_qualified_name

from .errors import first_line
from .tracing import FastModuleAccess, fast_module_access

FORMAT = "qcd-fx.graphmodule"
VERSION = 1
DEFAULT_ALLOW = ("torch", "torchvision", "qcd_fx")

BUILTINS = ("getattr", "len", "int", "float", "bool", "min", "max", "abs", "round", "pow", "range", "slice", "tuple", "list", "isinstance")
"""Builtins a graph may call (``getattr`` with a constant allowed name only)."""

OPERATORS = (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs", "invert", "inv",
    "and_", "or_", "xor", "lshift", "rshift", "not_", "truth", "lt", "le", "gt", "ge", "eq", "ne", "is_", "is_not",
    "contains", "getitem", "setitem", "index", "concat",
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior", "ixor", "ilshift", "irshift",
)  # fmt: skip
"""Value-level functions of :mod:`operator` (no ``call``, ``methodcaller``, ``attrgetter``, …)."""

GETATTR_NAMES = frozenset(
    {
        "shape", "dtype", "device", "ndim", "layout", "T", "mT", "H", "mH", "data", "real", "imag",
        "requires_grad", "is_cuda", "is_cpu", "is_meta", "is_sparse", "is_quantized", "is_nested",
        "is_floating_point", "is_complex", "itemsize", "nbytes", "names",
        "min", "max", "eps", "tiny", "bits", "resolution", "smallest_normal",  # torch.finfo / iinfo
        "start", "stop", "step",  # slices and ranges
    }
)  # fmt: skip
"""Attribute names ``getattr`` nodes may read (tensor, size, finfo/iinfo and slice attributes)."""

DENIED_METHODS = frozenset(
    {
        "apply_", "map_", "map2_",  # take Python callables
        "register_hook", "register_post_accumulate_grad_hook", "retain_grad", "backward",  # hooks, autograd
        "storage", "untyped_storage", "storage_type", "set_", "is_set_to", "share_memory_",  # storages
        "data_ptr", "const_data_ptr", "record_stream", "module_load", "as_subclass", "numpy",
    }
)  # fmt: skip
"""Public ``torch.Tensor`` methods a graph may not call."""

OPERATOR_DUNDERS = frozenset(
    f"__{n}__"
    for n in (
        "getitem", "setitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs",
        "and", "or", "xor", "invert", "lshift", "rshift", "lt", "le", "gt", "ge", "eq", "ne",
        "radd", "rsub", "rmul", "rtruediv", "rfloordiv", "rmod", "rpow", "rmatmul", "rand", "ror", "rxor",
        "iadd", "isub", "imul", "itruediv",
    )
)  # fmt: skip
"""Dunder methods a graph may call (the value-level operators)."""

TENSOR_FACTORIES = (
    "arange", "zeros", "ones", "empty", "full", "rand", "randn", "randint", "randperm", "tensor", "as_tensor",
    "linspace", "logspace", "eye", "scalar_tensor", "finfo", "iinfo", "_assert",
)  # fmt: skip
"""``torch`` functions outside ``__torch_function__`` dispatch that traced graphs call."""

_TORCH_NAMESPACES = (torch, torch.functional, torch.nn.functional, torch.Tensor, torch.linalg, torch.fft, torch.special)
_ATEN = re.compile(r"torch\.ops\.aten\.(_?[A-Za-z][A-Za-z0-9_]*|__[a-z]+__)(?:\.([A-Za-z][A-Za-z0-9_]*))?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ATOM = re.compile(r'[\x20-\x7e]+')
"""A module path atom ("layer1", "0", RegNet's "block1-0"): printable ASCII without ``"``, ``\\``
or ``.``, so that fx's ``getattr(self, "atom")`` is always one string literal."""
_NOT_IN_ATOM = re.compile(r'["\\.]')
_PLACEHOLDER = re.compile(r"\*{0,2}[A-Za-z_][A-Za-z0-9_]*")
_MAX_NAME = 1024
_MAX_DEPTH = 32
_MODULE_SLOTS = (frozenset(nn.Module().__dict__) | {"_compiled_call_impl"}) - {"training", "_non_persistent_buffers_set"}
"""Attributes ``nn.Module.__init__`` sets (hook dicts, ``_modules``, …): never taken from a file."""
_TORCH_CLASS_PREFIXES = ("torch.nn.", "torch.ao.nn.")
_DENIED_CLASS_PREFIXES = ("torch.nn.parallel.",)
TYPES = {"torch.Tensor": torch.Tensor, "int": int, "float": float, "bool": bool, "str": str}
"""Node type annotations kept in a file (others are dropped on save)."""
_TYPE_NAMES = {v: k for k, v in TYPES.items()}


class Refused(Exception):
    """The graph or file breaks a rule of the format; the message names the node or module."""


class Malformed(Exception):
    """The file does not have the format's structure (truncated, inconsistent, wrong types)."""


# ---------------------------------------------------------------------------------------------
# What may be called


def _is_dunder(name: str) -> bool:
    return name.startswith("__")


def _dotted(name: str) -> bool:
    """``a.b.c`` with every part an identifier and none a dunder (package, class, function names)."""
    return len(name) <= _MAX_NAME and all(_IDENT.fullmatch(p) and not _is_dunder(p) for p in name.split("."))


def _method_allowed(name: str) -> bool:
    if name in OPERATOR_DUNDERS:
        return True
    return not name.startswith("_") and name not in DENIED_METHODS and callable(getattr(torch.Tensor, name, None))


@functools.cache
def _value_functions() -> dict[str, Callable]:
    """Name (as ``torch.fx`` writes it) -> function, for everything but aten and leaf functions."""
    table: dict[str, Callable] = {}

    def add(fn: Any) -> None:
        try:
            table[_get_qualified_name(fn)] = fn
        except Exception:  # fx cannot name it, so a file cannot name it either
            pass

    for name in BUILTINS:
        add(getattr(builtins, name))
    for name in OPERATORS:
        add(getattr(operator, name))
    for name in dir(math):
        if not name.startswith("_") and callable(getattr(math, name)):
            add(getattr(math, name))
    from torch.overrides import get_overridable_functions

    for namespace, fns in get_overridable_functions().items():
        if not any(namespace is ns for ns in _TORCH_NAMESPACES):
            continue  # property getters and the like
        for fn in fns:
            name = getattr(fn, "__name__", "")
            if namespace is torch.Tensor and not _method_allowed(name):
                continue
            if name.startswith("_") and name not in OPERATOR_DUNDERS:
                continue
            add(fn)
    for name in TENSOR_FACTORIES:
        add(getattr(torch, name))
    for name in ("size", "dim"):
        add(getattr(torch.Tensor, name))
    return table


_ATEN_OPERATORS = frozenset(f"__{op}__" for op in "and or xor lshift rshift iand ior ixor ilshift irshift".split())
"""ATen's bitwise operators, spelt as dunders (``aten.__and__.Tensor`` in torch.export masks)."""


@functools.lru_cache(maxsize=4096)
def _aten_function(qualname: str) -> Callable | None:
    """The ATen operator ``torch.ops.aten.NAME[.OVERLOAD]`` names, unless it reads files or storages."""
    match = _ATEN.fullmatch(qualname)
    if match is None:
        return None
    name, overload = match.group(1, 2)
    if _is_dunder(name) and name not in _ATEN_OPERATORS:
        return None
    try:
        packet = getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    fn = packet
    if overload is not None:
        fn = getattr(packet, overload, None)
        if not isinstance(fn, torch._ops.OpOverload):
            return None
    schemas = [fn._schema] if overload is not None else [getattr(packet, o)._schema for o in packet.overloads()]
    for schema in schemas:
        for arg in schema.arguments:
            kind = str(arg.type)
            if "Storage" in kind or (kind.startswith("str") and ("file" in arg.name or "path" in arg.name)):
                return None  # reads or maps files / raw storage (aten::from_file, set_.source_Storage)
    return fn


class Policy:
    """Resolves the names a file uses, under the format's rules and the allowed packages."""

    def __init__(self, allow: Iterable[str] = ()):
        roots = []
        for pkg in (*DEFAULT_ALLOW, *allow):
            pkg = str(pkg).strip().rstrip(".")
            if not _dotted(pkg):
                raise ValueError(f"--allow {pkg!r} is not a package name")
            roots.append(pkg)
        self.allow = tuple(dict.fromkeys(roots))

    def _allowed_root(self, qualname: str) -> bool:
        return any(qualname == a or qualname.startswith(a + ".") for a in self.allow)

    def function(self, qualname: Any) -> Callable:
        if not isinstance(qualname, str):
            raise Malformed(f"a function name is a {type(qualname).__name__}, not a string")
        fn = _value_functions().get(qualname)
        if fn is not None:
            return fn
        if qualname.startswith("torch.ops.aten."):
            fn = _aten_function(qualname)
            if fn is None:
                raise Refused(f"'{qualname}', which is not an ATen operator the format allows")
            return fn
        fn = self._leaf_function(qualname)
        if fn is not None:
            return fn
        raise Refused(f"'{qualname}', which is not a tensor operation, value-level operator or registered leaf function of an allowed package")

    def _leaf_function(self, qualname: str) -> Callable | None:
        """A ``torch.fx.wrap``-registered function of an allowed package other than torch."""
        module_name, _, name = qualname.rpartition(".")
        parts = qualname.split(".")
        if not module_name or parts[0] == "torch" or not self._allowed_root(qualname):
            return None
        if not _dotted(qualname):
            return None
        try:
            module = importlib.import_module(module_name)
        except Exception:
            return None
        try:
            from torch.fx._symbolic_trace import _wrapped_fns_to_patch
        except ImportError:  # torch moved its registry: leaf functions cannot be checked
            return None
        if (id(vars(module)), name) not in _wrapped_fns_to_patch:
            return None
        fn = vars(module).get(name)
        return fn if callable(fn) else None

    def method(self, name: Any) -> str:
        if not isinstance(name, str) or not _method_allowed(name):
            raise Refused(f"method {str(name)[:80]!r}, which is not an allowed torch.Tensor method")
        return name

    def module_class(self, qualname: Any) -> type[nn.Module]:
        if not isinstance(qualname, str) or len(qualname) > _MAX_NAME:
            raise Malformed("a module class name is not a string of reasonable length")
        parts = qualname.split(".")
        if not _dotted(qualname):
            raise Refused(f"module class {qualname[:80]!r} is not a dotted name of identifiers")
        if not self._allowed_root(qualname):
            raise Refused(
                f"module class '{qualname}' is outside the allowed packages ({', '.join(self.allow)}); "
                "allow its package (load(..., allow=[...]) / --allow PKG) if you trust it"
            )
        if parts[0] == "torch" and (not qualname.startswith(_TORCH_CLASS_PREFIXES) or qualname.startswith(_DENIED_CLASS_PREFIXES)):
            raise Refused(f"module class '{qualname}' is not one of torch.nn's layers")
        cls = _import(qualname)
        if cls is None:
            raise Refused(f"module class '{qualname}' cannot be imported here (is '{parts[0]}' installed, or in the current directory?)")
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or issubclass(cls, (GraphModule, torch.jit.ScriptModule)):
            raise Refused(f"'{qualname}' is not an nn.Module layer class the format allows")
        return cls


def _import(qualname: str) -> Any:
    parts = qualname.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        except Exception:
            return None
        for p in parts[i:]:
            obj = vars(obj).get(p) if isinstance(obj, type) or hasattr(obj, "__dict__") else None
            if obj is None:
                return None
        return obj
    return None


# ---------------------------------------------------------------------------------------------
# Encoding


class _Encoder:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self._ids: dict[int, str] = {}

    def tensor(self, t: torch.Tensor, key: str) -> dict:
        if id(t) in self._ids:  # shared (tied) tensors stay shared
            return {"$tensor": self._ids[id(t)]}
        while key in self.tensors:
            key += "'"
        self.tensors[key] = t.data if isinstance(t, nn.Parameter) else t.detach()
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
            return self.tensor(v, where)
        if callable(v) and hasattr(v, "__name__"):
            try:
                return {"$fn": _get_qualified_name(v)}
            except Exception:
                raise Refused(f"{where} holds function {v!r}, which has no importable name") from None
        raise Refused(f"{where} holds a {type(v).__name__}, which the safe format cannot store")


def encode(gm: GraphModule, policy: Policy) -> dict:
    """The payload of ``gm``; raises :class:`Refused` naming what breaks the format's rules."""
    payload = _encode(gm)
    decode(payload, policy, build=False)  # the rules of load, applied on save
    return payload


def _encode(gm: GraphModule) -> dict:
    """The payload of ``gm`` as the format writes it, before the rules of load are checked."""
    enc = _Encoder()
    for key in ("forward", "__call__"):
        if key in gm.__dict__:
            raise Refused(f"the GraphModule has its {key} replaced by an instance attribute")
    root_attrs = _root_attribute_names(gm)
    modules = []
    seen: dict[int, str] = {}
    for name, m in gm.named_modules(remove_duplicate=False):
        if id(m) in seen:  # one module object under several paths: keep it one object
            modules.append({"name": name, "alias_of": seen[id(m)]})
            continue
        seen[id(m)] = name
        label = name or "<root>"
        for hook_dict in (k for k in _MODULE_SLOTS if "hook" in k):
            if getattr(m, hook_dict, None):
                raise Refused(f"module '{label}' ({type(m).__name__}) has {hook_dict.strip('_')} registered, which are code")
        if name and isinstance(m, GraphModule):
            raise Refused(f"module '{label}' is a nested GraphModule")
        if name:
            attrs = {k: enc.value(v, f"module '{label}' attribute '{k}'") for k, v in m.__dict__.items() if k not in _MODULE_SLOTS}
        else:
            attrs = {k: enc.value(m.__dict__[k], f"attribute '{k}'") for k in root_attrs}
            attrs["training"] = m.training
            attrs["_non_persistent_buffers_set"] = enc.value(m._non_persistent_buffers_set, "<root>")
        params = {
            k: None if p is None else {"tensor": enc.tensor(p, f"{name}.{k}" if name else k), "requires_grad": p.requires_grad}
            for k, p in m._parameters.items()
        }
        buffers = {k: None if b is None else enc.tensor(b, f"{name}.{k}" if name else k) for k, b in m._buffers.items()}
        modules.append({"name": name, "class": f"{type(m).__module__}.{type(m).__qualname__}" if name else "", "attrs": attrs, "params": params, "buffers": buffers})
    nodes = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function":
            target = enc.value(target, f"node '{node.name}'")
            if not (isinstance(target, dict) and "$fn" in target):
                raise Refused(f"node '{node.name}' calls {node.target!r}, which is not a function")
        nodes.append(
            {
                "op": node.op,
                "name": node.name,
                "target": target,
                "args": enc.value(node.args, f"node '{node.name}'"),
                "kwargs": enc.value(node.kwargs, f"node '{node.name}'"),
                "type": _TYPE_NAMES.get(node.type),  # annotations other than these are dropped
            }
        )
    codegen = gm.graph._codegen
    pytree = None
    if type(codegen) is _PyTreeCodeGen:  # torch.export graphs: inputs and outputs as pytrees
        from torch.utils._pytree import treespec_dumps

        info = codegen.pytree_info
        try:
            pytree = {"orig_args": list(info.orig_args), "in_spec": treespec_dumps(info.in_spec), "out_spec": treespec_dumps(info.out_spec)}
        except Exception as e:
            raise Refused(f"the graph's input/output structure cannot be written ({first_line(e)})") from None
    elif type(codegen) not in (CodeGen, FastModuleAccess):
        raise Refused(f"the graph uses {type(codegen).__name__} code generation")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "torch": str(torch.__version__),
        "class_name": type(gm).__name__,
        "modules": modules,
        "nodes": nodes,
        "tensors": enc.tensors,
    }
    if pytree is not None:
        payload["pytree"] = pytree
    return payload


def _spec_types(node: Any, out: set[str], depth: int = 0) -> None:
    if depth > 64 or not isinstance(node, dict):
        raise Malformed("the input/output structure is not a tree spec")
    if node.get("type") is not None:
        out.add(node["type"])
    for child in node.get("children_spec") or []:
        _spec_types(child, out, depth + 1)


def _load_spec(text: Any, policy: Policy, what: str) -> Any:
    """A pytree spec from the file; a container type it names must be registered with pytree
    already, or live in an allowed package (whose module is then imported to register it)."""
    import json

    from torch.utils import _pytree as pt

    if not isinstance(text, str) or len(text) > 1_000_000:
        raise Malformed(f"the {what} spec is not a string")
    try:
        protocol, root = json.loads(text)
    except (ValueError, TypeError):
        raise Malformed(f"the {what} spec is not valid JSON") from None
    types: set[str] = set()
    _spec_types(root, types)
    for name in sorted(types):
        if name in pt.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            continue
        if not policy._allowed_root(name):
            pkg = name.split(".")[0]
            raise Refused(f"the {what} is a '{name}', outside the allowed packages; allow its package (load(..., allow=['{pkg}']) / --allow {pkg}) if you trust it")
        module = name.rpartition(".")[0]
        try:
            importlib.import_module(module)
        except Exception:
            raise Refused(f"the {what} type '{name}' cannot be imported") from None
        if name not in pt.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            raise Refused(f"the {what} type '{name}' is not a registered pytree container")
    try:
        return pt.treespec_loads(text)
    except Exception as e:
        raise Malformed(f"the {what} spec cannot be read ({first_line(e)})") from None


def _root_attribute_names(gm: GraphModule) -> list[str]:
    """Plain root attributes the graph reads (fx's ``_tensor_constant0`` and the like)."""
    names = []
    for node in gm.graph.nodes:
        if node.op == "get_attr" and isinstance(node.target, str) and "." not in node.target:
            t = node.target
            if t in gm.__dict__ and t not in _MODULE_SLOTS and t not in names:
                names.append(t)
    return names


# ---------------------------------------------------------------------------------------------
# Decoding


def _check_ident(name: Any, what: str, pattern: re.Pattern = _IDENT) -> str:
    if not isinstance(name, str):
        raise Malformed(f"{what} is a {type(name).__name__}, not a string")
    if len(name) > _MAX_NAME or not pattern.fullmatch(name) or _is_dunder(name.lstrip("*")) or keyword.iskeyword(name.lstrip("*")):
        raise Refused(f"{what} {name[:80]!r} is not a plain identifier")
    return name


def _check_path(path: Any, what: str) -> list[str]:
    if not isinstance(path, str):
        raise Malformed(f"{what} is a {type(path).__name__}, not a string")
    atoms = path.split(".")
    for atom in atoms:
        if len(atom) > _MAX_NAME or not _ATOM.fullmatch(atom) or _NOT_IN_ATOM.search(atom) or _is_dunder(atom):
            raise Refused(f"{what} {path[:80]!r} has a part that is not a plain name")
    return atoms


def _get(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise Malformed(f"{where} has no '{key}'")
    v = d[key]
    if not isinstance(v, kind):
        raise Malformed(f"{where}: '{key}' is a {type(v).__name__}")
    return v


class _Decoder:
    def __init__(self, payload: dict, policy: Policy):
        self.policy = policy
        self.tensors = _get(payload, "tensors", dict, "the file")
        self.made: dict[str, torch.Tensor] = {}

    def tensor(self, ref: Any, where: str, param: bool = False, requires_grad: bool = True) -> torch.Tensor:
        key = ref.get("$tensor") if isinstance(ref, dict) and len(ref) == 1 else None
        if not isinstance(key, str) or not isinstance(self.tensors.get(key), torch.Tensor):
            raise Malformed(f"{where} refers to a tensor the file does not hold")
        if key not in self.made:
            t = self.tensors[key]
            self.made[key] = nn.Parameter(t, requires_grad=requires_grad) if param else t
        elif param != isinstance(self.made[key], nn.Parameter):
            raise Malformed(f"{where} uses tensor '{key}' both as a parameter and as a plain tensor")
        return self.made[key]

    def value(self, v: Any, where: str, nodes: dict[str, Node] | None = None, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise Malformed(f"{where} nests values more than {_MAX_DEPTH} deep")
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [self.value(x, where, nodes, depth + 1) for x in v]
        if not isinstance(v, dict) or len(v) != 1:
            raise Malformed(f"{where} holds a {type(v).__name__} that is no value of the format")
        ((tag, x),) = v.items()
        sub = functools.partial(self.value, where=where, nodes=nodes, depth=depth + 1)
        if tag == "$node":
            if nodes is None or not isinstance(x, str) or x not in nodes:
                raise Malformed(f"{where} uses node {str(x)[:80]!r} before it is defined")
            return nodes[x]
        if tag in ("$tuple", "$set", "$dict", "$slice", "$size") and not isinstance(x, list):
            raise Malformed(f"{where}: {tag} holds a {type(x).__name__}, not a list")
        if tag == "$tuple":
            return tuple(sub(i) for i in x)
        if tag == "$size":
            if not all(type(i) is int for i in x):
                raise Malformed(f"{where}: a size holds something other than ints")
            return torch.Size(x)
        if tag == "$set":
            return {sub(i) for i in x}
        if tag == "$dict":
            if not all(isinstance(kv, list) and len(kv) == 2 for kv in x):
                raise Malformed(f"{where}: a dict entry is not a [key, value] pair")
            return {sub(k): sub(i) for k, i in x}
        if tag == "$slice":
            if len(x) != 3:
                raise Malformed(f"{where}: a slice has {len(x)} parts, not 3")
            return slice(*(sub(i) for i in x))
        if tag == "$ellipsis":
            return Ellipsis
        if tag in ("$dtype", "$memory_format", "$layout"):
            kind = {"$dtype": torch.dtype, "$memory_format": torch.memory_format, "$layout": torch.layout}[tag]
            obj = getattr(torch, x, None) if isinstance(x, str) and _IDENT.fullmatch(x) and not x.startswith("_") else None
            if not isinstance(obj, kind):
                raise Malformed(f"{where} names an unknown {kind.__name__} {str(x)[:80]!r}")
            return obj
        if tag == "$device":
            if not isinstance(x, str) or not re.fullmatch(r"[a-z_]+(:\d+)?", x):
                raise Malformed(f"{where} names a device {str(x)[:80]!r}")
            return torch.device(x)
        if tag == "$tensor":
            return self.tensor(v, where)
        if tag == "$fn":
            if x == "getattr":
                raise Refused(f"{where} holds getattr as a value")
            try:
                return self.policy.function(x)
            except Refused as e:
                raise Refused(f"{where} holds function {e}") from None
        raise Malformed(f"{where} has an unknown value tag {str(tag)[:40]!r}")

    def modules(self, entries: Any) -> nn.Module:
        if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict) or entries[0].get("name") != "":
            raise Malformed("the module list does not start with the root module")
        root = nn.Module()
        by_name: dict[str, nn.Module] = {}
        for entry in entries:
            name = _get(entry, "name", str, "a module entry")
            where = f"module '{name or '<root>'}'"
            if name in by_name:
                raise Malformed(f"{where} is listed twice")
            if name:
                parent, _, child = name.rpartition(".")
                _check_path(name, f"{where}: its path")
                if parent not in by_name:
                    raise Malformed(f"{where} comes before its parent")
            if "alias_of" in entry:
                target = by_name.get(entry["alias_of"]) if isinstance(entry["alias_of"], str) else None
                if not name or target is None:
                    raise Malformed(f"{where} is an alias of a module the file does not define first")
                by_name[name] = by_name[parent]._modules[child] = target
                continue
            if name:
                cls = self.policy.module_class(_get(entry, "class", str, where))
                m = cls.__new__(cls)
                nn.Module.__init__(m)
            else:
                m = root
            by_name[name] = m
            for key, val in _get(entry, "attrs", dict, where).items():
                _check_ident(key, f"{where}: attribute name")
                if key in _MODULE_SLOTS:
                    raise Refused(f"{where}: attribute '{key}' is nn.Module's own and cannot come from a file")
                m.__dict__[key] = self.value(val, f"{where} attribute '{key}'")
            if not isinstance(m.__dict__.get("training", True), bool):
                raise Malformed(f"{where}: 'training' is not a bool")
            non_persistent = m.__dict__.get("_non_persistent_buffers_set", set())
            if not isinstance(non_persistent, set) or not all(isinstance(k, str) for k in non_persistent):
                raise Malformed(f"{where}: '_non_persistent_buffers_set' is not a set of names")
            for key, p in _get(entry, "params", dict, where).items():
                _check_ident(key, f"{where}: parameter name")
                if p is None:
                    m._parameters[key] = None
                    continue
                requires_grad = _get(p, "requires_grad", bool, f"{where} parameter '{key}'")
                m._parameters[key] = self.tensor(_get(p, "tensor", dict, where), f"{where} parameter '{key}'", param=True, requires_grad=requires_grad)
            for key, b in _get(entry, "buffers", dict, where).items():
                _check_ident(key, f"{where}: buffer name")
                m._buffers[key] = None if b is None else self.tensor(b, f"{where} buffer '{key}'")
            if name:
                by_name[parent]._modules[child] = m
        return root

    def graph(self, entries: Any, root: nn.Module) -> Graph:
        if not isinstance(entries, list) or not entries:
            raise Malformed("the node list is empty")
        graph = Graph()
        nodes: dict[str, Node] = {}
        for i, n in enumerate(entries):
            if not isinstance(n, dict):
                raise Malformed(f"node {i} is a {type(n).__name__}")
            op = _get(n, "op", str, f"node {i}")
            name = _check_ident(_get(n, "name", str, f"node {i}"), f"node {i}: its name")
            where = f"node '{name}'"
            if name in nodes:
                raise Malformed(f"{where} is defined twice")
            args = self.value(_get(n, "args", dict, where), where, nodes)
            kwargs = self.value(_get(n, "kwargs", dict, where), where, nodes)
            if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                raise Malformed(f"{where}: args are not a tuple or kwargs not a dict")
            for key in kwargs:
                _check_ident(key, f"{where}: keyword")
            target = n.get("target")
            if op == "output":
                if i != len(entries) - 1 or len(args) != 1 or kwargs:
                    raise Malformed(f"{where}: the output node must be last and return one value")
                graph.output(args[0])
                return graph
            if op == "placeholder":
                _check_ident(target, f"{where}: its argument name", _PLACEHOLDER)
            elif op == "call_function":
                try:
                    target = self.policy.function(target.get("$fn") if isinstance(target, dict) and len(target) == 1 else target)
                except Refused as e:
                    raise Refused(f"{where} calls {e}") from None
                if target is getattr and (kwargs or len(args) not in (2, 3) or not isinstance(args[1], str) or args[1] not in GETATTR_NAMES):
                    shown = args[1] if len(args) > 1 and isinstance(args[1], str) else "a computed name"
                    raise Refused(f"{where} reads attribute {str(shown)[:80]!r}, which is not one of the allowed tensor attributes")
            elif op == "call_method":
                try:
                    self.policy.method(target)
                except Refused as e:
                    raise Refused(f"{where} calls {e}") from None
            elif op in ("call_module", "get_attr"):
                obj = _resolve(root, _check_path(target, f"{where}: its target"), op)
                if obj is None:
                    kind = "a submodule" if op == "call_module" else "a parameter, buffer or plain attribute"
                    raise Refused(f"{where}: target {target!r} is not {kind} of the file's modules")
            else:
                raise Malformed(f"{where} has an unknown kind {op[:40]!r}")
            type_name = n.get("type")
            if type_name is not None and type_name not in TYPES:
                raise Malformed(f"{where} has an unknown type annotation")
            nodes[name] = graph.create_node(op, target, args, kwargs, name=name, type_expr=TYPES.get(type_name))
        raise Malformed("the graph has no output node")


def _resolve(root: nn.Module, atoms: list[str], op: str) -> Any:
    """The module (``call_module``) or tensor/plain attribute (``get_attr``) ``atoms`` name, or None."""
    m = root
    for atom in atoms[:-1]:
        m = m._modules.get(atom)
        if m is None:
            return None
    last = atoms[-1]
    if op == "call_module":
        return m._modules.get(last)
    for store in (m._parameters, m._buffers):
        if last in store:
            return store[last]
    if last in m.__dict__ and last not in _MODULE_SLOTS:
        return m.__dict__[last]
    return None


def decode(payload: Any, policy: Policy, *, build: bool = True) -> GraphModule | None:
    """The GraphModule of a payload (``build=False``: only check it).

    Raises :class:`Refused` (a rule of the format is broken) or :class:`Malformed`.
    """
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise Malformed("not a qcd-fx GraphModule file")
    if payload.get("version") != VERSION:
        raise Malformed(f"qcd-fx format version {str(payload.get('version'))[:20]}; this qcd-fx reads version {VERSION}")
    class_name = _check_ident(payload.get("class_name", "GraphModule"), "the class name")
    dec = _Decoder(payload, policy)
    try:
        root = dec.modules(payload.get("modules"))
        graph = dec.graph(payload.get("nodes"), root)
    except (TypeError, ValueError, RuntimeError, OverflowError, AttributeError, KeyError, IndexError) as e:  # e.g. unhashable set members
        raise Malformed(f"{type(e).__name__}: {first_line(e)}") from None
    pytree = payload.get("pytree")
    if pytree is not None:
        if not isinstance(pytree, dict) or not isinstance(pytree.get("orig_args"), list):
            raise Malformed("the input/output structure is malformed")
        orig_args = [_check_ident(a, "an input name") for a in pytree["orig_args"]]
        in_spec = _load_spec(pytree.get("in_spec"), policy, "input")
        out_spec = _load_spec(pytree.get("out_spec"), policy, "output")
        graph.set_codegen(_PyTreeCodeGen(_PyTreeInfo(orig_args, in_spec, out_spec)))
    if not build:
        return None
    try:
        graph.lint()
        return fast_module_access(GraphModule(root, graph, class_name))
    except Exception as e:
        raise Malformed(f"it does not form a valid graph ({type(e).__name__}: {first_line(e)})") from None

