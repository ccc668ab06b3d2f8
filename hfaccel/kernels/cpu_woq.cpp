// Weight-only int8 / int4 matmul for x86 CPUs with AVX-512F, fp32 arithmetic.
//
// Why it exists: aten's _weight_int8pack_mm / _weight_int4pack_mm_for_cpu are fast only with bf16
// activations, and on a CPU without AVX-512 BF16 / AMX the bf16 conversions run in software, so the int
// layers there barely beat an fp32 nn.Linear at batch 1 (measured on an Ice Lake: int8 1.3-1.9x cold). At
// decode sizes a weight-only GEMV is bound by reading the weights; these kernels read the 1- or 1/2-byte
// codes once, widen them to fp32 in registers and accumulate in fp32 (activations are not rounded at all).
//
// x may have any leading dimensions ([..., K] -> [..., N]); M below is their product.
//   hfaccel_cpu::int8_mm(x [M, K] f32|bf16, q [N, Kq] int8 (Kq >= K), scales [N] f32) -> [M, N]
//       y[m, n] = scales[n] * sum_k x[m, k] * q[n, k]
//   hfaccel_cpu::int4_mm(x [M, K], packed [N, Kp / 2] uint8, scales_zeros [G, N, 2] bf16, gs)
//       w[n, k] = (code[n, k] - 8) * scale[g, n] + zero[g, n] with g = k / gs; K <= Kp = G * gs. The scale and
//       zero are the bf16 pair aten's int4 kernels read, so one layer's buffers serve either kernel.
//       Within each 32 columns, byte j of a row holds code[j] in its low nibble and code[16 + j] in its high
//       one, so both nibbles of 16 bytes widen into two registers of 16 consecutive columns.
//
// For M <= kSmallM the codes are widened once per tile of up to 4 rows of x. For larger M (prefill) a block
// of rows is dequantized to fp32 and multiplied by the BLAS sgemm, whose blocking beats a GEMV loop there.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kSmallM = 16;
constexpr int kPrefetchBlocks = 2;   // blocks of rows read ahead: the hardware prefetcher alone left these
                                     // loops at about half of the memory bandwidth (measured)

// Rows a thread takes at least: below ~64 K codes per thread, waking a second thread costs more than it saves.
int64_t grain(int64_t K, int64_t M) { return std::max<int64_t>(16, (int64_t(1) << 16) / std::max<int64_t>(1, K * M)); }

template <int MT, int NR>
inline void int8_block(const float* x, int64_t K, const int8_t* q, int64_t Kq, const float* s, float* y,
                       int64_t N, int64_t n) {
  const int64_t Kv = K - K % 16;
  __m512 acc[MT][NR];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kv; k += 16) {
    __m512 w[NR];
    for (int r = 0; r < NR; ++r)
      _mm_prefetch((const char*)(q + (n + NR * kPrefetchBlocks + r) * Kq + k), _MM_HINT_T0);
    for (int r = 0; r < NR; ++r)
      w[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + (n + r) * Kq + k))));
    for (int m = 0; m < MT; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(w[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) {
      float t = _mm512_reduce_add_ps(acc[m][r]);
      const int8_t* qr = q + (n + r) * Kq;
      for (int64_t k = Kv; k < K; ++k) t += (float)qr[k] * x[m * K + k];
      y[m * N + n + r] = t * s[n + r];
    }
}

template <int MT>
void int8_rows(const float* x, int64_t K, const int8_t* q, int64_t Kq, const float* s, float* y, int64_t N,
               int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) int8_block<MT, 4>(x, K, q, Kq, s, y, N, n);
  for (; n < n1; ++n) int8_block<MT, 1>(x, K, q, Kq, s, y, N, n);
}

inline float scale_of(const at::BFloat16* sz, int64_t N, int64_t g, int64_t n) { return sz[(g * N + n) * 2]; }
// w = (q - 8) * s + z = q * s + (z - 8 s): the offset that multiplies the group's sum of x
inline float offset_of(const at::BFloat16* sz, int64_t N, int64_t g, int64_t n) {
  return float(sz[(g * N + n) * 2 + 1]) - 8.f * float(sz[(g * N + n) * 2]);
}

template <int MT, int NR, int GS>
inline void int4_block(const float* x, const float* xs, int64_t Kp, const uint8_t* p, const at::BFloat16* sz,
                       int64_t G, float* y, int64_t N, int64_t n) {
  const int64_t rs = Kp / 2;
  __m512 acc[MT][NR];
  float bias[MT][NR] = {};
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi32(15);
  for (int64_t g = 0; g < G; ++g) {
    __m512 gacc[MT][NR];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < NR; ++r) gacc[m][r] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int kk = 0; kk < GS; kk += 32) {
      const int64_t k = g * GS + kk;
      __m512 lo[NR], hi[NR];
      for (int r = 0; r < NR; ++r)
        _mm_prefetch((const char*)(p + (n + NR * kPrefetchBlocks + r) * rs + k / 2), _MM_HINT_T0);
      for (int r = 0; r < NR; ++r) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + (n + r) * rs + k / 2)));
        lo[r] = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
        hi[r] = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
      }
      for (int m = 0; m < MT; ++m) {
        const __m512 x0 = _mm512_loadu_ps(x + m * Kp + k), x1 = _mm512_loadu_ps(x + m * Kp + k + 16);
        for (int r = 0; r < NR; ++r) {
          gacc[m][r] = _mm512_fmadd_ps(lo[r], x0, gacc[m][r]);
          gacc[m][r] = _mm512_fmadd_ps(hi[r], x1, gacc[m][r]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 c = _mm512_set1_ps(scale_of(sz, N, g, n + r));
      const float o = offset_of(sz, N, g, n + r);
      for (int m = 0; m < MT; ++m) {
        acc[m][r] = _mm512_fmadd_ps(gacc[m][r], c, acc[m][r]);
        bias[m][r] += o * xs[m * G + g];
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) y[m * N + n + r] = _mm512_reduce_add_ps(acc[m][r]) + bias[m][r];
}

template <int MT, int GS>
void int4_rows(const float* x, const float* xs, int64_t Kp, const uint8_t* p, const at::BFloat16* sz, int64_t G,
               float* y, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) int4_block<MT, 4, GS>(x, xs, Kp, p, sz, G, y, N, n);
  for (; n < n1; ++n) int4_block<MT, 1, GS>(x, xs, Kp, p, sz, G, y, N, n);
}

template <int GS>
void int4_small(const float* x, const float* xs, int64_t M, int64_t Kp, const uint8_t* p, const at::BFloat16* sz,
                int64_t G, float* y, int64_t N) {
  at::parallel_for(0, N, grain(Kp / 2, M), [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) int4_rows<4, GS>(x + m * Kp, xs + m * G, Kp, p, sz, G, y + m * N, N, n0, n1);
    for (; m + 2 <= M; m += 2) int4_rows<2, GS>(x + m * Kp, xs + m * G, Kp, p, sz, G, y + m * N, N, n0, n1);
    for (; m < M; ++m) int4_rows<1, GS>(x + m * Kp, xs + m * G, Kp, p, sz, G, y + m * N, N, n0, n1);
  });
}

// [..., K] -> [M, K] fp32 contiguous, and the output shape [..., N].
std::pair<at::Tensor, std::vector<int64_t>> as_rows(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return {x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous(), shape};
}

// Large M: y[:, rows] = x @ dequantize(rows).T, one block of rows (~4 MB of fp32) at a time.
template <typename Dequant>
at::Tensor blocked_sgemm(const at::Tensor& xf, int64_t N, int64_t K, Dequant dequant) {
  const int64_t M = xf.size(0);
  const int64_t nb = std::min<int64_t>(N, std::max<int64_t>(64, ((int64_t(1) << 20) / K) / 16 * 16));
  // one buffer per calling thread, kept (<= 4 MB): a fresh 4 MB allocation is a fresh mmap whose page faults
  // cost about as much as the dequantization itself
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.numel() < nb * K) buffer = at::empty({nb * K}, xf.options());
  if (nb == N) {
    float* wp = buffer.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) dequant(r, wp + r * K);
    });
    return at::mm(xf, buffer.narrow(0, 0, N * K).view({N, K}).t());
  }
  auto y = at::empty({M, N}, xf.options());
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t rows = std::min(nb, N - n0);
    auto wb = buffer.narrow(0, 0, rows * K).view({rows, K});
    float* wp = wb.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) dequant(n0 + r, wp + r * K);
    });
    y.narrow(1, n0, rows).copy_(at::mm(xf, wb.t()));
  }
  return y;
}

void check_x(const at::Tensor& x, int64_t width, const char* what) {
  TORCH_CHECK(x.dim() >= 1, what, ": x must have at least 1 dimension");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, what,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(-1) <= width, what, ": x has ", x.size(-1), " columns, the weight only ", width);
  TORCH_CHECK(x.device().is_cpu(), what, ": CPU tensors only");
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "int8_mm: q must be a contiguous int8 [N, K] matrix");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == q.size(0),
              "int8_mm: scales must be float32 [", q.size(0), "]");
  check_x(x, q.size(1), "int8_mm");
  const auto [xf, shape] = as_rows(x, q.size(0));
  const int64_t M = xf.size(0), K = xf.size(1), N = q.size(0), Kq = q.size(1);
  const float* xp = xf.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  at::Tensor y;
  if (M > kSmallM) {
    y = blocked_sgemm(xf, N, K, [&](int64_t n, float* out) {
      const int8_t* qr = qp + n * Kq;
      const float s = sp[n];
      const __m512 sv = _mm512_set1_ps(s);
      int64_t k = 0;
      for (; k + 16 <= K; k += 16)
        _mm512_storeu_ps(out + k, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                    _mm_loadu_si128((const __m128i*)(qr + k)))), sv));
      for (; k < K; ++k) out[k] = (float)qr[k] * s;
    });
  } else {
    y = at::empty({M, N}, xf.options());
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, grain(K, M), [&](int64_t n0, int64_t n1) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) int8_rows<4>(xp + m * K, K, qp, Kq, sp, yp + m * N, N, n0, n1);
      for (; m + 2 <= M; m += 2) int8_rows<2>(xp + m * K, K, qp, Kq, sp, yp + m * N, N, n0, n1);
      for (; m < M; ++m) int8_rows<1>(xp + m * K, K, qp, Kq, sp, yp + m * N, N, n0, n1);
    });
  }
  y = y.view(shape);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros,
                   int64_t group_size) {
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
              "int4_mm: group_size must be 32, 64 or 128, got ", group_size);
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "int4_mm: packed must be a contiguous uint8 [N, K / 2] matrix");
  const int64_t N = packed.size(0), Kp = packed.size(1) * 2, G = Kp / group_size;
  TORCH_CHECK(Kp % group_size == 0, "int4_mm: packed has ", Kp, " columns of codes, not a multiple of group_size ", group_size);
  const auto& sz_ = scales_zeros;
  TORCH_CHECK(sz_.scalar_type() == at::kBFloat16 && sz_.is_contiguous() && sz_.dim() == 3 && sz_.size(0) == G &&
              sz_.size(1) == N && sz_.size(2) == 2,
              "int4_mm: scales_zeros must be contiguous bfloat16 [", G, ", ", N, ", 2], got ", sz_.scalar_type(), " ",
              sz_.sizes());
  check_x(x, Kp, "int4_mm");
  auto [xf, shape] = as_rows(x, N);
  if (xf.size(1) < Kp) xf = at::constant_pad_nd(xf, {0, Kp - xf.size(1)});
  const int64_t M = xf.size(0);
  const float* xp = xf.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const at::BFloat16* sz = scales_zeros.data_ptr<at::BFloat16>();
  at::Tensor y;
  if (M > kSmallM) {
    y = blocked_sgemm(xf, N, Kp, [&](int64_t n, float* out) {
      const uint8_t* pr = pp + n * (Kp / 2);
      const __m512i low = _mm512_set1_epi32(15);
      for (int64_t k = 0; k < Kp; k += 32) {
        const __m512 c = _mm512_set1_ps(scale_of(sz, N, k / group_size, n));
        const __m512 o = _mm512_set1_ps(offset_of(sz, N, k / group_size, n));
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(pr + k / 2)));
        _mm512_storeu_ps(out + k, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), c, o));
        _mm512_storeu_ps(out + k + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), c, o));
      }
    });
  } else {
    std::vector<float> xs(M * G);       // per-group sums of x: the offsets' share of each output
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        float t = 0.f;
        for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) t += xp[m * Kp + k];
        xs[m * G + g] = t;
      }
    y = at::empty({M, N}, xf.options());
    float* yp = y.data_ptr<float>();
    if (group_size == 32) int4_small<32>(xp, xs.data(), M, Kp, pp, sz, G, yp, N);
    else if (group_size == 64) int4_small<64>(xp, xs.data(), M, Kp, pp, sz, G, yp, N);
    else int4_small<128>(xp, xs.data(), M, Kp, pp, sz, G, yp, N);
  }
  y = y.view(shape);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(hfaccel_cpu, m) {
  m.def("int8_mm(Tensor x, Tensor q, Tensor scales) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor packed, Tensor scales_zeros, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(hfaccel_cpu, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
}
