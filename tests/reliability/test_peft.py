"""PEFT models (LoRA adapters injected, not merged): accelerate_model takes the PeftModel, accelerates the
Transformers model inside it, leaves the adapter layers alone (and says so), and keeps the greedy tokens."""

from __future__ import annotations

import pytest
import torch

import hfaccel
from hfaccel import models
from hfaccel.quant import Int8Linear

from ..conftest import greedy, prompts

peft = pytest.importorskip("peft")


def lora_model(task_type: str | None = "CAUSAL_LM"):
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             task_type=task_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return peft.get_peft_model(models.tiny("llama"), config).eval()


X = prompts(512, batch=2, length=9)


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
@pytest.mark.parametrize("preset", [None, "cpu-fast"])
def test_lossless_presets_keep_the_adapted_models_tokens(preset, task_type, monkeypatch):
    from hfaccel import packed

    monkeypatch.setattr(packed, "MIN_GAIN", 0.0)          # pack every shape: the exclusions are what is tested
    model = lora_model(task_type)
    want = greedy(model, X, n=8)
    report = hfaccel.accelerate_model(model, preset)
    assert report.lossless
    assert any("PEFT" in n and "4 adapter layers (lora) are left as they are" in n for n in report.notes)
    assert torch.equal(greedy(model, X, n=8), want)
    assert model.get_base_model().hfaccel_report is report
    assert hfaccel.accelerate_model(model, preset).noop                      # idempotent through the wrapper
    if preset == "cpu-fast":
        packed_ = [c.target.rsplit(".", 1)[-1] for c in report.changes if c.feature == "packed_weights"]
        assert {"k_proj", "o_proj", "gate_proj", "down_proj"} <= set(packed_)
        assert not {"q_proj", "v_proj", "base_layer"} & set(packed_)          # they carry adapters: left alone
    assert hfaccel.revert_model(model) == []
    assert torch.equal(greedy(model, X, n=8), want)


def test_quantization_leaves_adapter_layers_and_their_base_in_float():
    model = lora_model()
    hfaccel.accelerate_model(model, "cpu-int8")
    attn = model.get_base_model().model.layers[0].self_attn
    assert type(attn.q_proj.base_layer) is torch.nn.Linear and type(attn.q_proj.lora_A["default"]) is torch.nn.Linear
    assert isinstance(attn.k_proj, Int8Linear) and isinstance(attn.o_proj, Int8Linear)
    out = greedy(model, X, n=8)
    assert out.shape == (2, 17)
    merged = lora_model().merge_and_unload()                # merging first is what makes q/v quantizable
    report = hfaccel.accelerate_model(merged, "cpu-int8")
    assert isinstance(merged.model.layers[0].self_attn.q_proj, Int8Linear) and not report.lossless
