"""Batch-1 decode speed and TTFT of plain Transformers, Transformers' own static-cache compile, hfaccel
presets and llama.cpp, in one run on the default model (issue "Fused kernels and a compiled decode step").

    python benchmarks/decode_table.py --threads 2 [--int4-method rtn] [--runs 3] [--rounds 3]
        [--systems plain,cpu-int4,llama.cpp]

Per system: TTFT = median wall time of generate(max_new_tokens=1); decode tok/s = (new - 1) / (median wall
time of generate(max_new_tokens=new, min_new_tokens=new) - TTFT). Every system gets the same ~90-token
prompt, cold (hfaccel's prefix cache is cleared before every call). Warm-up (compilation included) happens before timing and is printed apart. Greedy agreement with
plain fp32 is printed per system (lossless systems must show 100%).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import hfaccel
from hfaccel import models
from hfaccel.cache.feature import clear_prefix_cache


def time_generate(model, ids, mask, new: int, runs: int) -> tuple[float, float, torch.Tensor]:
    def once(n):
        clear_prefix_cache(model)                # cold prefill every time: no prompt blocks from the last run
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t, out

    ttft = statistics.median(once(1)[0] for _ in range(runs))
    totals, out = [], None
    for _ in range(runs):
        dt, out = once(new)
        totals.append(dt)
    return ttft, (new - 1) / (statistics.median(totals) - ttft), out


class LlamaCpp:
    """llama-cpp-python on the same GGUF and threads: the prompt's tokens in, greedy tokens out."""

    def __init__(self, threads: int):
        from hfaccel.bench.llamacpp import load

        self.llm, note = load(models.default_gguf_path(), n_threads=threads, n_ctx=1024, verbose=False)
        if note:
            print(note)

    def time(self, ids: torch.Tensor, new: int, runs: int) -> tuple[float, float]:
        toks = ids[0].tolist()
        ttfts, rates = [], []
        for _ in range(runs + 1):
            self.llm.reset()
            t = time.perf_counter()
            t1 = t
            for n, _tok in enumerate(self.llm.generate(toks, temp=0.0), start=1):
                if n == 1:
                    t1 = time.perf_counter()
                if n >= new:
                    break
            ttfts.append(t1 - t)
            rates.append((new - 1) / (time.perf_counter() - t1))
        return statistics.median(ttfts[1:]), statistics.median(rates[1:])


SYSTEMS = ("plain", "static", "cpu-fast", "low-latency", "cpu-int8", "cpu-int4", "cpu-int4-int4-head", "llama.cpp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3, help="timed generate() calls per system and round")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every system this many times, in turn, and report the median round (a slow spell "
                         "of a shared machine then falls on every system, not on one)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list out of {', '.join(SYSTEMS)} "
                                                                  "(plain is always included: the reference)")
    ap.add_argument("--int4-method", default=None, choices=("rtn", "gptq", "awq"),
                    help="override cpu-int4's method (rtn skips the minutes of calibration; speed is the same)")
    args = ap.parse_args()
    wanted = ["plain"] + [s for s in args.systems.split(",") if s and s != "plain"]
    for s in wanted:
        if s not in SYSTEMS:
            ap.error(f"--systems: {s!r} is not allowed; allowed: {', '.join(SYSTEMS)}")
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds} is not allowed; allowed: >= 1")
    torch.set_num_threads(args.threads)
    base, tok = models.load_default()
    text = ("Summarise the following passage in two sentences. The Python standard library ships modules for "
            "file handling, networking, data formats and concurrency, so most scripts need no third-party "
            "package. Its documentation describes each module with examples and notes on portability. ")
    enc = tok(text * 2, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    print(f"prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens, {args.threads} threads, {args.rounds} "
          f"round(s), torch {torch.__version__}")

    built = []                                  # (name, timer, setup + warm-up s, model or None)

    def add(name, model, setup_s):
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)   # warm-up
        warm = time.perf_counter() - t
        built.append((name, lambda: time_generate(model, ids, mask, args.new_tokens, args.runs), setup_s + warm))
        print(f"  built {name}: setup+warm-up {setup_s + warm:.1f} s", flush=True)

    add("transformers fp32", base, 0.0)
    if "static" in wanted:
        from transformers.generation.configuration_utils import CompileConfig
        static = copy.deepcopy(base)
        static.generation_config.cache_implementation = "static"
        cc = CompileConfig(fullgraph=True)
        cc._compile_all_devices = True            # Transformers compiles on CUDA only unless told
        static.generation_config.compile_config = cc
        add("transformers static cache + torch.compile", static, 0.0)

    presets = [("cpu-fast", "hfaccel cpu-fast", "cpu-fast", {}),
               ("low-latency", "hfaccel low-latency (cpu-fast + prompt lookup)", "low-latency", {}),
               ("cpu-int8", "hfaccel cpu-int8", "cpu-int8", {}),
               ("cpu-int4", "hfaccel cpu-int4", "cpu-int4", {}),
               ("cpu-int4-int4-head", "hfaccel cpu-int4 + int4 head", "cpu-int4", {"lm_head_bits": 4})]
    for key, name, preset, quant in presets:
        if key not in wanted:
            continue
        model = copy.deepcopy(base)
        if preset == "cpu-int4" and args.int4_method:
            quant = {**quant, "method": args.int4_method}
            name += f" ({args.int4_method})"
        t = time.perf_counter()
        report = hfaccel.accelerate_model(model, preset, **({"quantization": quant} if quant else {}))
        setup = time.perf_counter() - t
        print(f"{name}: " + "; ".join(f"{c.target} -> {c.after}" for c in report.changes if c.feature == "compile"))
        add(name, model, setup)

    if "llama.cpp" in wanted:
        try:
            lc = LlamaCpp(args.threads)
            built.append(("llama.cpp Q4_1 (same GGUF)", lambda: (*lc.time(ids, args.new_tokens, args.runs), None), 0.0))
        except ImportError as e:      # not installed, or installed without a dependency (diskcache, seen)
            print(f"llama.cpp: llama-cpp-python cannot be imported ({e}; pip install llama-cpp-python)")

    results: dict[str, list] = {name: [] for name, _, _ in built}
    for r in range(args.rounds):
        for name, timer, _ in built:
            ttft, rate, out = timer()
            results[name].append((ttft, rate, out))
            print(f"  round {r + 1} {name}: ttft {ttft * 1000:.0f} ms, decode {rate:.1f} tok/s", flush=True)

    ref = results["transformers fp32"][0][2]
    plain_rate = statistics.median(rate for _, rate, _ in results["transformers fp32"])
    print("\n| system | TTFT ms | decode tok/s | vs plain fp32 | setup + warm-up s | greedy agreement |")
    print("|---|---|---|---|---|---|")
    for name, _, setup in built:
        ttft = statistics.median(t for t, _, _ in results[name])
        rate = statistics.median(r for _, r, _ in results[name])
        out = results[name][0][2]
        shown = "-" if out is None else \
            f"{(out[0, ids.shape[1]:] == ref[0, ids.shape[1]:]).float().mean().item():.0%}"
        print(f"| {name} | {ttft * 1000:.0f} | {rate:.1f} | {rate / plain_rate:.2f}x | {setup:.1f} | {shown} |")


if __name__ == "__main__":
    main()
