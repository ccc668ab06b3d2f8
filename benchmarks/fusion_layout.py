"""Eager generate() time of SmolLM2-135M with the fuse feature, the weight_layout feature, both, and cpu-fast,
against plain Transformers, in one run; each checked token-identical (48 greedy tokens) first, then a
save_pretrained/from_pretrained round trip of a fused model.

    python benchmarks/fusion_layout.py
"""
import copy
import tempfile
import time

import torch

import hfaccel
from hfaccel import models

torch.set_num_threads(2)
m, tok = models.load_default()
ids = tok(["The history of the Roman empire is"], return_tensors="pt").input_ids
ref = m.generate(ids, max_new_tokens=48, do_sample=False)
def t(model, n=64):
    model.generate(ids, max_new_tokens=4, do_sample=False)
    best = 1e9
    for _ in range(2):
        s = time.perf_counter(); model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False); best = min(best, time.perf_counter() - s)
    return best
for name, kw in [("plain", None), ("fuse only (eager)", dict(kv_cache={"type": "dynamic"}, compile={"enabled": False})),
                 ("layout only", dict(kv_cache={"type": "dynamic"}, compile={"enabled": False}, fusion={"qkv": False, "gate_up": False, "rms_norm": False, "weight_layout": True})),
                 ("layout+fuse (eager)", dict(kv_cache={"type": "dynamic"}, compile={"enabled": False}, fusion={"weight_layout": True})),
                 ("cpu-fast", dict(config="cpu-fast"))]:
    f = copy.deepcopy(m)
    if kw is not None:
        hfaccel.accelerate_model(f, **kw)
    same = torch.equal(f.generate(ids, max_new_tokens=48, do_sample=False), ref)
    print(f"{name:22s} same={same} 64 tokens {t(f):.3f} s", flush=True)
with tempfile.TemporaryDirectory() as d:
    f2 = copy.deepcopy(m); hfaccel.accelerate_model(f2)
    f2.save_pretrained(d)
    from transformers import AutoModelForCausalLM
    g = AutoModelForCausalLM.from_pretrained(d)
    print("reload equal", all(torch.equal(x, y) for x, y in zip(g.state_dict().values(), m.state_dict().values())))
