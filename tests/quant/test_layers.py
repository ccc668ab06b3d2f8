"""INT8 / INT4 layers against their own dequantized weights, on odd shapes, padding and fallback paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hfaccel.kernels import cpu_woq
from hfaccel.quant.layers import (Int4Linear, Int8Linear, int4_params, pad_columns, quantize_int4_groups,
                                  quantize_with, sqnr_db)


def linear(n: int, k: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    nn.init.normal_(lin.weight, std=0.05)
    return lin


@pytest.fixture(params=["aten", "native", "native-fp32"])
def cpu_kernel(request, monkeypatch) -> str:
    """Each test runs with aten's packed kernels and with hfaccel's own (where they build on this CPU), whose int4
    kernel has bf16 activations on a CPU with AVX-512 BF16 unless native-fp32 is asked for."""
    monkeypatch.setenv(cpu_woq.ENV, request.param)
    if request.param != "aten":
        ok, why = cpu_woq.status()
        if not ok:
            pytest.skip(f"hfaccel's CPU int kernels: {why}")
    return request.param


def close_to_dequantized(layer, x: torch.Tensor, ref_weight: torch.Tensor, bias) -> None:
    want = x @ ref_weight.T + (bias if bias is not None else 0)
    got = layer(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    if layer.kernel == cpu_woq.KERNEL:          # fp32 activations and arithmetic: only summation order differs
        assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6
    elif layer.kernel == cpu_woq.BF16_KERNEL and x.reshape(-1, x.shape[-1]).shape[0] <= 16:
        # decode sizes: x rounded to bf16, fp32 arithmetic after that
        want = x.to(torch.bfloat16).float() @ ref_weight.T + (bias if bias is not None else 0)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6
    else:                                       # activations go through bf16 around aten's packed kernels
        assert (got - want).abs().max() <= 2e-2 * want.abs().max() + 1e-3


@pytest.mark.parametrize("n, k, bias", [(576, 576, False), (48, 200, True), (7, 33, True)])
def test_int8_linear(n, k, bias, cpu_kernel):
    lin = linear(n, k, bias)
    layer = Int8Linear.from_linear(lin)
    assert layer.qweight.dtype == torch.int8
    assert layer.kernel == ("int8pack" if cpu_kernel == "aten" else cpu_woq.KERNEL)
    assert sqnr_db(lin.weight, layer.dequantize()) > 38
    x = torch.randn(2, 5, k)                                   # 3-D input
    close_to_dequantized(layer, x, layer.dequantize(), lin.bias)


@pytest.mark.parametrize("n, k, g, sym", [(64, 128, 32, True), (192, 576, 64, False), (32, 576, 128, True),
                                          (48, 72, 32, True), (24, 64, 32, False)])
def test_int4_linear_codes_padding_and_kernels(n, k, g, sym, cpu_kernel):
    lin = linear(n, k)
    layer = Int4Linear.from_linear(lin, g, sym)
    assert layer.padded == (-k) % g
    if cpu_kernel == "aten":
        assert layer.kernel == ("int4pack_cpu" if n % 16 == 0 else "dequant")
    else:                                       # hfaccel's kernels take any number of rows
        assert layer.kernel == (cpu_woq.KERNEL if cpu_kernel == "native-fp32" else cpu_woq.int4_kernel())
    w = pad_columns(lin.weight.detach(), g)
    q, scale, zero = quantize_int4_groups(w, g, sym)
    # codes as stored; the stored scales are bf16, codes were computed with the same fp32 ones
    assert torch.equal(layer.codes(), q)
    s = scale.to(torch.bfloat16).float().T.repeat_interleave(g, 1)
    z = zero.to(torch.bfloat16).float().T.repeat_interleave(g, 1)
    torch.testing.assert_close(layer.dequantize(), ((q.float() - 8) * s + z)[:, :k])
    assert sqnr_db(lin.weight, layer.dequantize()) > 16
    x = torch.randn(3, 4, k)
    close_to_dequantized(layer, x, layer.dequantize(), lin.bias)


def test_int4_sym_and_asym_grids():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.25] * 8])                 # one row, one group of 32
    scale, zero = int4_params(w, 32, sym=True)
    assert zero.abs().max() == 0 and torch.allclose(scale, torch.tensor([[1 / 7.5]]), rtol=4e-3)   # bf16
    q = quantize_with(w, scale, zero, 32)
    deq = (q.float() - 8) * scale                                   # symmetric: zero point 8, no offset
    assert (deq - w).abs().max() <= scale.max() / 2 + 1e-6
    scale, zero = int4_params(w, 32, sym=False)                      # [lo, hi] = [-1, 0.25] over 15 steps
    q = quantize_with(w, scale, zero, 32)
    assert q[0, 0] == 0 and q[0, 3] == 15


def test_group_size_is_validated():
    with pytest.raises(ValueError, match=r"group_size = 48 is not allowed; allowed: 32, 64, 128"):
        Int4Linear(torch.zeros(16, 96, dtype=torch.uint8), torch.ones(2, 16), torch.zeros(2, 16), 48)


@pytest.mark.parametrize("make", [lambda lin: Int8Linear.from_linear(lin), lambda lin: Int4Linear.from_linear(lin, 64)],
                         ids=["int8", "int4"])
@pytest.mark.parametrize("shape", [(1, 576), (3, 576), (2, 3, 576)])
def test_bf16_input_takes_the_direct_kernel_path_with_the_general_paths_result(make, shape, monkeypatch):
    monkeypatch.setenv(cpu_woq.ENV, "aten")      # aten's kernels: hfaccel's own take any input one way
    lin = linear(192, 576, bias=False)
    layer = make(lin)
    x = torch.randn(*shape).to(torch.bfloat16)
    calls = []
    general = layer._matmul
    layer._matmul = lambda x2: calls.append(x2) or general(x2)
    got = layer(x)
    assert not calls, "bf16 input without bias or padding should go straight to the kernel"
    want = layer(x.float())                       # the general path: cast, kernel, cast back
    assert len(calls) == 1
    assert got.dtype == torch.bfloat16 and got.shape == (*shape[:-1], 192)
    assert torch.equal(got, want.to(torch.bfloat16))
    # with a bias, or padded columns, bf16 input still goes the general way
    biased = make(linear(192, 576, bias=True))
    biased._matmul = lambda x2, f=biased._matmul: calls.append(x2) or f(x2)
    biased(x)
    assert len(calls) == 2


@pytest.mark.parametrize("make", [lambda lin: Int8Linear.from_linear(lin), lambda lin: Int4Linear.from_linear(lin, 64)],
                         ids=["int8", "int4"])
def test_native_kernel_layers_take_bf16_and_fp32_input_alike(make, monkeypatch):
    monkeypatch.setenv(cpu_woq.ENV, "native")
    ok, why = cpu_woq.status()
    if not ok:
        pytest.skip(f"hfaccel's CPU int kernels: {why}")
    layer = make(linear(40, 100, bias=True))                   # padded columns, a bias, 3-D input
    assert layer.kernel in cpu_woq.NATIVE and layer.padded
    x = torch.randn(2, 3, 100).to(torch.bfloat16)
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 40)
    want = x.float() @ layer.dequantize().T + layer.bias       # bf16 x widens exactly; only the output rounds
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
