"""AWQ (Lin et al., 2023): activation-aware per-channel scales, then clipping, then int4.

Per decoder layer, on the layer's calibration inputs (sequential, like GPTQ: each layer sees the
quantized outputs of the layers before it):
1. scale search, for each (previous op -> linears) pair across which a per-channel scale can be folded
   exactly: input norm -> q, k, v (or fused qkv); v -> o (when their widths match, i.e. no GQA);
   post-attention norm -> gate, up (or fused gate_up, or a plain up); up -> down (gated MLPs only: the
   scale passes through act(gate) * up, not through a nonlinearity). With x_mean the mean |activation|
   per input channel, s = x_mean ** alpha (normalised), alpha on a grid of 20 in [0, 1); the alpha whose
   fake-quantized W * s (applied to x / s) reproduces the float outputs best wins. The previous op is
   divided by s, the linears' input columns multiplied by s: the float model is unchanged, the quantized
   one keeps its salient channels.
2. clip search, for every linear but q and k: per output channel and group, the max-range ratio in
   1.0 .. 0.5 that minimises the group's output error.
3. int4 quantization of the scaled, clipped weights (Int4Linear).
Scales folded into norms and projections are recorded as rescaled tensors; revert needs keep_original.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .calibrate import InstallStats, _out, first_layer_inputs, run_with_input_hooks
from .layers import int4_params, linear_weight, pad_columns, quantize_with

ALPHAS = [i / 20 for i in range(20)]
CLIP_RATIOS = [1.0 - 0.05 * i for i in range(11)]


def fake_quant(w: torch.Tensor, group_size: int, sym: bool, clip: Any = 1.0) -> torch.Tensor:
    k = w.shape[1]
    wp = pad_columns(w.float(), group_size)
    s, z = int4_params(wp, group_size, sym, clip)
    q = quantize_with(wp, s, z, group_size).float()
    deq = (q - 8) * s.T.repeat_interleave(group_size, 1) + z.T.repeat_interleave(group_size, 1)
    return deq[:, :k]


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], group_size: int, sym: bool) -> tuple[torch.Tensor, float]:
    """(per-input-channel scale [K], the alpha chosen) for linears sharing input x [T, K]."""
    x = x.float()
    x_mean = x.abs().mean(dim=0)
    ref = [x @ w.float().T for w in weights]
    best, best_s, best_alpha = float("inf"), torch.ones_like(x_mean), 0.0
    for alpha in ALPHAS:
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, y in zip(weights, ref):
            wq = fake_quant(w.float() * s, group_size, sym) / s
            err += (x @ wq.T - y).pow(2).mean().item()
        if err < best:
            best, best_s, best_alpha = err, s, alpha
    return best_s, best_alpha


def search_clip(w: torch.Tensor, x: torch.Tensor, group_size: int, sym: bool) -> torch.Tensor:
    """Per (output channel, group) max-range ratio [N, K/g] minimising the group's output error."""
    wp = pad_columns(w.float(), group_size)
    xp = pad_columns(x.float(), group_size)
    n, kp = wp.shape
    ng = kp // group_size
    xg = xp.view(-1, ng, group_size)
    ref = torch.einsum("tgk,ngk->tng", xg, wp.view(n, ng, group_size))
    best_err = torch.full((n, ng), float("inf"))
    best = torch.ones(n, ng)
    for ratio in CLIP_RATIOS:
        deq = fake_quant(wp, group_size, sym, ratio)
        out = torch.einsum("tgk,ngk->tng", xg, deq.view(n, ng, group_size))
        err = (out - ref).pow(2).mean(dim=0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best


def _fold_into_prev(rw, prev: nn.Module, prev_path: str, kind: str, s: torch.Tensor, keep: bool) -> None:
    """Divide the previous op's output channels by s."""
    if kind in ("rms", "layernorm"):
        rw.set_tensor(prev.weight, prev.weight.data / s.to(prev.weight.dtype), target=f"{prev_path}.weight",
                      keep_original=keep)
        if getattr(prev, "bias", None) is not None:
            rw.set_tensor(prev.bias, prev.bias.data / s.to(prev.bias.dtype), target=f"{prev_path}.bias",
                          keep_original=keep)
    elif kind == "rms_plus_one":                         # gemma: y = norm(x) * (1 + w)
        w = prev.weight.data
        rw.set_tensor(prev.weight, ((1 + w.float()) / s - 1).to(w.dtype), target=f"{prev_path}.weight",
                      keep_original=keep)
    else:                                               # a linear: its output rows
        w = prev.weight.data
        scaled = w / s[:, None].to(w.dtype) if isinstance(prev, nn.Linear) else w / s[None, :].to(w.dtype)
        rw.set_tensor(prev.weight, scaled, target=f"{prev_path}.weight", keep_original=keep)
        if prev.bias is not None:
            rw.set_tensor(prev.bias, prev.bias.data / s.to(prev.bias.dtype), target=f"{prev_path}.bias",
                          keep_original=keep)


def _scale_inputs(rw, linear: nn.Module, path: str, s: torch.Tensor, keep: bool) -> None:
    w = linear.weight.data
    scaled = w * s[None, :].to(w.dtype) if isinstance(linear, nn.Linear) else w * s[:, None].to(w.dtype)
    rw.set_tensor(linear.weight, scaled, target=f"{path}.weight", keep_original=keep)


def _groups(spec) -> list[tuple[str, str, list[str]]]:
    """(previous op, its kind, linears) pairs, names relative to a decoder layer."""
    a, m = spec.attention, spec.mlp
    att = [f"{a.module}.{n}" for n in ((a.q, a.k, a.v) if a.q else (a.qkv,))]
    out = [(spec.norm_input, spec.norm_type, att)]
    if a.v:
        out.append((f"{a.module}.{a.v}", "linear", [f"{a.module}.{a.o}"]))
    mlp = [f"{m.module}.{n}" for n in ((m.gate, m.up) if m.gate else (m.gate_up,) if m.gate_up else (m.up,))]
    out.append((spec.norm_post_attention, spec.norm_type, mlp))
    if m.gate and m.up:
        out.append((f"{m.module}.{m.up}", "linear", [f"{m.module}.{m.down}"]))
    return out


@torch.inference_mode()
def sequential_awq(model: nn.Module, rw, spec, q, ids: torch.Tensor, keep_original: bool, progress: bool = True,
                   max_tokens: int = 2048) -> dict[str, Any]:
    from tqdm.auto import tqdm

    layers = model.get_submodule(spec.layers)
    hidden, kw = first_layer_inputs(model, layers, ids)
    no_clip = {spec.attention.q, spec.attention.k} - {None}
    stats = InstallStats()
    alphas, skipped_pairs = [], 0
    for li in tqdm(range(len(layers)), desc="awq", unit="layer", disable=not progress, leave=False):
        layer = layers[li]
        base = f"{spec.layers}.{li}"
        groups = _groups(spec)
        linears = [n for _, _, names in groups for n in names]
        inputs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        run_with_input_hooks(layer, linears, hidden, kw, lambda name, x: inputs[name].append(x))
        g = torch.Generator().manual_seed(li)
        xs = {}
        for n, parts in inputs.items():
            x = torch.cat(parts)
            xs[n] = x[torch.randperm(len(x), generator=g)[:max_tokens]] if len(x) > max_tokens else x
        for prev, kind, names in groups:
            prev_mod = layer.get_submodule(prev)
            width = xs[names[0]].shape[1]
            prev_width = (linear_weight(prev_mod).shape[0] if kind == "linear" else prev_mod.weight.shape[0])
            if prev_width != width:                          # e.g. v -> o under GQA: not foldable
                skipped_pairs += 1
                continue
            s, alpha = search_scale(xs[names[0]], [linear_weight(layer.get_submodule(n)) for n in names],
                                    q.group_size, q.sym)
            alphas.append(alpha)
            _fold_into_prev(rw, prev_mod, f"{base}.{prev}", kind, s, keep_original)
            for n in names:
                _scale_inputs(rw, layer.get_submodule(n), f"{base}.{n}", s, keep_original)
                xs[n] = xs[n] / s
        for n in linears:
            module = layer.get_submodule(n)
            w = linear_weight(module)
            leaf = n.rpartition(".")[2]
            clip = 1.0 if leaf in no_clip else search_clip(w, xs[n][:256], q.group_size, q.sym)
            wp = pad_columns(w.float(), q.group_size)
            s, z = int4_params(wp, q.group_size, q.sym, clip)
            codes = quantize_with(wp, s, z, q.group_size)
            stats.install(rw, f"{base}.{n}", module, codes, s, z, q.group_size, "awq", keep_original)
        hidden = [_out(layer(h, **kw)) for h in hidden]
    return {**stats.as_dict(), "alpha_mean": sum(alphas) / len(alphas) if alphas else 0.0,
            "unfoldable_pairs": skipped_pairs}
