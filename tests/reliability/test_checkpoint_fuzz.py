"""Malformed GPTQ / AWQ folders, generated: every corruption of a valid checkpoint either loads into the same
layers (a harmless change) or raises CheckpointError naming what is wrong - never another exception, never a
model with different weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import hfaccel
from hfaccel import models
from hfaccel.quant import CheckpointError, Int4Linear, load_quantized, save_quantized

from .conftest import TALLY

TENSOR_OPS = ("drop", "reshape", "dtype", "truncate_rows", "extra", "rename")
CONFIG_OPS = ("bits", "group_size", "quant_method", "checkpoint_format", "version", "drop_qc", "not_json")


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    folders = {}
    for fmt in ("gptq", "awq"):
        model = models.tiny("llama")
        hfaccel.accelerate_model(model, quantization={"method": "rtn", "bits": 4, "group_size": 32},
                                 kv_cache={"type": "dynamic"})
        path = tmp_path_factory.mktemp(fmt)
        save_quantized(model, path, fmt)
        folders[fmt] = (path, weights(load_quantized(path)))
    return folders


def weights(model) -> dict[str, torch.Tensor]:
    """Every quantized layer dequantized, and every other parameter: what a load must reproduce exactly."""
    out = {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    out.update({n: p.detach() for n, p in model.named_parameters()})
    return out


def corrupt_tensors(tensors: dict[str, torch.Tensor], op: str, pick: int) -> tuple[dict[str, torch.Tensor], str]:
    names = sorted(tensors)
    name = names[pick % len(names)]
    t = tensors[name]
    out = dict(tensors)
    if op == "drop":
        del out[name]
    elif op == "reshape":
        out[name] = t.reshape(-1)[: max(t.numel() - 1, 1)].clone() if t.numel() > 1 else t.reshape(1, 1)
    elif op == "dtype":
        out[name] = t.to(torch.float64 if t.dtype == torch.int32 else torch.int64)
    elif op == "truncate_rows":
        out[name] = t[: max(t.shape[0] // 2, 1)].clone() if t.dim() else t
    elif op == "extra":
        out[f"{name}.stray"] = torch.zeros(3)
    elif op == "rename":
        out[name.replace(".", "_", 1)] = out.pop(name)
    return out, name


def corrupt_config(config: dict, op: str, value: int) -> str:
    qc = config.setdefault("quantization_config", {})
    if op == "bits":
        qc["bits"] = [2, 3, 8, 16, "4", None][value % 6]
    elif op == "group_size":
        qc["group_size"] = [-1, 0, 16, 48, 256, "64"][value % 6]
    elif op == "quant_method":
        qc["quant_method"] = ["exl2", "GPTQ", "", None, "bitsandbytes", 4][value % 6]
    elif op == "checkpoint_format":
        qc["checkpoint_format"] = ["gptq_v3", "marlin", "", None, "v1", 2][value % 6]
    elif op == "version":
        qc["version"] = ["gemv", "GEMV_FAST", "exllama", "", None, 1][value % 6]
    elif op == "drop_qc":
        del config["quantization_config"]
    elif op == "not_json":
        return "{" + json.dumps(config)[: 20 + value % 40]
    return json.dumps(config)


def check_load(folder: Path, reference: dict[str, torch.Tensor]) -> str:
    TALLY["inputs"] += 1
    try:
        model = load_quantized(folder)
    except CheckpointError as e:
        assert str(e), "a CheckpointError says what is wrong"
        return "refused"
    got = weights(model)
    assert got.keys() == reference.keys(), "a loaded model has the checkpoint's layers"
    for name, w in reference.items():
        assert torch.equal(got[name], w), f"{name} loaded with different weights"
    return "loaded"


def folder_with(tmp_path_factory, src: Path, kept: str) -> Path:
    """A fresh folder holding only `kept` copied from the valid checkpoint `src`: the test writes the other."""
    folder = tmp_path_factory.mktemp("bad")
    shutil.copy(src / kept, folder / kept)
    return folder


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["gptq", "awq"]), op=st.sampled_from(TENSOR_OPS), pick=st.integers(0, 10_000))
def test_corrupted_tensors_are_refused_by_name(valid, tmp_path_factory, fmt, op, pick):
    src, reference = valid[fmt]
    folder = folder_with(tmp_path_factory, src, "config.json")
    tensors, name = corrupt_tensors(load_file(str(src / "model.safetensors")), op, pick)
    save_file(tensors, str(folder / "model.safetensors"))
    outcome = check_load(folder, reference)
    # the one harmless corruption: a GPTQ folder without g_idx (groups are then consecutive rows, as written)
    if outcome == "loaded" and not (op == "drop" and name.endswith(".g_idx")):
        pytest.fail(f"{op} on {name} of a {fmt} checkpoint loaded silently")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["gptq", "awq"]), op=st.sampled_from(CONFIG_OPS), value=st.integers(0, 1000))
def test_corrupted_configs_are_refused_by_key(valid, tmp_path_factory, fmt, op, value):
    src, reference = valid[fmt]
    folder = folder_with(tmp_path_factory, src, "model.safetensors")
    (folder / "config.json").write_text(corrupt_config(json.loads((src / "config.json").read_text()), op, value))
    check_load(folder, reference)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["gptq", "awq"]), cut=st.floats(0.0, 0.999), flip=st.integers(0, 2**20))
def test_truncated_or_bit_flipped_files(valid, tmp_path_factory, fmt, cut, flip):
    src, reference = valid[fmt]
    folder = folder_with(tmp_path_factory, src, "config.json")
    data = bytearray((src / "model.safetensors").read_bytes())
    if flip % 2:
        data = data[: int(len(data) * cut)]                          # a download cut short
    else:
        header = int.from_bytes(data[:8], "little")
        data[8 + (flip // 2) % header] ^= 0x20                      # one flipped bit in the JSON header
    (folder / "model.safetensors").write_bytes(bytes(data))
    check_load(folder, reference)
