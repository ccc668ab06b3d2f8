"""The speculative feature: attach a draft once; every later generate() drafts and verifies.

model.generate is rebound on the instance. A call it can reproduce exactly (greedy, or sampling with
temperature / top-k / top-p; any batch size; left padding; EOS, pad, min/max new tokens; a streamer at
batch 1) runs the batched draft-and-verify loop (hfaccel.speculative.loop) on the cache generate() would
use: a PagedCache from the model's pool (prefix reuse included) or a DynamicCache. Every other call goes
to the generate() underneath unchanged, and so does a call with its own `assistant_model=` or
`prompt_lookup_num_tokens=` (Transformers' assisted generation, which then takes precedence).

`model.hfaccel_spec_stats`: acceptance rate, tokens per target forward, seconds in draft and target;
`.last` holds the latest call's figures.
"""

from __future__ import annotations

import functools
import inspect
import threading

import torch
from torch import nn

from ..cache.paged import PagedCache
from ..compat import cache_arg, call_arguments, check_prompt
from ..compile import _eos_and_pad, _new_token_budget, _setting, inferred_mask, why_not, width_times
from ..errors import ConfigError
from ..registry import Plan, register_feature
from ..report import Skip
from .drafts import Draft, ModelDraft, PromptLookup, layer_skip, quantized_copy
from .loop import DraftPolicy, Sampling, SpecStats, Verifier

SAMPLING_KWARGS = ("do_sample", "temperature", "top_k", "top_p")
ASSISTED = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "assistant_tokenizer")


def _sampling(model, kwargs) -> Sampling | None | str:
    """Sampling settings of a call; None for greedy; a string when the call samples in a way not handled."""
    if not _setting(model, kwargs, "do_sample"):
        return None
    for name in ("typical_p", "epsilon_cutoff", "eta_cutoff", "min_p", "top_h"):
        v = _setting(model, kwargs, name)
        if v not in (None, 1.0, 0.0):
            return f"{name}={v!r}"
    t = _setting(model, kwargs, "temperature")
    t = 1.0 if t is None else float(t)
    if t <= 0:
        return f"temperature={t!r}"
    k = _setting(model, kwargs, "top_k")
    p = _setting(model, kwargs, "top_p")
    return Sampling(temperature=t, top_k=int(k) if k else None, top_p=float(p) if p is not None else None)


def eligibility(model, kwargs: dict) -> tuple[str | None, Sampling | None]:
    """(why the loop cannot reproduce this call, or None; its sampling settings)."""
    if any(kwargs.get(k) is not None for k in ASSISTED):
        return "assisted generation asked for by the call", None
    sampling = _sampling(model, kwargs)
    if isinstance(sampling, str):
        return sampling, None
    rest = {k: v for k, v in kwargs.items() if k not in SAMPLING_KWARGS and k not in ("typical_p", "min_p")}
    gc = rest.get("generation_config")
    if sampling is not None:             # why_not checks greedy settings; let it see do_sample as unset
        rest["do_sample"] = False
    ids = rest.get("input_ids")
    if rest.get("attention_mask") is None and isinstance(ids, torch.Tensor) and ids.dim() == 2:
        rest["attention_mask"] = torch.ones_like(ids)      # what generate() uses when it cannot infer one
    reason = why_not(model, rest)
    if reason is not None and reason.startswith("cache_implementation"):
        reason = None                    # the loop brings its own cache, whatever generate() would use
    if reason is None and gc is not None and getattr(gc, "stop_strings", None):
        reason = "stop_strings"
    if reason is None and kwargs.get("streamer") is not None:
        ids = kwargs.get("input_ids", kwargs.get("inputs"))
        if ids.shape[0] != 1:
            reason = "a streamer with batch > 1"
    return reason, sampling


def _cache_for(model, ids: torch.Tensor, mask: torch.Tensor | None):
    pool = model.__dict__.get("hfaccel_kv_pool")
    if pool is not None:
        from ..cache import attention as paged_attention

        rows, per_row = ids.shape[0], ids.shape[1]
        if rows * pool.blocks.blocks_for(per_row) <= pool.blocks.num_free:
            mode = "paged" if paged_attention.is_paged(model.config._attn_implementation) else "gather"
            return PagedCache.for_prompt(pool, ids, mask, reuse=True, attention=mode)
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def make_generate(model: nn.Module, draft: Draft, spec, stats: SpecStats, policy: DraftPolicy):
    original = model.generate
    sig = inspect.signature(original)
    lock = threading.RLock()

    def fallback(reason, args, kwargs):
        stats.fallback_calls += 1
        stats.fallback_reasons[reason] = stats.fallback_reasons.get(reason, 0) + 1
        return original(*args, **kwargs)

    @functools.wraps(original)
    def generate(*args, **kwargs):
        given = call_arguments(sig, args, kwargs)
        if given is None:
            return original(*args, **kwargs)
        check_prompt(given, model.device)
        if given.get("inputs") is not None and given.get("input_ids") is None:
            given["input_ids"] = given.pop("inputs")
        if given.get("attention_mask") is None and isinstance(given.get("input_ids"), torch.Tensor):
            mask = inferred_mask(model, given)
            if mask is not None:
                given["attention_mask"] = mask
        reason, sampling = eligibility(model, given)
        if reason is not None:
            return fallback(reason, args, kwargs)
        ids = given["input_ids"]
        new, min_new = _new_token_budget(model, given, ids.shape[1])
        if new < 1:
            return fallback("no new tokens", args, kwargs)
        eos, pad = _eos_and_pad(model, given)
        mask = given.get("attention_mask")
        streamer = given.get("streamer")
        with lock:
            cache = _cache_for(model, ids, mask)
            # the pool's rows grow by the kept columns; a row can keep at most new + k per call
            need = ids.shape[1] + new * (policy.max_k + 1)
            if isinstance(cache, PagedCache) and ids.shape[0] * cache.pool.blocks.blocks_for(need) \
                    > cache.pool.blocks.num_free:
                cache.release()
                from transformers import DynamicCache

                cache = DynamicCache(config=model.config)
            loop = Verifier(model, draft, cache, policy=policy, stats=stats, sampling=sampling,
                            compiled=model.__dict__.get("hfaccel_compiled_verify"))
            try:
                if streamer is not None:
                    streamer.put(ids.cpu())
                rest = loop.run(ids, mask, new, min_new, eos, pad, streamer=streamer)
                stats.calls += 1
                stats.calibration_seconds = policy.measure_seconds
            finally:
                if isinstance(cache, PagedCache):
                    cache.release()
                    cache.pool.snapshot()
        return torch.cat([ids, rest], dim=1)

    return generate


def max_draft_tokens(spec) -> int:
    """speculative.num_draft_tokens, or its default: 10 for prompt lookup (its drafts cost nothing), else 5."""
    return spec.num_draft_tokens or (10 if spec.draft == "prompt-lookup" else 5)


def _draft_problem(model: nn.Module, draft: nn.Module) -> str | None:
    tv = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    dv = draft.get_output_embeddings().weight.shape[0] if draft.get_output_embeddings() is not None else None
    if tv is None or dv is None:
        return "the draft or the target has no output embeddings"
    if dv != tv:
        return f"the draft's vocabulary has {dv} entries, the target's {tv}: they must share one tokenizer"
    return None


@torch.inference_mode()
def measure_widths(model: nn.Module, max_width: int, context: int = 64, reps: int = 3, batch: int = 1) -> list[float]:
    """Seconds of one forward of width 1..max_width over a `context`-token cache (`batch` rows, median of
    `reps` after a warm-up); index 0 is unused."""

    from transformers import DynamicCache

    dev = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, context + max_width), generator=g).to(dev)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :context], **cache_arg(model, cache), use_cache=True, logits_to_keep=1)
    return width_times(lambda w: model(input_ids=ids[:, context:context + w], **cache_arg(model, cache),
                                       use_cache=True),
                       max_width, reps, dev, after=lambda w: cache.crop(-w))


def build_draft(model: nn.Module, spec, cfg, draft_model=None) -> tuple[Draft, str]:
    d = spec.draft
    if draft_model is not None or (d not in (None, "prompt-lookup", "self-int8", "self-int4")
                                   and not d.startswith("layer-skip")):
        if draft_model is None:
            from transformers import AutoModelForCausalLM

            draft_model = AutoModelForCausalLM.from_pretrained(d, dtype=next(model.parameters()).dtype,
                                                               use_safetensors=True).eval()
            draft_model.to(next(model.parameters()).device)
        problem = _draft_problem(model, draft_model)
        if problem:
            raise ConfigError(f"speculative.draft = {d!r}: {problem}", key="speculative.draft", value=d)
        n = sum(p.numel() for p in draft_model.parameters())
        return ModelDraft(draft_model, "model", spec.confidence_threshold), \
            f"draft model {type(draft_model).__name__} ({n / 1e6:.1f}M parameters)"
    if d == "prompt-lookup":
        return PromptLookup(), "prompt lookup (n-grams of 3, 2, 1 from each row's own tokens)"
    if d.startswith("layer-skip"):
        n = int(d.partition(":")[2])
        return ModelDraft(layer_skip(model, n), d, spec.confidence_threshold), \
            f"the target's first {n} layers + its norm and head (parameters shared)"
    bits = 8 if d == "self-int8" else 4
    q = quantized_copy(model, bits)
    nbytes = sum(t.numel() * t.element_size() for t in list(q.parameters()) + list(q.buffers()))
    return ModelDraft(q, d, spec.confidence_threshold), \
        f"RTN int{bits} copy of the target ({nbytes / 2**20:.0f} MiB)"


def speculative_problem(model: nn.Module, cfg, draft_model=None) -> str | None:
    d = cfg.speculative.draft
    if model.config.is_encoder_decoder:
        return "encoder-decoder models are not supported"
    if not model._supports_default_dynamic_cache():
        return f"{type(model).__name__} builds its own cache (crop() is needed to roll back rejected drafts)"
    layer_types = getattr(model.config.get_text_config(), "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return (f"layer types {sorted(set(layer_types))}: a sliding-window cache cannot be cropped back, "
                f"which rejected drafts need")
    if d in ("self-int8", "self-int4"):
        from ..placement import Placement

        placement = Placement.detect(model)
        from ..tp import tp_size

        if tp_size(model) > 1:
            return f"draft {d}: a quantized copy of a tensor-parallel model is not made (use prompt-lookup)"
        if placement and placement.offloaded:
            return (f"draft {d}: {len(placement.offloaded)} modules of the target are offloaded; a quantized copy "
                    f"cannot be made from their meta tensors (use prompt-lookup or layer-skip:N)")
    if d in ("self-int8", "self-int4") and cfg.quantization.method != "none":
        return (f"draft {d}: the target is already quantized ({cfg.quantization.method}, {cfg.quantization.bits} "
                f"bit); its quantized copy would cost as much as the target")
    if d is not None and d not in ("prompt-lookup", "self-int8", "self-int4") and not d.startswith("layer-skip") \
            and draft_model is None:
        from pathlib import Path

        if not (Path(d) / "config.json").is_file():
            raise ConfigError(f"speculative.draft = {d!r} is not allowed: it is neither prompt-lookup, self-int8, "
                              f"self-int4, layer-skip:N nor a model folder with a config.json",
                              key="speculative.draft", value=d)
    if d is not None and d.startswith("layer-skip"):
        n = int(d.partition(":")[2])
        total = model.config.get_text_config().num_hidden_layers
        if n >= total:
            raise ConfigError(f"speculative.draft = {d!r} is not allowed for a model of {total} layers; allowed: "
                              f"layer-skip:1 to layer-skip:{total - 1}", key="speculative.draft", value=d)
        try:
            from .drafts import _layer_list

            _layer_list(model)
        except ValueError as e:
            return str(e)
    return None


@register_feature("speculative", stage="speculative")
def plan_speculative(model: nn.Module, ctx, cfg) -> Plan | Skip | None:
    spec = cfg.speculative
    draft_model = getattr(ctx, "draft_model", None)
    if spec.draft is None and draft_model is None:
        return None
    problem = speculative_problem(model, cfg, draft_model)
    if problem:
        return Skip("speculative", f"speculative decoding: {problem}")
    if draft_model is not None:
        problem = _draft_problem(model, draft_model)
        if problem:
            raise ConfigError(f"draft_model: {problem}", key="draft_model", value=type(draft_model).__name__)
    what = spec.draft if draft_model is None else f"{type(draft_model).__name__} (draft_model=)"

    def apply(rw) -> None:
        draft, label = build_draft(model, spec, cfg, draft_model)
        max_k = max_draft_tokens(spec)
        stats = SpecStats()

        def measure(batch: int, compiled=None, greedy: bool = True) -> tuple[list[float], float]:
            reps = 3 if batch == 1 else 2
            draft_cost = 0.0
            if isinstance(draft, ModelDraft):     # a compiled draft (compile stage) when the verify is compiled too
                draft_cost = (compiled is not None and draft.token_cost(batch, reps)) or \
                    measure_widths(draft.model, 1, reps=reps, batch=batch)[1]
            if compiled is not None:              # the compile stage's verify step (hfaccel.compile)
                return compiled.verify_costs(batch, max_k + 1, reps=reps, greedy=greedy), draft_cost
            return measure_widths(model, max_k + 1, reps=reps, batch=batch), draft_cost

        cost, draft_cost = measure(1)
        policy = DraftPolicy(max_k, spec.adaptive, cost, draft_cost, measure=measure if spec.adaptive else None)
        rw.set_attr(model, "hfaccel_spec_stats", stats, target="hfaccel_spec_stats",
                    label="acceptance, tokens per target forward, draft/target seconds")
        rw.set_attr(model, "hfaccel_draft", draft, target="hfaccel_draft", label=label)
        adapt = "adaptive" if spec.adaptive else "fixed"
        widths = " ".join(f"{w}:{c * 1e3:.1f}" for w, c in enumerate(cost) if w)
        rw.set_attr(model, "generate", make_generate(model, draft, spec, stats, policy), target="generate",
                    label=f"speculative generate() ({spec.draft or 'draft model'}, up to {max_k} "
                          f"draft tokens, {adapt}; batch 1 verify ms by width {widths}; draft token "
                          f"{draft_cost * 1e3:.1f} ms; other batch sizes measured at their first call)")

    return Plan("speculative", apply, f"speculative decoding (draft={what}, up to {max_draft_tokens(spec)} tokens, "
                                      f"{'adaptive' if spec.adaptive else 'fixed'})")


__all__ = ["build_draft", "eligibility", "make_generate", "max_draft_tokens", "plan_speculative"]

