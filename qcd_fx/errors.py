"""Named errors. Every expected failure is a :class:`QcdFxError` whose message is one line that
names the input and, where there is one, the fix; the CLI prints it and exits non-zero."""

from __future__ import annotations

import re


def first_line(e: BaseException | str) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # terminal colour codes (torch.export's messages)
    return text.splitlines()[0].strip() if text else (type(e).__name__ if isinstance(e, BaseException) else "")


class QcdFxError(Exception):
    """Base class of the errors qcd-fx raises on purpose (bad input, failed checks)."""

    exit_code = 1


class UsageError(QcdFxError):
    """A bad option, flag combination or path given by the user."""

    exit_code = 2


class ModelLoadError(QcdFxError):
    """A model source that cannot be loaded (missing, corrupt, not a model, unsafe)."""


class UnsafeLoadError(ModelLoadError):
    """Loading would execute code from the file (a pickle) and the user did not allow it."""


class TraceError(QcdFxError):
    """torch.fx cannot trace the model."""


class PipelineSpecError(UsageError):
    """A pipeline spec string names an unknown pass or option, or has a bad value."""


class InputShapeError(QcdFxError):
    """The example inputs do not fit the model."""


class ModelRunError(QcdFxError):
    """The model fails on the example inputs for a reason other than their shapes."""


class PassError(QcdFxError):
    """Base of the errors a pass raises; names the pass and, where known, the node."""

    def __init__(self, pass_name: str, message: str, node: str | None = None):
        self.pass_name = pass_name
        self.node = node
        where = f" at node '{node}'" if node else ""
        super().__init__(f"pass '{pass_name}'{where}: {message}")


class PreconditionError(PassError):
    """The graph does not meet what a pass requires."""


class PostconditionError(PassError):
    """A pass left a graph that fails verification (lint, shapes, numerics)."""


class ExportError(QcdFxError):
    """ONNX export failed or the exported file does not match PyTorch."""


class TrainingError(QcdFxError):
    """Training failed (e.g. the loss became non-finite)."""


class MissingExtraError(QcdFxError):
    """An optional dependency (a ``qcd-fx[extra]``) is not installed."""


def require(modules: str | tuple[str, ...], extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` naming the ``pip install`` line if a module of ``modules``
    cannot be found — before any work, without importing it."""
    import importlib.util

    for module in (modules,) if isinstance(modules, str) else modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingExtraError(f"{what} needs {module}, which is not installed: pip install 'qcd-fx[{extra}]'")


class OutOfMemoryError(QcdFxError):
    """An allocation failed: the inputs or the model need more memory than there is."""


_ALLOC_PATTERNS = (
    re.compile(r"(?:tried to allocate|allocate memory: you tried to allocate) (\d+) bytes", re.I),
    re.compile(r"Tried to allocate ([\d.]+) ([KMGT]i?B)", re.I),
)


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is a failed allocation (Python's, PyTorch's CPU or CUDA allocator)."""
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "alloc_cpu" in text or "can't allocate memory" in text or "out of memory" in text.lower() or "DefaultCPUAllocator" in text
    )


def allocation_size(e: BaseException) -> str:
    """`` (12.3 GB)`` when the allocator's message says how much it tried, else empty."""
    text = str(e)
    m = _ALLOC_PATTERNS[0].search(text)
    if m:
        return f" ({int(m.group(1)) / 1e9:.3g} GB)"
    m = _ALLOC_PATTERNS[1].search(text)
    return f" ({m.group(1)} {m.group(2)})" if m else ""
