"""What accelerate_model knows about the model and the machine before it plans anything."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .placement import Placement
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
    that are views of one fused tensor count that tensor once). Tensor-parallel models: this rank's shards."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if hasattr(t, "to_local"):                    # a tensor-parallel DTensor: this rank's shard
            t = t.to_local()
        if t.device.type == "meta":
            total += t.numel() * t.element_size()
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    for m in model.modules():                         # oneDNN-reordered weights (hfaccel.packed) are opaque
        packed = getattr(m, "packed", None)
        if isinstance(packed, torch.Tensor) and packed.is_mkldnn:
            total += packed.numel() * packed.element_size()
    head = model.__dict__.get("hfaccel_certified_head")   # the compiled step's bf16 or int8 copy of the head
    if head is not None:
        total += head.bytes
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
    placement: Placement | None = None  # device_map / offload hooks (None: one device, no hooks)
    tp_rank: tuple[int, int] | None = None   # (rank, world size) of a tensor-parallel model

    @classmethod
    def detect(cls, model: nn.Module) -> "Context":
        device = model_device(model)
        dtype = model_dtype(model)
        spec, problem = spec_for(model)
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        placement = Placement.detect(model)
        if placement and placement.execution_devices:
            device = torch.device(sorted(placement.execution_devices)[0]) if device.type == "meta" else device
        from .tp import tp_size

        tp = tp_size(model)
        tp_rank = None
        if tp > 1:
            import torch.distributed as dist

            tp_rank = (dist.get_rank() if dist.is_initialized() else 0, tp)
        return cls(device, dtype, str(getattr(model.config, "model_type", "?")), spec, problem, native, dtype,
                   placement=placement, tp_rank=tp_rank)

    def describe(self) -> str:
        tp = f", tensor-parallel rank {self.tp_rank[0]} of {self.tp_rank[1]}" if self.tp_rank else ""
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)}){tp}"
        caps = torch.backends.cpu.get_cpu_capability()
        bf16 = ", native bf16" if self.native_bf16 else ""
        return f"cpu ({caps}{bf16}, {torch.get_num_threads()} threads){tp}"
