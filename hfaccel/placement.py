"""Where a dispatched model's modules live: accelerate's device_map (from_pretrained(device_map=...)) and the
hooks it installs.

A module is *offloaded* when its weights are not on the device it computes on: accelerate keeps them on
the CPU or on disk (a weights_map) and its AlignDevicesHook loads them for each forward, leaving meta
tensors in between. hfaccel never rewrites such a module: a quantized or fused copy would be built from
meta tensors, and the hook would load the original weights back over it. Features that would touch one
skip it and say so; everything resident is accelerated as usual.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn


def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])          # SequentialHook holds several


@dataclass
class Placement:
    device_map: dict[str, str]                          # accelerate's map, values as strings ("cpu", "0", "disk")
    execution: dict[str, str] = field(default_factory=dict)   # map key -> the device its forward runs on
    offloaded: tuple[str, ...] = ()                     # module paths whose weights a hook loads per forward
    hooked: bool = False                                # accelerate hooks are installed

    @classmethod
    def detect(cls, model: nn.Module) -> Placement | None:
        """The model's placement, or None for a model on one device without accelerate hooks."""
        raw = getattr(model, "hf_device_map", None)
        hooked = any(hasattr(m, "_hf_hook") for m in model.modules())
        if not raw and not hooked:
            return None
        device_map = {k: _device_name(v) for k, v in (raw or {}).items()}
        offloaded, execution = [], {}
        for name, module in model.named_modules():
            for hook in _hooks(module):
                if getattr(hook, "offload", False):
                    offloaded.append(name)
                dev = getattr(hook, "execution_device", None)
                if name in device_map and dev is not None:
                    execution[name] = _device_name(dev)
        for key, dev in device_map.items():
            execution.setdefault(key, dev)
        return cls(device_map, execution, tuple(offloaded), hooked)

    def is_offloaded(self, path: str) -> bool:
        """True when the module at `path`, one of its parents or one of its children is offloaded."""
        return any(path == o or path.startswith(o + ".") or o.startswith(path + ".") or path == ""
                   for o in self.offloaded)

    @property
    def execution_devices(self) -> set[str]:
        return set(self.execution.values()) - {"disk"}

    def where(self, key: str) -> str:
        """Where one device_map entry lives, in words."""
        stored = self.device_map.get(key, "?")
        runs = self.execution.get(key, stored)
        if stored == "disk":
            return f"disk (offloaded, runs on {runs})"
        if self.is_offloaded(key) or stored != runs:
            return f"{stored} (offloaded, runs on {runs})"
        return stored

    def describe(self) -> list[str]:
        """One line per place: 'cpu: model.embed_tokens, model.layers.0-1, lm_head'."""
        groups: dict[str, list[str]] = defaultdict(list)
        for key in self.device_map:
            groups[self.where(key)].append(key)
        lines = [f"{place}: {fold(keys) if keys != [''] else 'the whole model'}" for place, keys in groups.items()]
        if self.offloaded:
            lines.append(f"{len(self.offloaded)} offloaded modules: their weights are loaded by accelerate's hooks "
                         f"for every forward and are left as they are")
        return lines


def adapter_layers(model: nn.Module) -> list[str]:
    """Paths of PEFT adapter layers (a LoRA / IA3 / ... layer wrapping its `base_layer`)."""
    return [name for name, m in model.named_modules()
            if type(m).__module__.startswith("peft.tuners") and isinstance(getattr(m, "base_layer", None), nn.Module)]


def under_adapter(path: str, adapters: list[str]) -> bool:
    return any(path == a or path.startswith(a + ".") for a in adapters)


def _device_name(dev) -> str:
    if isinstance(dev, int):
        return f"cuda:{dev}"
    return str(dev)


def fold(keys: list[str]) -> str:
    """['model.layers.0', 'model.layers.1', 'model.layers.2', 'lm_head'] -> 'model.layers.0-2, lm_head'."""
    out: list[str] = []
    run: tuple[str, int, int] | None = None
    for key in keys:
        m = re.fullmatch(r"(.*\.)(\d+)", key)
        if m and run and run[0] == m.group(1) and int(m.group(2)) == run[2] + 1:
            run = (run[0], run[1], int(m.group(2)))
            continue
        if run:
            out.append(_run_text(run))
            run = None
        if m:
            run = (m.group(1), int(m.group(2)), int(m.group(2)))
        else:
            out.append(key)
    if run:
        out.append(_run_text(run))
    return ", ".join(out)


def _run_text(run: tuple[str, int, int]) -> str:
    prefix, lo, hi = run
    return f"{prefix}{lo}" if lo == hi else f"{prefix}{lo}-{hi}"


def offloaded_reason(n: int, what: str) -> str:
    return (f"{n} {what} under offloaded modules left as they are (accelerate's hooks load their weights for "
            f"every forward; a rewritten copy would be built from meta tensors)")
