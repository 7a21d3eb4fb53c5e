// Lookup-table GEMV experiment (batch 1, AVX2), the T-MAC / bitnet.cpp TL1 idea on the same
// 2-bit codes: a 4-bit index = the codes of 2 weights of one row (c0 + 4 c1) selects one of
// 9 precomputed partial sums (c0 - 1) x_a + (c1 - 1) x_b of an activation pair. The sums need
// int16 (|.| <= 254), so each pair has a low-byte and a high-byte 16-entry table, looked up
// with `vpshufb` for 32 rows at once and re-joined with `vpunpck{l,h}bw`. Layout: row groups
// of 32, for each 4 k values one 32-byte vector (byte r: codes of row r at k..k+3).
//
// Same integer sums and the same float epilogue as the dot-product kernel, so it is
// bit-identical to it; policies/packed.py records why the dot-product kernel is the one used.
#include <immintrin.h>

#include <cstring>

#include "ternary.h"

namespace ccrl_ternary {

int64_t tl_layout_bytes(int64_t N, int64_t k_pad) { return N * k_pad / 4; }

void tl_pack(const uint8_t* i2, int64_t N, int64_t k_pad, uint8_t* out) {
  std::memset(out, 0, N * k_pad / 4);
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* tile = i2 + (n / kTile) * kTile * k_pad / 4;
    const int64_t l = n % kTile;
    for (int64_t k = 0; k < k_pad; ++k) {
      const int code = (tile[(k / 16) * 64 + 4 * l + k % 4] >> (2 * ((k % 16) / 4))) & 3;
      out[((n / 32) * (k_pad / 4) + k / 4) * 32 + n % 32] |= static_cast<uint8_t>(code << (2 * (k % 4)));
    }
  }
}

void tl_build_lut(const int8_t* q, int64_t k_pad, int8_t* lut) {
  for (int64_t pr = 0; pr < k_pad / 2; ++pr) {
    const int xa = q[2 * pr], xb = q[2 * pr + 1];
    int8_t* lo = lut + pr * 32;
    int8_t* hi = lo + 16;
    for (int idx = 0; idx < 16; ++idx) {
      const int c0 = idx & 3, c1 = idx >> 2;
      const int v = (c0 < 3 && c1 < 3) ? (c0 - 1) * xa + (c1 - 1) * xb : 0;
      lo[idx] = static_cast<int8_t>(v & 0xff);
      hi[idx] = static_cast<int8_t>(v >> 8);
    }
  }
}

#pragma GCC push_options
#pragma GCC target("avx2")

void tl_rows_avx2(const uint8_t* tl_codes, int64_t k_pad, const int8_t* lut, const float* stepj, int64_t J,
                  const float* ws, int64_t ws_stride, const int32_t* gj, int64_t s, int64_t r0, int64_t r1,
                  float* y) {
  const __m256i m15 = _mm256_set1_epi8(15);
  const __m256i lanes = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                           _mm256_set1_epi32(static_cast<int32_t>(ws_stride)));
  for (int64_t rg = r0 / 32; rg < r1 / 32; ++rg) {
    const uint8_t* base = tl_codes + rg * (k_pad / 4) * 32;
    __m256 facc[4] = {};
    for (int64_t j = 0; j < J; ++j) {
      __m256i acc32[4];
      for (int q = 0; q < 4; ++q) acc32[q] = _mm256_setzero_si256();
      for (int64_t w0 = j * s; w0 < (j + 1) * s; w0 += 64) {
        const int64_t w1 = w0 + 64 < (j + 1) * s ? w0 + 64 : (j + 1) * s;
        __m256i acc_a = _mm256_setzero_si256(), acc_b = _mm256_setzero_si256();
        for (int64_t i = w0 / 4; i < w1 / 4; ++i) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + i * 32));
          const __m256i lo = _mm256_and_si256(v, m15);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
          const int8_t* t = lut + i * 64;
          const __m256i ta_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
          const __m256i ta_hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16)));
          const __m256i tb_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 32)));
          const __m256i tb_hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 48)));
          const __m256i la = _mm256_shuffle_epi8(ta_lo, lo), ha = _mm256_shuffle_epi8(ta_hi, lo);
          const __m256i lb = _mm256_shuffle_epi8(tb_lo, hi), hb = _mm256_shuffle_epi8(tb_hi, hi);
          acc_a = _mm256_add_epi16(acc_a, _mm256_add_epi16(_mm256_unpacklo_epi8(la, ha), _mm256_unpacklo_epi8(lb, hb)));
          acc_b = _mm256_add_epi16(acc_b, _mm256_add_epi16(_mm256_unpackhi_epi8(la, ha), _mm256_unpackhi_epi8(lb, hb)));
        }
        // acc_a: rows 0-7 | 16-23, acc_b: rows 8-15 | 24-31
        acc32[0] = _mm256_add_epi32(acc32[0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc_a)));
        acc32[1] = _mm256_add_epi32(acc32[1], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc_b)));
        acc32[2] = _mm256_add_epi32(acc32[2], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc_a, 1)));
        acc32[3] = _mm256_add_epi32(acc32[3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc_b, 1)));
      }
      const __m256 st = _mm256_set1_ps(stepj[j]);
      for (int q = 0; q < 4; ++q) {
        const __m256 wsv = _mm256_i32gather_ps(ws + (rg * 32 + 8 * q) * ws_stride + gj[j], lanes, 4);
        const __m256 f = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc32[q]), st), wsv);
        facc[q] = j == 0 ? f : _mm256_add_ps(facc[q], f);
      }
    }
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(y + rg * 32 + 8 * q, facc[q]);
  }
}

#pragma GCC pop_options

}  // namespace ccrl_ternary
