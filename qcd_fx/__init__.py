"""qcd-fx: torch.fx passes, optimizers and ONNX export built from the qcd seeds, measured honestly.

Public API::

    gm = qcd_fx.trace(model)
    result = qcd_fx.transform(model, "qci,csc", example_inputs=(x,))
    result.graph_module, result.report
    qcd_fx.Pipeline.parse("qci{min_width=64}")
    qcd_fx.passes.registry()
    qcd_fx.save(result.graph_module, "model.qcd.pt"); qcd_fx.load("model.qcd.pt")
"""

from . import measures, nn, passes
from .errors import QcdFxError
from .io import load, save
from .passes import Pipeline, TransformResult, transform
from .tracing import trace

__version__ = "0.1.0"

__all__ = [
    "Pipeline",
    "QcdFxError",
    "TransformResult",
    "load",
    "save",
    "measures",
    "nn",
    "passes",
    "trace",
    "transform",
]
