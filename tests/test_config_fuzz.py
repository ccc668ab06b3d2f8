"""Fuzz the config resolver: whatever a YAML file or dict holds, only ConfigError may come out."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfaccel.config import AccelConfig, SECTIONS, parse_yaml, resolve_config
from hfaccel.errors import ConfigError

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["auto", "gptq", "bf16", "paged", "layer-skip:3", "int8"]))
keys = st.one_of(st.sampled_from(sorted(SECTIONS) + ["backend", "bits", "method", "block_size", "draft", "enabled"]),
                 st.text(max_size=8), st.integers(0, 3))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=6))
def test_any_mapping_gives_a_config_or_a_config_error(data):
    try:
        cfg = resolve_config(data)
    except ConfigError as e:
        assert str(e)
    else:
        assert isinstance(cfg, AccelConfig)
        assert AccelConfig.from_dict(cfg.to_dict()) == cfg


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_yaml_text_gives_data_or_a_config_error(text):
    try:
        data = parse_yaml(text)
    except ConfigError:
        return
    try:
        resolve_config(data) if isinstance(data, dict) else AccelConfig.from_dict(data)
    except ConfigError:
        pass
