"""Graph passes over ``torch.fx.GraphModule`` and the pipeline that runs and verifies them."""

from .base import Pass, PassOutcome, option_help, parse_spec, register, registry
from .compression import CSC
from .interface import QCI
from .pipeline import Pipeline, TransformResult, transform
from .prune import CDGPrune

__all__ = [
    "CDGPrune",
    "CSC",
    "QCI",
    "Pass",
    "PassOutcome",
    "Pipeline",
    "TransformResult",
    "option_help",
    "parse_spec",
    "register",
    "registry",
    "transform",
]
