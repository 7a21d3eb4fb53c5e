// Dynamic work distribution for the kernels (ternary_op.cpp): a call's work is cut into chunks
// that the calling thread and a small persistent pool of worker threads claim one at a time
// with atomic compare-and-swaps, and the call returns as soon as every chunk is done.
//
// Why not at::parallel_for: it gives each thread one fixed share, and its OpenMP region ends in
// a barrier, so a thread that the OS has descheduled (another process on its core) holds the
// whole call back until it runs again: the 0.25 ms GEMV 6912x2560 took 7-16 ms with 2 threads
// while another process kept one of 2 cores busy. Here a thread that is not running only misses
// chunks that the others take; the call waits for it only while it holds a chunk it has claimed.
//
// Shares and stealing: thread s (0 = the caller) owns the chunks [s, s + 1) * chunks / threads,
// one range word per thread, and takes them from the front; a thread whose range is empty takes
// what is left of the others' ranges from the back. On an idle machine every thread runs its own
// share, the same rows every call (as at::parallel_for's split, so the weights a core reads stay
// in its cache); a late or absent thread's share is taken by the others.
//
// Late threads: the job lives in the pool, not on the caller's stack, and each range word holds
// the job's epoch with its free chunks [next, end), so a worker that wakes late (its job long
// done, another perhaps running) can touch nothing but live counters: a claim is a
// compare-and-swap of a whole range word, which fails unless that chunk of that very job is still
// free. The body (and everything the caller keeps on its stack) is reached only through a chunk
// claimed that way, and the caller returns only once the count of finished chunks is complete.
// Every chunk runs exactly once, on the thread that claimed it, so each output element is
// computed by one thread with the same arithmetic whatever the thread count.
//
// Threads and CPUs: the pool holds at::get_num_threads() - 1 workers (started when first needed),
// so torch.set_num_threads(1) means the calling thread alone. An idle worker polls for the next
// job for kWorkerSpinNs of its own CPU time (back-to-back calls of a decoding step find it
// awake), then sleeps on a futex. A worker that finds itself on the caller's CPU (the scheduler
// puts it there when the other cores are busy) neither polls nor takes chunks there, since it
// could only take time from the caller; it sleeps, and while all workers sleep on the caller's
// CPU only every 16th call wakes them, so that the scheduler can place them on a CPU that has
// become free.
//
// Fork: a child process has none of the parent's threads; a pthread_atfork handler drops the
// pool there (its memory is left as it is) and the child's first call starts a new one.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <mutex>
#include <system_error>
#include <thread>

namespace ccrl_ternary {
namespace work_pool {

constexpr int64_t kMaxChunks = 0xFFFF;   // chunks per call (16-bit fields of the words below)
constexpr int kMaxWorkers = 255;
constexpr int64_t kWorkerSpinNs = 100000;   // an idle worker polls this long (its CPU time), then sleeps
constexpr int64_t kCallerSpinNs = 20000;    // the caller polls this long for chunks others hold, then sleeps
constexpr uint32_t kProbeEvery = 16;        // calls per wake of workers asleep on the caller's CPU

using ChunkFn = void (*)(void* ctx, int slot, int64_t chunk);

// The job word: epoch (32 bits) | threads taking part (16) | chunks (16).
// A range word (one per thread): epoch (32) | end (16) | next (16); chunks [next, end) are free.
inline uint64_t pack(uint32_t epoch, int64_t hi, int64_t lo) {
  return (uint64_t{epoch} << 32) | (static_cast<uint64_t>(hi) << 16) | static_cast<uint64_t>(lo);
}
inline uint32_t epoch_of(uint64_t w) { return static_cast<uint32_t>(w >> 32); }
inline int64_t hi_of(uint64_t w) { return static_cast<int64_t>((w >> 16) & 0xFFFF); }
inline int64_t lo_of(uint64_t w) { return static_cast<int64_t>(w & 0xFFFF); }

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

struct alignas(64) Range {
  std::atomic<uint64_t> word{0};
};

struct Pool {
  Pool() {
    for (auto& cpu : sleep_cpu) cpu.store(-1, std::memory_order_relaxed);
  }

  std::mutex call;        // held by the call that uses the workers; a concurrent call runs on its own thread
  int workers = 0;        // worker threads started (slots 1..workers); under `call`
  uint32_t epoch = 0;     // the last job's epoch; under `call`
  uint32_t skipped = 0;   // calls that did not wake workers asleep on the caller's CPU; under `call`

  alignas(64) std::atomic<uint64_t> job{0};
  std::atomic<ChunkFn> fn{nullptr};   // the job's body: read by a worker, used only after a successful claim
  std::atomic<void*> ctx{nullptr};
  std::atomic<int> caller_cpu{-1};
  alignas(64) std::atomic<uint32_t> done{0};   // chunks finished (futex word of a sleeping caller)
  std::atomic<uint32_t> caller_sleeps{0};
  std::atomic<uint32_t> failed{0};
  alignas(64) std::atomic<uint32_t> wake{0};   // futex word of sleeping workers
  std::atomic<int> sleepers{0};
  std::atomic<int> sleep_cpu[kMaxWorkers + 1];   // the CPU a sleeping worker fell asleep on, else -1
  Range ranges[kMaxWorkers + 1];
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
  static const bool registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child) == 0;
  (void)registered;
  Pool* fresh = new Pool();
  if (!current().compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) {
    delete fresh;   // another thread made one first (p now holds it)
    return p;
  }
  return fresh;
}

inline void run_chunk(Pool* p, int slot, ChunkFn fn, void* ctx, int64_t chunk) {
  try {
    fn(ctx, slot, chunk);
  } catch (...) {
    p->failed.store(1, std::memory_order_relaxed);
  }
}

// Adds a thread's finished chunks to the job's count (once per thread and job, not per chunk: the
// count's cache line is shared by all threads) and wakes the caller if that completed the job.
inline void count_done(Pool* p, int64_t n, int64_t chunks) {
  if (n > 0 && p->done.fetch_add(static_cast<uint32_t>(n), std::memory_order_seq_cst) + n == chunks &&
      p->caller_sleeps.load(std::memory_order_seq_cst)) {
    futex_wake_all(&p->done);
  }
}

// Runs chunks of the job whose job word was read as `job`: the slot's own range from the front,
// then what is left of the other ranges from the back, until none is left or the job has been
// replaced, and counts them done. `fn` and `ctx` were read after `job`; a successful claim
// proves they are its own.
inline void take_chunks(Pool* p, uint64_t job, int slot, ChunkFn fn, void* ctx) {
  const uint32_t epoch = epoch_of(job);
  const int threads = static_cast<int>(hi_of(job));
  const int64_t chunks = lo_of(job);
  int64_t ran = 0;
  std::atomic<uint64_t>& own = p->ranges[slot].word;
  for (uint64_t w = own.load(std::memory_order_acquire); epoch_of(w) == epoch && lo_of(w) < hi_of(w);) {
    if (own.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
      run_chunk(p, slot, fn, ctx, lo_of(w));
      ++ran;
      w = own.load(std::memory_order_acquire);
    }
  }
  for (int k = 1; k < threads; ++k) {
    std::atomic<uint64_t>& other = p->ranges[(slot + k) % threads].word;
    for (uint64_t w = other.load(std::memory_order_acquire); lo_of(w) < hi_of(w) && epoch_of(w) == epoch;) {
      if (other.compare_exchange_weak(w, w - (uint64_t{1} << 16), std::memory_order_acq_rel,
                                      std::memory_order_acquire)) {
        run_chunk(p, slot, fn, ctx, hi_of(w) - 1);
        ++ran;
        w = other.load(std::memory_order_acquire);
      }
    }
  }
  count_done(p, ran, chunks);
}

inline bool on_caller_cpu(Pool* p) { return sched_getcpu() == p->caller_cpu.load(std::memory_order_relaxed); }

// The job word once its epoch differs from `seen`: polled, then asleep on the futex.
inline uint64_t wait_for_job(Pool* p, int slot, uint32_t seen) {
  // The polling budget counts only time on the CPU: a gap between two looks at the clock means
  // the thread was descheduled meanwhile.
  int64_t last = now_ns(), left = kWorkerSpinNs;
  for (int i = 0;; ++i) {
    const uint64_t job = p->job.load(std::memory_order_acquire);
    if (epoch_of(job) != seen) return job;
    if (i % 64 == 0) {
      const int64_t now = now_ns();
      if (now - last < 20000) left -= now - last;
      last = now;
      if (left < 0 || on_caller_cpu(p)) break;
    }
    _mm_pause();
  }
  p->sleep_cpu[slot].store(sched_getcpu(), std::memory_order_relaxed);
  for (;;) {
    p->sleepers.fetch_add(1, std::memory_order_seq_cst);
    const uint32_t w = p->wake.load(std::memory_order_seq_cst);
    if (epoch_of(p->job.load(std::memory_order_seq_cst)) == seen) futex_wait(&p->wake, w);
    p->sleepers.fetch_sub(1, std::memory_order_seq_cst);
    const uint64_t job = p->job.load(std::memory_order_acquire);
    if (epoch_of(job) != seen) {
      p->sleep_cpu[slot].store(-1, std::memory_order_relaxed);
      return job;
    }
  }
}

inline void worker_main(Pool* p, int slot, uint32_t seen) {
  for (;;) {
    uint64_t job = p->job.load(std::memory_order_acquire);
    if (epoch_of(job) == seen) job = wait_for_job(p, slot, seen);
    seen = epoch_of(job);
    if (slot >= hi_of(job) || on_caller_cpu(p)) continue;   // not one of its threads / left to the caller
    take_chunks(p, job, slot, p->fn.load(std::memory_order_relaxed), p->ctx.load(std::memory_order_relaxed));
  }
}

// Whether a job of `threads` threads should wake the sleeping workers: yes if one of them fell
// asleep on another CPU than the caller's, else on every kProbeEvery-th call.
inline bool worth_waking(Pool* p, int threads) {
  const int mine = p->caller_cpu.load(std::memory_order_relaxed);
  for (int s = 1; s < threads; ++s) {
    const int cpu = p->sleep_cpu[s].load(std::memory_order_relaxed);
    if (cpu >= 0 && cpu != mine) return true;
  }
  return ++p->skipped % kProbeEvery == 0;
}

// Threads that may take part in a call of `chunks` chunks (the caller included).
inline int threads_for(int64_t chunks) {
  if (chunks <= 1 || at::in_parallel_region()) return 1;
  return static_cast<int>(std::min<int64_t>({at::get_num_threads(), chunks, kMaxWorkers + 1}));
}

// body(slot, chunk) for every chunk in [0, chunks), each exactly once, on at most `threads`
// threads (threads_for(chunks)); `slot` in [0, threads) names the thread (0: the caller), so the
// body may keep per-slot state. Returns when all chunks are done.
template <class Body>
void run(int threads, int64_t chunks, Body& body) {
  TORCH_CHECK(chunks <= kMaxChunks, "ternary kernels: too many chunks of work (", chunks, ")");
  threads = static_cast<int>(std::min<int64_t>(threads, chunks));
  Pool* p = threads > 1 ? get_pool() : nullptr;
  std::unique_lock<std::mutex> lock;
  if (p != nullptr) {
    lock = std::unique_lock<std::mutex>(p->call, std::try_to_lock);
    if (!lock.owns_lock()) p = nullptr;   // another thread's call has the workers
  }
  if (p != nullptr) {
    try {
      while (p->workers < threads - 1) {
        std::thread worker(worker_main, p, p->workers + 1, p->epoch);
        pthread_setname_np(worker.native_handle(), "ccrl-kernels");
        worker.detach();
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
  p->caller_cpu.store(sched_getcpu(), std::memory_order_relaxed);
  p->done.store(0, std::memory_order_relaxed);
  p->failed.store(0, std::memory_order_relaxed);
  p->caller_sleeps.store(0, std::memory_order_relaxed);
  for (int s = 0; s < threads; ++s) {
    p->ranges[s].word.store(pack(epoch, (s + 1) * chunks / threads, s * chunks / threads), std::memory_order_relaxed);
  }
  const uint64_t job = pack(epoch, threads, chunks);
  p->job.store(job, std::memory_order_seq_cst);   // publishes the stores above
  if (p->sleepers.load(std::memory_order_seq_cst) > 0 && worth_waking(p, threads)) {
    p->wake.fetch_add(1, std::memory_order_seq_cst);
    futex_wake_all(&p->wake);
  }
  take_chunks(p, job, 0, fn, &body);
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
