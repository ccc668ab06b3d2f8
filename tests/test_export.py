"""`hfaccel export`: the folder it writes is checked tensor by tensor against the GPTQ v1 / AWQ GEMM layouts
(names, dtypes, shapes, written here from the format description, not from hfaccel's writer), its config
against what vLLM's and Transformers' config classes read, and it reloads into the same quantized model."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open

import hfaccel
from hfaccel import models
from hfaccel.cli import main
from hfaccel.export import ExportError, export_model, pick_group_size
from hfaccel.quant import Int4Linear, load_quantized

from .conftest import greedy, prompts

CAL = ["--calibration-samples", "4", "--calibration-seq-len", "32"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny llama saved as a plain Transformers folder (what users hand to `hfaccel export`)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    models.tiny("llama").save_pretrained(path)
    return path


def read_folder(path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        ["model.safetensors"]
    tensors = {}
    for f in files:
        with safe_open(str(path / f), "pt") as fh:
            for k in fh.keys():
                assert k not in tensors, f"{k} is in two shards"
                tensors[k] = fh.get_tensor(k)
    return tensors


def expected_layout(model, fmt: str, group: int, quantize_head: bool = False) -> dict[str, tuple[torch.dtype, tuple]]:
    """Every tensor a `fmt` checkpoint of `model` must hold: {name: (dtype, shape)}, from the format spec."""
    head = model.get_output_embeddings()
    out: dict[str, tuple[torch.dtype, tuple]] = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and (quantize_head or m is not head)}
    for name, m in linears.items():
        n, k = m.weight.shape
        if fmt == "gptq":
            out[f"{name}.qweight"] = (torch.int32, (k // 8, n))
            out[f"{name}.g_idx"] = (torch.int32, (k,))
        else:
            out[f"{name}.qweight"] = (torch.int32, (k, n // 8))
        out[f"{name}.qzeros"] = (torch.int32, (k // group, n // 8))
        out[f"{name}.scales"] = (torch.float16, (k // group, n))
        if m.bias is not None:
            out[f"{name}.bias"] = (torch.float16, (n,))
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in linears:
            continue
        if model.config.tie_word_embeddings and key == "lm_head.weight":
            continue
        out[key] = (torch.float16, tuple(t.shape))
    return out


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_cli_export_matches_the_format_spec_and_reloads(tmp_path, tiny_dir, fmt, capsys):
    out = tmp_path / "out"
    assert main(["export", str(tiny_dir), str(out), "--format", fmt, *CAL]) == 0
    assert "wrote" in capsys.readouterr().out
    tensors = read_folder(out)
    want = expected_layout(models.tiny("llama"), fmt, group=64)
    assert sorted(tensors) == sorted(want)
    for name, (dtype, shape) in want.items():
        assert (tensors[name].dtype, tuple(tensors[name].shape)) == (dtype, shape), name
    if fmt == "gptq":
        assert all(torch.equal(t, torch.arange(t.numel(), dtype=torch.int32) // 64)
                   for k, t in tensors.items() if k.endswith(".g_idx"))

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float16"
    qc = config["quantization_config"]
    # the keys vLLM's GPTQConfig / AWQConfig.from_config read, and Transformers' config classes accept them
    if fmt == "gptq":
        assert qc | {"bits": 4, "group_size": 64, "desc_act": False, "sym": True, "lm_head": False,
                     "checkpoint_format": "gptq"} == qc
        from transformers import GPTQConfig
        assert GPTQConfig.from_dict(qc).bits == 4
    else:
        assert qc | {"bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"} == qc
        from transformers import AwqConfig
        assert AwqConfig.from_dict(qc).group_size == 64
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask          # not mkdtemp's private 0700

    # reloads with hfaccel into the same layers: compare with the same quantization done in memory
    again = models.tiny("llama")
    hfaccel.accelerate_model(again, hfaccel.export.export_config(fmt, 64, True, 4, 32, False))
    loaded = load_quantized(out)
    mem = {n: m for n, m in again.named_modules() if isinstance(m, Int4Linear)}
    got = {n: m for n, m in loaded.named_modules() if isinstance(m, Int4Linear)}
    assert mem.keys() == got.keys() and len(got) == 14
    for name in mem:
        assert torch.equal(mem[name].codes(), got[name].codes()), name
        torch.testing.assert_close(mem[name].dequantize(), got[name].dequantize(), rtol=1e-3, atol=1e-4)
    with torch.no_grad():                       # the float tensors went through float16: do the same in memory
        for p in again.parameters():
            p.copy_(p.half().float())
    x = prompts(again.config.vocab_size, batch=2, length=9)
    assert torch.equal(greedy(loaded, x, n=8), greedy(again, x, n=8))


def test_shards_with_an_index_and_the_loader_checks_it(tmp_path, tiny_dir):
    out = tmp_path / "sharded"
    result = export_model(tiny_dir, out, "gptq", calibration_samples=4, calibration_seq_len=32,
                          max_shard_bytes=70_000)
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert all((out / s).stat().st_size <= 70_000 + 8192 for s in shards)
    assert len(index["weight_map"]) == result.tensors == len(read_folder(out))
    x = prompts(512, batch=1, length=6)
    reference = greedy(load_quantized(out), x, n=5)
    (out / shards[1]).unlink()
    with pytest.raises(hfaccel.quant.CheckpointError, match=rf"missing: {shards[1]}"):
        load_quantized(out)
    assert reference.shape == (1, 11)


def test_default_model_export_and_tokenizer(tmp_path, default_model):
    out = tmp_path / "smol"
    result = export_model("default", out, "awq", calibration_samples=2, calibration_seq_len=64)
    assert result.group_size == 64                                  # 576 = 4.5 x 128: auto picks 64
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= set(result.files)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in read_folder(out)


def test_bad_arguments_fail_before_any_work_and_write_nothing(tmp_path, tiny_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(hfaccel, "accelerate_model", lambda *a, **k: calls.append(a))
    out = tmp_path / "o"
    with pytest.raises(ExportError, match=r"format 'exl2' is not allowed; allowed: gptq, awq"):
        export_model(tiny_dir, out, "exl2")
    with pytest.raises(ExportError, match=r"dtype 'float32' is not allowed; allowed: float16, bfloat16"):
        export_model(tiny_dir, out, "gptq", dtype="float32")
    with pytest.raises(ExportError, match=r"quantize_lm_head is not allowed with format awq"):
        export_model(tiny_dir, out, "awq", quantize_lm_head=True)
    with pytest.raises(FileNotFoundError, match=r"model '.*nowhere' is not 'default'"):
        export_model(tmp_path / "nowhere", out, "gptq")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"exists and is not empty; pass --overwrite"):
        export_model(tiny_dir, tmp_path / "full", "gptq")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    big = tmp_path / "wide"
    models.tiny("llama", hidden_size=96, intermediate_size=192).save_pretrained(big)
    with pytest.raises(ExportError, match=r"group size 64 does not divide the in_features of .* layer\(s\), e\.g\. "
                                          r"model\.layers\.0\.self_attn\.q_proj \(96\).*allowed for this model: 32"):
        export_model(big, out, "gptq", group_size=64)
    assert calls == [] and not out.exists()
    assert main(["export", str(tiny_dir), str(out), "--format", "gptq", "--group-size", "48"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "wide"]      # no temporary folder left


def test_group_size_choice():
    assert pick_group_size({"a": 576, "b": 1536}, "auto") == 64
    assert pick_group_size({"a": 4096, "b": 11008}, "auto") == 128
    with pytest.raises(ExportError, match=r"no group size of 32, 64, 128 divides every layer's in_features \(100"):
        pick_group_size({"a": 100}, "auto")
    with pytest.raises(ExportError, match=r"group size 96 is not allowed; allowed: auto, 32, 64, 128"):
        pick_group_size({"a": 4096}, 96)


def test_a_failed_write_leaves_no_folder(tmp_path, tiny_dir, monkeypatch):
    import hfaccel.export as ex

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ex, "save_quantized", broken)
    with pytest.raises(OSError, match="disk full"):
        export_model(tiny_dir, tmp_path / "out", "gptq", calibration_samples=2, calibration_seq_len=32)
    assert list(tmp_path.iterdir()) == []
