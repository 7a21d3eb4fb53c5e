// AVX2 path (no VNNI): `vpmaddubsw` (u8 codes x s8 activations -> int16 pairs), int16
// partial sums over windows of 64 k (|sum| <= 16 * 2 * 2 * 127 = 8128, no saturation), then
// `vpmaddwd` by ones to int32. Each 256-bit vector covers 8 rows of a 16-row tile (the two
// halves of a 64-byte chunk). Compiled for AVX2 by the pragma below, never -march=native;
// ternary_op.cpp calls it only when the CPU has AVX2. Only intrinsics and plain loops in
// here (no std:: templates), so no AVX2 code can leak into the other paths via COMDAT.
#include <immintrin.h>

#include <cstring>

#include "ternary.h"

#pragma GCC push_options
#pragma GCC target("avx2")

namespace ccrl_ternary {
namespace {

constexpr int kTokensAvx2 = 4;

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// int16 partial sums of tokens [0, T) over k in [w0, w1) (at most 64 values, so no overflow).
template <int T, bool PRE>
inline void window_avx2(const uint8_t* codes, const uint8_t* pre, const int8_t* const* xq, int64_t w0, int64_t w1,
                        __m256i (&acc)[T][2]) {
  const __m256i m3 = _mm256_set1_epi8(3);
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_si256();
  if (PRE) {
    for (int64_t k = w0; k < w1; k += 4) {
      const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pre + k * 16));
      const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pre + k * 16 + 32));
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const __m256i xb = bcast4(xq[t] + k);
        acc[t][0] = _mm256_add_epi16(acc[t][0], _mm256_maddubs_epi16(c0, xb));
        acc[t][1] = _mm256_add_epi16(acc[t][1], _mm256_maddubs_epi16(c1, xb));
      }
    }
    return;
  }
  for (int64_t kc = w0; kc < w1; kc += kChunk) {
    _mm_prefetch(reinterpret_cast<const char*>(codes + kc * 4 + 2048), _MM_HINT_T0);
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + kc * 4));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + kc * 4 + 32));
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m256i c0 = _mm256_and_si256(_mm256_srli_epi16(v0, 2 * p), m3);
      const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(v1, 2 * p), m3);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const __m256i xb = bcast4(xq[t] + kc + 4 * p);
        acc[t][0] = _mm256_add_epi16(acc[t][0], _mm256_maddubs_epi16(c0, xb));
        acc[t][1] = _mm256_add_epi16(acc[t][1], _mm256_maddubs_epi16(c1, xb));
      }
    }
  }
}

// Tokens [m0, m0 + T) of one tile; PRE: codes already unpacked to one byte each
// (layout [K_pad / 4][64 bytes], see unpack_tile). The int32 and float accumulators live in
// (L1) memory so that the 2T int16 accumulators of the inner loop keep the 16 registers.
template <int T, bool PRE>
void block_avx2(const Tile& w, const Acts& a, int64_t m0, float* y, int64_t ldy, const uint8_t* pre) {
  const int64_t J = a.J, s = w.s;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i idx0 = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_epi32(static_cast<int32_t>(w.ws_stride)));
  const __m256i idx1 = _mm256_add_epi32(idx0, _mm256_set1_epi32(static_cast<int32_t>(8 * w.ws_stride)));
  const int8_t* xq[T];
  for (int t = 0; t < T; ++t) xq[t] = a.q + (m0 + t) * a.k_pad;
  alignas(32) int32_t acc32[T][16];
  alignas(32) float facc[T][16];
  for (int64_t j = 0; j < J; ++j) {
    for (int t = 0; t < T; ++t) {
      const __m256i init = _mm256_set1_epi32(a.nsx[(m0 + t) * J + j]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(acc32[t]), init);
      _mm256_store_si256(reinterpret_cast<__m256i*>(acc32[t] + 8), init);
    }
    for (int64_t w0 = j * s; w0 < (j + 1) * s; w0 += 64) {
      const int64_t w1 = w0 + 64 < (j + 1) * s ? w0 + 64 : (j + 1) * s;
      __m256i acc16[T][2];
      window_avx2<T, PRE>(w.codes, pre, xq, w0, w1, acc16);
      for (int t = 0; t < T; ++t) {
        for (int h = 0; h < 2; ++h) {
          __m256i* dst = reinterpret_cast<__m256i*>(acc32[t] + 8 * h);
          _mm256_store_si256(dst, _mm256_add_epi32(_mm256_load_si256(dst), _mm256_madd_epi16(acc16[t][h], ones)));
        }
      }
    }
    const float* wsj = w.ws + w.gj[j];
    const __m256 ws0 = _mm256_i32gather_ps(wsj, idx0, 4);
    const __m256 ws1 = _mm256_i32gather_ps(wsj, idx1, 4);
    for (int t = 0; t < T; ++t) {
      const __m256 st = _mm256_set1_ps(a.stepj[(m0 + t) * J + j]);
      for (int h = 0; h < 2; ++h) {
        const __m256i acc = _mm256_load_si256(reinterpret_cast<const __m256i*>(acc32[t] + 8 * h));
        const __m256 f = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), st), h ? ws1 : ws0);
        _mm256_store_ps(facc[t] + 8 * h, j == 0 ? f : _mm256_add_ps(_mm256_load_ps(facc[t] + 8 * h), f));
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int h = 0; h < 2; ++h) {
      __m256 f = _mm256_load_ps(facc[t] + 8 * h);
      if (w.bias) f = _mm256_add_ps(f, _mm256_loadu_ps(w.bias + 8 * h));
      _mm256_storeu_ps(y + t * ldy + 8 * h, f);
    }
  }
}

void unpack_tile(const uint8_t* codes, int64_t k_pad, uint8_t* pre) {
  const __m256i m3 = _mm256_set1_epi8(3);
  for (int64_t kc = 0; kc < k_pad; kc += kChunk) {
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + kc * 4));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + kc * 4 + 32));
    for (int p = 0; p < 4; ++p) {
      uint8_t* dst = pre + (kc + 4 * p) * 16;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_and_si256(_mm256_srli_epi16(v0, 2 * p), m3));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32),
                          _mm256_and_si256(_mm256_srli_epi16(v1, 2 * p), m3));
    }
  }
}

template <bool PRE>
void run_block(int n, const Tile& w, const Acts& a, int64_t m0, float* y, int64_t ldy, const uint8_t* pre) {
  switch (n) {
    case 1: block_avx2<1, PRE>(w, a, m0, y, ldy, pre); break;
    case 2: block_avx2<2, PRE>(w, a, m0, y, ldy, pre); break;
    case 3: block_avx2<3, PRE>(w, a, m0, y, ldy, pre); break;
    default: block_avx2<4, PRE>(w, a, m0, y, ldy, pre); break;
  }
}

}  // namespace

void tile_avx2(const Tile& w, const Acts& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
               uint8_t* scratch) {
  if (m1 - m0 <= kTokensAvx2) {
    run_block<false>(static_cast<int>(m1 - m0), w, a, m0, y, ldy, nullptr);
    return;
  }
  unpack_tile(w.codes, a.k_pad, scratch);
  for (int64_t m = m0; m < m1; m += kTokensAvx2) {
    const int64_t n = m1 - m < kTokensAvx2 ? m1 - m : kTokensAvx2;
    run_block<true>(static_cast<int>(n), w, a, m, y + (m - m0) * ldy, ldy, scratch);
  }
}

void quant_act_avx2(const float* x, int64_t K, int64_t k_pad, int64_t block, int64_t s, int8_t* q,
                    float* stepj, int32_t* nsx) {
  (void)K;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b0 = 0; b0 < k_pad; b0 += block) {
    const int64_t b1 = b0 + block < k_pad ? b0 + block : k_pad;   // multiples of 16
    __m256 mx = _mm256_setzero_ps();
    for (int64_t k = b0; k < b1; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + k), absmask));
    float lanes[8];
    _mm256_storeu_ps(lanes, mx);
    float amax = 0.0f;
    for (int i = 0; i < 8; ++i) amax = lanes[i] > amax ? lanes[i] : amax;
    const float step = (amax < 1e-5f ? 1e-5f : amax) / 127.0f;
    const __m256 vstep = _mm256_set1_ps(step);
    for (int64_t j = b0 / s; j < b1 / s; ++j) {
      __m256i sum = _mm256_setzero_si256();
      for (int64_t k = j * s; k < (j + 1) * s; k += 16) {
        // nearest-even conversion (MXCSR default), as torch.round; then clamp to +-127
        __m256i i0 = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + k), vstep));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + k + 8), vstep));
        i0 = _mm256_min_epi32(_mm256_max_epi32(i0, lo), hi);
        i1 = _mm256_min_epi32(_mm256_max_epi32(i1, lo), hi);
        sum = _mm256_add_epi32(sum, _mm256_add_epi32(i0, i1));
        const __m256i w16 = _mm256_packs_epi32(i0, i1);           // 0-3 8-11 | 4-7 12-15
        const __m256i w8 = _mm256_packs_epi16(w16, w16);          // bytes, same order twice
        const __m256i ord = _mm256_permutevar8x32_epi32(w8, perm);  // 0-3 4-7 8-11 12-15 ...
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm256_castsi256_si128(ord));
      }
      int32_t part[8];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(part), sum);
      int32_t tot = 0;
      for (int i = 0; i < 8; ++i) tot += part[i];
      nsx[j] = -tot;
      stepj[j] = step;
    }
  }
}

}  // namespace ccrl_ternary

#pragma GCC pop_options
