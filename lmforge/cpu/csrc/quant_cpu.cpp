// Weight-only quantized linears for CPU, with the input quantized to int8 per row (as llama.cpp's q8_0 and q4_0
// dot products do): int8 x int8 and int4 x int8 dot products with AVX-512 VNNI where the CPU has it, AVX2 where it
// has that, plain loops elsewhere. Built on first use by lmforge/cpu/kernels.py; the operators are lmforge_cpu::int8_linear
// and lmforge_cpu::int4_linear, and int4_linear_rows8 on a copy laid out in blocks of 8 rows (the engine's); and
// lmforge/quantize.py holds the same computation in PyTorch (the tests compare them).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define LMFORGE_VNNI 1
#endif
#if defined(LMFORGE_VNNI) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#define LMFORGE_DOT256 1  // 32 bytes of int8 dot products a step: VNNI's instruction, or AVX2's two
#endif

namespace {

#ifdef LMFORGE_DOT256
// acc (8 int32) + the sums of four products u[i] * s[i] of unsigned and signed bytes, in each of acc's lanes. Without
// VNNI, pairs of products are first summed to int16, which saturates past 32767: every caller keeps one side within
// 127 in size (x's codes from quantize_rows, or 4-bit codes) and the other within 128, so a pair's sum is at most
// 2 * 127 * 128 = 32512 and the result is exact, as with VNNI.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#ifdef LMFORGE_VNNI
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
#endif

}  // namespace

// (shared with decode_cpu.cpp's tiled products)
namespace lmforge {

// Each row of x (M, K) as int8 with one scale: q = round(x / s), s = max|x| / 127 (round half to even, as
// torch.round). A row holding NaN or infinity gets a NaN scale (and zero codes), so its outputs are NaN.
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* scales) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    int8_t* out = q + m * K;
    float amax = 0.f;
    bool finite = true;
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 bad = 0;  // lanes that held NaN or infinity (x - x is NaN exactly for those)
    for (; k + 16 <= K; k += 16) {
      __m512 v = _mm512_loadu_ps(row + k);
      bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_NEQ_UQ);
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    }
    finite = bad == 0;
    amax = _mm512_reduce_max_ps(vmax);
#elif defined(__AVX2__)
    __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();  // bad: lanes that held NaN or infinity
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (; k + 8 <= K; k += 8) {
      __m256 v = _mm256_loadu_ps(row + k);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ));
      vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, magnitude));
    }
    finite = _mm256_movemask_ps(bad) == 0;
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#endif
    for (; k < K; ++k) {
      finite = finite && std::isfinite(row[k]);
      amax = std::max(amax, std::fabs(row[k]));
    }
    float s = finite ? std::max(amax, 1e-12f) / 127.f : std::numeric_limits<float>::quiet_NaN();
    scales[m] = s;
    if (!finite) {
      std::memset(out, 0, K);
      continue;
    }
    k = 0;
#if defined(__AVX512F__)
    const __m512 vs = _mm512_set1_ps(s);  // the same division and round-half-to-even as the scalar loop
    for (; k + 16 <= K; k += 16) {
      __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(row + k), vs),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128((__m128i*)(out + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
    }
#elif defined(__AVX2__)
    const __m256 vs = _mm256_set1_ps(s);  // the same division and round-half-to-even as the scalar loop
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' interleaving of lanes
    auto codes = [&](int64_t at) {
      return _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(row + at), vs),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    };
    for (; k + 32 <= K; k += 32) {  // codes are within [-127, 127]: the packs never saturate
      __m256i ab = _mm256_packs_epi32(codes(k), codes(k + 8)), cd = _mm256_packs_epi32(codes(k + 16), codes(k + 24));
      _mm256_storeu_si256((__m256i*)(out + k), _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order));
    }
#endif
    for (; k < K; ++k) out[k] = (int8_t)std::nearbyint(row[k] / s);
  }
}

}  // namespace lmforge
using lmforge::quantize_rows;

namespace {

void check_vector(const at::Tensor& t, int64_t n, const char* name, at::ScalarType type = at::kFloat) {
  TORCH_CHECK(t.scalar_type() == type && t.is_contiguous() && t.numel() == n, name, ": contiguous ", type, " of ", n,
              " values");
}

// sum_k a[k] * b[k] for x's codes a (each within [-127, 127], from quantize_rows) and a weight row b (any int8).
inline int32_t dot_i8(const int8_t* a, const int8_t* b, int64_t K) {
  int64_t k = 0;
  int32_t acc = 0;
#ifdef LMFORGE_DOT256
  // The vector instructions multiply unsigned by signed bytes: |b| by a carrying b's sign (llama.cpp's trick, with the
  // roles chosen so that nothing negates -128: |b| <= 128 fits an unsigned byte, and a never holds -128).
  __m256i sum = _mm256_setzero_si256(), sum2 = _mm256_setzero_si256();  // two chains: neither waits on the other
  auto step = [](__m256i acc, __m256i va, __m256i vb) {
    return dot_u8s8(acc, _mm256_sign_epi8(vb, vb), _mm256_sign_epi8(va, vb));
  };
  for (; k + 64 <= K; k += 64) {
    sum = step(sum, _mm256_loadu_si256((const __m256i*)(a + k)), _mm256_loadu_si256((const __m256i*)(b + k)));
    sum2 = step(sum2, _mm256_loadu_si256((const __m256i*)(a + k + 32)),
                _mm256_loadu_si256((const __m256i*)(b + k + 32)));
  }
  for (; k + 32 <= K; k += 32)
    sum = step(sum, _mm256_loadu_si256((const __m256i*)(a + k)), _mm256_loadu_si256((const __m256i*)(b + k)));
  sum = _mm256_add_epi32(sum, sum2);
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  acc = _mm_cvtsi128_si32(s);
#endif
  for (; k < K; ++k) acc += (int32_t)a[k] * (int32_t)b[k];
  return acc;
}

}  // namespace

// y (M, N) = (x quantized per row) @ w^T * scales, + bias; w int8 (N, K), scales (N,), x float32 (M, K).
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 (M, K)");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous() && w.size(1) == x.size(1),
              "w: contiguous int8 (N, K)");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_vector(scales, N, "scales");
  if (bias.has_value()) check_vector(*bias, N, "bias");
  std::vector<int8_t> xq(M * K);
  std::vector<float> xs(M);
  quantize_rows(x.data_ptr<float>(), M, K, xq.data(), xs.data());
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t m = 0; m < M; ++m) {
        float v = (float)dot_i8(xq.data() + m * K, wp + n * K, K) * (xs[m] * sp[n]);
        yp[m * N + n] = bp ? v + bp[n] : v;
      }
    }
  });
  return y;
}

// y (M, N) = x @ W^T (+ bias) with W[n, g*G + j] = code * scales[n, g] + mins[n, g], codes in 0..15 packed two a
// byte: in each group's G/2 bytes the low nibbles hold its first half, the high nibbles its second half. x is
// quantized per row: y = s_x * sum_g (scales[n, g] * (codes . q) + mins[n, g] * sum(q)) over the group.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& mins,
                       const std::optional<at::Tensor>& bias, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 (M, K)");
  TORCH_CHECK(group > 0 && group % 2 == 0 && x.size(1) % group == 0, "group: an even size dividing K");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = group, groups = K / group;
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) * 2 == K,
              "w: contiguous uint8 (N, K / 2)");
  check_vector(scales, N * groups, "scales", at::kHalf);
  check_vector(mins, N * groups, "mins", at::kHalf);
  if (bias.has_value()) check_vector(*bias, N, "bias");
  std::vector<int8_t> xq(M * K);
  std::vector<float> xs(M);
  quantize_rows(x.data_ptr<float>(), M, K, xq.data(), xs.data());
  // Each group's sum of codes; and for the vector paths (G a multiple of 32) x's codes rearranged in xa to the
  // packed order, so that each load of packed bytes (their low nibbles, then their high ones) meets consecutive codes:
  // packed byte j of a group holds its elements j and G/2 + j.
#if defined(LMFORGE_VNNI)
  const bool vector = G % 32 == 0, quads = G == 32 && K % 128 == 0, pairs = G == 32 && K % 64 == 0 && !quads;
#elif defined(LMFORGE_DOT256)
  const bool vector = G % 32 == 0, quads = false, pairs = false;
#else
  const bool vector = false, quads = false, pairs = false;
#endif
  std::vector<int8_t> xa(vector ? M * K : 0);
  std::vector<float> xsum(M * groups);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* src = xq.data() + m * K + g * G;
      int8_t* row = vector ? xa.data() + m * K : nullptr;
      if (quads) {  // group g's 16 packed bytes meet [lows of g .. g+3] (64 codes), then [highs of g .. g+3]
        std::memcpy(row + (g / 4) * 128 + (g % 4) * 16, src, 16);
        std::memcpy(row + (g / 4) * 128 + (g % 4) * 16 + 64, src + 16, 16);
      } else if (pairs) {  // [lows of g, lows of g+1, highs of g, highs of g+1] for each pair of groups
        std::memcpy(row + (g / 2) * 64 + (g % 2) * 16, src, 16);
        std::memcpy(row + (g / 2) * 64 + (g % 2) * 16 + 32, src + 16, 16);
      } else if (vector) {  // each chunk of 16 packed bytes meets 32 codes [its lows, its highs]
        for (int64_t c = 0; c < G / 32; ++c) {
          std::memcpy(row + (g * (G / 32) + c) * 32, src + 16 * c, 16);
          std::memcpy(row + (g * (G / 32) + c) * 32 + 16, src + G / 2 + 16 * c, 16);
        }
      }
      int32_t total = 0;
      for (int64_t j = 0; j < G; ++j) total += src[j];
      xsum[m * groups + g] = (float)total;
    }
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  const at::Half* mp = mins.data_ptr<at::Half>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* wrow = wp + n * (K / 2);
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* qrow = xq.data() + m * K;
        float total = 0.f;
        int64_t g = 0;
#ifdef LMFORGE_VNNI
        if (quads) {  // groups of 32 four at a time: 64 packed bytes, their lows against 64 codes of x, their highs
          // against the next 64; int32 lanes [g x4, g+1 x4, g+2 x4, g+3 x4], each scaled by its group's float16 scale
          const int8_t* xrow = xa.data() + m * K;
          const uint16_t* srow = reinterpret_cast<const uint16_t*>(sp + n * groups);
          const __m512i low4 = _mm512_set1_epi8(0x0F);
          const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
          __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
          auto quad = [&](int64_t g4, __m512 acc) {
            __m512i p = _mm512_loadu_si512((const void*)(wrow + g4 * 16));
            __m512i dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(p, low4),
                                               _mm512_loadu_si512((const void*)(xrow + g4 * 32)));
            dots = _mm512_dpbusd_epi32(dots, _mm512_and_si512(_mm512_srli_epi16(p, 4), low4),
                                       _mm512_loadu_si512((const void*)(xrow + g4 * 32 + 64)));
            int64_t four;  // the four groups' float16 scales
            std::memcpy(&four, srow + g4, 8);
            __m512 scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi64_si128(four))));
            return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), scale, acc);
          };
          int64_t g4 = 0;
          for (; g4 + 8 <= groups; g4 += 8) {
            acc0 = quad(g4, acc0);
            acc1 = quad(g4 + 4, acc1);
          }
          for (; g4 < groups; g4 += 4) acc0 = quad(g4, acc0);
          total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
          g = groups;
        } else if (pairs) {  // groups of 32 two at a time: 32 packed bytes against 64 codes of x
          const int8_t* xrow = xa.data() + m * K;
          const at::Half* srow = sp + n * groups;
          const __m256i low4 = _mm256_set1_epi8(0x0F);
          const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
          __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
          auto pair = [&](int64_t g2) {  // groups g2 and g2 + 1, scaled: lanes [g2 x4, g2+1 x4, g2 x4, g2+1 x4]
            __m256i p = _mm256_loadu_si256((const __m256i*)(wrow + g2 * 16));
            __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(p, low4)),
                                               _mm256_and_si256(_mm256_srli_epi16(p, 4), low4), 1);
            __m512i dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes,
                                               _mm512_loadu_si512((const void*)(xrow + g2 * 32)));
            int32_t two;  // the two groups' float16 scales
            std::memcpy(&two, srow + g2, 4);
            __m512 scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(two))));
            return _mm512_mul_ps(_mm512_cvtepi32_ps(dots), scale);
          };
          int64_t g2 = 0;
          for (; g2 + 4 <= groups; g2 += 4) {
            acc0 = _mm512_add_ps(acc0, pair(g2));
            acc1 = _mm512_add_ps(acc1, pair(g2 + 2));
          }
          for (; g2 < groups; g2 += 2) acc0 = _mm512_add_ps(acc0, pair(g2));
          total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
          g = groups;
        }
#endif
#ifdef LMFORGE_DOT256
        if (vector && !quads && !pairs) {  // chunks of 16 packed bytes (32 weights of a group), two accumulation chains
          const int8_t* xrow = xa.data() + m * K;
          const __m128i low4 = _mm_set1_epi8(0x0F);
          __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();  // two chains: even and odd groups
          const at::Half* srow = sp + n * groups;
          auto group_dots = [&](int64_t g2) {  // the group's 8 partial int dot products, as floats
            __m256i dots = _mm256_setzero_si256();
            for (int64_t c = g2 * (G / 32); c < (g2 + 1) * (G / 32); ++c) {
              __m128i p = _mm_loadu_si128((const __m128i*)(wrow + c * 16));
              __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p, 4), low4), _mm_and_si128(p, low4));
              dots = dot_u8s8(dots, codes, _mm256_loadu_si256((const __m256i*)(xrow + c * 32)));
            }
            return _mm256_cvtepi32_ps(dots);
          };
          int64_t g2 = 0;
          for (; g2 + 2 <= groups; g2 += 2) {
            acc0 = _mm256_fmadd_ps(group_dots(g2), _mm256_set1_ps(static_cast<float>(srow[g2])), acc0);
            acc1 = _mm256_fmadd_ps(group_dots(g2 + 1), _mm256_set1_ps(static_cast<float>(srow[g2 + 1])), acc1);
          }
          if (g2 < groups)
            acc0 = _mm256_fmadd_ps(group_dots(g2), _mm256_set1_ps(static_cast<float>(srow[g2])), acc0);
          __m256 both = _mm256_add_ps(acc0, acc1);
          __m128 s = _mm_add_ps(_mm256_castps256_ps128(both), _mm256_extractf128_ps(both, 1));
          s = _mm_add_ps(s, _mm_movehl_ps(s, s));
          s = _mm_add_ss(s, _mm_movehdup_ps(s));
          total = _mm_cvtss_f32(s);
          g = groups;
        }
#endif
        for (; g < groups; ++g) {
          int32_t dot = 0;
          for (int64_t j = 0; j < G / 2; ++j) {
            uint8_t p = wrow[g * (G / 2) + j];
            dot += (int32_t)(p & 15) * qrow[g * G + j] + (int32_t)(p >> 4) * qrow[g * G + G / 2 + j];
          }
          total += (float)dot * static_cast<float>(sp[n * groups + g]);
        }
        float offset = 0.f;  // sum_g mins[n, g] * xsum[m, g]
        int64_t g3 = 0;
#ifdef LMFORGE_DOT256
        __m256 off = _mm256_setzero_ps();
        for (; g3 + 8 <= groups; g3 += 8)
          off = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mp + n * groups + g3))),
                                _mm256_loadu_ps(xsum.data() + m * groups + g3), off);
        __m128 o = _mm_add_ps(_mm256_castps256_ps128(off), _mm256_extractf128_ps(off, 1));
        o = _mm_add_ps(o, _mm_movehl_ps(o, o));
        offset = _mm_cvtss_f32(_mm_add_ss(o, _mm_movehdup_ps(o)));
#endif
        for (; g3 < groups; ++g3) offset += static_cast<float>(mp[n * groups + g3]) * xsum[m * groups + g3];
        float v = (total + offset) * xs[m];
        yp[m * N + n] = bp ? v + bp[n] : v;
      }
    }
  });
  return y;
}

// int4_linear on a copy laid out for decoding (Int4Linear.rows8 in lmforge/quantize.py): rows of W in blocks of 8,
// each block's packed bytes as w8 (blocks, K / 8, 8, 4): for every 4 bytes of a row, the same 4 bytes of the block's 8
// rows side by side; scales and minimums as (blocks, groups, 8). A 32-byte load then holds 4 bytes of each of 8 rows,
// so a product with x's 4 codes of that place (broadcast) gives the 8 rows' partial sums in 8 lanes, and the rows'
// scales and minimums of a group are one vector each: no horizontal sums, x's codes read once for 8 rows (as
// llama.cpp's repacked q4_0 does for AVX2). For every 32 codes of a row (4 places), the 16-bit lanes add up 8 pair
// sums of at most 2 * 15 * 127 each: at most 30480, exact in 16 bits, before a widening to 32 bits. For G a multiple
// of 32.
// y (M, N) = s_x * sum_g (scales[n, g] * (codes . q)_g + mins[n, g] * sum(q)_g) (+ bias), as int4_linear.
at::Tensor int4_linear_rows8(const at::Tensor& x, const at::Tensor& w8, const at::Tensor& scales8,
                             const at::Tensor& mins8, const std::optional<at::Tensor>& bias, int64_t group, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 (M, K)");
  const int64_t M = x.size(0), K = x.size(1), G = group, B = (N + 7) / 8;
  TORCH_CHECK(G > 0 && G % 32 == 0 && K % G == 0, "group: a multiple of 32 dividing K");
  const int64_t groups = K / G;
  TORCH_CHECK(w8.scalar_type() == at::kByte && w8.is_contiguous() && w8.dim() == 4 && w8.size(0) == B &&
                  w8.size(1) == K / 8 && w8.size(2) == 8 && w8.size(3) == 4,
              "w8: Int4Linear.rows8's contiguous uint8 (N / 8, K / 8, 8, 4)");
  for (const at::Tensor* t : {&scales8, &mins8})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->dim() == 3 && t->size(0) == B &&
                    t->size(1) == groups && t->size(2) == 8,
                "scales8, mins8: Int4Linear.rows8's contiguous float16 (N / 8, groups, 8)");
  if (bias.has_value()) check_vector(*bias, N, "bias");
  std::vector<int8_t> xq(M * K);
  std::vector<float> xs(M), xsum(M * groups);
  quantize_rows(x.data_ptr<float>(), M, K, xq.data(), xs.data());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      int32_t total = 0;
      for (int64_t j = 0; j < G; ++j) total += xq[m * K + g * G + j];
      xsum[m * groups + g] = (float)total;
    }
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* wp = w8.data_ptr<uint8_t>();
  const at::Half* sp = scales8.data_ptr<at::Half>();
  const at::Half* mp = mins8.data_ptr<at::Half>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* block = wp + b * (K / 2) * 8;  // (K / 8 places, 8 rows, 4 bytes)
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* q = xq.data() + m * K;
        float out[8];
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
        const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; ++g) {
          __m256i dots = _mm256_setzero_si256();
          for (int64_t c0 = 0; c0 < G / 8; c0 += 4) {  // 4 places of 4 bytes: 8 codes of each row per place
            __m256i pairs = _mm256_setzero_si256();
            for (int64_t c = c0; c < c0 + 4; ++c) {
              const __m256i p = _mm256_loadu_si256((const __m256i*)(block + (g * (G / 8) + c) * 32));
              int32_t lo, hi;  // x's codes that meet the low nibbles (group elements 4c..) and the high ones
              std::memcpy(&lo, q + g * G + 4 * c, 4);
              std::memcpy(&hi, q + g * G + G / 2 + 4 * c, 4);
              pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(_mm256_and_si256(p, low4), _mm256_set1_epi32(lo)));
              pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(p, 4), low4),
                                                                   _mm256_set1_epi32(hi)));
            }
            dots = _mm256_add_epi32(dots, _mm256_madd_epi16(pairs, ones));
          }
          const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sp + (b * groups + g) * 8)));
          const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mp + (b * groups + g) * 8)));
          acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), sc, acc);
          acc = _mm256_fmadd_ps(mn, _mm256_set1_ps(xsum[m * groups + g]), acc);
        }
        _mm256_storeu_ps(out, acc);
#else
        for (int r = 0; r < 8; ++r) {
          float total = 0.f;
          for (int64_t g = 0; g < groups; ++g) {
            int32_t dot = 0;
            for (int64_t c = 0; c < G / 8; ++c)
              for (int i = 0; i < 4; ++i) {
                const uint8_t byte = block[((g * (G / 8) + c) * 8 + r) * 4 + i];
                dot += (int32_t)(byte & 15) * q[g * G + 4 * c + i] +
                       (int32_t)(byte >> 4) * q[g * G + G / 2 + 4 * c + i];
              }
            const int64_t at = (b * groups + g) * 8 + r;
            total += (float)dot * static_cast<float>(sp[at]) + static_cast<float>(mp[at]) * xsum[m * groups + g];
          }
          out[r] = total;
        }
#endif
        for (int64_t r = 0; r < 8 && b * 8 + r < N; ++r) {
          const float v = out[r] * xs[m];
          yp[m * N + b * 8 + r] = bp ? v + bp[b * 8 + r] : v;
        }
      }
    }
  });
  return y;
}

TORCH_LIBRARY(lmforge_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scales, Tensor? bias) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor w, Tensor scales, Tensor mins, Tensor? bias, int group) -> Tensor");
  m.def("int4_linear_rows8(Tensor x, Tensor w8, Tensor scales8, Tensor mins8, Tensor? bias, int group, int n) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge_cpu, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("int4_linear_rows8", &int4_linear_rows8);
}
