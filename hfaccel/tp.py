"""Tensor-parallel models: from_pretrained(tp_plan="auto") under torchrun, weights as DTensors.

Transformers shards each Linear of the model's tp_plan and replaces its forward (on the instance) with one
that moves activations between layouts. In inference the two plain styles reduce to local arithmetic:

- colwise: the input is replicated, each rank multiplies it by its [N/tp, K] rows and keeps its slice of
  the output (the next op, attention over this rank's heads or the MLP's act(gate) * up, is local too);
- rowwise: the input is this rank's slice of K, each rank multiplies by its [N, K/tp] columns, the
  partial outputs are summed with one all_reduce, then the bias is added once.

The `shard` stage (first of all) rewrites those modules into exactly that local arithmetic on the local
shards: a colwise Linear becomes a plain nn.Linear of this rank's rows, a rowwise one a RowParallelLinear
(a plain nn.Linear of this rank's columns, then all_reduce, then the bias). The numbers are the ones the
DTensor forward computes, so greedy tokens do not change. Everything after it then works per shard with
no special case: fused q/k/v and gate/up concatenate this rank's rows (the fused weight keeps the
column-parallel sharding), quantization quantizes this rank's slice, and the paged cache holds this rank's
KV heads. Styles other than plain colwise / rowwise (the embedding, a gathered head, packed or MoE
styles) keep Transformers' forward, and the report lists them.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .registry import Plan, register_feature
from .report import Skip

FEATURE = "tensor_parallel"
LOCAL_STYLES = ("colwise", "rowwise")


def tp_size(model: nn.Module) -> int:
    size = getattr(model, "tp_size", None)
    return int(size) if isinstance(size, int) and size > 1 else 1


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:                                  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def styles(model: nn.Module) -> dict[str, str]:
    """{module path: tp style} for every module the model's tp_plan names."""
    plan = getattr(model, "_tp_plan", None) or {}
    patterns = [(re.compile(re.escape(p).replace(r"\*", r"\d+")), style) for p, style in plan.items()]
    out = {}
    for name, _ in model.named_modules():
        for rx, style in patterns:
            if rx.fullmatch(name):
                out[name] = style
                break
    return out


def local_targets(model: nn.Module) -> dict[str, str]:
    """{path: 'colwise' | 'rowwise'} of the sharded nn.Linear modules the shard stage makes local."""
    if tp_size(model) == 1:
        return {}
    return {path: style for path, style in styles(model).items()
            if style in LOCAL_STYLES and type(model.get_submodule(path)) is nn.Linear
            and _is_dtensor(model.get_submodule(path).weight)}


class RowParallelLinear(nn.Module):
    """A rowwise-sharded Linear on local tensors: this rank's [N, K/tp] columns, all_reduce, then the bias.

    The product lives in the child `linear` (a plain nn.Linear, so quantization can replace it)."""

    def __init__(self, linear: nn.Linear, bias: torch.Tensor | None, group, in_features: int):
        super().__init__()
        self.linear = linear
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.group = group
        self.in_features = in_features                  # the full width, as in the checkpoint
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = self.linear(x)
        dist.all_reduce(out, group=self.group)
        return out + self.bias if self.bias is not None else out


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.to_local() if _is_dtensor(t) else t


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    with torch.device("meta"):
        lin = nn.Linear(in_f, out_f, bias=bias is not None, dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin.eval()


def localize(module: nn.Linear, style: str, group) -> nn.Module:
    w, b = _local(module.weight), _local(module.bias)
    if style == "colwise":
        return _plain_linear(w, b)
    return RowParallelLinear(_plain_linear(w, None), b, group, module.in_features)


def _group(model: nn.Module):
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        return None
    names = getattr(mesh, "mesh_dim_names", None) or ()
    return mesh.get_group("tp") if "tp" in names and mesh.ndim > 1 else mesh.get_group()


@register_feature(FEATURE, stage="shard")
def plan_tensor_parallel(model: nn.Module, ctx, cfg) -> Plan | Skip | None:
    size = tp_size(model)
    if size == 1:
        return None
    targets = local_targets(model)
    others = sorted({s for p, s in styles(model).items() if p not in targets})
    kept = f"; kept Transformers' forward for styles {', '.join(others)}" if others else ""
    if model.training:
        return Skip(FEATURE, f"tensor parallel ({size} ranks): the model is in training mode; local shards would "
                             f"drop the DTensor gradients, so fusion and quantization are refused per module")
    if not targets:
        return Skip(FEATURE, f"tensor parallel ({size} ranks): no plain colwise / rowwise nn.Linear with DTensor "
                             f"weights{kept}")

    def apply(rw) -> None:
        group = _group(model)
        for path, style in targets.items():
            new = localize(model.get_submodule(path), style, group)
            rw.swap_module(path, new, lossless=True, label=f"{type(new).__name__} (rank-local {style} shard)")

    counts = [sum(1 for s in targets.values() if s == style) for style in LOCAL_STYLES]
    notes = [f"tensor parallel: {size} ranks; {counts[0]} colwise + {counts[1]} rowwise Linear on rank-local "
             f"shards{kept}; fused projections keep the column-parallel "
             f"sharding, quantization runs per shard, the paged cache holds this rank's KV heads; "
             f"save_pretrained needs revert_model first (the layers hold local shards)"]
    return Plan(FEATURE, apply, f"rank-local shards for {len(targets)} Linear layers ({size} ranks)", notes)


__all__ = ["RowParallelLinear", "local_targets", "plan_tensor_parallel", "styles", "tp_size"]
