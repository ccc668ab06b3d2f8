"""Quantization tests."""

import copy

import hfaccel
from hfaccel.quality import perplexity


def default_model_ppl(default_model, method: str, group_size: int = 64) -> float:
    """Held-out perplexity of the default model quantized with `method` (small calibration, for tests)."""
    plain, tok = default_model
    model = copy.deepcopy(plain)
    hfaccel.accelerate_model(model, quantization={"method": method, "bits": 4, "group_size": group_size,
                                                  "calibration_samples": 8, "calibration_seq_len": 128},
                             kv_cache={"type": "dynamic"})
    return perplexity(model, tok, window=256, max_windows=2)["perplexity"]
