// AVX-512 VNNI path: one `vpdpbusd` per 16 rows x 4 k x 1 token (u8 codes in {0,1,2} times
// s8 activations broadcast from memory, int32 lanes = output rows), the accumulator seeded
// with -sum(q_x) of the sub-block, as bitnet.cpp's I2_S kernel subtracts the activation
// sum. Compiled for AVX-512 by the pragma below, never -march=native; ternary_op.cpp calls
// it only when cpuid reports avx512f/bw/vl/vnni. Only intrinsics and plain loops in here.
#include <immintrin.h>

#include <cstring>

#include "ternary.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"   // GCC 12 false positives in avx512fintrin.h

namespace ccrl_ternary {
namespace {

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

constexpr int64_t kPrefetch = 2048;   // bytes of codes requested ahead of the streaming loop

// vpdpbusd accumulates in place (latency ~5 cycles), so a lone accumulator would stall:
// with few tokens each token gets P independent accumulators, summed at the end of the
// sub-block (integer adds, exact).
template <int T>
constexpr int chains() { return T <= 2 ? 4 : (T <= 4 ? 2 : 1); }

// MASK (batch 1-2, codes streamed): instead of `(v >> 2p) & 3` (a shift on the one port that
// also runs vpdpbusd) take `v & (3 << 2p)`, i.e. the codes times 4^p, into accumulator p, and
// divide by 4^p with one arithmetic shift per sub-block: exact, every term is a multiple of 4^p.
// (|sum| <= s / 4 * 4 * 128 * 127 < 2^31 for s <= 65536, checked by the caller.)
template <int T, bool PRE, bool MASK>
void block_avx512(const Tile& w, const Acts& a, int64_t m0, float* y, int64_t ldy, const uint8_t* pre) {
  constexpr int P = MASK ? 4 : chains<T>();
  const int64_t J = a.J, s = w.s;
  const __m512i m3 = _mm512_set1_epi8(3);
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int32_t>(w.ws_stride)));
  const int8_t* xq[T];
  for (int t = 0; t < T; ++t) xq[t] = a.q + (m0 + t) * a.k_pad;
  __m512 facc[T] = {};
  __m512 wsv = _mm512_setzero_ps();
  int32_t ws_group = -1;
  for (int64_t j = 0; j < J; ++j) {
    __m512i acc[T][P];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      acc[t][0] = _mm512_set1_epi32(a.nsx[(m0 + t) * J + j]);
      for (int c = 1; c < P; ++c) acc[t][c] = _mm512_setzero_si512();
    }
    for (int64_t kc = j * s; kc < (j + 1) * s; kc += kChunk) {
      __m512i v;
      if (!PRE) {
        v = _mm512_loadu_si512(w.codes + kc * 4);
        _mm_prefetch(reinterpret_cast<const char*>(w.codes + kc * 4 + kPrefetch), _MM_HINT_T0);
      }
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        __m512i c;
        if (PRE) {
          c = _mm512_loadu_si512(pre + (kc + 4 * p) * 16);
        } else if (MASK) {
          c = _mm512_and_si512(v, _mm512_set1_epi8(static_cast<char>(3 << (2 * p))));
        } else {
          c = _mm512_and_si512(_mm512_srli_epi16(v, 2 * p), m3);
        }
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) {
          acc[t][p % P] = _mm512_dpbusd_epi32(acc[t][p % P], c, bcast4(xq[t] + kc + 4 * p));
        }
      }
    }
    if (w.gj[j] != ws_group) {   // consecutive sub-blocks of one weight group share the scales
      ws_group = w.gj[j];
      wsv = w.ws_stride ? _mm512_i32gather_ps(idx, w.ws + ws_group, 4) : _mm512_set1_ps(w.ws[ws_group]);
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      __m512i sum = acc[t][0];
      if (MASK) {
        sum = _mm512_add_epi32(sum, _mm512_srai_epi32(acc[t][1], 2));
        sum = _mm512_add_epi32(sum, _mm512_srai_epi32(acc[t][2], 4));
        sum = _mm512_add_epi32(sum, _mm512_srai_epi32(acc[t][3], 6));
      } else {
        for (int c = 1; c < P; ++c) sum = _mm512_add_epi32(sum, acc[t][c]);
      }
      const __m512 st = _mm512_set1_ps(a.stepj[(m0 + t) * J + j]);
      const __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), st), wsv);
      facc[t] = j == 0 ? f : _mm512_add_ps(facc[t], f);
    }
  }
  for (int t = 0; t < T; ++t) {
    if (w.bias) facc[t] = _mm512_add_ps(facc[t], _mm512_loadu_ps(w.bias));
    _mm512_storeu_ps(y + t * ldy, facc[t]);
  }
}

void unpack_tile(const uint8_t* codes, int64_t k_pad, uint8_t* pre) {
  const __m512i m3 = _mm512_set1_epi8(3);
  for (int64_t kc = 0; kc < k_pad; kc += kChunk) {
    const __m512i v = _mm512_loadu_si512(codes + kc * 4);
    for (int p = 0; p < 4; ++p) {
      _mm512_storeu_si512(pre + (kc + 4 * p) * 16, _mm512_and_si512(_mm512_srli_epi16(v, 2 * p), m3));
    }
  }
}

template <bool PRE>
void run_block(int n, const Tile& w, const Acts& a, int64_t m0, float* y, int64_t ldy, const uint8_t* pre) {
  const bool mask = !PRE && w.s <= 65536;
  switch (n) {
    case 1:
      if (mask) {
        block_avx512<1, PRE, !PRE>(w, a, m0, y, ldy, pre);
      } else {
        block_avx512<1, PRE, false>(w, a, m0, y, ldy, pre);
      }
      break;
    case 2:
      if (mask) {
        block_avx512<2, PRE, !PRE>(w, a, m0, y, ldy, pre);
      } else {
        block_avx512<2, PRE, false>(w, a, m0, y, ldy, pre);
      }
      break;
    case 3: block_avx512<3, PRE, false>(w, a, m0, y, ldy, pre); break;
    case 4: block_avx512<4, PRE, false>(w, a, m0, y, ldy, pre); break;
    case 5: block_avx512<5, PRE, false>(w, a, m0, y, ldy, pre); break;
    case 6: block_avx512<6, PRE, false>(w, a, m0, y, ldy, pre); break;
    case 7: block_avx512<7, PRE, false>(w, a, m0, y, ldy, pre); break;
    default: block_avx512<8, PRE, false>(w, a, m0, y, ldy, pre); break;
  }
}

}  // namespace

void tile_avx512(const Tile& w, const Acts& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
                 uint8_t* scratch) {
  if (m1 - m0 <= kMaxTokens) {
    run_block<false>(static_cast<int>(m1 - m0), w, a, m0, y, ldy, nullptr);
    return;
  }
  unpack_tile(w.codes, a.k_pad, scratch);
  for (int64_t m = m0; m < m1; m += kMaxTokens) {
    const int64_t n = m1 - m < kMaxTokens ? m1 - m : kMaxTokens;
    run_block<true>(static_cast<int>(n), w, a, m, y + (m - m0) * ldy, ldy, scratch);
  }
}

void quant_act_avx512(const float* x, int64_t K, int64_t k_pad, int64_t block, int64_t s, int8_t* q,
                      float* stepj, int32_t* nsx) {
  (void)K;
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t b0 = 0; b0 < k_pad; b0 += block) {
    const int64_t b1 = b0 + block < k_pad ? b0 + block : k_pad;   // multiples of 16
    __m512 mx = _mm512_setzero_ps();
    for (int64_t k = b0; k < b1; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
    float lanes[16];
    _mm512_storeu_ps(lanes, mx);
    float amax = 0.0f;
    for (int i = 0; i < 16; ++i) amax = lanes[i] > amax ? lanes[i] : amax;
    const float step = (amax < 1e-5f ? 1e-5f : amax) / 127.0f;
    const __m512 vstep = _mm512_set1_ps(step);
    for (int64_t j = b0 / s; j < b1 / s; ++j) {
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = j * s; k < (j + 1) * s; k += 16) {
        // nearest-even conversion (MXCSR default), as torch.round; then clamp to +-127
        __m512i i = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(x + k), vstep));
        i = _mm512_min_epi32(_mm512_max_epi32(i, lo), hi);
        sum = _mm512_add_epi32(sum, i);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(i));
      }
      int32_t part[16];
      _mm512_storeu_si512(part, sum);
      int32_t tot = 0;
      for (int i = 0; i < 16; ++i) tot += part[i];
      nsx[j] = -tot;
      stepj[j] = step;
    }
  }
}

}  // namespace ccrl_ternary

#pragma GCC pop_options
