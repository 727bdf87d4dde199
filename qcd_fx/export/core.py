from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..analysis import eval_no_grad, tensor_leaves
from ..capture import quiet
from ..errors import ExportError, UsageError, first_line, require
from ..io import atomic_path
from .diagnose import _chain, _is_batch_constraint, _ort_failure, _ts_reason, _where_in_source, data_dependent, describe_failure
from .exporters import _capture_inputs, _dynamo_export, _torchscript_export
from .report import DEFAULT_ATOL, DEFAULT_RTOL, ExportReport
from .signature import _as_inputs, _second_batch, _value_variants, input_names, output_names
from .verify import FLOAT64_FACTOR, Float64Reference, _feed, compare_outputs, in_memory_weights, onnxruntime_session, weights_as_inputs
from .write import _PROTO_LIMIT, Pieces, _atomic_with_data, _cores, _directory, _initializer_bytes, _scratch_with_data, _Writer, serialized_pieces

ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")  # the `onnx` extra
_CHECKER_LIMIT = 1024  # initializers above this many bytes reach onnx.checker as typed inputs (see weights_as_inputs)


def _timed(timings: dict[str, float], key: str):
    @contextlib.contextmanager
    def block():
        t0 = time.perf_counter()
        try:
            yield
        finally:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0

    return block()


def export_onnx(
    gm: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike | None,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    check: bool = True,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    check_batch: int | None = None,
    fallback: bool = True,
    float64_factor: float = FLOAT64_FACTOR,
    verbose: bool = False,
) -> ExportReport:
    """Export ``gm`` to ONNX at ``path`` for inference and (``check``) verify it.

    Args:
        gm: a ``GraphModule`` (any ``nn.Module`` works); exported in eval mode, not modified.
        example_inputs: a tensor or tuple of tensors (positional inputs of ``forward``).
        path: the ``.onnx`` file to write (atomically); ``None`` exports and verifies without
            writing (a dry run). Weights beyond ~1.8 GB go to ``path + ".data"``.
        dynamic_batch: make axis 0 of every input whose axis 0 equals the first input's a
            symbolic ``batch`` axis.
        opset: ONNX opset (default: the exporter's, 20 for torch 2.14's dynamo exporter).
        check: run ``onnx.checker`` and compare onnxruntime with PyTorch on the example inputs,
            on a second batch size (``check_batch``, default batch + 1) and, for a file from
            the TorchScript fallback, on variants of the example with other signs and scales
            (all positive, all negative, ten times larger: a value-dependent branch traced one
            way shows up there; ``torch.export`` refuses such branches instead). A mismatch beyond ``atol``
            absolute *and* ``rtol`` relative to the output's magnitude is judged against a
            float64 run of the model: the file passes only if onnxruntime's error is at most
            ``float64_factor`` (2) times PyTorch's own float32 error (both numbers are in the
            report; 0 turns this judgement off); else it raises.
        fallback: if the dynamo exporter fails, try the TorchScript exporter — not when it
            failed because the result depends on a tensor's value (a trace would keep one branch),
            and the TorchScript trace is refused if it converts a tensor to a Python ``bool``.
        verbose: let torch's own logs and graph dumps through (the CLI's ``--debug``).

    Returns:
        An :class:`ExportReport`. ``timings`` holds seconds per step: ``reference`` (eager
        forwards), ``export``, ``serialize``, ``write``, ``checker``, ``session`` (onnxruntime
        session creation), ``onnxruntime`` (runs, added up over the threads that ran them) and
        ``compare``. ``write`` runs in a thread while the checks run; ``checker``, ``session``
        and ``onnxruntime`` in another while the reference forwards run, and the runs left when
        those are done are shared with it; ``write_wait`` and ``checks_wait`` are the waits.
        qcd-fx's own wall time is ``total_seconds - export_seconds``.

    Raises:
        ExportError: one line naming the unsupported operator and the node, or the mismatch.
    """
    require(ONNX_MODULES, "onnx", "ONNX export")
    import onnx

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    inputs = _as_inputs(example_inputs)
    if opset is not None and not (7 <= int(opset) <= onnx.defs.onnx_opset_version()):
        raise UsageError(f"opset {opset} is outside what this onnx supports (7..{onnx.defs.onnx_opset_version()})")
    if not (float64_factor >= 0 and math.isfinite(float64_factor)):
        raise UsageError(f"float64_factor must be a finite number >= 0, got {float64_factor}")
    if check_batch is not None and check_batch < 1:
        raise UsageError(f"check_batch must be >= 1, got {check_batch}")
    model_name = type(gm).__name__

    with eval_no_grad(gm):
        with _timed(timings, "reference"):
            try:
                reference = gm(*inputs)
            except Exception as e:
                raise ExportError(f"{model_name} fails on the example inputs before export: {describe_failure(e, gm)}") from e
        ref_leaves = tensor_leaves(reference)
        if not ref_leaves:
            raise ExportError(f"{model_name} returns no tensors; there is nothing to export")
        names_in = input_names(gm, len(inputs))
        names_out = output_names(reference)

        exporter, fallback_reason = "dynamo", None
        program = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _timed(timings, "export"):
                try:
                    with quiet(verbose):
                        program = _dynamo_export(gm, _capture_inputs(inputs, dynamic_batch), names_in, names_out, dynamic_batch, opset, timings)
                except ExportError:  # qcd-fx's own refusal (an unsupported onnxscript): no fallback
                    raise
                except Exception as e:
                    dynamo_error = e
                    reason = describe_failure(e, gm)
                    if _is_batch_constraint(e) and dynamic_batch:
                        raise ExportError(
                            f"the batch axis of {model_name}'s inputs cannot be dynamic ({first_line(_chain(e)[-1])}); export with a static batch (dynamic_batch=False, --static-batch)"
                        ) from e
                    value_dependent = data_dependent(e, gm)
                    if value_dependent is not None:
                        raise ExportError(
                            f"{model_name} cannot be exported faithfully: its result depends on a tensor's value {value_dependent}; "
                            "a traced ONNX file would keep only the path the example input takes (use torch.where or torch.cond there)"
                        ) from e
                    if not fallback:
                        raise ExportError(f"ONNX export of {model_name} failed: {reason}") from e
                    exporter, fallback_reason = "torchscript", reason
        warning_lines = sorted({first_line(str(w.message)) for w in caught})

        # Serialize once: the bytes feed the file, the checker and onnxruntime.
        external = False
        tmp_dir = None
        hollow_weights: frozenset[str] = frozenset()
        try:
            if program is not None:
                with _timed(timings, "serialize"):
                    weight_bytes = _initializer_bytes(program)
                    external = weight_bytes > _PROTO_LIMIT
                    proto = data = None
                    if not external:
                        # the file's bytes, and the graph without the large weights' bytes (for the checks)
                        data, hollow, hollow_weights = serialized_pieces(program.model, _CHECKER_LIMIT)
                        proto = onnx.load_model_from_string(hollow)
            else:
                tmp_dir = tempfile.mkdtemp(prefix=".qcd_fx_onnx.", dir=_directory(path))
                ts_path = os.path.join(tmp_dir, "model.onnx")
                with warnings.catch_warnings(record=True) as caught2, _timed(timings, "export"):
                    warnings.simplefilter("always")
                    try:
                        with quiet(verbose):
                            _torchscript_export(gm, inputs, names_in, names_out, dynamic_batch, opset, ts_path, verbose)
                    except Exception as e:
                        ts_reason = _ts_reason(e)
                        raise ExportError(
                            f"ONNX export of {model_name} failed: {fallback_reason}; the TorchScript exporter fails too ({ts_reason})"
                        ) from dynamo_error
                branch = next((w for w in caught2 if issubclass(w.category, torch.jit.TracerWarning) and "Python boolean" in str(w.message)), None)
                if branch is not None:
                    raise ExportError(
                        f"{model_name} cannot be exported faithfully: it branches on a tensor's value at {_where_in_source(branch.filename, branch.lineno)}; "
                        f"the TorchScript trace would keep only the branch the example input takes (the dynamo exporter failed: {fallback_reason})"
                    ) from dynamo_error
                warning_lines += sorted({first_line(str(w.message)) for w in caught2} - set(warning_lines))
                with _timed(timings, "serialize"):
                    if os.path.getsize(ts_path) > _PROTO_LIMIT or os.listdir(tmp_dir) != ["model.onnx"]:
                        raise ExportError(
                            f"the TorchScript exporter wrote {model_name} with external weights, which qcd-fx does not verify; reduce the model or fix the dynamo export ({fallback_reason})"
                        )
                    with open(ts_path, "rb") as f:
                        data = Pieces([f.read()])
                    proto = onnx.load_model_from_string(data.join())

            exported = _Serialized(program, proto, data, external, exporter, hollow_weights)
            checks = _CheckOptions(check, check_batch, atol, rtol, float64_factor)
            report = _write_and_check(exported, path, gm, inputs, reference, names_in, names_out, dynamic_batch, checks, timings)
        finally:
            if tmp_dir is not None:
                shutil.rmtree(tmp_dir, ignore_errors=True)

    report.fallback_reason = fallback_reason
    report.warnings = warning_lines
    report.total_seconds = time.perf_counter() - t_start
    return report


# ONNX operators whose values onnxruntime draws from its own generator (PyTorch's differ)
_RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"})


def _spare_cores() -> int:
    """Cores this process may use beyond PyTorch's intra-op threads, at least one: onnxruntime's
    check runs take those while PyTorch computes the reference outputs (both on every core made
    the two fight for them: PyTorch's forwards took ~1.7x longer on ViT-B/16)."""
    return max(1, _cores() - torch.get_num_threads())


def _values_stay_inputs() -> bool:
    """Whether the dynamo exporter captures with ``torch.export`` proper (non-strict, then
    strict), which refuses to turn a tensor's value into a Python value (a data-dependent
    branch or ``float(x.max())`` fails the export): its graphs cannot keep one example's values,
    so the sign/scale variants are not needed. torch's optional draft-export strategy
    specialises on the example's values; with it enabled (or unknown) the variants run."""
    try:
        from torch.onnx._internal.exporter._capture_strategies import CAPTURE_STRATEGIES
    except ImportError:
        return False
    return {s.__name__ for s in CAPTURE_STRATEGIES} <= {"TorchExportNonStrictStrategy", "TorchExportStrictStrategy"}


@dataclass(frozen=True)
class _Serialized:
    """What an exporter produced: the program (dynamo) or None, the proto (None with external
    weights), its bytes (None with external weights), and which exporter."""

    program: Any
    proto: Any
    data: Pieces | None  # the file's bytes
    external: bool
    exporter: str
    hollow: frozenset[str] = frozenset()  # initializers whose bytes ``proto`` leaves out (they are in ``data``)


@dataclass(frozen=True)
class _CheckOptions:
    check: bool
    check_batch: int | None
    atol: float
    rtol: float
    float64_factor: float


def _write_and_check(exported: _Serialized, path, gm, inputs, reference, names_in, names_out, dynamic_batch, checks: _CheckOptions, timings) -> ExportReport:
    program, proto, data, external, exporter = exported.program, exported.proto, exported.data, exported.external, exported.exporter
    check, check_batch, atol, rtol, float64_factor = checks.check, checks.check_batch, checks.atol, checks.rtol, checks.float64_factor
    import onnx

    with contextlib.ExitStack() as stack:
        # 1. write (to a temporary name beside the target; renamed only after the checks pass)
        target_for_checks: Pieces | str
        if path is None and not external:
            file_bytes = len(data)
            target_for_checks = data
        elif not external:
            tmp = stack.enter_context(atomic_path(path))
            # write in a thread while the checks below run on the bytes in memory (file writes
            # release the GIL); joined before the rename, or before the removal on failure
            writer = _Writer(tmp, data, timings)
            stack.callback(writer.join)
            file_bytes = len(data)
            target_for_checks = data
        else:
            onnx_tmp = stack.enter_context(_atomic_with_data(path) if path is not None else _scratch_with_data())
            with _timed(timings, "write"):
                program.save(onnx_tmp, external_data=True)
            file_bytes = sum(os.path.getsize(p) for p in (onnx_tmp, onnx_tmp + ".data") if os.path.exists(p))
            target_for_checks = onnx_tmp

        # 2. structure of the file
        if proto is None:  # external weights: the graph without them
            with _timed(timings, "serialize"):
                proto = onnx.load(target_for_checks, load_external_data=False)
        session_model = target_for_checks
        if check and data is not None:
            with _timed(timings, "serialize"):  # onnxruntime reads the large weights in place from the file's pieces
                session_model = (in_memory_weights(proto, data, exported.hollow) if exported.hollow else None) or data.join()
        graph = proto.graph
        initializer_names = {i.name for i in graph.initializer}
        checker_target = target_for_checks
        if data is not None:  # the weights live on in `data`: check the graph with them as typed inputs
            checker_target = weights_as_inputs(proto, _CHECKER_LIMIT, exported.hollow).SerializeToString()
        op_types: dict[str, int] = {}
        domains = set()
        for node in list(graph.node) + [n for fn in proto.functions for n in fn.node]:
            op_types[node.op_type] = op_types.get(node.op_type, 0) + 1
            domains.add(node.domain if node.domain != "ai.onnx" else "")
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        onnx_inputs = [i for i in graph.input if i.name not in initializer_names]
        shapes = [[d.dim_param if d.HasField("dim_param") else d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx_inputs]
        dynamic = [bool(s) and isinstance(s[0], str) for s in shapes]
        report = ExportReport(
            path=None if path is None else os.fspath(path),
            exporter=exporter,
            opset=opset,
            nodes=len(graph.node) + sum(len(fn.node) for fn in proto.functions),
            op_types=dict(sorted(op_types.items())),
            domains=sorted(domains),
            file_bytes=file_bytes,
            external_data=external,
            export_seconds=timings.get("export", 0.0),
            total_seconds=0.0,
            input_names=[i.name for i in onnx_inputs],
            output_names=[o.name for o in graph.output],
            input_shapes=shapes,
            dynamic_batch=any(dynamic),
            checked=check,
            timings=timings,
            atol=atol,
            rtol=rtol,
        )
        random_node = next((n for n in graph.node if n.op_type in _RANDOM_OPS), None)
        if check and random_node is not None:
            raise ExportError(
                f"the exported {type(gm).__name__} draws random numbers ({random_node.op_type} at node '{random_node.name}'); "
                "onnxruntime's draws differ from PyTorch's, so its outputs cannot be checked against PyTorch's; "
                "export with check=False (--no-check) to write it unchecked; the file was not written"
            )
        if len(onnx_inputs) != len(inputs):
            raise ExportError(
                f"the ONNX model takes {len(onnx_inputs)} inputs, {type(gm).__name__} {len(inputs)}; non-tensor or unused inputs cannot be exported"
            )
        if dynamic_batch and not any(dynamic):
            raise ExportError(
                f"the exporter made the batch axis of {type(gm).__name__} static; export with a static batch (dynamic_batch=False, --static-batch)"
            )

        # 3. checks. The inputs of every check are known up front; onnx.checker, the onnxruntime
        # session and onnxruntime's runs (native code, without the GIL) go to a thread while
        # PyTorch computes the reference outputs here; then the outputs are compared in order
        if check:
            candidates = [("example", inputs, False)]  # (label, inputs, skipped if PyTorch fails on them)
            batch = inputs[0].shape[0] if inputs[0].dim() >= 1 else None
            if any(dynamic) and batch is not None:
                b2 = check_batch or batch + 1
                if b2 != batch:
                    candidates.append((f"batch {b2}", _second_batch(inputs, dynamic, b2), False))
            if exporter != "dynamo" or not _values_stay_inputs():  # a trace can bake a value in; torch.export cannot
                candidates += [(label, variant, True) for label, variant in _value_variants(inputs)]
            background = _OnnxChecks(checker_target, session_model, [c[1] for c in candidates], timings)
            stack.callback(background.stop)
            try:
                batches = [(0, "example", inputs, tensor_leaves(reference))]
                for i, (label, batch_inputs, optional) in enumerate(candidates[1:], 1):
                    with _timed(timings, "reference"):
                        try:
                            expected = tensor_leaves(gm(*batch_inputs))
                        except Exception:  # PyTorch itself cannot take these values: nothing to compare
                            if not optional:
                                raise
                            continue
                    batches.append((i, label, batch_inputs, expected))
            except BaseException:
                background.stop()
                background.outputs(gm, proto)  # a rejected file is reported first, as if checked first
                raise
            ort_outputs = background.outputs(gm, proto)
            report.checker_ok = True
            exact = Float64Reference(gm)
            for i, label, batch_inputs, expected in batches:
                got = ort_outputs[i]
                if isinstance(got, BaseException):
                    if label.startswith("batch "):  # runs on the example's batch only: a size was fixed in the graph
                        raise ExportError(
                            f"onnxruntime runs the exported {type(gm).__name__} on the example's batch but fails on {label}: "
                            f"{_ort_failure(got, proto, gm)}; the {report.exporter} exporter fixed the batch size inside the graph, "
                            "export with a static batch (dynamic_batch=False, --static-batch); the file was not written"
                        ) from got
                    raise ExportError(f"onnxruntime fails to run the exported {type(gm).__name__}: {_ort_failure(got, proto, gm)}") from got
                with _timed(timings, "compare"):
                    b = batch_inputs[0].shape[0] if batch_inputs[0].dim() >= 1 else None
                    parity = compare_outputs(got, expected, report.output_names, atol, rtol, b)
                    parity.inputs = label
                if not parity.ok and float64_factor > 0:
                    with _timed(timings, "float64"):
                        errors = exact.errors(batch_inputs, got, expected)
                    if errors is not None:
                        parity.float64_torch, parity.float64_onnx = errors
                        parity.ok = errors[1] <= max(float64_factor * errors[0], atol)
                report.parity.append(parity)
                if not parity.ok:
                    where = "the example inputs" if label == "example" else f"inputs {label}"
                    judged = (
                        f"; against a float64 run onnxruntime's error is {parity.float64_onnx:.3g}, PyTorch's own {parity.float64_torch:.3g}"
                        if parity.float64_onnx is not None
                        else ""
                    )
                    raise ExportError(
                        f"onnxruntime output '{parity.worst_output}' differs from PyTorch by {parity.max_abs:.3g} "
                        f"(relative {parity.max_rel:.3g}; tolerance {atol:g} absolute or {rtol:g} relative) on {where} (batch {b}){judged}; the file was not written"
                    )
    return report


class _OnnxChecks:
    """``onnx.checker`` on ``checker_target``, an onnxruntime session for ``model`` (bytes, a path
    or :class:`InMemoryWeights`) and its run on each of ``batches`` (input tuples), in a
    background thread that starts at once; the caller joins in with :meth:`outputs` when its own
    work (PyTorch's reference forwards) is done: the runs nobody has started yet are then taken
    by both threads, largest first (onnxruntime's ``run`` may be called from several threads;
    each call computes on its own thread). :meth:`outputs` returns one entry per batch — the
    outputs, or the exception onnxruntime raised on it — or raises the one-line
    :class:`ExportError` for a rejected file. ``timings["checker"]``, ``["session"]`` and
    ``["onnxruntime"]`` are seconds of work (the runs of both threads added up; they overlap the
    reference forwards); ``["checks_wait"]`` is the caller's wait for the session and for the
    runs it did not take."""

    def __init__(self, checker_target, model, batches: list[tuple], timings: dict[str, float]):
        self.timings = timings
        self.batches = batches
        self.results: list = [None] * len(batches)
        # largest first: the thread starts on the longest run, the caller takes what is left
        self.order = sorted(range(len(batches)), key=lambda i: -sum(t.numel() for t in batches[i]))
        self.taken = 0
        self.lock = threading.Lock()
        self.session = None
        self.failure: tuple[str, BaseException] | None = None
        self.stopping = threading.Event()
        self.started = threading.Event()  # the session exists, or making it failed
        self.thread = threading.Thread(target=self._run, args=(checker_target, model), name="qcd_fx-onnx-checks", daemon=True)
        self.thread.start()

    def _run(self, checker_target, model) -> None:
        import onnx

        stage = "checker"
        try:
            with _timed(self.timings, "checker"):
                onnx.checker.check_model(checker_target, full_check=True)
            stage = "session"
            with _timed(self.timings, "session"):
                # it runs beside PyTorch's forwards: the cores PyTorch's threads leave (at least one);
                # for a few runs, repacking the weights at the start costs more than it saves (ViT-B/16
                # after qci,csc: 0.8 s more to start, 0.15 s less per image)
                self.session = onnxruntime_session(model, threads=_spare_cores(), spinning=False, prepack=False)
        except BaseException as e:  # re-raised by outputs()
            self.failure = (stage, e)
            return
        finally:
            self.started.set()
        self._take_runs()

    def _take_runs(self) -> None:
        session = self.session
        while True:
            with self.lock:
                if self.stopping.is_set() or self.taken == len(self.order):
                    return
                i = self.order[self.taken]
                self.taken += 1
            t0 = time.perf_counter()
            try:
                self.results[i] = session.run(None, _feed(session, self.batches[i]))
            except Exception as e:  # reported when its batch is compared
                self.results[i] = e
            with self.lock:
                self.timings["onnxruntime"] = self.timings.get("onnxruntime", 0.0) + time.perf_counter() - t0

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.session = None

    def outputs(self, gm, proto) -> list:
        with _timed(self.timings, "checks_wait"):
            self.started.wait()
        if self.session is not None:
            self._take_runs()  # beside the thread
        with _timed(self.timings, "checks_wait"):
            self.thread.join()
        self.session = None
        if self.failure is not None:
            stage, e = self.failure
            if stage == "checker":
                raise ExportError(f"onnx.checker rejects the exported {type(gm).__name__}: {first_line(e)}") from e
            raise ExportError(f"onnxruntime cannot load the exported {type(gm).__name__}: {_ort_failure(e, proto, gm)}") from e
        return self.results
