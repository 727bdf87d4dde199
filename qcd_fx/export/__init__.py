"""ONNX export for inference, verified against onnxruntime.

:func:`export_onnx` exports a module (normally a qcd-fx ``GraphModule``) with
``torch.onnx.export(..., dynamo=True)``, writes the file atomically and, with ``check=True``
(the default), proves the file before it is renamed into place:

* ``onnx.checker.check_model`` on the serialized model;
* one onnxruntime ``CPUExecutionProvider`` session, run on the example inputs and on a second
  batch size (which proves the dynamic batch axis), compared with PyTorch eager outputs of the
  same module in eval mode: every output must match within ``atol`` (1e-4) absolute or within
  ``rtol`` (1e-5) relative to the output's largest magnitude (random-init models such as
  Inception-v3 have outputs in the thousands, where float32 rounding alone exceeds 1e-4).

A failed export or a failed check raises :class:`~qcd_fx.errors.ExportError` with one line
(the unsupported operator and the graph node it came from, or the output that differs) and
leaves no file behind.

Exporters. The dynamo exporter (``torch.onnx.export(dynamo=True)``, the default since torch
2.9) is used first. Only if it fails, and ``fallback=True``, the deprecated TorchScript exporter
is tried; the report's ``exporter`` says which one produced the file and ``fallback_reason``
why the dynamo exporter did not. (A GraphModule needs explicit ``input_names``/``output_names``
for the TorchScript exporter's ``dynamic_axes`` — without them it fails with
``'Graph' object has no attribute 'outputs'`` — so both exporters get the same names.)

Names. Inputs are named after the module's ``forward`` parameters (the GraphModule's
placeholders, e.g. ``x``); outputs after their position in the returned structure: a single
tensor is ``output``, a tuple ``output_0, output_1, …``, a dict uses its keys (``logits``,
``aux``), nested structures join the keys with ``_``.

Dynamic batch. Axis 0 of the inputs becomes the symbolic ``batch`` axis. ``torch.export``
specialises sizes 0 and 1, so from a batch-1 example some models (ConvNeXt) cannot get a
dynamic batch axis; a batch-1 example is therefore captured with a batch of 2 (parity is still
checked on the caller's batch and on another). A model whose batch really is fixed gets an
error that says so; export it with ``dynamic_batch=False``.

Where the time goes: ``benchmarks/onnx_export.py`` measures every phase — torch's
(function registry, ``torch.export`` capture, decomposition, translation, onnxscript optimizer)
and qcd-fx's own (serialize, write, checker, onnxruntime session and runs, reference forwards);
results in ``benchmarks/results/onnx_export.json`` and the README. The model is serialized once,
as pieces: the graph's framing and views of the weights' own memory (copied, by several threads,
only where it is laid out otherwise, e.g. transposed); joined, byte for byte what
``model_proto.SerializeToString()`` gives (see :func:`.write.serialize_model`). The pieces feed
the file and onnxruntime's check session, which reads the weights in place (nothing is joined or
re-read from disk); the checker gets the graph with the large weights as typed inputs. The file
is written in a thread while the checks run; ``onnx.checker``, the onnxruntime session and
onnxruntime's runs go to another while PyTorch computes the reference outputs, and the runs not
started by then are shared by both threads (the outputs are compared in order afterwards). What remains is the checks themselves: PyTorch and onnxruntime each run the example
and a second batch size (and three value variants on a TorchScript file), and onnxruntime builds
its session from the full weights.
One exporter cost is cut here: onnxscript's ``SlicesSplit`` rewrite costs O(nodes^2) even on
graphs without ``Slice`` nodes; it is skipped where it cannot match. And one exporter defect is
avoided: onnxscript's ``x + 0 -> x`` rewrite matches ``x + 1e-8``, deleting the seed's epsilon
(see :mod:`qcd_fx.export.rewrites`).

Modules: :mod:`.core` (:func:`export_onnx`), :mod:`.exporters` (the two exporters),
:mod:`.rewrites` (onnxscript's rules), :mod:`.signature` (input/output names, batches),
:mod:`.diagnose` (one-line failures), :mod:`.verify` (onnxruntime parity), :mod:`.run` (latency
and parity of a file), :mod:`.write`
(atomic writes), :mod:`.report`.
"""

from ..analysis import interleaved_latency
from .core import export_onnx
from .diagnose import describe_failure
from .report import DEFAULT_ATOL, DEFAULT_RTOL, BatchParity, ExportReport
from .run import OnnxRun, run_onnx
from .signature import input_names, output_names
from .verify import compare_outputs, onnxruntime_session

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "BatchParity",
    "ExportReport",
    "OnnxRun",
    "compare_outputs",
    "describe_failure",
    "export_onnx",
    "input_names",
    "interleaved_latency",
    "onnxruntime_session",
    "output_names",
    "run_onnx",
]
