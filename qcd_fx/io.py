"""Loading models and saving/loading GraphModules, safely by default, with atomic writes.

Model sources (:func:`load_model`):

* ``torchvision:NAME`` — a torchvision classification model with ``weights=None`` (no download);
* ``package.module:factory`` — import and call ``factory()``; ``weights=`` loads a state dict
  from ``.safetensors`` or from a ``.pt`` read with ``torch.load(weights_only=True)``;
* ``FILE.pt`` — a GraphModule saved by :func:`save` (safe), or a whole pickled ``nn.Module``,
  which executes code from the file when loaded and therefore needs ``trust_pickle=True``.

The qcd-fx GraphModule format (:func:`save` / :func:`load`) is a ``torch.save`` of plain data
that ``torch.load(weights_only=True)`` reads without unpickling code; :mod:`qcd_fx.safe_graph`
holds its rules — what a graph may call, read and hold — and applies them on save and on load.
Graphs that break them are refused with an error naming the node or module, unless
``allow_pickle=True`` is given, which writes an ordinary pickled GraphModule instead.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from . import safe_graph
from .errors import ModelLoadError, ModelRunError, UnsafeLoadError, UsageError, first_line, require

FORMAT = safe_graph.FORMAT
DEFAULT_ALLOW = safe_graph.DEFAULT_ALLOW
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


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it onto ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


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
    _probe(path, directory, what)
    return path


def _probe(path: str, directory: str, what: str) -> None:
    """Create (and remove) a temporary file where ``path``'s would go: a location that cannot be
    written fails here, before any work, naming the user's path rather than a temporary one."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{os.path.basename(path)}", dir=directory)
    except OSError as e:
        raise UsageError(f"cannot write {what} {path!r}: {e.strerror or e}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


class OutputFiles:
    """Several output files, written all or none.

    :meth:`reserve` each path before the work: its temporary file is created beside it at once
    (a location that cannot be written fails then, naming the user's path). Write each output to
    the temporary path ``reserve`` returned; :meth:`commit` renames them all into place. Leaving
    the ``with`` block without ``commit`` (an error, an interrupt) removes every temporary file
    and leaves existing files as they were.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[str, str]] = []

    def reserve(self, path: str | os.PathLike, what: str = "output") -> str:
        path = os.fspath(path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{os.path.basename(path)}", dir=os.path.dirname(os.path.abspath(path)))
        except OSError as e:
            raise UsageError(f"cannot write {what} {path!r}: {e.strerror or e}") from None
        os.close(fd)
        self._pending.append((tmp, path))
        return tmp

    def commit(self) -> None:
        umask = os.umask(0)
        os.umask(umask)
        for tmp, path in self._pending:
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        self._pending.clear()

    def discard(self) -> None:
        for tmp, _ in self._pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._pending.clear()

    def __enter__(self) -> OutputFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


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
    if source.startswith(("torchvision:", "timm:")):
        kind, name = source.split(":", 1)
        model = _torchvision_model(name) if kind == "torchvision" else _timm_model(name)
        if weights:
            load_weights(model, weights)
        return model
    if _FACTORY_RE.match(source) and not os.path.exists(source):
        model = _factory_model(source)
        if weights:
            load_weights(model, weights)
        return model
    if _hf_config_path(source) is not None:
        if weights:
            raise UsageError("--weights does not apply to a Hugging Face directory (its weights are the directory's safetensors files)")
        return _hf_model(source)
    if weights:
        raise UsageError("--weights applies to a torchvision:NAME, timm:NAME or package.module:factory model, not to a model file")
    return load(source, trust_pickle=trust_pickle, allow=allow)


def _hf_config_path(source: str) -> str | None:
    """``config.json`` of a ``save_pretrained`` directory, or a bare ``config.json`` path."""
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, "config.json")):
        return os.path.join(source, "config.json")
    if os.path.basename(source) == "config.json" and os.path.isfile(source):
        return source
    return None


def _hf_model(source: str) -> nn.Module:
    """A transformers model from a ``save_pretrained`` directory (config + safetensors weights)
    or a bare ``config.json`` (random weights). No remote code runs (``trust_remote_code=False``),
    nothing is downloaded, and weights load only from safetensors (no pickle). Decoders are built
    with ``use_cache=False`` (a key/value cache is state torch.export cannot capture as input)."""
    require("transformers", "hf", "Hugging Face model directories")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config_path = _hf_config_path(source)
    directory = os.path.dirname(config_path) or "."
    try:
        config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{config_path!r} is not a transformers config: {type(e).__name__}: {first_line(e)}") from None
    if hasattr(config, "use_cache"):
        config.use_cache = False
    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        cls = transformers.AutoModel
    has_weights = os.path.isdir(source) and any(f.endswith(".safetensors") for f in os.listdir(directory))
    pickled = os.path.isdir(source) and any(f.endswith(".bin") for f in os.listdir(directory))
    try:
        if has_weights:
            model = cls.from_pretrained(directory, config=config, local_files_only=True, trust_remote_code=False, use_safetensors=True)
        elif pickled:
            raise ModelLoadError(f"{directory!r} holds only pickled weights (.bin); save them as safetensors (save_pretrained(..., safe_serialization=True))")
        else:
            model = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"transformers cannot build {names[0] if names else config.model_type!r} from {config_path!r}: {type(e).__name__}: {first_line(e)}") from None
    return model.eval()


def _timm_model(name: str) -> nn.Module:
    """A timm model with random weights (``pretrained=False``: nothing is downloaded)."""
    require("timm", "timm", "timm:NAME models")
    import timm

    names = timm.list_models()
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ModelLoadError(f"timm has no model '{name}'{hint}; see timm.list_models()")
    try:
        return timm.create_model(name, pretrained=False)
    except Exception as e:
        raise ModelLoadError(f"timm cannot build '{name}': {type(e).__name__}: {first_line(e)}") from None


def token_range(model: nn.Module) -> int | None:
    """The vocabulary size of a transformers text model (integer token inputs), else None."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "image_size", None) or getattr(config, "num_channels", None):
        return None
    vocab = getattr(config, "vocab_size", None)
    return int(vocab) if isinstance(vocab, int) and vocab > 0 else None


def input_shape_of(model: nn.Module, source: str) -> list[tuple[int, ...]] | None:
    """The default example input shape (batch 1) of a model from ``torchvision:``/``timm:`` or a
    transformers directory (16 tokens for text models, ``image_size`` for vision models)."""
    config = getattr(model, "config", None)
    if config is not None and _hf_config_path(source) is not None:
        if token_range(model):
            return [(1, 16)]
        size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", 3)
        if isinstance(size, int):
            return [(1, channels, size, size)]
        return None
    if source.startswith("torchvision:"):
        from .zoo import input_size

        size = input_size(source.split(":", 1)[1])
        return [(1, 3, size, size)]
    if source.startswith("timm:"):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size") or cfg.get("test_input_size")
        return [(1, *size)] if size else None
    return None


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


@contextlib.contextmanager
def cwd_importable(first: bool, only: Iterable[str] | None = None) -> Iterator[None]:
    """The current directory importable for the block, as ``python -m`` makes it: modules beside
    the user (``mymodels.py``) import the same way for ``module:factory``, a pickled file
    (``--trust-pickle``) and ``--allow mymodels``. ``first``: ahead of installed packages (a
    module the user named); else after them, so a file in the directory never shadows one.
    ``only``: just these top-level names come from the directory (a safe file's ``--allow``
    packages; nothing else it names can be picked up from there)."""
    cwd = os.getcwd()
    if only is not None:
        names = {n.split(".")[0] for n in only}
        finder = _DirectoryFinder(cwd, names)
        sys.meta_path.append(finder)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(finder)
        return
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd) if first else sys.path.append(cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


class _DirectoryFinder:
    """Finds the top-level modules ``names`` (and their submodules) in ``directory`` only."""

    def __init__(self, directory: str, names: set[str]):
        self.directory, self.names = directory, names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in self.names or "." in fullname:
            return None  # submodules are found through their package's __path__
        from importlib.machinery import PathFinder

        return PathFinder.find_spec(fullname, [self.directory])


def _factory_model(source: str) -> nn.Module:
    module_name, attr = source.split(":", 1)
    try:
        with cwd_importable(first=True):
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ModelLoadError(f"cannot import '{module_name}' for model {source!r}: {e}") from None
    except Exception as e:
        raise ModelLoadError(f"importing '{module_name}' failed: {type(e).__name__}: {e}") from e
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
        raise ModelLoadError(f"{what} {path!r} is corrupt or truncated ({first_line(e)})") from None
    except Exception as e:  # torch.load raises many types on junk input (KeyError, RuntimeError, …)
        msg = first_line(e)
        if "central directory" in msg or "zip archive" in msg or isinstance(e, EOFError):
            raise ModelLoadError(f"{what} {path!r} is truncated or corrupt (not a complete PyTorch file)") from None
        raise ModelLoadError(f"{what} {path!r} is not a PyTorch file ({msg})") from None


# ---------------------------------------------------------------------------------------------
# GraphModule save / load


INPUT_SHAPES_KEY = "qcd_fx_input_shapes"
"""``gm.meta`` key of the example input shapes a file was saved with (CLI default shapes)."""


def save(
    gm: GraphModule,
    path: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    input_shapes: list[list[int]] | None = None,
    allow: Iterable[str] = (),
) -> str:
    """Save ``gm`` atomically in the qcd-fx GraphModule format; returns ``"safe"`` or ``"pickle"``
    (or ``"pt2"``: a path ending in ``.pt2`` is written by :func:`save_pt2` for plain PyTorch).

    The rules of :func:`load` apply (see :mod:`qcd_fx.safe_graph`): a graph that calls, reads or
    holds what a safe file may not is refused with :class:`UsageError` naming the node or module,
    unless ``allow_pickle`` (then the GraphModule is pickled with ``torch.save``, and loading it
    needs ``trust_pickle``). ``allow``: extra packages, as for :func:`load`.
    ``input_shapes`` (example input shapes) are stored with the graph (in either format) and
    restored as ``gm.meta["qcd_fx_input_shapes"]`` on load, so the CLI needs no ``--input-shape`` for it.
    """
    if not isinstance(gm, GraphModule):
        raise TypeError(f"save expects a torch.fx.GraphModule, got {type(gm).__name__}")
    if os.fspath(path).endswith(".pt2"):
        save_pt2(gm, path, input_shapes=input_shapes)
        return "pt2"
    try:
        payload: Any = safe_graph.encode(gm, _policy(allow))
        if input_shapes is not None:
            payload["input_shapes"] = [[int(d) for d in shape] for shape in input_shapes]
        kind = "safe"
    except (safe_graph.Refused, safe_graph.Malformed) as e:
        if not allow_pickle:
            raise UsageError(f"cannot save the GraphModule in the safe format: {e}; allow a pickled file with --pickle (allow_pickle=True)") from None
        payload, kind = gm, "pickle"
    pickled_shapes = kind == "pickle" and input_shapes is not None
    if pickled_shapes:  # a plain attribute survives pickling (GraphModule drops gm.meta); load moves it back
        gm.__dict__[_PICKLED_SHAPES] = [[int(d) for d in shape] for shape in input_shapes]
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    finally:
        if pickled_shapes:
            del gm.__dict__[_PICKLED_SHAPES]
    return kind


def _placeholder_inputs(gm: GraphModule, input_shapes: list[list[int]] | None) -> tuple[torch.Tensor, ...]:
    """Example inputs for re-exporting ``gm``: the shapes and dtypes its placeholders recorded
    (``torch.export``'s ``val``, shape propagation's ``tensor_meta``), else ``input_shapes``
    (float). Floats are seeded N(0, 1); integers (token ids) zeros; bools ones."""
    gen = torch.Generator().manual_seed(0)
    out = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        meta = node.meta.get("val", node.meta.get("tensor_meta"))
        shape = getattr(meta, "shape", None)
        dtype = getattr(meta, "dtype", torch.float32)
        if shape is None and input_shapes is not None and i < len(input_shapes):
            shape = input_shapes[i]
        if shape is None:
            if node.args:  # an input with a default the model runs without
                break
            raise UsageError("saving as .pt2 re-exports the model and needs its input shapes: run it through transform with example inputs, or give --input-shape")
        shape = tuple(int(d) for d in shape)
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        elif dtype == torch.bool:
            out.append(torch.ones(shape, dtype=dtype))
        else:
            out.append(torch.zeros(shape, dtype=dtype))
    return tuple(out)


def _plain_outputs(value: Any, depth: int = 0) -> Any:
    """``value`` if its containers are all plain tuples, lists and dicts, else None."""
    if type(value) in (tuple, list):
        return value if all(_plain_outputs(v, depth + 1) is not None or v is None for v in value) else None
    if type(value) is dict:
        return value if all(_plain_outputs(v, depth + 1) is not None or v is None for v in value.values()) else None
    return value if isinstance(value, torch.Tensor) or value is None or isinstance(value, (int, float, bool)) else None


def _as_plain(value: Any) -> Any:
    """Output containers as plain dicts and tuples (a Hugging Face ``ModelOutput`` is an
    ``OrderedDict`` subclass; a named tuple a tuple): a .pt2 file whose output type needs a
    library registered with pytree would not load in plain PyTorch."""
    if isinstance(value, dict):
        return {k: _as_plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_as_plain(v) for v in value) if type(value) in (tuple, list) else tuple(_as_plain(v) for v in value)
    return value


class _PlainOutputs(nn.Module):
    def __init__(self, gm: GraphModule):
        super().__init__()
        self.model = gm

    def forward(self, *args: Any) -> Any:
        return _as_plain(self.model(*args))


def save_pt2(gm: GraphModule, path: str | os.PathLike, *, input_shapes: list[list[int]] | None = None) -> None:
    """Re-export ``gm`` with ``torch.export`` (eval mode, batch dimension dynamic where the model
    allows) and write it with ``torch.export.save``: plain PyTorch runs the file with
    ``torch.export.load(path).module()``, without qcd-fx installed. Inputs are positional; output
    containers of other libraries (a Hugging Face ``ModelOutput``) are written as plain dicts."""
    from .capture import _dynamic_shapes, _eval_mode, quiet

    args = _placeholder_inputs(gm, input_shapes)
    with _eval_mode(gm), quiet():
        try:
            with torch.no_grad():
                plain = _plain_outputs(gm(*args)) is not None
            model = gm if plain else _PlainOutputs(gm)
            try:
                dynamic = _dynamic_shapes(gm, args, {})
                ep = torch.export.export(model, args, dynamic_shapes=dynamic if plain else (dynamic,), strict=False)
            except Exception:
                ep = torch.export.export(model, args, strict=False)
        except Exception as e:
            raise ModelRunError(f"torch.export cannot re-export the model for {os.fspath(path)!r}: {type(e).__name__}: {first_line(e)}") from None
    with atomic_path(path) as tmp:
        torch.export.save(ep, tmp)


def _load_pt2(path: str) -> GraphModule:
    """A ``torch.export.save`` file as a GraphModule whose dropout and batch norm follow
    ``.train()``/``.eval()`` (see :mod:`qcd_fx.capture`)."""
    from .capture import _plain_graph_module

    if not os.path.isfile(path):
        raise ModelLoadError(f"model file {path!r} does not exist")
    try:
        ep = torch.export.load(path)
    except Exception as e:
        raise ModelLoadError(f"model file {path!r} is not a readable torch.export program ({type(e).__name__}: {first_line(e)})") from None
    gm = _plain_graph_module(ep.module(), "ExportedProgram")
    gm.eval()
    shapes = []
    for node in gm.graph.nodes:  # the example shapes it was exported with, symbolic sizes as 1
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            shapes.append(tuple(int(d) if isinstance(d, int) else 1 for d in val.shape))
    if shapes:
        gm.meta[INPUT_SHAPES_KEY] = shapes
    return gm


def load(path: str | os.PathLike, *, trust_pickle: bool = False, allow: Iterable[str] = ()) -> nn.Module:
    """Load a model file: a qcd-fx GraphModule (safe) or, with ``trust_pickle``, a pickled module.

    ``allow``: extra top-level package names whose module classes a file may use and whose
    ``torch.fx.wrap`` leaf functions its graph may call (besides ``torch``, ``torchvision`` and
    ``qcd_fx``). A file that breaks the format's rules (:mod:`qcd_fx.safe_graph`) raises
    :class:`UnsafeLoadError`; a truncated or inconsistent one :class:`ModelLoadError`.
    """
    path = os.fspath(path)
    if path.endswith(".pt2"):
        return _load_pt2(path)
    allow = [allow] if isinstance(allow, str) else list(allow)
    policy = _policy(allow)
    try:
        obj = _torch_load_safe(path, "model file")
    except UnsafeLoadError:
        if not trust_pickle:
            raise
        try:
            with cwd_importable(first=False):
                obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ModelLoadError(f"model file {path!r} could not be unpickled ({type(e).__name__}: {first_line(e)})") from None
        if not isinstance(obj, nn.Module):
            raise ModelLoadError(f"model file {path!r} holds {_describe_obj(obj)}, not a torch.nn.Module")
        shapes = obj.__dict__.pop(_PICKLED_SHAPES, None)
        if isinstance(obj, GraphModule) and shapes is not None:
            obj.meta[INPUT_SHAPES_KEY] = _input_shapes(shapes, path)
        return obj
    if isinstance(obj, dict) and obj.get("format") == safe_graph.FORMAT:
        try:
            with cwd_importable(first=False, only=allow):
                gm = safe_graph.decode(obj, policy)
        except safe_graph.Refused as e:
            raise UnsafeLoadError(f"model file {path!r} is refused: {e}") from None
        except safe_graph.Malformed as e:
            raise ModelLoadError(f"model file {path!r} is malformed: {e}") from None
        shapes = obj.get("input_shapes")
        if shapes:
            gm.meta[INPUT_SHAPES_KEY] = _input_shapes(shapes, path)
        return gm
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(
            f"model file {path!r} holds a state dict ({len(obj)} tensors), not a model; "
            "give the model's factory as package.module:factory and this file as --weights"
        )
    raise ModelLoadError(f"model file {path!r} holds {_describe_obj(obj)}, not a model")


_PICKLED_SHAPES = "_qcd_fx_input_shapes"


def _input_shapes(shapes: Any, path: str) -> list[tuple[int, ...]]:
    if not (isinstance(shapes, list) and all(isinstance(s, list) and all(type(d) is int and d > 0 for d in s) for s in shapes)):
        raise ModelLoadError(f"model file {path!r} is malformed: its input shapes are not lists of positive ints")
    return [tuple(s) for s in shapes]


def _policy(allow: Iterable[str]) -> safe_graph.Policy:
    if isinstance(allow, str):
        allow = [allow]
    try:
        return safe_graph.Policy(allow)
    except ValueError as e:
        raise UsageError(str(e)) from None


__all__ = [
    "FORMAT",
    "atomic_path",
    "atomic_write",
    "check_output_path",
    "load",
    "load_model",
    "load_weights",
    "read_state_dict",
    "save",
]
