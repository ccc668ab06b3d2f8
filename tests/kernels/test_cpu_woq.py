"""hfaccel's own int8 / int4 CPU kernels (hfaccel/kernels/cpu_woq.cpp) against float64 references.

The references are written here from the layout's definition (loops over bytes and nibbles), not with the
module's pack/unpack helpers. Skipped where the kernels do not build (no AVX-512F, no compiler).
"""

from __future__ import annotations

import pytest
import torch

from hfaccel.kernels import cpu_woq
from tests.conftest import at_one_and_two_threads


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, why = cpu_woq._build()
    if not ok:
        pytest.skip(f"hfaccel's CPU int kernels do not build here: {why}")


def reference_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Byte j of each 32 columns: low nibble = column j, high nibble = column 16 + j."""
    n, half = packed.shape
    out = torch.zeros(n, half * 2, dtype=torch.uint8)
    for r in range(n):
        for b in range(half):
            block, j = divmod(b, 16)
            byte = int(packed[r, b])
            out[r, block * 32 + j] = byte & 0xF
            out[r, block * 32 + 16 + j] = byte >> 4
    return out


def test_pack_int4_matches_the_layout_definition_and_round_trips():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    packed = cpu_woq.pack_int4(codes)
    assert packed.shape == (5, 48) and packed.dtype == torch.uint8
    assert torch.equal(reference_unpack(packed), codes)
    assert torch.equal(cpu_woq.unpack_int4(packed), codes)
    with pytest.raises(ValueError, match="multiple of 32 columns, got 40"):
        cpu_woq.pack_int4(codes[:, :40])


# M = 1..4 take the register-tiled GEMV with every remainder (4, 2, 1); 17 and 40 the blocked sgemm path
@pytest.mark.parametrize("m", [1, 2, 3, 5, 17, 40])
@pytest.mark.parametrize("n, k, kq", [(7, 33, 48), (64, 576, 576), (130, 200, 208)])
def test_int8_mm_against_float64(m, n, k, kq):
    torch.manual_seed(m * 1000 + n)
    q = torch.randint(-127, 128, (n, kq), dtype=torch.int8)
    scales = torch.rand(n) * 0.01 + 1e-3
    x = torch.randn(m, k)
    want = x.double() @ (q[:, :k].double() * scales.double()[:, None]).T
    got = cpu_woq.int8_mm(x, q, scales)
    assert got.shape == (m, n) and got.dtype == torch.float32
    # fp32 sums of a few hundred products: errors scale with the largest output, not each one
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def int4_case(m: int, n: int, k: int, g: int, seed: int):
    """Random codes, bf16 scales and zeros, x: (x, packed, scales_zeros, the float64 weight [n, k])."""
    torch.manual_seed(seed)
    kp = -(-k // g) * g                               # the weight covers whole groups; x may be narrower
    codes = torch.randint(0, 16, (n, kp), dtype=torch.uint8)
    scales = (torch.rand(kp // g, n) * 0.02 + 1e-3).to(torch.bfloat16)
    zeros = (torch.randn(kp // g, n) * 0.05).to(torch.bfloat16)
    w = ((codes.double() - 8) * scales.double().T.repeat_interleave(g, 1)
         + zeros.double().T.repeat_interleave(g, 1))
    packed = torch.zeros(n, kp // 2, dtype=torch.uint8)           # packed by hand, from the definition
    for b in range(kp // 2):
        block, j = divmod(b, 16)
        packed[:, b] = codes[:, block * 32 + j] | (codes[:, block * 32 + 16 + j] << 4)
    return torch.randn(m, k), packed, torch.stack([scales, zeros], dim=-1).contiguous(), w[:, :k]


@pytest.mark.parametrize("m", [1, 3, 4, 6, 20])
@pytest.mark.parametrize("n, k, g", [(9, 64, 32), (64, 576, 64), (33, 256, 128), (16, 100, 32)])
def test_int4_mm_against_float64(m, n, k, g):
    x, packed, sz, w = int4_case(m, n, k, g, seed=m * 1000 + n)
    want = x.double() @ w.T
    got = cpu_woq.int4_mm(x, packed, sz, g)
    assert got.shape == (m, n)
    # fp32 sums of a few hundred products: errors scale with the largest output, not each one
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


needs_bf16_dot = pytest.mark.skipif(not cpu_woq._bf16_dot(), reason="this CPU has no AVX-512 BF16")


# M = 1..16 take the bf16 kernel in tiles of 2 and 1; 17 goes to int4_mm. K = 608 and 96 end in half a 64-column
# chunk, N = 9 and 37 in a tile of fewer than 4 rows, groups of 32 split a chunk's lanes between two groups
@needs_bf16_dot
@pytest.mark.parametrize("m", [1, 2, 3, 16, 17])
@pytest.mark.parametrize("n, k, g", [(9, 64, 32), (64, 576, 64), (33, 256, 128), (37, 608, 32), (16, 96, 32),
                                     (40, 100, 64)])
def test_int4_bf16_mm_against_float64_with_bf16_activations(m, n, k, g):
    x, packed, sz, w = int4_case(m, n, k, g, seed=m * 1000 + n)
    szt = sz.transpose(0, 1).contiguous()
    got = cpu_woq.int4_bf16_mm(x, packed, szt, g)
    assert got.shape == (m, n) and got.dtype == torch.float32
    xr = x if m > 16 else x.to(torch.bfloat16)                   # decode sizes round x to bf16, nothing else
    want = xr.double() @ w.T
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    got16 = cpu_woq.int4_bf16_mm(x.to(torch.bfloat16), packed, szt, g)   # bf16 in, bf16 out
    assert got16.dtype == torch.bfloat16
    if m <= 16:
        torch.testing.assert_close(got16, got.to(torch.bfloat16), rtol=0, atol=0)


def bf16_prefill(on: bool) -> bool:
    """Set the kernels' bf16-prefill switch; returns what it was."""
    return torch.ops.hfaccel_cpu.set_bf16_prefill(on)


def test_the_bf16_prefill_switch_follows_the_policy():
    now = bf16_prefill(False)
    bf16_prefill(now)
    assert now == cpu_woq.bf16_prefill() == (cpu_woq._bf16_dot() and cpu_woq.requested() != "native-fp32")


# 63 rows stay fp32, 64+ take the bf16 GEMM; N = 1900 at K = 576 spans two blocks of rows (1808 + 92)
@pytest.mark.parametrize("m", [63, 64, 100])
@pytest.mark.parametrize("op", ["int8_mm", "int4_mm", "int4_bf16_mm"])
@pytest.mark.parametrize("n", [96, 1900])
def test_prefill_sized_calls_round_x_and_the_sums_to_bf16_when_switched_on(m, op, n):
    if op == "int4_bf16_mm" and not cpu_woq._bf16_dot():
        pytest.skip("this CPU has no AVX-512 BF16")
    k = 576
    if op == "int8_mm":
        torch.manual_seed(m + n)
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        scales = torch.rand(n) * 0.01 + 1e-3
        x, args = torch.randn(m, k), (q, scales)
        w, w16 = q.double() * scales.double()[:, None], q.double()            # int8 codes are exact in bf16
        post = scales.double()
    else:
        x, packed, sz, w = int4_case(m, n, k, 64, seed=m + n)
        args = (packed, sz.transpose(0, 1).contiguous() if op == "int4_bf16_mm" else sz, 64)
        w16, post = w.float().to(torch.bfloat16).double(), torch.ones(n, dtype=torch.float64)
    fn = getattr(cpu_woq, op)
    exact = x.double() @ w.T
    before = bf16_prefill(True)
    try:
        on = fn(x, *args).double()
        bf16_prefill(False)
        off = fn(x, *args).double()
    finally:
        bf16_prefill(before)
    tight = dict(rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    torch.testing.assert_close(off, exact, **tight)
    if m < 64:
        torch.testing.assert_close(on, exact, **tight)
        return
    # x and the weights rounded to bf16, products summed in fp32, each sum rounded to bf16, then scaled
    want = ((x.to(torch.bfloat16).double() @ w16.T).to(torch.bfloat16).double()) * post
    torch.testing.assert_close(on, want, rtol=2 ** -7, atol=1e-3 * want.abs().max().item())
    assert (on - exact).abs().max() > 1e-4 * exact.abs().max()                  # it really ran in bf16


@needs_bf16_dot
def test_int4_bf16_mm_checks_the_transposed_scales():
    x, packed, sz, _ = int4_case(1, 8, 64, 32, seed=0)
    with pytest.raises(RuntimeError, match=r"szt must be contiguous bfloat16 \[8, 2, 2\] \(each row's scale/zero "
                                           r"pairs\), got BFloat16 \[2, 8, 2\]"):
        cpu_woq.int4_bf16_mm(x, packed, sz, 32)                 # aten's [G, N, 2] layout


@pytest.mark.parametrize("m", [1, 4])
def test_many_threads_and_one_give_the_same_outputs(m):
    # the rows of the weight are split between threads (shapes past the kernels' grain), each output one thread's
    # sum in k order: under `pytest -n 2` each worker runs one thread, so this test asks for two itself
    torch.manual_seed(m)
    n, k, g = 1536, 576, 64
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scales = torch.rand(n) * 0.01
    packed = cpu_woq.pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8))
    sz = torch.stack([torch.rand(k // g, n) * 0.02, torch.randn(k // g, n) * 0.05], dim=-1).to(torch.bfloat16)
    x = torch.randn(m, k)
    sz = sz.contiguous()
    szt = sz.transpose(0, 1).contiguous()
    outs = at_one_and_two_threads(
        lambda: (cpu_woq.int8_mm(x, q, scales), cpu_woq.int4_mm(x, packed, sz, g),
                 *([cpu_woq.int4_bf16_mm(x, packed, szt, g)] if cpu_woq._bf16_dot() else [])))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_leading_dims_and_bf16_input():
    torch.manual_seed(1)
    q = torch.randint(-127, 128, (24, 64), dtype=torch.int8)
    scales = torch.rand(24) * 0.01
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    got = cpu_woq.int8_mm(x, q, scales)
    assert got.shape == (2, 3, 24) and got.dtype == torch.bfloat16
    want = cpu_woq.int8_mm(x.float().reshape(6, 64), q, scales).reshape(2, 3, 24)
    assert torch.equal(got, want.to(torch.bfloat16))


def test_bad_arguments_name_what_is_wrong():
    q = torch.zeros(8, 32, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="x has 40 columns, the weight only 32"):
        cpu_woq.int8_mm(torch.zeros(1, 40), q, torch.ones(8))
    with pytest.raises(RuntimeError, match=r"scales must be float32 \[8\]"):
        cpu_woq.int8_mm(torch.zeros(1, 32), q, torch.ones(4))
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        cpu_woq.int8_mm(torch.zeros(1, 32, dtype=torch.float64), q, torch.ones(8))
    packed = torch.zeros(8, 32, dtype=torch.uint8)                 # 64 codes per row
    with pytest.raises(RuntimeError, match="group_size must be 32, 64 or 128, got 48"):
        cpu_woq.int4_mm(torch.zeros(1, 64), packed, torch.ones(1, 8, 2, dtype=torch.bfloat16), 48)
    with pytest.raises(RuntimeError, match=r"scales_zeros must be contiguous bfloat16 \[2, 8, 2\], got Float \[1, 8, 2\]"):
        cpu_woq.int4_mm(torch.zeros(1, 64), packed, torch.ones(1, 8, 2), 32)


def test_the_ops_compile_into_one_graph():
    torch.manual_seed(2)
    q = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    scales = torch.rand(16) * 0.01
    packed = cpu_woq.pack_int4(torch.randint(0, 16, (16, 64), dtype=torch.uint8))
    sz = torch.rand(1, 16, 2).to(torch.bfloat16)

    bf16_dot = cpu_woq._bf16_dot()

    def f(x):
        y = torch.relu(cpu_woq.int8_mm(x, q, scales)) @ torch.ones(16, 64) + cpu_woq.int4_mm(x, packed, sz, 64).sum()
        if bf16_dot:
            y = y + cpu_woq.int4_bf16_mm(x, packed, sz.transpose(0, 1).contiguous(), 64).sum()
        return y

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(1, 3, 64)
    torch.testing.assert_close(compiled(x), f(x))


def test_policy_follows_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_woq.ENV, "aten")
    assert cpu_woq.status() == (False, f"{cpu_woq.ENV}=aten")
    assert not cpu_woq.use_native(torch.device("cpu"))
    monkeypatch.setenv(cpu_woq.ENV, "native")
    assert cpu_woq.status()[0] and cpu_woq.use_native(torch.device("cpu"))
    assert not cpu_woq.use_native(torch.device("meta"))
    assert cpu_woq.int4_kernel() == (cpu_woq.BF16_KERNEL if cpu_woq._bf16_dot() else cpu_woq.KERNEL)
    monkeypatch.setenv(cpu_woq.ENV, "native-fp32")
    assert cpu_woq.status()[0] and cpu_woq.int4_kernel() == cpu_woq.KERNEL
    monkeypatch.setenv(cpu_woq.ENV, "fastest")
    with pytest.raises(ValueError, match=r"HFACCEL_CPU_QUANT_KERNEL='fastest' is not allowed; allowed: auto, native, native-fp32, aten"):
        cpu_woq.status()
