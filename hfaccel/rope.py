"""The fuse_rope feature: rotary embedding of q and k as one op in eager mode, bit-identical to Transformers'.

Transformers' attention forwards (Llama, Mistral, Qwen2/3, Gemma, Phi-3) call the module-level function
`apply_rotary_pos_emb(q, k, cos, sin)`, about ten tensor ops per layer, and offer no per-instance hook for it
(the `kernels` hub decorators are no-ops without that package, and they act on the class). Patching the module
global would change every model in the process, so instead each attention *instance* gets its own forward: a
copy of its class's forward function (Transformers' code object, unchanged) whose globals differ in that one
name, which resolves to hfaccel's `apply_rotary_pos_emb` below. Decorators that keep the wrapped function in a
closure cell (deprecate_kwarg) are copied down to the function that reads the name.

hfaccel's function runs one C++ op (kernels/cpu_rope.cpp) for both q and k on CPU and hands everything else
back to Transformers' function: anything torch.compile traces (so Inductor keeps fusing RoPE with its
neighbours in the compiled decode step), tensors that need grad, other devices, dtypes or layouts. Applied only
where the op gives bit-identical outputs (values and strides) on a probe of the model's own shapes and rotary
embedding (checked at apply time), so it is lossless and on by default; revert drops the instance forwards.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable

import torch
from torch import nn

from . import fusion  # noqa: F401  (registers first: one application order whichever module is imported first)
from .kernels import cpu_rope
from .registry import Plan, register_feature
from .report import Skip

FEATURE = "fuse_rope"
NAME = "apply_rotary_pos_emb"
_PARAMS = ["q", "k", "cos", "sin", "unsqueeze_dim"]


# --- a function with one global resolved differently -------------------------------------------------

def _reads(fn, name: str) -> bool:
    return name in fn.__code__.co_names and name in fn.__globals__


def _inner_functions(fn: types.FunctionType):
    """(cell index, function) for each of fn's closure cells that holds a function (a decorator's wrapped one)."""
    for i, cell in enumerate(fn.__closure__ or ()):
        try:
            inner = cell.cell_contents
        except ValueError:                       # an empty cell
            continue
        if isinstance(inner, types.FunctionType):
            yield i, inner


def _reader(fn, name: str):
    """The function in `fn`'s wrapper chain that reads global `name` (fn itself, or one held in a closure cell
    of a decorator's wrapper), or None."""
    if not isinstance(fn, types.FunctionType):
        return None
    if _reads(fn, name):
        return fn
    return next((r for _, inner in _inner_functions(fn) if (r := _reader(inner, name)) is not None), None)


def _copy(fn: types.FunctionType, globals_: dict, closure) -> types.FunctionType:
    new = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    new.__annotations__ = dict(fn.__annotations__)
    return new


def with_global(fn, name: str, value) -> types.FunctionType | None:
    """A copy of `fn` in which global `name` is `value` (the module's own dict is left alone: the copy reads a
    snapshot of it with that one entry replaced, and no `__name__`). Wrappers are copied down to the function
    that reads the name, with `__wrapped__` pointing at the copy. None when nothing in the chain reads `name`."""
    if not isinstance(fn, types.FunctionType):
        return None
    if _reads(fn, name):
        # without "__name__": torch.compile would look the globals up again as that module's (sys.modules) and
        # find the module's own function there; a dict with no name it guards as a dict of its own
        globals_ = {k: v for k, v in fn.__globals__.items() if k != "__name__"}
        return _copy(fn, {**globals_, name: value}, fn.__closure__)
    for i, inner in _inner_functions(fn):
        new = with_global(inner, name, value)
        if new is not None:
            cells = list(fn.__closure__)
            cells[i] = types.CellType(new)
            out = _copy(fn, fn.__globals__, tuple(cells))
            if getattr(out, "__wrapped__", None) is inner:
                out.__wrapped__ = new
            return out
    return None


# --- the fused function ------------------------------------------------------------------------------

def fused(original: Callable, contiguous: bool = False) -> Callable:
    """apply_rotary_pos_emb through cpu_rope where it takes the inputs, else Transformers' `original`;
    `contiguous`: the layout `original` returns (see cpu_rope.rope)."""
    op = torch.ops.hfaccel_cpu_rope.rope.default     # looked up once: at decode the op itself takes ~2 us
    dtypes = cpu_rope.DTYPES

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if (not torch.compiler.is_compiling() and unsqueeze_dim == 1 and q.is_cpu and q.dtype in dtypes
                and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))):
            try:
                return op(q, k, cos, sin, contiguous)
            except RuntimeError:                 # shapes, strides or dtypes it does not take (checked before
                return original(q, k, cos, sin, unsqueeze_dim)   # it writes anything): the eager ops
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.hfaccel_original = original
    return apply_rotary_pos_emb


def _attention_modules(model: nn.Module, spec) -> list[tuple[str, nn.Module]]:
    out = []
    for p in spec.layer_paths(model):
        path = f"{p}.{spec.attention.module}"
        out.append((path, model.get_submodule(path)))
    return out


def _rotary_embedding(model: nn.Module) -> nn.Module | None:
    return next((m for n, m in model.named_modules() if n.rpartition(".")[2] == "rotary_emb"), None)


def _probe(model: nn.Module, attn: nn.Module, original: Callable, contiguous: bool) -> str:
    """'' when the op (with `contiguous`) equals `original` (values and strides) on the model's shapes and rotary
    embedding, at one and at several positions, else why not."""
    cfg = attn.config
    d = getattr(attn, "head_dim", None)
    hq, hk = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    rotary = _rotary_embedding(model)
    if not (isinstance(d, int) and isinstance(hq, int)) or rotary is None:
        return "no head_dim / num_attention_heads / rotary_emb to build a probe from"
    hk = hk or hq
    w = model.get_input_embeddings().weight       # the hidden states' dtype (quantized q/k/v hold buffers)
    g = torch.Generator().manual_seed(0)
    for s in (1, 7):                             # a decode step and a prefill: their layouts differ
        pos = torch.arange(100, 100 + s, device=w.device)[None]
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, s, cfg.hidden_size, device=w.device, dtype=w.dtype), pos)
            q = (torch.randn(1, s, hq, d, generator=g) * 3).to(w.device, w.dtype).transpose(1, 2)
            k = (torch.randn(1, s, hk, d, generator=g) * 3).to(w.device, w.dtype).transpose(1, 2)
            want = original(q, k, cos, sin)
            try:                                 # the op itself: `fn` would quietly fall back to `original`
                got = cpu_rope.rope(q, k, cos, sin, contiguous)
            except RuntimeError as e:
                return f"the fused op does not take the model's q/k/cos/sin: {str(e).splitlines()[0][:200]}"
        for a, b in zip(want, got):
            if not torch.equal(a, b) or a.stride() != b.stride():
                return f"not bit-identical to Transformers' {NAME} on a probe ({w.dtype}, {s} positions)"
    return ""


# --- the feature ---------------------------------------------------------------------------------------

@register_feature(FEATURE, stage="fuse")
def plan_rope(model: nn.Module, ctx, cfg) -> Plan | Skip | None:
    if not cfg.fusion.rope:
        return None
    spec = ctx.spec
    if spec is None:
        return Skip(FEATURE, f"fused RoPE needs an architecture spec: {ctx.spec_problem}")
    if spec.rotary == "none":
        return None
    if spec.rotary != "half":
        return Skip(FEATURE, f"rotary style {spec.rotary!r}: the fused op does rotate_half (NeoX) only")
    if ctx.device.type != "cpu":
        return Skip(FEATURE, f"the fused RoPE op runs on CPU; on {ctx.device.type} RoPE stays Transformers' ops "
                             f"(the Triton kernel rounds once where the eager ops round per op: not bit-identical; "
                             f"a compiled step fuses RoPE)")
    mods = _attention_modules(model, spec)
    hooked = [p for p, m in mods if "forward" in m.__dict__]
    mods = [(p, m) for p, m in mods if "forward" not in m.__dict__]
    if not mods:
        return Skip(FEATURE, f"every attention module already has an instance forward (e.g. {hooked[0]}: "
                             f"accelerate hooks)" if hooked else "no attention modules")
    classes = {type(m) for _, m in mods}
    originals = {}
    for cls in classes:
        reader = _reader(cls.forward, NAME)
        if reader is None:
            return Skip(FEATURE, f"{cls.__name__}.forward does not call a module-level {NAME}")
        original = reader.__globals__[NAME]
        params = list(inspect.signature(original).parameters.values())
        if [p.name for p in params] != _PARAMS or params[-1].default != 1:
            return Skip(FEATURE, f"{reader.__module__}.{NAME} takes {[p.name for p in params]}, the fused op "
                                 f"implements {_PARAMS}")
        originals[cls] = original
    ok, why = cpu_rope.status()
    if not ok:
        return Skip(FEATURE, f"the fused RoPE op is not available: {why}")
    notes = [f"fuse_rope: {len(hooked)} attention modules with their own forward left as they were "
             f"(e.g. {hooked[0]})"] if hooked else []

    def apply(rw) -> None:
        _apply(rw, model, mods, originals, notes)

    return Plan(FEATURE, apply, f"fused RoPE (one op for q and k, patches/{spec.family}.yaml)", notes)


def _apply(rw, model: nn.Module, mods: list[tuple[str, nn.Module]], originals: dict, notes: list[str]) -> None:
    forwards, differ = {}, {}
    for cls, original in originals.items():
        first = next(m for _, m in mods if type(m) is cls)
        for contiguous in (False, True):          # the layout the original returns (Phi-3's ends in a cat)
            why = _probe(model, first, original, contiguous)
            if not why:
                break
        if why:
            differ[cls] = why
        else:
            forwards[cls] = with_global(cls.forward, NAME, fused(original, contiguous))
    done = []
    for _, m in mods:
        new = forwards.get(type(m))
        if new is not None:
            m.forward = types.MethodType(new, m)
            done.append(m)
    if not done:
        notes.append(f"fuse_rope: {next(iter(differ.values()))}; RoPE left as Transformers' ops")
        return
    left = f"; {len(mods) - len(done)} left as they were ({next(iter(differ.values()))})" if differ else ""
    rw.record(f"{len(done)} x {type(done[0]).__name__}.{NAME}", "about 10 tensor ops for q and k per layer",
              f"1 op (hfaccel_cpu_rope::rope, bit-identical on a probe; compiled graphs keep Transformers' "
              f"ops for Inductor){left}", lambda: [m.__dict__.pop("forward", None) for m in done])


__all__ = ["FEATURE", "fused", "plan_rope", "with_global"]
