// y = x W^T (+ b) for a few rows of x (a batched decode step, a verify step), float32, on the CPU.
//
// Why it exists: a batched decode step multiplies M = 2-16 rows by every weight, and at such M the BLAS's sgemm
// runs well below the machine's limits. On the 2-core Sapphire Rapids measured (22 GB/s of memory reads),
// SmolLM2's 210 layer weights took 52-56 ms at M = 16 with sgemm (8 GB/s of weights) and 37-40 ms at M = 4.
// Here each weight row is read from memory once per call and used for every row of x while it is in registers:
// 38 ms at M = 16, 23 ms at M = 4, and at M = 1 the same as sgemm's GEMV (about 21 GB/s, the memory's rate).
//
//   hfaccel_cpu_gemm::small_linear(x [M, K] f32, w [N, K] f32 contiguous (nn.Linear's weight), bias [N] f32 or
//                                  None) -> [M, N]
//
// The N output columns are cut into blocks of 4 weight rows (AVX-512; 2 with AVX2), split over the threads.
// For a block, rows of x go in chunks of 6: 24 accumulator registers (one per output; 12 with AVX2's 16
// registers), and each step over k (16 floats, one AVX-512 register; 8 with AVX2) loads the block's weight
// vectors once and 6 vectors of x (from L1/L2: x is small) for 24 FMAs. Every chunk after the first reads the
// block's weights from L1; the next blocks' weights are prefetched. The lanes of an accumulator are summed at
// the end. Sums run in another order than the BLAS's (which splits k differently): results agree to rounding,
// not bit for bit. Without AVX2 + FMA a plain loop runs: correct, not fast (hfaccel uses the op only where it
// measured faster).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cstdint>

namespace {

#if defined(__AVX512F__)
struct Isa : hfaccel_simd::F32 {
  static constexpr int64_t kBlock = 4;   // weight rows per block
  static constexpr int kChunk = 6;       // rows of x per pass over a block: 24 accumulators of 32 registers
};
#elif defined(HFACCEL_SIMD_F32)
struct Isa : hfaccel_simd::F32 {
  // 16 ymm registers: 2 weight rows x 6 rows of x = 12 accumulators, 2 weight vectors, 1 of x
  static constexpr int64_t kBlock = 2;
  static constexpr int kChunk = 6;
};
#else
struct Isa {                             // the plain loop's blocks
  static constexpr int64_t kBlock = 4;
};
#endif
constexpr int64_t kBlock = Isa::kBlock;

#ifdef HFACCEL_SIMD_F32
using F = Isa::F;
constexpr int W = Isa::W;
constexpr int kChunk = Isa::kChunk;
constexpr int64_t kAhead = 1;    // blocks prefetched ahead

template <int MR, int NR>
inline void block_kernel(const float* __restrict x, int64_t K, const float* __restrict w, float* __restrict y,
                         int64_t N, const float* __restrict bias, bool prefetch) {
  F acc[NR][MR];
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) acc[j][m] = Isa::zero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    F wk[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wk[j] = Isa::load(w + j * K + k);
    if (prefetch) {
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(w + (kAhead * kBlock + j) * K + k), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const F xv = Isa::load(x + m * K + k);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[j][m] = Isa::fma(xv, wk[j], acc[j][m]);
    }
  }
  if (k < K) {                                  // the last K % W columns, masked
    F wk[NR];
    for (int j = 0; j < NR; ++j) wk[j] = Isa::load_first(w + j * K + k, K - k);
    for (int m = 0; m < MR; ++m) {
      const F xv = Isa::load_first(x + m * K + k, K - k);
      for (int j = 0; j < NR; ++j) acc[j][m] = Isa::fma(xv, wk[j], acc[j][m]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    const float b = bias != nullptr ? bias[j] : 0.f;
    for (int m = 0; m < MR; ++m) y[m * N + j] = Isa::sum(acc[j][m]) + b;
  }
}

// all M rows of x against weight rows n .. n + NR - 1
template <int NR>
void block_rows(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N, const float* bias,
                bool prefetch) {
  int64_t m = 0;
  for (; m + kChunk <= M; m += kChunk)
    block_kernel<kChunk, NR>(x + m * K, K, w, y + m * N, N, bias, prefetch && m == 0);
  const float* xm = x + m * K;
  float* ym = y + m * N;
  static_assert(kChunk == 6, "the remainders below are written for chunks of 6 rows");
  switch (M - m) {
    case 0: break;
    case 1: block_kernel<1, NR>(xm, K, w, ym, N, bias, prefetch && m == 0); break;
    case 2: block_kernel<2, NR>(xm, K, w, ym, N, bias, prefetch && m == 0); break;
    case 3: block_kernel<3, NR>(xm, K, w, ym, N, bias, prefetch && m == 0); break;
    case 4: block_kernel<4, NR>(xm, K, w, ym, N, bias, prefetch && m == 0); break;
    default: block_kernel<5, NR>(xm, K, w, ym, N, bias, prefetch && m == 0); break;
  }
}
#endif

[[maybe_unused]] void rows_generic(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N,
                                   int64_t rows, const float* bias) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += x[m * K + k] * w[j * K + k];
      y[m * N + j] = acc + (bias != nullptr ? bias[j] : 0.f);
    }
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "small_linear: CPU tensors only, got x on ", x.device(),
              " and w on ", w.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "small_linear: float32 only, got x ", x.scalar_type(), " and w ", w.scalar_type());
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "small_linear: x [M, K] and w [N, K], got ", x.sizes(), " and ",
              w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), "small_linear: x has K = ", x.size(1), ", w has K = ", w.size(1));
  TORCH_CHECK(w.is_contiguous(), "small_linear: w must be a contiguous (row-major) [N, K] weight");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == at::kFloat && b.numel() == N,
                "small_linear: bias must be a float32 CPU tensor of ", N, " elements, got ", b.scalar_type(), " ",
                b.sizes());
    bp = b.data_ptr<float>();
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return bp != nullptr ? b.unsqueeze(0).expand({M, N}).clone() : y.zero_();
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n = blk * kBlock, rows = std::min(kBlock, N - n);
      const float* bn = bp != nullptr ? bp + n : nullptr;
#ifdef HFACCEL_SIMD_F32
      const bool prefetch = blk + kAhead < b1;   // stay inside this thread's weights
      if (rows == kBlock) {
        block_rows<kBlock>(xp, M, K, wp + n * K, yp + n, N, bn, prefetch);
      } else {
        for (int64_t j = 0; j < rows; ++j)
          block_rows<1>(xp, M, K, wp + (n + j) * K, yp + n + j, N, bn != nullptr ? bn + j : nullptr, false);
      }
#else
      rows_generic(xp, M, K, wp + n * K, yp + n, N, rows, bn);
#endif
    }
  });
  return y;
}

bool fast_path() {
#ifdef HFACCEL_SIMD_F32
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(hfaccel_cpu_gemm, m) {
  m.def("small_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("fast_path() -> bool", &fast_path);
}

TORCH_LIBRARY_IMPL(hfaccel_cpu_gemm, CPU, m) { m.impl("small_linear", &small_linear); }
