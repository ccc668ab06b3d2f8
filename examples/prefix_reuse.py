"""Prefix reuse: the same long system prompt on every request is prefilled once.

    python examples/prefix_reuse.py
"""

import os
import time

import hfaccel
from hfaccel.data import held_out_text

SMOKE = os.environ.get("HFACCEL_SMOKE") == "1"

model, tok = hfaccel.models.load_default()
hfaccel.accelerate_model(model)                    # lossless defaults: the paged cache is on

document = held_out_text()[: 800 if SMOKE else 4000]
system = f"Answer questions about this documentation.\n\n{document}\n\n"
for question in ("What is described first?", "Name one keyword mentioned.", "Summarise it in five words."):
    inputs = tok(system + "Question: " + question + "\nAnswer:", return_tensors="pt")
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=1, do_sample=False)
    ttft = time.perf_counter() - start
    s = model.hfaccel_stats
    print(f"{inputs['input_ids'].shape[1]} prompt tokens, TTFT {1e3 * ttft:.0f} ms, "
          f"reused so far {s.reused_tokens} tokens (hit rate {s.hit_rate:.2f})")
