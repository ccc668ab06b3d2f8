"""Peak memory of one system, measured in a fresh process.

In the bench process both models live side by side and the allocator keeps what earlier runs freed, so
neither the process high-water mark nor an in-process RSS sample can tell the two systems apart. A
child process that loads one model, accelerates it (or not) and runs one generate() can:
  peak_memory_mb:         high-water mark of the whole child (RSS on CPU, max allocated on CUDA)
  peak_memory_delta_mb:   peak during generate() above the level just before it (activations, KV cache)

    python -m hfaccel.bench.memprobe --model default --preset cpu-fast --batch 4 --prompt-tokens 100 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from typing import Any

import torch


def probe_in_subprocess(model: str, preset: str | None, batch: int, prompt_tokens: int, new_tokens: int,
                        device: str, threads: int | None, seed: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "hfaccel.bench.memprobe", "--model", model, "--batch", str(batch),
           "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens), "--device", device,
           "--seed", str(seed)]
    if preset:
        cmd += ["--preset", preset]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--preset")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from .. import models
    from ..api import accelerate_model
    from .metrics import PeakMemory
    from .runner import make_prompts

    device = torch.device(a.device)
    model, tok = models.load(a.model)
    model.to(device)
    if a.preset:
        accelerate_model(model, a.preset)
    x = make_prompts(tok, model.config.vocab_size, a.batch, a.prompt_tokens, a.seed).to(device)
    pad = model.generation_config.pad_token_id
    with PeakMemory(device) as mem:
        model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=a.new_tokens,
                       min_new_tokens=a.new_tokens, pad_token_id=0 if pad is None else pad)
    if device.type == "cuda":
        peak = mem.peak
    else:
        peak = max(mem.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"peak_memory_mb": peak / 2**20, "peak_memory_delta_mb": mem.delta / 2**20}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
