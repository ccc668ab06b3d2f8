// Decode attention for the continuous-batching engine on CPU: one query token per row, every row over its own
// K/V read in place from the paged pool, all rows and KV heads of a layer in one call.
//
// Why it exists: the engine's rows differ in length, and reading them as one padded batch means gathering
// every row's K/V (as many bytes per step as the weights at a few hundred tokens of context). Reading each row
// as a view of the pool needs one sdpa call per row and layer: 480 calls per step at 16 rows on SmolLM2,
// ~100 us each on the 2-core Ice Lake measured, dominated by the per-call cost, not by the ~1 KB per token it
// reads. Here the (row, KV head) pairs are split over the threads and each walks its row's runs of slots.
//
//   hfaccel_cpu::paged_decode(q [B, Hq, D] f32, k [Hkv, S, D] f32, v [Hkv, S, D] f32,
//                             seg_start [nseg] i64, seg_len [nseg] i64, row_ptr [B + 1] i64, scale) -> [B, Hq, D]
//   Row b's keys are the slots seg_start[i] .. seg_start[i] + seg_len[i] - 1 for i in row_ptr[b] .. row_ptr[b+1]-1,
//   in order. The G = Hq / Hkv query heads h * G .. h * G + G - 1 share KV head h (grouped-query attention, the
//   order repeat_kv gives). out = softmax(q k^T * scale) v per row and head, in fp32 (exp of score - row max,
//   as sdpa does), so results equal sdpa's up to summation order.
//
// Every op takes q, k and v all float32 or all bfloat16 (a bf16 model's cache). bf16 is widened to fp32 as it is
// read, all arithmetic is fp32, and a bf16 output is rounded once at the end: Inductor's fused loops that this
// replaces in a bf16 compiled step rounded the scores and the probabilities to bf16 on the way.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "simd.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

#ifdef __AVX2__
// exp(x) for x <= 0 (scores minus their max): 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, Cephes' degree-5
// polynomial (about 1 ulp); below -87.3 the result flushes to 0, as exp's does in float.
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365447f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(n)));
}

using hfaccel_simd::hsum;

// 8 lanes of K or V as fp32: bf16 is the top half of an fp32
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
#endif

// scores[0:L] = exp(scores - max) in place; returns their sum
inline float softmax_numerators(float* row, int64_t L) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t x = 0; x < L; ++x) m = std::max(m, row[x]);
  float sum = 0.f;
  int64_t x = 0;
#ifdef __AVX2__
  __m256 vm = _mm256_set1_ps(m), vs = _mm256_setzero_ps();
  for (; x + 8 <= L; x += 8) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(row + x), vm));
    _mm256_storeu_ps(row + x, e);
    vs = _mm256_add_ps(vs, e);
  }
  sum = hsum(vs);
#endif
  for (; x < L; ++x) {
    row[x] = std::exp(row[x] - m);
    sum += row[x];
  }
  return sum;
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t D) {
  int64_t d = 0;
  float s = 0.f;
#ifdef __AVX2__
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; d + 16 <= D; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), load8(b + d + 8), acc1);
  }
  for (; d + 8 <= D; d += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(b + d), acc0);
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; d < D; ++d) s += a[d] * float(b[d]);
  return s;
}

// acc[0:D] += p * v[0:D]
template <typename T>
inline void axpy(float* acc, float p, const T* v, int64_t D) {
  int64_t d = 0;
#ifdef __AVX2__
  __m256 vp = _mm256_set1_ps(p);
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(vp, load8(v + d), _mm256_loadu_ps(acc + d)));
#endif
  for (; d < D; ++d) acc[d] += p * float(v[d]);
}


#ifdef __AVX2__
// One (row, KV head) task with its G query heads known at compile time and D a multiple of 8: the G dot
// products of a key share its loads (G independent FMA chains), and the value sums keep CH registers of each
// head's output in registers across all keys, so nothing is stored per key.
template <int G, typename T>
void task_avx2(const float* qh, const T* kh, const T* vh, const int64_t* st, const int64_t* ln, int64_t s0,
               int64_t s1, int64_t L, int64_t D, float sc, float* scores, float* oh) {
  int64_t t = 0;
  for (int64_t i = s0; i < s1; ++i) {
    for (int64_t j = 0; j < ln[i]; ++j, ++t) {
      const T* kr = kh + (st[i] + j) * D;
      __m256 acc[G];
      for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        __m256 kv = load8(kr + d);
        for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qh + g * D + d), kv, acc[g]);
      }
      for (int g = 0; g < G; ++g) scores[g * L + t] = hsum(acc[g]) * sc;
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) inv[g] = 1.f / softmax_numerators(scores + g * L, L);
  constexpr int CH = G <= 3 ? 4 : (G <= 6 ? 2 : 1);     // registers of 8 columns per head per pass
  for (int64_t d0 = 0; d0 < D; d0 += 8 * CH) {
    const int ch = static_cast<int>(std::min<int64_t>(CH, (D - d0) / 8));
    __m256 acc[G][CH];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < CH; ++c) acc[g][c] = _mm256_setzero_ps();
    t = 0;
    for (int64_t i = s0; i < s1; ++i) {
      for (int64_t j = 0; j < ln[i]; ++j, ++t) {
        const T* vr = vh + (st[i] + j) * D + d0;
        for (int c = 0; c < CH; ++c) {
          if (c >= ch) break;
          __m256 vv = load8(vr + 8 * c);
          for (int g = 0; g < G; ++g) acc[g][c] = _mm256_fmadd_ps(_mm256_set1_ps(scores[g * L + t]), vv, acc[g][c]);
        }
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < ch; ++c)
        _mm256_storeu_ps(oh + g * D + d0 + 8 * c, _mm256_mul_ps(acc[g][c], _mm256_set1_ps(inv[g])));
  }
}

template <typename T>
using TaskFn = void (*)(const float*, const T*, const T*, const int64_t*, const int64_t*, int64_t, int64_t,
                        int64_t, int64_t, float, float*, float*);

template <typename T>
TaskFn<T> task_for(int64_t G, int64_t D) {
  if (D % 8) return nullptr;
  switch (G) {
    case 1: return task_avx2<1, T>;
    case 2: return task_avx2<2, T>;
    case 3: return task_avx2<3, T>;
    case 4: return task_avx2<4, T>;
    case 5: return task_avx2<5, T>;
    case 6: return task_avx2<6, T>;
    case 7: return task_avx2<7, T>;
    case 8: return task_avx2<8, T>;
    default: return nullptr;
  }
}
#endif

// The (row, KV head) tasks of one layer, split over the threads. Row b's keys are its segments
// st[rp[b]] .. (ln, in slots of its KV heads' blocks kv_base(b, h)); out [B, Hq, D].
template <typename T, typename KvBase>
void attend(const float* qp, float* op, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, float sc, const int64_t* st,
            const int64_t* ln, const int64_t* rp, KvBase kv_base) {
  const int64_t G = Hq / Hkv;
#ifdef __AVX2__
  const TaskFn<T> fast = task_for<T>(G, D);
#endif
  // one task per (row, KV head); a grain of 1: tasks are a few hundred keys each, already coarse
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      int64_t L = 0;
      for (int64_t i = rp[b]; i < rp[b + 1]; ++i) L += ln[i];
      scores.resize(static_cast<size_t>(G * L));
      const float* qh = qp + (b * Hq + h * G) * D;            // the G query heads of this KV head
      const auto [kh, vh] = kv_base(b, h);
      float* oh = op + (b * Hq + h * G) * D;
#ifdef __AVX2__
      if (fast != nullptr) {
        fast(qh, kh, vh, st, ln, rp[b], rp[b + 1], L, D, sc, scores.data(), oh);
        continue;
      }
#endif
      acc.assign(static_cast<size_t>(G * D), 0.f);
      // scores[g, t] = q_g . k_t * scale
      int64_t t = 0;
      for (int64_t i = rp[b]; i < rp[b + 1]; ++i) {
        for (int64_t j = 0; j < ln[i]; ++j, ++t) {
          const T* kr = kh + (st[i] + j) * D;
          for (int64_t g = 0; g < G; ++g) scores[g * L + t] = dot(qh + g * D, kr, D) * sc;
        }
      }
      // softmax per query head
      std::vector<float> inv(static_cast<size_t>(G));
      for (int64_t g = 0; g < G; ++g) {
        inv[g] = 1.f / softmax_numerators(scores.data() + g * L, L);
      }
      // out_g = sum_t p[g, t] v_t
      t = 0;
      for (int64_t i = rp[b]; i < rp[b + 1]; ++i) {
        for (int64_t j = 0; j < ln[i]; ++j, ++t) {
          const T* vr = vh + (st[i] + j) * D;
          for (int64_t g = 0; g < G; ++g) axpy(acc.data() + g * D, scores[g * L + t], vr, D);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) oh[g * D + d] = acc[g * D + d] * inv[g];
    }
  });
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t kdim, const char* what) {
  TORCH_CHECK(q.dim() == 3, what, ": q must be [B, Hq, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == kdim && k.sizes() == v.sizes(), what, ": k and v must be the same ",
              kdim == 3 ? "[Hkv, S, D]" : "[B, Hkv, T, D]", ", got ", k.sizes(), " and ", v.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && k.scalar_type() == dt && v.scalar_type() == dt, what,
              ": q, k and v must be all float32 or all bfloat16, got ", q.scalar_type(), ", ", k.scalar_type(),
              " and ", v.scalar_type());
  TORCH_CHECK(k.size(-1) == q.size(2), what, ": head_dim of k (", k.size(-1), ") != head_dim of q (", q.size(2), ")");
  const int64_t Hkv = k.size(-3);
  TORCH_CHECK(Hkv > 0 && q.size(1) % Hkv == 0, what, ": Hq (", q.size(1), ") is not a multiple of Hkv (", Hkv, ")");
}

// Calls f(q, out, k, v) with fp32 pointers to q and the output and k / v's own pointers (float or bf16), q
// contiguous [R, Hq, D]; returns the output in q's dtype (bf16: q widened before, the output rounded after).
template <typename Fn>
at::Tensor with_dtype(const at::Tensor& qc, const at::Tensor& kc, const at::Tensor& vc, Fn f) {
  auto out = at::empty(qc.sizes(), qc.options());
  if (qc.scalar_type() == at::kFloat) {
    f(qc.data_ptr<float>(), out.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>());
    return out;
  }
  const int64_t n = qc.numel();
  std::vector<float> qf(static_cast<size_t>(n)), of(static_cast<size_t>(n));
  const c10::BFloat16* qb = qc.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < n; ++i) qf[i] = float(qb[i]);
  f(qf.data(), of.data(), kc.data_ptr<c10::BFloat16>(), vc.data_ptr<c10::BFloat16>());
  c10::BFloat16* ob = out.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < n; ++i) ob[i] = c10::BFloat16(of[i]);
  return out;
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seg_start,
                        const at::Tensor& seg_len, const at::Tensor& row_ptr, double scale) {
  check_qkv(q, k, v, 3, "paged_decode");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(0), S = k.size(1);
  TORCH_CHECK(row_ptr.numel() == B + 1, "paged_decode: row_ptr needs B + 1 = ", B + 1, " entries, got ",
              row_ptr.numel());
  TORCH_CHECK(seg_start.numel() == seg_len.numel(), "paged_decode: seg_start and seg_len differ in length");
  for (const auto* t : {&seg_start, &seg_len, &row_ptr})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "paged_decode: index tensors must be "
                "contiguous int64");
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const int64_t* st = seg_start.data_ptr<int64_t>();
  const int64_t* ln = seg_len.data_ptr<int64_t>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[B] == seg_start.numel(), "paged_decode: row_ptr must run from 0 to nseg");
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(rp[b] <= rp[b + 1], "paged_decode: row_ptr must not decrease");
    int64_t total = 0;
    for (int64_t i = rp[b]; i < rp[b + 1]; ++i) {
      TORCH_CHECK(ln[i] >= 0 && st[i] >= 0 && st[i] + ln[i] <= S, "paged_decode: segment ", i, " (", st[i], ", ",
                  ln[i], ") is outside the pool's ", S, " slots");
      total += ln[i];
    }
    TORCH_CHECK(total > 0, "paged_decode: row ", b, " has no keys");
  }
  return with_dtype(qc, kc, vc, [&](const float* qp, float* op, const auto* kp, const auto* vp) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(kp)>>;
    attend<T>(qp, op, B, Hq, Hkv, D, static_cast<float>(scale), st, ln, rp,
              [&](int64_t, int64_t h) { return std::make_pair(kp + h * S * D, vp + h * S * D); });
  });
}

// The compiled decode step's attention: one query token per row over the row's own [Hkv, T, D] block of a
// decode buffer, the columns where valid[b] is true (padding, columns not written yet, a sliding window or a
// speculative step's rejected columns are false). The valid columns are read as runs, as paged_decode reads
// a row's slots, so no score is computed for a masked column.
//   Query row r reads K/V row r / per: buffer_decode has one query per row (per = 1); buffer_verify (a
// speculative verify of W tokens per row) W, each with its own columns (the row's, up to its own).
at::Tensor buffer_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& valid,
                       int64_t per, double scale, const char* what) {
  const int64_t R = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), T = k.size(2);
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  auto vm = valid.contiguous();
  const bool* ok = vm.data_ptr<bool>();
  std::vector<int64_t> st, ln, rp(1, 0);
  for (int64_t r = 0; r < R; ++r) {
    const bool* row = ok + r * T;
    for (int64_t t = 0; t < T;) {
      if (!row[t]) { ++t; continue; }
      int64_t e = t;
      while (e < T && row[e]) ++e;
      st.push_back(t);
      ln.push_back(e - t);
      t = e;
    }
    TORCH_CHECK(static_cast<int64_t>(st.size()) > rp.back(), what, ": row ", r / per,
                per > 1 ? " token " : "", per > 1 ? std::to_string(r % per) : std::string(), " has no valid column");
    rp.push_back(static_cast<int64_t>(st.size()));
  }
  return with_dtype(qc, kc, vc, [&](const float* qp, float* op, const auto* kp, const auto* vp) {
    using E = std::remove_cv_t<std::remove_pointer_t<decltype(kp)>>;
    attend<E>(qp, op, R, Hq, Hkv, D, static_cast<float>(scale), st.data(), ln.data(), rp.data(),
              [&](int64_t r, int64_t h) {
                const int64_t off = (r / per * Hkv + h) * T * D;
                return std::make_pair(kp + off, vp + off);
              });
  });
}

at::Tensor buffer_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& valid,
                         double scale) {
  check_qkv(q, k, v, 4, "buffer_decode");
  const int64_t B = q.size(0), T = k.size(2);
  TORCH_CHECK(k.size(0) == B, "buffer_decode: k has ", k.size(0), " rows, q ", B);
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.dim() == 2 && valid.size(0) == B && valid.size(1) == T,
              "buffer_decode: valid must be bool [", B, ", ", T, "], got ", valid.scalar_type(), " ", valid.sizes());
  return buffer_rows(q, k, v, valid, 1, scale, "buffer_decode");
}

// q [B, W, Hq, D], allowed [B, W, T] (what each of a row's W tokens may see) -> [B, W, Hq, D]
at::Tensor buffer_verify(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& allowed,
                         double scale) {
  TORCH_CHECK(q.dim() == 4, "buffer_verify: q must be [B, W, Hq, D], got ", q.sizes());
  const int64_t B = q.size(0), W = q.size(1), Hq = q.size(2), D = q.size(3);
  const at::Tensor q3 = q.reshape({B * W, Hq, D});
  check_qkv(q3, k, v, 4, "buffer_verify");
  const int64_t T = k.size(2);
  TORCH_CHECK(k.size(0) == B, "buffer_verify: k has ", k.size(0), " rows, q ", B);
  TORCH_CHECK(allowed.scalar_type() == at::kBool && allowed.dim() == 3 && allowed.size(0) == B &&
              allowed.size(1) == W && allowed.size(2) == T,
              "buffer_verify: allowed must be bool [", B, ", ", W, ", ", T, "], got ", allowed.scalar_type(), " ",
              allowed.sizes());
  return buffer_rows(q3, k, v, allowed.reshape({B * W, T}), W, scale, "buffer_verify").view({B, W, Hq, D});
}

}  // namespace

TORCH_LIBRARY(hfaccel_cpu_attn, m) {
  m.def("paged_decode(Tensor q, Tensor k, Tensor v, Tensor seg_start, Tensor seg_len, Tensor row_ptr, float scale) "
        "-> Tensor");
  m.def("buffer_decode(Tensor q, Tensor k, Tensor v, Tensor valid, float scale) -> Tensor");
  m.def("buffer_verify(Tensor q, Tensor k, Tensor v, Tensor allowed, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(hfaccel_cpu_attn, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("buffer_decode", &buffer_decode);
  m.impl("buffer_verify", &buffer_verify);
}
