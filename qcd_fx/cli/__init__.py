"""The ``qcd-fx`` command line: a thin Typer layer over the public API.

Every expected failure prints one line (``error: ...``) and exits non-zero; ``--debug`` shows
the traceback instead. Outputs are validated before any work and written atomically.

:mod:`.app` holds the Typer app and what every command shares; each command lives in its own
module and registers itself on the app when imported here (commands never import this package).
"""

from . import transform, export, compress, optimize, train  # noqa: F401, I001 - register the commands (help lists them in this order)
from .app import app, main

__all__ = ["app", "main"]
