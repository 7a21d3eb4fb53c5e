// AMX path (Sapphire Rapids and later): the GEMM (more tokens than one streamed block) on the
// tile matrix unit; fewer tokens use the AVX-512 VNNI streamed kernel (a GEMV is bound by
// memory, not by multiply-adds). Compiled for AMX by the pragma below, never -march=native;
// ternary_op.cpp calls it only when cpuid reports AMX-TILE/AMX-INT8 and the kernel granted
// this process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM).
//
// One `tdpbsud` multiplies 16 tokens x tk k (s8 activations, tile A: one contiguous 16 x tk
// block of the copy in Acts::qi) by tk k x 16 rows (u8 codes, tile B: exactly
// the unpacked `[K_pad / 4][16 rows][4]` layout of the VNNI GEMM), accumulating int32 in
// tile C = [16 tokens][16 rows] with tk = 64 (or 32 / 16 when the sub-block is not a multiple
// of 64): 16384 multiply-adds where vpdpbusd does 64. C is zeroed at each sub-block, stored
// after it and scaled by AVX-512 code identical to the other paths: acc = C - sum(q_x) of the
// sub-block (exact int32), y += (float(acc) * step) * w_scale, left to right over sub-blocks.
// That epilogue, not the tile unit, is the cost: 16 tokens x ~5 vector ops per 16 x 16 x 64
// block against 16 cycles of `tdpbsud`.
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
// (the codes, shared by the 4 products); tmm5, tmm6 = A [16 tokens][tk bytes], alternating so a
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

// Sub-blocks [j0, j1) for tokens [m, m + n), NB = ceil(n / 16) <= 4 blocks of 16; xq is
// token m's block of Acts::qi ([K_pad / tk][16][tk] per block of 16 tokens). The NB products of one sub-block are independent
// chains; their stores and the vector epilogue of all n tokens follow.
template <int NB>
void block_amx(const uint8_t* pre, const float* wsT, const int32_t* gj, int64_t s, int tk, const Acts& a,
               const int8_t* xq, int64_t m, int n, int64_t j0, int64_t j1, float* facc) {
  alignas(64) int32_t c[NB * 16][16];
  const int64_t J = a.J, kp = a.k_pad;
  for (int64_t j = j0; j < j1; ++j) {
    _tile_zero(0);
    if (NB > 1) _tile_zero(1);
    if (NB > 2) _tile_zero(2);
    if (NB > 3) _tile_zero(3);
    for (int64_t k = j * s; k < (j + 1) * s; k += tk) {
      _tile_loadd(4, pre + (k - j0 * s) * 16, 64);   // pre holds k in [j0 s, j1 s)
      _tile_loadd(5, xq + k * 16, tk);                 // block i of Acts::qi at xq + 16 i K_pad
      _tile_dpbsud(0, 5, 4);
      if (NB > 1) {
        _tile_loadd(6, xq + 16 * kp + k * 16, tk);
        _tile_dpbsud(1, 6, 4);
      }
      if (NB > 2) {
        _tile_loadd(5, xq + 32 * kp + k * 16, tk);
        _tile_dpbsud(2, 5, 4);
      }
      if (NB > 3) {
        _tile_loadd(6, xq + 48 * kp + k * 16, tk);
        _tile_dpbsud(3, 6, 4);
      }
    }
    _tile_stored(0, c[0], 64);
    if (NB > 1) _tile_stored(1, c[16], 64);
    if (NB > 2) _tile_stored(2, c[32], 64);
    if (NB > 3) _tile_stored(3, c[48], 64);
    const __m512 wsv = _mm512_loadu_ps(wsT + (gj ? gj[j] : 0) * kTile);
    for (int t = 0; t < n; ++t) {
      const __m512i acc = _mm512_add_epi32(_mm512_load_si512(c[t]), _mm512_set1_epi32(a.nsx[(m + t) * J + j]));
      const __m512 st = _mm512_set1_ps(a.stepj[(m + t) * J + j]);
      const __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), st), wsv);
      float* ft = facc + t * kTile;
      _mm512_storeu_ps(ft, j == 0 ? f : _mm512_add_ps(_mm512_loadu_ps(ft), f));   // facc: no alignment promised
    }
  }
}

}  // namespace

namespace {

void gemm_chunk_amx(const Tile& w, const Acts& a, int64_t m0, int64_t m1, int64_t j0, int64_t j1, float* facc,
                    uint8_t* scratch) {
  const int64_t s = w.s;
  const int tk = amx_depth(s);
  unpack_tile_avx512(w.codes + j0 * s * 4, (j1 - j0) * s, scratch);
  const float* wsT = tile_scales(w, j0, j1, scratch + kTile * a.k_pad);
  // Acts::qi: blocks of 16 tokens (zero rows past the last), so 16-row loads stay in bounds.
  const int8_t* xq = a.qi + (m0 - a.qi_m0) * a.k_pad;
  const int32_t* gj = w.ws_stride ? w.gj : nullptr;
  const int n = static_cast<int>(m1 - m0);
  switch ((n + 15) / 16) {
    case 1: block_amx<1>(scratch, wsT, gj, s, tk, a, xq, m0, n, j0, j1, facc); break;
    case 2: block_amx<2>(scratch, wsT, gj, s, tk, a, xq, m0, n, j0, j1, facc); break;
    case 3: block_amx<3>(scratch, wsT, gj, s, tk, a, xq, m0, n, j0, j1, facc); break;
    default: block_amx<4>(scratch, wsT, gj, s, tk, a, xq, m0, n, j0, j1, facc); break;
  }
}

}  // namespace

void tile_amx(const Tile& w, const Acts& a, int64_t m0, int64_t m1, float* y, int64_t ldy, uint8_t* scratch) {
  if (m1 - m0 <= kMaxTokens) {
    tile_avx512(w, a, m0, m1, y, ldy, scratch);
    return;
  }
  configure(amx_depth(w.s));
  const int64_t jc = w.s >= kGemmK ? 1 : kGemmK / w.s;
  for (int64_t mb = m0; mb < m1; mb += kGemmGroup) {
    const int64_t me = mb + kGemmGroup < m1 ? mb + kGemmGroup : m1;
    alignas(64) float facc[kGemmGroup * kTile];
    for (int64_t j0 = 0; j0 < a.J; j0 += jc) gemm_chunk_amx(w, a, mb, me, j0, j0 + jc < a.J ? j0 + jc : a.J, facc, scratch);
    store_rows(facc, w.bias, me - mb, y + (mb - m0) * ldy, ldy);
  }
  _tile_release();
}

}  // namespace ccrl_ternary

#pragma GCC pop_options
