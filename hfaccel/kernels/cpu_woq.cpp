// Weight-only int8 / int4 matmul for x86 CPUs with AVX-512F or AVX2 + FMA, fp32 arithmetic.
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
//       one, so both nibbles of 16 bytes widen into registers of consecutive columns (two of 16 with AVX-512,
//       four of 8 with AVX2).
//
// For M <= kSmallM the codes are widened once per tile of up to 4 rows of x (2 with AVX2). For larger M (prefill) a block
// of rows is dequantized to fp32 and multiplied by the BLAS sgemm, whose blocking beats a GEMV loop there.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include "simd.h"

#include <atomic>
#include <cstdint>
#include <type_traits>

namespace {

// One SIMD register of fp32 lanes, for the instruction set this file is compiled for (cpu_woq.py passes
// -mavx512f where the CPU has it, else -mavx2 -mfma). Each step of the loops below reads 16 bytes of one
// weight row (16 int8 codes, or 32 int4 codes) and widens them in V = 16 / W parts v of W lanes each.
#if !defined(HFACCEL_SIMD_F32)
#error "cpu_woq.cpp needs AVX-512F, or AVX2 and FMA"
#elif defined(__AVX512F__)
struct Isa : hfaccel_simd::F32 {
  // register tiles (rows of x, rows of the weight): 32 zmm registers hold 4 x 4 accumulators and the weights
  static constexpr int kMT = 4, kNR8 = 4, kNR4 = 4;
  // int8 codes p[16 v .. 16 v + 15] -> floats
  static F i8(const int8_t* p, int v) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16 * v))));
  }
  // bytes p[16 v .. 16 v + 15] of int4 codes (32 columns) -> lo: the low nibbles (columns 0..15), hi: the
  // high ones (16..31)
  static void u4(const uint8_t* p, int v, F& lo, F& hi) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 16 * v)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(c, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4));
  }
};
#else
struct Isa : hfaccel_simd::F32 {
  // 16 ymm registers: 4 x 4 accumulators would spill, so 2 rows of x per tile (measured on a Zen 3 EPYC, see
  // cpu_woq.py; the weight rows stay at 4: int4 576x49152 974 us against 1101 us with 2)
  static constexpr int kMT = 2, kNR8 = 4, kNR4 = 4;
  // int8 codes p[8 v .. 8 v + 7] -> floats
  static F i8(const int8_t* p, int v) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * v))));
  }
  // bytes p[8 v .. 8 v + 7] of 16 bytes of int4 codes (32 columns) -> lo: columns 8 v .. 8 v + 7, hi: columns
  // 16 + 8 v .. 16 + 8 v + 7
  static void u4(const uint8_t* p, int v, F& lo, F& hi) {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * v)));
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(c, _mm256_set1_epi32(15)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4));
  }
};
#endif
using F = Isa::F;
constexpr int W = Isa::W;
constexpr int V = 16 / W;

constexpr int64_t kSmallM = 16;
constexpr int kPrefetchBlocks = 2;   // blocks of rows read ahead: the hardware prefetcher alone left these
                                     // loops at about half of the memory bandwidth (measured)

// Rows a thread takes at least: below ~64 K codes per thread, waking a second thread costs more than it saves.
int64_t grain(int64_t K, int64_t M) { return std::max<int64_t>(16, (int64_t(1) << 16) / std::max<int64_t>(1, K * M)); }

template <int MT, int NR>
inline void int8_block(const float* x, int64_t K, const int8_t* q, int64_t Kq, const float* s, float* y,
                       int64_t N, int64_t n) {
  const int64_t Kv = K - K % 16;
  F acc[MT][NR];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = Isa::zero();
  for (int64_t k = 0; k < Kv; k += 16) {
    for (int r = 0; r < NR; ++r)
      _mm_prefetch((const char*)(q + (n + NR * kPrefetchBlocks + r) * Kq + k), _MM_HINT_T0);
    for (int v = 0; v < V; ++v) {             // the 16 columns as V registers, one at a time (AVX2: 16 regs)
      F w[NR];
      for (int r = 0; r < NR; ++r) w[r] = Isa::i8(q + (n + r) * Kq + k, v);
      for (int m = 0; m < MT; ++m) {
        const F xv = Isa::load(x + m * K + k + v * W);
        for (int r = 0; r < NR; ++r) acc[m][r] = Isa::fma(w[r], xv, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) {
      float t = Isa::sum(acc[m][r]);
      const int8_t* qr = q + (n + r) * Kq;
      for (int64_t k = Kv; k < K; ++k) t += (float)qr[k] * x[m * K + k];
      y[m * N + n + r] = t * s[n + r];
    }
}

template <int MT>
void int8_rows(const float* x, int64_t K, const int8_t* q, int64_t Kq, const float* s, float* y, int64_t N,
               int64_t n0, int64_t n1) {
  constexpr int NR = MT == 1 ? 4 : Isa::kNR8;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) int8_block<MT, NR>(x, K, q, Kq, s, y, N, n);
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
  F acc[MT][NR];
  float bias[MT][NR] = {};
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = Isa::zero();
  for (int64_t g = 0; g < G; ++g) {
    F gacc[MT][NR];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < NR; ++r) gacc[m][r] = Isa::zero();
#pragma GCC unroll 4
    for (int kk = 0; kk < GS; kk += 32) {
      const int64_t k = g * GS + kk;
      for (int r = 0; r < NR; ++r)
        _mm_prefetch((const char*)(p + (n + NR * kPrefetchBlocks + r) * rs + k / 2), _MM_HINT_T0);
      for (int v = 0; v < V; ++v) {
        F lo[NR], hi[NR];
        for (int r = 0; r < NR; ++r) Isa::u4(p + (n + r) * rs + k / 2, v, lo[r], hi[r]);
        for (int m = 0; m < MT; ++m) {
          const F x0 = Isa::load(x + m * Kp + k + v * W), x1 = Isa::load(x + m * Kp + k + 16 + v * W);
          for (int r = 0; r < NR; ++r) {
            gacc[m][r] = Isa::fma(lo[r], x0, gacc[m][r]);
            gacc[m][r] = Isa::fma(hi[r], x1, gacc[m][r]);
          }
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const F c = Isa::set1(scale_of(sz, N, g, n + r));
      const float o = offset_of(sz, N, g, n + r);
      for (int m = 0; m < MT; ++m) {
        acc[m][r] = Isa::fma(gacc[m][r], c, acc[m][r]);
        bias[m][r] += o * xs[m * G + g];
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) y[m * N + n + r] = Isa::sum(acc[m][r]) + bias[m][r];
}

template <int MT, int GS>
void int4_rows(const float* x, const float* xs, int64_t Kp, const uint8_t* p, const at::BFloat16* sz, int64_t G,
               float* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int NR = Isa::kNR4;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) int4_block<MT, NR, GS>(x, xs, Kp, p, sz, G, y, N, n);
  for (; n < n1; ++n) int4_block<MT, 1, GS>(x, xs, Kp, p, sz, G, y, N, n);
}

// Rows of x in tiles of Isa::kMT, then 2, then 1; with AVX-512 three left over take one tile of 3 (as 2 + 1 the
// weights were widened twice: the model's 210 coded layers at 3 rows cost 7.4 ms against 5.8 ms at 4).
template <typename Rows>
void by_tiles(int64_t M, Rows rows) {
  int64_t m = 0;
  if constexpr (Isa::kMT >= 4) {
    for (; m + 4 <= M; m += 4) rows(std::integral_constant<int, 4>{}, m);
    if (M - m == 3) {
      rows(std::integral_constant<int, 3>{}, m);
      return;
    }
  }
  for (; m + 2 <= M; m += 2) rows(std::integral_constant<int, 2>{}, m);
  for (; m < M; ++m) rows(std::integral_constant<int, 1>{}, m);
}

template <int GS>
void int4_small(const float* x, const float* xs, int64_t M, int64_t Kp, const uint8_t* p, const at::BFloat16* sz,
                int64_t G, float* y, int64_t N) {
  at::parallel_for(0, N, grain(Kp / 2, M), [&](int64_t n0, int64_t n1) {
    by_tiles(M, [&](auto mt, int64_t m) {
      int4_rows<decltype(mt)::value, GS>(x + m * Kp, xs + m * G, Kp, p, sz, G, y + m * N, N, n0, n1);
    });
  });
}

// Exact 4-bit codes (coded4_mm): w[n, k] = fl(fl(d * (code - Z)) + m) for the fp32 pair (d, m) of row n's group of
// 32 columns, rebuilt in registers with the same two roundings as the reference (this file is compiled with
// -ffp-contract=off, so the mul and the add are never fused into one FMA), then multiplied with x in fp32.
// Unlike int4_block the scale is not factored out of the sums: each product is w[n, k] * x[m, k] with the
// rebuilt weight bit for bit, so only the order of the sums differs from an fp32 GEMM on the same weights.
inline const float* dm_of(const float* dm, int64_t G, int64_t n, int64_t g) { return dm + (n * G + g) * 2; }

template <int MT, int NR, bool Z>
inline void coded4_block(const float* x, int64_t K, const uint8_t* p, const float* dm, int64_t G, float* y,
                         int64_t N, int64_t n) {
  const int64_t rs = K / 2;
  const F z = Isa::set1(8.f);
  F acc[MT][NR];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = Isa::zero();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k = g * 32;
    F d[NR], o[NR];
    for (int r = 0; r < NR; ++r) {
      _mm_prefetch((const char*)(p + (n + NR * kPrefetchBlocks + r) * rs + k / 2), _MM_HINT_T0);
      const float* e = dm_of(dm, G, n + r, g);
      d[r] = Isa::set1(e[0]);
      o[r] = Isa::set1(e[1]);
    }
    for (int v = 0; v < V; ++v) {
      F lo[NR], hi[NR];
      for (int r = 0; r < NR; ++r) {
        Isa::u4(p + (n + r) * rs + k / 2, v, lo[r], hi[r]);
        if constexpr (Z) {
          lo[r] = Isa::sub(lo[r], z);
          hi[r] = Isa::sub(hi[r], z);
        }
        lo[r] = Isa::add(Isa::mul(lo[r], d[r]), o[r]);
        hi[r] = Isa::add(Isa::mul(hi[r], d[r]), o[r]);
      }
      for (int m = 0; m < MT; ++m) {
        const F x0 = Isa::load(x + m * K + k + v * W), x1 = Isa::load(x + m * K + k + 16 + v * W);
        for (int r = 0; r < NR; ++r) {
          acc[m][r] = Isa::fma(lo[r], x0, acc[m][r]);
          acc[m][r] = Isa::fma(hi[r], x1, acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) y[m * N + n + r] = Isa::sum(acc[m][r]);
}

template <int MT, bool Z>
void coded4_rows(const float* x, int64_t K, const uint8_t* p, const float* dm, int64_t G, float* y, int64_t N,
                 int64_t n0, int64_t n1) {
  constexpr int NR = Isa::kNR4;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) coded4_block<MT, NR, Z>(x, K, p, dm, G, y, N, n);
  for (; n < n1; ++n) coded4_block<MT, 1, Z>(x, K, p, dm, G, y, N, n);
}

// [..., K] -> [M, K] fp32 contiguous. At batch 1 the whole op takes a few microseconds, so the usual case
// (x already [M, K] fp32 contiguous) makes no new tensor at all.
at::Tensor as_rows(const at::Tensor& x) {
  if (x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous()) return x;
  return x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous();
}

// y [M, N] fp32 -> x's leading dimensions and dtype
at::Tensor as_output(const at::Tensor& y, const at::Tensor& x) {
  at::Tensor out = y;
  if (x.dim() != 2) {
    at::DimVector shape(x.sizes().begin(), x.sizes().end());
    shape.back() = y.size(1);
    out = y.view(shape);
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// Prefill-sized calls (M >= kBf16M) of the int8 / int4 kernels in bf16 (`set_bf16_prefill`, on where the CPU has
// AVX-512 BF16 unless HFACCEL_CPU_QUANT_KERNEL=native-fp32): x is rounded to bf16 once, each block of
// dequantized weights too, and the block's product is one bf16 GEMM (oneDNN: AMX tiles or vdpbf16ps, fp32
// accumulation, bf16 sums; int8 keeps its codes exact, see int8_bf16_gemm). Measured on the 2-core AMX Xeon at
// M = 100 (torch-level prototype of int8_bf16_gemm against this file's fp32 path): 576x960 387 -> 198 us, 576x3072
// 1433 -> 599, 1536x576 737 -> 296 (fp32 nn.Linear 344 / 1198 / 616); relative error against float64 2.3e-3
// instead of 3e-7, far below the int8 weights' own. Exact-code layers (coded4_mm) never take it, and M < kBf16M
// keeps fp32 activations (int8 at all decode and verify sizes).
constexpr int64_t kBf16M = 64;

// y [M, N] one block of rows of the weight at a time (~1 M values, a multiple of 16, at least 64 rows):
// part(n0, rows) -> that block's [M, rows] fp32 product
template <typename Part>
at::Tensor by_row_blocks(int64_t M, int64_t N, int64_t K, const at::TensorOptions& options, Part part) {
  const int64_t nb = std::min<int64_t>(N, std::max<int64_t>(64, ((int64_t(1) << 20) / K) / 16 * 16));
  if (nb == N) return part(0, N);
  at::Tensor y = at::empty({M, N}, options);
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t rows = std::min(nb, N - n0);
    y.narrow(1, n0, rows).copy_(part(n0, rows));
  }
  return y;
}

std::atomic<bool> bf16_prefill{false};

bool set_bf16_prefill(bool on) { return bf16_prefill.exchange(on); }

// whether a call of M rows takes the bf16 GEMM
bool bf16_gemm(int64_t M) { return M >= kBf16M && bf16_prefill.load(std::memory_order_relaxed); }

// Large M: y[:, rows] = x @ dequantize(rows).T, one block of rows (~4 MB of fp32) at a time; in bf16 when
// `bf16` (the int layers' prefill, above).
template <typename Dequant>
at::Tensor blocked_sgemm(const at::Tensor& xf, int64_t N, int64_t K, Dequant dequant, bool bf16 = false) {
  const at::Tensor xb = bf16 ? xf.to(at::kBFloat16) : at::Tensor();
  // one buffer per calling thread, kept (<= 4 MB): a fresh 4 MB allocation is a fresh mmap whose page faults
  // cost about as much as the dequantization itself
  thread_local at::Tensor buffer;
  return by_row_blocks(xf.size(0), N, K, xf.options(), [&](int64_t n0, int64_t rows) {
    if (!buffer.defined() || buffer.numel() < rows * K) buffer = at::empty({rows * K}, xf.options());
    auto wb = buffer.narrow(0, 0, rows * K).view({rows, K});
    float* wp = wb.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) dequant(n0 + r, wp + r * K);
    });
    return bf16 ? at::mm(xb, wb.to(at::kBFloat16).t()).to(at::kFloat) : at::mm(xf, wb.t());
  });
}

// int8_mm's bf16 prefill: the codes themselves as bf16 (exact: |q| <= 128 needs 8 bits), so only x and the sums
// are rounded; each row's scale then multiplies its bf16 sums in fp32. A block of rows at a time (<= 2 MB of bf16).
at::Tensor int8_bf16_gemm(const at::Tensor& xf, const at::Tensor& q, const at::Tensor& scales) {
  const at::Tensor xb = xf.to(at::kBFloat16);
  const at::Tensor codes = q.narrow(1, 0, xf.size(1));
  return by_row_blocks(xf.size(0), q.size(0), xf.size(1), xf.options(), [&](int64_t n0, int64_t rows) {
    return at::mm(xb, codes.narrow(0, n0, rows).to(at::kBFloat16).t()).to(at::kFloat).mul_(scales.narrow(0, n0, rows));
  });
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
  const at::Tensor xf = as_rows(x);
  const int64_t M = xf.size(0), K = xf.size(1), N = q.size(0), Kq = q.size(1);
  const float* xp = xf.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  at::Tensor y;
  if (bf16_gemm(M)) {
    y = int8_bf16_gemm(xf, q, scales);
  } else if (M > kSmallM) {
    y = blocked_sgemm(xf, N, K, [&](int64_t n, float* out) {
      const int8_t* qr = qp + n * Kq;
      const float s = sp[n];
      const F sv = Isa::set1(s);
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        for (int v = 0; v < V; ++v) Isa::store(out + k + v * W, Isa::mul(Isa::i8(qr + k, v), sv));
      }
      for (; k < K; ++k) out[k] = (float)qr[k] * s;
    });
  } else {
    y = at::empty({M, N}, xf.options());
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, grain(K, M), [&](int64_t n0, int64_t n1) {
      by_tiles(M, [&](auto mt, int64_t m) {
        int8_rows<decltype(mt)::value>(xp + m * K, K, qp, Kq, sp, yp + m * N, N, n0, n1);
      });
    });
  }
  return as_output(y, x);
}

// Row n of an int4 weight as fp32 (for sgemm): w = (code - 8) * s + z = code * s + (z - 8 s), group g's (s, z)
// pair at pairs[2 g stride]: aten's [G, N, 2] layout has stride N (pairs = sz + 2 n), the bf16 kernel's
// [N, G, 2] stride 1 (pairs = sz + 2 n G).
void int4_row(const uint8_t* pr, int64_t Kp, int64_t group_size, const at::BFloat16* pairs, int64_t stride,
              float* out) {
  for (int64_t k = 0; k < Kp; k += 32) {
    const at::BFloat16* pair = pairs + 2 * (k / group_size) * stride;
    const float sc = pair[0];
    const F c = Isa::set1(sc), o = Isa::set1(float(pair[1]) - 8.f * sc);
    for (int v = 0; v < V; ++v) {
      F lo, hi;
      Isa::u4(pr + k / 2, v, lo, hi);
      Isa::store(out + k + v * W, Isa::fma(lo, c, o));
      Isa::store(out + k + 16 + v * W, Isa::fma(hi, c, o));
    }
  }
}

// The arguments of int4_mm (scale/zero pairs [G, N, 2], aten's layout) and int4_bf16_mm ([N, G, 2]: rows_first).
void check_int4(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz_, int64_t group_size,
                const char* what, bool rows_first) {
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
              what, ": group_size must be 32, 64 or 128, got ", group_size);
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              what, ": packed must be a contiguous uint8 [N, K / 2] matrix");
  const int64_t N = packed.size(0), Kp = packed.size(1) * 2, G = Kp / group_size;
  TORCH_CHECK(Kp % group_size == 0, what, ": packed has ", Kp, " columns of codes, not a multiple of group_size ",
              group_size);
  const int64_t d0 = rows_first ? N : G, d1 = rows_first ? G : N;
  TORCH_CHECK(sz_.scalar_type() == at::kBFloat16 && sz_.is_contiguous() && sz_.dim() == 3 && sz_.size(0) == d0 &&
              sz_.size(1) == d1 && sz_.size(2) == 2,
              what, ": ", rows_first ? "szt" : "scales_zeros", " must be contiguous bfloat16 [", d0, ", ", d1,
              ", 2]", rows_first ? " (each row's scale/zero pairs)" : "", ", got ", sz_.scalar_type(), " ", sz_.sizes());
  check_x(x, Kp, what);
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros,
                   int64_t group_size) {
  check_int4(x, packed, scales_zeros, group_size, "int4_mm", false);
  const int64_t N = packed.size(0), Kp = packed.size(1) * 2, G = Kp / group_size;
  at::Tensor xf = as_rows(x);
  if (xf.size(1) < Kp) xf = at::constant_pad_nd(xf, {0, Kp - xf.size(1)});
  const int64_t M = xf.size(0);
  const float* xp = xf.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const at::BFloat16* sz = scales_zeros.data_ptr<at::BFloat16>();
  at::Tensor y;
  if (M > kSmallM) {
    y = blocked_sgemm(xf, N, Kp, [&](int64_t n, float* out) {
      int4_row(pp + n * (Kp / 2), Kp, group_size, sz + n * 2, N, out);
    }, bf16_gemm(M));
  } else {
    c10::SmallVector<float, 1024> xs(M * G);      // per-group sums of x: the offsets' share of each output
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
  return as_output(y, x);
}

// int4_bf16_mm: int4_mm's codes and arithmetic at decode sizes (M <= kSmallM) on CPUs with AVX-512 BF16, the
// activations rounded to bf16 (as aten's packed kernels round them), the scale/zero pairs stored row by row
// ([N, G, 2]). 32 codes become 32 bf16 values (code - 8, exact) with one table lookup (vpermw), and vdpbf16ps
// multiplies them with x, accumulating in fp32. Measured on a 2-core AMX Xeon against int4_mm: 1 thread, hot,
// 512x4096, M = 1: 102 / 95 / 89 us against 148 / 107 / 89 at groups of 32 / 64 / 128 (most of the gain is the
// epilogue, below); 2 threads, cold, 1536x576 g64: 36.8 against 44.0 us. Each extra row of x costs more than in
// int4_mm (M = 2: 136 against 111 us), so M > 1 is not where this kernel wins.
//   Per 64 columns: 32 bytes of a row widen to 32 words, whose low nibbles are columns c..c+15 and c+32..c+47 and
// high ones c+16..c+31, c+48..c+63 (pack_int4's order); x is laid out once per call in the same two orders. The
// dot's lane l sums words 2l, 2l+1, so with groups of 32 lanes 0-7 belong to one group and 8-15 to the next.
//   Per group, w = (code - 8) * s + z, so y = sum_g s_g * (x . (code - 8))_g + z_g * (sum of x)_g: the second
// term as one more FMA with the per-lane sums of x (taken once per call with the same bf16 x).
#if defined(__AVX512F__)
#define HF_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// per epilogue unit u (a chunk of 64 columns for groups of 32 or 64, a group for 128): 16 lanes of scales and
// zeros for row n (groups of 32: lanes 0-7 group 2u, 8-15 group 2u + 1, clamped at the last group). szt is
// [N, G, 2] bf16, a row's pairs side by side: one broadcast load of a (scale, zero) pair, then a shift and a mask
// make both fp32 vectors (bf16 is the top half of an fp32). With aten's [G, N, 2] layout and scalar conversions
// this epilogue cost about as much as the 64 columns' arithmetic (hot, 512x4096: 148 / 107 / 90 us at groups of
// 32 / 64 / 128, the same 2M weights).
template <int GS>
HF_BF16 inline void unit_scales(const at::BFloat16* szt, int64_t G, int64_t u, int64_t n, __m512& s, __m512& z) {
  const int32_t* pairs = reinterpret_cast<const int32_t*>(szt + n * G * 2);
  __m512i v;
  if constexpr (GS == 32) v = _mm512_mask_set1_epi32(_mm512_set1_epi32(pairs[2 * u]), 0xFF00,
                                                    pairs[std::min<int64_t>(2 * u + 1, G - 1)]);
  else v = _mm512_set1_epi32(pairs[u]);
  s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  z = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
}

// xb [MT][C][2][32] bf16 (each chunk's low-nibble and high-nibble orders), xs [MT][U][16] lane sums of x
template <int MT, int NR, int GS>
HF_BF16 inline void int4_bf16_block(const uint16_t* xb, const float* xs, int64_t C, int64_t Kp, const uint8_t* p,
                                    const at::BFloat16* sz, int64_t G, float* y, int64_t N, int64_t n, __m512i table) {
  constexpr int CPU = GS == 128 ? 2 : 1;                      // chunks per epilogue unit
  const int64_t rs = Kp / 2, U = C / CPU;
  const __m512i low = _mm512_set1_epi16(15);
  __m512 acc[MT][NR];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t u = 0; u < U; ++u) {
    // two accumulators per row and unit, for the low and the high nibbles: one dependent chain of dots per row
    // left the loop waiting on vdpbf16ps's latency
    __m512 gacc[MT][NR], hacc[MT][NR];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < NR; ++r) gacc[m][r] = hacc[m][r] = _mm512_setzero_ps();
    for (int cc = 0; cc < CPU; ++cc) {
      const int64_t c = u * CPU + cc;
      const bool whole = c * 64 + 64 <= Kp;                  // else the last 32 columns (Kp an odd multiple of 32)
      __m512i xlo[MT], xhi[MT];
      for (int m = 0; m < MT; ++m) {
        xlo[m] = _mm512_loadu_si512(xb + (m * C + c) * 64);
        xhi[m] = _mm512_loadu_si512(xb + (m * C + c) * 64 + 32);
      }
      for (int r = 0; r < NR; ++r) {
        const uint8_t* row = p + (n + r) * rs + c * 32;
        _mm_prefetch((const char*)(row + NR * kPrefetchBlocks * rs), _MM_HINT_T0);
        const __m256i raw = whole ? _mm256_loadu_si256((const __m256i*)row) : _mm256_maskz_loadu_epi8(0xFFFF, row);
        const __m512i w = _mm512_cvtepu8_epi16(raw);
        const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(w, low), table);
        const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
        for (int m = 0; m < MT; ++m) {
          gacc[m][r] = _mm512_dpbf16_ps(gacc[m][r], (__m512bh)xlo[m], lo);
          hacc[m][r] = _mm512_dpbf16_ps(hacc[m][r], (__m512bh)xhi[m], hi);
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      __m512 s, z;
      unit_scales<GS>(sz, G, u, n + r, s, z);
      for (int m = 0; m < MT; ++m)
        acc[m][r] = _mm512_fmadd_ps(_mm512_loadu_ps(xs + (m * U + u) * 16), z, _mm512_fmadd_ps(_mm512_add_ps(gacc[m][r], hacc[m][r]), s, acc[m][r]));
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) y[m * N + n + r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int GS>
HF_BF16 void int4_bf16_small(const at::Tensor& x2, int64_t M, int64_t Kp, const uint8_t* p, const at::BFloat16* sz,
                             int64_t G, float* y, int64_t N) {
  const int64_t K = x2.size(1), C = (Kp + 63) / 64, U = GS == 128 ? C / 2 : C;
  // x in the two nibble orders, bf16, zeros past K; and the lane sums of that same bf16 x per unit
  c10::SmallVector<uint16_t, 8 * 1536> xb(M * C * 64);
  c10::SmallVector<float, 8 * 384> xs(M * U * 16);
  c10::SmallVector<float, 1600> row(C * 64 + 64);
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);
  for (int64_t m = 0; m < M; ++m) {
    std::fill(row.begin(), row.end(), 0.f);
    if (x2.scalar_type() == at::kFloat) {
      std::copy_n(x2.data_ptr<float>() + m * K, K, row.begin());
    } else {
      const at::BFloat16* xr = x2.data_ptr<at::BFloat16>() + m * K;
      for (int64_t k = 0; k < K; ++k) row[k] = float(xr[k]);
    }
    for (int64_t c = 0; c < C; ++c) {
      const float* r = row.data() + c * 64;
      const __m512bh lo = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(r + 32), _mm512_loadu_ps(r));
      const __m512bh hi = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(r + 48), _mm512_loadu_ps(r + 16));
      _mm512_storeu_si512(xb.data() + (m * C + c) * 64, (__m512i)lo);
      _mm512_storeu_si512(xb.data() + (m * C + c) * 64 + 32, (__m512i)hi);
      float* u = xs.data() + (m * U + (GS == 128 ? c / 2 : c)) * 16;
      const __m512 prev = (GS == 128 && c % 2) ? _mm512_loadu_ps(u) : _mm512_setzero_ps();
      _mm512_storeu_ps(u, _mm512_dpbf16_ps(_mm512_dpbf16_ps(prev, lo, ones), hi, ones));
    }
  }
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i) t[i] = uint16_t(c10::bit_cast<uint32_t>(float(i % 16 - 8)) >> 16);
  const __m512i table = _mm512_load_si512(t);
  const uint16_t* xbp = xb.data();
  const float* xsp = xs.data();
  at::parallel_for(0, N, grain(Kp / 2, M), [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    auto rows = [&](auto mt) {
      constexpr int MT = decltype(mt)::value;
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) int4_bf16_block<MT, 4, GS>(xbp + m * C * 64, xsp + m * U * 16, C, Kp, p, sz, G, y + m * N, N, n, table);
      for (; n < n1; ++n) int4_bf16_block<MT, 1, GS>(xbp + m * C * 64, xsp + m * U * 16, C, Kp, p, sz, G, y + m * N, N, n, table);
    };
    for (; m + 2 <= M; m += 2) rows(std::integral_constant<int, 2>{});
    if (m < M) rows(std::integral_constant<int, 1>{});
  });
}
#endif

bool cpu_has_avx512_bf16() {
#if defined(__AVX512F__)
  static const bool yes = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}

at::Tensor int4_bf16_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& szt, int64_t group_size) {
  check_int4(x, packed, szt, group_size, "int4_bf16_mm", true);
  const int64_t N = packed.size(0), Kp = packed.size(1) * 2, G = Kp / group_size;
  TORCH_CHECK(cpu_has_avx512_bf16(), "int4_bf16_mm: this CPU (or this build) has no AVX-512 BF16; use int4_mm");
  at::Tensor x2 = x.reshape({-1, x.size(-1)});
  const int64_t M = x2.size(0);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const at::BFloat16* sz = szt.data_ptr<at::BFloat16>();
  if (M > kSmallM) {                     // prefill: dequantize blocks of rows for a GEMM (bf16: see blocked_sgemm)
    at::Tensor xf = as_rows(x);
    if (xf.size(1) < Kp) xf = at::constant_pad_nd(xf, {0, Kp - xf.size(1)});
    at::Tensor y = blocked_sgemm(xf, N, Kp, [&](int64_t n, float* out) {
      int4_row(pp + n * (Kp / 2), Kp, group_size, sz + n * G * 2, 1, out);
    }, bf16_gemm(M));
    return as_output(y, x);
  }
  x2 = x2.contiguous();
  at::Tensor y = at::empty({M, N}, x2.options().dtype(at::kFloat));
#if defined(__AVX512F__)
  float* yp = y.data_ptr<float>();
  if (group_size == 32) int4_bf16_small<32>(x2, M, Kp, pp, sz, G, yp, N);
  else if (group_size == 64) int4_bf16_small<64>(x2, M, Kp, pp, sz, G, yp, N);
  else int4_bf16_small<128>(x2, M, Kp, pp, sz, G, yp, N);
#endif
  return as_output(y, x);
}

// The exact weight of row n, columns [0, K): the same arithmetic as coded4_block's registers.
template <bool Z>
void coded4_row(const uint8_t* pr, const float* dmr, int64_t K, float* out) {
  const F z = Isa::set1(8.f);
  for (int64_t k = 0; k < K; k += 32) {
    const F d = Isa::set1(dmr[k / 16]), o = Isa::set1(dmr[k / 16 + 1]);
    for (int v = 0; v < V; ++v) {
      F lo, hi;
      Isa::u4(pr + k / 2, v, lo, hi);
      if constexpr (Z) {
        lo = Isa::sub(lo, z);
        hi = Isa::sub(hi, z);
      }
      Isa::store(out + k + v * W, Isa::add(Isa::mul(lo, d), o));
      Isa::store(out + k + 16 + v * W, Isa::add(Isa::mul(hi, d), o));
    }
  }
}

// 5..kPanelM rows: rebuilding the weights in registers per tile of rows (coded4_block) would pay the rebuild
// once per 4 rows; instead each thread rebuilds kPanel weight rows once into an L1 buffer and multiplies every
// row of x with them there (a register tile of kPanelNR weight rows by up to 6 rows of x).
constexpr int64_t kPanel = 4, kPanelM = 64;
#if defined(__AVX512F__)
constexpr int kPanelNR = 4;      // 4 x 6 accumulators of 32 zmm registers
#else
constexpr int kPanelNR = 2;      // 2 x 6 accumulators of 16 ymm registers
#endif

template <int MR, int NR>
inline void panel_tile(const float* __restrict x, int64_t K, const float* __restrict w, float* __restrict y,
                       int64_t N) {
  F acc[NR][MR];
  for (int j = 0; j < NR; ++j)
    for (int m = 0; m < MR; ++m) acc[j][m] = Isa::zero();
  for (int64_t k = 0; k < K; k += W) {
    F wk[NR];
    for (int j = 0; j < NR; ++j) wk[j] = Isa::load(w + j * K + k);
    for (int m = 0; m < MR; ++m) {
      const F xv = Isa::load(x + m * K + k);
      for (int j = 0; j < NR; ++j) acc[j][m] = Isa::fma(wk[j], xv, acc[j][m]);
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int m = 0; m < MR; ++m) y[m * N + j] = Isa::sum(acc[j][m]);
}

template <int NR>
void panel_rows(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) panel_tile<6, NR>(x + m * K, K, w, y + m * N, N);
  switch (M - m) {
    case 5: panel_tile<5, NR>(x + m * K, K, w, y + m * N, N); break;
    case 4: panel_tile<4, NR>(x + m * K, K, w, y + m * N, N); break;
    case 3: panel_tile<3, NR>(x + m * K, K, w, y + m * N, N); break;
    case 2: panel_tile<2, NR>(x + m * K, K, w, y + m * N, N); break;
    case 1: panel_tile<1, NR>(x + m * K, K, w, y + m * N, N); break;
    default: break;
  }
}

template <bool Z>
void coded4_panels(const float* x, int64_t M, int64_t K, const uint8_t* p, const float* dm, float* y, int64_t N) {
  const int64_t G = K / 32;
  at::parallel_for(0, (N + kPanel - 1) / kPanel, std::max<int64_t>(1, grain(K / 2, M) / kPanel), [&](int64_t b0, int64_t b1) {
    c10::SmallVector<float, kPanel * 1536> buf(kPanel * K);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kPanel, rows = std::min<int64_t>(kPanel, N - n0);
      for (int64_t r = 0; r < rows; ++r) coded4_row<Z>(p + (n0 + r) * (K / 2), dm + (n0 + r) * G * 2, K, buf.data() + r * K);
      int64_t r = 0;
      for (; r + kPanelNR <= rows; r += kPanelNR) panel_rows<kPanelNR>(x, M, K, buf.data() + r * K, y + n0 + r, N);
      for (; r < rows; ++r) panel_rows<1>(x, M, K, buf.data() + r * K, y + n0 + r, N);
    }
  });
}

at::Tensor coded4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& dm, int64_t zero) {
  TORCH_CHECK(zero == 0 || zero == 8, "coded4_mm: zero must be 0 or 8, got ", zero);
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
              packed.size(1) % 16 == 0,
              "coded4_mm: packed must be a contiguous uint8 [N, K / 2] matrix with K a multiple of 32");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = K / 32;
  TORCH_CHECK(dm.scalar_type() == at::kFloat && dm.is_contiguous() && dm.dim() == 3 && dm.size(0) == N &&
              dm.size(1) == G && dm.size(2) == 2,
              "coded4_mm: dm must be contiguous float32 [", N, ", ", G, ", 2], got ", dm.scalar_type(), " ", dm.sizes());
  check_x(x, K, "coded4_mm");
  TORCH_CHECK(x.size(-1) == K, "coded4_mm: x has ", x.size(-1), " columns, the weight ", K);
  const at::Tensor xf = as_rows(x);
  const int64_t M = xf.size(0);
  const float* xp = xf.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* dp = dm.data_ptr<float>();
  at::Tensor y;
  if (M > kPanelM) {
    y = blocked_sgemm(xf, N, K, [&](int64_t n, float* out) {
      if (zero) coded4_row<true>(pp + n * (K / 2), dp + n * G * 2, K, out);
      else coded4_row<false>(pp + n * (K / 2), dp + n * G * 2, K, out);
    });
  } else if (M > 4) {
    y = at::empty({M, N}, xf.options());
    if (zero) coded4_panels<true>(xp, M, K, pp, dp, y.data_ptr<float>(), N);
    else coded4_panels<false>(xp, M, K, pp, dp, y.data_ptr<float>(), N);
  } else {
    y = at::empty({M, N}, xf.options());
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, grain(K / 2, M), [&](int64_t n0, int64_t n1) {
      by_tiles(M, [&](auto mt, int64_t m) {
        constexpr int MT = decltype(mt)::value;
        if (zero) coded4_rows<MT, true>(xp + m * K, K, pp, dp, G, yp + m * N, N, n0, n1);
        else coded4_rows<MT, false>(xp + m * K, K, pp, dp, G, yp + m * N, N, n0, n1);
      });
    });
  }
  return as_output(y, x);
}

}  // namespace

TORCH_LIBRARY(hfaccel_cpu, m) {
  m.def("int8_mm(Tensor x, Tensor q, Tensor scales) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor packed, Tensor scales_zeros, int group_size) -> Tensor");
  m.def("coded4_mm(Tensor x, Tensor packed, Tensor dm, int zero) -> Tensor");
  m.def("set_bf16_prefill(bool on) -> bool", &set_bf16_prefill);
  m.def("int4_bf16_mm(Tensor x, Tensor packed, Tensor szt, int group_size) -> Tensor");
  m.def("has_avx512_bf16() -> bool", &cpu_has_avx512_bf16);
}

TORCH_LIBRARY_IMPL(hfaccel_cpu, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
  m.impl("coded4_mm", &coded4_mm);
  m.impl("int4_bf16_mm", &int4_bf16_mm);
}
