// torch.library registration of the ternary kernels (namespace "ccrl"), the run-time ISA
// choice and the threading. Built by setup.py into the private module policies._ternary.
//
// Threading: work_split.h (each call's work in chunks, shared out on torch's intra-op threads,
// the calling thread alone while another process keeps a core busy).
//
// Ops (schemas below; the Python side in policies/packed.py adds the fake kernels for
// torch.compile and a bit-identical PyTorch reference for other devices / no extension):
//   ccrl::ternary_linear(x, packed_weight, weight_scale, bias, in_features, group_size, act_block_size)
//   ccrl::ternary_linear_grouped(x, packed_weight, weight_scale, bias, offs, in_features, group_size,
//                                act_block_size)   one call for E stacked matrices (MoE experts),
//                                rows offs[e-1]:offs[e] of x use matrix e (offs as torch._grouped_mm)
//   ccrl::_ternary_kernel_isa(isa) -> str          set ("scalar" | "avx2" | "avx512" | "auto") / get ("")
//   ccrl::_ternary_tl_pack / ccrl::_ternary_tl_linear   the lookup-table experiment (batch 1, AVX2)
//   ccrl::_ternary_work_split(cmd) -> str          "threads" or why calls run alone; "reset" forgets stalls
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "ternary.h"
#include "work_split.h"

namespace ccrl_ternary {
namespace {

using at::Tensor;

constexpr int64_t kInf = INT64_C(1) << 62;
constexpr int64_t kTokenBlock = kGemmGroup;   // tokens per pass over the weights (activations stay in L2)
constexpr int64_t kInlineWork = 1 << 18;   // multiply-adds below which a call runs on the calling thread
constexpr int64_t kChunkWork = 1 << 18;    // multiply-adds per chunk of work handed to a thread (at least one tile)

bool cpu_has_avx2() { return __builtin_cpu_supports("avx2"); }
bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}
// AMX-TILE and AMX-INT8 (cpuid leaf 7, edx bits 24 and 25), and the tile state granted to this
// process by the kernel (Linux 5.16+ hands it out only on request; without it `ldtilecfg` faults).
bool cpu_has_amx() {
  static const bool ok = [] {
    if (!cpu_has_avx512()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}
int best_isa() {
  return cpu_has_amx() ? kAmx : (cpu_has_avx512() ? kAvx512 : (cpu_has_avx2() ? kAvx2 : kScalar));
}

std::atomic<int> g_isa{-1};

int current_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = best_isa();
    g_isa.store(isa);
  }
  return isa;
}

const char* isa_name(int isa) {
  return isa == kAmx ? "amx" : (isa == kAvx512 ? "avx512" : (isa == kAvx2 ? "avx2" : "scalar"));
}

std::string kernel_isa(const std::string& want) {
  if (!want.empty()) {
    int isa;
    if (want == "auto") {
      isa = best_isa();
    } else if (want == "scalar") {
      isa = kScalar;
    } else if (want == "avx2") {
      TORCH_CHECK(cpu_has_avx2(), "ternary kernels: this CPU has no AVX2");
      isa = kAvx2;
    } else if (want == "avx512") {
      TORCH_CHECK(cpu_has_avx512(), "ternary kernels: this CPU lacks AVX-512 F/BW/VL/DQ/VNNI");
      isa = kAvx512;
    } else if (want == "amx") {
      TORCH_CHECK(cpu_has_amx(), "ternary kernels: this CPU (or this process) has no AMX-INT8 tiles");
      isa = kAmx;
    } else {
      TORCH_CHECK(false, "ternary kernels: unknown ISA '", want, "'; expected scalar, avx2, avx512, amx or auto");
    }
    g_isa.store(isa);
  }
  std::string out = isa_name(current_isa());
  out += cpu_has_amx() ? " (available: scalar,avx2,avx512,amx)"
                       : cpu_has_avx512() ? " (available: scalar,avx2,avx512)"
                                          : (cpu_has_avx2() ? " (available: scalar,avx2)" : " (available: scalar)");
  return out;
}

// Block geometry shared with policies/packed.py (_geometry): see ternary.h.
struct Geometry {
  int64_t K, k_pad, s, J, G, eg, eb;
  std::vector<int32_t> gj;
};

Geometry geometry(int64_t K, c10::optional<int64_t> group_size, c10::optional<int64_t> act_block) {
  Geometry g;
  g.K = K;
  const int64_t gs = group_size.has_value() ? *group_size : 0;
  const int64_t ab = act_block.has_value() ? *act_block : 0;
  g.eg = gs > 0 && gs < K ? gs : kInf;
  g.eb = ab > 0 && ab < K ? ab : kInf;
  if (g.eg == kInf && g.eb == kInf) {
    g.s = (K + 15) / 16 * 16;
  } else {
    g.s = std::min(g.eg, g.eb);
    const int64_t big = std::max(g.eg, g.eb);
    TORCH_CHECK(g.s % 16 == 0, "ternary kernels: weight group (", gs, ") and activation block (", ab,
                ") must be multiples of 16");
    TORCH_CHECK(big == kInf || big % g.s == 0, "ternary kernels: the larger of weight group (", gs,
                ") and activation block (", ab, ") must be a multiple of the smaller");
  }
  g.k_pad = (K + g.s - 1) / g.s * g.s;
  g.J = g.k_pad / g.s;
  g.G = g.eg == kInf ? 1 : (K + g.eg - 1) / g.eg;
  g.gj.resize(g.J);
  for (int64_t j = 0; j < g.J; ++j) g.gj[j] = g.eg == kInf ? 0 : static_cast<int32_t>(j * g.s / g.eg);
  return g;
}

// Quantised activations in buffers owned by the calling thread (no allocator calls on the
// hot path of small calls); large batches use fresh memory that is released afterwards.
class QuantizedActs {
 public:
  QuantizedActs(const Tensor& x2, const Geometry& g, int isa) {
    const int64_t M = x2.size(0), kp = g.k_pad, J = g.J;
    Tensor xf;
    const float* xp;
    if (x2.scalar_type() == at::kFloat && x2.is_contiguous()) {
      xp = x2.data_ptr<float>();
    } else {
      xf = x2.to(at::kFloat).contiguous();
      xp = xf.data_ptr<float>();
    }
    const size_t bytes = M * kp + M * J * (sizeof(float) + sizeof(int32_t)) + (kp != g.K ? M * kp * 4 : 0) + 64;
    thread_local std::vector<uint8_t> small;
    uint8_t* base;
    if (bytes <= (size_t{1} << 20)) {
      if (small.size() < bytes) small.resize(std::max(bytes, size_t{1} << 16));
      base = small.data();
    } else {
      big_.resize(bytes);
      base = big_.data();
    }
    stepj_ = reinterpret_cast<float*>(base);
    nsx_ = reinterpret_cast<int32_t*>(base + M * J * sizeof(float));
    q_ = reinterpret_cast<int8_t*>(base + M * J * (sizeof(float) + sizeof(int32_t)));
    if (kp != g.K) {   // zero-pad each token to K_pad (padding changes neither max|x| nor q)
      float* xpad = reinterpret_cast<float*>(base + ((M * J * 8 + M * kp + 63) / 64) * 64);
      for (int64_t m = 0; m < M; ++m) {
        std::memcpy(xpad + m * kp, xp + m * g.K, g.K * sizeof(float));
        std::memset(xpad + m * kp + g.K, 0, (kp - g.K) * sizeof(float));
      }
      xp = xpad;
    }
    const int64_t block = g.eb == kInf ? kp : g.eb, s = g.s;
    int8_t* qp = q_;
    float* sp = stepj_;
    int32_t* np = nsx_;
    auto body = [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) {
        if (isa >= kAvx512) {
          quant_act_avx512(xp + m * kp, g.K, kp, block, s, qp + m * kp, sp + m * J, np + m * J);
        } else if (isa == kAvx2) {
          quant_act_avx2(xp + m * kp, g.K, kp, block, s, qp + m * kp, sp + m * J, np + m * J);
        } else {
          quant_act_scalar(xp + m * kp, g.K, kp, block, s, qp + m * kp, sp + m * J, np + m * J);
        }
      }
    };
    if (M * kp < 65536) {
      body(0, M);
    } else {
      work_split::for_range(M, std::max<int64_t>(1, 32768 / kp), [&](int, int64_t b, int64_t e) { body(b, e); });
    }
    view_ = Acts{q_, stepj_, nsx_, kp, J};
  }
  const Acts& view() const { return view_; }

 private:
  std::vector<uint8_t> big_;
  int8_t* q_;
  float* stepj_;
  int32_t* nsx_;
  Acts view_;
};

void run_tile(int isa, const Tile& w, const Acts& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
              uint8_t* scratch) {
  if (isa == kAmx) {
    tile_amx(w, a, m0, m1, y, ldy, scratch);
  } else if (isa == kAvx512) {
    tile_avx512(w, a, m0, m1, y, ldy, scratch);
  } else if (isa == kAvx2) {
    tile_avx2(w, a, m0, m1, y, ldy, scratch);
  } else {
    tile_scalar(w, a, m0, m1, y, ldy, scratch);
  }
}

// One matrix (rows [0, N) of `codes`), tokens [m0, m1), tiles [t0, t1); y is [*, ldy] at column 0.
struct Matrix {
  const uint8_t* codes;
  const float* ws;       // [N, G] or [1, 1]
  int64_t ws_stride;     // G or 0
  const float* bias;     // [N] or nullptr
  int64_t N;
};

// The GEMM paths' copy of q for tokens [m0, m1) (Acts::qi), in blocks of 16 tokens: AVX-512
// interleaves the 16 tokens of a block per 4 k ([K_pad / 4][16][4] per block); AMX interleaves
// the blocks per tile depth tk ([K_pad / tk][blocks][16][tk]), so the A tiles of one k step are
// one contiguous run, not streams 16 K_pad bytes apart (often a multiple of 4 KiB: the same L1
// sets). Plain copies, once per thread and token range, reused by every tile the thread runs.
void copy_gemm_acts(const Acts& a, int64_t m0, int64_t m1, int isa, int64_t tk, std::vector<int8_t>& buf) {
  const int64_t kp = a.k_pad, blocks = (m1 - m0 + 15) / 16;
  buf.assign(blocks * 16 * kp, 0);
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* src = a.q + m * kp;
    const int64_t b = (m - m0) / 16, r = (m - m0) % 16;
    if (isa == kAmx) {
      int8_t* dst = buf.data() + (b * 16 + r) * tk;
      for (int64_t k = 0; k < kp; k += tk) std::memcpy(dst + k * 16 * blocks, src + k, tk);
    } else {
      int8_t* dst = buf.data() + b * 16 * kp + r * 4;
      for (int64_t k = 0; k < kp; k += 4) std::memcpy(dst + k * 16, src + k, 4);
    }
  }
}

class TileRunner {
 public:
  TileRunner(int isa, const Geometry& g, const Acts& a) : isa_(isa), g_(g), a_(a) {}

  // Tiles `tile` and `tile + 1`, both full, on the AVX-512 path (32-row GEMM register blocks).
  void run_pair(const Matrix& mat, int64_t tile, int64_t m0, int64_t m1, float* y, int64_t ldy) {
    prepare(m0, m1);
    const Tile w0 = view(mat, tile), w1 = view(mat, tile + 1);
    tile_pair_avx512(w0, w1, a_, m0, m1, y + m0 * ldy + tile * kTile, ldy, scratch_.data());
  }

  void run(const Matrix& mat, int64_t tile, int64_t m0, int64_t m1, float* y, int64_t ldy) {
    const int64_t n0 = tile * kTile;
    const int64_t h = std::min<int64_t>(kTile, mat.N - n0);
    prepare(m0, m1);
    const Tile w = view(mat, tile);
    if (h == kTile) {
      run_tile(isa_, w, a_, m0, m1, y + m0 * ldy + n0, ldy, scratch_.data());
      return;
    }
    pad_y_.resize((m1 - m0) * kTile);
    run_tile(isa_, w, a_, m0, m1, pad_y_.data(), kTile, scratch_.data());
    for (int64_t m = m0; m < m1; ++m) {
      std::memcpy(y + m * ldy + n0, &pad_y_[(m - m0) * kTile], h * sizeof(float));
    }
  }

 private:
  void prepare(int64_t m0, int64_t m1) {
    if (isa_ >= kAvx512 && m1 - m0 > kMaxTokens && (m0 != qi_m0_ || m1 != qi_m1_)) {
      copy_gemm_acts(a_, m0, m1, isa_, amx_depth(g_.s), qi_);
      a_.qi = qi_.data();
      a_.qi_m0 = qi_m0_ = m0;
      a_.qi_blocks = (m1 - m0 + 15) / 16;
      qi_m1_ = m1;
    }
    if (m1 - m0 > 1 && scratch_.empty()) {   // pre-unpacked codes, then one scale vector per weight group
      scratch_.resize(2 * (kTile * g_.k_pad + kTile * sizeof(float) * g_.G));   // two tiles for run_pair
    }
  }

  // The tile as the kernels take it; the last tile with h < 16 rows (chunks of 4h bytes) is
  // widened to 64-byte chunks with zero rows (built once per matrix and tile).
  Tile view(const Matrix& mat, int64_t tile) {
    const int64_t n0 = tile * kTile;
    const int64_t h = std::min<int64_t>(kTile, mat.N - n0);
    Tile w{mat.codes + n0 * g_.k_pad / 4, mat.ws + n0 * mat.ws_stride, mat.ws_stride, g_.gj.data(),
           mat.bias ? mat.bias + n0 : nullptr, g_.s};
    if (h == kTile) return w;
    if (pad_for_ != mat.codes + n0 * g_.k_pad / 4) {
      pad_for_ = mat.codes + n0 * g_.k_pad / 4;
      const int64_t chunks = g_.k_pad / kChunk;
      pad_codes_.assign(chunks * 64, 0x55);
      for (int64_t c = 0; c < chunks; ++c) std::memcpy(&pad_codes_[c * 64], w.codes + c * 4 * h, 4 * h);
      const int64_t G = mat.ws_stride == 0 ? 1 : mat.ws_stride;
      pad_ws_.assign(kTile * G, 0.0f);
      for (int64_t r = 0; r < h; ++r) {
        for (int64_t q = 0; q < G; ++q) pad_ws_[r * G + q] = w.ws[r * mat.ws_stride + (mat.ws_stride ? q : 0)];
      }
      pad_bias_.assign(kTile, 0.0f);
      if (w.bias) std::copy(w.bias, w.bias + h, pad_bias_.begin());
    }
    const int64_t G = mat.ws_stride == 0 ? 1 : mat.ws_stride;
    return Tile{pad_codes_.data(), pad_ws_.data(), G, g_.gj.data(), w.bias ? pad_bias_.data() : nullptr, g_.s};
  }

  int isa_;
  const Geometry& g_;
  Acts a_;
  std::vector<int8_t> qi_;
  int64_t qi_m0_ = -1, qi_m1_ = -1;
  const uint8_t* pad_for_ = nullptr;
  std::vector<uint8_t> scratch_, pad_codes_;
  std::vector<float> pad_ws_, pad_bias_, pad_y_;
};

void check_inputs(const Tensor& x, const Tensor& packed, const Tensor& scale, const c10::optional<Tensor>& bias,
                  int64_t K, const Geometry& g, int64_t E) {
  TORCH_CHECK(x.size(-1) == K, "ternary_linear: x has ", x.size(-1), " features, the weight expects ", K);
  TORCH_CHECK(x.is_floating_point(), "ternary_linear: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "ternary_linear: packed_weight must be contiguous uint8");
  TORCH_CHECK(scale.is_floating_point(), "ternary_linear: weight_scale must be floating point (float32)");
  const int64_t d = E > 0 ? 1 : 0;
  TORCH_CHECK(packed.dim() == 2 + d && packed.size(-1) == g.k_pad / 4,
              "ternary_linear: packed_weight must be [", E > 0 ? "E, " : "", "N, ", g.k_pad / 4,
              "] for in_features=", K, ", got ", packed.sizes());
  const int64_t N = packed.size(-2);
  TORCH_CHECK(scale.dim() == 2 + d && (scale.size(-2) == N || scale.size(-2) == 1) &&
                  (scale.size(-1) == g.G || (scale.size(-2) == 1 && scale.size(-1) == 1)),
              "ternary_linear: weight_scale must be [", E > 0 ? "E, " : "", N, ", ", g.G, "] or [",
              E > 0 ? "E, " : "", "1, 1], got ", scale.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == (E > 0 ? E : 1) * N, "ternary_linear: bias must have ", N,
                " values per matrix, got ", bias->sizes());
  }
  if (E > 0) {
    TORCH_CHECK(packed.size(0) == E && scale.size(0) == E, "ternary_linear_grouped: leading dims disagree");
  }
}

Tensor finish(Tensor y, const Tensor& x, int64_t N) {
  if (x.scalar_type() != at::kFloat) y = y.to(x.scalar_type());
  if (x.dim() == 2) return y;
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

// Scales are float32; another dtype (a module cast with .to(bfloat16)) is widened exactly.
Tensor float_scale(const Tensor& scale) {
  return scale.scalar_type() == at::kFloat && scale.is_contiguous() ? scale : scale.to(at::kFloat).contiguous();
}

Tensor ternary_linear_cpu(const Tensor& x, const Tensor& packed, const Tensor& scale_in,
                          const c10::optional<Tensor>& bias, int64_t in_features,
                          c10::optional<int64_t> group_size, c10::optional<int64_t> act_block_size) {
  const Geometry g = geometry(in_features, group_size, act_block_size);
  check_inputs(x, packed, scale_in, bias, in_features, g, 0);
  const Tensor scale = float_scale(scale_in);
  const int isa = current_isa();
  const int64_t N = packed.size(0);
  const Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, in_features});
  const int64_t M = x2.size(0);
  Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return finish(y, x, N);
  const QuantizedActs qa(x2, g, isa);
  const Acts a = qa.view();
  Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const Matrix mat{packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), scale.size(0) == 1 ? 0 : scale.size(1),
                   bias.has_value() ? bias_f.data_ptr<float>() : nullptr, N};
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (N + kTile - 1) / kTile;
  // AVX-512 GEMM: adjacent full tiles go in pairs (32-row register blocks: each activation
  // broadcast feeds two products); a lone last full tile or a short one runs alone.
  const bool pairs = isa == kAvx512 && M > kMaxTokens;
  // Chunks: one block of kTokenBlock tokens x a run of `per` tiles (an even number for the pairs),
  // numbered token block by token block; each thread keeps its TileRunner (and so its GEMM copy
  // of the block's activations) from chunk to chunk.
  const int64_t blocks = (M + kTokenBlock - 1) / kTokenBlock;
  int64_t per = std::max<int64_t>(1, kChunkWork / (std::min(M, kTokenBlock) * kTile * g.k_pad));
  if (pairs) per = std::max<int64_t>(2, per / 2 * 2);
  const int64_t tile_chunks = (tiles + per - 1) / per;
  // token blocks per work_split::run (a run takes at most kMaxChunks chunks)
  const int64_t round = std::max<int64_t>(1, work_split::kMaxChunks / tile_chunks);
  const int threads =
      M * N * g.k_pad < kInlineWork ? 1 : work_split::threads_for(std::min(blocks, round) * tile_chunks);
  std::vector<std::optional<TileRunner>> runners(threads);
  int64_t b0 = 0;
  auto chunk = [&](int slot, int64_t c) {
    std::optional<TileRunner>& runner = runners[slot];
    if (!runner) runner.emplace(isa, g, a);
    const int64_t m0 = (b0 + c / tile_chunks) * kTokenBlock, m1 = std::min(M, m0 + kTokenBlock);
    const int64_t t1 = std::min(tiles, (c % tile_chunks + 1) * per);
    for (int64_t t = c % tile_chunks * per; t < t1;) {
      if (pairs && t + 1 < t1 && (t + 2) * kTile <= N) {
        runner->run_pair(mat, t, m0, m1, yp, N);
        t += 2;
      } else {
        runner->run(mat, t++, m0, m1, yp, N);
      }
    }
  };
  for (; b0 < blocks; b0 += round) {
    work_split::run(threads, std::min(round, blocks - b0) * tile_chunks, chunk);
  }
  return finish(y, x, N);
}

Tensor ternary_linear_grouped_cpu(const Tensor& x, const Tensor& packed, const Tensor& scale_in,
                                  const c10::optional<Tensor>& bias, const Tensor& offs, int64_t in_features,
                                  c10::optional<int64_t> group_size, c10::optional<int64_t> act_block_size) {
  const Geometry g = geometry(in_features, group_size, act_block_size);
  TORCH_CHECK(packed.dim() == 3, "ternary_linear_grouped: packed_weight must be [E, N, K_pad/4]");
  const int64_t E = packed.size(0);
  check_inputs(x, packed, scale_in, bias, in_features, g, E);
  const Tensor scale = float_scale(scale_in);
  TORCH_CHECK(x.dim() == 2, "ternary_linear_grouped: x must be [tokens, in_features]");
  TORCH_CHECK(offs.dim() == 1 && offs.size(0) == E, "ternary_linear_grouped: offs must have E=", E, " entries");
  const Tensor off = offs.to(at::kLong).contiguous();
  const int64_t* op = off.data_ptr<int64_t>();
  const int64_t M = x.size(0), N = packed.size(1);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(op[e] >= (e ? op[e - 1] : 0) && op[e] <= M,
                "ternary_linear_grouped: offs must be non-decreasing cumulative ends <= tokens");
  }
  TORCH_CHECK(E == 0 || op[E - 1] == M, "ternary_linear_grouped: offs[-1] must equal the number of tokens");
  const int isa = current_isa();
  Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return finish(y, x, N);
  const QuantizedActs qa(x, g, isa);
  const Acts a = qa.view();
  Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const int64_t tiles = (N + kTile - 1) / kTile;
  const int64_t per_matrix = N * g.k_pad / 4, ws_per = scale.size(1) * scale.size(2);
  std::vector<int64_t> work;   // (matrix, tile) pairs that have tokens
  for (int64_t e = 0; e < E; ++e) {
    if (op[e] > (e ? op[e - 1] : 0)) {
      for (int64_t t = 0; t < tiles; ++t) work.push_back(e * tiles + t);
    }
  }
  float* yp = y.data_ptr<float>();
  // Chunks: runs of `per` consecutive (matrix, tile) pairs, about kChunkWork multiply-adds each.
  const int64_t items = static_cast<int64_t>(work.size());
  int64_t macs = 0;
  for (int64_t e = 0; e < E; ++e) macs += (op[e] - (e ? op[e - 1] : 0)) * N * g.k_pad;
  const int64_t per = std::max<int64_t>({int64_t{1}, kChunkWork * items / std::max<int64_t>(macs, 1),
                                         (items + work_split::kMaxChunks - 1) / work_split::kMaxChunks});
  const int64_t chunks = (items + per - 1) / per;
  const int threads = macs < kInlineWork ? 1 : work_split::threads_for(chunks);
  std::vector<std::optional<TileRunner>> runners(threads);
  auto chunk = [&](int slot, int64_t c) {
    std::optional<TileRunner>& runner = runners[slot];
    if (!runner) runner.emplace(isa, g, a);
    for (int64_t i = c * per; i < std::min(items, (c + 1) * per); ++i) {
      const int64_t e = work[i] / tiles, t = work[i] % tiles;
      const Matrix mat{packed.data_ptr<uint8_t>() + e * per_matrix, scale.data_ptr<float>() + e * ws_per,
                       scale.size(1) == 1 ? 0 : scale.size(2),
                       bias.has_value() ? bias_f.data_ptr<float>() + e * N : nullptr, N};
      runner->run(mat, t, e ? op[e - 1] : 0, op[e], yp, N);
    }
  };
  work_split::run(threads, chunks, chunk);
  return finish(y, x, N);
}

// ---- lookup-table experiment -------------------------------------------------------------

Tensor tl_pack_cpu(const Tensor& packed, int64_t in_features, c10::optional<int64_t> group_size,
                   c10::optional<int64_t> act_block_size) {
  const Geometry g = geometry(in_features, group_size, act_block_size);
  const int64_t N = packed.size(0);
  TORCH_CHECK(N % 32 == 0, "tl experiment: N must be a multiple of 32");
  Tensor out = at::empty({tl_layout_bytes(N, g.k_pad)}, packed.options());
  tl_pack(packed.contiguous().data_ptr<uint8_t>(), N, g.k_pad, out.data_ptr<uint8_t>());
  return out;
}

Tensor tl_linear_cpu(const Tensor& x, const Tensor& tl_codes, const Tensor& scale_in, int64_t out_features,
                     int64_t in_features, c10::optional<int64_t> group_size, c10::optional<int64_t> act_block_size) {
  TORCH_CHECK(cpu_has_avx2(), "tl experiment needs AVX2");
  const Tensor scale = float_scale(scale_in);
  const Geometry g = geometry(in_features, group_size, act_block_size);
  const Tensor x2 = x.reshape({-1, in_features});
  TORCH_CHECK(x2.size(0) == 1, "tl experiment: batch 1 only");
  const QuantizedActs qa(x2, g, kAvx2);
  const Acts a = qa.view();
  const int64_t N = out_features;
  TORCH_CHECK(N % 32 == 0, "tl experiment: N must be a multiple of 32");
  Tensor y = at::empty({1, N}, x.options().dtype(at::kFloat));
  Tensor lut = at::empty({g.k_pad / 2 * 32}, x.options().dtype(at::kChar));
  tl_build_lut(a.q, g.k_pad, lut.data_ptr<int8_t>());
  const uint8_t* cp = tl_codes.data_ptr<uint8_t>();
  const int8_t* lp = lut.data_ptr<int8_t>();
  const float* ws = scale.data_ptr<float>();
  const int64_t wss = scale.size(0) == 1 ? 0 : scale.size(1);
  float* yp = y.data_ptr<float>();
  auto rows = [&](int, int64_t b, int64_t e) {
    tl_rows_avx2(cp, g.k_pad, lp, a.stepj, g.J, ws, wss, g.gj.data(), g.s, b * 32, e * 32, yp);
  };
  if (N * g.k_pad < kInlineWork) {
    rows(0, 0, N / 32);
  } else {
    work_split::for_range(N / 32, std::max<int64_t>(1, kChunkWork / (32 * g.k_pad)), rows);
  }
  return finish(y, x, N);
}

}  // namespace
}  // namespace ccrl_ternary

TORCH_LIBRARY(ccrl, m) {
  m.def("ternary_linear(Tensor x, Tensor packed_weight, Tensor weight_scale, Tensor? bias, int in_features, "
        "int? group_size, int? act_block_size) -> Tensor");
  m.def("ternary_linear_grouped(Tensor x, Tensor packed_weight, Tensor weight_scale, Tensor? bias, Tensor offs, "
        "int in_features, int? group_size, int? act_block_size) -> Tensor");
  m.def("_ternary_kernel_isa(str isa) -> str", &ccrl_ternary::kernel_isa);
  m.def("_ternary_work_split(str cmd) -> str", &ccrl_ternary::work_split::describe);
  m.def("_ternary_tl_pack(Tensor packed_weight, int in_features, int? group_size, int? act_block_size) -> Tensor");
  m.def("_ternary_tl_linear(Tensor x, Tensor tl_codes, Tensor weight_scale, int out_features, int in_features, "
        "int? group_size, int? act_block_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(ccrl, CPU, m) {
  m.impl("ternary_linear", &ccrl_ternary::ternary_linear_cpu);
  m.impl("ternary_linear_grouped", &ccrl_ternary::ternary_linear_grouped_cpu);
  m.impl("_ternary_tl_pack", &ccrl_ternary::tl_pack_cpu);
  m.impl("_ternary_tl_linear", &ccrl_ternary::tl_linear_cpu);
}

// ---- direct entry point for eager CPU calls --------------------------------------------------
// `policies._ternary.linear(x, packed_weight, weight_scale, bias, in_features, group_size,
// act_block_size)` runs the same kernel as ccrl::ternary_linear without the dispatcher's boxed
// argument handling (a few microseconds per call, which adds up over hundreds of small layers
// per token). It returns NotImplemented whenever the dispatcher has a say (non-CPU or tensor
// subclass inputs, dispatch modes, autograd recording) and the caller then uses the op.
namespace {

bool plain_cpu(const at::Tensor& t) {
  return t.is_cpu() && t.layout() == at::kStrided && !t.key_set().has(c10::DispatchKey::Python);
}

c10::optional<int64_t> opt_int(PyObject* o) {
  if (o == Py_None) return c10::nullopt;
  return static_cast<int64_t>(PyLong_AsLongLong(o));
}

struct ReleaseGil {
  PyThreadState* state = nullptr;
  explicit ReleaseGil(bool on) {
    if (on) state = PyEval_SaveThread();
  }
  ~ReleaseGil() {
    if (state) PyEval_RestoreThread(state);
  }
};

PyObject* py_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7) {
    PyErr_SetString(PyExc_TypeError, "linear() takes 7 arguments");
    return nullptr;
  }
  for (int i = 0; i < 4; ++i) {
    if (i == 3 && args[i] == Py_None) continue;
    if (!THPVariable_Check(args[i])) Py_RETURN_NOTIMPLEMENTED;
  }
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  const at::Tensor& packed = THPVariable_Unpack(args[1]);
  const at::Tensor& scale = THPVariable_Unpack(args[2]);
  c10::optional<at::Tensor> bias;
  if (args[3] != Py_None) bias = THPVariable_Unpack(args[3]);
  if (!plain_cpu(x) || !plain_cpu(packed) || !plain_cpu(scale) || (bias && !plain_cpu(*bias)) ||
      c10::impl::TorchDispatchModeTLS::any_modes_set() ||
      (at::GradMode::is_enabled() && (x.requires_grad() || (bias && bias->requires_grad())))) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const int64_t K = PyLong_AsLongLong(args[4]);
  const auto gs = opt_int(args[5]);
  const auto ab = opt_int(args[6]);
  if (PyErr_Occurred()) return nullptr;
  at::Tensor y;
  {
    ReleaseGil no_gil(x.numel() / std::max<int64_t>(K, 1) * packed.size(0) * K > (1 << 20));
    y = ccrl_ternary::ternary_linear_cpu(x, packed, scale, bias, K, gs, ab);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_linear)), METH_FASTCALL,
     "ccrl::ternary_linear for plain CPU tensors without the dispatcher; NotImplemented otherwise."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing policies._ternary loads the library, which runs the registrations above (as in
// the PyTorch "Custom C++ and CUDA Operators" tutorial).
extern "C" PyObject* PyInit__ternary(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_ternary", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
