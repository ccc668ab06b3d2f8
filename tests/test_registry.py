"""Architecture specs in patches/: each parses and names real modules of its family's model."""

from __future__ import annotations

import pytest

from hfaccel import models
from hfaccel.registry import STAGES, SpecError, arch_specs, features, parse_spec, spec_for

GOOD = {"family": "x", "model_types": ["x"], "layers": "model.layers", "embed": "model.embed_tokens",
        "final_norm": "model.norm", "lm_head": "lm_head",
        "attention": {"module": "self_attn", "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"},
        "mlp": {"module": "mlp", "gate": "gate_proj", "up": "up_proj", "down": "down_proj", "activation": "silu"},
        "norms": {"type": "rms", "input": "input_layernorm", "post_attention": "post_attention_layernorm"},
        "rotary": "half", "linear": "linear"}


def test_every_tiny_arch_has_a_matching_spec(tiny_arch):
    model = models.tiny(tiny_arch)
    spec, problem = spec_for(model)
    assert problem is None and spec is not None
    assert spec.missing_paths(model) == []
    assert len(spec.layer_paths(model)) == model.config.num_hidden_layers


def test_spec_details_per_family():
    specs = arch_specs()
    assert specs["phi3"].attention.qkv == "qkv_proj" and specs["phi3"].mlp.gate_up == "gate_up_proj"
    assert specs["qwen3"].attention.q_norm == "q_norm"
    assert specs["gemma"].norm_type == "rms_plus_one" and specs["gemma"].mlp.activation == "gelu_pytorch_tanh"
    assert specs["gpt2"].linear == "conv1d" and specs["gpt2"].rotary == "none"
    assert specs["gpt2"].norm_type == "layernorm"


def test_unknown_architecture_has_no_spec():
    import transformers

    cfg = transformers.GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    spec, problem = spec_for(model)
    assert spec is None
    assert problem.startswith("no patches/ spec for model_type 'gpt_neox' (known: gemma, gpt2, llama")


def test_spec_that_does_not_match_the_model_is_refused():
    model = models.tiny("llama")
    model.model.layers[1].mlp.gate_proj = None
    del model.model.layers[1].mlp.gate_proj
    spec, problem = spec_for(model)
    assert spec is None
    assert "patches/llama.yaml does not match this model: missing model.layers.1.mlp.gate_proj" in problem


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("layers"), "missing key 'layers'"),
    (lambda d: d.update(extra=1), "unknown keys ['extra']"),
    (lambda d: d.update(rotary="alibi"), "rotary = 'alibi' is not allowed; allowed: half, none"),
    (lambda d: d["norms"].update(type="batchnorm"), "type = 'batchnorm' is not allowed"),
    (lambda d: d["attention"].pop("q"), "attention needs either qkv or all of q, k, v"),
    (lambda d: d["mlp"].update(gelu=1), "unknown mlp keys ['gelu']"),
])
def test_bad_specs_are_rejected(mutate, message):
    import copy

    data = copy.deepcopy(GOOD)
    parse_spec(data, "good.yaml")
    mutate(data)
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        parse_spec(data, "bad.yaml")


def test_features_come_in_stage_order():
    order = [STAGES.index(f.stage) for f in features()]
    assert order == sorted(order)
    assert {f.name for f in features()} >= {"dtype", "attention", "quantize", "fuse", "kv_cache", "speculative",
                                            "compile"}
