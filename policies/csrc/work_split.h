// How the kernels (ternary_op.cpp) share a call's work between threads.
//
// The work is cut into chunks. Thread s of T (0 = the calling thread) owns the chunks
// [s, s + 1) * chunks / T and takes them in order; a thread whose share is done takes what is
// left of the others' shares, one chunk at a time from the back. A claim is a compare-and-swap
// of the share's word (next | end), so every chunk runs exactly once, on the thread that claimed
// it: each output element is computed by one thread with the same arithmetic, whatever the
// thread count. When all threads run, each does its own share, the same rows every call (so the
// weights a core reads stay in its cache); a thread that starts late finds its share taken by the
// others.
//
// The threads are torch's own intra-op threads (at::parallel_for: at::get_num_threads(), so
// torch.set_num_threads(1) means the calling thread alone). A pool of the kernels' own was
// measured too: on 2 cores it fights torch's threads, which keep polling for their next op for a
// while after each one, and a decoding step that alternates the kernels with torch's ops ran no
// faster with 2 threads than with 1.
//
// Busy cores: an OpenMP region ends when every thread of the team has arrived, and the next one
// starts when every thread is back, so a thread that the OS has descheduled (another process busy
// on its core) holds the call back until it runs again, even when the others did all its work:
// the 0.25 ms GEMV 6912x2560 then took 7-8 ms with 2 threads. So the caller times its own part of
// the work; a call that spent kStallNs or more besides, waiting for the other threads, is a
// stall. Three stalls within kConfirmNs (one or two may be hiccups of the system) make the calls
// of the next kAloneFirstNs run on the calling thread alone; then the threads are tried again, and a
// stall less than kAloneMaxNs after the time alone ended makes the next time alone 4 times longer,
// up to kAloneMaxNs (one stall every 2 s at worst while a core stays busy).
//
// Fork: libgomp's threads do not survive fork, and a forked child that starts a parallel region
// after the parent used one waits for them for ever (torch's own ops too). The kernels run on the
// calling thread alone in a forked child.
#pragma once

#include <ATen/Parallel.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

namespace ccrl_ternary {
namespace work_split {

constexpr int64_t kMaxChunks = 0xFFFF;            // chunks per call (16-bit fields of a share's word)
constexpr int64_t kStallNs = 2000000;             // a wait for the other threads this long is a stall
constexpr int64_t kAloneFirstNs = 100000000;      // time alone after a stall
constexpr int64_t kAloneMaxNs = 2000000000;       // the most, after stalls in a row
constexpr int64_t kConfirmNs = 100000000;         // stalls count when kConfirmStalls come within this
constexpr int kConfirmStalls = 3;

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct State {
  std::atomic<int64_t> alone_until{0};   // calls run on the calling thread alone until then (now_ns)
  std::atomic<int64_t> alone_for{0};     // the length of that time alone
  std::atomic<int64_t> first_stall{INT64_MIN / 2};   // the first of the stalls counted in `stalls`
  std::atomic<int> stalls{0};
  std::atomic<int> team{0};              // threads of the last parallel call
  std::atomic<bool> forked{false};
};

// A call waited kStallNs or more for the other threads. If the last time alone ended less than
// kAloneMaxNs ago, the calls of the next 4 times as long (up to kAloneMaxNs) run alone; else, if
// this is the kConfirmStalls-th stall within kConfirmNs (a stall or two may be a hiccup of the
// system or of a virtual machine's host), those of the next kAloneFirstNs.
inline void note_stall(State& s, int64_t now) {
  const int64_t last = s.alone_for.load(std::memory_order_relaxed);
  const bool again = now - s.alone_until.load(std::memory_order_relaxed) < kAloneMaxNs;
  if (!again) {
    if (now - s.first_stall.load(std::memory_order_relaxed) > kConfirmNs) {
      s.first_stall.store(now, std::memory_order_relaxed);
      s.stalls.store(0, std::memory_order_relaxed);
    }
    if (s.stalls.fetch_add(1, std::memory_order_relaxed) + 1 < kConfirmStalls) return;
  }
  const int64_t alone = again ? std::min(4 * last, kAloneMaxNs) : kAloneFirstNs;
  s.alone_for.store(alone, std::memory_order_relaxed);
  s.alone_until.store(now + alone, std::memory_order_relaxed);
}

inline void mark_forked();

inline State& state() {
  static State s;
  static const bool registered = pthread_atfork(nullptr, nullptr, mark_forked) == 0;
  (void)registered;
  return s;
}

inline void mark_forked() { state().forked.store(true, std::memory_order_relaxed); }

// "threads", or why the calls run on the calling thread alone; "reset" forgets the stalls first.
inline std::string describe(const std::string& cmd) {
  State& s = state();
  if (cmd == "reset") {
    s.alone_until.store(0, std::memory_order_relaxed);
    s.alone_for.store(0, std::memory_order_relaxed);
    s.first_stall.store(INT64_MIN / 2, std::memory_order_relaxed);
    s.stalls.store(0, std::memory_order_relaxed);
  } else {
    TORCH_CHECK(cmd.empty(), "_ternary_work_split: expected '' or 'reset', got '", cmd, "'");
  }
  if (s.forked.load(std::memory_order_relaxed)) return "alone (a forked child)";
  const int64_t left = s.alone_until.load(std::memory_order_relaxed) - now_ns();
  if (left > 0) return "alone for another " + std::to_string(left / 1000000) + " ms (other threads stalled)";
  return "threads";
}

// Threads that may take part in a call of `chunks` chunks (the caller included).
inline int threads_for(int64_t chunks) {
  if (chunks <= 1 || at::in_parallel_region()) return 1;
  State& s = state();
  if (s.forked.load(std::memory_order_relaxed)) return 1;
  if (now_ns() < s.alone_until.load(std::memory_order_relaxed)) return 1;
  return static_cast<int>(std::min<int64_t>(at::get_num_threads(), chunks));
}

struct alignas(64) Share {
  std::atomic<uint32_t> word{0};   // end (16 bits) | next (16): chunks [next, end) are free
};

// Runs chunks for thread `slot`: its own share from the front, then the others' from the back.
template <class Body>
void take_chunks(Share* shares, int threads, int slot, Body& body) {
  std::atomic<uint32_t>& own = shares[slot].word;
  for (uint32_t w = own.load(std::memory_order_relaxed); (w & 0xFFFF) < (w >> 16);) {
    if (own.compare_exchange_weak(w, w + 1, std::memory_order_relaxed)) {
      body(slot, static_cast<int64_t>(w & 0xFFFF));
      w = own.load(std::memory_order_relaxed);
    }
  }
  for (int k = 1; k < threads; ++k) {
    std::atomic<uint32_t>& other = shares[(slot + k) % threads].word;
    for (uint32_t w = other.load(std::memory_order_relaxed); (w & 0xFFFF) < (w >> 16);) {
      if (other.compare_exchange_weak(w, w - (1u << 16), std::memory_order_relaxed)) {
        body(slot, static_cast<int64_t>(w >> 16) - 1);
        w = other.load(std::memory_order_relaxed);
      }
    }
  }
}

// body(slot, chunk) for every chunk in [0, chunks), each exactly once, on at most `threads`
// threads (threads_for(chunks)); `slot` in [0, threads) names the thread (0: the caller), so the
// body may keep per-slot state.
template <class Body>
void run(int threads, int64_t chunks, Body& body) {
  TORCH_CHECK(chunks <= kMaxChunks, "ternary kernels: too many chunks of work (", chunks, ")");
  threads = static_cast<int>(std::min<int64_t>(threads, chunks));
  if (threads <= 1) {
    for (int64_t c = 0; c < chunks; ++c) body(0, c);
    return;
  }
  std::unique_ptr<Share[]> shares(new Share[threads]);
  for (int s = 0; s < threads; ++s) {
    const uint32_t begin = static_cast<uint32_t>(s * chunks / threads);
    const uint32_t end = static_cast<uint32_t>((s + 1) * chunks / threads);
    shares[s].word.store((end << 16) | begin, std::memory_order_relaxed);
  }
  // The time the calling thread (OpenMP's thread 0, with slot 0) spends outside its own chunks is
  // time spent waiting for the other threads: at the start of the region for those of the last
  // one to be back, at its end for them to finish.
  const int64_t start = now_ns();
  int64_t working = 0;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      const int64_t t0 = slot == 0 ? now_ns() : 0;
      take_chunks(shares.get(), threads, static_cast<int>(slot), body);
      if (slot == 0) working = now_ns() - t0;
    }
  });
  // The first call with a new thread count may wait for OpenMP to start a thread: not a stall.
  const int64_t now = now_ns();
  State& s = state();
  if (s.team.exchange(threads, std::memory_order_relaxed) == threads && now - start - working >= kStallNs) {
    note_stall(s, now);
  }
}

// body(slot, begin, end) over [0, n) in chunks of `grain` items (more when n / grain would exceed
// kMaxChunks).
template <class Body>
void for_range(int64_t n, int64_t grain, const Body& body) {
  if (n <= 0) return;
  grain = std::max({grain, int64_t{1}, (n + kMaxChunks - 1) / kMaxChunks});
  const int64_t chunks = (n + grain - 1) / grain;
  auto chunk = [&](int slot, int64_t c) { body(slot, c * grain, std::min(n, (c + 1) * grain)); };
  run(threads_for(chunks), chunks, chunk);
}

}  // namespace work_split
}  // namespace ccrl_ternary
