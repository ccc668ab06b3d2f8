"""The quantization table for the default model, in one run: perplexity (held-out CPython docs), weight
bytes (all, and the linear layers alone), decode tok/s and prefill tok/s at batch 1.

    python benchmarks/quant_table.py [--threads 2] [--samples 32] [--seq-len 256] [--json FILE]

Rows: fp32, bf16, int8 (rtn), int4 rtn / gptq / awq at g64 and g128. GPTQ and AWQ calibrate on
`--samples` x `--seq-len` tokens of the docs' calibration slice (the library default is 128 x 512).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import hfaccel
from hfaccel import models
from hfaccel.bench.runner import make_prompts
from hfaccel.device import weight_bytes
from hfaccel.quality import perplexity
from hfaccel.quant.layers import QuantLinear, is_linear


def linear_bytes(model) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) or (is_linear(m) and m is not model.get_output_embeddings()):
            total += sum(t.numel() * t.element_size() for t in list(m.parameters(recurse=False))
                         + list(m.buffers(recurse=False)))
    return total


def speed(model, tok, runs: int) -> tuple[float, float]:
    x = make_prompts(tok, model.config.vocab_size, 1, 100, seed=3)
    long = make_prompts(tok, model.config.vocab_size, 1, 512, seed=4)
    kw = dict(do_sample=False, pad_token_id=0)
    decode, prefill = [], []
    with torch.inference_mode():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, **kw)      # warm-up
        for _ in range(runs):
            t = time.perf_counter()
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2, min_new_tokens=2, **kw)
            t2 = time.perf_counter()
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=66, min_new_tokens=66, **kw)
            t3 = time.perf_counter()
            decode.append(64 / ((t3 - t2) - (t2 - t)))
            t = time.perf_counter()
            model(long, use_cache=False, logits_to_keep=1)
            prefill.append(512 / (time.perf_counter() - t))
    return statistics.median(decode), statistics.median(prefill)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    plain, tok = models.load_default()
    calib = {"calibration_samples": a.samples, "calibration_seq_len": a.seq_len}
    rows = [("fp32", {}), ("bf16", {"dtype": "bfloat16"}),
            ("int8 rtn", {"quantization": {"method": "rtn", "bits": 8}})]
    for g in (64, 128):
        for method in ("rtn", "gptq", "awq"):
            rows.append((f"int4 {method} g{g}", {"quantization": {"method": method, "bits": 4, "group_size": g,
                                                                   **calib}}))
    base_linear = linear_bytes(plain)
    out = []
    print(f"{'config':<16} {'ppl':>8} {'d ppl':>8} {'weights MiB':>12} {'linear x':>9} {'decode tok/s':>13} "
          f"{'prefill tok/s':>14} {'quantize s':>11}")
    base_ppl = None
    for name, overrides in rows:
        model = copy.deepcopy(plain)
        t = time.perf_counter()
        if overrides:
            hfaccel.accelerate_model(model, kv_cache={"type": "dynamic"}, **overrides)
        took = time.perf_counter() - t
        ppl = perplexity(model, tok, window=512, max_windows=4)["perplexity"]
        base_ppl = base_ppl or ppl
        dec, pre = speed(model, tok, a.runs)
        row = {"config": name, "perplexity": ppl, "delta_pct": 100 * (ppl / base_ppl - 1),
               "weight_bytes": weight_bytes(model), "linear_ratio": linear_bytes(model) / base_linear,
               "decode_tok_s": dec, "prefill_tok_s": pre, "quantize_s": took}
        out.append(row)
        print(f"{name:<16} {ppl:8.4f} {row['delta_pct']:+7.2f}% {row['weight_bytes'] / 2**20:12.1f} "
              f"{row['linear_ratio']:8.3f}x {dec:13.1f} {pre:14.1f} {took:11.1f}", flush=True)
        del model
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "calibration": calib, "rows": out}, f, indent=2)


if __name__ == "__main__":
    main()
