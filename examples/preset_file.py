"""Accelerate with a YAML config file, and override one key from code.

    python examples/preset_file.py
"""

import os
from pathlib import Path

import hfaccel

SMOKE = os.environ.get("HFACCEL_SMOKE") == "1"
here = Path(__file__).parent

model, tok = hfaccel.models.load_default()
report = hfaccel.accelerate_model(model, here / "my-preset.yaml", kv_cache={"block_size": 16})
print(f"config {report.config_name}: kv_cache = {report.config['kv_cache']}")
for change in report.changes:
    print(f"  {change.feature}: {change.target} -> {change.after}")

inputs = tok("The with statement", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=8 if SMOKE else 40, do_sample=False)
print(tok.decode(out[0], skip_special_tokens=True))
