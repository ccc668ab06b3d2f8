"""Quality measures for lossy rewrites: perplexity on held-out text, greedy token agreement."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .compat import cache_arg
from .data import encode, held_out_text


@torch.inference_mode()
def perplexity(model: nn.Module, tokenizer=None, *, text: str | None = None, window: int = 512,
               max_windows: int = 8, chunk: int | None = None) -> dict[str, Any]:
    """Perplexity over non-overlapping `window`-token windows of `text` (default: the held-out docs slice).

    Fixed windows from the start of the text, so two models see exactly the same tokens.
    chunk: feed each window `chunk` tokens at a time through the cache generate() would use (so the K/V
    of earlier chunks are read back from it, as in decoding: this is how a KV-cache quantization shows
    its cost); None: one forward per window.
    """
    if window < 2:
        raise ValueError(f"window = {window} is too small; allowed: >= 2 tokens")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit:
        window = min(window, int(limit))
    ids = encode(tokenizer, text if text is not None else held_out_text(), model.config.vocab_size)
    n = min(max_windows, len(ids) // window)
    if n < 1:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    device = next(model.parameters()).device
    batch = torch.tensor(ids[: n * window], device=device).view(n, window)
    nll, count = 0.0, 0
    for row in batch:
        if chunk:
            from .cache.feature import new_cache

            cache = new_cache(model)
            parts = [model(row[None, i:i + chunk], **cache_arg(model, cache), use_cache=True).logits[0]
                     for i in range(0, window, chunk)]
            if hasattr(cache, "release"):
                cache.release()
            logits = torch.cat(parts)[:-1].float()
        else:
            logits = model(row[None]).logits[0, :-1].float()
        nll += nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
        count += window - 1
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": n, "window": window}


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `approx` against `reference`, in dB (inf when equal)."""
    err = (reference.float() - approx.float()).pow(2).sum().item()
    sig = reference.float().pow(2).sum().item()
    return float("inf") if err == 0 else 10 * math.log10(sig / err)


def token_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of positions where two [B, T] greedy outputs hold the same token."""
    if a.shape != b.shape:
        t = min(a.shape[-1], b.shape[-1])
        a, b = a[..., :t], b[..., :t]
    return (a == b).float().mean().item() if a.numel() else 1.0
