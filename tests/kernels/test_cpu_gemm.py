"""hfaccel's few-row GEMM (hfaccel/kernels/cpu_gemm.cpp) against a float64 x W^T + b. Skipped where the op does
not build (no compiler, no ninja)."""

from __future__ import annotations

import pytest
import torch

from hfaccel.kernels import cpu_gemm
from tests.conftest import at_one_and_two_threads


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, why = cpu_gemm.status()
    if not ok:
        pytest.skip(f"hfaccel's few-row GEMM does not build here: {why}")


def reference(x, w, b):
    y = x.double() @ w.double().T
    return (y + b.double() if b is not None else y).float()


# rows: 1-5 take the remainder kernels, 6 and 12 whole chunks of 6, 16 and 17 chunks plus a remainder;
# N = 7, 13: blocks of 4 weight rows plus single rows; K = 5, 37, 100: the masked k tail; 576 SmolLM2's width
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 12, 16, 17])
@pytest.mark.parametrize("n,k", [(7, 5), (13, 37), (64, 100), (192, 576)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64(m, n, k, bias):
    torch.manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k), torch.randn(n, k)
    b = torch.randn(n) if bias else None
    y = cpu_gemm.small_linear(x, w, b)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, reference(x, w, b), rtol=1e-5, atol=1e-4 * k ** 0.5)


def test_non_contiguous_x_and_empty_shapes():
    x = torch.randn(16, 40)[::2, :33]                       # strided rows
    w = torch.randn(9, 33)
    torch.testing.assert_close(cpu_gemm.small_linear(x, w), reference(x, w, None), rtol=1e-5, atol=1e-4)
    assert cpu_gemm.small_linear(torch.randn(0, 8), torch.randn(5, 8)).shape == (0, 5)
    b = torch.randn(5)
    torch.testing.assert_close(cpu_gemm.small_linear(torch.randn(3, 0), torch.randn(5, 0), b), b.expand(3, 5))


def test_many_threads_and_one_give_the_same_sums():
    x, w = torch.randn(16, 576), torch.randn(1536, 576)
    one, many = at_one_and_two_threads(lambda: cpu_gemm.small_linear(x, w))
    assert torch.equal(one, many)                            # each output's sum is one thread's, in k order


def test_the_fast_path_is_built_where_the_cpu_has_avx512_or_avx2():
    from hfaccel.device import cpu_flags

    flags = cpu_flags()
    assert cpu_gemm.fast_path() == ("avx512f" in flags or {"avx2", "fma"} <= flags)


def test_bad_arguments_name_what_is_wrong():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="float32 only"):
        cpu_gemm.small_linear(x.double(), w.double())
    with pytest.raises(RuntimeError, match="x has K = 8, w has K = 9"):
        cpu_gemm.small_linear(x, torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_gemm.small_linear(x, torch.randn(8, 4).T)
    with pytest.raises(RuntimeError, match="bias must be a float32 CPU tensor of 4 elements"):
        cpu_gemm.small_linear(x, w, torch.randn(5))
    with pytest.raises(RuntimeError, match=r"x \[M, K\] and w \[N, K\]"):
        cpu_gemm.small_linear(x[None], w)
