"""An ordinary Transformers script: it knows nothing about hfaccel.

    python examples/plain_script.py MODEL_DIR                          # plain
    hfaccel run --preset cpu-fast examples/plain_script.py MODEL_DIR   # the same script, accelerated

MODEL_DIR: any causal LM folder, e.g. the default model's:
    python -c "import hfaccel.models as m; print(m.default_model_dir())"
"""

import sys
import time

from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
new_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 48
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)

inputs = tok("Python's garbage collector", return_tensors="pt")
start = time.perf_counter()
out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
elapsed = time.perf_counter() - start
print(tok.decode(out[0], skip_special_tokens=True))
print(f"attention: {model.config._attn_implementation}; {new_tokens} tokens in {elapsed:.2f} s")
