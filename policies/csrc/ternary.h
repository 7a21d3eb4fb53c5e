// Ternary (1.58-bit) x int8 matrix products: the kernel core shared by every ISA path.
//
// Plain C++ (no ATen in here), so each ISA file can be compiled under its own
// `#pragma GCC target(...)` without dragging torch's inline code into it. The op
// registration and run-time ISA choice live in ternary_op.cpp, the threading in
// work_split.h.
//
// Arithmetic (identical in every path and in the PyTorch reference, policies/packed.py):
//
//   sub-block size  s = min(weight group, activation block)   (a multiple of 16; the larger
//                   of the two is a multiple of s; "per tensor" / "per token" count as
//                   infinite), K is zero-padded to K_pad = ceil(K / s) * s, J = K_pad / s.
//   activations     per token and block b: step_b = max(max|x_b|, 1e-5f) / 127.0f,
//                   q = clamp(nearbyint(x / step_b), -127, 127)   (float32 division).
//   int32           acc[m, n, j] = sum_{k in sub-block j} q_x[m, k] * q_w[n, k]
//   float32         y[m, n] = sum_j (float(acc[m, n, j]) * step[m, b(j)]) * w_scale[n, g(j)]
//                   summed left to right starting from the j = 0 term, no fused multiply-add,
//                   then y + bias[n].
//
// Packed weight layout ("I2-tile"): codes c = w + 1 in {0, 1, 2}, 2 bits each. Rows come
// in tiles of 16 (the last tile may have h < 16 rows); a tile is stored as K_pad / 16
// chunks of 4h bytes. Byte (4 l + t) of chunk c holds, in bits 2p+1:2p (p = 0..3), the code
// of row l of the tile at k = 16 c + 4 p + t. So after `(v >> 2p) & 3` a 64-byte vector
// holds, per 32-bit lane l, the codes of row l at k = 16 c + 4 p .. +3: exactly the operand
// of one `vpdpbusd` (u8 codes x s8 activations broadcast) with one output row per lane,
// no horizontal sums. Since codes are w + 1, the accumulator starts at -sum(q_x) of the
// sub-block (bitnet.cpp's I2_S correction). Tile t starts at byte t * 16 * K_pad / 4, the
// whole matrix is exactly N * K_pad / 4 bytes.
#pragma once

#include <cstdint>

namespace ccrl_ternary {

constexpr int kTile = 16;       // output rows per tile (one 32-bit lane per row in AVX-512)
constexpr int kChunk = 16;      // k values per chunk (64 bytes for a full tile)
constexpr int kMaxTokens = 8;   // tokens per register block of the microkernels
constexpr int kGemmGroup = 64;  // tokens whose float partial sums a GEMM path keeps in a local buffer
constexpr int64_t kGemmK = 512; // k values per chunk of the GEMM paths (its codes and 64 tokens of activations fit L1)

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };   // kAmx: AVX-512 + AMX tiles

// k values per AMX tile product for sub-blocks of s (a multiple of 16): 64, or 32 / 16.
inline int amx_depth(int64_t s) { return s % 64 == 0 ? 64 : (s % 32 == 0 ? 32 : 16); }

// Quantised activations of M tokens, padded to K_pad.
struct Acts {
  const int8_t* q;      // [M, K_pad]
  const float* stepj;   // [M, J]   step of the activation block holding sub-block j
  const int32_t* nsx;   // [M, J]   -sum of q over sub-block j (the code offset correction)
  int64_t k_pad;
  int64_t J;
  // GEMM paths only: q of tokens [qi_m0, ...) in blocks of 16 tokens, zero past the last token.
  // AVX-512: each block laid out as [K_pad / 4][16 tokens][4 bytes] (one register block's
  // activation operands are 64 consecutive bytes per 4 k). AMX: the qi_blocks blocks interleaved
  // as [K_pad / d][qi_blocks][16 tokens][d bytes] with d = amx_depth(s), so one A tile is 16 d
  // contiguous bytes and the A tiles of all blocks at one k are one contiguous run.
  const int8_t* qi = nullptr;
  int64_t qi_m0 = 0;
  int64_t qi_blocks = 0;
};

// One full 16-row tile of packed weights with its scales.
struct Tile {
  const uint8_t* codes;   // K_pad / 16 chunks of 64 bytes
  const float* ws;        // w_scale of the tile's first row (row stride ws_stride)
  int64_t ws_stride;      // G, or 0 for one scale per tensor
  const int32_t* gj;      // [J] weight group of each sub-block
  const float* bias;      // 16 floats or nullptr
  int64_t s;              // sub-block size
};

// Activation quantisation of one token (x has K floats; q gets K_pad int8).
// `block` is the effective activation block (>= K_pad means one block per token).
void quant_act_scalar(const float* x, int64_t K, int64_t k_pad, int64_t block, int64_t s, int8_t* q,
                      float* stepj, int32_t* nsx);
void quant_act_avx2(const float* x, int64_t K, int64_t k_pad, int64_t block, int64_t s, int8_t* q,
                    float* stepj, int32_t* nsx);
void quant_act_avx512(const float* x, int64_t K, int64_t k_pad, int64_t block, int64_t s, int8_t* q,
                      float* stepj, int32_t* nsx);

// y[(m - m0) * ldy + r] for r < 16 and tokens m in [m0, m1) of one full tile.
// `scratch` holds at least 16 * K_pad + 64 * G bytes (the tile's codes unpacked to one byte
// each, then the tile's 16 weight scales of each of the G weight groups),
// used when there are more tokens than one register block.
void tile_scalar(const Tile& w, const Acts& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
                 uint8_t* scratch);
void tile_avx2(const Tile& w, const Acts& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
               uint8_t* scratch);
void tile_avx512(const Tile& w, const Acts& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
                 uint8_t* scratch);
void tile_amx(const Tile& w, const Acts& a, int64_t m0, int64_t m1, float* y, int64_t ldy, uint8_t* scratch);
// Two adjacent full tiles (rows n0 .. n0 + 32, y at row n0), AVX-512 GEMM in 32-row register
// blocks; `scratch` holds twice what one tile needs.
void tile_pair_avx512(const Tile& w0, const Tile& w1, const Acts& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
                      uint8_t* scratch);
// The tile's 16 weight scales of the weight groups of sub-blocks [j0, j1), one 16-float vector
// per group at `at` + 64 * group.
float* tile_scales(const Tile& w, int64_t j0, int64_t j1, uint8_t* at);
// y[t * ldy + r] = facc[t * 16 + r] (+ bias[r]) for t < n: a GEMM path's local sums written out.
void store_rows(const float* facc, const float* bias, int64_t n, float* y, int64_t ldy);
// k values per chunk of the GEMM paths for sub-blocks of s: whole sub-blocks up to kGemmK k, or
// kGemmK k of a longer sub-block (whose integer sums then carry from chunk to chunk).
int64_t gemm_chunk_k(int64_t s);
// The tile's codes as bytes, [K_pad / 4][16 rows][4] (the VNNI / AMX-B operand layout).
void unpack_tile_avx512(const uint8_t* codes, int64_t k_pad, uint8_t* pre);

// Experimental lookup-table GEMV (T-MAC / bitnet TL style, vpshufb), batch 1 only, with its
// own layout; kept to measure against the dot-product kernel (see policies/packed.py).
int64_t tl_layout_bytes(int64_t N, int64_t k_pad);
void tl_pack(const uint8_t* i2_codes, int64_t N, int64_t k_pad, uint8_t* out);
void tl_build_lut(const int8_t* q, int64_t k_pad, int8_t* lut);   // lut: k_pad / 2 * 32 bytes
void tl_rows_avx2(const uint8_t* tl_codes, int64_t k_pad, const int8_t* lut, const float* stepj, int64_t J,
                  const float* ws, int64_t ws_stride, const int32_t* gj, int64_t s, int64_t r0, int64_t r1,
                  float* y);

}  // namespace ccrl_ternary
