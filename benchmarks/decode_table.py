"""Batch-1 decode speed and TTFT of plain Transformers, Transformers' own static-cache compile, hfaccel
presets and llama.cpp, in one run on the default model (issue "Fused kernels and a compiled decode step").

    python benchmarks/decode_table.py --threads 2 [--int4-method rtn] [--runs 3]

Per system: TTFT = median wall time of generate(max_new_tokens=1); decode tok/s = (new - 1) / (median wall
time of generate(max_new_tokens=new, min_new_tokens=new) - TTFT). Every system gets the same ~90-token
prompt, cold (hfaccel's prefix cache is cleared before every call). Warm-up (compilation included) happens before timing and is printed apart. Greedy agreement with
plain fp32 is printed per system (lossless systems must show 100%).
"""

from __future__ import annotations

import argparse
import copy
import math
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


def llama_cpp_row(ids: torch.Tensor, new: int, runs: int, threads: int) -> tuple[float, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python)")
        return None
    llm = Llama(model_path=str(models.default_gguf_path()), n_threads=threads, n_ctx=1024, verbose=False)
    toks = ids[0].tolist()
    ttfts, rates = [], []
    for _ in range(runs + 1):
        llm.reset()
        t = time.perf_counter()
        t1 = t
        for n, _tok in enumerate(llm.generate(toks, temp=0.0), start=1):
            if n == 1:
                t1 = time.perf_counter()
            if n >= new:
                break
        ttfts.append(t1 - t)
        rates.append((new - 1) / (time.perf_counter() - t1))
    return statistics.median(ttfts[1:]), statistics.median(rates[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--int4-method", default=None, choices=("rtn", "gptq", "awq"),
                    help="override cpu-int4's method (rtn skips the minutes of calibration; speed is the same)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = models.load_default()
    text = ("Summarise the following passage in two sentences. The Python standard library ships modules for "
            "file handling, networking, data formats and concurrency, so most scripts need no third-party "
            "package. Its documentation describes each module with examples and notes on portability. ")
    enc = tok(text * 2, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    print(f"prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens, {args.threads} threads, torch "
          f"{torch.__version__}")
    rows, ref = [], None

    def add(name, model, setup_s):
        nonlocal ref
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)   # warm-up
        warm = time.perf_counter() - t
        ttft, rate, out = time_generate(model, ids, mask, args.new_tokens, args.runs)
        if ref is None:
            ref = out
        agree = (out[0, ids.shape[1]:] == ref[0, ids.shape[1]:]).float().mean().item()
        rows.append((name, ttft, rate, setup_s + warm, agree))
        print(f"  {name}: ttft {ttft * 1000:.0f} ms, decode {rate:.1f} tok/s, setup+warm-up {setup_s + warm:.1f} s, "
              f"greedy agreement {agree:.0%}", flush=True)

    add("transformers fp32", base, 0.0)

    from transformers.generation.configuration_utils import CompileConfig
    static = copy.deepcopy(base)
    static.generation_config.cache_implementation = "static"
    cc = CompileConfig(fullgraph=True)
    cc._compile_all_devices = True            # Transformers compiles on CUDA only unless told
    static.generation_config.compile_config = cc
    add("transformers static cache + torch.compile", static, 0.0)
    del static

    presets = [("hfaccel cpu-fast", "cpu-fast", {}), ("hfaccel cpu-int8", "cpu-int8", {}),
               ("hfaccel cpu-int4", "cpu-int4", {}),
               ("hfaccel cpu-int4 + int4 head", "cpu-int4", {"quantize_lm_head": True})]
    for name, preset, quant in presets:
        model = copy.deepcopy(base)
        if preset == "cpu-int4" and args.int4_method:
            quant = {**quant, "method": args.int4_method}
            name += f" ({args.int4_method})"
        t = time.perf_counter()
        report = hfaccel.accelerate_model(model, preset, **({"quantization": quant} if quant else {}))
        setup = time.perf_counter() - t
        print(f"{name}: " + "; ".join(f"{c.target} -> {c.after}" for c in report.changes if c.feature == "compile"))
        add(name, model, setup)
        del model

    lc = llama_cpp_row(ids, args.new_tokens, args.runs, args.threads)
    if lc:
        rows.append(("llama.cpp Q4_1 (same GGUF)", lc[0], lc[1], 0.0, float("nan")))

    plain = rows[0]
    print("\n| system | TTFT ms | decode tok/s | vs plain fp32 | setup + warm-up s | greedy agreement |")
    print("|---|---|---|---|---|---|")
    for name, ttft, rate, setup, agree in rows:
        shown = "-" if math.isnan(agree) else f"{agree:.0%}"
        print(f"| {name} | {ttft * 1000:.0f} | {rate:.1f} | {rate / plain[2]:.2f}x | {setup:.1f} | {shown} |")


if __name__ == "__main__":
    main()
