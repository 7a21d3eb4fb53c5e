// AMX path (Sapphire Rapids and later): the GEMM (more tokens than one streamed block) on the
// tile matrix unit; fewer tokens use the AVX-512 VNNI streamed kernel (a GEMV is bound by
// memory, not by multiply-adds). Compiled for AMX by the pragma below, never -march=native;
// ternary_op.cpp calls it only when cpuid reports AMX-TILE/AMX-INT8 and the kernel granted
// this process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM).
//
// One `tdpbssd` multiplies 16 tokens x tk k (s8 activations, tile A: one contiguous 16 x tk
// block of the copy in Acts::qi, whose blocks of 16 tokens are interleaved per tk k) by tk k x 16 rows (s8 weights in {-1, 0, 1}, tile B: the
// unpacked `[K_pad / 4][16 rows][4]` layout of the VNNI GEMM with 1 subtracted from each code),
// accumulating int32 in tile C = [16 tokens][16 rows] with tk = 64 (or 32 / 16 when the
// sub-block is not a multiple of 64): 16384 multiply-adds where vpdpbusd does 64. Signed
// weights make C the sub-block's exact sum itself (the VNNI paths multiply the u8 codes w + 1
// and subtract sum(q_x)). C is zeroed at each sub-block, stored after it and scaled by AVX-512
// code identical to the other paths: y += (float(acc) * step) * w_scale, left to right over
// sub-blocks. That epilogue, not the tile unit, is the cost: 16 tokens x 4 vector operations
// (convert, two products, add) per 16 x 16 x 64 block against 16 cycles of `tdpbssd`.
#include <immintrin.h>

#include <cstring>

#include "ternary.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,amx-tile,amx-int8")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"   // GCC 12 false positives in avx512fintrin.h

namespace ccrl_ternary {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0-3 = C of up to 4 blocks of 16 tokens [16 tokens][16 int32]; tmm4 = B [tk / 4][64 bytes]
// (the weights, shared by the 4 products); tmm5, tmm6 = A [16 tokens][tk bytes], alternating so a
// load overlaps the previous product.
void configure(int tk) {
  TileConfig cfg;
  for (int i = 0; i < 4; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  cfg.rows[4] = static_cast<uint8_t>(tk / 4);
  cfg.colsb[4] = 64;
  for (int i = 5; i < 7; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = static_cast<uint16_t>(tk);
  }
  _tile_loadconfig(&cfg);
}

// The k range [k0, k1) (pre holds its weights) for tokens [m, m + n), NB = ceil(n / 16) <= 4
// blocks of 16; a sub-block longer than the range keeps its sums in the C tiles from one range
// to the next (zeroed where it starts, stored and scaled where it ends). xq is
// token m's block of Acts::qi at k = 0 (layout [K_pad / tk][qi_blocks][16][tk]: block i's A
// tile at k is at xq + k * 16 * qi_blocks + 16 * tk * i). The NB products of one sub-block are
// independent chains; their stores and the vector epilogue of all n tokens follow.
template <int NB>
void block_amx(const uint8_t* pre, const float* wsT, const int32_t* gj, int64_t s, int tk, const Acts& a,
               const int8_t* xq, int64_t m, int n, int64_t k0, int64_t k1, float* facc) {
  alignas(64) int32_t c[NB * 16][16];
  const int64_t J = a.J, kstep = 16 * a.qi_blocks, bstep = 16 * tk;
  for (int64_t j = k0 / s; j * s < k1; ++j) {
    const int64_t ka = j * s > k0 ? j * s : k0, kb = (j + 1) * s < k1 ? (j + 1) * s : k1;
    if (ka == j * s) {
      _tile_zero(0);
      if (NB > 1) _tile_zero(1);
      if (NB > 2) _tile_zero(2);
      if (NB > 3) _tile_zero(3);
    }
    for (int64_t k = ka; k < kb; k += tk) {
      const int8_t* xk = xq + k * kstep;
      _tile_loadd(4, pre + (k - k0) * 16, 64);   // pre holds k in [k0, k1)
      _tile_loadd(5, xk, tk);
      _tile_dpbssd(0, 5, 4);
      if (NB > 1) {
        _tile_loadd(6, xk + bstep, tk);
        _tile_dpbssd(1, 6, 4);
      }
      if (NB > 2) {
        _tile_loadd(5, xk + 2 * bstep, tk);
        _tile_dpbssd(2, 5, 4);
      }
      if (NB > 3) {
        _tile_loadd(6, xk + 3 * bstep, tk);
        _tile_dpbssd(3, 6, 4);
      }
    }
    if (kb < (j + 1) * s) break;   // the sub-block goes on in the next range
    _tile_stored(0, c[0], 64);
    if (NB > 1) _tile_stored(1, c[16], 64);
    if (NB > 2) _tile_stored(2, c[32], 64);
    if (NB > 3) _tile_stored(3, c[48], 64);
    const __m512 wsv = _mm512_loadu_ps(wsT + (gj ? gj[j] : 0) * kTile);
    for (int t = 0; t < n; ++t) {
      const __m512i acc = _mm512_load_si512(c[t]);
      const __m512 st = _mm512_set1_ps(a.stepj[(m + t) * J + j]);
      const __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), st), wsv);
      float* ft = facc + t * kTile;
      _mm512_storeu_ps(ft, j == 0 ? f : _mm512_add_ps(_mm512_loadu_ps(ft), f));   // facc: no alignment promised
    }
  }
}

}  // namespace

namespace {

// The tile's codes as signed weights c - 1 in {-1, 0, 1}, [K_pad / 4][16 rows][4] (tile B of tdpbssd).
void unpack_tile_signed(const uint8_t* codes, int64_t k_pad, uint8_t* pre) {
  const __m512i m3 = _mm512_set1_epi8(3), one = _mm512_set1_epi8(1);
  for (int64_t kc = 0; kc < k_pad; kc += kChunk) {
    const __m512i v = _mm512_loadu_si512(codes + kc * 4);
    for (int p = 0; p < 4; ++p) {
      const __m512i c = _mm512_and_si512(_mm512_srli_epi16(v, 2 * p), m3);
      _mm512_storeu_si512(pre + (kc + 4 * p) * 16, _mm512_sub_epi8(c, one));
    }
  }
}

void gemm_chunk_amx(const Tile& w, const Acts& a, int64_t m0, int64_t m1, int64_t k0, int64_t k1, float* facc,
                    uint8_t* scratch) {
  const int64_t s = w.s;
  const int tk = amx_depth(s);
  unpack_tile_signed(w.codes + k0 * 4, k1 - k0, scratch);
  const float* wsT = tile_scales(w, k0 / s, (k1 + s - 1) / s, scratch + kTile * a.k_pad);
  // Acts::qi: blocks of 16 tokens (zero rows past the last), so 16-row loads stay in bounds.
  const int8_t* xq = a.qi + (m0 - a.qi_m0) * tk;
  const int32_t* gj = w.ws_stride ? w.gj : nullptr;
  const int n = static_cast<int>(m1 - m0);
  switch ((n + 15) / 16) {
    case 1: block_amx<1>(scratch, wsT, gj, s, tk, a, xq, m0, n, k0, k1, facc); break;
    case 2: block_amx<2>(scratch, wsT, gj, s, tk, a, xq, m0, n, k0, k1, facc); break;
    case 3: block_amx<3>(scratch, wsT, gj, s, tk, a, xq, m0, n, k0, k1, facc); break;
    default: block_amx<4>(scratch, wsT, gj, s, tk, a, xq, m0, n, k0, k1, facc); break;
  }
}

}  // namespace

void tile_amx(const Tile& w, const Acts& a, int64_t m0, int64_t m1, float* y, int64_t ldy, uint8_t* scratch) {
  if (m1 - m0 <= kMaxTokens) {
    tile_avx512(w, a, m0, m1, y, ldy, scratch);
    return;
  }
  configure(amx_depth(w.s));
  const int64_t L = gemm_chunk_k(w.s);   // a multiple of the tile depth
  for (int64_t mb = m0; mb < m1; mb += kGemmGroup) {
    const int64_t me = mb + kGemmGroup < m1 ? mb + kGemmGroup : m1;
    alignas(64) float facc[kGemmGroup * kTile];
    for (int64_t k0 = 0; k0 < a.k_pad; k0 += L) {
      gemm_chunk_amx(w, a, mb, me, k0, k0 + L < a.k_pad ? k0 + L : a.k_pad, facc, scratch);
    }
    store_rows(facc, w.bias, me - mb, y + (mb - m0) * ldy, ldy);
  }
  _tile_release();
}

}  // namespace ccrl_ternary

#pragma GCC pop_options
