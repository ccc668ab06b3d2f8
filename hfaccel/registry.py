"""Feature registry and architecture specs.

Features register a planner against a stage; accelerate_model plans every stage in order before it
touches the model, then applies the plans in the same order:

    dtype -> quantize -> fuse -> attention -> kv_cache -> speculative -> compile

A planner looks at the model, the device context and the config and returns one of:
- None: not requested by this config (nothing to report);
- Skip: requested or considered, not applied, with the reason;
- Plan: a closure that applies the change through a Rewriter.

Architecture support is data: one YAML file per family in patches/, loaded into ArchSpec here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._resources import yaml_files
from .config import parse_yaml
from .report import Skip

if TYPE_CHECKING:
    from torch import nn

    from .config import AccelConfig
    from .device import Context
    from .rewrite import Rewriter

STAGES = ("shard", "dtype", "quantize", "fuse", "attention", "kv_cache", "speculative", "compile")
UNAVAILABLE = "not available in this version"


@dataclass
class Plan:
    feature: str
    apply: Callable[["Rewriter"], None]
    summary: str = ""
    notes: list[str] = field(default_factory=list)


Planner = Callable[["nn.Module", "Context", "AccelConfig"], "Plan | Skip | None"]


@dataclass(frozen=True)
class FeatureEntry:
    name: str
    stage: str
    planner: Planner


_FEATURES: dict[str, FeatureEntry] = {}


def register_feature(name: str, *, stage: str) -> Callable[[Planner], Planner]:
    """Decorator: register `planner` as feature `name`, planned and applied at `stage`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")

    def deco(planner: Planner) -> Planner:
        _FEATURES[name] = FeatureEntry(name, stage, planner)
        return planner

    return deco


def features() -> list[FeatureEntry]:
    """Registered features in application order (by stage, then registration order)."""
    from . import attention, coded, compile, dtype, fusion, layout, rope, small_gemm, tp  # noqa: F401  (importing registers them)
    from .cache import feature  # noqa: F401
    from .quant import feature as _quant  # noqa: F401
    from .speculative import feature as _spec  # noqa: F401

    return sorted(_FEATURES.values(), key=lambda f: STAGES.index(f.stage))


# --- architecture specs ---------------------------------------------------------------------------

NORM_TYPES = ("rms", "rms_plus_one", "layernorm")
ROTARY_STYLES = ("half", "none")
LINEAR_KINDS = ("linear", "conv1d")


@dataclass(frozen=True)
class AttentionSpec:
    module: str
    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None        # already fused in the checkpoint (phi3 qkv_proj, gpt2 c_attn)
    q_norm: str | None = None     # per-head norms on q/k (qwen3)
    k_norm: str | None = None


@dataclass(frozen=True)
class MLPSpec:
    module: str
    down: str
    activation: str
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None    # already fused (phi3 gate_up_proj)


@dataclass(frozen=True)
class ArchSpec:
    family: str
    description: str
    model_types: tuple[str, ...]
    layers: str
    embed: str
    final_norm: str
    lm_head: str
    attention: AttentionSpec
    mlp: MLPSpec
    norm_type: str
    norm_input: str
    norm_post_attention: str
    rotary: str
    linear: str

    def layer_paths(self, model: "nn.Module") -> list[str]:
        layers = model.get_submodule(self.layers)
        return [f"{self.layers}.{i}" for i in range(len(layers))]

    def module_paths(self, model: "nn.Module") -> list[str]:
        """Every module path this spec names on `model` (used to check a spec against a model)."""
        paths = [self.embed, self.final_norm, self.lm_head, self.layers]
        for layer in self.layer_paths(model):
            a, m = f"{layer}.{self.attention.module}", f"{layer}.{self.mlp.module}"
            paths += [a, f"{layer}.{self.norm_input}", f"{layer}.{self.norm_post_attention}", m]
            paths += [f"{a}.{n}" for n in (self.attention.q, self.attention.k, self.attention.v,
                                           self.attention.qkv, self.attention.o, self.attention.q_norm,
                                           self.attention.k_norm) if n]
            paths += [f"{m}.{n}" for n in (self.mlp.gate, self.mlp.up, self.mlp.gate_up, self.mlp.down) if n]
        return paths

    def missing_paths(self, model: "nn.Module") -> list[str]:
        missing = []
        try:
            paths = self.module_paths(model)
        except AttributeError as e:
            return [f"{self.layers} ({e})"]
        for p in paths:
            try:
                model.get_submodule(p)
            except AttributeError:
                missing.append(p)
        return missing


class SpecError(ValueError):
    pass


def _need(data: Mapping[str, Any], key: str, where: str, kind: type = str) -> Any:
    if key not in data:
        raise SpecError(f"{where}: missing key {key!r}")
    value = data[key]
    if not isinstance(value, kind):
        raise SpecError(f"{where}: {key} = {value!r} must be {kind.__name__}")
    return value


def _choice(data: Mapping[str, Any], key: str, where: str, allowed: tuple[str, ...]) -> str:
    value = _need(data, key, where)
    if value not in allowed:
        raise SpecError(f"{where}: {key} = {value!r} is not allowed; allowed: {', '.join(allowed)}")
    return value


def parse_spec(data: Any, where: str) -> ArchSpec:
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: a spec is a mapping, got {type(data).__name__}")
    known = {"family", "description", "model_types", "layers", "embed", "final_norm", "lm_head", "attention",
             "mlp", "norms", "rotary", "linear"}
    unknown = set(data) - known
    if unknown:
        raise SpecError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    att, mlp, norms = (_need(data, k, where, dict) for k in ("attention", "mlp", "norms"))
    att_keys = {"module", "o", "q", "k", "v", "qkv", "q_norm", "k_norm"}
    mlp_keys = {"module", "down", "activation", "gate", "up", "gate_up"}
    for sub, keys, name in ((att, att_keys, "attention"), (mlp, mlp_keys, "mlp")):
        if set(sub) - keys:
            raise SpecError(f"{where}: unknown {name} keys {sorted(set(sub) - keys)}; allowed: {sorted(keys)}")
    if not (att.get("qkv") or all(att.get(k) for k in "qkv")):
        raise SpecError(f"{where}: attention needs either qkv or all of q, k, v")
    if not (mlp.get("gate_up") or mlp.get("up")):
        raise SpecError(f"{where}: mlp needs up (and gate for gated MLPs) or gate_up")
    types_ = _need(data, "model_types", where, list)
    return ArchSpec(
        family=_need(data, "family", where),
        description=str(data.get("description", "")),
        model_types=tuple(str(t) for t in types_),
        layers=_need(data, "layers", where),
        embed=_need(data, "embed", where),
        final_norm=_need(data, "final_norm", where),
        lm_head=_need(data, "lm_head", where),
        attention=AttentionSpec(**{k: att.get(k) for k in att_keys if k in att}),
        mlp=MLPSpec(**{k: mlp.get(k) for k in mlp_keys if k in mlp}),
        norm_type=_choice(norms, "type", f"{where} norms", NORM_TYPES),
        norm_input=_need(norms, "input", f"{where} norms"),
        norm_post_attention=_need(norms, "post_attention", f"{where} norms"),
        rotary=_choice(data, "rotary", where, ROTARY_STYLES),
        linear=_choice(data, "linear", where, LINEAR_KINDS),
    )


@functools.cache
def arch_specs() -> dict[str, ArchSpec]:
    """model_type -> ArchSpec, from every file in patches/."""
    by_type: dict[str, ArchSpec] = {}
    for name, entry in yaml_files("patches").items():
        spec = parse_spec(parse_yaml(entry.read_text(encoding="utf-8"), f"patches/{name}.yaml"),
                          f"patches/{name}.yaml")
        for t in spec.model_types:
            if t in by_type:
                raise SpecError(f"model_type {t!r} is claimed by both {by_type[t].family} and {spec.family}")
            by_type[t] = spec
    return by_type


def spec_for(model: "nn.Module") -> tuple[ArchSpec | None, str | None]:
    """(spec, None) when patches/ describes this model, else (None, why not)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = arch_specs().get(model_type)
    if spec is None:
        return None, f"no patches/ spec for model_type {model_type!r} (known: {', '.join(sorted(arch_specs()))})"
    missing = spec.missing_paths(model)
    if missing:
        return None, (f"patches/{spec.family}.yaml does not match this model: missing "
                      f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return spec, None
