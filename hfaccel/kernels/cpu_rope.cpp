// Rotary position embedding of q and k in one op, with the arithmetic of Transformers' apply_rotary_pos_emb
// (rotate_half, NeoX style, optionally on the first R columns only, as Phi-3's partial rotary) op for op.
//
// Why it exists: in eager mode Transformers applies RoPE as about five tensor ops for q and five for k per layer
// (mul, the two halves' neg and cat, mul, add; Phi-3 adds slices and a cat), each a separate dispatch and pass
// over a few hundred values at decode. This is one call per layer, reading q, k, cos and sin once.
//
//   hfaccel_cpu_rope::rope(q [B, Hq, S, D], k [B, Hk, S, D], cos [Bc, S, R], sin [Bc, S, R], contiguous) -> (q', k')
//   Bc is 1 or B, R even and <= D, all four of one dtype (float32, bfloat16 or float16), every last dimension
//   contiguous (any other strides: q and k are usually transposed views of the projections' outputs).
//   For d < R: out[d] = x[d] * cos[d] + rot[d] * sin[d], rot = cat(-x[R/2:R], x[:R/2]); columns R..D-1 are copied.
//   Outputs are contiguous if asked (as the eager ops' are when they end in a cat), else laid out like q and k.
//
// Bit-identical to the eager ops: each product and the sum are rounded to the dtype, as PyTorch's CPU kernels do
// (float math, one round-to-nearest-even per op for bf16 / fp16), and this file is compiled with
// -ffp-contract=off so that the fp32 product and add never become one FMA. The negation is exact, so
// (-x) * s rounds to -(x * s) as the eager kernel's does.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

namespace {

template <typename T>
void rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3), R = cos.size(2), half = R / 2;
  const int64_t xb = x.stride(0), xh = x.stride(1), xs = x.stride(2);
  const int64_t ob = out.stride(0), oh = out.stride(1), os = out.stride(2);
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), cs = cos.stride(1);
  const int64_t sb = sin.size(0) == 1 ? 0 : sin.stride(0), ss = sin.stride(1);
  const T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* op = out.data_ptr<T>();
  // one (batch, head, position) row of D values per step; below ~16 K values a second thread costs more
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, D));
  at::parallel_for(0, B * H * S, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * S), h = (i / S) % H, s = i % S;
      const T* xr = xp + b * xb + h * xh + s * xs;
      const T* c = cp + b * cb + s * cs;
      const T* sn = sp + b * sb + s * ss;
      T* o = op + b * ob + h * oh + s * os;
      for (int64_t d = 0; d < half; ++d) {
        const T a = T(float(xr[d]) * float(c[d]));
        const T r = T(-float(xr[d + half]) * float(sn[d]));
        o[d] = T(float(a) + float(r));
      }
      for (int64_t d = half; d < R; ++d) {
        const T a = T(float(xr[d]) * float(c[d]));
        const T r = T(float(xr[d - half]) * float(sn[d]));
        o[d] = T(float(a) + float(r));
      }
      for (int64_t d = R; d < D; ++d) o[d] = xr[d];
    }
  });
}

void check(const at::Tensor& x, const at::Tensor& cos, const char* name) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "rope: ", name, " must be [B, H, S, D] with a contiguous last "
              "dimension, got sizes ", x.sizes(), " strides ", x.strides());
  TORCH_CHECK(x.scalar_type() == cos.scalar_type(), "rope: ", name, " is ", x.scalar_type(), ", cos ",
              cos.scalar_type(), " (all four must be one dtype)");
  TORCH_CHECK(cos.size(0) == 1 || cos.size(0) == x.size(0), "rope: cos has ", cos.size(0), " rows, ", name, " ",
              x.size(0));
  TORCH_CHECK(cos.size(1) == x.size(2), "rope: cos has ", cos.size(1), " positions, ", name, " ", x.size(2));
  TORCH_CHECK(cos.size(2) <= x.size(3), "rope: cos is ", cos.size(2), " wide, ", name, "'s head_dim ", x.size(3));
}

std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                        const at::Tensor& sin, bool contiguous) {
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.stride(2) == 1 && sin.stride(2) == 1,
              "rope: cos and sin must be [B or 1, S, R] of one shape with a contiguous last dimension, got ",
              cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(cos.size(2) % 2 == 0, "rope: the rotary width must be even, got ", cos.size(2));
  TORCH_CHECK(sin.scalar_type() == cos.scalar_type(), "rope: cos is ", cos.scalar_type(), ", sin ",
              sin.scalar_type());
  check(q, cos, "q");
  check(k, cos, "k");
  // the eager ops' output layout, which the caller knows (Phi-3's ends in torch.cat: contiguous); otherwise the
  // elementwise ops keep the input's dimension order, and an input that is contiguous anyway (one position)
  // comes out plainly contiguous
  auto like = [&](const at::Tensor& x) {
    return contiguous || x.is_contiguous() ? at::empty(x.sizes(), x.options()) : at::empty_like(x);
  };
  at::Tensor qo = like(q), ko = like(k);
  switch (q.scalar_type()) {
    case at::kFloat: rotate<float>(q, cos, sin, qo); rotate<float>(k, cos, sin, ko); break;
    case at::kBFloat16: rotate<c10::BFloat16>(q, cos, sin, qo); rotate<c10::BFloat16>(k, cos, sin, ko); break;
    case at::kHalf: rotate<c10::Half>(q, cos, sin, qo); rotate<c10::Half>(k, cos, sin, ko); break;
    default: TORCH_CHECK(false, "rope: q is ", q.scalar_type(), "; float32, bfloat16 or float16 expected");
  }
  return {qo, ko};
}

}  // namespace

TORCH_LIBRARY(hfaccel_cpu_rope, m) {
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, bool contiguous) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hfaccel_cpu_rope, CPU, m) {
  m.impl("rope", &rope);
}
