"""The weight_layout feature: store fp32 Linear weights on CPU column-major when that is faster.

nn.Linear keeps W as [out, in] row-major and F.linear computes x @ W.T. On the CPUs measured here the
GEMV behind one decode token (M = 1) runs much faster when W.T is the contiguous operand: 1.3-1.8x per
layer, 7.0 -> 3.9 ms for SmolLM2's 49152 x 576 head. The rewrite keeps the parameter, its shape, its
state_dict key and its memory; only the strides change (`w.t().contiguous().t()`, strides (1, out)), so
every caller still sees the same [out, in] tensor. Sums run in another order: outputs differ at fp32
rounding level, so greedy tokens are tested, not assumed (like the compiled step).

Each distinct weight shape is timed both ways over all of the model's weights of that shape (M = 1, as in
decode) and relaid only where that is at least MIN_GAIN faster. revert_model restores row-major storage.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch import nn

from . import coded  # noqa: F401  (registers exact_codes first: the weights it codes need no layout)
from .registry import Plan, register_feature
from .report import Skip

MIN_GAIN = 1.05
REPS = 4


def _time(weights: list[torch.Tensor], x: torch.Tensor) -> float:
    best = float("inf")
    with torch.inference_mode():
        for _ in range(REPS):
            t = time.perf_counter()
            for w in weights:
                torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - t)
    return best


def _is_dtensor(t) -> bool:
    from .tp import _is_dtensor as check

    return check(t)


def candidates(model: nn.Module) -> dict[tuple[int, int], list[nn.Parameter]]:
    """fp32 CPU Linear weights (row-major, each parameter once), grouped by shape."""
    groups: dict[tuple[int, int], list[nn.Parameter]] = defaultdict(list)
    seen = set()
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if _is_dtensor(w):                                 # tensor parallel: the shard stage makes them local
            continue
        if type(mod) is nn.Linear and isinstance(w, nn.Parameter) and w.dtype == torch.float32 \
                and w.device.type == "cpu" and w.is_contiguous() and id(w) not in seen:
            seen.add(id(w))
            groups[tuple(w.shape)].append(w)
    return groups


def measure(groups) -> dict[tuple[int, int], tuple[float, float]]:
    """shape -> (seconds row-major, seconds column-major) for one token through every weight of that shape."""
    out = {}
    for shape, params in groups.items():
        x = torch.randn(1, shape[1])
        relaid = [p.detach().t().contiguous().t() for p in params]
        _time(relaid[:1], x)
        out[shape] = (_time([p.detach() for p in params], x), _time(relaid, x))
        del relaid
    return out


def _contiguous_state(module, state_dict, prefix, local_metadata) -> None:
    copies: dict[tuple, torch.Tensor] = {}        # one copy per storage view: tied weights stay tied
    for k, v in state_dict.items():
        if isinstance(v, torch.Tensor) and not v.is_contiguous():
            key = (v.data_ptr(), v.shape, v.stride(), v.dtype)
            if key not in copies:
                copies[key] = v.contiguous()
            state_dict[k] = copies[key]


@register_feature("weight_layout", stage="fuse")
def plan_weight_layout(model: nn.Module, ctx, cfg) -> Plan | Skip | None:
    if not cfg.fusion.weight_layout:
        return None
    from .tp import local_targets

    if not candidates(model) and not local_targets(model):
        return Skip("weight_layout", "column-major weights: no fp32 nn.Linear weights on the CPU")

    def apply(rw) -> None:
        groups = candidates(model)        # again: earlier stages (shard, quantize) replaced modules
        timing = measure(groups)
        relaid = []
        for shape, params in groups.items():
            row, col = timing[shape]
            if row < col * MIN_GAIN:
                continue
            for p in params:
                p.data = p.data.t().contiguous().t()
            relaid.append(shape)

            def undo(params=params) -> None:
                for p in params:
                    p.data = p.data.contiguous()

            rw.record(f"{len(params)} Linear weight(s) {list(shape)}", "row-major",
                      f"column-major ({row * 1e3:.2f} -> {col * 1e3:.2f} ms per token)", undo)
        if relaid:
            # state_dict() (save_pretrained, safetensors) hands out row-major copies: serialisers want
            # contiguous tensors, and a checkpoint must not depend on this layout
            handle = model.register_state_dict_post_hook(_contiguous_state)
            rw.record("state_dict hook", "-", "contiguous copies of column-major weights", handle.remove)

    return Plan("weight_layout", apply, "column-major fp32 Linear weights where a one-token GEMV is faster "
                                        "(measured per shape)")


__all__ = ["candidates", "measure", "plan_weight_layout"]
