"""Small shims over Transformers versions.

transformers 5.24 renamed the cache argument of model forward() from `past_key_values` to `cache` (the old
name warns and goes away in 5.40). Code that calls forward() itself passes `**cache_arg(model, cache)`.
"""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _cache_name(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(model, cache) -> dict:
    """{name: cache} for model.forward, with the name this Transformers version takes."""
    return {_cache_name(type(model)): cache}


CACHE_KWARGS = ("past_key_values", "cache")


def given_cache(kwargs: dict):
    """The cache a generate()/forward() call brings, under either name (None when it brings none)."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_cache(out):
    """The cache a generate() output carries (`cache` from 5.24 on, `past_key_values` before)."""
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    return None


def call_arguments(sig, args, kwargs) -> dict | None:
    """The arguments of one generate() call by name, its **kwargs merged in; None when the call does not bind
    (generate() itself then reports the bad call)."""
    try:
        given = dict(sig.bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return None
    given.update(given.pop("kwargs", {}))
    return given


def check_prompt(given: dict, device) -> None:
    """Refuse, with what to do, a generate() prompt that is empty or on another device than the model."""
    import torch

    prompt = given.get("inputs")
    if prompt is None:
        prompt = given.get("input_ids")
    if not isinstance(prompt, torch.Tensor) or given.get("inputs_embeds") is not None:
        return
    if prompt.device != torch.device(device):
        raise ValueError(f"input_ids are on {prompt.device}, the model on {device}; move them first "
                         f"(input_ids.to(model.device))")
    if prompt.dim() == 2 and prompt.shape[1] == 0:
        raise ValueError(f"empty prompt: input_ids has shape {list(prompt.shape)}; give at least one token "
                         f"(e.g. the tokenizer's bos_token_id)")
