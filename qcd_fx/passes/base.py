"""Pass protocol, registry and pipeline-spec parsing.

A pass is a small frozen dataclass built on :class:`torch.fx.passes.infra.pass_base.PassBase`:
its fields are its options, its ``name`` is its CLI name, so the spec string
``qci{min_width=64,init=identity},csc{alpha=0.5,target=output}`` maps one-to-one onto
``Pipeline([QCI(min_width=64, init="identity"), CSC(alpha=0.5, target="output")])``.

Spec grammar (whitespace is ignored)::

    spec   := item ("," item)*
    item   := NAME ("{" option ("," option)* "}")?
    option := KEY "=" value
    value  := TOKEN | "[" value ("," value)* "]"

Values are converted by the field's type annotation: ``int``, ``float``, ``bool``
(``true/false/yes/no/on/off/1/0``), ``str``, ``Literal[...]``, ``X | None`` (``none``) and
``tuple[...]`` (a ``[...]`` list, or one value).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import types
import typing
from typing import Any, ClassVar, Literal, Union

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import PipelineSpecError
from .runtime import PassContext


def option(help: str, default: Any, **metadata: Any) -> Any:
    """A pass option: a dataclass field with a default, a one-line ``help`` and optional
    ``aliases`` (spec words that stand for a value, e.g. ``{"full": None}``) and ``shown_default``
    (what ``qcd-fx passes`` shows when the default is a sentinel resolved later)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


class PassOutcome(PassResult):
    """A :class:`PassResult` that also carries what the pass wants in the report.

    ``notes``: human-readable lines (skipped call sites and why). ``stats``: small JSON-able
    numbers (e.g. ``{"gates": 53}``).
    """

    def __new__(cls, graph_module: GraphModule, modified: bool, notes=(), stats=None):
        self = super().__new__(cls, graph_module, modified)
        self.notes = list(notes)
        self.stats = dict(stats or {})
        return self


@dataclasses.dataclass(frozen=True)
class Pass(PassBase):
    """Base of qcd-fx passes: a frozen dataclass of options with a CLI ``name``.

    Subclasses set ``name`` and ``summary``, declare options as dataclass fields (put a
    one-line ``help`` in the field's metadata), implement :meth:`call` (``call(gm, context)``
    with the run's :class:`~qcd_fx.passes.runtime.PassContext`, or ``call(gm)`` for a pass that
    needs none), and say through
    :attr:`preserves_function` whether the pipeline must check that outputs are unchanged.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    @property
    def preserves_function(self) -> bool:
        """True when the pass must leave the model's outputs bit-for-bit unchanged."""
        return False

    def __call__(self, graph_module: GraphModule, context: PassContext | None = None) -> PassResult | None:
        """Run the pass on ``graph_module`` with the pipeline's ``context`` (an empty context —
        no example inputs, no calibration — when called on its own)."""
        self.requires(graph_module)
        if _takes_context(type(self)):
            result = self.call(graph_module, context if context is not None else PassContext())
        else:  # a pass written as call(gm), before passes had a context
            result = self.call(graph_module)
        self.ensures(graph_module)
        return result

    def spec(self) -> str:
        """This pass as a spec item; options at their default value are left out."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            parts.append(f"{f.name}={_format_value(value)}")
        return self.name + ("{" + ",".join(parts) + "}" if parts else "")

    def __str__(self) -> str:
        return self.spec()


@functools.cache
def _takes_context(cls: type) -> bool:
    params = list(inspect.signature(cls.call).parameters.values())[1:]  # after self
    return len(params) >= 2 or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name`` in specs and on the CLI."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} is taken by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    """Pass name -> pass class, for every registered pass (a copy)."""
    return dict(sorted(_REGISTRY.items()))


def option_help(cls: type[Pass]) -> list[tuple[str, str, str, str]]:
    """(option, type, default, help) for every option of a pass class."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        aliases = f.metadata.get("aliases", {})
        shown = f.metadata.get("shown_default") or next((word for word, value in aliases.items() if value == default), _format_value(default))
        type_name = _type_name(hints[f.name]) + "".join(f" | {word}" for word in aliases)
        rows.append((f.name, type_name, shown, f.metadata.get("help", "")))
    return rows


# ---------------------------------------------------------------------------------------------
# Spec parsing


def _closest(word: str, choices) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside of ``{...}`` and ``[...]``; check that brackets balance."""
    parts, depth, start = [], [], 0
    pairs = {"{": "}", "[": "]"}
    for i, ch in enumerate(text):
        if ch in pairs:
            depth.append(pairs[ch])
        elif ch in "}]":
            if not depth or depth.pop() != ch:
                raise PipelineSpecError(f"unbalanced '{ch}' at position {i} in {text!r}")
        elif ch == sep and not depth:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise PipelineSpecError(f"missing '{depth[-1]}' in {text!r}")
    parts.append(text[start:])
    return parts


def parse_spec(spec: str) -> list[Pass]:
    """Parse a pipeline spec string into pass instances (see module docstring)."""
    text = "".join(spec.split())
    if not text:
        raise PipelineSpecError("empty pipeline spec; e.g. 'qci,csc' (see `qcd-fx passes`)")
    passes = []
    for item in _split_top(text):
        if not item:
            raise PipelineSpecError(f"empty pass name in {spec!r}")
        name, _, rest = item.partition("{")
        if rest and not rest.endswith("}"):
            raise PipelineSpecError(f"text after '}}' in {item!r}")
        body = rest[:-1] if rest else ""
        if name not in _REGISTRY:
            raise PipelineSpecError(f"unknown pass '{name}'{_closest(name, _REGISTRY)}; known: {', '.join(sorted(_REGISTRY))}")
        cls = _REGISTRY[name]
        kwargs = {}
        if body:
            hints = typing.get_type_hints(cls)
            fields = {f.name: f for f in dataclasses.fields(cls)}
            for opt in _split_top(body):
                key, eq, raw = opt.partition("=")
                if not eq or not key:
                    raise PipelineSpecError(f"pass '{name}': option {opt!r} is not KEY=VALUE")
                if key not in fields:
                    raise PipelineSpecError(
                        f"pass '{name}' has no option '{key}'{_closest(key, fields)}; options: {', '.join(fields)}"
                    )
                if key in kwargs:
                    raise PipelineSpecError(f"pass '{name}': option '{key}' given twice")
                kwargs[key] = _convert(raw, hints[key], fields[key], f"pass '{name}' option '{key}'")
        try:
            passes.append(cls(**kwargs))
        except PipelineSpecError:
            raise
        except (TypeError, ValueError) as e:
            raise PipelineSpecError(f"pass '{name}': {e}") from None
    return passes


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _convert(raw: str, tp: Any, field: dataclasses.Field, where: str) -> Any:
    aliases = field.metadata.get("aliases", {})
    if raw in aliases:
        return aliases[raw]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and raw.lower() in ("none", "null"):
            return None
        errors = []
        # lists go to the tuple member; scalars to the first scalar member that accepts them
        members = [a for a in args if a is not type(None)]
        if raw.startswith("["):
            members = [a for a in members if typing.get_origin(a) is tuple] or members
        else:
            members = [a for a in members if typing.get_origin(a) is not tuple] + [
                a for a in members if typing.get_origin(a) is tuple
            ]
        for member in members:
            try:
                return _convert(raw, member, field, where)
            except PipelineSpecError as e:
                errors.append(str(e))
        raise PipelineSpecError(errors[0] if errors else f"{where}: bad value {raw!r}")
    if origin is tuple:
        items = _split_top(raw[1:-1]) if raw.startswith("[") and raw.endswith("]") else [raw]
        inner = args[0] if args else str
        items = [i for i in items if i != ""]
        return tuple(_convert(i, inner, dataclasses.field(), where) for i in items)
    if raw.startswith("["):
        raise PipelineSpecError(f"{where} takes one {_type_name(tp)}, not a list {raw!r}")
    if origin is Literal:
        if raw not in args:
            raise PipelineSpecError(f"{where} must be one of {', '.join(map(str, args))}, not {raw!r}{_closest(raw, map(str, args))}")
        return raw
    if tp is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise PipelineSpecError(f"{where} must be true or false, not {raw!r}")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise PipelineSpecError(f"{where} must be an integer, not {raw!r}") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise PipelineSpecError(f"{where} must be a number, not {raw!r}") from None
    if tp is str:
        return raw
    raise PipelineSpecError(f"{where}: options of type {tp!r} cannot be given in a spec")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin is tuple:
        return f"[{_type_name(args[0]) if args else 'str'},...]"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    return str(value)
