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
template <int T, bool MASK>
void block_avx512(const Tile& w, const Acts& a, int64_t m0, float* y, int64_t ldy) {
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
      const __m512i v = _mm512_loadu_si512(w.codes + kc * 4);
      _mm_prefetch(reinterpret_cast<const char*>(w.codes + kc * 4 + kPrefetch), _MM_HINT_T0);
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        __m512i c;
        if (MASK) {
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

}  // namespace

void unpack_tile_avx512(const uint8_t* codes, int64_t k_pad, uint8_t* pre) {
  const __m512i m3 = _mm512_set1_epi8(3);
  for (int64_t kc = 0; kc < k_pad; kc += kChunk) {
    const __m512i v = _mm512_loadu_si512(codes + kc * 4);
    for (int p = 0; p < 4; ++p) {
      _mm512_storeu_si512(pre + (kc + 4 * p) * 16, _mm512_and_si512(_mm512_srli_epi16(v, 2 * p), m3));
    }
  }
}

namespace {

void run_stream(int n, const Tile& w, const Acts& a, int64_t m0, float* y, int64_t ldy) {
  const bool mask = w.s <= 65536;
  switch (n) {
    case 1:
      if (mask) {
        block_avx512<1, true>(w, a, m0, y, ldy);
      } else {
        block_avx512<1, false>(w, a, m0, y, ldy);
      }
      break;
    case 2:
      if (mask) {
        block_avx512<2, true>(w, a, m0, y, ldy);
      } else {
        block_avx512<2, false>(w, a, m0, y, ldy);
      }
      break;
    case 3: block_avx512<3, false>(w, a, m0, y, ldy); break;
    case 4: block_avx512<4, false>(w, a, m0, y, ldy); break;
    case 5: block_avx512<5, false>(w, a, m0, y, ldy); break;
    case 6: block_avx512<6, false>(w, a, m0, y, ldy); break;
    case 7: block_avx512<7, false>(w, a, m0, y, ldy); break;
    default: block_avx512<8, false>(w, a, m0, y, ldy); break;
  }
}

// GEMM (more tokens than one streamed block): the tile's codes are unpacked to bytes one
// chunk of about kGemmK k values at a time (`pre`, 64 bytes per 4 k: exactly vpdpbusd's u8
// operand; gemm_chunk_k cuts a longer sub-block, whose int32 sums carry between chunks), then the product runs in register blocks of 16 rows x up to kGemmTokens tokens, so
// the chunk's unpacked codes and the activations of up to kGemmGroup tokens stay in L1 while
// every token block reuses them. 16 independent accumulators cover vpdpbusd's latency on both
// of its ports; the activation operands come from the interleaved copy (Acts::qi), 64
// consecutive bytes per 4 k, so the loop needs two pointers, not one per token. The float
// partial sums of up to kGemmGroup tokens live in a contiguous local buffer between sub-blocks
// (in y, rows N floats apart, they would fall into a few L1 sets and thrash), added in the
// same left-to-right order as the streamed path (so every path gives the same bits).
constexpr int kGemmTokens = 16;

// acc += codes (u8) . broadcast dword at p (s8), in place. Inline asm because GCC 12 copies
// the accumulator around `_mm512_dpbusd_epi32` when many are live (register moves and spills
// in the inner loop); the memory operand is an embedded {1to16} broadcast.
inline void dpbusd_bcast(__m512i& acc, __m512i codes, const int8_t* p) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(codes), "m"(*reinterpret_cast<const int32_t*>(p)));
}

// Sub-block j's k range inside the chunk [k0, k1): [ka, kb); the sub-block starts here when
// ka == j s (the accumulator is seeded) and ends here when kb == (j + 1) s (it is scaled).
// A sub-block longer than the chunk (s > kGemmK, e.g. one scale per token and tensor) carries
// its int32 sums to the next chunk in `carry` (exact).
inline int64_t clip_lo(int64_t j, int64_t s, int64_t k0) { return j * s > k0 ? j * s : k0; }
inline int64_t clip_hi(int64_t j, int64_t s, int64_t k1) { return (j + 1) * s < k1 ? (j + 1) * s : k1; }

template <int T>
void gemm_avx512(const uint8_t* pre, const float* wsT, const int32_t* gj, int64_t s, const Acts& a, int64_t m0,
                 int64_t k0, int64_t k1, float* facc, int32_t* carry) {
  const int64_t J = a.J;
  const int8_t* xb = a.qi + (m0 - a.qi_m0) * a.k_pad;   // [K_pad / 4][16][4], see Acts::qi
  for (int64_t j = k0 / s; j * s < k1; ++j) {
    const int64_t ka = clip_lo(j, s, k0), kb = clip_hi(j, s, k1);
    __m512i acc[T];
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      acc[t] = ka == j * s ? _mm512_set1_epi32(a.nsx[(m0 + t) * J + j]) : _mm512_loadu_si512(carry + t * kTile);
    }
    for (int64_t k = ka; k < kb; k += 4) {
      const __m512i c = _mm512_loadu_si512(pre + (k - k0) * 16);   // pre holds k in [k0, k1)
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) dpbusd_bcast(acc[t], c, xb + k * 16 + 4 * t);
    }
    if (kb < (j + 1) * s) {
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) _mm512_storeu_si512(carry + t * kTile, acc[t]);
      break;
    }
    const __m512 wsv = _mm512_loadu_ps(wsT + (gj ? gj[j] : 0) * kTile);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const __m512 st = _mm512_set1_ps(a.stepj[(m0 + t) * J + j]);
      const __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[t]), st), wsv);
      float* ft = facc + t * kTile;
      _mm512_storeu_ps(ft, j == 0 ? f : _mm512_add_ps(_mm512_loadu_ps(ft), f));   // facc: no alignment promised
    }
  }
}

// acc += codes (u8) . x (s8), in place (register operands; see dpbusd_bcast).
inline void dpbusd_reg(__m512i& acc, __m512i codes, __m512i x) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(codes), "v"(x));
}

// Two tiles (32 rows) x T <= 8 tokens: each activation broadcast is loaded once into a register
// and feeds two vpdpbusd, so a 4-k step loads 2 + T vectors for 2T products (16 rows x 16
// tokens loads 1 + 16 for 16).
template <int T>
void gemm2_avx512(const uint8_t* pre0, const uint8_t* pre1, const float* wsT0, const float* wsT1, const int32_t* gj,
                  int64_t s, const Acts& a, int64_t m0, int64_t k0, int64_t k1, float* facc0, float* facc1,
                  int32_t* carry0, int32_t* carry1) {
  const int64_t J = a.J, d = m0 - a.qi_m0;
  const int8_t* xb = a.qi + d / 16 * 16 * a.k_pad + d % 16 * 4;   // [K_pad / 4][16][4], see Acts::qi
  for (int64_t j = k0 / s; j * s < k1; ++j) {
    const int64_t ka = clip_lo(j, s, k0), kb = clip_hi(j, s, k1);
    __m512i acc0[T], acc1[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      if (ka == j * s) {
        acc0[t] = acc1[t] = _mm512_set1_epi32(a.nsx[(m0 + t) * J + j]);
      } else {
        acc0[t] = _mm512_loadu_si512(carry0 + t * kTile);
        acc1[t] = _mm512_loadu_si512(carry1 + t * kTile);
      }
    }
    for (int64_t k = ka; k < kb; k += 4) {
      const __m512i c0 = _mm512_loadu_si512(pre0 + (k - k0) * 16);   // pre holds k in [k0, k1)
      const __m512i c1 = _mm512_loadu_si512(pre1 + (k - k0) * 16);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const __m512i x = bcast4(xb + k * 16 + 4 * t);
        dpbusd_reg(acc0[t], c0, x);
        dpbusd_reg(acc1[t], c1, x);
      }
    }
    if (kb < (j + 1) * s) {
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        _mm512_storeu_si512(carry0 + t * kTile, acc0[t]);
        _mm512_storeu_si512(carry1 + t * kTile, acc1[t]);
      }
      break;
    }
    const int64_t g = gj ? gj[j] : 0;
    const __m512 ws0 = _mm512_loadu_ps(wsT0 + g * kTile), ws1 = _mm512_loadu_ps(wsT1 + g * kTile);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m512 st = _mm512_set1_ps(a.stepj[(m0 + t) * J + j]);
      const __m512 f0 = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc0[t]), st), ws0);
      const __m512 f1 = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc1[t]), st), ws1);
      float* p0 = facc0 + t * kTile;
      float* p1 = facc1 + t * kTile;
      _mm512_storeu_ps(p0, j == 0 ? f0 : _mm512_add_ps(_mm512_loadu_ps(p0), f0));
      _mm512_storeu_ps(p1, j == 0 ? f1 : _mm512_add_ps(_mm512_loadu_ps(p1), f1));
    }
  }
}

void gemm2_block(int n, const uint8_t* pre0, const uint8_t* pre1, const float* wsT0, const float* wsT1,
                 const int32_t* gj, int64_t s, const Acts& a, int64_t m0, int64_t k0, int64_t k1, float* f0, float* f1,
                 int32_t* c0, int32_t* c1) {
#define CCRL_GEMM2_CASE(T) \
  case T: gemm2_avx512<T>(pre0, pre1, wsT0, wsT1, gj, s, a, m0, k0, k1, f0, f1, c0, c1); break;
  switch (n) {
    CCRL_GEMM2_CASE(1) CCRL_GEMM2_CASE(2) CCRL_GEMM2_CASE(3) CCRL_GEMM2_CASE(4)
    CCRL_GEMM2_CASE(5) CCRL_GEMM2_CASE(6) CCRL_GEMM2_CASE(7)
    default: gemm2_avx512<8>(pre0, pre1, wsT0, wsT1, gj, s, a, m0, k0, k1, f0, f1, c0, c1); break;
  }
#undef CCRL_GEMM2_CASE
}

// One instantiation per block width (plain switch, no std:: templates: nothing compiled for
// AVX-512 in this file may be merged into code the other paths call, see ternary_avx2.cpp).
void gemm_block(int n, const uint8_t* pre, const float* wsT, const int32_t* gj, int64_t s, const Acts& a,
                int64_t m0, int64_t k0, int64_t k1, float* facc, int32_t* carry) {
#define CCRL_GEMM_CASE(T) \
  case T: gemm_avx512<T>(pre, wsT, gj, s, a, m0, k0, k1, facc, carry); break;
  switch (n) {
    CCRL_GEMM_CASE(1) CCRL_GEMM_CASE(2) CCRL_GEMM_CASE(3) CCRL_GEMM_CASE(4)
    CCRL_GEMM_CASE(5) CCRL_GEMM_CASE(6) CCRL_GEMM_CASE(7) CCRL_GEMM_CASE(8)
    CCRL_GEMM_CASE(9) CCRL_GEMM_CASE(10) CCRL_GEMM_CASE(11) CCRL_GEMM_CASE(12)
    CCRL_GEMM_CASE(13) CCRL_GEMM_CASE(14) CCRL_GEMM_CASE(15)
    default: gemm_avx512<16>(pre, wsT, gj, s, a, m0, k0, k1, facc, carry); break;
  }
#undef CCRL_GEMM_CASE
}

}  // namespace

float* tile_scales(const Tile& w, int64_t j0, int64_t j1, uint8_t* at) {
  float* wsT = reinterpret_cast<float*>(at);
  const int64_t g0 = w.ws_stride ? w.gj[j0] : 0, g1 = w.ws_stride ? w.gj[j1 - 1] + 1 : 1;
  for (int64_t g = g0; g < g1; ++g) {
    for (int r = 0; r < kTile; ++r) wsT[g * kTile + r] = w.ws_stride ? w.ws[r * w.ws_stride + g] : w.ws[0];
  }
  return wsT;
}

void store_rows(const float* facc, const float* bias, int64_t n, float* y, int64_t ldy) {
  const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const __m512 f = _mm512_loadu_ps(facc + t * kTile);
    _mm512_storeu_ps(y + t * ldy, bias ? _mm512_add_ps(f, b) : f);
  }
}

namespace {

// One K chunk [k0, k1) of tokens [m0, m1) (at most kGemmGroup) on one full tile, float partial
// sums in facc[(m - m0) * 16 + r] (set by sub-block 0, added to after), int32 sums of a sub-block
// that continues into the next chunk in carry (same layout).
void gemm_chunk_avx512(const Tile& w, const Acts& a, int64_t m0, int64_t m1, int64_t k0, int64_t k1, float* facc,
                       int32_t* carry, uint8_t* scratch) {
  const int64_t s = w.s;
  unpack_tile_avx512(w.codes + k0 * 4, k1 - k0, scratch);
  const float* wsT = tile_scales(w, k0 / s, (k1 + s - 1) / s, scratch + kTile * a.k_pad);
  for (int64_t m = m0; m < m1; m += kGemmTokens) {
    const int64_t n = m1 - m < kGemmTokens ? m1 - m : kGemmTokens;
    gemm_block(static_cast<int>(n), scratch, wsT, w.ws_stride ? w.gj : nullptr, s, a, m, k0, k1,
               facc + (m - m0) * kTile, carry + (m - m0) * kTile);
  }
}

}  // namespace

int64_t gemm_chunk_k(int64_t s) { return s >= kGemmK ? kGemmK : kGemmK / s * s; }

void tile_avx512(const Tile& w, const Acts& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
                 uint8_t* scratch) {
  if (m1 - m0 <= kMaxTokens) {
    run_stream(static_cast<int>(m1 - m0), w, a, m0, y, ldy);
    return;
  }
  const int64_t L = gemm_chunk_k(w.s);
  for (int64_t mb = m0; mb < m1; mb += kGemmGroup) {
    const int64_t me = mb + kGemmGroup < m1 ? mb + kGemmGroup : m1;
    alignas(64) float facc[kGemmGroup * kTile];
    alignas(64) int32_t carry[kGemmGroup * kTile];
    for (int64_t k0 = 0; k0 < a.k_pad; k0 += L) {
      gemm_chunk_avx512(w, a, mb, me, k0, k0 + L < a.k_pad ? k0 + L : a.k_pad, facc, carry, scratch);
    }
    store_rows(facc, w.bias, me - mb, y + (mb - m0) * ldy, ldy);
  }
}

void tile_pair_avx512(const Tile& w0, const Tile& w1, const Acts& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
                      uint8_t* scratch) {
  if (m1 - m0 <= kMaxTokens) {
    run_stream(static_cast<int>(m1 - m0), w0, a, m0, y, ldy);
    run_stream(static_cast<int>(m1 - m0), w1, a, m0, y + kTile, ldy);
    return;
  }
  const int64_t J = a.J, s = w0.s, kp = a.k_pad;
  const int64_t groups = w0.ws_stride ? w0.gj[J - 1] + 1 : 1;
  uint8_t* pre0 = scratch;
  uint8_t* pre1 = scratch + kTile * kp;
  uint8_t* ws_at0 = scratch + 2 * kTile * kp;
  uint8_t* ws_at1 = ws_at0 + kTile * sizeof(float) * groups;
  const int32_t* gj = w0.ws_stride ? w0.gj : nullptr;
  const int64_t L = gemm_chunk_k(s);
  for (int64_t mb = m0; mb < m1; mb += kGemmGroup) {
    const int64_t me = mb + kGemmGroup < m1 ? mb + kGemmGroup : m1;
    alignas(64) float facc0[kGemmGroup * kTile];
    alignas(64) float facc1[kGemmGroup * kTile];
    alignas(64) int32_t carry0[kGemmGroup * kTile];
    alignas(64) int32_t carry1[kGemmGroup * kTile];
    for (int64_t k0 = 0; k0 < kp; k0 += L) {
      const int64_t k1 = k0 + L < kp ? k0 + L : kp;
      unpack_tile_avx512(w0.codes + k0 * 4, k1 - k0, pre0);
      unpack_tile_avx512(w1.codes + k0 * 4, k1 - k0, pre1);
      const float* wsT0 = tile_scales(w0, k0 / s, (k1 + s - 1) / s, ws_at0);
      const float* wsT1 = tile_scales(w1, k0 / s, (k1 + s - 1) / s, ws_at1);
      for (int64_t m = mb; m < me; m += kMaxTokens) {
        const int64_t n = me - m < kMaxTokens ? me - m : kMaxTokens;
        gemm2_block(static_cast<int>(n), pre0, pre1, wsT0, wsT1, gj, s, a, m, k0, k1, facc0 + (m - mb) * kTile,
                    facc1 + (m - mb) * kTile, carry0 + (m - mb) * kTile, carry1 + (m - mb) * kTile);
      }
    }
    store_rows(facc0, w0.bias, me - mb, y + (mb - m0) * ldy, ldy);
    store_rows(facc1, w1.bias, me - mb, y + (mb - m0) * ldy + kTile, ldy);
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
