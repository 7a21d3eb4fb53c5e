// Dynamic work distribution for the kernels (ternary_op.cpp): a call's work is cut into chunks
// that the calling thread and a small persistent pool of worker threads take one at a time from
// a shared atomic counter, and the call returns as soon as every chunk is done.
//
// Why not at::parallel_for: it splits the range statically (one share per thread) and its
// OpenMP region ends in a barrier, so a thread that the OS has descheduled (another process on
// its core) holds the whole call back until it runs again: a 0.25 ms GEMV took 7-12 ms with 2
// threads and one core busy. Here a descheduled thread only misses chunks that the others take;
// the call waits for it only while it holds a chunk it has claimed.
//
// The job lives in the pool, not on the caller's stack, and the counter word carries the job's
// epoch, its chunk count and the next chunk, so a worker that wakes late (its job long done, a
// new one perhaps running) can touch nothing but a live counter: it claims a chunk only with a
// compare-and-swap on the whole word, which fails unless that chunk of that very job is still
// free; the body (and everything the caller left on its stack) is reached only through a chunk
// claimed that way, and the caller does not return before the count of finished chunks is
// complete. Every chunk runs exactly once, on whichever thread claims it, so each output
// element is computed by one thread with the same arithmetic whatever the thread count.
//
// Threads: the pool holds at::get_num_threads() - 1 workers (started when first needed), so
// torch.set_num_threads(1) means the calling thread alone. Idle workers spin for a short while
// after a job (back-to-back calls of a decoding step find them awake), then sleep on a futex.
// Fork: a child process has none of the parent's threads; a pthread_atfork handler drops the
// pool there (its memory is left alone) and the child's first call starts a new one.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <thread>

namespace ccrl_ternary {
namespace work_pool {

constexpr int64_t kMaxChunks = 0xFFFF;   // chunks per call (16 bits of the counter word)
constexpr int kMaxWorkers = 255;
constexpr int64_t kWorkerSpinNs = 100000;   // an idle worker polls this long before it sleeps
constexpr int64_t kCallerSpinNs = 20000;    // the caller polls this long for the last chunks, then sleeps

using ChunkFn = void (*)(void* ctx, int slot, int64_t chunk);

// Counter word: epoch (32 bits) | chunks of the job (16) | next chunk to hand out (16).
inline uint64_t pack(uint32_t epoch, int64_t chunks) { return (uint64_t{epoch} << 32) | (uint64_t(chunks) << 16); }
inline uint32_t epoch_of(uint64_t c) { return static_cast<uint32_t>(c >> 32); }
inline int64_t chunks_of(uint64_t c) { return static_cast<int64_t>((c >> 16) & 0xFFFF); }
inline int64_t next_of(uint64_t c) { return static_cast<int64_t>(c & 0xFFFF); }

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline void futex_wait(std::atomic<uint32_t>* word, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}

inline void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

struct Pool {
  std::mutex call;   // held by the call that uses the workers; a concurrent call runs on its own thread
  int workers = 0;   // worker threads started (slots 1..workers), under `call`
  uint32_t epoch = 0;   // the last job's epoch, under `call`

  alignas(64) std::atomic<uint64_t> ctr{0};
  std::atomic<ChunkFn> fn{nullptr};   // the job: read by a worker, used only after a successful claim
  std::atomic<void*> ctx{nullptr};
  std::atomic<int> helpers{0};        // workers 1..helpers take part
  alignas(64) std::atomic<uint32_t> done{0};   // chunks finished (futex word of a sleeping caller)
  std::atomic<uint32_t> caller_sleeps{0};
  std::atomic<uint32_t> failed{0};
  alignas(64) std::atomic<uint32_t> wake{0};   // futex word of sleeping workers
  std::atomic<int> sleepers{0};
};

inline std::atomic<Pool*>& current() {
  static std::atomic<Pool*> pool{nullptr};
  return pool;
}

// In a forked child the workers do not exist and `call` may be held by a thread that did not
// survive the fork: forget the pool (leaked, not freed) and let the child's first call make one.
inline void forget_pool_in_child() { current().store(nullptr, std::memory_order_relaxed); }

inline Pool* get_pool() {
  Pool* p = current().load(std::memory_order_acquire);
  if (p != nullptr) return p;
  static const bool registered = [] { return pthread_atfork(nullptr, nullptr, forget_pool_in_child) == 0; }();
  (void)registered;
  Pool* fresh = new Pool();
  if (!current().compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) {
    delete fresh;   // another thread made one first (p now holds it)
    return p;
  }
  return fresh;
}

// Claims chunks of the job whose counter word was read as `c` and runs them, until the job has
// none left or has been replaced. A claim is a compare-and-swap of the whole word, so it can only
// take a free chunk of that same job; `fn` and `ctx` were read after `c` and are that job's.
inline void take_chunks(Pool* p, uint64_t c, int slot, ChunkFn fn, void* ctx) {
  const uint32_t epoch = epoch_of(c);
  while (epoch_of(c) == epoch && next_of(c) < chunks_of(c)) {
    if (!p->ctr.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
    try {
      fn(ctx, slot, next_of(c));
    } catch (...) {
      p->failed.store(1, std::memory_order_relaxed);
    }
    if (p->done.fetch_add(1, std::memory_order_seq_cst) + 1 == chunks_of(c) &&
        p->caller_sleeps.load(std::memory_order_seq_cst)) {
      futex_wake_all(&p->done);
    }
    c = p->ctr.load(std::memory_order_acquire);
  }
}

// The counter word once its epoch differs from `seen`: polled for kWorkerSpinNs, then asleep.
inline uint64_t wait_for_job(Pool* p, uint32_t seen) {
  const int64_t until = now_ns() + kWorkerSpinNs;
  for (int i = 1;; ++i) {
    const uint64_t c = p->ctr.load(std::memory_order_acquire);
    if (epoch_of(c) != seen) return c;
    _mm_pause();
    if (i % 64 == 0 && now_ns() > until) break;
  }
  for (;;) {
    p->sleepers.fetch_add(1, std::memory_order_seq_cst);
    const uint32_t w = p->wake.load(std::memory_order_seq_cst);
    if (epoch_of(p->ctr.load(std::memory_order_seq_cst)) == seen) futex_wait(&p->wake, w);
    p->sleepers.fetch_sub(1, std::memory_order_seq_cst);
    const uint64_t c = p->ctr.load(std::memory_order_acquire);
    if (epoch_of(c) != seen) return c;
  }
}

inline void worker_main(Pool* p, int slot, uint32_t seen) {
  pthread_setname_np(pthread_self(), "ccrl-kernels");
  for (;;) {
    uint64_t c = p->ctr.load(std::memory_order_acquire);
    if (epoch_of(c) == seen) c = wait_for_job(p, seen);
    seen = epoch_of(c);
    if (slot > p->helpers.load(std::memory_order_relaxed)) continue;
    take_chunks(p, c, slot, p->fn.load(std::memory_order_relaxed), p->ctx.load(std::memory_order_relaxed));
  }
}

// Threads that may take part in a call of `chunks` chunks (the caller included).
inline int threads_for(int64_t chunks) {
  if (chunks <= 1 || at::in_parallel_region()) return 1;
  return static_cast<int>(std::min<int64_t>({at::get_num_threads(), chunks, kMaxWorkers + 1}));
}

// body(slot, chunk) for every chunk in [0, chunks), each exactly once, on `threads` threads at
// most (threads_for(chunks)); `slot` in [0, threads) names the thread (0: the caller), so the body
// may keep per-slot state. Returns when all chunks are done.
template <class Body>
void run(int threads, int64_t chunks, Body& body) {
  TORCH_CHECK(chunks <= kMaxChunks, "ternary kernels: too many chunks of work (", chunks, ")");
  Pool* p = threads > 1 ? get_pool() : nullptr;
  std::unique_lock<std::mutex> lock;
  if (p != nullptr) {
    lock = std::unique_lock<std::mutex>(p->call, std::try_to_lock);
    if (!lock.owns_lock()) p = nullptr;   // another thread's call has the workers
  }
  if (p != nullptr) {
    try {
      while (p->workers < threads - 1) {
        std::thread(worker_main, p, p->workers + 1, p->epoch).detach();
        ++p->workers;
      }
    } catch (const std::system_error&) {   // no more threads: run with those there are
      threads = p->workers + 1;
    }
  }
  if (p == nullptr || threads <= 1) {
    for (int64_t c = 0; c < chunks; ++c) body(0, c);
    return;
  }
  ChunkFn fn = [](void* ctx, int slot, int64_t chunk) { (*static_cast<Body*>(ctx))(slot, chunk); };
  const uint32_t epoch = ++p->epoch;
  p->fn.store(fn, std::memory_order_relaxed);
  p->ctx.store(&body, std::memory_order_relaxed);
  p->helpers.store(threads - 1, std::memory_order_relaxed);
  p->done.store(0, std::memory_order_relaxed);
  p->failed.store(0, std::memory_order_relaxed);
  p->caller_sleeps.store(0, std::memory_order_relaxed);
  p->ctr.store(pack(epoch, chunks), std::memory_order_seq_cst);   // publishes the stores above
  if (p->sleepers.load(std::memory_order_seq_cst) > 0) {
    p->wake.fetch_add(1, std::memory_order_seq_cst);
    futex_wake_all(&p->wake);
  }
  take_chunks(p, pack(epoch, chunks), 0, fn, &body);
  const uint32_t all = static_cast<uint32_t>(chunks);
  const int64_t until = now_ns() + kCallerSpinNs;
  for (int i = 1; p->done.load(std::memory_order_acquire) != all; ++i) {
    _mm_pause();
    if (i % 64 == 0 && now_ns() > until) {
      p->caller_sleeps.store(1, std::memory_order_seq_cst);
      for (uint32_t d; (d = p->done.load(std::memory_order_seq_cst)) != all;) futex_wait(&p->done, d);
      break;
    }
  }
  TORCH_CHECK(!p->failed.load(std::memory_order_relaxed), "ternary kernels: a chunk of work failed");
}

// body(slot, begin, end) over [0, n) in chunks of `grain` items (more when n / grain would exceed
// kMaxChunks); on the calling thread alone when there is one chunk.
template <class Body>
void for_range(int64_t n, int64_t grain, const Body& body) {
  if (n <= 0) return;
  grain = std::max({grain, int64_t{1}, (n + kMaxChunks - 1) / kMaxChunks});
  const int64_t chunks = (n + grain - 1) / grain;
  auto chunk = [&](int slot, int64_t c) { body(slot, c * grain, std::min(n, (c + 1) * grain)); };
  run(threads_for(chunks), chunks, chunk);
}

}  // namespace work_pool
}  // namespace ccrl_ternary
