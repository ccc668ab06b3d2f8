"""Triton RMSNorm / RoPE / SwiGLU against the torch references, odd shapes, per-dtype tolerances: on CPU in
Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported: a subprocess), on CUDA when present."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from hfaccel.cache.attention import triton_available
from hfaccel.kernels import reference as ref

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

CHECKS = textwrap.dedent("""
    import torch
    from hfaccel.kernels import reference as ref, triton_ops as tri

    TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}

    def close(a, b, dtype):
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)

    def run(device, dtypes):
        g = torch.Generator().manual_seed(0)
        n = 0
        for dtype in dtypes:
            for rows, width in ((1, 576), (7, 33), (3, 1000)):                     # odd widths, not powers of 2
                x = (torch.randn(rows, width, generator=g) * 3).to(device, dtype)
                r = torch.randn(rows, width, generator=g).to(device, dtype)
                w = torch.randn(width, generator=g).to(device, dtype)
                for residual in (None, r):
                    for plus_one in (False, True):
                        got, got_h = tri.rms_norm(x, w, 1e-6, residual, plus_one)
                        want, want_h = ref.rms_norm(x, w, 1e-6, residual, plus_one)
                        close(got, want, dtype); close(got_h, want_h, dtype); n += 1
            for b, h, hk, s, d in ((1, 9, 3, 1, 64), (2, 3, 1, 5, 10), (1, 2, 2, 17, 128)):
                q = torch.randn(b, h, s, d, generator=g).to(device, dtype)
                k = torch.randn(b, hk, s, d, generator=g).to(device, dtype)
                ang = torch.randn(b, s, d // 2, generator=g)
                cos = torch.cat([ang.cos(), ang.cos()], -1).to(device, dtype)
                sin = torch.cat([ang.sin(), ang.sin()], -1).to(device, dtype)
                (gq, gk), (wq, wk) = tri.rope(q, k, cos, sin), ref.rope(q, k, cos, sin)
                close(gq, wq, dtype); close(gk, wk, dtype); n += 1
            for shape in ((1, 1536 * 2), (2, 3, 2 * 37), (5, 2 * 2500)):
                gu = (torch.randn(*shape, generator=g) * 4).to(device, dtype)
                close(tri.swiglu(gu), ref.swiglu(gu), dtype); n += 1
        return n
""")


@needs_triton
def test_kernels_in_the_interpreter_match_the_references():
    script = CHECKS + "\nprint('ok', run('cpu', [torch.float32, torch.float16]))\n"
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok 36"


@pytest.mark.gpu
@needs_triton
def test_kernels_on_cuda_match_the_references():
    scope: dict = {}
    exec(CHECKS, scope)
    assert scope["run"]("cuda", [torch.float32, torch.float16, torch.bfloat16]) == 54


def test_references_agree_with_transformers():
    g = torch.Generator().manual_seed(1)
    norm = LlamaRMSNorm(40, eps=1e-6)
    norm.weight.data = torch.randn(40, generator=g)
    x = torch.randn(3, 5, 40, generator=g)
    assert torch.equal(ref.rms_norm(x, norm.weight, 1e-6)[0], norm(x))
    q, k = torch.randn(2, 4, 6, 16, generator=g), torch.randn(2, 2, 6, 16, generator=g)
    ang = torch.randn(2, 6, 8, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    got = ref.rope(q, k, cos, sin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
