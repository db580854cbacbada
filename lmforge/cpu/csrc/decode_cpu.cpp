// The decode step's own CPU kernels, for the engine (lmforge/engine.py); built with quant_cpu.cpp by
// lmforge/cpu/kernels.py. Each has the same computation in PyTorch operators beside it, and the tests compare them.
// - lmforge_cpu::decode_attention: one query per (row, head) over a static KV cache, reading only the cache slots
//   the mask allows (a row's positions so far), where a static-shape graph reads every slot of the cache.
// - lmforge_cpu::few_row_linear: x (M, K) @ w^T for a few rows in float32, streaming each weight row once for all
//   of them (at one row, about as fast as a sum of the same bytes).
// - lmforge_cpu::gelu_tanh: GPT-2's GELU (tanh approximation) in one pass, as x / (1 + exp(-2u)), for prefill's
//   activations (PyTorch's own computes tanh at ~9 cycles an element on an AVX2 EPYC).
// - lmforge_cpu::pack_linear_weight and packed_linear: x (M, K) @ w^T for many rows (prefill, large batches) in
//   register tiles, on a copy of w laid out for them.
// - lmforge_cpu::int8_linear_tiled and int4_linear_tiled: the quantized linears of quant_cpu.cpp for many rows, in
//   the same tiles, on the weight dequantized block by block.
// All use AVX-512 or AVX2 with FMA, whichever the build has, through the vector helpers below.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace lmforge {  // quant_cpu.cpp
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* scales);
}

namespace {

// Float vectors of the widest kind the build has: 16 lanes with AVX-512, 8 with AVX2 and FMA; without either, the
// kernels below run their plain loops (which the compiler vectorises as it can).
#if defined(__AVX512F__)
#define LMFORGE_VEC 1
constexpr int64_t W = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vset(float x) { return _mm512_set1_ps(x); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
inline vec vclamp(vec x, float lo, float hi) { return _mm512_min_ps(_mm512_max_ps(x, vset(lo)), vset(hi)); }
inline vec vwhere_above(vec t, float limit, vec a, vec b) {  // b where t > limit, else a (NaN t: a)
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(t, vset(limit), _CMP_GT_OQ), a, b);
}
inline vec vround(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vpow2(vec n) {  // 2^n for whole n in [-126, 127], built in the exponent bits
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
#elif defined(__AVX2__) && defined(__FMA__)
#define LMFORGE_VEC 1
constexpr int64_t W = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vset(float x) { return _mm256_set1_ps(x); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline vec vclamp(vec x, float lo, float hi) { return _mm256_min_ps(_mm256_max_ps(x, vset(lo)), vset(hi)); }
inline vec vwhere_above(vec t, float limit, vec a, vec b) {  // b where t > limit, else a (NaN t: a)
  return _mm256_blendv_ps(a, b, _mm256_cmp_ps(t, vset(limit), _CMP_GT_OQ));
}
inline vec vround(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vpow2(vec n) {  // 2^n for whole n in [-126, 127], built in the exponent bits
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
#endif

// How far ahead of its reads a weight stream asks for lines into L2: 16 lines. On an AVX-512 machine, one core's
// hardware prefetchers alone kept few_row_linear at ~21 GB/s where a plain sum of the same bytes read ~27; with the
// hint it read about as fast as the sum, and the compiled GPT-2 decode step ran 1.25x faster (paired, same process)
// in minutes when the memory was not the limit (when it is, both read at its speed). With AVX2 (Zen 3), 1.2x to 1.3x
// at eight rows. Past a buffer's end the hint names memory outside it: x86 drops a prefetch of an address it cannot
// read, and the address is formed as an integer (a pointer that far past the buffer would be undefined).
constexpr int64_t STREAM_AHEAD = 1024;

inline void prefetch_ahead(const float* p) {
#if defined(LMFORGE_VEC)
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(p) + STREAM_AHEAD), _MM_HINT_T1);
#endif
}

// sum_i a[i] * b[i]: one vector accumulator, then the tail.
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#if defined(LMFORGE_VEC)
  vec acc = vzero();
  for (; i + W <= n; i += W) acc = vfma(vload(a + i), vload(b + i), acc);
  total = vsum(acc);
#endif
  float rest = 0.f;
#pragma omp simd reduction(+ : rest)
  for (int64_t j = i; j < n; ++j) rest += a[j] * b[j];
  return total + rest;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {  // y += w * x
  int64_t i = 0;
#if defined(LMFORGE_VEC)
  const vec vw = vset(w);
  for (; i + W <= n; i += W) vstore(y + i, vfma(vw, vload(x + i), vload(y + i)));
#endif
#pragma omp simd
  for (int64_t j = i; j < n; ++j) y[j] += w * x[j];
}

#if defined(LMFORGE_VEC)
// One (row, head) of decode_attention for D = W * NV: the query and the output accumulate in registers. The same
// operations in the same order as the general loops (dot, then axpy into acc), so the same results, bit for bit.
template <int NV>
void attend_row(const float* query, const float* keys, int64_t ks, const float* values, int64_t vs,
                const bool* allowed, int64_t ms, int64_t last, float scale, float* scores, float* o) {
  vec qv[NV], acc[NV];
  for (int j = 0; j < NV; ++j) qv[j] = vload(query + W * j), acc[j] = vzero();
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s <= last; ++s)
    if (allowed[s * ms]) {
      const float* key = keys + s * ks;
      vec d = vzero();
      for (int j = 0; j < NV; ++j) d = vfma(vload(key + W * j), qv[j], d);
      scores[s] = vsum(d) * scale;
      top = std::max(top, scores[s]);
    }
  float total = 0.f;
  for (int64_t s = 0; s <= last; ++s)
    if (allowed[s * ms]) {
      const float p = std::exp(scores[s] - top);
      total += p;
      const vec vp = vset(p);
      const float* value = values + s * vs;
      for (int j = 0; j < NV; ++j) acc[j] = vfma(vp, vload(value + W * j), acc[j]);
    }
  const float inv = last >= 0 ? 1.f / total : std::numeric_limits<float>::quiet_NaN();
  for (int j = 0; j < NV; ++j) vstore(o + W * j, vmul(acc[j], vset(inv)));
}
#endif

// GELU, tanh approximation: 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), computed as x / (1 + e^t)
// with t = -2u (the same function: 0.5 (1 + tanh(u)) = 1 / (1 + e^(-2u))), which needs one exp and, unlike 1 + tanh,
// does not cancel for negative x.
constexpr float GELU_A = -1.5957691216057308f;            // -2 sqrt(2 / pi)
constexpr float GELU_B = -1.5957691216057308f * 0.044715f;
// e^t is taken for t clamped to [-87, 87]. Below, the result is x to float rounding (e^-87 ~ 1.6e-38). Above
// (x below about -9.7), the true value is below 1e-36 in size: it is x * 0, so -0 as PyTorch gives, and NaN for
// x = -inf, as PyTorch gives too.
constexpr float EXP_LIMIT = 87.f;

#if !defined(LMFORGE_VEC)
inline float gelu_one(float x) {
  const float t = x * (GELU_A + GELU_B * x * x);
  return t > EXP_LIMIT ? x * 0.f : x / (1.f + std::exp(std::max(t, -EXP_LIMIT)));
}
#endif

#if defined(LMFORGE_VEC)
// e^t for t in [-87, 87]: t = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' expf polynomial, times 2^n (a relative
// error of about 2e-7, within 2 ulp of std::exp).
inline vec vexp(vec t) {
  const vec n = vround(vmul(t, vset(1.44269504088896341f)));
  vec r = vfma(n, vset(-0.693359375f), t);  // ln 2 in two parts: the first exact in float, so r loses nothing
  r = vfma(n, vset(2.12194440e-4f), r);
  vec p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset(1.f)));
  return vmul(p, vpow2(n));
}

inline vec vgelu(vec x) {
  const vec t = vmul(x, vfma(vset(GELU_B), vmul(x, x), vset(GELU_A)));
  const vec y = vdiv(x, vadd(vset(1.f), vexp(vclamp(t, -EXP_LIMIT, EXP_LIMIT))));
  return vwhere_above(t, EXP_LIMIT, y, vmul(x, vzero()));
}
#endif

// How a thread walks its share of the weight rows, by instruction set, as measured (paired, GPT-2's 49 matrices):
// - AVX-512 (the machine before): one stream, a prefetch ahead every 64 bytes (1.25x without, one row), each weight
//   vector meeting up to 8 rows of x while it is in a register;
// - AVX2 (an AMD EPYC, Zen 3; and the plain loops elsewhere): two streams at once, the first and second halves of the
//   thread's share, each prefetched, the two weight vectors meeting up to 4 rows of x (8 accumulators: AVX2 has 16
//   registers), so that each x vector loaded feeds two multiply-adds. Every 4 rows of x past the first 4 read the
//   two weight rows again, from cache. Against the form before (two unprefetched streams up to four rows, one
//   prefetched stream meeting 8 rows above): 1.02x at one and two rows, 1.07x at four, seven and eight (in a fast
//   minute, a sum at ~37 GB/s). At one row, two unprefetched streams had read 0.97 of a sum of the same bytes where
//   one prefetched stream read 0.89.
#if defined(__AVX512F__)
constexpr bool TWO_STREAMS = false;
constexpr int MB = 8;  // rows of x a weight vector meets while it is in a register (one accumulator each)
#else
constexpr bool TWO_STREAMS = true;
constexpr int MB = 4;
#endif
static_assert(MB >= 1 && MB <= 8, "rows_against_x has tiles of 1 to 8 rows");

// y[m, n[r]] = x[m] . w[r] (+ bias) for RS weight rows, each read as a stream of its own, and the MT rows of x: each
// vector of a weight row is loaded once and multiplied into every row of x, each product summed in its own vector
// accumulator, then the tail. Prefetch: ask for the line STREAM_AHEAD bytes on every 64 bytes of a row (rows from
// memory); no prefetch for rows in cache.
template <int RS, int MT, bool Prefetch>
inline void tile(const float* x, const float* const* w, const int64_t* n, const float* bias, float* y, int64_t K,
                 int64_t N) {
  float out[RS][MT];
  int64_t k = 0;
#if defined(LMFORGE_VEC)
  vec acc[RS][MT];
  for (int r = 0; r < RS; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = vzero();
  for (; k + W <= K; k += W) {
    vec wv[RS];
    for (int r = 0; r < RS; ++r) {
      if (Prefetch && k % 16 == 0) prefetch_ahead(w[r] + k);
      wv[r] = vload(w[r] + k);
    }
    for (int m = 0; m < MT; ++m) {
      const vec xv = vload(x + m * K + k);
      for (int r = 0; r < RS; ++r) acc[r][m] = vfma(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < RS; ++r)
    for (int m = 0; m < MT; ++m) out[r][m] = vsum(acc[r][m]);
#else
  for (int r = 0; r < RS; ++r)
    for (int m = 0; m < MT; ++m) out[r][m] = 0.f;
#endif
  for (int r = 0; r < RS; ++r)
    for (int m = 0; m < MT; ++m) {
      float rest = 0.f;
#pragma omp simd reduction(+ : rest)
      for (int64_t j = k; j < K; ++j) rest += w[r][j] * x[m * K + j];
      const float v = out[r][m] + rest;
      y[m * N + n[r]] = bias ? v + bias[n[r]] : v;
    }
}

// RS weight rows against every row of x, MB rows of x at a time (the first MB read the weight rows from memory, the
// rest find them in cache).
template <int RS, bool Prefetch>
inline void rows_against_x(const float* x, int64_t M, const float* const* w, const int64_t* n, const float* bias,
                           float* y, int64_t K, int64_t N) {
  switch (std::min<int64_t>(MB, M)) {
    case 1: tile<RS, 1, Prefetch>(x, w, n, bias, y, K, N); break;
    case 2: tile<RS, 2, Prefetch>(x, w, n, bias, y, K, N); break;
    case 3: tile<RS, 3, Prefetch>(x, w, n, bias, y, K, N); break;
    case 4: tile<RS, 4, Prefetch>(x, w, n, bias, y, K, N); break;
    case 5: if constexpr (MB >= 5) tile<RS, 5, Prefetch>(x, w, n, bias, y, K, N); break;
    case 6: if constexpr (MB >= 6) tile<RS, 6, Prefetch>(x, w, n, bias, y, K, N); break;
    case 7: if constexpr (MB >= 7) tile<RS, 7, Prefetch>(x, w, n, bias, y, K, N); break;
    default: tile<RS, MB, Prefetch>(x, w, n, bias, y, K, N); break;
  }
  if (M > MB) rows_against_x<RS, false>(x + MB * K, M - MB, w, n, bias, y + MB * N, K, N);
}

}  // namespace

// q (B, H, 1, D), k and v (B, Hkv, S, D) with H a multiple of Hkv (query head h reads key head h / (H / Hkv)), all
// float32 with unit stride along D; mask (B or 1, 1, 1, S) bool, true where the query may attend. Returns
// softmax(q k^T * scale over the allowed slots) v as (B, H, 1, D); a row with no allowed slot gives NaN, as SDPA does.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                            double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4, "q, k, v and mask: 4-D");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(q.size(2) == 1, "q: one query per row and head");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "q, k and v: float32");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "k and v: (B, Hkv, S, D), with Hkv dividing q's heads");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k and v: unit stride along D");
  TORCH_CHECK(mask.scalar_type() == at::kBool && (mask.size(0) == B || mask.size(0) == 1) && mask.size(1) == 1 &&
              mask.size(2) == 1 && mask.size(3) == S, "mask: bool (B or 1, 1, 1, S)");
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t rep = H / Hkv, mask_row = mask.size(0) == 1 ? 0 : mask.stride(0);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(S), acc(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, g = h / rep;
      const float* query = qp + b * q.stride(0) + h * q.stride(1);
      const float* keys = kp + b * k.stride(0) + g * k.stride(1);
      const float* values = vp + b * v.stride(0) + g * v.stride(1);
      const bool* allowed = mp + b * mask_row;
      const int64_t ms = mask.stride(3);
      int64_t last = S - 1;  // the last allowed slot: nothing past it is read
      while (last >= 0 && !allowed[last * ms]) --last;
      float* o = op + i * D;
#if defined(LMFORGE_VEC)
      if (D % W == 0 && D <= 8 * W) {  // (the same arithmetic as below, the output held in registers)
        const float sc = (float)scale;
        const int64_t ks = k.stride(2), vs = v.stride(2);
        switch (D / W) {
          case 1: attend_row<1>(query, keys, ks, values, vs, allowed, ms, last, sc, scores.data(), o); continue;
          case 2: attend_row<2>(query, keys, ks, values, vs, allowed, ms, last, sc, scores.data(), o); continue;
          case 3: attend_row<3>(query, keys, ks, values, vs, allowed, ms, last, sc, scores.data(), o); continue;
          case 4: attend_row<4>(query, keys, ks, values, vs, allowed, ms, last, sc, scores.data(), o); continue;
          case 5: attend_row<5>(query, keys, ks, values, vs, allowed, ms, last, sc, scores.data(), o); continue;
          case 6: attend_row<6>(query, keys, ks, values, vs, allowed, ms, last, sc, scores.data(), o); continue;
          case 7: attend_row<7>(query, keys, ks, values, vs, allowed, ms, last, sc, scores.data(), o); continue;
          case 8: attend_row<8>(query, keys, ks, values, vs, allowed, ms, last, sc, scores.data(), o); continue;
        }
      }
#endif
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s <= last; ++s)
        if (allowed[s * ms]) {
          scores[s] = dot(query, keys + s * k.stride(2), D) * (float)scale;
          top = std::max(top, scores[s]);
        }
      std::fill(acc.begin(), acc.end(), 0.f);
      float total = 0.f;
      for (int64_t s = 0; s <= last; ++s)
        if (allowed[s * ms]) {
          const float p = std::exp(scores[s] - top);
          total += p;
          axpy(p, values + s * v.stride(2), acc.data(), D);
        }
      const float inv = last >= 0 ? 1.f / total : std::numeric_limits<float>::quiet_NaN();
      for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
    }
  });
  return out;
}

// y (..., N) = x (..., K) @ w (N, K)^T (+ bias), all float32, w and bias contiguous (x is made so): each weight row is
// read once, from memory, and dotted with every row of x (which stays in cache); the rows of w are split between the
// threads. (x of any rank, so that a decode step's (B, 1, K) needs no reshaping around the call.)
at::Tensor few_row_linear(const at::Tensor& x_, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_.dim() >= 1 && x_.scalar_type() == at::kFloat && x_.size(-1) > 0, "x: float32 (..., K), K > 0");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous() && w.size(1) == x_.size(-1),
              "w: contiguous float32 (N, K), K = x's last size");
  const at::Tensor x = x_.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / K, N = w.size(0);
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "bias: contiguous float32 (N,)");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (M == 0) return y;
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    const int64_t half = TWO_STREAMS ? (end - begin) / 2 : 0;
    for (int64_t n = begin; n < begin + half; ++n) {  // rows n and n + half together
      const int64_t rows[2] = {n, n + half};
      const float* pair[2] = {wp + n * K, wp + (n + half) * K};
      rows_against_x<2, true>(xp, M, pair, rows, bp, yp, K, N);
    }
    for (int64_t n = begin + 2 * half; n < end; ++n) {
      const float* row[1] = {wp + n * K};
      rows_against_x<1, true>(xp, M, row, &n, bp, yp, K, N);
    }
  });
  return y;
}

// GELU (tanh approximation) of every element of a contiguous float32 tensor, into a new one. Every element goes
// through the same vector code (the last few through a padded vector), so the result is the same whatever the
// number of threads.
at::Tensor gelu_tanh(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32");
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t n = x.numel();
#if defined(LMFORGE_VEC)
  at::parallel_for(0, n / W, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) vstore(yp + i * W, vgelu(vload(xp + i * W)));
  });
  const int64_t done = n / W * W;
  if (done < n) {
    float tail[W] = {};
    std::copy(xp + done, xp + n, tail);
    vstore(tail, vgelu(vload(tail)));
    std::copy(tail, tail + (n - done), yp + done);
  }
#else
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) yp[i] = gelu_one(xp[i]);
  });
#endif
  return y;
}

// ---- packed_linear: x (M, K) @ w^T + bias for many rows (prefill, batches past few_row_linear's), on a copy of w
// laid out by pack_linear_weight. The copy holds w in panels of NR output columns: for each block of KC inputs, each
// panel's KC x NR values in a row, so that a thread reads its columns' weights in one forward stream. A tile of MR rows
// x NR columns accumulates in registers over a KC block (MR * 2 vectors, each weight vector used for MR rows, each x
// value broadcast for 2 vectors), then adds into y. Threads split the blocks of MC rows x panels; every output sums
// its products in the same order (bias, then k = 0, 1, ...) whatever the number of threads or rows, so within this
// kernel a row's result does not depend on the others in the batch. On the AVX2 EPYC (Zen 3, 2 threads), 180-189
// GFLOP/s on GPT-2's four shapes at 17 to 512 rows against oneDNN's packed kernel's 129-155, about the FMA units'
// peak (~180 measured).
#if defined(LMFORGE_VEC)
constexpr int64_t NR = 2 * W;
constexpr int MR = W == 16 ? 12 : 6;  // accumulators: MR * 2 of the 32 (AVX-512) or 16 (AVX2) vector registers
#else
constexpr int64_t NR = 16;
constexpr int MR = 4;
#endif
// KC inputs a block: a panel's block (KC x NR floats, 24 KB with AVX2; 48 with AVX-512, past some L1s: untimed)
// stays in L1 while every tile of rows uses it;
// MC rows of x a block (MC x KC floats, 216 KB) stay in L2 while the panels pass. 384 was the best of 256, 384 and
// 512 on the EPYC by a few percent.
constexpr int64_t KC = 384;
constexpr int64_t MC = 144;

inline int64_t panels(int64_t n) { return (n + NR - 1) / NR; }

// One tile: rows x[0..R) (row stride lda) against a panel's block b (kc x NR); acc starts from init (NR values: bias or
// zeros) or from c (a previous block's sums), and ends in c (row stride ldc).
template <int R>
inline void tile(const float* a, int64_t lda, const float* b, int64_t kc, float* c, int64_t ldc, const float* init) {
#if defined(LMFORGE_VEC)
  vec acc[R][2];
  for (int r = 0; r < R; ++r) {
    const float* from = init ? init : c + r * ldc;
    acc[r][0] = vload(from), acc[r][1] = vload(from + W);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const vec b0 = vload(b + k * NR), b1 = vload(b + k * NR + W);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const vec x = vset(a[r * lda + k]);
      acc[r][0] = vfma(x, b0, acc[r][0]);
      acc[r][1] = vfma(x, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) vstore(c + r * ldc, acc[r][0]), vstore(c + r * ldc + W, acc[r][1]);
#else
  float acc[R][NR];
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < NR; ++j) acc[r][j] = init ? init[j] : c[r * ldc + j];
  for (int64_t k = 0; k < kc; ++k)
    for (int r = 0; r < R; ++r) {
      const float x = a[r * lda + k];
#pragma omp simd
      for (int64_t j = 0; j < NR; ++j) acc[r][j] = std::fma(x, b[k * NR + j], acc[r][j]);
    }
  for (int r = 0; r < R; ++r) std::copy(acc[r], acc[r] + NR, c + r * ldc);
#endif
}

template <int R = MR>
inline void tile_of(int rows, const float* a, int64_t lda, const float* b, int64_t kc, float* c, int64_t ldc,
                    const float* init) {
  if constexpr (R > 1) {
    if (rows < R) return tile_of<R - 1>(rows, a, lda, b, kc, c, ldc, init);
  }
  tile<R>(a, lda, b, kc, c, ldc, init);
}

at::Tensor pack_linear_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.size(1) > 0, "w: float32 (N, K), K > 0");
  const at::Tensor src = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), P = panels(N);
  at::Tensor out = at::zeros({K, P * NR}, w.options());  // (columns past N: zeros)
  const float* s = src.data_ptr<float>();
  float* d = out.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      for (int64_t p = begin; p < end; ++p) {
        float* block = d + k0 * P * NR + p * kc * NR;
        for (int64_t j = 0; j < NR && p * NR + j < N; ++j)
          for (int64_t k = 0; k < kc; ++k) block[k * NR + j] = s[(p * NR + j) * K + k0 + k];
      }
    }
  });
  return out;
}

// y (M, N) = a (M, K) @ B + bias, B given block by block: block(k0, kc, p, scratch) returns panel p's kc x NR block
// of inputs k0.. (a pointer into a packed copy, or scratch filled in). Threads split the panels.
template <class Block>
void tiled_product(const float* a, int64_t M, int64_t K, int64_t N, const float* bias, float* c, Block block) {
  // rows in blocks of at most MC, as even as whole tiles allow (512 rows: 4 x 128, not 3 x 144 + 80, which left
  // one of two threads a third more work: 0.89x)
  const int64_t P = panels(N), blocks = (M + MC - 1) / MC;
  const int64_t mb = ((M + blocks - 1) / blocks + MR - 1) / MR * MR;
  // work items: (block of rows, panel), panels fastest; a thread takes a run of them
  at::parallel_for(0, blocks * P, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float init[NR];  // the panel's bias (zeros past N or without one)
    alignas(64) float edge[MR * NR] = {};  // the last panel's tile, where N is not a whole number of panels
    thread_local std::vector<float> scratch;  // a dequantized block (block() fills it)
    scratch.resize(KC * NR);
    for (int64_t ib = begin / P; ib * P < end; ++ib) {
      const int64_t i0 = ib * mb, mc = std::min(mb, M - i0);
      const int64_t p0 = std::max(begin, ib * P) - ib * P, p1 = std::min(end, (ib + 1) * P) - ib * P;
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        for (int64_t p = p0; p < p1; ++p) {
          const float* b = block(k0, kc, p, scratch.data());
          const int64_t n0 = p * NR, nc = std::min(NR, N - n0);
          if (k0 == 0)
            for (int64_t j = 0; j < NR; ++j) init[j] = bias && j < nc ? bias[n0 + j] : 0.f;
          for (int64_t i = i0; i < i0 + mc; i += MR) {
            const int rows = static_cast<int>(std::min<int64_t>(MR, i0 + mc - i));
            const float* ai = a + i * K + k0;
            if (nc == NR) {
              tile_of(rows, ai, K, b, kc, c + i * N + n0, N, k0 == 0 ? init : nullptr);
              continue;
            }
            for (int r = 0; r < rows; ++r)
              std::copy(c + (i + r) * N + n0, c + (i + r) * N + n0 + (k0 == 0 ? 0 : nc), edge + r * NR);
            tile_of(rows, ai, K, b, kc, edge, NR, k0 == 0 ? init : nullptr);
            for (int r = 0; r < rows; ++r) std::copy(edge + r * NR, edge + r * NR + nc, c + (i + r) * N + n0);
          }
        }
      }
    }
  });
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

void check_bias(const std::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "bias: contiguous float32 (N,)");
}

at::Tensor packed_linear(const at::Tensor& x_, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t N) {
  TORCH_CHECK(x_.dim() >= 1 && x_.scalar_type() == at::kFloat && x_.size(-1) > 0, "x: float32 (..., K), K > 0");
  const at::Tensor x = x_.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / K, P = panels(N);
  TORCH_CHECK(N > 0 && packed.dim() == 2 && packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
                  packed.size(0) == K && packed.size(1) == P * NR,
              "packed: pack_linear_weight of a float32 (n, K) weight, K = x's last size");
  check_bias(bias, N);
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  if (M == 0) return y;
  const float* bp = packed.data_ptr<float>();
  tiled_product(x.data_ptr<float>(), M, K, N, bias.has_value() ? bias->data_ptr<float>() : nullptr,
                y.data_ptr<float>(), [&](int64_t k0, int64_t kc, int64_t p, float*) {
                  return bp + k0 * P * NR + p * kc * NR;
                });
  return y;
}

// ---- Quantized linears for many rows (prefill): the input rounded to int8 steps per row as the few-row kernels
// (quant_cpu.cpp) round it, x_q * s_x, times the weight dequantized block by block into a panel's layout, through
// the tiles above; the same products as those kernels' but for float rounding (they sum int8 products exactly). On
// the AVX2 EPYC the integer dot products run no faster than float FMA (no VNNI: each 32 byte pairs take 3 to 4
// instructions), so at many rows this is the faster way; each block of the weight is dequantized once for every
// block of up to MC rows.

// x (M, K) rounded per row to int8 steps, in float
std::vector<float> int8_steps(const at::Tensor& x, int64_t M, int64_t K) {
  std::vector<int8_t> q(M * K);
  std::vector<float> scales(M), out(M * K);
  lmforge::quantize_rows(x.data_ptr<float>(), M, K, q.data(), scales.data());
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t k = 0; k < K; ++k) out[m * K + k] = static_cast<float>(q[m * K + k]) * scales[m];
  });
  return out;
}

// y (M, N) = (x rounded per row to int8 steps) @ W^T + bias, W given row by row: row(n, k0, kc, out) writes W[n, k0 ..
// k0 + kc) to out. Each panel's rows of a block are written row-major first (loops the compiler vectorises), then
// moved into the panel's layout.
template <class Row>
void dequantized_product(const at::Tensor& x, int64_t M, int64_t K, int64_t N, const std::optional<at::Tensor>& bias,
                         at::Tensor& y, Row row) {
  const std::vector<float> a = int8_steps(x, M, K);
  thread_local std::vector<float> rows;  // (the panel's rows of the block, in each thread)
  tiled_product(a.data(), M, K, N, bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(),
                [&](int64_t k0, int64_t kc, int64_t p, float* block) {
                  rows.resize(NR * KC);
                  for (int64_t j = 0; j < NR; ++j) {
                    float* out = rows.data() + j * KC;
                    if (p * NR + j < N) row(p * NR + j, k0, kc, out);
                    else std::fill(out, out + kc, 0.f);
                  }
                  for (int64_t k = 0; k < kc; ++k)
                    for (int64_t j = 0; j < NR; ++j) block[k * NR + j] = rows[j * KC + k];
                  return const_cast<const float*>(block);
                });
}

at::Tensor int8_linear_tiled(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scales,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_.dim() >= 1 && x_.scalar_type() == at::kFloat && x_.size(-1) > 0, "x: float32 (..., K), K > 0");
  const at::Tensor x = x_.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / K, N = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous() && w.size(1) == K && N > 0,
              "w: contiguous int8 (N, K), K = x's last size");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N,
              "scales: contiguous float32 (N,)");
  check_bias(bias, N);
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  if (M == 0) return y;
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  dequantized_product(x, M, K, N, bias, y, [&](int64_t n, int64_t k0, int64_t kc, float* out) {
    const int8_t* codes = wp + n * K + k0;
    for (int64_t k = 0; k < kc; ++k) out[k] = static_cast<float>(codes[k]) * sp[n];
  });
  return y;
}

at::Tensor int4_linear_tiled(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scales,
                             const at::Tensor& mins, const std::optional<at::Tensor>& bias, int64_t group) {
  TORCH_CHECK(x_.dim() >= 1 && x_.scalar_type() == at::kFloat && x_.size(-1) > 0, "x: float32 (..., K), K > 0");
  const at::Tensor x = x_.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / K, N = w.size(0), G = group;
  TORCH_CHECK(G > 0 && G % 2 == 0 && K % G == 0, "group: an even size dividing K");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) * 2 == K && N > 0,
              "w: contiguous uint8 (N, K / 2)");
  for (const at::Tensor* t : {&scales, &mins})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->numel() == N * (K / G),
                "scales, mins: contiguous float16 (N, K / group)");
  check_bias(bias, N);
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  if (M == 0) return y;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  const at::Half* mp = mins.data_ptr<at::Half>();
  const int64_t groups = K / G, half = G / 2;
  // Element e of a group: the low nibble of its byte e (e < G / 2) or the high nibble of byte e - G / 2;
  // W = code * scale + min, as Int4Linear.dequantize computes it
  dequantized_product(x, M, K, N, bias, y, [&](int64_t n, int64_t k0, int64_t kc, float* out) {
    const uint8_t* row = wp + n * (K / 2);
    for (int64_t k = k0; k < k0 + kc;) {
      const int64_t g = k / G, e0 = k % G, e1 = std::min(G, e0 + (k0 + kc - k));
      const uint8_t* bytes = row + g * half;
      const float scale = static_cast<float>(sp[n * groups + g]), low = static_cast<float>(mp[n * groups + g]);
      float* at = out + (k - k0);  // element e of the group goes to at[e - e0]
      for (int64_t e = e0; e < std::min(e1, half); ++e) at[e - e0] = static_cast<float>(bytes[e] & 15) * scale + low;
      for (int64_t e = std::max(e0, half); e < e1; ++e)
        at[e - e0] = static_cast<float>(bytes[e - half] >> 4) * scale + low;
      k += e1 - e0;
    }
  });
  return y;
}

// The float lanes of the vectors these kernels were built for: 16 (AVX-512), 8 (AVX2 with FMA), or 1 (plain loops).
int64_t vector_lanes() {
#if defined(LMFORGE_VEC)
  return W;
#else
  return 1;
#endif
}

TORCH_LIBRARY_FRAGMENT(lmforge_cpu, m) {  // quant_cpu.cpp opens the library
  m.def("vector_lanes", &vector_lanes);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def("few_row_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("gelu_tanh(Tensor x) -> Tensor");
  m.def("pack_linear_weight(Tensor w) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor");
  m.def("int8_linear_tiled(Tensor x, Tensor w, Tensor scales, Tensor? bias) -> Tensor");
  m.def("int4_linear_tiled(Tensor x, Tensor w, Tensor scales, Tensor mins, Tensor? bias, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge_cpu, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("few_row_linear", &few_row_linear);
  m.impl("gelu_tanh", &gelu_tanh);
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("packed_linear", &packed_linear);
  m.impl("int8_linear_tiled", &int8_linear_tiled);
  m.impl("int4_linear_tiled", &int4_linear_tiled);
}
