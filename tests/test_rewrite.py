"""The Rewriter: every mutation is recorded, undone exactly, and never touches a class."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hfaccel import models
from hfaccel.rewrite import Rewriter


def test_swap_module_and_bind_forward_are_recorded_and_undone():
    model = models.tiny("llama")
    mlp = model.model.layers[0].mlp
    old_proj = mlp.down_proj
    rw = Rewriter(model)
    rw.feature = "test"
    rw.swap_module("model.layers.0.mlp.down_proj", nn.Identity())

    def forward(self, x):
        return torch.zeros_like(x)

    rw.bind_forward(mlp, "model.layers.0.mlp", forward)
    x = torch.ones(1, 2, model.config.hidden_size)
    assert torch.equal(mlp(x), torch.zeros_like(x))
    assert "forward" in mlp.__dict__ and type(model.model.layers[0].mlp.down_proj) is nn.Identity
    assert [(c.feature, c.target, c.before, c.after) for c in rw.changes] == [
        ("test", "model.layers.0.mlp.down_proj", "Linear", "Identity"),
        ("test", "model.layers.0.mlp.forward", "LlamaMLP.forward()", f"{forward.__qualname__}()")]
    assert rw.rollback() == []
    assert "forward" not in mlp.__dict__ and mlp.down_proj is old_proj
    assert type(mlp).forward is not forward      # the class was never patched


def test_bind_forward_refuses_a_different_signature():
    model = models.tiny("llama")
    rw = Rewriter(model)
    with pytest.raises(TypeError, match=r"forward replacement for mlp has parameters \['x', 'scale'\], the original "
                                        r"has \['x'\]"):
        rw.bind_forward(model.model.layers[0].mlp, "mlp", lambda self, x, scale: x)
    assert rw.changes == []


def test_set_attr_refuses_classes_and_restores_missing_attributes():
    model = models.tiny("gpt2")
    rw = Rewriter(model)
    with pytest.raises(TypeError, match="refusing to patch class"):
        rw.set_attr(type(model), "forward", None, target="class")
    rw.set_attr(model, "hfaccel_marker", 1, target="model.hfaccel_marker")
    assert model.hfaccel_marker == 1
    rw.rollback()
    assert not hasattr(model, "hfaccel_marker")
