"""The quantize feature: weight-only INT8 / INT4 layers in place of the model's nn.Linear modules.

This version implements round-to-nearest (method: rtn): INT8 per output channel (bits 8) or INT4 in groups
of 32/64/128 (bits 4). Calibrated methods (gptq, awq) and bitsandbytes are reported as not available yet.

Which layers: every nn.Linear (and GPT-2 Conv1D) under the model except the output head (unless quantize_lm_head) and names
matching modules_to_not_convert (a substring or fnmatch pattern). A tied head quantized with
quantize_lm_head becomes its own quantized copy; the input embedding stays float; the report says so.
Every replaced layer is recorded; the notes give the weight SQNR (min / mean over layers), the layers
whose in_features were padded to a whole group, and which kernel each layer runs.
"""

from __future__ import annotations

import fnmatch
from collections import Counter

import torch
from torch import nn

from ..placement import offloaded_reason
from ..registry import Plan, register_feature
from ..report import Skip
from .layers import INT4_GROUPS, Int4Linear, Int8Linear, is_linear, linear_weight, sqnr_db


def head_path(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def excluded(name: str, patterns: list[str]) -> bool:
    return any(p in name or fnmatch.fnmatch(name, p) for p in patterns)


def target_linears(model: nn.Module, q) -> tuple[list[str], str | None]:
    """(dotted paths of the nn.Linear modules to quantize, the head's path)."""
    from ..placement import adapter_layers, under_adapter

    head = head_path(model)
    adapters = adapter_layers(model)
    paths = []
    for name, module in model.named_modules():
        if not is_linear(module) or excluded(name, q.modules_to_not_convert) or under_adapter(name, adapters):
            continue
        if name == head and not q.quantize_lm_head:
            continue
        paths.append(name)
    return paths, head


def resident(paths: list[str], ctx) -> tuple[list[str], list[str]]:
    """(paths whose weights are resident, paths under offloaded modules)."""
    if not (ctx.placement and ctx.placement.offloaded):
        return paths, []
    return ([p for p in paths if not ctx.placement.is_offloaded(p)],
            [p for p in paths if ctx.placement.is_offloaded(p)])


def _dtensor_weight(module: nn.Module) -> bool:
    from ..tp import _is_dtensor

    return _is_dtensor(getattr(module, "weight", None))


def head_bits(q) -> int:
    return q.lm_head_bits or q.bits


def rtn_layer(linear: nn.Module, bits: int, q) -> Int8Linear | Int4Linear:
    """The layer quantized round to nearest: int8 per channel, or int4 in groups of q.group_size."""
    if bits == 8:
        return Int8Linear.from_linear(linear)
    return Int4Linear.from_linear(linear, q.group_size, q.sym)


def _tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight


@register_feature("quantize", stage="quantize")
def plan_quantize(model: nn.Module, ctx, cfg) -> Plan | Skip | None:
    q = cfg.quantization
    if q.method == "none":
        return None
    if q.method in ("bnb-int8", "bnb-nf4"):
        return _plan_bnb(model, ctx, cfg)
    offloaded: list[str] = []
    if ctx.placement and ctx.placement.offloaded:
        if q.method in ("gptq", "awq"):
            return Skip("quantize", f"{q.method} calibrates decoder layer by layer and rewrites every layer; "
                                    f"{len(ctx.placement.offloaded)} modules are offloaded: quantize before "
                                    f"dispatching (or `hfaccel export` and load that checkpoint)")
    from ..tp import local_targets, tp_size

    if tp_size(model) > 1 and q.method in ("gptq", "awq", "bnb-int8", "bnb-nf4"):
        return Skip("quantize", f"{q.method} on a tensor-parallel model ({tp_size(model)} ranks): only rtn runs per "
                                f"shard; quantize before sharding (`hfaccel export`) for calibrated int4")
    if q.method in ("gptq", "awq") and ctx.spec is None:
        return Skip("quantize", f"{q.method} walks the decoder layers named by a patches/ spec; {ctx.spec_problem}")
    if q.bits == 4 and q.group_size not in INT4_GROUPS:
        return Skip("quantize", f"int4 needs group_size {', '.join(map(str, INT4_GROUPS))}; "
                                f"it is {q.group_size} (per-channel int4 is not supported by the packed kernels)")
    paths, head = target_linears(model, q)
    paths, offloaded = resident(paths, ctx)
    # tensor parallel: the shard stage makes colwise / rowwise layers local (a rowwise one's product moves to
    # `.linear`); a sharded layer of any other style keeps Transformers' forward and stays float
    local = local_targets(model)
    sharded = [p for p in paths if p not in local and _dtensor_weight(model.get_submodule(p))]
    paths = [f"{p}.linear" if local.get(p) == "rowwise" else p for p in paths if p not in sharded]
    if not paths:
        return Skip("quantize", offloaded_reason(len(offloaded), "linear layers") if offloaded else
                    "no nn.Linear layer to quantize (all excluded by modules_to_not_convert?)")
    notes: list[str] = [offloaded_reason(len(offloaded), "linear layers")] if offloaded else []
    if sharded:
        notes.append(f"{len(sharded)} tensor-parallel layers kept in float: their tp style keeps Transformers' "
                     f"forward (e.g. {sharded[0]})")
    if head is not None:
        if head in paths:
            notes.append(f"head {head} quantized int{head_bits(q)}"
                         + (" as its own copy; the tied input embedding stays float" if _tied(model) else ""))
        else:
            notes.append(f"head {head} kept in float (quantize_lm_head: false)")
    what = "int8 per channel" if q.bits == 8 else f"int4 g{q.group_size} {'sym' if q.sym else 'asym'}"
    if ctx.device.type == "cpu":
        from ..kernels import cpu_woq

        notes.append(cpu_woq.describe())

    if q.method in ("gptq", "awq"):
        return _plan_calibrated(model, ctx, cfg, paths, notes)

    def apply(rw) -> None:
        sqnr, padded, kernels = [], [], Counter()
        for path in paths:
            linear = model.get_submodule(path)
            new = rtn_layer(linear, head_bits(q) if path == head else q.bits, q)
            if isinstance(new, Int4Linear) and new.padded:
                padded.append(f"{path} ({new.in_features}->{new.in_features + new.padded})")
            sqnr.append(sqnr_db(linear_weight(linear), new.dequantize()))
            kernels[new.kernel] += 1
            rw.swap_module(path, new, lossless=False, keep_original=cfg.keep_original,
                           label=f"{type(new).__name__} ({new.kernel})")
        notes.append(f"quantization rtn {what} is lossy: weight SQNR min {min(sqnr):.1f} dB, mean "
                     f"{sum(sqnr) / len(sqnr):.1f} dB over {len(paths)} layers; measure the perplexity cost with "
                     f"`hfaccel eval ppl`")
        notes.append("kernels: " + ", ".join(f"{k} x{n}" for k, n in sorted(kernels.items())))
        if padded:
            notes.append(f"{len(padded)} layers padded to whole groups of {q.group_size}: "
                         + ", ".join(padded[:3]) + (" ..." if len(padded) > 3 else ""))

    return Plan("quantize", apply, f"rtn {what} on {len(paths)} linear layers", notes)


def _plan_calibrated(model: nn.Module, ctx, cfg, paths: list[str], notes: list[str]) -> Plan:
    from .awq import sequential_awq
    from .calibrate import calibration_ids, sequential_gptq

    q = cfg.quantization
    layers_path = ctx.spec.layers
    in_layers = [p for p in paths if p.startswith(layers_path + ".")]
    rest = [p for p in paths if p not in in_layers]                 # the head (quantize_lm_head), if any
    what = (f"{q.method} int4 g{q.group_size} {'sym' if q.sym else 'asym'}"
            f"{' act-order' if q.desc_act and q.method == 'gptq' else ''}")

    def apply(rw) -> None:
        ids, source = calibration_ids(model, q.calibration_samples, q.calibration_seq_len, ctx.tokenizer,
                                      ctx.calibration)
        if q.method == "gptq":
            stats = sequential_gptq(model, rw, layers_path, q, ids, lambda name: name not in in_layers,
                                    cfg.keep_original)
        else:
            excluded_ = [p for p in paths if p.startswith(layers_path + ".")]
            if len(excluded_) != sum(1 for n, m in model.named_modules() if n.startswith(layers_path + ".")
                                     and is_linear(m)):
                raise ValueError("awq scales whole decoder layers: modules_to_not_convert inside the decoder "
                                 "layers is not supported with method awq (use gptq or rtn)")
            stats = sequential_awq(model, rw, ctx.spec, q, ids, cfg.keep_original)
            notes.append(f"awq: mean alpha {stats['alpha_mean']:.2f}; {stats['unfoldable_pairs']} scale pairs not "
                         f"foldable (grouped-query v -> o)")
        sqnr = stats["sqnr"]
        for path in rest:                                            # outside the decoder layers: round to nearest
            linear = model.get_submodule(path)
            new = rtn_layer(linear, head_bits(q) if path == head_path(model) else q.bits, q)
            rw.swap_module(path, new, lossless=False, keep_original=cfg.keep_original,
                           label=f"{type(new).__name__} ({new.kernel}, rtn)")
            notes.append(f"{path}: outside the decoder layers, quantized round-to-nearest")
        notes.append(f"quantization {what} is lossy: {stats['layers']} layers, weight SQNR min {min(sqnr):.1f} dB, "
                     f"mean {sum(sqnr) / len(sqnr):.1f} dB; calibration: {source}; measure the perplexity cost "
                     f"with `hfaccel eval ppl`")
        notes.append("kernels: " + ", ".join(f"{k} x{n}" for k, n in sorted(stats["kernels"].items())))
        if stats["padded"]:
            notes.append(f"{stats['padded']} layers padded to whole groups of {q.group_size}")

    return Plan("quantize", apply, f"{what} on {len(paths)} linear layers", notes)


def _plan_bnb(model: nn.Module, ctx, cfg) -> Plan | Skip:
    from .bnb import bnb_available, bnb_layer, cpu_self_check

    q = cfg.quantization
    if not bnb_available():
        return Skip("quantize", f"{q.method} needs bitsandbytes, which is not installed (pip install bitsandbytes)")
    compute = ctx.target_dtype if ctx.target_dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    if ctx.device.type == "cpu":
        problem = cpu_self_check(q.method, compute)
        if problem:
            return Skip("quantize", problem)
    elif ctx.device.type != "cuda":
        return Skip("quantize", f"{q.method} runs on CUDA or CPU; the model is on {ctx.device}")
    paths, head = target_linears(model, q)
    paths, offloaded = resident(paths, ctx)
    notes = [f"head {head} kept in float (quantize_lm_head: false)"] if head and head not in paths else []
    notes += [offloaded_reason(len(offloaded), "linear layers")] if offloaded else []
    kind = "LLM.int8 (threshold 6.0)" if q.method == "bnb-int8" else "NF4"

    def apply(rw) -> None:
        for path in paths:
            new = bnb_layer(model.get_submodule(path), q.method, compute, ctx.device)
            rw.swap_module(path, new, lossless=False, keep_original=cfg.keep_original,
                           label=f"{type(new).__name__} (bitsandbytes {kind})")
        notes.append(f"quantization bitsandbytes {kind} is lossy; measure the perplexity cost with `hfaccel eval ppl`"
                     + ("; on this CPU bitsandbytes is slower than hfaccel's own int8/int4 layers (method rtn)"
                        if ctx.device.type == "cpu" else ""))

    return Plan("quantize", apply, f"bitsandbytes {kind} on {len(paths)} linear layers", notes)
