"""Speculative decoding on the default model: every draft type against plain greedy, batch 1 and batch 4, on
(a) input-grounded prompts (rewrite / summarise a given passage, edit given code) and (b) open-ended chat.
One run, one process; figures for issue "Speculative decoding inside an unchanged generate()".

    python benchmarks/speculative.py --threads 2 [--new 128] [--drafts prompt-lookup,self-int8,...]

Baseline: the same fp32 model through hfaccel's default (lossless) config, i.e. paged cache, no drafting
- and plain Transformers for reference. Each speculative system is the baseline plus one draft. Speed-up is
plain-greedy wall time / speculative wall time for the same prompts (generated tokens per second, counted
up to each row's EOS). Token agreement with plain Transformers greedy is printed (must be 100%).
"""

from __future__ import annotations

import argparse
import time

import torch

import hfaccel
from hfaccel import models
from hfaccel.cache.feature import clear_prefix_cache
from hfaccel.data import held_out_text

CODE = '''def mean_and_spread(values):
    total = 0
    for v in values:
        total = total + v
    mean = total / len(values)
    spread = 0
    for v in values:
        spread = spread + (v - mean) ** 2
    return mean, (spread / len(values)) ** 0.5
'''

CHAT = [
    "Write a short story about a robot who learns to paint.",
    "What are some good habits for staying healthy while working from home?",
    "Explain why the sky is blue to a ten year old.",
    "Give me three ideas for a weekend trip with friends and say why each is fun.",
]


def grounded_prompts() -> list[str]:
    text = held_out_text()
    paras = [p.strip() for p in text.split("\n\n") if 400 < len(p.strip()) < 900][:3]
    return ([f"Rewrite the following passage in plain English, keeping every detail:\n\n{p}" for p in paras[:2]]
            + [f"Summarise this passage:\n\n{paras[2]}",
               f"Rename the variable `spread` to `variance_sum` in this code and show the whole function:\n\n"
               f"```python\n{CODE}```"])


def encode(tok, prompts: list[str]):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def run(model, ids, mask, new: int, eos: int):
    clear_prefix_cache(model)
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    dt = time.perf_counter() - t
    gen = out[:, ids.shape[1]:]
    tokens = 0
    for row in gen.tolist():
        tokens += (row.index(eos) + 1) if eos in row else len(row)
    return dt, tokens, gen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--k", type=int, default=None, help="num_draft_tokens (default: the config's)")
    ap.add_argument("--drafts", default="prompt-lookup,self-int8,self-int4,layer-skip:20")
    ap.add_argument("--preset", default=None, help="the config under every hfaccel system (default: hfaccel's "
                    "lossless defaults); e.g. cpu-fast: its greedy decode runs the compiled step, its "
                    "speculative systems the compiled verify step")
    ap.add_argument("--kinds", default="grounded,chat")
    ap.add_argument("--batches", default="1,4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    plain, tok = models.load_default()
    eos = plain.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    kinds = args.kinds.split(",")
    sets = {k: encode(tok, grounded_prompts() if k == "grounded" else CHAT) for k in kinds}
    sizes = [int(b) for b in args.batches.split(",")]
    batches = {}
    for kind, (ids, mask) in sets.items():
        if 1 in sizes:
            batches[(kind, 1)] = [(ids[i:i + 1, mask[i].argmax():], None) for i in range(ids.shape[0])]
        if 4 in sizes:
            batches[(kind, 4)] = [(ids, mask)]

    base, _ = models.load_default()
    t = time.perf_counter()
    hfaccel.accelerate_model(base, args.preset)
    greedy_name = f"greedy (hfaccel {args.preset or 'default'})"
    print(f"# {greedy_name}: set up in {time.perf_counter() - t:.1f} s")
    systems = {"plain transformers": plain, greedy_name: base}
    for d in args.drafts.split(","):
        m, _ = models.load_default()
        spec = {"draft": d} | ({"num_draft_tokens": args.k} if args.k else {})
        t = time.perf_counter()
        hfaccel.accelerate_model(m, args.preset, speculative=spec)
        print(f"# {d}: attached in {time.perf_counter() - t:.1f} s ({m.hfaccel_draft.name})")
        systems[d] = m

    reference = {}
    print("\n| prompts | batch | system | tok/s | vs hfaccel greedy (same config) | vs plain | acceptance | tokens / target fwd | "
          "draft s | target s | agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (kind, bs), calls in batches.items():
        for m in systems.values():      # warm-up: a full-length call each (compiled steps build their bucket)
            m.generate(calls[0][0], attention_mask=calls[0][1], max_new_tokens=args.new, do_sample=False)
        base_rate = plain_rate = None
        for name, m in systems.items():
            total_t = total_n = 0
            same = count = 0
            st0 = None
            stats = m.__dict__.get("hfaccel_spec_stats")
            if stats is not None:
                st0 = (stats.drafted, stats.accepted, stats.emitted, stats.row_steps, stats.draft_seconds,
                       stats.target_seconds)
            for i, (ids, mask) in enumerate(calls):
                dt, n, gen = run(m, ids, mask, args.new, eos)
                total_t += dt
                total_n += n
                key = (kind, bs, i)
                if name == "plain transformers":
                    reference[key] = gen
                ref = reference[key]
                width = min(ref.shape[1], gen.shape[1])
                same += int((ref[:, :width] == gen[:, :width]).sum())
                count += ref[:, :width].numel()
            rate = total_n / total_t
            if name == "plain transformers":
                plain_rate = rate
            if name == greedy_name:
                base_rate = rate
            speed = f"{rate / base_rate:.2f}x" if base_rate else "-"
            vs_plain = f"{rate / plain_rate:.2f}x"
            acc = tpf = ds = ts = "-"
            if st0 is not None:
                drafted, accepted = stats.drafted - st0[0], stats.accepted - st0[1]
                acc = f"{accepted / max(drafted, 1):.0%}"
                tpf = f"{(stats.emitted - st0[2]) / max(stats.row_steps - st0[3], 1):.2f}"
                ds, ts = f"{stats.draft_seconds - st0[4]:.2f}", f"{stats.target_seconds - st0[5]:.2f}"
            print(f"| {kind} | {bs} | {name} | {rate:.1f} | {speed} | {vs_plain} | {acc} | {tpf} | {ds} | {ts} | "
                  f"{same / count:.1%} |", flush=True)
    # a system that fell back to an eager loop is timed as that loop: say so (a chat prompt holding the pad
    # token once made every batch-1 "compiled greedy" here eager, unnoticed)
    for name, m in systems.items():
        for attr in ("hfaccel_compile_stats", "hfaccel_spec_stats"):
            st = m.__dict__.get(attr)
            if st is not None and st.fallback_calls:
                print(f"# {name}: {st.fallback_calls} call(s) fell back ({attr}): {dict(st.fallback_reasons)}")


if __name__ == "__main__":
    main()
