"""The only functions that mutate a model.

Every feature changes the model through a Rewriter. Each method performs one change, records a
`Change` for the report and an undo closure, so that:
- the report is complete by construction (nothing changes without a record);
- a failure midway rolls back everything applied so far (accelerate_model is transactional);
- revert_model undoes every reversible change in reverse order and restores the exact prior state.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .report import Change

_MISSING = object()


class Rewriter:
    def __init__(self, model: nn.Module):
        self.model = model
        self.feature = "?"   # set by accelerate_model before each step
        self._log: list[tuple[Change, Callable[[], None] | None]] = []
        self._on_commit: list[Callable[[], None]] = []

    # --- records -------------------------------------------------------------------------------
    @property
    def changes(self) -> list[Change]:
        return [c for c, _ in self._log]

    def record(self, target: str, before: str, after: str, undo: Callable[[], None] | None, *,
               lossless: bool = True) -> Change:
        """Record a change already made. `undo=None` means it cannot be undone exactly."""
        change = Change(self.feature, target, before, after, reversible=undo is not None, lossless=lossless)
        self._log.append((change, undo))
        return change

    def commit(self) -> None:
        """End the transaction: drop what was kept only to make a failure roll back exactly."""
        for hook in self._on_commit:
            hook()
        self._on_commit.clear()

    def rollback(self) -> list[Change]:
        """Undo every reversible change in reverse order. Returns the changes that could not be undone.

        Before commit() every change is reversible, so a failed accelerate_model restores exactly.
        """
        stuck = []
        while self._log:
            change, undo = self._log.pop()
            if undo is None:
                stuck.append(change)
            else:
                undo()
        return stuck[::-1]

    def _irreversible_after_commit(self, change: Change) -> None:
        """The last recorded change keeps its undo only until commit(): a failed transaction still restores
        it, a committed one drops the original (memory) and becomes irreversible."""
        index = len(self._log) - 1

        def on_commit() -> None:
            change.reversible = False
            self._log[index] = (change, None)

        self._on_commit.append(on_commit)

    # --- mutations -----------------------------------------------------------------------------
    def set_attr(self, obj: Any, name: str, value: Any, *, target: str, lossless: bool = True,
                 label: str | None = None) -> None:
        """Set an attribute on one object (an instance, never a class), remembering the old value.
        `label` is how the report describes the new value (default: its short repr)."""
        if isinstance(obj, type):
            raise TypeError(f"refusing to patch class {obj.__name__}: hfaccel patches instances only")
        old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name, _MISSING)
        shown = getattr(obj, name, _MISSING)
        if isinstance(value, types.FunctionType) and label is not None:
            value.__hfaccel_label__ = label          # how the next feature's report names what it wraps
        setattr(obj, name, value)

        def undo() -> None:
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)

        self.record(target, "-" if shown is _MISSING else _short(shown), label if label is not None else _short(value), undo, lossless=lossless)

    def swap_module(self, path: str, new: nn.Module, *, lossless: bool = True, keep_original: bool = True,
                    label: str | None = None) -> None:
        """Replace the submodule at dotted `path` with `new`. The original is kept for revert; a lossy swap
        with keep_original=False keeps it only until commit() (so a failed transaction still restores it),
        then drops it and becomes irreversible."""
        parent_path, _, name = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        old = parent.get_submodule(name)
        hook = getattr(old, "_hf_hook", None)
        if hook is not None:
            # a device_map model: the replacement keeps accelerate's input/output device alignment (offloaded
            # modules are never swapped, see hfaccel.placement)
            from accelerate.hooks import add_hook_to_module

            add_hook_to_module(new, hook)
        setattr(parent, name, new)
        change = self.record(path, type(old).__name__, label or type(new).__name__,
                             lambda: setattr(parent, name, old), lossless=lossless)
        if not (lossless or keep_original):
            self._irreversible_after_commit(change)

    def bind_forward(self, module: nn.Module, path: str, fn: Callable[..., Any], *, lossless: bool = True) -> None:
        """Rebind `module.forward` on this instance to `fn(module, ...)`.

        The new forward must accept the same parameters as the old one (the huggingface/kernels rule),
        so callers that pass arguments by name keep working.
        """
        old_sig = inspect.signature(module.forward)
        bound = types.MethodType(fn, module)
        new_sig = inspect.signature(bound)
        if list(old_sig.parameters) != list(new_sig.parameters):
            raise TypeError(f"forward replacement for {path} has parameters {list(new_sig.parameters)}, "
                            f"the original has {list(old_sig.parameters)}")
        self.set_attr(module, "forward", bound, target=f"{path}.forward", lossless=lossless)

    def set_tensor(self, param: torch.Tensor, value: torch.Tensor, *, target: str, lossless: bool = False,
                   keep_original: bool = True) -> None:
        """Replace a parameter's data (e.g. AWQ folding a scale into a norm weight). The old data is kept
        for revert; without keep_original only until commit() for a lossy change."""
        old = param.data
        param.data = value
        change = self.record(target, f"{str(old.dtype)[6:]} {list(old.shape)}", "rescaled",
                             lambda: setattr(param, "data", old), lossless=lossless)
        if not (lossless or keep_original):
            self._irreversible_after_commit(change)

    def set_attn_implementation(self, impl: str) -> None:
        model = self.model
        old = model.config._attn_implementation
        model.set_attn_implementation(impl)
        now = model.config._attn_implementation
        self.record("config._attn_implementation", str(old), str(now),
                    lambda: model.set_attn_implementation(old), lossless=True)

    def cast(self, dtype: torch.dtype, *, keep_original: bool) -> None:
        """Cast floating parameters and persistent buffers to `dtype`.

        Non-persistent buffers (rotary inv_freq, masks) keep their dtype, as from_pretrained leaves them.
        Widening casts (bf16 -> fp32) are exactly reversible; narrowing ones only with keep_original.
        The originals are held until commit() either way, so a failed transaction restores them.
        """
        model = self.model
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        before: dict[torch.dtype, int] = {}
        seen: set[int] = set()
        for module in model.modules():
            tensors = list(module._parameters.values())
            tensors += [b for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
            for t in tensors:
                if t is None or not t.is_floating_point() or t.dtype == dtype or id(t) in seen:
                    continue
                seen.add(id(t))
                before[t.dtype] = before.get(t.dtype, 0) + t.numel()
                saved.append((t, t.data))
                t.data = t.data.to(dtype)
        widening = all(torch.finfo(d).bits < torch.finfo(dtype).bits and
                       (d != torch.float16 or dtype == torch.float32) for d in before)
        old_config_dtype = getattr(model.config, "dtype", None)
        model.config.dtype = dtype

        def restore() -> None:
            for t, original in saved:
                t.data = original
            model.config.dtype = old_config_dtype

        def cast_back() -> None:
            for t, original in saved:
                t.data = t.data.to(original.dtype)
            model.config.dtype = old_config_dtype

        src = ", ".join(f"{str(d).removeprefix('torch.')} ({n / 1e6:.1f}M)" for d, n in before.items())
        change = self.record("parameters", src or "-", str(dtype).removeprefix("torch."), restore,
                             lossless=widening)
        index = len(self._log) - 1

        def on_commit() -> None:
            if keep_original:
                return
            if widening:   # casting back is exact: no need to hold the originals
                for k, (t, original) in enumerate(saved):
                    saved[k] = (t, torch.empty(0, dtype=original.dtype))
                self._log[index] = (change, cast_back)
            else:
                saved.clear()
                change.reversible = False
                self._log[index] = (change, None)

        self._on_commit.append(on_commit)


def _short(value: Any) -> str:
    if isinstance(value, types.MethodType):
        return f"{value.__func__.__qualname__}()"
    if isinstance(value, types.FunctionType) and hasattr(value, "__hfaccel_label__"):   # an earlier feature's
        return value.__hfaccel_label__
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
