"""What an export did and measured: :class:`ExportReport` and its per-batch :class:`BatchParity`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

DEFAULT_ATOL = 1e-4

DEFAULT_RTOL = 1e-5


@dataclass
class BatchParity:
    """PyTorch vs onnxruntime on one batch of inputs."""

    batch: int | None  # size of the batch axis (None: inputs without one)
    max_abs: float  # max |onnxruntime - pytorch| over all outputs
    max_rel: float  # max over outputs of max_abs(output) / max |pytorch output|
    worst_output: str  # the output with the largest max_abs
    ok: bool
    inputs: str = "example"  # which inputs: "example", "batch N", or a variant of the example ("|x|", "-|x|", "10x")
    # when onnxruntime and PyTorch differ beyond the tolerance: both against a float64 run of
    # the model (max abs); the file passes if onnxruntime's error is at most twice PyTorch's own
    float64_torch: float | None = None
    float64_onnx: float | None = None


@dataclass
class ExportReport:
    """What :func:`export_onnx` did and measured."""

    path: str | None
    exporter: str  # "dynamo" or "torchscript" (fallback)
    opset: int
    nodes: int  # nodes of the main graph (plus those of local functions, if any)
    op_types: dict[str, int]
    domains: list[str]  # operator domains used; [""] means plain ONNX ops only
    file_bytes: int  # .onnx plus .onnx.data when weights are stored externally
    external_data: bool
    export_seconds: float  # torch.onnx.export itself
    total_seconds: float  # everything, checks included
    input_names: list[str]
    output_names: list[str]
    input_shapes: list[list[int | str]]  # as stored in the file; a str is a symbolic axis
    dynamic_batch: bool  # the file's batch axis is symbolic
    checked: bool
    checker_ok: bool | None = None  # onnx.checker.check_model passed (None: not checked)
    parity: list[BatchParity] = field(default_factory=list)
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step (see export_onnx)
    fallback_reason: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def max_abs(self) -> float | None:
        return max((p.max_abs for p in self.parity), default=None)

    @property
    def max_rel(self) -> float | None:
        return max((p.max_rel for p in self.parity), default=None)

    @property
    def ok(self) -> bool:
        return not self.checked or (bool(self.checker_ok) and all(p.ok for p in self.parity))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(max_abs=self.max_abs, max_rel=self.max_rel, ok=self.ok)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def summary(self) -> str:
        """One line for people."""
        size = f"{self.file_bytes / 1e6:.1f} MB" + (" (weights in .data)" if self.external_data else "")
        line = f"{self.exporter} exporter, opset {self.opset}, {self.nodes} nodes, {size}, export {self.export_seconds:.1f} s"
        if self.checked:
            batches = "/".join(str(p.batch) for p in self.parity if p.inputs == "example" or p.inputs.startswith("batch "))
            variants = [p.inputs for p in self.parity if p.inputs != "example" and not p.inputs.startswith("batch ")]
            sets = f"{len(self.parity)} input sets: batch {batches}" + "".join(f", {v}" for v in variants)
            line += f"; onnx.checker ok; onnxruntime vs PyTorch max abs {self.max_abs:.2g}, max rel {self.max_rel:.2g} ({sets})"
            judged = [p for p in self.parity if p.float64_onnx is not None]
            if judged:
                w = max(judged, key=lambda p: p.float64_onnx)
                line += (
                    f"; beyond tolerance, but against a float64 run onnxruntime's error is {w.float64_onnx:.2g} "
                    f"and PyTorch's own float32 error {w.float64_torch:.2g} (inputs {w.inputs})"
                )
        if self.fallback_reason:
            line += f"; dynamo exporter failed: {self.fallback_reason}"
        return line
