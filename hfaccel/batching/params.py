"""Per-request sampling settings, checked when a request is submitted (never mid-batch)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0                     # 0: off
    top_p: float = 1.0                 # 1.0: off
    seed: int | None = None            # sampling: the request's own generator, reproducible in any batch
    eos_token_id: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()  # needs a tokenizer; the output keeps the token that completes one

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens, isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             "an int >= 1"),
            ("min_new_tokens", self.min_new_tokens, isinstance(self.min_new_tokens, int) and
             0 <= self.min_new_tokens <= self.max_new_tokens, f"an int in 0..max_new_tokens ({self.max_new_tokens})"),
            ("temperature", self.temperature, isinstance(self.temperature, (int, float)) and self.temperature > 0,
             "a number > 0"),
            ("top_k", self.top_k, isinstance(self.top_k, int) and self.top_k >= 0, "an int >= 0"),
            ("top_p", self.top_p, isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("seed", self.seed, self.seed is None or isinstance(self.seed, int), "an int or None"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} = {value!r} is not allowed; allowed: {allowed}")

    @classmethod
    def from_kwargs(cls, generation_config=None, **kw: Any) -> "SamplingParams":
        """From a transformers GenerationConfig (its sampling fields) overridden by keyword arguments."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ValueError(f"unknown sampling setting(s) {unknown}; allowed: {', '.join(sorted(known))}")
        base: dict[str, Any] = {}
        if generation_config is not None:
            g = generation_config
            base = {"do_sample": bool(g.do_sample), "temperature": g.temperature or 1.0,
                    "top_k": g.top_k or 0, "top_p": g.top_p if g.top_p is not None else 1.0,
                    "min_new_tokens": g.min_new_tokens or 0}
            if g.max_new_tokens is not None:
                base["max_new_tokens"] = g.max_new_tokens
            if g.eos_token_id is not None:
                base["eos_token_id"] = g.eos_token_id
            if getattr(g, "stop_strings", None):
                base["stop_strings"] = g.stop_strings
        base.update(kw)
        for key in ("eos_token_id", "stop_strings"):
            v = base.get(key)
            if v is None:
                base.pop(key, None)
            elif isinstance(v, (int, str)):
                base[key] = (v,)
            else:
                base[key] = tuple(v)
        return replace(cls(), **base)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from [V] logits: argmax for greedy, else temperature, top-k, top-p, then a draw."""
    if not params.do_sample:
        return int(logits.argmax())
    x = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(x, min(params.top_k, x.shape[-1])).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        order = torch.argsort(x, descending=True)
        probs = torch.softmax(x[order], dim=-1)
        drop = probs.cumsum(-1) - probs > params.top_p          # keep the smallest set whose mass reaches top_p
        x[order[drop]] = float("-inf")
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


__all__ = ["SamplingParams", "sample"]
