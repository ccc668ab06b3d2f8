"""GPTQ v1 / AWQ GEMM files: packers against independent reference implementations written from the format
description, round trips through save_quantized / load_quantized, and errors for malformed folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import hfaccel
from hfaccel import models
from hfaccel.quant import CheckpointError, Int4Linear, load_quantized, save_quantized
from hfaccel.quant.formats import AWQ_ORDER, pack_cols, pack_rows, unpack_cols, unpack_rows

from ..conftest import greedy, prompts


def to_int32(v: int) -> int:
    return v - 2**32 if v >= 2**31 else v


def ref_gptq_qweight(q_kn: list[list[int]]) -> list[list[int]]:
    """GPTQ qweight: word [i][n] holds rows 8i..8i+7 of column n, row 8i+j in bits 4j."""
    k, n = len(q_kn), len(q_kn[0])
    return [[to_int32(sum(q_kn[8 * i + j][c] << (4 * j) for j in range(8))) for c in range(n)] for i in range(k // 8)]


def ref_awq_words(q_rc: list[list[int]]) -> list[list[int]]:
    """AWQ GEMM: word [r][i] holds columns 8i + (0,2,4,6,1,3,5,7)[j] in bits 4j."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    r, c = len(q_rc), len(q_rc[0])
    return [[to_int32(sum(q_rc[row][8 * i + order[j]] << (4 * j) for j in range(8))) for i in range(c // 8)]
            for row in range(r)]


def test_packers_match_the_reference_and_invert():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (32, 24), generator=g, dtype=torch.uint8)
    q[0, 0] = 15                                                  # sign bit of a word set
    assert pack_rows(q).tolist() == ref_gptq_qweight(q.tolist())
    assert pack_cols(q, AWQ_ORDER).tolist() == ref_awq_words(q.tolist())
    assert torch.equal(unpack_rows(pack_rows(q)), q)
    assert torch.equal(unpack_cols(pack_cols(q, AWQ_ORDER), AWQ_ORDER), q)
    assert torch.equal(unpack_cols(pack_cols(q)), q)


def quantized_tiny(sym: bool, arch: str = "llama", positive_layer: bool = False):
    model = models.tiny(arch)
    if positive_layer:                                       # a group with no negative weight: zero point 0
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.abs_()
    hfaccel.accelerate_model(model, quantization={"method": "rtn", "bits": 4, "group_size": 32, "sym": sym},
                             kv_cache={"type": "dynamic"})
    return model


def layers(model) -> dict[str, Int4Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}


@pytest.mark.parametrize("fmt, sym", [("gptq", True), ("awq", True), ("awq", False)])
def test_round_trip_keeps_every_code_and_the_greedy_output(tmp_path, fmt, sym):
    model = quantized_tiny(sym)
    save_quantized(model, tmp_path, fmt)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == fmt and qc["bits"] == 4 and qc["group_size"] == 32 and qc["sym"] == sym
    tensors = load_file(str(tmp_path / "model.safetensors"))
    n, k = 64, 64                                           # tiny llama q_proj
    shapes = {"gptq": {"qweight": [k // 8, n], "qzeros": [k // 32, n // 8], "scales": [k // 32, n], "g_idx": [k]},
              "awq": {"qweight": [k, n // 8], "qzeros": [k // 32, n // 8], "scales": [k // 32, n]}}[fmt]
    for name, shape in shapes.items():
        t = tensors[f"model.layers.0.self_attn.q_proj.{name}"]
        assert list(t.shape) == shape and t.dtype == (torch.float16 if name == "scales" else torch.int32)
    loaded = load_quantized(tmp_path)
    a, b = layers(model), layers(loaded)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].codes(), b[name].codes()), name
        assert torch.equal(a[name].scales_zeros, b[name].scales_zeros), name          # exactly the same layer
    x = prompts(model.config.vocab_size, batch=2, length=9)
    assert torch.equal(greedy(loaded, x, n=8), greedy(model, x, n=8))
    assert not hfaccel.accelerate_model(loaded, "cpu-fast").noop              # and it accelerates as usual


def test_an_int8_head_is_written_as_the_float_weight_it_computes(tmp_path):
    model = models.tiny("llama", tie_word_embeddings=True)
    hfaccel.accelerate_model(model, quantization={"method": "rtn", "bits": 4, "group_size": 32,
                                                  "quantize_lm_head": True, "lm_head_bits": 8})
    save_quantized(model, tmp_path, "gptq")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["lm_head"] is False
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert not any(k.startswith("lm_head.") and k != "lm_head.weight" for k in tensors)    # no int8 buffers
    assert torch.equal(tensors["lm_head.weight"], model.lm_head.dequantize())
    loaded = load_quantized(tmp_path)
    assert isinstance(loaded.lm_head, torch.nn.Linear) and torch.equal(loaded.lm_head.weight, tensors["lm_head.weight"])
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_gptq_v1_refuses_zero_point_zero_and_padded_layers_are_refused(tmp_path):
    model = quantized_tiny(sym=False, positive_layer=True)
    with pytest.raises(CheckpointError, match=r"zero point of 0 cannot be stored in GPTQ v1"):
        save_quantized(model, tmp_path / "a", "gptq")
    model = models.tiny("llama", hidden_size=48, intermediate_size=96)   # 48 is not a multiple of 32
    hfaccel.accelerate_model(model, quantization={"method": "rtn", "bits": 4, "group_size": 32})
    with pytest.raises(CheckpointError, match=r"in_features 48 padded to groups of 32 cannot be written as gptq"):
        save_quantized(model, tmp_path / "b", "gptq")


def test_malformed_checkpoints_name_the_tensor_and_the_expected_shape(tmp_path):
    model = quantized_tiny(sym=True)
    save_quantized(model, tmp_path, "gptq")
    file = tmp_path / "model.safetensors"
    good = load_file(str(file))
    key = "model.layers.1.mlp.down_proj.scales"

    def write(tensors):
        save_file(tensors, str(file))

    write({**good, key: good[key][:1]})
    with pytest.raises(CheckpointError, match=rf"tensor {key} has shape \[1, 64\], expected \[4, 64\]"):
        load_quantized(tmp_path)
    write({k: v for k, v in good.items() if k != key.replace("scales", "qzeros")})
    with pytest.raises(CheckpointError, match=r"tensor model.layers.1.mlp.down_proj.qzeros is missing \(expected "
                                              r"shape \[4, 8\]\)"):
        load_quantized(tmp_path)
    write({**good, "model.layers.0.self_attn.q_proj.g_idx": torch.randperm(64).to(torch.int32) // 32})
    with pytest.raises(CheckpointError, match=r"g_idx is not contiguous"):
        load_quantized(tmp_path)
    write({k: v for k, v in good.items() if k != "model.norm.weight"})
    with pytest.raises(CheckpointError, match=r"tensors missing for model.norm.weight"):
        load_quantized(tmp_path)
    file.write_bytes(file.read_bytes()[:1000])                         # truncated
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file"):
        load_quantized(tmp_path)


def test_config_and_pickle_checks(tmp_path):
    with pytest.raises(CheckpointError, match=r"has no config.json"):
        load_quantized(tmp_path)
    cfg = models.tiny("llama").config.to_dict()
    for qc, message in (({"quant_method": "gptq", "bits": 8, "group_size": 32}, r"bits = 8 is not supported"),
                        ({"quant_method": "exl2", "bits": 4, "group_size": 32}, r"quant_method = 'exl2'"),
                        ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, r"version 'gemv'")):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
        with pytest.raises(CheckpointError, match=message):
            load_quantized(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 32}}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match=r"only pickle files \(pytorch_model.bin\): refused"):
        load_quantized(tmp_path)
