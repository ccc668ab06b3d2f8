"""`hfaccel bench --workload kv-cache`: the paged KV cache against Transformers' caches, in one run.

1. prefix reuse: TTFT of a request whose `prefix_tokens`-token prefix was seen before (warm) against one
   whose prefix was not (cold), on the accelerated model; plain Transformers beside it;
2. memory accounting on a batch of prompts of mixed lengths: KV bytes reserved against bytes holding live
   tokens, for DynamicCache, StaticCache and the paged cache (the caches generate() returns, measured);
3. decode TPOT at a long context (`long_context` prompt tokens): DynamicCache against the paged cache with
   each CPU decode kernel (gather + sdpa, compiled block-wise) or Triton on CUDA.
Greedy tokens of every accelerated run are checked against plain Transformers.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import models
from ..api import accelerate_model
from ..compat import output_cache
from ..data import encode, held_out_text
from .metrics import TokenTimer


@dataclass
class KVBenchSettings:
    model: str = "default"
    prefix_tokens: int = 1000
    suffix_tokens: int = 24
    runs: int = 3
    mixed_lengths: list[int] = field(default_factory=lambda: [16, 40, 90, 150, 230, 320, 420, 512])
    mixed_new_tokens: int = 64
    long_context: int = 2000
    long_new_tokens: int = 32
    kernels: list[str] = field(default_factory=lambda: ["gather", "compiled"])
    block_size: int = 16
    threads: int | None = None
    seed: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _ttft(model, ids: torch.Tensor, pad_id: int) -> tuple[float, torch.Tensor]:
    timer = TokenTimer(ids.device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                         do_sample=False, pad_token_id=pad_id, streamer=timer)
    return timer.timings(start)[0], out


def _tpot(model, ids: torch.Tensor, new: int, pad_id: int) -> tuple[float, torch.Tensor]:
    timer = TokenTimer(ids.device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=pad_id, streamer=timer)
    return timer.timings(start)[1], out


def _cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def memory_accounting(plain, accel, ids: torch.Tensor, mask: torch.Tensor, new: int, pad_id: int) -> dict:
    """KV bytes reserved and live for each cache kind on one left-padded mixed-length batch."""
    from ..cache.paged import KVPool

    per_token = KVPool.bytes_per_token(plain, next(plain.parameters()).dtype)
    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad_id,
              return_dict_in_generate=True)
    live_tokens = int(mask.sum()) + ids.shape[0] * (new - 1)     # the last new token is never written
    rows = {}
    ref = None
    for name, model, extra in (("DynamicCache", plain, {}), ("StaticCache", plain, {"cache_implementation": "static"}),
                               ("paged", accel, {})):
        out = model.generate(ids, **kw, **extra)
        cache = output_cache(out)
        if name == "paged":
            slot = accel.hfaccel_kv_pool.bytes_per_slot
            reserved, live = cache.reserved_tokens * slot, cache.live_tokens * slot
            assert cache.live_tokens == live_tokens, (cache.live_tokens, live_tokens)
            cache.release()
        else:
            reserved, live = _cache_bytes(cache), live_tokens * per_token
        ref = out.sequences if ref is None else ref
        rows[name] = {"reserved_bytes": reserved, "live_bytes": live, "utilisation": live / reserved,
                      "greedy_match": bool(torch.equal(out.sequences, ref))}
    return {"prompt_lengths": mask.sum(dim=1).tolist(), "new_tokens": new, "caches": rows}


def run_kv_bench(s: KVBenchSettings, progress=None) -> dict[str, Any]:
    from ..cache import attention as paged_attention

    tick = progress or (lambda label: None)
    if s.threads:
        torch.set_num_threads(s.threads)
    plain, tok = models.load(s.model)
    device = next(plain.parameters()).device
    accel = copy.deepcopy(plain)
    pool_tokens = max(s.prefix_tokens * 8, sum(s.mixed_lengths) + len(s.mixed_lengths) * (s.mixed_new_tokens + 32),
                      s.long_context * 4)
    report = accelerate_model(accel, kv_cache={"max_cache_tokens": pool_tokens, "block_size": s.block_size})
    pad_id = plain.generation_config.pad_token_id
    if pad_id is None:
        pad_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    text = encode(tok, held_out_text(), plain.config.vocab_size)
    need = (s.runs + 2) * s.prefix_tokens + 101 * s.suffix_tokens
    if len(text) < need:
        raise ValueError(f"the held-out text has {len(text)} tokens, the prefix workload needs {need}")
    result: dict[str, Any] = {"schema": "hfaccel.bench.kv/1", "model": s.model, "device": str(device),
                              "threads": torch.get_num_threads(), "block_size": s.block_size,
                              "pool": report.changes[0].after}

    # 1. prefix reuse
    tick("prefix reuse")
    def request(i: int, prefix_of: int) -> torch.Tensor:
        """Prefix number `prefix_of` from the start of the text, suffix number `i` from its end."""
        prefix = text[prefix_of * s.prefix_tokens: (prefix_of + 1) * s.prefix_tokens]
        suffix = text[len(text) - (i + 1) * s.suffix_tokens: len(text) - i * s.suffix_tokens]
        return torch.tensor([prefix + suffix], device=device)

    _ttft(accel, request(0, s.runs + 1), pad_id)                  # warm-up of the code paths
    _ttft(plain, request(0, s.runs + 1), pad_id)
    cold, warm, base, match = [], [], [], True
    shared = s.runs                                                # one prefix, seen before the warm runs
    _ttft(accel, request(99, shared), pad_id)
    for i in range(s.runs):
        t, a = _ttft(accel, request(i, i), pad_id)                 # a prefix never seen: cold
        cold.append(t)
        t, b = _ttft(accel, request(i, shared), pad_id)            # the shared prefix, another suffix: warm
        warm.append(t)
        t, c = _ttft(plain, request(i, shared), pad_id)
        base.append(t)
        match &= bool(torch.equal(b, c))
    stats = accel.hfaccel_stats
    result["prefix_reuse"] = {
        "prefix_tokens": s.prefix_tokens, "suffix_tokens": s.suffix_tokens, "runs": s.runs,
        "ttft_cold_ms": 1e3 * statistics.median(cold), "ttft_warm_ms": 1e3 * statistics.median(warm),
        "ttft_transformers_ms": 1e3 * statistics.median(base),
        "speedup_warm_vs_cold": statistics.median(cold) / statistics.median(warm),
        "reused_tokens": stats.reused_tokens, "hit_rate": stats.hit_rate, "greedy_match": match}

    # 2. memory accounting on a mixed-length batch
    tick("memory accounting")
    g = torch.Generator().manual_seed(s.seed)
    width = max(s.mixed_lengths)
    ids = torch.full((len(s.mixed_lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(s.mixed_lengths):
        start = int(torch.randint(0, len(text) - n, (1,), generator=g))
        ids[r, width - n:] = torch.tensor(text[start:start + n])
        mask[r, width - n:] = 1
    result["memory"] = memory_accounting(plain, accel, ids.to(device), mask.to(device), s.mixed_new_tokens, pad_id)

    # 3. decode TPOT at a long context
    tick("long-context decode")
    long = torch.tensor([text[: s.long_context]], device=device)
    kernels = [k for k in s.kernels if k != "triton" or device.type == "cuda"]
    if device.type == "cuda" and "triton" not in kernels and paged_attention.triton_available():
        kernels.append("triton")
    names = ["DynamicCache", *kernels]

    def timed(name: str, new: int):
        model = plain if name == "DynamicCache" else accel
        paged_attention.set_decode_kernel(None if name == "DynamicCache" else name)
        try:
            return _tpot(model, long, new, pad_id)
        finally:
            paged_attention.set_decode_kernel(None)

    for name in names:
        timed(name, 4)                                             # warm-up (and the compile, if any)
    times: dict[str, list[float]] = {n: [] for n in names}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(max(s.runs, 5)):                                # systems interleaved run by run
        for name in names:
            t, outs[name] = timed(name, s.long_new_tokens)
            times[name].append(t)
    rows: dict[str, Any] = {}
    for name in names:
        rows[name if name == "DynamicCache" else f"paged/{name}"] = {
            "tpot_ms": 1e3 * statistics.median(times[name]),
            "greedy_match": bool(torch.equal(outs[name], outs["DynamicCache"]))}
    dyn = rows["DynamicCache"]["tpot_ms"]
    for row in rows.values():
        row["vs_dynamic"] = dyn / row["tpot_ms"]
    result["long_context"] = {"context_tokens": s.long_context, "new_tokens": s.long_new_tokens, "systems": rows}
    return result


def render(result: dict[str, Any]):
    from rich.table import Table

    tables = []
    p = result["prefix_reuse"]
    t = Table(title=f"prefix reuse: {p['prefix_tokens']}-token shared prefix + {p['suffix_tokens']}-token suffix "
                    f"(median of {p['runs']})")
    for col in ("system", "TTFT ms", "vs cold"):
        t.add_column(col, justify="right" if col != "system" else "left")
    t.add_row("transformers (no reuse)", f"{p['ttft_transformers_ms']:.1f}", "")
    t.add_row("hfaccel, prefix not seen (cold)", f"{p['ttft_cold_ms']:.1f}", "1.00x")
    t.add_row("hfaccel, prefix seen (warm)", f"{p['ttft_warm_ms']:.1f}", f"{p['speedup_warm_vs_cold']:.2f}x")
    t.caption = f"greedy tokens equal to transformers: {p['greedy_match']}; prefix hit rate {p['hit_rate']:.2f}"
    tables.append(t)

    m = result["memory"]
    t = Table(title=f"KV memory, batch of {len(m['prompt_lengths'])} prompts of {min(m['prompt_lengths'])}-"
                    f"{max(m['prompt_lengths'])} tokens + {m['new_tokens']} new")
    for col in ("cache", "reserved MiB", "live MiB", "utilisation", "greedy match"):
        t.add_column(col, justify="right" if col != "cache" else "left")
    for name, row in m["caches"].items():
        t.add_row(name, f"{row['reserved_bytes'] / 2**20:.1f}", f"{row['live_bytes'] / 2**20:.1f}",
                  f"{100 * row['utilisation']:.1f}%", str(row["greedy_match"]))
    tables.append(t)

    lc = result["long_context"]
    t = Table(title=f"decode at {lc['context_tokens']}-token context, {lc['new_tokens']} new tokens")
    for col in ("cache / decode kernel", "TPOT ms", "vs DynamicCache", "greedy match"):
        t.add_column(col, justify="right" if col != "cache / decode kernel" else "left")
    for name, row in lc["systems"].items():
        t.add_row(name, f"{row['tpot_ms']:.2f}", f"{row['vs_dynamic']:.2f}x", str(row["greedy_match"]))
    tables.append(t)
    return tables
