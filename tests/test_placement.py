"""device_map models (accelerate dispatch with disk offload): features skip offloaded modules with reasons,
generate() still gives the plain model's greedy tokens, and the report says where each module lives."""

from __future__ import annotations

import pytest
import torch

import hfaccel
from hfaccel import models
from hfaccel.placement import Placement, fold
from hfaccel.quant import Int8Linear

from .conftest import greedy, prompts

DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
              "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
              "lm_head": "cpu"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny4")
    models.tiny("llama", num_hidden_layers=4).save_pretrained(path)
    return path


def dispatched(folder, tmp_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, device_map=DEVICE_MAP,
                                                offload_folder=str(tmp_path / "offload")).eval()


def plain(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


X = prompts(512, batch=2, length=9)


def test_fold():
    assert fold(["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.norm",
                 "model.layers.4", "lm_head"]) == "model.embed_tokens, model.layers.0-2, model.norm, model.layers.4, " \
                                                  "lm_head"


@pytest.mark.parametrize("preset", [None, "cpu-fast"])
def test_lossless_presets_keep_the_tokens_and_leave_offloaded_modules_alone(folder, tmp_path, preset, monkeypatch):
    from hfaccel import packed

    monkeypatch.setattr(packed, "MIN_GAIN", 0.0)          # pack every resident shape
    model = dispatched(folder, tmp_path)
    want = greedy(plain(folder), X, n=8)
    offloaded_before = {n: p.device.type for n, p in model.named_parameters()}
    report = hfaccel.accelerate_model(model, preset)
    assert report.lossless
    assert torch.equal(greedy(model, X, n=8), want)
    after = {n: p.device.type for n, p in model.named_parameters()}        # (packed layers hold no `weight`)
    assert {n: d for n, d in offloaded_before.items() if d == "meta"}.items() <= after.items()   # still on disk
    assert after.items() <= offloaded_before.items()
    assert report.placement[:2] == ["cpu: model.embed_tokens, model.layers.0-1, model.norm, model.rotary_emb, lm_head",
                                    "disk (offloaded, runs on cpu): model.layers.2-3"]
    assert "18 offloaded modules" in report.placement[2]
    assert "placement: disk (offloaded, runs on cpu): model.layers.2-3" in str(report)
    if preset == "cpu-fast":
        skipped = {s.feature: s.reason for s in report.skipped}
        assert "dtype" not in skipped or "offloaded" in skipped["dtype"]
        assert any("14 Linear layers under offloaded modules left as they are" in n for n in report.notes)
        packed_ = [c.target for c in report.changes if c.feature == "packed_weights"]
        assert packed_ and all(t.startswith(("model.layers.0.", "model.layers.1.", "lm_head")) for t in packed_)
        assert hasattr(model.model.layers[0].self_attn.q_proj, "_hf_hook")      # accelerate's alignment kept
        fused = [c for c in hfaccel.accelerate_model(dispatched(folder, tmp_path), preset,
                                                     fusion={"qkv": True, "gate_up": True}).skipped
                 if c.feature == "fuse"]
        assert "projection groups under offloaded modules left as they are" in fused[0].reason
    assert hfaccel.revert_model(model) == []
    assert torch.equal(greedy(model, X, n=8), want)


def test_rtn_quantizes_resident_layers_only_and_keeps_their_hooks(folder, tmp_path):
    model = dispatched(folder, tmp_path)
    report = hfaccel.accelerate_model(model, "cpu-int8")
    swapped = {c.target for c in report.changes if c.feature == "quantize"}
    assert swapped and all(t.startswith(("model.layers.0.", "model.layers.1.")) for t in swapped)
    assert any("14 linear layers under offloaded modules left as they are" in n for n in report.notes)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, Int8Linear) and hasattr(q, "_hf_hook")       # accelerate's alignment moved over
    assert isinstance(model.model.layers[2].self_attn.q_proj, torch.nn.Linear)
    # the same layers quantized on the plain model give the same tokens
    ref = plain(folder)
    hfaccel.accelerate_model(ref, "cpu-int8", quantization={"modules_to_not_convert": ["model.layers.2.",
                                                                                        "model.layers.3."]})
    assert torch.equal(greedy(model, X, n=8), greedy(ref, X, n=8))


def test_what_cannot_run_on_an_offloaded_model_says_why(folder, tmp_path):
    model = dispatched(folder, tmp_path)
    report = hfaccel.accelerate_model(model, "cpu-int4", dtype="bfloat16", compile={"enabled": True})
    skipped = {s.feature: s.reason for s in report.skipped}
    assert "gptq calibrates decoder layer by layer" in skipped["quantize"] and "18 modules are offloaded" in \
        skipped["quantize"]
    assert "not cast: 18 modules are offloaded" in skipped["dtype"]
    assert "dispatched with accelerate hooks" in skipped["compile"]
    assert torch.equal(greedy(model, X, n=8), greedy(plain(folder), X, n=8))
    hfaccel.revert_model(model)
    report = hfaccel.accelerate_model(model, speculative={"draft": "self-int8"})
    assert "cannot be made from their meta tensors" in {s.feature: s.reason for s in report.skipped}["speculative"]


def test_meta_parameters_without_offload_hooks_are_still_refused(folder):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.hf_device_map = {"": "cpu"}
    with pytest.raises(ValueError, match=r"parameter\(s\) on the meta device"):
        hfaccel.accelerate_model(model)


def test_a_model_split_across_devices_keeps_transformers_cache():
    model = models.tiny("llama", num_hidden_layers=4)
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                           "model.layers.2": 0, "model.layers.3": 0, "model.norm": 0, "lm_head": 0}
    placement = Placement.detect(model)
    assert placement.execution_devices == {"cpu", "cuda:0"} and placement.offloaded == ()
    report = hfaccel.accelerate_model(model)
    reason = {s.feature: s.reason for s in report.skipped}["kv_cache"]
    assert "layers run on cpu, cuda:0 (device_map)" in reason
    assert report.placement == ["cpu: model.embed_tokens, model.layers.0-1", "cuda:0: model.layers.2-3, model.norm, "
                                                                              "lm_head"]


def test_whole_model_on_one_device():
    model = models.tiny("llama")
    assert Placement.detect(model) is None
    model.hf_device_map = {"": "cpu"}
    report = hfaccel.accelerate_model(model)
    assert report.placement == ["cpu: the whole model"]
    assert any(c.feature == "kv_cache" for c in report.changes)
