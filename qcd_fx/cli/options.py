"""Options several commands take (Typer annotations)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ModelArg = Annotated[Optional[str], typer.Argument(help="torchvision:NAME, timm:NAME, package.module:factory, FILE.pt, FILE.pt2, or a Hugging Face save_pretrained directory / config.json", show_default=False)]
InputShapeOpt = Annotated[list[str], typer.Option("--input-shape", "-s", help="example input shape, e.g. 1,3,224,224 (repeat for several inputs)")]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", help="state dict (.safetensors, or .pt read with weights_only=True) for a factory/torchvision model")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="allow loading a pickled nn.Module (runs code from the file)")]
AllowOpt = Annotated[list[str], typer.Option("--allow", help="trust package PKG in saved GraphModules: its nn.Module classes (run with the file's attributes), any of its modules imported, its torch.fx.wrap leaf functions called")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks instead of one-line errors")]
CaptureOpt = Annotated[str, typer.Option("--capture", help="graph capture: auto (torch.fx, else torch.export), fx, or export (torch.export: Hugging Face models, models fx cannot trace)")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="example input dtype: float32, or int64 for token ids (drawn below the model's vocabulary size); default: int64 for transformers text models")]
