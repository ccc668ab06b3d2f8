"""Quantize with GPTQ (or AWQ), save a standard checkpoint, load it back without AutoGPTQ/AutoAWQ.

    python examples/quantize_and_save.py [gptq|awq] [OUT_DIR]

The folder holds safetensors + config.json with a quantization_config in the GPTQ v1 / AWQ GEMM layout
that Transformers + GPT-QModel and vLLM read; hfaccel.load_quantized reads it back.
"""

import copy
import os
import sys
import tempfile

import torch

import hfaccel
from hfaccel.quality import perplexity

SMOKE = os.environ.get("HFACCEL_SMOKE") == "1"
method = sys.argv[1] if len(sys.argv) > 1 else "gptq"
out_dir = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix=f"smollm2-{method}-")

model, tok = hfaccel.models.load_default()
plain = copy.deepcopy(model)
samples, seq_len = (4, 64) if SMOKE else (64, 512)
report = hfaccel.accelerate_model(model, quantization={
    "method": method, "bits": 4, "group_size": 64, "calibration_samples": samples, "calibration_seq_len": seq_len},
    tokenizer=tok)
print("\n".join(report.notes))

hfaccel.save_quantized(model, out_dir, fmt=method)
tok.save_pretrained(out_dir)
print(f"saved {method} checkpoint to {out_dir}: {sorted(os.listdir(out_dir))}")

loaded = hfaccel.load_quantized(out_dir)
x = tok("The import statement", return_tensors="pt")
same = torch.equal(model.generate(**x, max_new_tokens=8, do_sample=False),
                   loaded.generate(**x, max_new_tokens=8, do_sample=False))
print(f"reloaded model generates the same tokens: {same}")
windows = 1 if SMOKE else 4
base = perplexity(plain, tok, window=256, max_windows=windows)["perplexity"]
quant = perplexity(loaded, tok, window=256, max_windows=windows)["perplexity"]
print(f"perplexity fp32 {base:.3f} -> {method} int4 g64 {quant:.3f} ({100 * (quant / base - 1):+.1f}%)")
