"""The fuse feature: one GEMM for q/k/v, one GEMM for gate/up followed by act(gate) * up, RMSNorm as one op.

Driven by the architecture spec (patches/*.yaml): which attention/MLP submodules hold which projections.
Transformers' attention forward calls q_proj, k_proj and v_proj one after another on the same hidden
states, and no hook lets us replace those three calls with one, so the fusion works below them:

- The q, k and v weights are concatenated once into one [Nq + Nk + Nv, K] tensor and the three
  parameters become row views of it: same names, shapes, values and state_dict, no extra memory.
- Each projection's forward is rebound (on the instance) to a shared router: the first projection
  called with a given input runs the one fused GEMM and keeps the other slices; the next ones called
  with that very tensor take their slice. A call with any other input runs the fused GEMM for that
  input, so any calling order is correct. When the weights stop being views of the fused tensor (the
  model was moved or cast after accelerate_model), the projections fall back to their own weights.
- The MLP's forward is rebound to down(act(gu[..., :I]) * gu[..., I:]) over one gate+up GEMM.
- RMSNorm modules call torch.nn.functional.rms_norm, one op instead of six. It is applied only where it
  gives bit-identical outputs to the module's own forward on a probe input (checked at apply time).

Quantized projections (hfaccel Int8Linear / Int4Linear) fuse into one quantized layer of the same kind
built from the concatenated codes and scales; int8 originals become views of it, int4 packed weights
(an opaque kernel layout) are kept alongside, which the report states as extra bytes.

Phi-3 (qkv_proj, gate_up_proj) and GPT-2 (c_attn) are fused in the checkpoint already; GPT-2's MLP has no
gate. The residual add stays outside the norm and RoPE is left to the compiled step: both are reported.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import layout  # noqa: F401  (weight_layout registers first: fuse keeps the layout it chose)
from .coded import CodedLinear
from .placement import offloaded_reason
from .quant.layers import Int4Linear, Int8Linear
from .registry import Plan, register_feature
from .report import Skip

FEATURE = "fuse"


# --- the shared fused GEMM --------------------------------------------------------------------------

class FusedProjection:
    """One GEMM whose output columns are the outputs of several projections of the same input.

    `compute(x)` runs the fused layer; `sizes` are the projections' output widths; `intact()` says whether
    the projections still read the fused weights (else each falls back to its own forward).
    """

    def __init__(self, compute: Callable[[torch.Tensor], torch.Tensor], sizes: list[int],
                 intact: Callable[[], bool]):
        self.compute = compute
        self.sizes = sizes
        self.intact = intact
        self.x: torch.Tensor | None = None
        self.parts: list[torch.Tensor | None] | None = None
        self.left = 0

    def take(self, i: int, x: torch.Tensor, own: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if not torch.compiler.is_compiling() and not self.intact():
            return own(x)
        if self.parts is None or self.x is not x or self.parts[i] is None:
            self.x = x
            self.parts = list(self.compute(x).split(self.sizes, dim=-1))
            self.left = len(self.sizes)
        out = self.parts[i]
        self.parts[i] = None
        self.left -= 1
        if self.left == 0:                       # every slice handed out: hold no activations
            self.x = self.parts = None
        return out


def _route(shared: FusedProjection, i: int, own: Callable[[torch.Tensor], torch.Tensor], arg: str):
    """A projection's forward taking its slice of the fused GEMM; its parameter keeps the original's name."""
    if arg == "x":                               # hfaccel's quantized layers
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return shared.take(i, x, own)
    else:                                        # nn.Linear
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return shared.take(i, input, own)
    return forward


# --- building fused layers --------------------------------------------------------------------------

def _kind(mods: list[nn.Module]) -> tuple[str | None, str]:
    """('linear' | 'int8' | 'int4', '') when `mods` can share one GEMM, else (None, why not)."""
    if any(hasattr(m, "_hf_hook") for m in mods):
        return None, "accelerate dispatch hooks on the projections (device_map / offload)"
    if any(type(m).__module__.startswith("peft.") for m in mods):
        return None, "PEFT adapter layers (merge_and_unload() first)"
    types_ = {type(m) for m in mods}
    if len(types_) != 1:
        return None, f"mixed layer types {sorted(t.__name__ for t in types_)}"
    (t,) = types_
    if len({m.in_features for m in mods}) != 1:
        return None, "different input widths"
    if len({m.bias is None for m in mods}) != 1:
        return None, "some projections have a bias and some do not"
    if t is nn.Linear:
        ws = [m.weight for m in mods]
        if len({(w.dtype, w.device) for w in ws}) != 1 or ws[0].device.type == "meta":
            return None, "weights on different devices or dtypes, or on the meta device"
        if any(w.requires_grad for w in ws) and torch.is_grad_enabled() and mods[0].training:
            return None, "the model is in training mode"
        return "linear", ""
    if t is Int8Linear:
        if len({m.padded for m in mods}) != 1 or len({m.kernel for m in mods}) != 1:
            return None, "int8 layers with different kernels"
        return "int8", ""
    if t is Int4Linear:
        if len({(m.group_size, m.padded, m.kernel) for m in mods}) != 1:
            return None, "int4 layers with different group sizes or kernels"
        return "int4", ""
    if t is CodedLinear:
        if len({m.zero for m in mods}) != 1:
            return None, "exact-code layers of two formats (Q4_0 and Q4_1)"
        return "coded", ""
    return None, f"{t.__name__} layers cannot be concatenated"


def _column_major(w: torch.Tensor) -> bool:
    return w.dim() == 2 and not w.is_contiguous() and w.t().is_contiguous()


def _fuse_group(mods: list[nn.Module], kind: str, undos: list[Callable[[], None]]) -> tuple[FusedProjection, int]:
    """Make `mods` share one GEMM. Returns the router and the extra bytes it holds."""
    sizes = [m.out_features for m in mods]
    extra = 0
    if kind == "linear":
        col = all(_column_major(m.weight) for m in mods)
        w = torch.cat([m.weight.detach() for m in mods])
        if col:                                   # keep the layout weight_layout chose
            w = w.t().contiguous().t()
        b = torch.cat([m.bias.detach() for m in mods]) if mods[0].bias is not None else None
        for m, wv, bv in zip(mods, w.split(sizes), b.split(sizes) if b is not None else [None] * len(mods)):
            old_w, old_b = m.weight.data, (m.bias.data if m.bias is not None else None)
            m.weight.data = wv
            if bv is not None:
                m.bias.data = bv
            undos.append(lambda m=m, ow=old_w, ob=old_b: _restore_param(m, ow, ob))
        ptr = w.data_ptr()
        first = mods[0]

        def compute(x, w=w, b=b):
            return F.linear(x, w, b)

        def intact(first=first, ptr=ptr) -> bool:
            return first.weight.data_ptr() == ptr
    elif kind == "coded":
        fused = CodedLinear(torch.cat([m.packed for m in mods]), torch.cat([m.dm for m in mods]),
                                       mods[0].zero, torch.cat([m.bias for m in mods]) if mods[0].bias is not None
                                       else None)
        for m, pv, dv in zip(mods, fused.packed.split(sizes), fused.dm.split(sizes)):   # row ranges: views
            olds = (m.packed, m.dm)
            m.packed, m.dm = pv, dv
            undos.append(lambda m=m, o=olds: _restore_buffers(m, ("packed", "dm"), o))
        first, ptr = mods[0], mods[0].packed.data_ptr()
        compute = fused.forward

        def intact(first=first, ptr=ptr) -> bool:
            return first.packed.data_ptr() == ptr
    else:
        if kind == "int8":
            q = torch.cat([m.qweight for m in mods])
            fused = Int8Linear(q[:, : mods[0].in_features], torch.cat([m.scales for m in mods]),
                               torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None)
            for m, qv, sv, kv in zip(mods, fused.qweight.split(sizes), fused.scales.split(sizes),
                                     fused._kscales.split(sizes)):
                olds = (m.qweight, m.scales, m._kscales)
                m.qweight, m.scales, m._kscales = qv, sv, kv
                undos.append(lambda m=m, o=olds: _restore_buffers(m, ("qweight", "scales", "_kscales"), o))
        else:
            codes = torch.cat([m.codes() for m in mods])
            fused = Int4Linear(codes, torch.cat([m.scales for m in mods], dim=1),
                               torch.cat([m.zeros for m in mods], dim=1), mods[0].group_size,
                               torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None,
                               in_features=mods[0].in_features)
            # aten's CPU packer lays N out in blocks of 64 rows (hfaccel's avx512 layout row by row): where each
            # projection's packed rows equal a row range of the fused packing, the projection reads that view;
            # anything else is held twice
            extra = fused.scales_zeros.numel() * fused.scales_zeros.element_size()
            start = 0
            for m, n in zip(mods, sizes):
                view = fused.qweight[start:start + n]
                start += n
                if view.shape == m.qweight.shape and torch.equal(view, m.qweight):
                    old = m.qweight
                    m.qweight = view
                    undos.append(lambda m=m, o=old: setattr(m, "qweight", o))
                else:
                    extra += m.qweight.numel() * m.qweight.element_size()
        first, ptr = mods[0], mods[0].qweight.data_ptr()
        compute = fused.forward

        def intact(first=first, ptr=ptr) -> bool:
            return first.qweight.data_ptr() == ptr

    shared = FusedProjection(compute, sizes, intact)
    for i, m in enumerate(mods):
        own = m.forward
        fn = _route(shared, i, own, _arg(m))
        _check_signature(m, fn)
        m.forward = types.MethodType(fn, m)
        undos.append(lambda m=m: m.__dict__.pop("forward", None))
    return shared, extra


def _restore_param(m: nn.Module, old_w: torch.Tensor, old_b: torch.Tensor | None) -> None:
    m.weight.data = old_w
    if old_b is not None:
        m.bias.data = old_b


def _restore_buffers(m: nn.Module, names: tuple[str, ...], olds: tuple[torch.Tensor, ...]) -> None:
    for n, t in zip(names, olds):
        setattr(m, n, t)


def _check_signature(module: nn.Module, fn) -> None:
    old = list(inspect.signature(module.forward).parameters)
    new = list(inspect.signature(types.MethodType(fn, module)).parameters)
    if old != new:
        raise TypeError(f"fused forward for {type(module).__name__} takes {new}, the original takes {old}")


def _mlp_forward(shared: FusedProjection, width: int):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and not shared.intact():
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        gu = shared.compute(x)
        return self.down_proj(self.act_fn(gu[..., :width]) * gu[..., width:])

    return forward


# --- RMSNorm ---------------------------------------------------------------------------------------

def _norm_eps(norm: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        v = getattr(norm, name, None)
        if isinstance(v, float):
            return v
    return None


def _rms_forward(plus_one: bool, arg: str):
    """F.rms_norm as a forward whose parameter has the name the module's own forward uses."""
    if arg == "hidden_states":
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            w = self.weight + 1.0 if plus_one else self.weight
            return F.rms_norm(hidden_states, (hidden_states.shape[-1],), w, self._hfaccel_eps)
    elif arg == "x":
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight + 1.0 if plus_one else self.weight
            return F.rms_norm(x, (x.shape[-1],), w, self._hfaccel_eps)
    else:
        return None
    return forward


def _arg(module: nn.Module) -> str:
    params = list(inspect.signature(module.forward).parameters)
    return params[0] if len(params) == 1 else ""


def _rms_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 1 and _norm_eps(m) is not None and "forward" not in m.__dict__]


def _same_as_module(norm: nn.Module, fn) -> bool:
    w = norm.weight
    probe = torch.randn(3, 5, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype) * 3
    with torch.no_grad():
        return torch.equal(norm(probe), fn(norm, probe))


# --- the feature -----------------------------------------------------------------------------------

@register_feature(FEATURE, stage="fuse")
def plan_fuse(model: nn.Module, ctx, cfg) -> Plan | Skip | None:
    f = cfg.fusion
    asked = [k for k in ("qkv", "gate_up", "rms_norm") if getattr(f, k)]
    if not asked:
        return None
    spec = ctx.spec
    if spec is None:
        return Skip(FEATURE, f"fused kernels need an architecture spec: {ctx.spec_problem}")
    notes: list[str] = []
    # (what, layer path, parent module path, projection names): modules are looked up again at apply time,
    # after the quantize stage may have replaced them
    groups: list[tuple[str, str, str, tuple[str, ...]]] = []
    layers = spec.layer_paths(model)
    a, m = spec.attention, spec.mlp
    if f.qkv:
        if a.qkv:
            notes.append(f"qkv: already one projection in the checkpoint ({a.qkv})")
        else:
            groups += [("qkv", p, f"{p}.{a.module}", (a.q, a.k, a.v)) for p in layers]
    if f.gate_up:
        if m.gate_up:
            notes.append(f"gate_up: already one projection in the checkpoint ({m.gate_up})")
        elif not m.gate:
            notes.append(f"gate_up: {spec.family}'s MLP has no gate projection")
        else:
            groups += [("gate_up", p, f"{p}.{m.module}", (m.gate, m.up)) for p in layers]
    if ctx.placement and ctx.placement.offloaded:
        kept = [g for g in groups if not ctx.placement.is_offloaded(g[2])]
        if len(kept) < len(groups):
            notes.append(offloaded_reason(len(groups) - len(kept), "projection groups"))
        groups = kept
    refused = [r for r in (_refusal(model, g) for g in groups) if r]
    if refused:
        notes.append(f"not fused ({len(refused)}): {refused[0]}" + (" ..." if len(refused) > 1 else ""))
        groups = [g for g in groups if not _refusal(model, g)]
    if any(g[0] == "gate_up" for g in groups):
        mlp0 = model.get_submodule(next(g[2] for g in groups if g[0] == "gate_up"))
        if not callable(getattr(mlp0, "act_fn", None)) or not hasattr(mlp0, "down_proj") or _arg(mlp0) != "x":
            notes.append(f"gate_up: {type(mlp0).__name__} has no act_fn/down_proj or another forward signature; "
                         f"not fused")
            groups = [g for g in groups if g[0] != "gate_up"]
    norms: list[str] = []
    if f.rms_norm:
        if spec.norm_type == "layernorm":
            notes.append("rms_norm: LayerNorm already runs as one op (F.layer_norm)")
        else:
            norms = [n for n, mod in _rms_norms(model) if mod.weight.device.type != "meta"]
            notes.append("rms_norm: the residual add stays a separate op")
    if not groups and not norms:
        return Skip(FEATURE, "; ".join(notes) or "nothing to fuse")
    plus_one = spec.norm_type == "rms_plus_one"

    def apply(rw) -> None:
        _apply(rw, groups, norms, plus_one)

    what = sorted({g[0] for g in groups} | ({"rms_norm"} if norms else set()))
    return Plan(FEATURE, apply, f"fused {', '.join(what)} (patches/{spec.family}.yaml)", notes)


def _projections(model: nn.Module, group) -> tuple[nn.Module, list[nn.Module]]:
    parent = model.get_submodule(group[2])
    return parent, [getattr(parent, n) for n in group[3]]


def _refusal(model: nn.Module, group) -> str:
    kind, why = _kind(_projections(model, group)[1])
    return "" if kind else f"{group[0]} in {group[1]}: {why}"


def _apply(rw, groups, norms: list[str], plus_one: bool) -> None:
    model = rw.model
    for what in ("qkv", "gate_up"):
        mine = [g for g in groups if g[0] == what]
        if not mine:
            continue
        undos: list[Callable[[], None]] = []
        extra, done, refused = 0, [], []
        try:
            for group in mine:
                parent, mods = _projections(model, group)
                kind, why = _kind(mods)
                if kind is None:                  # the quantize stage may have changed the layers
                    refused.append(f"{group[1]}: {why}")
                    continue
                shared, bytes_ = _fuse_group(mods, kind, undos)
                extra += bytes_
                done.append((group, mods))
                if what == "gate_up":
                    fn = _mlp_forward(shared, mods[0].out_features)
                    _check_signature(parent, fn)
                    parent.forward = types.MethodType(fn, parent)
                    undos.append(lambda p=parent: p.__dict__.pop("forward", None))
        except Exception:
            for u in reversed(undos):
                u()
            raise
        if not done:
            continue
        group, mods = done[0]
        names = "+".join(group[3])
        width = sum(x.out_features for x in mods)
        after = f"1 GEMM [{width}, {mods[0].in_features}]" + (", then act(gate) * up" if what == "gate_up" else "")
        if extra:
            after += f" (+{extra / 2**20:.2f} MiB held twice: int4 scales, packed rows that are not views)"
        if refused:
            after += f"; {len(refused)} not fused ({refused[0]})"
        rw.record(f"{len(done)} x {names} ({type(mods[0]).__name__})", f"{len(mods)} GEMMs", after,
                  lambda undos=undos: [u() for u in reversed(undos)])
    if norms:
        done, differ = [], []
        norm = None
        try:
            for name in norms:
                norm = model.get_submodule(name)
                fn = _rms_forward(plus_one, _arg(norm))
                if fn is None:
                    differ.append(name)
                    continue
                norm._hfaccel_eps = _norm_eps(norm)
                if not _same_as_module(norm, fn):
                    del norm._hfaccel_eps
                    differ.append(name)
                    continue
                _check_signature(norm, fn)
                norm.forward = types.MethodType(fn, norm)
                done.append(norm)
        except Exception:
            _unfuse_norms(done + ([norm] if norm is not None else []))
            raise
        if done:
            left = (f"; {len(differ)} left as they were (not bit-identical or another forward signature, "
                    f"e.g. {differ[0]})") if differ else ""
            rw.record(f"{len(done)} x {type(done[0]).__name__}", "module forward (6 ops)",
                      f"F.rms_norm (bit-identical on a probe){left}", lambda done=done: _unfuse_norms(done))


def _unfuse_norms(done: list[nn.Module]) -> None:
    for norm in done:
        norm.__dict__.pop("forward", None)
        norm.__dict__.pop("_hfaccel_eps", None)


__all__ = ["FusedProjection", "plan_fuse"]


from . import packed  # noqa: E402,F401  (registers after the fusions: it packs the layers they left unfused)
