"""Calibration data and the sequential, layer-by-layer GPTQ pass.

Calibration text: the CPython docs' calibration slice (never the held-out slice perplexity is measured
on) unless the caller gives a list of strings or a datasets.Dataset (its "text" column). It is tokenized
with the caller's tokenizer, else the tokenizer saved beside the model (model.name_or_path), else folded
bytes (and the report says so), then cut into `samples` windows of `seq_len` tokens at evenly spaced,
deterministic offsets.

The pass: capture the inputs of the first decoder layer for every sample (a pre-hook stops the forward
there), then for each layer in turn: accumulate each linear's Hessian from its inputs, quantize every
linear with GPTQ, swap in the Int4Linear modules, and run the layer again, now quantized, to make the
next layer's inputs (errors of earlier layers are seen by later ones).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .gptq import gptq_quantize
from .layers import Int4Linear, is_linear, linear_weight, pad_columns, sqnr_db


class _Stop(Exception):
    pass


def resolve_tokenizer(model: nn.Module, tokenizer=None) -> tuple[Any, str]:
    if tokenizer is not None:
        return tokenizer, "the given tokenizer"
    path = getattr(model, "name_or_path", "") or ""
    if path and os.path.isdir(path):
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path), f"the tokenizer in {path}"
        except (OSError, ValueError):
            pass
    return None, "no tokenizer found: calibration text folded bytes into the vocabulary (pass tokenizer=)"


def calibration_ids(model: nn.Module, samples: int, seq_len: int, tokenizer=None, calibration=None
                    ) -> tuple[torch.Tensor, str]:
    """([samples, seq_len] token ids, where the text and tokens came from)."""
    from ..data import calibration_text, encode

    if calibration is None:
        text, source = calibration_text(), "CPython docs (calibration slice)"
    elif isinstance(calibration, str):
        text, source = calibration, "the given text"
    elif hasattr(calibration, "column_names") and "text" in calibration.column_names:
        text, source = "\n\n".join(calibration["text"]), f"the given dataset ({len(calibration)} rows)"
    elif isinstance(calibration, (list, tuple)) and all(isinstance(t, str) for t in calibration):
        text, source = "\n\n".join(calibration), f"the given {len(calibration)} strings"
    else:
        raise TypeError(f"calibration must be a string, a list of strings or a datasets.Dataset with a 'text' "
                        f"column; got {type(calibration).__name__}")
    tok, tok_source = resolve_tokenizer(model, tokenizer)
    ids = encode(tok, text, model.config.vocab_size)
    if len(ids) < seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than calibration_seq_len = {seq_len}")
    span = len(ids) - seq_len
    starts = [round(i * span / max(samples - 1, 1)) for i in range(samples)]
    rows = torch.tensor([ids[s:s + seq_len] for s in starts])
    return rows, f"{samples} x {seq_len} tokens of {source}, tokenized with {tok_source}"


@torch.inference_mode()
def first_layer_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor):
    """(hidden states per sample, the keyword arguments the model passes its decoder layers)."""
    hidden: list[torch.Tensor] = []
    kwargs: dict[str, Any] = {}

    def grab(module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.clear()
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for row in ids:
            try:
                model(row[None].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    return hidden, kwargs


def _out(result):
    return result[0] if isinstance(result, tuple) else result


def run_with_input_hooks(layer: nn.Module, names: list[str], hidden: list[torch.Tensor], kw: dict[str, Any],
                         fn: Callable[[str, torch.Tensor], None]) -> None:
    """Run `layer` on every sample, calling fn(name, [tokens, in_features] float input) for each named linear."""
    def hook(name):
        def on_forward(module, args, output):
            fn(name, args[0].reshape(-1, args[0].shape[-1]).float())
        return on_forward

    handles = [layer.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for h in hidden:
            layer(h, **kw)
    finally:
        for handle in handles:
            handle.remove()


class InstallStats:
    """Swaps quantized layers in and counts what the report says about them."""

    def __init__(self):
        self.layers, self.padded, self.kernels, self.sqnr = 0, 0, {}, []

    def install(self, rw, path: str, module: nn.Module, codes, scales, zeros, group_size: int, method: str,
                keep_original: bool) -> None:
        w = linear_weight(module)
        new = Int4Linear(codes.to(w.device), scales.to(w.device), zeros.to(w.device), group_size, module.bias,
                         in_features=w.shape[1])
        self.sqnr.append(sqnr_db(w, new.dequantize()))
        self.padded += bool(new.padded)
        self.kernels[new.kernel] = self.kernels.get(new.kernel, 0) + 1
        rw.swap_module(path, new, lossless=False, keep_original=keep_original,
                       label=f"Int4Linear ({new.kernel}, {method})")
        self.layers += 1

    def as_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "padded": self.padded, "kernels": self.kernels, "sqnr": self.sqnr}


@torch.inference_mode()
def sequential_gptq(model: nn.Module, rw, layers_path: str, q, ids: torch.Tensor, skip: Callable[[str], bool],
                    keep_original: bool, progress: bool = True) -> dict[str, Any]:
    """Quantize every linear of every decoder layer with GPTQ; returns counts for the report."""
    from tqdm.auto import tqdm

    layers = model.get_submodule(layers_path)
    hidden, kw = first_layer_inputs(model, layers, ids)
    stats = InstallStats()
    for li in tqdm(range(len(layers)), desc="gptq", unit="layer", disable=not progress, leave=False):
        layer = layers[li]
        names = [n for n, m in layer.named_modules() if is_linear(m) and not skip(f"{layers_path}.{li}.{n}")]
        hess: dict[str, torch.Tensor] = {}
        count: dict[str, int] = {}

        def accumulate(name: str, x: torch.Tensor) -> None:     # running mean of 2 x x^T over all tokens
            n = x.shape[0]
            if name not in hess:
                hess[name], count[name] = 2 / n * x.T @ x, n
            else:
                total = count[name] + n
                hess[name] = hess[name] * (count[name] / total) + 2 / total * x.T @ x
                count[name] = total

        run_with_input_hooks(layer, names, hidden, kw, accumulate)
        for n in names:
            module = layer.get_submodule(n)
            w = linear_weight(module)
            k = w.shape[1]
            wp = pad_columns(w, q.group_size)
            hp = torch.zeros(wp.shape[1], wp.shape[1])
            hp[:k, :k] = hess[n].cpu()
            codes, scales, zeros = gptq_quantize(wp.cpu(), hp, q.group_size, q.sym, q.damp_percent, q.desc_act)
            stats.install(rw, f"{layers_path}.{li}.{n}", module, codes, scales, zeros, q.group_size, "gptq",
                          keep_original)
        hidden = [_out(layer(h, **kw)) for h in hidden]
    return stats.as_dict()
