"""AccelConfig validation, presets and YAML: every error names the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest

import hfaccel
from hfaccel.config import AccelConfig, QuantizationConfig, list_presets, load_preset, parse_yaml, resolve_config
from hfaccel.errors import ConfigError

REQUIRED_PRESETS = {"cpu-fast", "cpu-int8", "cpu-int4", "gpu-throughput", "gpu-int4", "low-latency", "memory-saver"}


@pytest.mark.parametrize("overrides, key, message", [
    (dict(quantisation={}), "quantisation",
     "unknown override 'quantisation'; allowed: version, name, description, dtype, keep_original, attention, "
     "kv_cache, fusion, quantization, speculative, compile; did you mean 'quantization'?"),
    (dict(quantization={"bits": 3}), "quantization.bits", "quantization.bits = 3 is not allowed; allowed: 4, 8"),
    (dict(quantization={"bitz": 4}), "quantization.bitz",
     "unknown key 'quantization.bitz'; allowed keys in quantization: method, bits, group_size, sym, desc_act, "
     "damp_percent, calibration_samples, calibration_seq_len, modules_to_not_convert, quantize_lm_head, "
     "lm_head_bits; "
     "did you mean 'bits'?"),
    (dict(quantization={"method": "gptq", "bits": 8}), "quantization.bits",
     "quantization.bits = 8 is not allowed with method 'gptq'; allowed: 4"),
    (dict(quantization={"method": "gtpq"}), "quantization.method",
     "quantization.method = 'gtpq' is not allowed; allowed: 'none', 'rtn', 'gptq', 'awq', 'bnb-int8', 'bnb-nf4'; "
     "did you mean 'gptq'?"),
    (dict(quantization={"lm_head_bits": 8}), "quantization.lm_head_bits",
     "quantization.lm_head_bits = 8 needs quantize_lm_head: true; allowed without it: null"),
    (dict(quantization={"method": "bnb-nf4", "quantize_lm_head": True, "lm_head_bits": 8}), "quantization.lm_head_bits",
     "quantization.lm_head_bits = 8 is not allowed with method 'bnb-nf4' (bitsandbytes quantizes the head with its "
     "own method); allowed: null"),
    (dict(quantization={"bits": 8, "group_size": -1, "quantize_lm_head": True, "lm_head_bits": 4}),
     "quantization.group_size", "quantization.lm_head_bits = 4 needs group_size 32, 64 or 128; it is -1"),
    (dict(quantization={"modules_to_not_convert": "lm_head"}), "quantization.modules_to_not_convert",
     "quantization.modules_to_not_convert = 'lm_head' has type str; expected a list of str"),
    (dict(compile={"enabled": "yes"}), "compile.enabled", "compile.enabled = 'yes' has type str; expected bool"),
    (dict(kv_cache={"block_size": 17}), "kv_cache.block_size",
     "kv_cache.block_size = 17 is not allowed; allowed: 8, 16, 32, 64, 128, 256"),
    (dict(kv_cache={"block_size": 16.0}), "kv_cache.block_size",
     "kv_cache.block_size = 16.0 has type float; expected int"),
    (dict(kv_cache={"block_size": True}), "kv_cache.block_size",
     "kv_cache.block_size = True has type bool; expected int"),
    (dict(kv_cache={"memory_fraction": 2.0}), "kv_cache.memory_fraction",
     "kv_cache.memory_fraction = 2.0 is out of range; allowed: [0.001, 0.95]"),
    (dict(kv_cache={"max_cache_tokens": 4}), "kv_cache.max_cache_tokens",
     "kv_cache.max_cache_tokens = 4 is out of range; allowed: [16, inf]"),
    (dict(kv_cache=[1]), "kv_cache", "kv_cache must be a mapping of keys to values, got list: [1]"),
    (dict(dtype="fp8"), "dtype",
     "dtype = 'fp8' is not allowed; allowed: 'keep', 'auto', 'float32', 'bfloat16', 'float16'"),
    (dict(attention={"backend": "flash"}), "attention.backend",
     "attention.backend = 'flash' is not allowed; allowed: 'auto', 'sdpa', 'flash_attention_2', 'eager', 'paged'"),
    (dict(speculative={"draft": "layer-skip:x"}), "speculative.draft",
     "speculative.draft = 'layer-skip:x' is not allowed; write layer-skip:N with N >= 1 (e.g. 'layer-skip:8')"),
    (dict(speculative={"num_draft_tokens": 0}), "speculative.num_draft_tokens",
     "speculative.num_draft_tokens = 0 is out of range; allowed: [1, 64]"),
    (dict(version=2), "version", "version = 2 is not allowed; allowed: 1"),
])
def test_config_errors_name_key_value_and_allowed(overrides, key, message):
    with pytest.raises(ConfigError) as info:
        resolve_config(None, **overrides)
    assert str(info.value) == message
    assert info.value.key == key


def test_unknown_preset_and_bad_config_types(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown preset 'cpu-fsat'; allowed: .*cpu-fast.*did you mean 'cpu-fast'\?"):
        resolve_config("cpu-fsat")
    with pytest.raises(ConfigError, match=r"config = 3 has type int; allowed: a preset name"):
        resolve_config(3)
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        resolve_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("dtype: keep\nattention: {backend: sdpa\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line 3, column 1"):
        resolve_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"config must be a mapping of keys to values, got list"):
        resolve_config(str(bad))
    bad.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        resolve_config(str(bad))
    with pytest.raises(ConfigError, match="non-string key 1"):
        resolve_config({1: "x"})


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match=r"quantization.group_size = 48 is not allowed; allowed: -1, 32, 64, 128"):
        QuantizationConfig(group_size=48)
    assert AccelConfig(dtype="bf16").dtype == "bfloat16"       # aliases normalise
    assert QuantizationConfig(damp_percent=0).damp_percent == 0.0


def test_defaults_are_lossless():
    cfg = resolve_config()
    assert cfg.is_lossless and cfg.dtype == "keep" and cfg.quantization.method == "none"
    assert cfg.kv_cache.dtype == "model" and cfg.speculative.draft is None


def test_required_presets_exist_with_descriptions():
    presets = list_presets()
    assert REQUIRED_PRESETS <= set(presets)
    for name, desc in presets.items():
        assert len(desc) > 20, name


@pytest.mark.parametrize("name", sorted(REQUIRED_PRESETS))
def test_preset_round_trip(name, tmp_path):
    cfg = load_preset(name)
    assert cfg.name == name
    path = tmp_path / f"{name}.yaml"
    path.write_text(cfg.to_yaml())
    again = resolve_config(str(path))
    assert again == cfg
    assert AccelConfig.from_dict(cfg.to_dict()) == cfg
    assert parse_yaml(cfg.to_yaml()) == cfg.to_dict()


def test_lossless_presets_are_marked_so():
    assert load_preset("cpu-fast").is_lossless
    assert load_preset("low-latency").is_lossless
    for lossy in ("cpu-int8", "cpu-int4", "gpu-throughput", "gpu-int4", "memory-saver"):
        assert not load_preset(lossy).is_lossless, lossy


def test_overrides_merge_into_a_preset():
    cfg = resolve_config("cpu-fast", quantization={"method": "awq", "bits": 4}, kv_cache={"block_size": 32})
    base = load_preset("cpu-fast")
    assert cfg.quantization.method == "awq" and cfg.quantization.group_size == 64
    assert cfg.kv_cache.block_size == 32 and cfg.kv_cache.type == base.kv_cache.type
    assert cfg.fusion == base.fusion
    cfg2 = resolve_config("cpu-fast", quantization=QuantizationConfig(method="rtn", bits=8))
    assert cfg2.quantization.bits == 8


def test_dict_and_dataclass_and_hyphenated_keys():
    cfg = resolve_config({"kv-cache": {"block-size": 32}, "keep_original": True})
    assert cfg.kv_cache.block_size == 32 and cfg.keep_original
    assert resolve_config(cfg) is cfg
    assert dataclasses.replace(cfg, name="x").name == "x"


def test_accelerate_model_raises_config_error_before_touching(tmp_path):
    from hfaccel.models import tiny

    model = tiny("llama")
    model.set_attn_implementation("eager")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError):
        hfaccel.accelerate_model(model, "cpu-fast", quantization={"bits": 5})
    assert model.config._attn_implementation == "eager"
    assert "_hfaccel_state" not in model.__dict__
    assert all(v.equal(model.state_dict()[k]) for k, v in sd.items())
