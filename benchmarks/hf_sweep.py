"""Every Hugging Face transformers model family through qcd-fx's torch.export front end (capture,
identity QCI, cdg-prune, ONNX), and Torch-Pruning side by side.

**Which models.** A family is a ``model_type`` of transformers' configuration registry
(``transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES``: ``bert``, ``gpt2``,
``llama``, ``vit``, …, also the ``*_text_model`` / ``*_vision_model`` halves some multimodal
families register). Per family, one model built from a small configuration with random weights
(nothing downloaded). ``--models a,b`` runs those model types, ``--limit N`` the first N families
in alphabetical order; the plan of every family (head class, input, parameters) is stored in
``meta.selection``.

**How each model is built.** ``AutoConfig.for_model(model_type, **small)``, where ``small`` sets
the attributes the default configuration has: width (``hidden_size`` / ``d_model`` / ``n_embd``
/ ``dim`` / ``embed_dim``) 32, heads (``num_attention_heads`` / ``n_head`` /
``encoder_attention_heads`` / ``decoder_attention_heads``) 4, ``num_key_value_heads`` 2,
``head_dim`` 8, FFN (``intermediate_size`` / ``ffn_dim`` / ``n_inner`` / ``encoder_ffn_dim`` /
``decoder_ffn_dim``) 64, layers (``num_hidden_layers`` / ``n_layer`` / ``encoder_layers`` /
``decoder_layers``) 2, ``vocab_size`` 100, ``max_position_embeddings`` 64, ``image_size`` 32,
``patch_size`` 8, ``use_cache=False``, and for mixtures of experts 4 experts
(``num_experts`` / ``num_local_experts`` / ``n_routed_experts``), 2 per token, expert FFN
(``moe_intermediate_size``) 64, one expert group (``n_group`` / ``topk_group``); every special
token id (``*_token_id``, ``*_token_index``) of 100 or more becomes 99. Where a configuration's
validation refuses a value it is relaxed once: ``num_key_value_heads`` = heads, one expert per
token, ``layer_types`` cut to the 2 layers. The width is the smallest multiple of 32 that a
list of per-stage head counts divides (Swin's [3, 6, 12, 24]: 48). The configuration's own
``__init__`` derives the rest (a ``head_dim`` it computes, per-layer ``layer_types``). A
composite configuration (``sub_configs``: ``text_config``, ``vision_config``, …) gets each
sub-configuration rebuilt from its class's defaults with the same rules; where that does not
build the family is recorded as skipped ("composite config: …"). The head class is the family's
entry in ``AutoModelForCausalLM``'s mapping, else ``AutoModelForSequenceClassification``'s, else
``AutoModelForImageClassification``'s, else ``AutoModel``'s (``head`` in the row). The input is
the model's ``main_input_name``, passed positionally (it must be ``forward``'s first
parameter): ``input_ids`` int64 (2, 16) from a seeded generator in [0, 99) (99, where the special
ids were moved, stays out of the input, so a multimodal model's image or audio placeholder token
does not appear); ``pixel_values`` float (2, num_channels, side, side), side the configuration's
``image_size`` when it is an int, else 32; audio and video inputs (``input_values``,
``input_features``, ``pixel_values_videos``) float, the first of a few candidate shapes the eager
model runs on (``signal_shapes``: waveforms of 1,600 or 16,000 samples, with or without a
channel axis; spectrograms with the bins the configuration names, 64 or 160 frames or its own
length, in either layout; 2 to 16 video frames); any other input is skipped ("unsupported input").
``torch.manual_seed(0)`` before construction, eval mode. A family still above 100 M parameters
after shrinking (fixed-size parts the rules do not reach) is skipped ("too large"). The plan (configuration, head class,
input, parameter count) is made in the parent on the ``meta`` device (no memory, no weights);
the model is built for real, and run once in eager mode, in each child ("build" fails there).

**The main output** (for equality and shape checks): ``logits`` of the output, else
``last_hidden_state``, else its first tensor leaf. MACs are ``torch.utils.flop_counter``'s
(``qcd_fx.analysis.count_macs``), ratios base / after. *Linear* MACs: the counter's ``aten.mm``
and ``aten.addmm`` entries (the Linear layers); *matmul* MACs add ``aten.bmm`` and
``aten.linear`` (attention products written as ``matmul``; the CPU scaled-dot-product attention
kernel is not in the counter at all). Base counts are of the eager model.

**Per model, qcd-fx** (one child process): 1. capture: ``qcd_fx.trace(model, x,
capture="export")`` (ok, seconds, ``gm.meta["capture"].describe()``, whether the main output of
``gm(x)`` equals eager bit for bit, both run from the same random state:
``qcd_fx.analysis.same_random_draws``, as the pipeline's checks do); 2. ``qcd_fx.transform(model, "qci", example_inputs=x,
capture="export")``: exact = ``report.passes[0].drift_abs == 0``, ``gates`` from the pass's
stats; when the pass refuses full-rank gates that cannot fit in memory (a vocabulary-wide head),
``qci{rank=16}``, as its message advises (``spec`` and ``full_rank_refused`` in the row); 3. ``cdg-prune{ratio=0.5,criterion=l1}`` (weight magnitudes, no calibration forwards),
also with ``capture="export"``: valid = the pruned module runs, every output keeps its shape and
is finite (unless the eager model's own output is not: ``eager_finite``); MACs and params ratios (``report.baseline`` / ``report.final``), linear and matmul
MACs ratios, pass and wall time, the first 3 notes, frozen-channel and skip reasons, the
report's warnings; 4. ONNX of the pruned module: ``qcd_fx.export_onnx(gm, (x,), None)`` (dry
run, parity checked in onnxruntime): ok / max abs, or the one-line error.

**Per model, Torch-Pruning** (another child process; same model, weights and input, on a deep
copy): ``tp.pruner.MagnitudePruner`` with ``tp.importance.MagnitudeImportance(p=1)``,
``pruning_ratio=0.5``, one step, ``output_transform`` = the main output, ``ignored_layers`` = the
output head (``model.get_output_embeddings()``, else a ``classifier`` / ``score`` attribute),
and its Hugging Face examples' attention handling (``examples/transformers/prune_hf_bert.py``,
``prune_hf_vit.py``): ``num_heads`` maps the q/k/v Linear children (``query``/``key``/``value``,
``q_proj``/``k_proj``/``v_proj``, ``q``/``k``/``v``, ``q_lin``/``k_lin``/``v_lin``) of every
module with an int ``num_heads`` or ``num_attention_heads`` (``num_key_value_heads`` for k and v
where the module has it); after ``step()`` those attributes are set from ``pruner.num_heads``
and the head size (``attention_head_size`` / ``head_dim``) and ``all_head_size`` from the pruned
``q`` Linear, as the examples do. Attention modules that keep their head counts only in
``config`` (Llama-style) are not mapped: the basic recipe. Recorded: time (dependency graph +
step), whether the pruned model runs with the same output shapes, MACs, linear MACs and params
ratios (``torch.utils.flop_counter``), or the one-line error.

**Order.** The qcd-fx child of every family runs first, then the Torch-Pruning children of the
families that were built (its dependency grouping spins until the cap on many decoders), so an
interrupted sweep holds the qcd-fx results; ``tp_pending`` counts the families still waiting.
``--jobs N`` measures N families at a time (default 1). ``--no-tp`` stops after the qcd-fx
children (the Torch-Pruning phase waits for a later ``--resume``).

**Isolation.** Each child is killed past ``--time-cap`` seconds (default 120, each child
separately; ``--tp-time-cap`` for the Torch-Pruning children) or ``--mem-cap`` GiB of resident memory, and
its data segment is limited to the same (``RLIMIT_DATA``: an allocation beyond it fails in the
child, and qcd-fx's ``qci`` sees the limit and refuses full-rank gates that would not fit; rows
measured before this limit existed have no ``time_cap_s``); a child writes its row after every step, so
a step that hangs or crashes the process costs that step only (its ``error`` says so). qcd-fx is
imported from the working tree by every child; ``qcd_fx_source`` in a row is a hash of the
package's sources that child saw (the tree may change during a long sweep).

**Summary.** Counts (families, built, captured, capture exact, QCI exact, pruned validly,
>= 1.8x MACs, >= 1.8x linear MACs, ONNX ok, Torch-Pruning runs), medians, the families whose
qcd-fx steps fail grouped by first failing step with the reason (``failing_by_step``; a family
that does not build is under ``build``), the valid prunings below 1.8x MACs with their notes, and
qcd-fx against Torch-Pruning (MACs ratio more than 5 % apart, both valid).

Writes ``benchmarks/results/hf_sweep.json`` (``--out``: a path prefix, ``.json`` appended; an
existing directory gets ``hf_sweep.json`` inside). The file is rewritten after every model with
``meta.complete = false`` until the sweep ends; ``--resume`` keeps the rows already there (and
the stored plans) and runs the rest; ``--redo a,b`` drops those families' rows and plans first
(``meta.redone`` lists them).

    python benchmarks/hf_sweep.py                          # every family (hours on 2 busy cores)
    python benchmarks/hf_sweep.py --resume                 # continue an interrupted sweep
    python benchmarks/hf_sweep.py --resume --redo canine   # ... measuring these families again
    python benchmarks/hf_sweep.py --resume --redo canine --no-tp   # ... qcd-fx only
    python benchmarks/hf_sweep.py --resume --tp-time-cap 30 --jobs 2   # the Torch-Pruning phase, 30 s per model
    python benchmarks/hf_sweep.py --models bert,llama,vit --out /tmp/hfs
    python benchmarks/hf_sweep.py --smoke --out /tmp/hfs   # bert + gpt2, 60 s cap (tests)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import warnings

import torch
from timm_sweep import MAX_NOTES, STOP, Recorder, _median, _top, git_commit, leaves, macs_of, one_line, run_all, same_shapes, spawn_child
from timm_sweep import versions as _versions

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC_QCI = "qci"
SPEC_QCI_LOW_RANK = "qci{rank=16}"  # when full-rank gates cannot fit (the error says so), what it tells the user to run
SPEC_PRUNE = "cdg-prune{ratio=0.5,criterion=l1}"
SMOKE = ("bert", "gpt2")
BATCH, TOKENS = 2, 16
WIDTH, HEADS, KV_HEADS, FFN, LAYERS = 32, 4, 2, 64, 2
VOCAB, POSITIONS, IMAGE, PATCH = 100, 64, 32, 8
SPECIAL_ID = VOCAB - 1  # where special token ids beyond the small vocabulary go; kept out of the input
EXPERTS, EXPERTS_PER_TOKEN = 4, 2
MAX_PARAMS = 100_000_000  # a family still this large after shrinking is skipped (embedding tables, fixed sub-models)
FLOOR = 1.8  # MACs reduction counted as "pruned well" (ratio 0.5 asks for about 4x)
TP_MARGIN = 0.05
STEPS = ("capture", "qci", "prune", "onnx")

# config attribute -> small value, set where the default configuration has the attribute
WIDTH_NAMES = ("hidden_size", "d_model", "n_embd", "dim", "embed_dim")
SMALL: dict[str, object] = {
    **dict.fromkeys(WIDTH_NAMES, WIDTH),
    **dict.fromkeys(("num_attention_heads", "n_head", "encoder_attention_heads", "decoder_attention_heads"), HEADS),
    "num_key_value_heads": KV_HEADS,
    "head_dim": WIDTH // HEADS,
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim"), FFN),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "encoder_layers", "decoder_layers"), LAYERS),
    "vocab_size": VOCAB,
    "max_position_embeddings": POSITIONS,
    "image_size": IMAGE,
    "patch_size": PATCH,
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), EXPERTS),
    "num_experts_per_tok": EXPERTS_PER_TOKEN,
    "moe_intermediate_size": FFN,
    **dict.fromkeys(("n_group", "topk_group"), 1),
}
HEAD_MAPPINGS = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)
QKV = {"q": ("query", "q_proj", "q", "q_lin"), "k": ("key", "k_proj", "k", "k_lin"), "v": ("value", "v_proj", "v", "v_lin")}


def versions() -> dict[str, str | None]:
    out = {k: v for k, v in _versions().items() if k != "timm"}
    try:
        out["transformers"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        out["transformers"] = None
    return out


def qcd_fx_source() -> str:
    """A short hash of the qcd_fx package's Python sources as this process sees them."""
    import qcd_fx

    root = os.path.dirname(os.path.abspath(qcd_fx.__file__))
    h = hashlib.sha1()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".py"):
                h.update(os.path.relpath(os.path.join(d, f), root).encode())
                with open(os.path.join(d, f), "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# configuration, head, input (parent and children)


def families() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES)


class Skip(Exception):
    """A family this sweep does not run, with the one-line reason."""


def reason(e: BaseException) -> str:
    """One line for a build or configuration error: its first line, and the next when the first
    only announces it (huggingface_hub's "Class validation error for validator 'x':")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(e).__name__}: {text}"[:300]


def _small_value(name: str, value, width: int):
    """The small value for attribute ``name`` currently ``value``, or None to leave it."""
    if name.endswith(("_token_id", "_token_index")):
        if isinstance(value, int) and not isinstance(value, bool) and value >= VOCAB:
            return SPECIAL_ID
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value) and max(value) >= VOCAB:
            return [min(v, SPECIAL_ID) for v in value]
        return None
    if name not in SMALL:
        return None
    small = width if name in WIDTH_NAMES else SMALL[name]
    if isinstance(value, (list, tuple)) and name in ("image_size", "patch_size") and len(value) == 2:
        return [small, small]
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return small
    return None


def _width(config) -> int:
    """32, or the smallest multiple of 32 that per-stage head counts (a list-valued
    ``num_heads`` / ``num_attention_heads``, Swin: [3, 6, 12, 24]) and the 4 heads divide."""
    counts = [HEADS]
    for name in ("num_heads", "num_attention_heads"):
        value = _get(config, name)
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and v > 0 for v in value):
            counts += list(value)
    step = math.lcm(*counts)
    return WIDTH if WIDTH % step == 0 else step * -(-WIDTH // step)


_MISSING = object()


def _get(config, name: str, default=None):
    """``config.name`` or ``default`` (per-layer attributes of transformers 5 raise on global access)."""
    try:
        return getattr(config, name, default)
    except Exception:  # noqa: BLE001 - AmbiguousGlobalPerLayerAttributeError
        return default


def _settable(config, name: str, value) -> bool:
    """Whether ``config.name = value`` is accepted (read-only properties and attributes whose
    setter refuses, e.g. funnel's num_hidden_layers, are left alone)."""
    try:
        setattr(copy.deepcopy(config), name, value)
        return True
    except Exception:  # noqa: BLE001
        return False


def small_overrides(config) -> dict:
    """Constructor keywords that shrink ``config``'s own attributes (sub-configurations apart)."""
    width = _width(config)
    out = {}
    for name in sorted(set(config.to_dict()) | set(SMALL)):
        if name in (getattr(config, "sub_configs", None) or {}):
            continue
        value = _get(config, name, _MISSING)
        if value is _MISSING:  # absent, or a per-layer attribute
            continue
        small = _small_value(name, value, width)
        if small is not None and _settable(config, name, small):
            out[name] = small
    if hasattr(config, "use_cache"):
        out["use_cache"] = False
    return out


def _construct(factory, overrides: dict, base) -> tuple[object, dict]:
    """``factory(**overrides)``; when the configuration's validation refuses one of the small
    values, once more with that value relaxed: ``num_key_value_heads`` = the heads (no
    grouped-query attention), ``num_experts_per_tok`` 1, a per-layer list (``layer_types``)
    cut to the layers kept. Returns the configuration and the overrides used."""
    try:
        return factory(**overrides), overrides
    except Exception as e:
        text = str(e)
        relaxed = dict(overrides)
        if "num_key_value_heads" in text and "num_key_value_heads" in relaxed:
            relaxed["num_key_value_heads"] = relaxed.get("num_attention_heads", HEADS)
        if "num_experts_per_tok" in text and "num_experts_per_tok" in relaxed:
            relaxed["num_experts_per_tok"] = 1
        if "layer_types" in text and isinstance(_get(base, "layer_types"), list):
            relaxed["layer_types"] = _get(base, "layer_types")[:LAYERS]
        if relaxed == overrides:
            raise
        try:
            return factory(**relaxed), relaxed
        except Exception:  # noqa: BLE001 - the first error is the one to report
            raise e from None


def small_config(model_type: str):
    """(configuration, the overrides applied: {attribute: value} with sub-configurations nested)."""
    from transformers import AutoConfig, PretrainedConfig

    base = AutoConfig.for_model(model_type)
    subs, record = {}, {}
    for key in getattr(base, "sub_configs", None) or {}:
        sub = _get(base, key)
        if isinstance(sub, PretrainedConfig):
            try:
                subs[key], record[key] = _construct(type(sub), small_overrides(sub), sub)
            except Exception as e:
                raise Skip(f"composite config: {key}: {reason(e)}") from e
    try:
        config, overrides = _construct(lambda **kw: AutoConfig.for_model(model_type, **kw, **subs), small_overrides(base), base)
    except Exception as e:
        raise Skip(("composite config: " if subs else "") + reason(e)) from e
    record.update(overrides)
    return config, record


def head_class(model_type: str) -> tuple[str, type]:
    """(Auto class name, model class) of the first mapping that has ``model_type``."""
    import transformers
    from transformers.models.auto import modeling_auto

    for auto, mapping in HEAD_MAPPINGS:
        names = getattr(modeling_auto, mapping).get(model_type)
        if names is None:
            continue
        name = names[0] if isinstance(names, (tuple, list)) else names
        try:
            return auto, getattr(transformers, name)
        except Exception as e:  # an optional dependency missing, …
            raise Skip(f"{auto} class {name} unavailable: {reason(e)}") from e
    raise Skip("no model class: the type is in none of the CausalLM, SequenceClassification, ImageClassification, Model mappings")


def _first_config(config, attr: str, default):
    """``config.attr``, else the first sub-configuration's that has it."""
    value = getattr(config, attr, None)
    if value is not None:
        return value
    for key in getattr(config, "sub_configs", None) or {}:
        value = getattr(getattr(config, key, None), attr, None)
        if value is not None:
            return value
    return default


def input_spec(cls: type, config) -> dict:
    """{"name", "shape", "dtype"} of the example input, or raise "unsupported input"."""
    name = getattr(cls, "main_input_name", "input_ids")
    params = [p for p in inspect.signature(cls.forward).parameters if p != "self"]
    if not params or params[0] != name:
        raise Skip(f"unsupported input: main_input_name {name!r} is not forward's first parameter ({params[:1]})")
    if name == "input_ids":
        return {"name": name, "shape": [BATCH, TOKENS], "dtype": "int64"}
    if name == "pixel_values":
        side = _first_config(config, "image_size", IMAGE)
        side = side if isinstance(side, int) else IMAGE
        return {"name": name, "shape": [BATCH, int(_first_config(config, "num_channels", 3)), side, side], "dtype": "float32"}
    if name in SIGNAL_INPUTS:
        return {"name": name, "candidates": signal_shapes(name, config), "dtype": "float32"}
    raise Skip(f"unsupported input: main_input_name {name!r}")


SIGNAL_INPUTS = ("input_values", "input_features", "pixel_values_videos")


def _config_ints(config, names: tuple[str, ...]) -> list[int]:
    found = []
    for attr in names:
        value = _first_config(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0 and value not in found:
            found.append(value)
    return found


def signal_shapes(name: str, config) -> list[list[int]]:
    """Candidate shapes of an audio or video input, in the order tried (the first one the eager
    model runs on is the example): audio waveforms (batch, samples) or (batch, channels, samples),
    spectrograms (batch, bins, frames) or (batch, frames, bins) with the bins the configuration
    names, videos (batch, frames, channels, side, side)."""
    if name == "pixel_values_videos":
        side = _first_config(config, "image_size", IMAGE)
        side = side if isinstance(side, int) else IMAGE
        channels = int(_first_config(config, "num_channels", 3))
        frames = [2, 4, 8, 16]  # few frames first (a video model's cost grows with them), then the configuration's
        return [[BATCH, t, channels, side, side] for t in frames + [t for t in _config_ints(config, ("num_frames", "frames_per_clip")) if t not in frames]]
    bins = _config_ints(
        config, ("num_mel_bins", "feature_size", "input_feat_per_channel", "n_mels", "mel_bins", "num_mel_filters", "input_dim", "feature_projection_input_dim")
    )
    frames = [f for f in _config_ints(config, ("max_length",)) if f <= 4096] + [2 * f for f in _config_ints(config, ("max_source_positions",)) if f <= 2048]
    frames += [64, 160]
    if name == "input_values" and not _config_ints(config, ("max_length",)):
        channels = _config_ints(config, ("audio_channels", "channels"))[:1] or [1]
        waves = [[BATCH, n] for n in (1600, 16000)] + [[BATCH, channels[0], n] for n in (1600, 16000)]
    else:
        waves = []
    spectra = [[BATCH, b, t] for b in bins for t in frames] + [[BATCH, t, b] for b in bins for t in frames]
    shapes = waves + spectra if name == "input_values" else spectra + waves
    unique = []
    for shape in shapes:
        if shape not in unique:
            unique.append(shape)
    return unique[:12]


def example_input(spec: dict, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if spec["name"] == "input_ids":
        return torch.randint(0, min(vocab, SPECIAL_ID), spec["shape"], generator=g, dtype=torch.int64)
    return torch.randn(spec["shape"], generator=g)


def first_running_input(model: torch.nn.Module, spec: dict) -> torch.Tensor:
    """The example input: ``spec``'s shape, or the first of its candidate shapes the eager model
    runs on."""
    if "candidates" not in spec:
        return example_input(spec, _vocab(model) if spec["name"] == "input_ids" else VOCAB)
    last = None
    for shape in spec["candidates"]:
        x = example_input({**spec, "shape": shape}, VOCAB)
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception as e:  # noqa: BLE001 - the next shape is tried
            last = f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
    raise RuntimeError(f"the model runs on none of the {len(spec['candidates'])} candidate {spec['name']} shapes (the last: {last})")


def plan(model_type: str) -> dict:
    """Configuration, head class, input and parameter count (model built on the meta device), or
    {"skip": one-line reason, "step": where}."""
    step = "config"
    try:
        config, overrides = small_config(model_type)
        step = "head"
        auto, cls = head_class(model_type)
        step = "input"
        spec = input_spec(cls, config)
        step = "meta build"
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = cls(config)
        params = sum(p.numel() for p in model.parameters())
        composite = bool(getattr(config, "sub_configs", None))
        if params > MAX_PARAMS:
            step = "size"
            raise Skip(f"too large after shrinking: {params / 1e6:.0f} M parameters (> {MAX_PARAMS / 1e6:.0f} M)")
        return {"head": auto, "model": cls.__name__, "input": spec, "params": params, "composite": composite, "config": overrides}
    except Exception as e:  # noqa: BLE001 - a skip is a result
        return {"skip": str(e)[:300] if isinstance(e, Skip) else reason(e), "step": step}


def main_output(out) -> torch.Tensor | None:
    """``logits``, else ``last_hidden_state``, else the first tensor leaf."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        try:
            value = out[key]
        except (KeyError, TypeError, IndexError):
            continue
        if isinstance(value, torch.Tensor):
            return value
    found = leaves(out)
    return found[0] if found else None


def build(model_type: str) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """The model in eval mode with seeded random weights, its input, and {head, model, input}."""
    config, _ = small_config(model_type)
    auto, cls = head_class(model_type)
    spec = input_spec(cls, config)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config).eval()
    x = first_running_input(model, spec)
    return model, x, {"head": auto, "model": cls.__name__, "input": spec["name"], "shape": list(x.shape)}


def _vocab(model: torch.nn.Module) -> int:
    """Rows of the input embedding table (models that do not say, Canine: the small vocabulary)."""
    try:
        return getattr(model.get_input_embeddings(), "num_embeddings", VOCAB)
    except Exception:  # noqa: BLE001 - NotImplementedError for models without one
        return VOCAB


def matmul_macs(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(linear, matmul) MACs of one forward: aten.mm + aten.addmm, and those + aten.bmm + aten.linear."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    counts = counter.get_flop_counts().get("Global", {})
    linear = sum(v for k, v in counts.items() if k in (aten.mm, aten.addmm)) // 2
    return linear, linear + sum(v for k, v in counts.items() if k in (aten.bmm, aten.linear)) // 2


def _ratio(a, b):
    return a / b if a and b else None


def _measure(model, x, rec: Recorder) -> torch.Tensor:
    """Eager reference output; base MACs (total, linear, matmul) and parameters into the row."""
    from qcd_fx.analysis import count_params, same_random_draws

    row = rec.row
    rec.stage("measure")
    with torch.no_grad(), same_random_draws():  # models that draw random numbers draw the same in every check
        ref = model(x)
    if main_output(ref) is None:
        raise RuntimeError(f"no tensor in the output ({type(ref).__name__})")
    macs, note = macs_of(model, x)
    linear, mm = matmul_macs(model, x)
    finite = all(bool(torch.isfinite(t).all()) for t in leaves(ref) if t.is_floating_point())
    row.update(params=count_params(model), macs=macs, linear_macs=linear, matmul_macs=mm, output_shape=list(main_output(ref).shape), eager_finite=finite)
    if note:
        row["macs_note"] = note
    return ref


# --------------------------------------------------------------------------------------------
# children


def child_qcd(model_type: str, rec: Recorder) -> None:
    import qcd_fx
    from qcd_fx.analysis import same_random_draws
    from qcd_fx.errors import PreconditionError

    row = rec.row
    row["qcd_fx_source"] = qcd_fx_source()
    rec.stage("build")
    t0 = time.perf_counter()
    model, x, built = build(model_type)
    row.update(build=built, build_s=time.perf_counter() - t0)
    ref = _measure(model, x, rec)
    main_ref = main_output(ref)

    rec.stage("capture")
    t0 = time.perf_counter()
    try:
        gm = qcd_fx.trace(model, x, capture="export")
        seconds = time.perf_counter() - t0
        with torch.no_grad(), same_random_draws():
            out = main_output(gm(x))
        exact = out is not None and out.shape == main_ref.shape and torch.equal(out, main_ref)
        diff = float((out.float() - main_ref.float()).abs().max()) if out is not None and out.shape == main_ref.shape and out.numel() else None
        row["capture"] = {"ok": True, "seconds": seconds, "describe": gm.meta["capture"].describe(), "exact": exact, "max_abs": diff}
        del gm
    except Exception as e:  # noqa: BLE001 - failures are results
        row["capture"] = {"ok": False, "seconds": time.perf_counter() - t0, "error": one_line(e)}

    rec.stage("qci")
    t0 = time.perf_counter()
    refused = None
    for spec in (SPEC_QCI, SPEC_QCI_LOW_RANK):
        try:
            result = qcd_fx.transform(model, spec, example_inputs=x, capture="export")
            p = result.report.passes[0]
            row["qci"] = {
                "ok": True,
                "exact": p.drift_abs == 0,
                "drift_abs": p.drift_abs,
                "gates": p.stats.get("gates"),
                "seconds": time.perf_counter() - t0,
                "spec": spec,
            }
            if refused:
                row["qci"]["full_rank_refused"] = refused
            del result
            break
        except PreconditionError as e:  # full-rank gates that cannot fit: what the message tells the user to do
            if spec != SPEC_QCI or "qci{rank=16}" not in str(e):
                row["qci"] = {"ok": False, "exact": False, "seconds": time.perf_counter() - t0, "error": one_line(e)}
                break
            refused = one_line(e)
        except Exception as e:  # noqa: BLE001
            row["qci"] = {"ok": False, "exact": False, "seconds": time.perf_counter() - t0, "error": one_line(e)}
            break

    rec.stage("prune")
    t0 = time.perf_counter()
    gm = None
    try:
        result = qcd_fx.transform(model, SPEC_PRUNE, example_inputs=x, capture="export")
        wall = time.perf_counter() - t0
        report, gm = result.report, result.graph_module.eval()
        p = report.passes[0]
        entry = {
            "transform_wall_s": wall,
            "pass_s": p.seconds,
            "macs": report.final.macs,
            "params": report.final.params,
            "macs_ratio": _ratio(report.baseline.macs, report.final.macs),
            "params_ratio": _ratio(report.baseline.params, report.final.params),
            "base_macs": report.baseline.macs,
            "notes": [n[:300] for n in p.notes[:MAX_NOTES]],
            "warnings": [w[:300] for w in report.warnings()[:MAX_NOTES]],
            "channels": p.stats.get("channels"),
            "channels_removed": p.stats.get("channels_removed"),
            "groups": p.stats.get("groups"),
            "groups_pruned": p.stats.get("groups_pruned"),
            "frozen_channels": _top(p.stats.get("frozen_channels")),
            "skip_reasons": _top(p.stats.get("skip_reasons")),
        }
        try:
            with torch.no_grad(), same_random_draws():
                out = gm(x)
            finite = all(bool(torch.isfinite(t).all()) for t in leaves(out) if t.is_floating_point())
            if not finite and not row["eager_finite"]:
                finite = None  # the eager model's own output is not finite either: not held against the pruning
            shapes = same_shapes(out, ref)
            entry.update(ok=shapes and finite is not False, runs=True, same_shape=shapes, finite=finite)
            if not (shapes and finite):
                entry["error"] = "output shape changed" if not shapes else "non-finite output"
            linear, mm = matmul_macs(gm, x)
            entry.update(
                linear_macs=linear, linear_macs_ratio=_ratio(row["linear_macs"], linear), matmul_macs=mm, matmul_macs_ratio=_ratio(row["matmul_macs"], mm)
            )
        except Exception as e:  # noqa: BLE001
            entry.update(ok=False, runs=False, error="pruned module fails: " + one_line(e))
        row["prune"] = entry
        del result
    except Exception as e:  # noqa: BLE001
        row["prune"] = {"ok": False, "transform_wall_s": time.perf_counter() - t0, "error": one_line(e)}

    rec.stage("onnx")
    if gm is None or not row["prune"].get("runs"):
        row["onnx"] = {"ok": False, "skipped": True, "error": "no pruned module"}
    else:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rep = qcd_fx.export_onnx(gm, (x,), None)
            row["onnx"] = {"ok": rep.ok, "max_abs": rep.max_abs, "max_rel": rep.max_rel, "exporter": rep.exporter, "seconds": time.perf_counter() - t0}
            if rep.fallback_reason:
                row["onnx"]["fallback_reason"] = rep.fallback_reason[:200]
        except Exception as e:  # noqa: BLE001 - ExportError and anything else
            row["onnx"] = {"ok": False, "seconds": time.perf_counter() - t0, "error": one_line(e)}
    rec.stage(None)


def attention_heads(model: torch.nn.Module) -> tuple[dict, list]:
    """Torch-Pruning's ``num_heads`` ({q/k/v Linear: heads}) and [(attention module, its q Linear)]."""
    from torch import nn

    num_heads, found = {}, []
    for m in model.modules():
        heads = next((getattr(m, a) for a in ("num_heads", "num_attention_heads") if isinstance(getattr(m, a, None), int)), None)
        if heads is None:
            continue
        children = dict(m.named_children())
        proj = {role: next((children[n] for n in names if isinstance(children.get(n), nn.Linear)), None) for role, names in QKV.items()}
        if proj["q"] is None:
            continue
        kv = getattr(m, "num_key_value_heads", None)
        kv = kv if isinstance(kv, int) else heads
        num_heads[proj["q"]] = heads
        for role in ("k", "v"):
            if proj[role] is not None:
                num_heads[proj[role]] = kv
        found.append((m, proj["q"]))
    return num_heads, found


def output_head(model: torch.nn.Module) -> list:
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = next((getattr(model, a) for a in ("classifier", "score") if isinstance(getattr(model, a, None), nn.Module)), None)
    return [head] if isinstance(head, nn.Module) else []


def child_tp(model_type: str, rec: Recorder) -> None:
    import torch_pruning as tp

    from qcd_fx.analysis import count_params

    row = rec.row
    rec.stage("build")
    model, x, built = build(model_type)
    row.update(build=built)
    ref = _measure(model, x, rec)
    rec.stage("prune")
    work = copy.deepcopy(model)
    ignored = output_head(work)
    num_heads, attn = attention_heads(work)
    row["ignored"] = [type(h).__name__ for h in ignored]
    row["attention_modules"] = len(attn)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MagnitudePruner(
                work, example_inputs=x, importance=tp.importance.MagnitudeImportance(p=1), iterative_steps=1,
                pruning_ratio=0.5, ignored_layers=ignored, num_heads=num_heads, output_transform=main_output,
            )  # fmt: skip
            pruner.step()
        row["prune_s"] = time.perf_counter() - t0
        for m, q in attn:  # its examples: attention modules read these in forward
            heads = pruner.num_heads.get(q, None) or getattr(m, "num_heads", None) or m.num_attention_heads
            for a in ("num_heads", "num_attention_heads"):
                if isinstance(getattr(m, a, None), int):
                    setattr(m, a, heads)
            for a in ("attention_head_size", "head_dim"):
                if isinstance(getattr(m, a, None), int):
                    setattr(m, a, q.out_features // heads)
            if isinstance(getattr(m, "all_head_size", None), int):
                m.all_head_size = q.out_features
    except Exception as e:  # noqa: BLE001
        row.update(ok=False, runs=False, prune_s=time.perf_counter() - t0, error=one_line(e))
        rec.stage(None)
        return
    rec.stage("run")
    try:
        work.eval()
        with torch.no_grad():
            out = work(x)
        shapes = same_shapes(out, ref)
        (macs, note), params = macs_of(work, x), count_params(work)
        linear, _ = matmul_macs(work, x)
        row.update(runs=True, same_shape=shapes, ok=shapes, macs_after=macs, params_after=params, linear_macs_after=linear)
        row.update(macs_ratio=_ratio(row["macs"], macs), params_ratio=_ratio(row["params"], params), linear_macs_ratio=_ratio(row["linear_macs"], linear))
        if note:
            row["macs_after_note"] = note
        if not shapes:
            row["error"] = f"output shape changed {[tuple(t.shape) for t in leaves(ref)]} -> {[tuple(t.shape) for t in leaves(out)]}"
    except Exception as e:  # noqa: BLE001
        row.update(ok=False, runs=False, error="pruned model fails: " + one_line(e))
    rec.stage(None)


def run_child(model_type: str, tool: str, cap_s: float, mem_gb: float) -> dict:
    """One child process (this script with ``--one``); its row, with what stopped it if it was stopped."""
    env = {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    return spawn_child(__file__, model_type, tool, [], cap_s, mem_gb, steps=STEPS, env=env, stop=STOP, limit_data=True)


def one_main(args) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rec = Recorder(args.one_out)
    rec.stage("start")
    try:
        (child_qcd if args.tool == "qcd" else child_tp)(args.one, rec)
    except Exception as e:  # noqa: BLE001 - a build failure: the row says so
        rec.row["error"] = f"{rec.row.get('stage')}: {reason(e)}"
        rec.stage(None)


# --------------------------------------------------------------------------------------------
# parent


def measure_qcd(model_type: str, planned: dict, cap_s: float, mem_gb: float) -> dict | None:
    """The family's row with its qcd-fx steps (None when the sweep was interrupted)."""
    if STOP.is_set():
        return None
    row: dict = {"family": model_type}
    if "skip" in planned:
        row.update(model=None, head=None, error=f"{planned['step']}: {planned['skip']}", tp={"ok": False, "error": "not run: the model did not build"})
        return row
    row.update(model=planned["model"], head=planned["head"], input=planned["input"]["name"], composite=planned["composite"], planned_params=planned["params"])
    q = run_child(model_type, "qcd", cap_s, mem_gb)
    if STOP.is_set():
        return None
    for key in ("build", "build_s", "params", "macs", "linear_macs", "matmul_macs", "output_shape", "eager_finite", "macs_note", "qcd_fx_source"):
        if key in q:
            row[key] = q.pop(key)
    if "error" in q:
        row["error"] = q.pop("error")
    q["time_cap_s"] = cap_s  # a resumed run may use another cap than the rows it keeps
    row["qcd"] = q
    if "output_shape" not in row:  # the model does not build or run: nothing for Torch-Pruning either
        row.setdefault("error", "build: the child ended before the model ran")
        row["tp"] = {"ok": False, "error": "not run: the model did not build"}
    return row


def measure_tp(model_type: str, cap_s: float, mem_gb: float) -> dict | None:
    """Torch-Pruning's entry of a built family's row (None when the sweep was interrupted)."""
    if STOP.is_set():
        return None
    t = run_child(model_type, "tp", cap_s, mem_gb)
    if STOP.is_set():
        return None
    for key in ("build", "params", "macs", "linear_macs", "matmul_macs", "output_shape", "eager_finite", "macs_note"):
        t.pop(key, None)
    t["time_cap_s"] = cap_s
    return t


def built(row: dict) -> bool:
    return "output_shape" in row


def status(row: dict) -> dict[str, bool]:
    q, t = row.get("qcd", {}), row.get("tp", {})
    pr = q.get("prune", {})
    return {
        "built": built(row),
        "captured": bool(q.get("capture", {}).get("ok")),
        "capture_exact": bool(q.get("capture", {}).get("exact")),
        "qci_exact": bool(q.get("qci", {}).get("exact")),
        "qci_low_rank": bool(q.get("qci", {}).get("full_rank_refused")),
        "pruned_valid": bool(pr.get("ok")),
        "floor": bool(pr.get("ok")) and (pr.get("macs_ratio") or 0) >= FLOOR,
        "linear_floor": bool(pr.get("ok")) and (pr.get("linear_macs_ratio") or 0) >= FLOOR,
        "onnx_ok": bool(q.get("onnx", {}).get("ok")),
        "tp_runs": bool(t.get("ok")),
        "tp_floor": bool(t.get("ok")) and (t.get("macs_ratio") or 0) >= FLOOR,
    }


def first_failure(row: dict) -> tuple[str, str] | None:
    """(step, one-line reason) of the first qcd-fx step that fails; ("build", …) for a model
    that was not built."""
    if not built(row):
        return "build", row.get("error", "?")
    q = row["qcd"]
    for step in STEPS:
        e = q.get(step)
        if e is None:
            return step, row.get("error") or "not reached"
        if step == "capture" and e.get("ok") and not e.get("exact"):
            return step, f"not exact (max abs {e.get('max_abs')})"
        if step == "qci" and e.get("ok") and not e.get("exact"):
            return step, f"not exact (drift {e.get('drift_abs')})"
        if not e.get("ok"):
            if step == "onnx" and "error" not in e:
                return step, f"parity failed (max abs {e.get('max_abs')})"
            return step, e.get("error", "?")
    return None


def summarize(rows: list[dict]) -> dict:
    st = [status(r) for r in rows]
    count = {k: sum(s[k] for s in st) for k in (st[0] if st else status({}))}
    valid = [r for r, s in zip(rows, st) if s["pruned_valid"]]
    tp_ok = [r for r, s in zip(rows, st) if s["tp_runs"]]
    both = [r for r, s in zip(rows, st) if s["pruned_valid"] and s["tp_runs"] and r["qcd"]["prune"].get("macs_ratio") and r["tp"].get("macs_ratio")]

    def apart(a: str, b: str) -> dict:
        pick = {"qcd": lambda r: r["qcd"]["prune"]["macs_ratio"], "tp": lambda r: r["tp"]["macs_ratio"]}
        return {r["family"]: {"qcd": round(pick["qcd"](r), 3), "tp": round(pick["tp"](r), 3)} for r in both if pick[a](r) < (1 - TP_MARGIN) * pick[b](r)}

    failing: dict[str, dict[str, str]] = {}
    for r in rows:
        if f := first_failure(r):
            failing.setdefault(f[0], {})[r["family"]] = f[1]
    below = {
        r["family"]: {
            "macs_ratio": round(r["qcd"]["prune"]["macs_ratio"] or 0, 3),
            "linear_macs_ratio": round(r["qcd"]["prune"].get("linear_macs_ratio") or 0, 3),
            "head": r.get("head"),
            "skip_reasons": r["qcd"]["prune"].get("skip_reasons", {}),
            "notes": r["qcd"]["prune"].get("notes", []),
            "warnings": r["qcd"]["prune"].get("warnings", []),
        }
        for r, s in zip(rows, st)
        if s["pruned_valid"] and not s["floor"]
    }
    frozen: dict[str, int] = {}
    for r in rows:
        for why in r.get("qcd", {}).get("prune", {}).get("frozen_channels", {}) or {}:
            frozen[why] = frozen.get(why, 0) + 1
    return {
        "families": len(rows),
        **count,
        "composite_built": sum(bool(r.get("composite")) and s["built"] for r, s in zip(rows, st)),
        "heads_built": {h: sum(r.get("head") == h and s["built"] for r, s in zip(rows, st)) for h, _ in HEAD_MAPPINGS},
        "inputs_built": {i: sum(r.get("input") == i and s["built"] for r, s in zip(rows, st)) for i in ("input_ids", "pixel_values", *SIGNAL_INPUTS)},
        "qcd_only": sum(s["pruned_valid"] and not s["tp_runs"] for s in st),
        "tp_only": sum(s["tp_runs"] and not s["pruned_valid"] for s in st),
        "both_pruned": len(both),
        "median_macs_ratio_qcd": _median(r["qcd"]["prune"]["macs_ratio"] for r in valid),
        "median_linear_macs_ratio_qcd": _median(r["qcd"]["prune"].get("linear_macs_ratio") for r in valid),
        "median_matmul_macs_ratio_qcd": _median(r["qcd"]["prune"].get("matmul_macs_ratio") for r in valid),
        "median_params_ratio_qcd": _median(r["qcd"]["prune"]["params_ratio"] for r in valid),
        "median_macs_ratio_tp": _median(r["tp"]["macs_ratio"] for r in tp_ok),
        "median_linear_macs_ratio_tp": _median(r["tp"].get("linear_macs_ratio") for r in tp_ok),
        "median_macs_ratio_qcd_on_both": _median(r["qcd"]["prune"]["macs_ratio"] for r in both),
        "median_macs_ratio_tp_on_both": _median(r["tp"]["macs_ratio"] for r in both),
        "median_capture_s": _median(r["qcd"]["capture"].get("seconds") for r, s in zip(rows, st) if s["captured"]),
        "median_prune_pass_s_qcd": _median(r["qcd"]["prune"]["pass_s"] for r in valid),
        "median_transform_wall_s_qcd": _median(r["qcd"]["prune"]["transform_wall_s"] for r in valid),
        "median_prune_s_tp": _median(r["tp"].get("prune_s") for r in tp_ok),
        "median_onnx_max_abs": _median(r["qcd"]["onnx"].get("max_abs") for r, s in zip(rows, st) if s["onnx_ok"]),
        "failing_by_step": {step: failing[step] for step in ("build", *STEPS) if step in failing},
        "valid_below_floor": below,
        "qcd_below_tp_by_5pct": apart("qcd", "tp"),
        "tp_below_qcd_by_5pct": apart("tp", "qcd"),
        "tp_pending": sum(s["built"] and "tp" not in r for r, s in zip(rows, st)),  # an interrupted sweep: not run yet
        "tp_failing": {r["family"]: r["tp"].get("error", "?") for r, s in zip(rows, st) if s["built"] and "tp" in r and not s["tp_runs"]},
        "tp_failing_by_kind": _kinds(r["tp"].get("error", "?") for r, s in zip(rows, st) if s["built"] and "tp" in r and not s["tp_runs"]),
        "on_both": {  # the families both tools prune validly: time of each (qcd-fx's pass alone and end to end)
            "median_prune_pass_s_qcd": _median(r["qcd"]["prune"]["pass_s"] for r in both),
            "median_transform_wall_s_qcd": _median(r["qcd"]["prune"]["transform_wall_s"] for r in both),
            "median_prune_s_tp": _median(r["tp"].get("prune_s") for r in both),
            "pass_at_or_below_tp": sum(r["qcd"]["prune"]["pass_s"] <= r["tp"]["prune_s"] for r in both),
            "transform_at_or_below_tp": sum(r["qcd"]["prune"]["transform_wall_s"] <= r["tp"]["prune_s"] for r in both),
            "median_capture_s_qcd": _median(r["qcd"]["capture"].get("seconds") for r in both),
        },
        "frozen_reasons_by_families": dict(sorted(frozen.items(), key=lambda kv: -kv[1])[:10]),
    }


def _kinds(errors) -> dict[str, int]:
    """Torch-Pruning's failures by kind: stopped at the time cap, its pruned model fails to run,
    an output changed shape, else the exception its pruning raised."""
    kinds: dict[str, int] = {}
    for e in errors:
        if "stopped: did not finish" in e:
            kind = "stopped at the time cap"
        elif e.startswith("pruned model fails"):
            kind = "pruned model fails to run"
        elif e.startswith("output shape changed"):
            kind = "an output changed shape"
        else:
            kind = e.split(":", 1)[0].removeprefix("prune").strip() or "?"
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def line(row: dict) -> str:
    q, t = row.get("qcd", {}), row.get("tp", {})
    if not built(row):
        return f"{row['family']:30s} {row.get('model') or '':38s} NOT BUILT: {row.get('error', '')[:110]}"
    cap, qci, pr, ox = q.get("capture", {}), q.get("qci", {}), q.get("prune", {}), q.get("onnx", {})
    cap_s = ("exact" if cap.get("exact") else "diff") if cap.get("ok") else "FAIL"
    qci_s = ("exact" if qci.get("exact") else "diff") if qci.get("ok") else "FAIL"
    prune = f"x{pr.get('macs_ratio') or float('nan'):.2f} x{pr.get('linear_macs_ratio') or float('nan'):.2f}" if pr.get("ok") else "FAIL"
    onnx = f"ok {ox.get('max_abs') or 0:.0e}" if ox.get("ok") else "FAIL"
    tpc = "-" if not t else f"x{t.get('macs_ratio') or float('nan'):.2f}" if t.get("ok") else "FAIL"
    f = first_failure(row)
    why = f"{f[0]}: {f[1]}" if f else ""
    return f"{row['family']:30s} {row['model']:38s} {cap_s:5s} {qci_s:5s} {prune:13s} {onnx:9s} {tpc:6s} {why[:90]}"


def tp_line(row: dict) -> str:
    t = row["tp"]
    what = (
        f"x{t.get('macs_ratio') or float('nan'):.2f} MACs, x{t.get('linear_macs_ratio') or float('nan'):.2f} linear"
        if t.get("ok")
        else f"FAIL {t.get('error', '')[:110]}"
    )
    return f"{row['family']:30s} {row['model']:38s} Torch-Pruning {what}"


HEADER = f"{'family':30s} {'model':38s} {'capt':5s} {'qci':5s} {'MACs÷ lin÷':13s} {'ONNX':9s} {'TP÷':6s} first failure"


def output_path(out: str) -> str:
    if os.path.isdir(out):
        return os.path.join(out, "hf_sweep.json")
    return out if out.endswith(".json") else out + ".json"


def _rounded(x):
    """``x`` with every float to 6 significant digits (timings and errors; keeps the file under 1 MB)."""
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def write(path: str, meta: dict, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # one line, and the plans without their config overrides (``small_overrides`` derives them
    # again; nothing reads them back): every family of transformers fits in well under 1 MB
    plans = {f: {k: v for k, v in p.items() if k != "config"} for f, p in meta.get("selection", {}).items()}
    data = _rounded({"meta": {**meta, "selection": plans}, "summary": summarize(rows), "rows": rows})
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, path)


def git_dirty() -> list[str] | None:
    """Paths under qcd_fx/ the working tree changes (``git status --porcelain``)."""
    try:
        st = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--", "qcd_fx"],
            cwd=os.path.dirname(HERE),
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return [ln[3:] for ln in st.stdout.splitlines()]
    except Exception:  # noqa: BLE001
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated model types (default: every family in CONFIG_MAPPING_NAMES)")
    ap.add_argument("--limit", type=int, help="only the first N families (alphabetical)")
    ap.add_argument("--time-cap", type=float, default=120.0, help="seconds per model and tool (a child process each; default 120)")
    ap.add_argument("--mem-cap", type=float, default=8.0, help="GiB of resident memory per child (default 8)")
    ap.add_argument(
        "--tp-time-cap", type=float, help="seconds per Torch-Pruning child (default: --time-cap; its dependency grouping spins until the cap on many decoders)"
    )
    ap.add_argument("--no-tp", action="store_true", help="qcd-fx children only: the Torch-Pruning phase is left for a later --resume (tp_pending)")
    ap.add_argument("--jobs", type=int, default=1, help="families measured at the same time (default 1; each runs its children one after the other)")
    ap.add_argument("--resume", action="store_true", help="keep the rows (and plans) already in the output file, run the rest")
    ap.add_argument("--redo", help="with --resume: comma-separated families planned and measured again (their stored rows dropped)")
    ap.add_argument("--smoke", action="store_true", help=f"{' + '.join(SMOKE)} with a 60 s cap: checks that the script runs")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "hf_sweep"), help="path prefix (.json appended) or a directory")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one model in a child process
    ap.add_argument("--tool", choices=("qcd", "tp"), help=argparse.SUPPRESS)
    ap.add_argument("--one-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        one_main(args)
        return 0
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # main's handler stops the children
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.smoke:
        args.models, args.time_cap = ",".join(SMOKE), min(args.time_cap, 60.0)
    path = output_path(args.out)
    t_start = time.perf_counter()
    old = None
    if args.resume and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)

    fams = families()
    if args.models:
        wanted = [n.strip() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in fams]
        if unknown:
            ap.error(f"transformers has no model type(s) {', '.join(unknown)}")
    else:
        wanted = fams[: args.limit] if args.limit else fams
    redo = {f.strip() for f in (args.redo or "").split(",") if f.strip()}
    stored = {f: p for f, p in (old or {}).get("meta", {}).get("selection", {}).items() if f not in redo}
    todo = [f for f in wanted if f not in stored]
    if todo:
        print(f"planning {len(todo)} families (small configs, meta-device builds) ...", flush=True)
    fresh = {}
    for f in todo:
        fresh[f] = plan(f)
        p = fresh[f]
        print(
            f"  {f:40s} " + (f"skip ({p['step']}): {p['skip'][:100]}" if "skip" in p else f"{p['head']:36s} {p['model']:40s} {p['params'] / 1e6:7.3f} M"),
            flush=True,
        )
    selection = {f: stored.get(f) or fresh[f] for f in wanted}
    selection_s = time.perf_counter() - t_start

    meta = {
        "command": "python benchmarks/hf_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
        **versions(),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "threads": 1,
        "qcd_fx": __import__("qcd_fx").__version__,
        "git_commit": git_commit(),
        "qcd_fx_dirty_at_start": git_dirty(),
        "qcd_fx_source_at_start": qcd_fx_source(),
        "batch": BATCH,
        "tokens": TOKENS,
        "small_config": {**SMALL, "use_cache": False, "special token ids >= vocab_size": SPECIAL_ID},
        "weights": "random: transformers' initialisation after torch.manual_seed(0); nothing downloaded",
        "head_order": [h for h, _ in HEAD_MAPPINGS],
        "qcd_specs": {"qci": SPEC_QCI, "prune": SPEC_PRUNE},
        "qcd_capture": "export",
        "tp_recipe": (
            "tp.pruner.MagnitudePruner(importance=MagnitudeImportance(p=1), pruning_ratio=0.5, iterative_steps=1, "
            "ignored_layers=[output head], num_heads={q/k/v Linear: heads}, output_transform=main output); "
            "num_heads / head size / all_head_size patched after step() as in its HF examples"
        ),
        "macs": "torch.utils.flop_counter (qcd_fx.analysis.count_macs) for both tools; linear = aten.mm + aten.addmm, matmul = + aten.bmm + aten.linear; ratio = base / after",
        "floor": FLOOR,
        "tp_margin": TP_MARGIN,
        "jobs": args.jobs,
        "time_cap_s": args.time_cap,
        "tp_time_cap_s": args.tp_time_cap or args.time_cap,
        "mem_cap_gb": args.mem_cap,
        "selection_rule": "every model_type of CONFIG_MAPPING_NAMES, alphabetical; one model per family from a small config",
        "selection": selection,
        "selection_s": selection_s,
        "complete": False,
    }
    done = {}
    if old:
        done = {r["family"]: r for r in old.get("rows", []) if r["family"] not in redo}
        if redo:
            meta["redone"] = sorted(redo | set(old.get("meta", {}).get("redone", [])))
        meta["resumed_from"] = old.get("meta", {}).get("command")
        meta["elapsed_before_resume_s"] = old.get("meta", {}).get("elapsed_s", 0.0) + old.get("meta", {}).get("elapsed_before_resume_s", 0.0)
    print(HEADER, flush=True)
    results = {}
    for fam in wanted:
        if fam in done:
            results[fam] = done[fam]
            print(line(done[fam]) + "  (kept)", flush=True)

    def save() -> None:
        meta["elapsed_s"] = time.perf_counter() - t_start
        write(path, meta, [results[f] for f in wanted if f in results])

    def qcd_done(fam: str, row: dict) -> None:
        results[fam] = row
        print(line(row), flush=True)
        save()

    def tp_done(fam: str, t: dict) -> None:
        results[fam]["tp"] = t
        print(tp_line(results[fam]), flush=True)
        save()

    # qcd-fx first for every family, then Torch-Pruning (whose dependency grouping can spin until
    # the cap): an interrupted sweep has the qcd-fx results, and --resume runs what is missing
    cap, mem = args.time_cap, args.mem_cap
    run_all(args.jobs, {f: (lambda f=f: measure_qcd(f, selection[f], cap, mem)) for f in wanted if f not in results}, qcd_done)
    rows = [results[f] for f in wanted]
    if args.no_tp:
        meta["elapsed_s"] = time.perf_counter() - t_start
        write(path, meta, rows)
        print(f"--no-tp: Torch-Pruning left for a later --resume on the {sum(built(r) and 'tp' not in r for r in rows)} families built; wrote {path}")
        return 0
    print(f"Torch-Pruning on the {sum(built(r) and 'tp' not in r for r in results.values())} families built ...", flush=True)
    tp_cap = args.tp_time_cap or cap
    run_all(args.jobs, {f: (lambda f=f: measure_tp(f, tp_cap, mem)) for f in wanted if built(results[f]) and "tp" not in results[f]}, tp_done)
    rows = [results[f] for f in wanted]
    meta["elapsed_s"] = time.perf_counter() - t_start
    meta["complete"] = True
    meta["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    write(path, meta, rows)
    s = summarize(rows)
    print()
    print(
        f"families {s['families']}, built {s['built']}, captured {s['captured']} (exact {s['capture_exact']}), QCI exact {s['qci_exact']}, "
        f"pruned validly {s['pruned_valid']}, >= {FLOOR}x MACs {s['floor']}, >= {FLOOR}x linear MACs {s['linear_floor']}, ONNX ok {s['onnx_ok']}, "
        f"Torch-Pruning runs {s['tp_runs']} (>= {FLOOR}x {s['tp_floor']}); median MACs ratio qcd-fx {s['median_macs_ratio_qcd']}, TP {s['median_macs_ratio_tp']}"
    )
    print(json.dumps({k: v for k, v in s.items() if k not in ("failing_by_step", "valid_below_floor", "tp_failing")}, indent=1))
    for step, fams_ in s["failing_by_step"].items():
        print(f"{step}: {len(fams_)} families")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
