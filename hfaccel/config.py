"""AccelConfig: the validated description of what accelerate_model should do.

A config is a tree of small dataclasses, one per feature. Every field carries its own constraint
(allowed choices or a numeric range) in its metadata; `__post_init__` checks them, so an AccelConfig
built in Python is as validated as one read from YAML. `AccelConfig.from_dict` adds what only a
mapping can get wrong: unknown keys (with a did-you-mean) and sections that are not mappings.

    cfg = resolve_config("cpu-fast", quantization={"method": "awq", "bits": 4})

Every error is a ConfigError that names the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ._resources import yaml_files
from .errors import ConfigError

CONFIG_VERSION = 1

DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


def _opt(default: Any, *, choices: tuple | None = None, min: float | None = None, max: float | None = None,
         aliases: Mapping[str, str] | None = None, doc: str = "") -> Any:
    meta = {"choices": choices, "min": min, "max": max, "aliases": aliases or {}, "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _describe_type(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in args)
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return f"a list of {_describe_type(args[0])}"
    return getattr(tp, "__name__", str(tp))


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` (normalised: int -> float, tuple -> list) or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} = {value!r} has type {type(value).__name__}; expected {_describe_type(tp)}",
                          key=key, value=value, allowed=_describe_type(tp))
    ok = True
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            ok = value == value and abs(value) != float("inf")
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is list:
        (item,) = typing.get_args(tp)
        ok = isinstance(value, (list, tuple))
        if ok:
            value = [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if not ok:
        raise ConfigError(f"{key} = {value!r} has type {type(value).__name__}; expected {_describe_type(tp)}",
                          key=key, value=value, allowed=_describe_type(tp))
    return value


class _Section:
    """Validation shared by every config dataclass (the torchao habit: configs check themselves)."""

    section: ClassVar[str] = ""

    @classmethod
    def _key(cls, name: str) -> str:
        return f"{cls.section}.{name}" if cls.section else name

    @classmethod
    def _hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    def __post_init__(self) -> None:
        hints = self._hints()
        for f in dataclasses.fields(self):
            key = self._key(f.name)
            value = getattr(self, f.name)
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, tp):
                    raise ConfigError(f"{key} must be a mapping of {tp.__name__} settings, got {value!r}",
                                      key=key, value=value, allowed="a mapping")
                continue
            meta = f.metadata
            aliases = meta.get("aliases") or {}
            if isinstance(value, str) and value.lower() in aliases:
                value = aliases[value.lower()]
            value = _check_type(value, tp, key)
            choices = meta.get("choices")
            if choices is not None and value is not None and value not in choices:
                allowed = ", ".join(repr(c) for c in choices)
                hint = ""
                if isinstance(value, str):
                    close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{key} = {value!r} is not allowed; allowed: {allowed}{hint}",
                                  key=key, value=value, allowed=choices)
            lo, hi = meta.get("min"), meta.get("max")
            if value is not None and not isinstance(value, (str, list)) and (
                    (lo is not None and value < lo) or (hi is not None and value > hi)):
                rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                raise ConfigError(f"{key} = {value!r} is out of range; allowed: {rng}",
                                  key=key, value=value, allowed=rng)
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        """Cross-field checks of one section; override where needed."""

    @classmethod
    def from_dict(cls, data: Any) -> "_Section":
        where = cls.section or "config"
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__}: {data!r}",
                              key=where, value=data, allowed="a mapping")
        names = [f.name for f in dataclasses.fields(cls)]
        hints = cls._hints()
        kwargs: dict[str, Any] = {}
        for raw_key, value in data.items():
            if not isinstance(raw_key, str):
                raise ConfigError(f"{where} has a non-string key {raw_key!r}; keys are names: {', '.join(names)}",
                                  key=str(raw_key), value=raw_key, allowed=names)
            name = raw_key.replace("-", "_")
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"unknown key {cls._key(raw_key)!r}; allowed keys in {where}: "
                                  f"{', '.join(names)}{hint}", key=cls._key(raw_key), value=value, allowed=names)
            sub = hints[name]
            if dataclasses.is_dataclass(sub):
                value = sub.from_dict({} if value is None else value)
            kwargs[name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class AttentionConfig(_Section):
    section: ClassVar[str] = "attention"
    backend: str = _opt("auto", choices=("auto", "sdpa", "flash_attention_2", "eager", "paged"),
                        doc="auto: flash_attention_2 on CUDA when importable, else sdpa, else eager")


@dataclass(frozen=True)
class KVCacheConfig(_Section):
    section: ClassVar[str] = "kv_cache"
    type: str = _opt("paged", choices=("dynamic", "paged", "static"),
                     doc="dynamic keeps Transformers' default cache")
    dtype: str = _opt("model", choices=("model", "int8"), doc="int8 is lossy")
    block_size: int = _opt(16, choices=(8, 16, 32, 64, 128, 256), doc="tokens per block")
    max_cache_tokens: int | None = _opt(None, min=16, doc="pool size in tokens; null: memory_fraction")
    memory_fraction: float = _opt(0.3, min=0.001, max=0.95, doc="share of free memory for the pool")
    prefix_reuse: bool = _opt(True, doc="reuse cached full prompt blocks across generate() calls")


@dataclass(frozen=True)
class FusionConfig(_Section):
    section: ClassVar[str] = "fusion"
    qkv: bool = _opt(True, doc="one GEMM for q, k, v (weights become views of one tensor)")
    gate_up: bool = _opt(True, doc="one GEMM for gate and up projections, then act(gate) * up")
    rms_norm: bool = _opt(True, doc="RMSNorm as one op (F.rms_norm) where it is bit-identical; the residual add "
                                     "stays separate")
    rope: bool = _opt(True, doc="rotary embedding of q and k as one op in eager mode on CPU where it is "
                                 "bit-identical (a compiled step has Inductor fuse it)")
    weight_layout: bool = _opt(False, doc="column-major fp32 Linear weights on CPU where a one-token GEMV runs "
                                          "faster (measured per shape; sums in another order)")
    packed_weights: bool = _opt(False, doc="fp32/bf16 Linear layers on CPU run on oneDNN with weights reordered once, "
                                           "where faster (measured per shape; sums in another order; projections "
                                           "fused by qkv/gate_up keep their GEMM)")
    exact_codes: bool = _opt(False, doc="fp32 Linear weights on CPU that are exactly 4-bit block codes (a model "
                                        "dequantized from a GGUF Q4_0 / Q4_1 file) held as those codes and "
                                        "rebuilt bit for bit in the kernel (sums in another order)")
    small_gemm: bool = _opt(False, doc="fp32 Linear layers on CPU with 1-16 rows of input (batched decode, verify) "
                                       "run hfaccel's few-row GEMM where faster (measured per shape; sums in "
                                       "another order)")


@dataclass(frozen=True)
class QuantizationConfig(_Section):
    section: ClassVar[str] = "quantization"
    method: str = _opt("none", choices=("none", "rtn", "gptq", "awq", "bnb-int8", "bnb-nf4"),
                     doc="weight quantization algorithm; any but none is lossy")
    bits: int = _opt(4, choices=(4, 8), doc="weight bits")
    group_size: int = _opt(64, choices=(-1, 32, 64, 128), doc="-1: one group per output channel")
    sym: bool = _opt(True, doc="symmetric (no zero point)")
    desc_act: bool = _opt(False, doc="GPTQ act-order")
    damp_percent: float = _opt(0.01, min=0.0, max=1.0, doc="GPTQ Hessian dampening")
    calibration_samples: int = _opt(128, min=1, max=100_000, doc="calibration sequences")
    calibration_seq_len: int = _opt(512, min=8, max=1_000_000, doc="tokens per calibration sequence")
    modules_to_not_convert: list[str] = _opt([], doc="module name patterns left in float")
    quantize_lm_head: bool = _opt(False, doc="quantize the head (an untied copy when embeddings are tied)")
    lm_head_bits: int | None = _opt(None, choices=(4, 8), doc="bits of the quantized head (null: bits); 8 keeps it "
                                   "int8 per channel, round to nearest, under int4 layers")

    def _check(self) -> None:
        if self.method in ("gptq", "awq") and self.bits != 4:
            raise ConfigError(f"quantization.bits = {self.bits!r} is not allowed with method {self.method!r}; "
                              f"allowed: 4", key="quantization.bits", value=self.bits, allowed=(4,))
        if self.lm_head_bits is not None and not self.quantize_lm_head:
            raise ConfigError(f"quantization.lm_head_bits = {self.lm_head_bits!r} needs quantize_lm_head: true; "
                              f"allowed without it: null", key="quantization.lm_head_bits", value=self.lm_head_bits,
                              allowed=(None,))
        if self.lm_head_bits is not None and self.method in ("bnb-int8", "bnb-nf4"):
            raise ConfigError(f"quantization.lm_head_bits = {self.lm_head_bits!r} is not allowed with method "
                              f"{self.method!r} (bitsandbytes quantizes the head with its own method); allowed: null",
                              key="quantization.lm_head_bits", value=self.lm_head_bits, allowed=(None,))
        if self.lm_head_bits == 4 and self.group_size == -1:
            raise ConfigError("quantization.lm_head_bits = 4 needs group_size 32, 64 or 128; it is -1",
                              key="quantization.group_size", value=-1, allowed=(32, 64, 128))


SPECULATIVE_DRAFTS = ("prompt-lookup", "self-int8", "self-int4", "layer-skip:N", "<path to a model folder>")


@dataclass(frozen=True)
class SpeculativeConfig(_Section):
    section: ClassVar[str] = "speculative"
    draft: str | None = _opt(None, doc="prompt-lookup, self-int8, self-int4, layer-skip:N or a model path")
    num_draft_tokens: int | None = _opt(None, min=1, max=64, doc="most tokens drafted per step (null: 10 for "
                                        "prompt-lookup, whose drafts cost nothing, 5 for model drafts)")
    adaptive: bool = _opt(True, doc="adapt the draft length to the acceptance rate")
    confidence_threshold: float | None = _opt(None, min=0.0, max=1.0, doc="stop drafting below this draft probability")

    def _check(self) -> None:
        d = self.draft
        if d is None:
            return
        if d.startswith("layer-skip"):
            n = d.partition(":")[2]
            if not (n.isdigit() and int(n) >= 1):
                raise ConfigError(f"speculative.draft = {d!r} is not allowed; write layer-skip:N with N >= 1 "
                                  f"(e.g. 'layer-skip:8')", key="speculative.draft", value=d,
                                  allowed=SPECULATIVE_DRAFTS)
        elif d.strip() == "":
            raise ConfigError(f"speculative.draft = {d!r} is empty; allowed: {', '.join(SPECULATIVE_DRAFTS)}",
                              key="speculative.draft", value=d, allowed=SPECULATIVE_DRAFTS)


@dataclass(frozen=True)
class CompileConfig(_Section):
    section: ClassVar[str] = "compile"
    enabled: bool = _opt(False, doc="compiled decode step")
    mode: str = _opt("default", choices=("default", "reduce-overhead", "max-autotune"), doc="torch.compile mode")
    warmup: bool = _opt(True, doc="compile inside accelerate_model (the report gives the seconds), not at the first call")
    cpp_wrapper: bool = _opt(False, doc="Inductor writes the step's wrapper in C++ instead of Python (CPU): less overhead "
                                        "per kernel call (SmolLM2 int4: ~9% faster decode), about twice the first "
                                        "compile (28 -> 60 s; cached on disk afterwards)")
    certified_head: bool = _opt(True, doc="greedy steps of an fp32 model on CPU pick from a bf16 or int8 copy of the "
                                          "head (the faster here), recompute the best 64 in fp32 and check the pick "
                                          "against an error bound (else the fp32 head runs): the same tokens, a half "
                                          "or a quarter of the head's bytes; used where measured faster")


@dataclass(frozen=True)
class AccelConfig(_Section):
    """Everything accelerate_model may do. The defaults are the lossless set."""

    section: ClassVar[str] = ""
    version: int = _opt(CONFIG_VERSION, choices=(CONFIG_VERSION,))
    name: str = _opt("default", doc="shown in reports")
    description: str = _opt("", doc="one line for `hfaccel presets`")
    dtype: str = _opt("keep", choices=("keep", "auto", "float32", "bfloat16", "float16"), aliases=DTYPE_ALIASES,
                      doc="keep: leave weights as loaded; auto: bf16 on GPU or AVX-512-BF16 CPUs, else fp32")
    keep_original: bool = _opt(False, doc="keep a copy of the weights so lossy rewrites can be reverted")
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "AccelConfig":
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {str(p)!r}: {e}", key="config", value=str(p)) from e
        return cls.from_dict(parse_yaml(text, str(p)))

    @property
    def is_lossless(self) -> bool:
        """True when nothing requested can change greedy tokens (what the default config promises)."""
        return (self.dtype == "keep" and self.kv_cache.dtype == "model" and self.quantization.method == "none")


SECTIONS = {f.name: f.type for f in dataclasses.fields(AccelConfig)}


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """yaml.safe_load that only ever raises ConfigError (never executes or unpickles anything)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}", key="config", value=source) from e
    except (ValueError, TypeError, OverflowError, RecursionError) as e:  # odd scalars, deep nesting
        raise ConfigError(f"{source}: unreadable YAML: {e}", key="config", value=source) from e
    return {} if data is None else data


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description, from the YAML files in configs/."""
    out = {}
    for name, entry in yaml_files("configs").items():
        data = parse_yaml(entry.read_text(encoding="utf-8"), f"configs/{name}.yaml")
        out[name] = str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""
    return out


def load_preset(name: str) -> AccelConfig:
    files = yaml_files("configs")
    if name not in files:
        close = difflib.get_close_matches(name, list(files), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(files)}, a path to a YAML file, "
                          f"a dict or an AccelConfig{hint}", key="config", value=name, allowed=list(files))
    data = parse_yaml(files[name].read_text(encoding="utf-8"), f"configs/{name}.yaml")
    if isinstance(data, Mapping) and "name" not in data:
        data = {**data, "name": name}
    return AccelConfig.from_dict(data)


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name not in SECTIONS:
            names = list(SECTIONS)
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown override {key!r}; allowed: {', '.join(names)}{hint}",
                              key=str(key), value=value, allowed=names)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(out.get(name), dict) and isinstance(value, Mapping):
            out[name] = {**out[name], **value}
        else:
            out[name] = value
    return out


def resolve_config(config: Any = None, **overrides: Any) -> AccelConfig:
    """Preset name, YAML path, dict, AccelConfig or None (the lossless defaults) -> AccelConfig."""
    if config is None:
        cfg = AccelConfig()
    elif isinstance(config, AccelConfig):
        cfg = config
    elif isinstance(config, os.PathLike):
        cfg = AccelConfig.from_yaml(config)
    elif isinstance(config, str):
        looks_like_path = config.endswith((".yaml", ".yml")) or os.sep in config or "/" in config
        if looks_like_path:
            if not Path(config).is_file():
                raise ConfigError(f"config file {config!r} does not exist", key="config", value=config)
            cfg = AccelConfig.from_yaml(config)
        else:
            cfg = load_preset(config)
    elif isinstance(config, Mapping):
        cfg = AccelConfig.from_dict(config)
    else:
        raise ConfigError(f"config = {config!r} has type {type(config).__name__}; allowed: a preset name "
                          f"({', '.join(yaml_files('configs'))}), a YAML path, a dict or an AccelConfig",
                          key="config", value=config)
    if overrides:
        merged = _merge(cfg.to_dict(), overrides)
        cfg = AccelConfig.from_dict(merged)
    return cfg


def reference_markdown() -> str:
    """Every config key with its default, allowed values and meaning, as a Markdown table (the README's
    reference; tests keep the two equal)."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]

    def describe(meta: Mapping[str, Any]) -> str:
        parts = []
        if meta.get("choices"):
            parts.append(" \\| ".join(str(c) for c in meta["choices"]))
        if meta.get("min") is not None:
            parts.append(f">= {meta['min']}")
        if meta.get("max") is not None:
            parts.append(f"<= {meta['max']}")
        return ", ".join(parts) or "-"

    def walk(cls, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            if f.name in ("version", "section"):
                continue
            if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
                walk(f.default_factory, f"{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = ("null" if default is None else '""' if default == "" else
                     str(default).lower() if isinstance(default, bool) else default)
            doc = f.metadata.get("doc", "").replace("|", "\\|")
            rows.append(f"| `{prefix}{f.name}` | `{shown}` | {describe(f.metadata)} | {doc} |")

    walk(AccelConfig, "")
    return "\n".join(rows)
