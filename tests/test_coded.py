"""exact_codes (hfaccel/coded.py): fp32 weights that are exactly 4-bit block codes, as Transformers makes them
from a GGUF Q4_0 / Q4_1 file, held as those codes and rebuilt bit for bit by hfaccel_cpu::coded4_mm.

The GGUF-style weights are made with the gguf package's own quantize / dequantize (the reference
implementation of the format that Transformers' GGUF loader calls), not with hfaccel's code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

import hfaccel
from hfaccel import coded, models
from hfaccel.kernels import cpu_woq
from tests.conftest import assert_compiled_greedy_equal, at_one_and_two_threads, greedy, prompts


@pytest.fixture(autouse=True)
def built(monkeypatch):
    ok, why = cpu_woq._build()
    if not ok:
        pytest.skip(f"hfaccel's CPU int kernels do not build here: {why}")
    monkeypatch.setattr(coded, "SLOWER_OK", float("inf"))     # tiny shapes time too close to call


def gguf_dense(w: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """What Transformers holds after loading `w` from a GGUF file stored as `qtype`."""
    x = w.detach().numpy().astype(np.float32)
    return torch.from_numpy(quants.dequantize(quants.quantize(x, qtype), qtype).copy())


def as_gguf(model, qtype=GGMLQuantizationType.Q4_1):
    """Give every Linear weight of `model` (but a tied head) the values a GGUF file of `qtype` would give."""
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for m in model.modules():
            if type(m) is torch.nn.Linear and m.weight is not emb and m.in_features % 32 == 0:
                m.weight.copy_(gguf_dense(m.weight, qtype))
    return model


def gguf_model(arch: str, qtype=GGMLQuantizationType.Q4_1):
    return as_gguf(models.tiny(arch), qtype), as_gguf(models.tiny(arch), qtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("qtype, zero", [(GGMLQuantizationType.Q4_1, 0), (GGMLQuantizationType.Q4_0, 8)],
                         ids=["q4_1", "q4_0"])
def test_codes_are_found_in_gguf_weights_and_rebuild_them_bit_for_bit(qtype, zero):
    torch.manual_seed(0)
    w = gguf_dense(torch.randn(48, 160) * torch.linspace(0.01, 3, 160), qtype)
    w[3, 32:64] = 0.25                                     # a block of one value (d = 0)
    found = coded.find_codes(w)
    assert found is not None
    codes, dm, z = found
    assert z == zero and codes.shape == w.shape and codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert dm.shape == (48, 5, 2) and dm.dtype == torch.float32
    assert torch.equal(bits(coded.rebuild(codes, dm, z)), bits(w))


def test_weights_without_the_structure_are_refused():
    torch.manual_seed(1)
    assert coded.find_codes(torch.randn(16, 64)) is None                    # a trained / random fp32 weight
    assert coded.find_codes(gguf_dense(torch.randn(16, 64), GGMLQuantizationType.Q8_0)) is None   # 256 levels
    w = gguf_dense(torch.randn(16, 64), GGMLQuantizationType.Q4_1)
    assert coded.find_codes(w) is not None
    w[5, 40] = torch.nextafter(w[5, 40], torch.tensor(1e9))                  # one weight one ulp off
    assert coded.find_codes(w) is None
    assert coded.find_codes(torch.randn(16, 48)) is None                     # columns not whole blocks
    assert coded.find_codes(gguf_dense(torch.randn(16, 64), GGMLQuantizationType.Q4_1).half()) is None


@pytest.mark.parametrize("zero", [0, 8])
def test_coded4_mm_rebuilds_each_weight_exactly_and_multiplies_in_fp32(zero):
    torch.manual_seed(2)
    n, k = 70, 224
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    dm = torch.stack([torch.rand(n, k // 32) * 0.02 - 0.01, torch.rand(n, k // 32) * 0.1 - 0.05], -1)
    w = coded.rebuild(codes, dm, zero)
    packed = cpu_woq.pack_int4(codes)
    eye = torch.eye(k)
    for rows in (1, 3, 4, 5, 16, 64, 65):     # 1-4: rebuilt in registers; 5-64: rebuilt into an L1 panel;
                                              # 65: rebuilt rows handed to sgemm
        for start in range(0, k, rows):
            x = eye[start:start + rows]
            got = cpu_woq.coded4_mm(x, packed, dm.contiguous(), zero)
            assert torch.equal(bits(got), bits(w.T[start:start + rows])), (rows, start)
    for rows in (1, 4, 5, 11, 40, 70):
        x = torch.randn(2, rows, k)
        got = cpu_woq.coded4_mm(x, packed, dm.contiguous(), zero)
        want = x.double() @ w.double().T
        assert got.shape == (2, rows, n)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_coded4_mm_names_bad_arguments():
    packed = torch.zeros(8, 32, dtype=torch.uint8)
    dm = torch.zeros(8, 2, 2)
    with pytest.raises(RuntimeError, match="zero must be 0 or 8, got 3"):
        cpu_woq.coded4_mm(torch.zeros(1, 64), packed, dm, 3)
    with pytest.raises(RuntimeError, match=r"dm must be contiguous float32 \[8, 2, 2\]"):
        cpu_woq.coded4_mm(torch.zeros(1, 64), packed, dm.half(), 0)
    with pytest.raises(RuntimeError, match="x has 60 columns, the weight 64"):
        cpu_woq.coded4_mm(torch.zeros(1, 60), packed, dm, 0)


def test_one_thread_and_two_give_the_same_outputs():
    torch.manual_seed(3)
    w = gguf_dense(torch.randn(1536, 576), GGMLQuantizationType.Q4_1)
    codes, dm, z = coded.find_codes(w)
    packed = cpu_woq.pack_int4(codes)
    x1, x4 = torch.randn(1, 576), torch.randn(4, 576)
    one, two = at_one_and_two_threads(lambda: (cpu_woq.coded4_mm(x1, packed, dm, z),
                                               cpu_woq.coded4_mm(x4, packed, dm, z)))
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_the_layer_keeps_the_linear_contract():
    torch.manual_seed(4)
    lin = torch.nn.Linear(96, 40)
    with torch.no_grad():
        lin.weight.copy_(gguf_dense(lin.weight, GGMLQuantizationType.Q4_1))
    layer = coded.CodedLinear.of(lin, *coded.find_codes(lin.weight))
    assert torch.equal(bits(layer.weight), bits(lin.weight))
    with torch.no_grad():
        for shape in [(96,), (1, 96), (3, 5, 96), (2, 20, 96)]:
            x = torch.randn(shape)
            torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)
        xb = torch.randn(2, 96, dtype=torch.bfloat16)                     # other dtypes: what nn.Linear does
        with pytest.raises(RuntimeError):
            lin(xb)
        with pytest.raises(RuntimeError):
            layer(xb)
    x = torch.randn(2, 96, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(2, -1).detach())
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias"} and torch.equal(bits(sd["weight"]), bits(lin.weight))
    other = torch.nn.Linear(96, 40)
    with torch.no_grad():
        other.weight.copy_(gguf_dense(other.weight, GGMLQuantizationType.Q4_0))
    layer.load_state_dict(other.state_dict())
    assert layer.zero == 8 and torch.equal(bits(layer.weight), bits(other.weight))
    with pytest.raises(RuntimeError, match=r"weight: a CodedLinear takes only a \[40, 96\] weight made of 4-bit"):
        layer.load_state_dict(torch.nn.Linear(96, 40).state_dict())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_0], ids=["q4_1", "q4_0"])
def test_greedy_equals_transformers_and_revert_gives_back_the_same_weights(arch, qtype):
    model, ref = gguf_model(arch, qtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = hfaccel.accelerate_model(model, fusion={"exact_codes": True})
    changes = [c for c in report.changes if c.feature == "exact_codes"]
    layers = [m for m in model.modules() if isinstance(m, coded.CodedLinear)]
    assert changes and all(c.reversible and c.lossless for c in changes), report
    assert len(layers) == sum(1 for m in ref.modules() if type(m) is torch.nn.Linear and m.in_features % 32 == 0
                              and m.weight is not ref.get_input_embeddings().weight)
    assert report.weight_bytes_after < report.weight_bytes_before
    for batch in (1, 4):
        ids = prompts(ref.config.vocab_size, batch=batch, length=13)
        assert torch.equal(greedy(model, ids, n=16), greedy(ref, ids, n=16))
    assert hfaccel.accelerate_model(model, fusion={"exact_codes": True}).noop       # idempotent
    hfaccel.revert_model(model)
    assert not [m for m in model.modules() if isinstance(m, coded.CodedLinear)]
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(bits(after[k]), bits(v)) for k, v in before.items()
                                             if v.dtype == torch.float32)


def test_with_the_compiled_step_and_paged_cache():
    model, ref = gguf_model("llama")
    report = hfaccel.accelerate_model(model, "cpu-fast")
    assert [c for c in report.changes if c.feature == "exact_codes"], report
    assert_compiled_greedy_equal(model, ref)


def test_a_model_without_codes_is_left_as_it_is_and_says_so():
    model = models.tiny("llama")
    report = hfaccel.accelerate_model(model, fusion={"exact_codes": True})
    assert not [c for c in report.changes if c.feature == "exact_codes"]
    assert any("no fp32 Linear weight is made of 4-bit block codes" in n for n in report.notes), report.notes
    assert not [m for m in model.modules() if isinstance(m, coded.CodedLinear)]


def test_the_default_model_is_all_codes(default_model):
    """Every Linear layer of the embedded SmolLM2 (a Q4_1 GGUF) is found; the tied head (Q8_0) is not."""
    model, _ = default_model
    found = {n: coded.find_codes(m.weight) is not None for n, m in model.named_modules()
             if type(m) is torch.nn.Linear and m.weight is not model.get_input_embeddings().weight}
    assert len(found) == 210 and all(found.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])                  # qwen2: q/k/v with biases
def test_fused_projections_of_coded_layers_share_one_coded_gemm(arch):
    model, ref = gguf_model(arch)
    report = hfaccel.accelerate_model(model, fusion={"exact_codes": True, "qkv": True, "gate_up": True})
    fused = [c for c in report.changes if c.feature == "fuse" and "CodedLinear" in c.target]
    assert len(fused) == 2 and all("1 GEMM" in c.after for c in fused), report
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.packed.data_ptr() == attn.q_proj.packed.data_ptr() + attn.q_proj.packed.numel()   # views
    for batch in (1, 3):
        ids = prompts(ref.config.vocab_size, batch=batch, length=11)
        assert torch.equal(greedy(model, ids, n=12), greedy(ref, ids, n=12))
    hfaccel.revert_model(model)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(model.state_dict().values(), ref.state_dict().values())
               if a.dtype == torch.float32)
