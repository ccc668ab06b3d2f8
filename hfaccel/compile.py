"""Compiled decode step: generate() hands its prefill and first token to Transformers (on whatever cache the
kv_cache feature gives it: paged with prefix reuse, dynamic or static), copies the prompt's K/V once into a
contiguous, bucketed decode buffer, and runs every later token through one torch.compile'd function
(Inductor C++ on CPU; CUDA graphs on GPU with mode reduce-overhead).

Why a step of our own rather than Transformers' static-cache auto-compile. Measured on the 2-core CPU with
SmolLM2-135M int4 (RTN g64), batch 1, 100 tokens:
- Transformers' own path (StaticCache + CompileConfig): 116 tok/s. It checks Dynamo guards on every module
  at each call (~1.3 ms per token), runs sdpa over the whole static length (~230 us per layer), and its loop
  adds logits processors, stopping criteria and a host sync per token;
- the same forward as a step with guards on modules dropped and matmul attention: 149 tok/s.

The step here:
- is `model(token, position_ids, use_cache=False, hfaccel_decode=...)` -> greedy pick, traced whole
  (fullgraph, static shapes) with guards on the model's modules dropped: the generate wrapper owns the model's
  structure, and revert_model removes both;
- reaches every attention call through the kwargs Transformers passes down: the "hfaccel_step+<inner>"
  attention implementation (registered through AttentionInterface) writes the token's K/V into its layer's
  buffer at the current column and attends over the whole buffer with a validity mask (padding, the columns
  not written yet, a sliding window). Every other call goes to the inner implementation unchanged, so the
  prefill and any fallback call run exactly as before;
- keeps shapes static: the buffer has `BUCKET`-rounded columns, so prompts of other lengths in the same
  bucket reuse the graph (no recompilation between steps or calls); a new batch size or bucket compiles
  once more, and `model.hfaccel_compile_stats.compilations` counts every graph built;
- does greedy selection, min_new_tokens, EOS and padding of finished rows inside the graph; the loop checks
  "all rows finished" once every `CHECK_EVERY` steps, then trims the output to what generate() returns.

A call qualifies when it is greedy search with no logits processor the step does not reproduce (`why_not`);
every other call runs Transformers' own loop unchanged, and the stats count both, with each fallback's
reason.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
import sys
import threading
import time
import types
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .cache.paged import PagedCache
from .compat import (
    CACHE_KWARGS,
    call_arguments,
    check_prompt,
    given_cache,
    output_cache,
)
from .registry import Plan, register_feature
from .report import Skip

CHECK_EVERY = 8            # steps between "all rows finished?" host checks
BUCKET = 256               # decode buffer columns are a multiple of this: one graph per bucket and batch size
MAX_GRAPHS = 8            # (batch, bucket) shapes compiled per model; calls needing another one fall back
STEP_PREFIX = "hfaccel_step+"

# generation settings the step reproduces exactly when they have these values (None counts as default)
_DEFAULTS = {
    "num_beams": 1, "num_return_sequences": 1, "do_sample": False, "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "min_length": 0, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None,
    "exponential_decay_length_penalty": None, "guidance_scale": 1.0, "watermarking_config": None,
    "renormalize_logits": False, "token_healing": False, "stop_strings": None, "max_time": None,
    "output_scores": False, "output_logits": False, "output_attentions": False, "output_hidden_states": False,
    "return_dict_in_generate": False, "prompt_lookup_num_tokens": None, "assistant_early_exit": None,
    "diversity_penalty": 0.0, "num_beam_groups": 1, "penalty_alpha": None, "dola_layers": None,
    "low_memory": None,
}
_LENGTH_KWARGS = {"max_new_tokens", "min_new_tokens", "max_length", "eos_token_id", "pad_token_id", "use_cache"}
_PASS_KWARGS = {"input_ids", "inputs", "attention_mask", "generation_config", "streamer"}


@dataclass
class CompileStats:
    """What the compiled decode did, on `model.hfaccel_compile_stats`."""

    compiled_calls: int = 0          # generate() calls decoded by the compiled step
    fallback_calls: int = 0          # calls left to Transformers' loop
    fallback_reasons: Counter = field(default_factory=Counter)
    compilations: int = 0            # graphs built (one per batch size and bucket)
    compile_seconds: float = 0.0     # wall time of the steps that compiled
    warmup_seconds: float = 0.0      # paid inside accelerate_model
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    head_fallbacks: int = 0          # steps whose bf16-head pick failed its check and ran the fp32 head

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "fallback_reasons"}
        d["fallback_reasons"] = dict(self.fallback_reasons)
        return d


# ---------------------------------------------------------------------------------------------- attention

# hfaccel's C++ attention over the buffer's valid columns (kernels/cpu_attention.py buffer_decode) for fp32 or
# bf16 on the CPU, where it is built; set by _install_decoder before anything is traced (a global: the traced function
# reads it as a constant). HFACCEL_STEP_ATTENTION=inductor keeps Inductor's fused loops instead.
_cpp_step_attention = False
_CPP_DTYPES = (torch.float32, torch.bfloat16)
STEP_ATTENTION_ENV = "HFACCEL_STEP_ATTENTION"


def uses_cpp_step_attention(model: nn.Module) -> bool:
    return _cpp_step_attention and model.get_input_embeddings().weight.device.type == "cpu"


def step_attention(module, query, key, value, decode, scaling=None, sliding_window=None, softcap=None):
    """One query token per row against the layer's decode buffer. query: [B, Hq, 1, D]; key, value:
    [B, Hkv, 1, D] (after RoPE). Writes key/value at column `col`, returns [B, 1, Hq, D] as Transformers'
    attention functions do."""
    keys, values, col, valid = decode
    kb, vb = keys[module.layer_idx], values[module.layer_idx]
    b, hq, _, d = query.shape
    hkv = kb.shape[1]
    if col.numel() == 1:                  # every row at the same column (generate()'s greedy decode)
        kb.index_copy_(2, col, key.to(kb.dtype))
        vb.index_copy_(2, col, value.to(vb.dtype))
    else:                                 # a column per row (the speculative loop, rows advance on their own)
        write_columns(kb, vb, col.view(b, 1), key, value)
    scale = scaling if scaling is not None else d ** -0.5
    if sliding_window is not None:
        cols = torch.arange(valid.shape[1], device=valid.device)
        valid = valid & (cols > col.view(-1, 1) - sliding_window)
    if (_cpp_step_attention and softcap is None and query.device.type == "cpu" and query.dtype in _CPP_DTYPES
            and kb.dtype == query.dtype):
        # scores only for the valid columns, in one call per layer. Inductor's fused loops below took 129 us
        # per layer at 256 columns on a 2-core AVX2 EPYC (SmolLM2 int4: 3.9 of the step's ~15 ms), and in bf16
        # 67 us per layer at ~100-230 columns on a 2-core AMX Xeon (cpu-int4: 2.0 of the step's 12.1 ms)
        out = torch.ops.hfaccel_cpu_attn.buffer_decode(query.reshape(b, hq, d), kb, vb, valid, scale)
        return out.reshape(b, 1, hq, d), None
    q = query.reshape(b, hkv, hq // hkv, d)                               # GQA: query heads grouped by KV head
    # broadcast-multiply + sum rather than matmul: Inductor fuses each into one loop over the buffer
    # (measured on SmolLM2 int4, 2 CPU threads: 5.96 -> 5.22 ms per token against two bmm calls per layer)
    scores = (q[:, :, :, None, :] * kb[:, :, None]).sum(-1) * scale        # [B, Hkv, G, T]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = (probs[..., None] * vb[:, :, None]).sum(-2)                       # [B, Hkv, G, D]
    return out.reshape(b, 1, hq, d), None


def write_columns(kb, vb, where, key, value) -> None:
    """Write key/value [B, Hkv, W, D] into the buffers [B, Hkv, T, D] at columns where [B, W] (per row).
    index_put_ rather than scatter_: Inductor keeps index_put_ on a graph input in place, while scatter_ made
    it copy both whole buffers of every layer (SmolLM2 batch 4, 256 columns: ~3 ms of a 17 ms step)."""
    b, hkv = kb.shape[0], kb.shape[1]
    rows = torch.arange(b, device=where.device).view(b, 1, 1)
    heads = torch.arange(hkv, device=where.device).view(1, hkv, 1)
    index = (rows, heads, where[:, None, :])
    kb.index_put_(index, key.to(kb.dtype))
    vb.index_put_(index, value.to(vb.dtype))


def verify_attention(module, query, key, value, decode, scaling=None, sliding_window=None, softcap=None):
    """W query tokens per row against the layer's decode buffer (a speculative verify step). query:
    [B, Hq, W, D]; key, value: [B, Hkv, W, D]. `decode` = (keys, values, where, allowed): where [B, W] is
    the buffer column of each token (rows advance on their own), allowed [B, W, T] what each token may see
    (the row's valid columns up to its own). Returns [B, W, Hq, D]."""
    keys, values, where, allowed = decode
    kb, vb = keys[module.layer_idx], values[module.layer_idx]
    b, hq, w, d = query.shape
    hkv, t = kb.shape[1], kb.shape[2]
    write_columns(kb, vb, where, key, value)
    g = hq // hkv
    scale = scaling if scaling is not None else d ** -0.5
    if sliding_window is not None:
        cols = torch.arange(t, device=where.device)
        allowed = allowed & (cols[None, None, :] > where[:, :, None] - sliding_window)
    if (_cpp_step_attention and softcap is None and query.device.type == "cpu" and query.dtype in _CPP_DTYPES
            and kb.dtype == query.dtype):
        # the step's C++ attention, a query row per token: only the allowed columns are scored. The two bmm
        # below cost SmolLM2's verify at width 2 1.26 ms per call, the one-token step's buffer_decode 0.41 ms
        return torch.ops.hfaccel_cpu_attn.buffer_verify(query.transpose(1, 2), kb, vb, allowed, scale), None
    q = query.reshape(b, hkv, g * w, d)                                   # GQA: query heads grouped by KV head
    scores = torch.matmul(q, kb.transpose(-1, -2)).view(b, hkv, g, w, t) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(b, hkv, g * w, t), vb)                   # [B, Hkv, G * W, D]
    return out.view(b, hq, w, d).transpose(1, 2), None


def step_attention_name(inner: str) -> str:
    return STEP_PREFIX + inner


def register_step_attention(inner: str) -> str:
    """Register "hfaccel_step+<inner>": the step's attention when the call carries `hfaccel_decode`, the inner
    implementation (and its mask function) otherwise. Idempotent; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = step_attention_name(inner)

    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        decode = kwargs.pop("hfaccel_decode", None)
        verify = kwargs.pop("hfaccel_verify", None)
        if verify is not None:
            return verify_attention(module, query, key, value, verify, scaling, kwargs.get("sliding_window"),
                                    kwargs.get("softcap"))
        if decode is None:
            fn = _eager_of(module) if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]
            return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return step_attention(module, query, key, value, decode, scaling, kwargs.get("sliding_window"),
                              kwargs.get("softcap"))

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def _eager_of(module):
    """The modeling file's own eager attention, which "eager" means for this module."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _has_eager(model: nn.Module) -> bool:
    mods = {sys.modules[type(m).__module__] for m in model.modules() if hasattr(m, "layer_idx")}
    return bool(mods) and all(hasattr(mod, "eager_attention_forward") for mod in mods)


# ---------------------------------------------------------------------------------------------- eligibility

def _setting(model, kwargs: dict, name: str):
    """A generation setting as generate() resolves it: the call's kwarg, else the generation_config it
    passes, else the model's (None where none sets it)."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    for gc in (kwargs.get("generation_config"), model.generation_config):
        v = getattr(gc, name, None) if gc is not None else None
        if v is not None:
            return v
    return None


def why_not(model: nn.Module, kwargs: dict) -> str | None:
    """Why the compiled step cannot reproduce this generate() call exactly; None when it can."""
    if given_cache(kwargs) is not None or kwargs.get("custom_generate") is not None \
            or _setting(model, kwargs, "use_cache") is False:
        return "the call brings its own cache or disables it"
    impl = _setting(model, kwargs, "cache_implementation")
    if impl not in (None, "dynamic", "static"):
        return f"cache_implementation={impl!r}"
    others = set(kwargs) - _PASS_KWARGS - _LENGTH_KWARGS - {*CACHE_KWARGS, "custom_generate",
                                                            "cache_implementation"}
    unknown = sorted(k for k in others if k not in _DEFAULTS)
    if unknown:
        return f"argument {unknown[0]!r}"
    for name, default in _DEFAULTS.items():
        v = _setting(model, kwargs, name)
        if v is not None and v != default:
            return f"{name}={v!r}"
    ids = kwargs.get("input_ids", kwargs.get("inputs"))
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.shape[1] == 0:
        return "inputs are not a 2-D tensor of token ids"
    mask = kwargs.get("attention_mask")
    if mask is not None:
        m = mask.to(torch.bool)
        lead = (~m).int().cumprod(dim=1).sum(dim=1)
        if not bool((lead + m.sum(dim=1) == m.shape[1]).all()) or bool((lead == m.shape[1]).any()):
            return "attention_mask is not left padding"
    elif inferred_mask(model, kwargs) is not None:      # callers pass the mask generate() would infer
        return "pad token in the prompt without an attention_mask"
    return None


def inferred_mask(model, kwargs: dict) -> torch.Tensor | None:
    """The attention mask generate() infers for a call without one: ids != pad when the pad token is set,
    occurs in the prompt and is not an EOS token (else all ones, returned as None)."""
    ids = kwargs.get("input_ids", kwargs.get("inputs"))
    pad = _setting(model, kwargs, "pad_token_id")
    if pad is None or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        return None
    eos, _ = _eos_and_pad(model, kwargs)
    if int(pad) in eos or not bool((ids == int(pad)).any()):
        return None
    return ids.ne(int(pad)).long()


def _eos_and_pad(model, kwargs) -> tuple[list[int], int]:
    eos = _setting(model, kwargs, "eos_token_id")
    pad = _setting(model, kwargs, "pad_token_id")
    eos = [eos] if isinstance(eos, int) else [int(e) for e in (eos if eos is not None else [])]
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, int(pad)


def _new_token_budget(model, kwargs, prompt_len: int) -> tuple[int, int]:
    """(max new tokens, min new tokens) as generate() derives them (transformers 5: max_new_tokens wins;
    an explicit max_length counts the prompt; neither set means 20 new tokens, capped by the positions)."""
    new = _setting(model, kwargs, "max_new_tokens")
    if new is None:
        max_length = _setting(model, kwargs, "max_length")
        if max_length is None:
            max_length = prompt_len + 20
            cap = getattr(model.config.get_text_config(), "max_position_embeddings", None)
            if cap is not None:
                max_length = min(max_length, cap)
        new = max(0, max_length - prompt_len)
    return int(new), int(_setting(model, kwargs, "min_new_tokens") or 0)


# ---------------------------------------------------------------------------------------------- the step

def _mode_patches(mode: str) -> dict:
    if mode == "reduce-overhead":
        return {"triton.cudagraphs": True}
    if mode == "max-autotune":
        return {"max_autotune": True, "triton.cudagraphs": True}
    return {}


def _counting_backend(stats: CompileStats, mode: str, cpp_wrapper: bool = False, on_compile=None):
    """Inductor, counting compilations. Its per-call size/stride asserts on every graph input are off: with the
    module guards dropped (_options) they were ~800 Python checks of the model's parameters per call, ~1 ms of
    SmolLM2's ~13 ms step (measured: cpu-fast 12.7-13.9 -> 11.8 ms/token, cpu-int4 9.8 -> 7.9). What they
    guarded is checked once per generate() instead (CompiledDecoder.changed)."""
    from torch._inductor.compile_fx import compile_fx

    patches = {**_mode_patches(mode), **({"cpp_wrapper": True} if cpp_wrapper else {}), "size_asserts": False}

    def backend(gm, example_inputs):
        stats.compilations += 1
        if on_compile is not None:
            on_compile()
        return compile_fx(gm, example_inputs, config_patches=patches)

    return backend


class TensorState:
    """The model's modules, parameters and buffers as the compiled graphs read them - which child module, which
    tensor object, its storage, shape, stride, dtype and device - recorded once and checked per generate() call
    in ~0.3 ms (SmolLM2: 485 tensors, 396 submodules). Walking model.parameters() and model.buffers() again
    each call took ~1.6 ms, most of it Module.named_modules."""

    def __init__(self, model: nn.Module):
        self.tensors: list[tuple] = []
        self.children: list[tuple] = []
        for prefix, mod in model.named_modules():
            for d in (mod._parameters, mod._buffers):
                for key, t in d.items():
                    if t is not None:
                        self.tensors.append((d, key, t, t.data_ptr(), t.shape, t.stride(), t.dtype, t.device,
                                             f"{prefix}.{key}" if prefix else key))
            for key, child in mod._modules.items():
                self.children.append((mod._modules, key, child, f"{prefix}.{key}" if prefix else key))

    def changed(self) -> str | None:
        """The name of the first module or tensor replaced, resized, cast or moved since recording, or None."""
        for d, key, t, ptr, shape, stride, dtype, device, name in self.tensors:
            if (d.get(key) is not t or t.data_ptr() != ptr or t.shape != shape or t.stride() != stride
                    or t.dtype != dtype or t.device != device):
                return name
        for d, key, child, name in self.children:
            if d.get(key) is not child:
                return f"{name} replaced"
        return None


class DecodeBuffers:
    """Per-layer [B, Hkv, T, D] K and V of one decode, T a multiple of BUCKET, plus the columns' validity."""

    def __init__(self, layers: int, batch: int, kv_heads: int, columns: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, kv_heads, columns, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.valid = torch.ones(batch, columns, dtype=torch.bool, device=device)
        if device.type == "cuda":          # CUDA graphs replay on these addresses, mutations included
            for t in (*self.keys, *self.values, self.valid):
                torch._dynamo.mark_static_address(t)

    @property
    def key(self) -> tuple:
        k = self.keys[0]
        return (len(self.keys), *k.shape, k.dtype, k.device)

    @property
    def bytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self.keys)


VERIFY_ROWS = 4   # rows per batch row a verify graph's certified head is chosen for (its width is dynamic):
                  # batch 1 reads the int8 copy (up to 8 rows faster than bf16 on SmolLM2's head), batch 2+ bf16


def _options() -> dict:
    """torch.compile's options for each of the decoder's graphs: guards on the model's modules are dropped (1+ ms
    per call otherwise; a change of the model's structure goes through revert_model, which removes the decoder
    with the generate wrapper). A new dict per torch.compile call: it pops "guard_filter_fn" out of the dict it
    is given, so one shared dict left the verify graphs with every guard (each of the model's ~420 parameters
    and buffers by shape and stride: ~1.1 ms of guard checks per verify call against 0.12 ms for the step)."""
    return {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}


class CompiledDecoder:
    """The compiled step of one model, its decode buffers, and the loop that drives them."""

    def __init__(self, model: nn.Module, mode: str = "default", cpp_wrapper: bool = False):
        self.model = model
        self.mode = mode
        # Inductor's wrapper in C++ rather than Python: less overhead per kernel call, a longer first compile
        self.cpp_wrapper = cpp_wrapper and model.get_input_embeddings().weight.device.type == "cpu"
        self.stats = CompileStats()
        self.lock = threading.RLock()
        self._buffers: DecodeBuffers | None = None
        head = model.get_output_embeddings()
        self.vocab = getattr(head, "out_features", None) or model.config.get_text_config().vocab_size
        self.shapes: set[tuple[int, int]] = set()     # (batch, columns) graphs built
        # the model's tensors as the first graph was traced: the graphs neither guard nor assert on them
        self._traced: TensorState | None = None
        backend = functools.partial(_counting_backend, self.stats, mode, self.cpp_wrapper, self._record_state)
        self._fn = torch.compile(_own_code(self._step), fullgraph=True, dynamic=False, backend=backend(),
                                 options=_options())
        self._vfn = torch.compile(_own_code(self._verify), fullgraph=True, dynamic=False, backend=backend(),
                                  options=_options())
        self._gfn = torch.compile(_own_code(self._verify_greedy), fullgraph=True, dynamic=False, backend=backend(),
                                  options=_options())
        self._verify_checked = False
        self._costs: dict[tuple[int, int, bool], list[float]] = {}     # (batch, max width, greedy)
        self.certified = None         # a CertifiedHead: set before the first compile, read when tracing

    def _record_state(self) -> None:
        if self._traced is None:
            self._traced = TensorState(self.model)

    def changed(self) -> str | None:
        """Why the compiled graphs no longer fit the model (a submodule, parameter or buffer replaced, resized, cast
        or moved since the first graph was traced: its kernels would read the new tensor as the old one), or
        None."""
        what = None if self._traced is None else self._traced.changed()
        if what is None:
            return None
        return (f"the model's tensors changed after it was compiled ({what}); revert_model() and accelerate_model() "
                f"again to compile the new ones")

    @staticmethod
    def _choose(logits, finished, eos, pad, allow_eos):
        """Greedy pick from [B, V] float logits: EOS blocked before min_new_tokens, finished rows padded."""
        logits = logits.masked_fill(eos[: logits.shape[-1]] & ~allow_eos, float("-inf"))
        nxt = torch.where(finished, pad, logits.argmax(-1))
        return nxt[:, None], finished | eos[nxt]

    # tokens, position_ids: [B, 1]; col: [1] column of this token, or [B] a column per row; valid: [B, T];
    # finished: [B] bool; eos: [V] bool over the vocabulary (a fixed shape whatever the number of EOS ids);
    # pad: 0-d; allow_eos: 0-d, or [B, 1] per row.
    # Returns (next tokens [B, 1], finished [B], checked, hidden): with a certified head, checked [B] says
    # which rows' picks passed the bound and hidden [B, d] lets the caller redo the others; else None, None.
    def _step(self, tokens, position_ids, keys, values, col, valid, finished, eos, pad, allow_eos):
        cols = torch.arange(valid.shape[1], device=valid.device)
        valid = valid & (cols <= col.view(-1, 1))
        decode = (keys, values, col, valid)
        if self.certified is None:
            out = self.model(input_ids=tokens, position_ids=position_ids, use_cache=False, logits_to_keep=1,
                             hfaccel_decode=decode)
            nxt, finished = self._choose(out.logits[:, -1].float(), finished, eos, pad, allow_eos)
            return nxt, finished, None, None
        base = getattr(self.model, self.model.base_model_prefix)
        h = base(input_ids=tokens, position_ids=position_ids, use_cache=False,
                 hfaccel_decode=decode).last_hidden_state[:, -1]
        token, checked = self.certified.pick(h, eos[: self.certified.weight.shape[0]] & ~allow_eos)
        nxt = torch.where(finished, pad, token)
        return nxt[:, None], finished | eos[nxt], checked, h

    @staticmethod
    def _columns(tokens, keys, values, col, valid):
        """hfaccel_verify's (keys, values, where [B, W], allowed [B, W, T]) for tokens [B, W] at col [B]."""
        w, t = tokens.shape[1], valid.shape[1]
        where = col[:, None] + torch.arange(w, device=col.device)
        allowed = valid[:, None, :] & (torch.arange(t, device=col.device) <= where[:, :, None])
        return keys, values, where, allowed

    # tokens, position_ids: [B, W]; col: [B] buffer column of each row's first token (rows advance on their
    # own); valid: [B, T]. Returns the logits of every token, [B, W, V] float.
    def _verify(self, tokens, position_ids, keys, values, col, valid):
        out = self.model(input_ids=tokens, position_ids=position_ids, use_cache=False,
                         hfaccel_verify=self._columns(tokens, keys, values, col, valid))
        return out.logits.float()

    # greedy verify: as _verify, plus eos [V] bool and allow [B, W] bool (EOS allowed at that token). Returns
    # the greedy pick after every token [B, W] and, with a certified head, checked [B, W] and hidden [B, W, d]
    # (else None, None): the [B, W, V] logits never leave the graph, and the head is read in bf16.
    def _verify_greedy(self, tokens, position_ids, keys, values, col, valid, eos, allow):
        verify = self._columns(tokens, keys, values, col, valid)
        if self.certified is None:
            logits = self.model(input_ids=tokens, position_ids=position_ids, use_cache=False,
                                hfaccel_verify=verify).logits.float()
            logits = logits.masked_fill(eos[: logits.shape[-1]] & ~allow[..., None], float("-inf"))
            return logits.argmax(-1), None, None
        base = getattr(self.model, self.model.base_model_prefix)
        h = base(input_ids=tokens, position_ids=position_ids, use_cache=False,
                 hfaccel_verify=verify).last_hidden_state
        b, w, d = h.shape
        blocked = eos[: self.certified.weight.shape[0]] & ~allow.reshape(b * w, 1)
        # the graph is dynamic in w: the head's copy is chosen for b rows of a typical width (VERIFY_ROWS)
        token, checked = self.certified.pick(h.reshape(b * w, d), blocked, rows=b * VERIFY_ROWS)
        return token.view(b, w), checked.view(b, w), h

    def verify_greedy(self, buf: DecodeBuffers, tokens: torch.Tensor, positions: torch.Tensor,
                      col: torch.Tensor, eos_mask: torch.Tensor, allow: torch.Tensor) -> torch.Tensor:
        """The greedy pick [B, W] after each of tokens [B, W >= 2] (a verify forward, as `verify`), EOS
        blocked where allow [B, W] is False. One graph for every width (dynamic in W). A certified pick whose
        bound could not rule out another token is redone through the fp32 head."""
        tokens, positions, allow = _fresh(tokens), _fresh(positions), _fresh(allow)
        for t in (tokens, positions, allow):
            torch._dynamo.mark_dynamic(t, 1, min=2, max=BUCKET)
        with self.lock:
            before = self.stats.compilations
            t = time.perf_counter()
            pick, checked, h = self._gfn(tokens, positions, buf.keys, buf.values, col, buf.valid, eos_mask, allow)
            if self.stats.compilations != before:
                self.stats.compile_seconds += time.perf_counter() - t
        if checked is not None and not bool(checked.all()):
            redo = ~checked
            logits = self.model.get_output_embeddings()(h[redo]).float()
            logits = logits.masked_fill(eos_mask[: logits.shape[-1]] & ~allow[redo][:, None], float("-inf"))
            pick = pick.clone()
            pick[redo] = logits.argmax(-1)
            self.stats.head_fallbacks += 1
        return pick

    def verify(self, buf: DecodeBuffers, tokens: torch.Tensor, positions: torch.Tensor,
               col: torch.Tensor) -> torch.Tensor:
        """Logits [B, W, V] of a verify forward over tokens [B, W] at positions [B, W], whose K/V are written
        at buffer columns col[b] .. col[b] + W - 1. Width 1 has its own graph; every width >= 2 shares one
        (dynamic in W), so the draft length never recompiles."""
        tokens, positions = _fresh(tokens), _fresh(positions)
        if tokens.shape[1] > 1:
            torch._dynamo.mark_dynamic(tokens, 1, min=2, max=BUCKET)
            torch._dynamo.mark_dynamic(positions, 1, min=2, max=BUCKET)
        with self.lock:
            before = self.stats.compilations
            t = time.perf_counter()
            out = self._vfn(tokens, positions, buf.keys, buf.values, col, buf.valid)
            if self.stats.compilations != before:
                self.stats.compile_seconds += time.perf_counter() - t
        return out

    @torch.inference_mode()
    def verify_costs(self, batch: int, max_width: int, context: int = 64, reps: int = 3,
                     greedy: bool = False) -> list[float]:
        """Seconds of a compiled verify of width 1..max_width for `batch` rows over `context` columns (median
        of `reps` after a warm-up; index 0 unused), compiling the graphs on first use. The first time, one
        eager verify checks that it reaches every layer's attention. Kept: a second call returns the same.
        greedy: what a greedy loop runs, width 1 through the one-token step (`pick`, per-row columns) and
        wider ones through `verify_greedy`."""
        if (batch, max_width, greedy) in self._costs:
            return self._costs[(batch, max_width, greedy)]
        cfg = self.model.config.get_text_config()
        p = self.model.get_input_embeddings().weight
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        columns = columns_for(context, max_width)
        self.shapes.add((batch, columns))
        # buffers of its own: the decoder's may hold a prompt being decoded
        buf = DecodeBuffers(cfg.num_hidden_layers, batch, kv_heads, columns, head_dim, p.dtype, p.device)
        col = torch.full((batch,), context, dtype=torch.long, device=p.device)
        ids = torch.zeros(batch, max_width, dtype=torch.long, device=p.device)
        pos = context + torch.arange(max_width, device=p.device).expand(batch, max_width)
        if not self._verify_checked:
            for k in buf.keys:
                k.zero_()[:, :, context:context + 2] = float("nan")
            self._verify(ids[:, :2], pos[:, :2], buf.keys, buf.values, col, buf.valid)
            missed = [i for i, k in enumerate(buf.keys) if bool(k[:, :, context:context + 2].isnan().any())]
            if missed:
                raise RuntimeError(f"the verify step did not reach the attention of layer(s) {missed}: "
                                   f"{type(self.model).__name__} does not pass its kwargs down to attention")
            self._verify_checked = True
        for k in (*buf.keys, *buf.values):
            k.zero_()
        eos_mask, pad_t = self.step_masks([], 0, p.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=p.device)
        allow = torch.ones(batch, 1, dtype=torch.bool, device=p.device)

        def run(w):
            if greedy and w == 1:
                return self.pick(self.run_step, buf, _fresh(ids[:, :1]), _fresh(pos[:, :1]), col, finished, eos_mask, pad_t, allow)
            if greedy:
                return self.verify_greedy(buf, ids[:, :w], pos[:, :w], col, eos_mask, allow.expand(batch, w))
            return self.verify(buf, ids[:, :w], pos[:, :w], col)

        cost = width_times(run, max_width, reps, p.device)
        self._costs[(batch, max_width, greedy)] = cost
        return cost

    def has_room_for(self, batch: int, columns: int) -> bool:
        return (batch, columns) in self.shapes or len(self.shapes) < MAX_GRAPHS

    def buffers(self, batch: int, columns: int, like: torch.Tensor) -> DecodeBuffers:
        """The decode buffers for this shape: the last ones when they fit exactly, else new ones."""
        self.shapes.add((batch, columns))
        cfg = self.model.config.get_text_config()
        layers = cfg.num_hidden_layers
        kv_heads, head_dim = like.shape[1], like.shape[3]
        want = (layers, batch, kv_heads, columns, head_dim, like.dtype, like.device)
        if self._buffers is None or self._buffers.key != want:
            self._buffers = None                      # free the old ones first
            self._buffers = DecodeBuffers(layers, batch, kv_heads, columns, head_dim, like.dtype, like.device)
        return self._buffers

    def load_prefill(self, cache, length: int, mask: torch.Tensor | None, new_tokens: int) -> DecodeBuffers:
        """Copy the prompt's K/V (`length` columns, left-padded rows as `mask` says) out of Transformers'
        cache into decode buffers with room for `new_tokens` more."""
        k0, _ = _prefill_kv(cache, 0, length)
        columns = columns_for(length, new_tokens)
        buf = self.buffers(k0.shape[0], columns, k0)
        for i in range(len(buf.keys)):
            k, v = _prefill_kv(cache, i, length)
            buf.keys[i][:, :, :length] = k
            buf.values[i][:, :, :length] = v
        buf.valid.fill_(True)
        if mask is not None:
            buf.valid[:, :length] = mask.to(torch.bool)
        return buf

    def run_step(self, *args):
        before = self.stats.compilations
        t = time.perf_counter()
        out = self._fn(*args)
        if self.stats.compilations != before:
            self.stats.compile_seconds += time.perf_counter() - t
        return out

    def pick(self, step, buf: DecodeBuffers, tok, positions, col, finished, eos_mask, pad_t, allow):
        """One greedy step: (next tokens [B, 1], finished [B]). A certified-head pick whose bound could not rule
        out another token is redone through the fp32 head."""
        nxt, now, checked, h = step(tok, positions, buf.keys, buf.values, col, buf.valid, finished, eos_mask,
                                    pad_t, allow)
        if checked is not None and not bool(checked.all()):
            head = self.model.get_output_embeddings()
            nxt, now = self._choose(head(h[:, None])[:, -1].float(), finished, eos_mask, pad_t, allow)
            self.stats.head_fallbacks += 1
        return nxt, now

    def step_masks(self, eos: list[int], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(eos [V'] bool over the vocabulary, pad 0-d): the step's fixed-shape EOS and pad inputs."""
        eos_mask = torch.zeros(max(self.vocab, pad + 1, *(e + 1 for e in eos)), dtype=torch.bool, device=device)
        eos_mask[torch.tensor(eos, dtype=torch.long, device=device)] = True
        return eos_mask, torch.tensor(pad, dtype=torch.long, device=device)

    def decode(self, buf: DecodeBuffers, first: torch.Tensor, length: int, positions: torch.Tensor,
               new_tokens: int, min_new: int, eos: list[int], pad: int, step=None, streamer=None) -> torch.Tensor:
        """Continue from the prompt's `length` columns in `buf`: first [B, 1] is the token chosen after the
        prompt, positions [B, 1] its position ids. Returns the [B, n] tokens that follow it (n <= new_tokens,
        trimmed where every row finished, as generate() stops)."""
        step = step or self.run_step
        device = first.device
        eos_t = torch.tensor(eos, dtype=torch.long, device=device)
        eos_mask, pad_t = self.step_masks(eos, pad, device)
        finished = eos_mask[first[:, 0]]
        tok, positions = _fresh(first), _fresh(positions)
        col = torch.tensor([length], device=device)
        allow_eos = (torch.tensor(False, device=device), torch.tensor(True, device=device))
        out = []
        for i in range(new_tokens):
            # with a streamer every token goes to the host anyway, so the check is free at every step
            if eos and (streamer is not None or i % CHECK_EVERY == 0) and bool(finished.all()):
                break
            allow = allow_eos[i + 1 >= min_new]
            tok, finished = self.pick(step, buf, tok, positions, col, finished, eos_mask, pad_t, allow)
            out.append(tok)
            if streamer is not None:
                streamer.put(tok[:, 0].cpu())
            col = col + 1
            positions = positions + 1
        if not out:
            return first[:, :0]
        rest = torch.cat(out, dim=1)
        if eos:                     # generate() stops at the step where the last row finished
            done = torch.isin(torch.cat([first, rest], dim=1), eos_t).int().cummax(dim=1).values.bool()
            all_done = done.all(dim=0)
            if bool(all_done.any()):
                rest = rest[:, :int(all_done.int().argmax())]
        return rest

    def warm_up(self, batch: int = 1, steps: int = 2) -> float:
        """Check the step on this model (one eager step must write every layer's buffer), then compile it for
        `batch` rows and the first bucket. Returns the seconds spent."""
        t = time.perf_counter()
        cfg = self.model.config.get_text_config()
        p = self.model.get_input_embeddings().weight
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        with torch.inference_mode():
            like = torch.empty(batch, kv_heads, 0, head_dim, dtype=p.dtype, device=p.device)
            buf = self.buffers(batch, BUCKET, like)
            for k in buf.keys:
                k.fill_(float("nan"))
            first = torch.zeros(batch, 1, dtype=torch.long, device=p.device)
            pos = torch.zeros(batch, 1, dtype=torch.long, device=p.device)
            self.decode(buf, first, 0, pos, 1, 0, [], 0, step=self._step)
            missed = [i for i, k in enumerate(buf.keys) if bool(k[:, :, 0].isnan().any())]
            if missed:
                raise RuntimeError(f"the decode step did not reach the attention of layer(s) {missed}: "
                                   f"{type(self.model).__name__} does not pass its kwargs down to attention")
            for k in buf.keys:
                k.zero_()
            self.decode(buf, first, 0, pos, steps, 0, [], 0)
        return time.perf_counter() - t


def width_times(run, max_width: int, reps: int, device: torch.device, after=None) -> list[float]:
    """Median seconds of run(w) for w = 1..max_width (index 0 unused), `reps` timed calls after one warm-up;
    after(w), untimed, follows every call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cost = [0.0]
    for w in range(1, max_width + 1):
        times = []
        for _ in range(reps + 1):
            sync()
            t = time.perf_counter()
            run(w)
            sync()
            times.append(time.perf_counter() - t)
            if after is not None:
                after(w)
        cost.append(sorted(times[1:])[len(times[1:]) // 2])
    return cost


_codes = itertools.count()


def _own_code(method):
    """`method` with a code object of its own: Dynamo keeps its graphs (and its recompile limit) per code
    object, so each model's step must not share them with every other model's."""
    fn = method.__func__
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_codes)}")
    own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return types.MethodType(own, method.__self__)


def columns_for(length: int, new_tokens: int) -> int:
    return -(-(length + new_tokens) // BUCKET) * BUCKET


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A new tensor with t's values and default strides: Dynamo guards on strides, and views of size-1
    dims (a column of generate()'s output) keep the strides of their base."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _prefill_kv(cache, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(cache, PagedCache):
        return cache.read(layer, length)
    lay = cache.layers[layer]
    return lay.keys[:, :, :length], lay.values[:, :, :length]


def _prefill_positions(mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Position id of the first generated token per row, as generate() derives it from the mask."""
    if mask is None:
        return torch.full((batch, 1), length, dtype=torch.long, device=device)
    return mask.long().sum(dim=1, keepdim=True).to(device)


def make_generate(model: nn.Module, decoder: CompiledDecoder):
    original = model.generate
    sig = inspect.signature(original)
    stats = decoder.stats

    def fallback(reason, args, kwargs):
        stats.fallback_calls += 1
        stats.fallback_reasons[reason] += 1
        return original(*args, **kwargs)

    @functools.wraps(original)
    def generate(*args, **kwargs):
        given = call_arguments(sig, args, kwargs)
        if given is None:
            return original(*args, **kwargs)          # let generate() report the bad call itself
        check_prompt(given, model.device)
        if given.get("inputs") is not None and given.get("input_ids") is None:
            given["input_ids"] = given.pop("inputs")
        if given.get("attention_mask") is None and isinstance(given.get("input_ids"), torch.Tensor):
            mask = inferred_mask(model, given)          # what generate() infers from pad tokens, made explicit
            if mask is not None:
                given["attention_mask"] = mask
        reason = why_not(model, given) or decoder.changed()
        if reason is not None:
            return fallback(reason, args, kwargs)
        prompt = given.get("input_ids", given.get("inputs"))
        new, min_new = _new_token_budget(model, given, prompt.shape[1])
        if new < 2:
            return fallback("fewer than 2 new tokens", args, kwargs)
        if not decoder.has_room_for(prompt.shape[0], columns_for(prompt.shape[1], new - 1)):
            return fallback(f"{MAX_GRAPHS} shapes (batch x bucket) compiled already", args, kwargs)
        call = {k: v for k, v in given.items() if k not in ("inputs", "max_length")}
        streamer = call.pop("streamer", None)      # fed here, as generate() does: prompt, then each token
        call.update(input_ids=prompt, max_new_tokens=1, return_dict_in_generate=True,
                    min_new_tokens=min(min_new, 1) or None)
        eos, pad = _eos_and_pad(model, given)
        mask = given.get("attention_mask")
        with decoder.lock:
            if streamer is not None:
                streamer.put(prompt.cpu())
            out = original(**call)                       # prefill + first token: Transformers' own code
            cache = output_cache(out)
            try:
                if cache is None or out.sequences.shape[1] != prompt.shape[1] + 1:
                    return fallback("prefill returned no cache", args, kwargs)
                if streamer is not None:                 # the first token is the user's now, before the KV copy
                    streamer.put(out.sequences[:, -1].cpu())
                t = time.perf_counter()
                with torch.inference_mode():
                    buf = decoder.load_prefill(cache, prompt.shape[1], mask, new - 1)
                    if isinstance(cache, PagedCache):
                        cache.release()
                    cache = None
                    positions = _prefill_positions(mask, prompt.shape[0], prompt.shape[1], prompt.device)
                    rest = decoder.decode(buf, out.sequences[:, -1:], prompt.shape[1], positions, new - 1,
                                          min_new, eos, pad, streamer=streamer)
                    if streamer is not None:
                        streamer.end()
                stats.decode_seconds += time.perf_counter() - t
                stats.decode_tokens += rest.numel()
                stats.compiled_calls += 1
            finally:
                if isinstance(cache, PagedCache):
                    cache.release()
        return torch.cat([out.sequences, rest], dim=1)

    return generate


def _compile_problem(model: nn.Module, cfg) -> str | None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if model.config.is_encoder_decoder:
        return "encoder-decoder models are not supported"
    if not model._supports_default_dynamic_cache():
        return f"{type(model).__name__} builds its own cache"
    if cfg.kv_cache.dtype == "int8":
        return "the decode buffer keeps K/V in the model dtype; kv_cache.dtype int8 decodes through the paged loop"
    from .tp import tp_size

    if tp_size(model) > 1:
        return f"tensor parallel ({tp_size(model)} ranks): the step is not traced through the all_reduce collectives"
    from .placement import Placement

    placement = Placement.detect(model)
    if placement and placement.hooked:
        return ("the model is dispatched with accelerate hooks (device_map); torch.compile would trace their "
                "device moves and weight loads as graph breaks")
    layer_types = getattr(model.config.get_text_config(), "layer_types", None) or []
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        return f"layer types {sorted(set(layer_types))}: the step handles full and sliding attention only"
    inner = model.config._attn_implementation
    if inner == "eager" and not _has_eager(model):
        return "attention 'eager' is not defined as eager_attention_forward in the modeling file"
    if inner != "eager" and inner not in ALL_ATTENTION_FUNCTIONS and not inner.startswith(STEP_PREFIX):
        return f"attention implementation {inner!r} is not in Transformers' AttentionInterface"
    return None


@register_feature("compile", stage="compile")
def plan_compile(model: nn.Module, ctx, cfg) -> Plan | Skip | None:
    c = cfg.compile
    if not c.enabled:
        return None
    problem = _compile_problem(model, cfg)
    if problem:
        return Skip("compile", f"compiled decode: {problem}")
    if cfg.speculative.draft is not None or getattr(ctx, "draft_model", None) is not None:
        from .speculative.feature import speculative_problem

        if speculative_problem(model, cfg, getattr(ctx, "draft_model", None)) is None:
            return _plan_compiled_verify(model, cfg)

    notes: list[str] = []

    def apply(rw) -> None:
        decoder = _install_decoder(rw, model, c.mode, c.cpp_wrapper)
        _attach_certified_head(rw, model, decoder, c, notes)
        if c.warmup:
            decoder.stats.warmup_seconds = decoder.warm_up()
        rw.set_attr(model, "hfaccel_compile_stats", decoder.stats, target="hfaccel_compile_stats",
                    label="compiled calls, fallbacks, compilations, warm-up")
        rw.set_attr(model, "generate", make_generate(model, decoder), target="generate",
                    label=(f"greedy decode through a compiled step (torch.compile mode={c.mode}, "
                           + ("C++ wrapper, " if decoder.cpp_wrapper else "")
                           + ("hfaccel's C++ step attention for fp32 and bf16, " if uses_cpp_step_attention(model) else "")
                           + (f"warm-up {decoder.stats.warmup_seconds:.1f} s" if c.warmup else "compiled at first call")
                           + ")"))

    return Plan("compile", apply, f"compiled greedy decode step, buckets of {BUCKET} columns "
                                  f"(torch.compile mode={c.mode})", notes)


def _attach_certified_head(rw, model: nn.Module, decoder: CompiledDecoder, c, notes: list[str]) -> None:
    """compile.certified_head: greedy steps pick through a bf16 or int8 copy of the head, checked
    (certified_head.py)."""
    if not c.certified_head:
        return
    from .certified_head import build

    decoder.certified, label = build(model)
    if decoder.certified is not None:
        rw.set_attr(model, "hfaccel_certified_head", decoder.certified,
                    target="lm_head (compiled greedy steps)", label=label)
    elif label:
        notes.append(f"certified head not used: {label}")


def _install_decoder(rw, model: nn.Module, mode: str, cpp_wrapper: bool = False) -> CompiledDecoder:
    """The step attention (every call without the step's kwargs goes to the inner one) and a decoder."""
    global _cpp_step_attention
    inner = model.config._attn_implementation
    if not inner.startswith(STEP_PREFIX):
        rw.set_attn_implementation(register_step_attention(inner))
    if os.environ.get(STEP_ATTENTION_ENV) == "inductor":
        _cpp_step_attention = False
    elif model.get_input_embeddings().weight.device.type == "cpu":
        from .kernels import cpu_attention

        _cpp_step_attention = cpu_attention.status()[0]
    return CompiledDecoder(model, mode, cpp_wrapper)


def _draft_decoder(rw, draft, cfg, mode: str) -> CompiledDecoder | None:
    """A compiled step for a model draft (self-int8/int4, layer-skip, a draft model), or None where its
    model cannot be compiled. Its attention gets the step wrapper (recorded: a draft_model= is the user's);
    a layer-skip draft's layers are the target's, whose attention has the wrapper already."""
    dm = getattr(draft, "model", None)
    if dm is None or _compile_problem(dm, cfg) is not None:
        return None
    inner = dm.config._attn_implementation
    if not inner.startswith(STEP_PREFIX) and not draft.name.startswith("layer-skip"):
        step = register_step_attention(inner)
        dm.set_attn_implementation(step)
        rw.record("hfaccel_draft.config._attn_implementation", inner, step,
                  lambda: dm.set_attn_implementation(inner), lossless=True)
    return CompiledDecoder(dm, mode, cfg.compile.cpp_wrapper)


def _plan_compiled_verify(model: nn.Module, cfg) -> Plan:
    """Speculative decoding drives generate(): compile its verify step instead of the one-token step."""
    from .speculative.feature import max_draft_tokens

    c = cfg.compile
    width = max_draft_tokens(cfg.speculative) + 1
    notes: list[str] = []

    def apply(rw) -> None:
        decoder = _install_decoder(rw, model, c.mode, c.cpp_wrapper)
        _attach_certified_head(rw, model, decoder, c, notes)
        draft = model.__dict__.get("hfaccel_draft")
        draft_decoder = _draft_decoder(rw, draft, cfg, c.mode)
        if c.warmup:
            t = time.perf_counter()
            decoder.verify_costs(1, width, greedy=True)
            if draft_decoder is not None:
                draft_decoder.verify_costs(1, 2)
            decoder.stats.warmup_seconds = time.perf_counter() - t
        if draft_decoder is not None:
            rw.set_attr(draft, "compiled", draft_decoder, target="hfaccel_draft.compiled",
                        label=f"the draft model's tokens through a compiled step of its own (torch.compile "
                              f"mode={c.mode}, prompt prefilled eagerly)")
        elif getattr(draft, "model", None) is not None:
            notes.append(f"the draft model runs eagerly: {_compile_problem(draft.model, cfg)}")
        rw.set_attr(model, "hfaccel_compile_stats", decoder.stats, target="hfaccel_compile_stats",
                    label="compiled calls, fallbacks, compilations, warm-up")
        rw.set_attr(model, "hfaccel_compiled_verify", decoder, target="hfaccel_compiled_verify",
                    label=(f"speculative verify through a compiled step (torch.compile mode={c.mode}, widths 1 and "
                           f"2-{width} in two graphs per batch size and bucket, "
                           + (f"warm-up {decoder.stats.warmup_seconds:.1f} s" if c.warmup else "compiled at first call")
                           + ")"))

    return Plan("compile", apply, f"compiled speculative verify step, buckets of {BUCKET} columns "
                                  f"(torch.compile mode={c.mode})", notes)


__all__ = ["BUCKET", "CompileStats", "CompiledDecoder", "register_step_attention", "step_attention", "why_not"]
