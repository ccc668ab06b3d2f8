"""`hfaccel bench --workload mixed`: a seeded serving workload, continuous batching against the baselines.

`requests` requests, all arriving at t = 0, with prompts of prompt_min..prompt_max tokens (slices of the
held-out CPython docs text) and outputs of new_min..new_max tokens (exact: EOS is masked until then, so
every system does the same work). Systems, each warmed up first, timed in one run:
- static: plain Transformers generate() over batches of `batch` requests in arrival order, left-padded
  to the batch's longest prompt and run for the batch's longest output (what a script without a server
  does);
- transformers-cb: Transformers' own continuous batching (ContinuousBatchingManager, the engine behind
  model.generate_batch), with per-request max_new_tokens;
- hfaccel: hfaccel.generate_batch on the model accelerated with `preset`.
Reported per system: throughput (generated tokens / wall time), TTFT and TPOT p50/p95/p99 (TTFT counts
the time a request waits for its turn), and greedy agreement with the static baseline.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .. import models
from ..api import accelerate_model
from ..batching import generate_batch
from ..data import encode, held_out_text
from .metrics import TokenTimer, summary

SYSTEMS = ("static", "transformers-cb", "hfaccel")


@dataclass
class MixedBenchSettings:
    model: str = "default"
    preset: str = "cpu-fast"
    requests: int = 64
    prompt_min: int = 16
    prompt_max: int = 512
    new_min: int = 16
    new_max: int = 256
    batch: int = 16                      # static batch size, and the engines' max concurrent requests
    token_budget: int = 512              # hfaccel: tokens per step (decodes + one prefill chunk)
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    threads: int | None = None
    seed: int = 0


def make_workload(s: MixedBenchSettings, tokenizer, vocab: int) -> list[tuple[list[int], int]]:
    """[(prompt ids, new tokens)], the same for a given seed."""
    ids = encode(tokenizer, held_out_text(), vocab)
    rnd = random.Random(s.seed)
    out = []
    for _ in range(s.requests):
        n = rnd.randint(s.prompt_min, s.prompt_max)
        start = rnd.randrange(0, len(ids) - n)
        out.append((ids[start:start + n], rnd.randint(s.new_min, s.new_max)))
    return out


def _eos(model) -> list[int]:
    e = model.generation_config.eos_token_id
    return [] if e is None else [e] if isinstance(e, int) else list(e)


def _pad_id(model) -> int:
    p = model.generation_config.pad_token_id
    return p if p is not None else (_eos(model) or [0])[0]


def run_static(model, work, batch: int) -> dict[str, Any]:
    pad = _pad_id(model)
    ttft, tpot, outputs = [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(work), batch):
        chunk = work[i:i + batch]
        width = max(len(p) for p, _ in chunk)
        new = max(n for _, n in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, _) in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        timer = TokenTimer(ids.device)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=pad, streamer=timer)
        steps = timer.times[1:]                  # one timestamp per generated step
        for r, (_, n) in enumerate(chunk):
            ttft.append(steps[0] - t0)
            if n > 1:
                tpot.append((steps[n - 1] - steps[0]) / (n - 1))
            outputs.append(out[r, width:width + n].tolist())
    wall = time.perf_counter() - t0
    return _result("static", work, wall, ttft, tpot, outputs)


def run_transformers_cb(model, work, batch: int) -> dict[str, Any]:
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in work), eos_token_id=None,
                          pad_token_id=_pad_id(model))
    mgr = model.init_continuous_batching(generation_config=gc)
    mgr.start()
    try:
        mgr.add_request(work[0][0][:8], request_id="warm-up", max_new_tokens=4)
        _collect(mgr, {"warm-up"})
        t0 = time.perf_counter()
        names = [mgr.add_request(p, request_id=f"r{i}", max_new_tokens=n, record_timestamps=True)
                 for i, (p, n) in enumerate(work)]
        done = _collect(mgr, set(names))
        wall = time.perf_counter() - t0
    finally:
        mgr.stop(block=True)
    ttft, tpot, outputs = [], [], []
    for name, (_, n) in zip(names, work):
        r = done[name]
        stamps = r.timestamps or []
        if stamps:
            ttft.append(stamps[0] - t0)
            if len(stamps) > 1:
                tpot.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
        outputs.append(list(r.generated_tokens)[:n])
    return _result("transformers-cb", work, wall, ttft, tpot, outputs)


def _collect(mgr, names: set[str], patience: float = 300.0) -> dict[str, Any]:
    from transformers.generation.continuous_batching.requests import RequestStatus

    done: dict[str, Any] = {}
    while len(done) < len(names):
        r = mgr.get_result(timeout=patience)
        if r is None:
            raise RuntimeError(f"transformers continuous batching returned nothing for {patience:.0f} s "
                               f"({len(done)}/{len(names)} done)")
        if r.error or r.status == RequestStatus.FAILED:
            raise RuntimeError(f"transformers continuous batching failed request {r.request_id}: {r.error}")
        if r.request_id in names and r.status == RequestStatus.FINISHED:
            done[r.request_id] = r
    return done


def run_hfaccel(model, work, batch: int, token_budget: int) -> dict[str, Any]:
    from ..cache.feature import clear_prefix_cache

    warm = [p[::-1] for p, _ in work[:2]]
    generate_batch(model, warm, max_new_tokens=4, max_batch=batch, token_budget=token_budget)   # warm-up
    clear_prefix_cache(model)                 # no prompt blocks from the warm-up
    from ..batching.engine import EngineCore
    from ..batching.params import SamplingParams

    core = EngineCore(model, max_batch=batch, token_budget=token_budget)
    eos = tuple(_eos(model))
    reqs = [core.new_request(p, SamplingParams(max_new_tokens=n, min_new_tokens=n, eos_token_id=eos))
            for p, n in work]
    t0 = time.perf_counter()
    for r in reqs:
        r.arrival = t0
        core.add(r)
    while core.has_work:
        core.step()
    wall = time.perf_counter() - t0
    ttft = [r.first_token_at - t0 for r in reqs]
    tpot = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) for r in reqs if len(r.token_times) > 1]
    res = _result("hfaccel", work, wall, ttft, tpot, [r.output for r in reqs])
    res["preemptions"] = core.scheduler.preemptions
    res["steps"] = core.steps
    res["reused_tokens"] = sum(r.reused for r in reqs)
    return res


def _result(system: str, work, wall: float, ttft, tpot, outputs) -> dict[str, Any]:
    tokens = sum(len(o) for o in outputs)
    return {"system": system, "wall_s": wall, "tokens": tokens, "throughput_tok_s": tokens / wall,
            "ttft_ms": {k: v * 1e3 for k, v in summary(ttft).items() if k != "n"},
            "tpot_ms": {k: v * 1e3 for k, v in summary(tpot).items() if k != "n"}, "outputs": outputs}


def run_mixed_bench(s: MixedBenchSettings, progress=None) -> dict[str, Any]:
    tick = progress or (lambda label: None)
    unknown = sorted(set(s.systems) - set(SYSTEMS))
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; allowed: {', '.join(SYSTEMS)}")
    if not (1 <= s.prompt_min <= s.prompt_max and 1 <= s.new_min <= s.new_max and s.requests >= 1):
        raise ValueError(f"bad workload: prompts {s.prompt_min}..{s.prompt_max}, outputs {s.new_min}..{s.new_max}, "
                         f"{s.requests} requests; allowed: 1 <= min <= max, requests >= 1")
    if s.threads:
        torch.set_num_threads(s.threads)
    plain, tok = models.load(s.model)
    work = make_workload(s, tok, plain.config.vocab_size)
    rows = []
    if "static" in s.systems:
        tick("static batches (plain transformers)")
        with torch.inference_mode():
            rows.append(run_static(plain, work, s.batch))
    if "transformers-cb" in s.systems:
        tick("transformers continuous batching")
        cb = copy.deepcopy(plain)
        cb.set_attn_implementation("sdpa")
        rows.append(run_transformers_cb(cb, work, s.batch))
        del cb
    if "hfaccel" in s.systems:
        tick(f"hfaccel generate_batch ({s.preset})")
        accel = copy.deepcopy(plain)
        pool = s.batch * (s.prompt_max + s.new_max) + 64 * 16
        accelerate_model(accel, s.preset, kv_cache={"max_cache_tokens": pool}, compile={"enabled": False})
        rows.append(run_hfaccel(accel, work, s.batch, s.token_budget))
    base = rows[0]
    for r in rows:
        r["vs_first"] = r["throughput_tok_s"] / base["throughput_tok_s"]
        same = total = 0
        for a, b in zip(r["outputs"], base["outputs"]):
            same += sum(x == y for x, y in zip(a, b))
            total += len(b)
        r["agreement_vs_first"] = same / total if total else float("nan")
    for r in rows:
        r.pop("outputs")
    return {"settings": asdict(s), "model": s.model, "rows": rows,
            "prompt_tokens": sum(len(p) for p, _ in work), "new_tokens": sum(n for _, n in work)}


def render(result: dict[str, Any]):
    from rich.table import Table

    s = result["settings"]
    first = result["rows"][0]["system"]
    t = Table(title=f"mixed workload: {s['requests']} requests, prompts {s['prompt_min']}-{s['prompt_max']} tokens, "
                    f"outputs {s['new_min']}-{s['new_max']}, batch {s['batch']}, seed {s['seed']}")
    for col in ("system", "tok/s", f"vs {first}", "TTFT p50/p95/p99 ms", "TPOT p50/p95/p99 ms", "wall s",
                f"tokens = {first}"):
        t.add_column(col, justify="left" if col == "system" else "right")
    for r in result["rows"]:
        tt, tp = r["ttft_ms"], r["tpot_ms"]
        t.add_row(r["system"], f"{r['throughput_tok_s']:.1f}", f"{r['vs_first']:.2f}x",
                  f"{tt['p50']:.0f} / {tt['p95']:.0f} / {tt['p99']:.0f}",
                  f"{tp['p50']:.1f} / {tp['p95']:.1f} / {tp['p99']:.1f}", f"{r['wall_s']:.1f}",
                  f"{r['agreement_vs_first']:.1%}")
    extra = next((r for r in result["rows"] if r["system"] == "hfaccel"), None)
    if extra:
        t.caption = (f"hfaccel: {extra['steps']} steps, {extra['preemptions']} preemptions, "
                     f"{extra['reused_tokens']} prompt tokens from the prefix cache")
    return [t]


__all__ = ["MixedBenchSettings", "make_workload", "render", "run_mixed_bench"]
