// Portable scalar path: the C++ statement of the arithmetic in ternary.h, one multiply at
// a time. It decodes w = code - 1 directly (no code-offset correction), so the SIMD paths'
// correction trick is checked against it, and it against the PyTorch reference.
#include <cmath>
#include <cstring>

#include "ternary.h"

namespace ccrl_ternary {

void quant_act_scalar(const float* x, int64_t K, int64_t k_pad, int64_t block, int64_t s, int8_t* q,
                      float* stepj, int32_t* nsx) {
  // x holds k_pad floats (zero padded past K: padding changes neither max|x| nor q).
  (void)K;
  const int64_t J = k_pad / s;
  for (int64_t b0 = 0; b0 < k_pad; b0 += block) {
    const int64_t b1 = b0 + block < k_pad ? b0 + block : k_pad;
    float amax = 0.0f;
    for (int64_t k = b0; k < b1; ++k) {
      const float v = std::fabs(x[k]);
      amax = v > amax ? v : amax;
    }
    const float step = (amax < 1e-5f ? 1e-5f : amax) / 127.0f;
    for (int64_t k = b0; k < b1; ++k) {
      float r = std::nearbyint(x[k] / step);
      r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
      q[k] = static_cast<int8_t>(r);
    }
    for (int64_t j = b0 / s; j < b1 / s; ++j) stepj[j] = step;
  }
  for (int64_t j = 0; j < J; ++j) {
    int32_t sum = 0;
    for (int64_t k = j * s; k < (j + 1) * s; ++k) sum += q[k];
    nsx[j] = -sum;
  }
}

void tile_scalar(const Tile& w, const Acts& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
                 uint8_t* scratch) {
  (void)scratch;
  const int64_t s = w.s;
  for (int64_t r = 0; r < kTile; ++r) {
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* xq = a.q + m * a.k_pad;
      float acc_f = 0.0f;
      for (int64_t j = 0; j < a.J; ++j) {
        int32_t acc = 0;
        for (int64_t k = j * s; k < (j + 1) * s; ++k) {
          const int64_t c = k / kChunk, p = (k % kChunk) / 4, t = k % 4;
          const int code = (w.codes[c * 64 + 4 * r + t] >> (2 * p)) & 3;
          acc += (code - 1) * static_cast<int32_t>(xq[k]);
        }
        const float ws = w.ws[r * w.ws_stride + w.gj[j]];
        const float term = (static_cast<float>(acc) * a.stepj[m * a.J + j]) * ws;
        acc_f = j == 0 ? term : acc_f + term;
      }
      if (w.bias) acc_f = acc_f + w.bias[r];
      y[(m - m0) * ldy + r] = acc_f;
    }
  }
}

}  // namespace ccrl_ternary
