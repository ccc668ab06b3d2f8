"""accelerate_model is one transaction: a fault after any step (and inside the multi-part steps) restores the
model exactly - tensors and their strides, instance forwards and attributes, hooks, config, attention - and
the error names the step. The model then still generates what the plain model generates."""

from __future__ import annotations

import pytest
import torch

import hfaccel
from hfaccel import api, fusion, layout, models
from hfaccel.errors import AccelError
from tests.conftest import greedy, prompts

from .conftest import TALLY

CONFIGS = {
    "cpu-fast": ("cpu-fast", {"compile": {"warmup": False}, "kv_cache": {"max_cache_tokens": 2048}}),
    "int8+bf16": ("cpu-int8", {"compile": {"warmup": False}, "kv_cache": {"max_cache_tokens": 2048}}),
    "low-latency": ("low-latency", {"kv_cache": {"max_cache_tokens": 2048}}),
    "int4-self-draft": (None, {"quantization": {"method": "rtn", "bits": 4, "group_size": 32},
                               "speculative": {"draft": "layer-skip:1"}, "kv_cache": {"type": "static"}}),
}


class Fault(RuntimeError):
    pass


def snapshot(model) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "strides": {n: p.stride() for n, p in model.named_parameters()},
        "storages": len({p.untyped_storage().data_ptr() for p in model.parameters()}),
        "instance": {n: sorted(m.__dict__.keys() - {"_modules", "_parameters", "_buffers"})
                     for n, m in model.named_modules()},
        "modules": {n: type(m) for n, m in model.named_modules()},
        "hooks": len(model._state_dict_hooks),
        "config": model.config.to_dict(),
        "attn": model.config._attn_implementation,
        "generation_config": model.generation_config.to_dict(),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].dtype == b["state"][k].dtype and torch.equal(a["state"][k], b["state"][k]), k
    for key in ("strides", "storages", "instance", "modules", "hooks", "config", "attn", "generation_config"):
        assert a[key] == b[key], key


def steps_of(config) -> list[str]:
    """The features that change a tiny llama under `config`, in application order."""
    preset, kw = CONFIGS[config]
    report = hfaccel.accelerate_model(models.tiny("llama"), preset, **kw)
    return list(dict.fromkeys(c.feature for c in report.changes))


@pytest.fixture(autouse=True)
def every_shape_relaid(monkeypatch):
    monkeypatch.setattr(layout, "MIN_GAIN", 0.0)          # weight_layout always has something to undo


@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_fault_after_each_step_restores_the_model_exactly(config, monkeypatch):
    preset, kw = CONFIGS[config]
    steps = steps_of(config)
    assert len(steps) >= 3, steps
    real = api.plan_features
    for victim in steps:
        model, plain = models.tiny("llama"), models.tiny("llama")
        before = snapshot(model)

        def faulty(model_, ctx, cfg, victim=victim):
            plans, skips = real(model_, ctx, cfg)
            for plan in plans:
                if plan.feature == victim:
                    inner = plan.apply

                    def apply(rw, inner=inner):
                        inner(rw)
                        raise Fault(f"after {victim}")

                    plan.apply = apply
            return plans, skips

        monkeypatch.setattr(api, "plan_features", faulty)
        with pytest.raises(AccelError, match=rf"failed in step '{victim}' \(Fault: after {victim}\); the model "
                                             rf"was restored") as info:
            hfaccel.accelerate_model(model, preset, **kw)
        monkeypatch.setattr(api, "plan_features", real)
        TALLY["faults"] += 1
        assert info.value.step == victim
        assert_same(before, snapshot(model))
        ids = prompts(plain.config.vocab_size, batch=2, length=9)
        assert torch.equal(greedy(model, ids, n=6), greedy(plain, ids, n=6)), victim
        assert not hfaccel.accelerate_model(model, preset, **kw).noop      # and it accelerates afterwards


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_a_fault_inside_fusion_restores_the_groups_already_fused(nth, monkeypatch):
    model = models.tiny("llama", num_hidden_layers=3)
    before = snapshot(model)
    real = fusion._fuse_group
    calls = []

    def flaky(mods, kind, undos):
        calls.append(kind)
        if len(calls) == nth:
            raise Fault(f"fuse group {nth}")
        return real(mods, kind, undos)

    monkeypatch.setattr(fusion, "_fuse_group", flaky)
    with pytest.raises(AccelError, match=r"failed in step 'fuse'"):
        hfaccel.accelerate_model(model, fusion={"weight_layout": True})
    TALLY["faults"] += 1
    assert_same(before, snapshot(model))


def test_a_fault_inside_the_norm_pass_restores_the_norms_already_swapped(monkeypatch):
    model = models.tiny("qwen3")
    before = snapshot(model)
    seen = []

    def flaky(norm, fn):
        seen.append(norm)
        if len(seen) == 4:
            raise Fault("probe")
        return True

    monkeypatch.setattr(fusion, "_same_as_module", flaky)
    with pytest.raises(AccelError, match=r"failed in step 'fuse' \(Fault: probe\)"):
        hfaccel.accelerate_model(model)
    TALLY["faults"] += 1
    assert_same(before, snapshot(model))
