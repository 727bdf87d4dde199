"""qcd-fx: torch.fx passes, optimizers and ONNX export built from the qcd seeds, measured honestly.

Public API::

    gm = qcd_fx.trace(model)                                   # torch.fx
    gm = qcd_fx.trace(model, (x,), capture="export")          # torch.export (Hugging Face, untraceable models)
    result = qcd_fx.transform(model, "qci,csc", example_inputs=(x,))
    result.graph_module, result.report
    qcd_fx.Pipeline.parse("qci{min_width=64}")
    qcd_fx.passes.registry()
    qcd_fx.save(result.graph_module, "model.qcd.pt"); qcd_fx.load("model.qcd.pt")
    qcd_fx.save(result.graph_module, "model.pt2")             # torch.export.save: plain PyTorch loads it
    report = qcd_fx.export_onnx(result.graph_module, (x,), "model.onnx")   # needs the [onnx] extra
"""

from . import measures, nn, passes
from .errors import QcdFxError
from .export import ExportReport, export_onnx
from .io import load, save
from .passes import Pipeline, TransformResult, transform
from .tracing import trace

__version__ = "0.1.0"

__all__ = [
    "ExportReport",
    "Pipeline",
    "QcdFxError",
    "TransformResult",
    "export_onnx",
    "load",
    "save",
    "measures",
    "nn",
    "passes",
    "trace",
    "transform",
]
