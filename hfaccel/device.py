"""What accelerate_model knows about the model and the machine before it plans anything."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .registry import ArchSpec, spec_for


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is no such file)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run in hardware instead of being emulated."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, each storage counted once, whole (tied weights are shared; weights
    that are views of one fused tensor count that tensor once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            total += t.numel() * t.element_size()
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype                 # the model's dtype as loaded
    model_type: str
    spec: ArchSpec | None
    spec_problem: str | None           # why there is no usable spec
    native_bf16: bool                  # bf16 runs in hardware on this device
    target_dtype: torch.dtype = field(default=torch.float32)   # set by the dtype planner
    tokenizer: Any = None              # accelerate_model(tokenizer=...), for calibration
    calibration: Any = None            # accelerate_model(calibration=...): text, list of strings, Dataset
    draft_model: Any = None            # accelerate_model(draft_model=...): a loaded draft for speculative decoding

    @classmethod
    def detect(cls, model: nn.Module) -> "Context":
        device = model_device(model)
        dtype = model_dtype(model)
        spec, problem = spec_for(model)
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return cls(device, dtype, str(getattr(model.config, "model_type", "?")), spec, problem, native, dtype)

    def describe(self) -> str:
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        caps = torch.backends.cpu.get_cpu_capability()
        bf16 = ", native bf16" if self.native_bf16 else ""
        return f"cpu ({caps}{bf16}, {torch.get_num_threads()} threads)"
