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
