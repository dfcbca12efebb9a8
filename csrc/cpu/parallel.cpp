// The parallel runtime behind parallel_for (see parallel.h for the rule it keeps and why).
#include "cpu/parallel.h"

#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>

#if defined(__x86_64__)
#include <immintrin.h>
#define SK_PAUSE() _mm_pause()
#else
#define SK_PAUSE() std::this_thread::yield()
#endif

namespace sparsekern {
namespace {

constexpr int kNextBits = 21, kNBits = 21, kThreadBits = 8;
constexpr uint64_t kFieldMask = (uint64_t{1} << kNextBits) - 1;
constexpr int kNShift = kNextBits, kThreadShift = kNextBits + kNBits, kEpochShift = kThreadShift + kThreadBits;
constexpr int64_t kMaxTickets = static_cast<int64_t>(kFieldMask);
constexpr int kMaxThreads = (1 << kThreadBits) - 1;
constexpr uint64_t kNoEpoch = ~uint64_t{0};

thread_local bool tl_in_parallel = false;

struct InParallel {
  bool saved;
  InParallel() : saved(tl_in_parallel) { tl_in_parallel = true; }
  ~InParallel() { tl_in_parallel = saved; }
};

// How long a helper spins for the next job before sleeping. NOTE: 200 us covers the gap between
// back-to-back decode calls of consecutive layers (Python and small ops: 10-80 us) while an
// idle process stops burning CPU within 0.2 ms. SPARSEKERN_SPIN_US overrides.
std::chrono::microseconds spin_time() {
  static const long us = [] {
    const char* e = std::getenv("SPARSEKERN_SPIN_US");
    return e ? std::strtol(e, nullptr, 10) : 200L;
  }();
  return std::chrono::microseconds(us < 0 ? 0 : us);
}

// Working alone after a stall: the first period, and the longest while stalls repeat.
constexpr int64_t kAloneMinNs = 10'000'000, kAloneMaxNs = 320'000'000;
// A wait shorter than this is never a stall (a chunk or two of a running helper).
constexpr int64_t kStallMinNs = 200'000;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::atomic<ThreadPool*> g_pool{nullptr};

// A forked child has none of the parent's helper threads: it starts a fresh pool (the old one is
// leaked on purpose; its mutexes may have been held by threads that do not exist in the child).
void reset_pool_in_child() { g_pool.store(nullptr); }

}  // namespace

bool in_parallel_region() { return tl_in_parallel; }

ThreadPool& default_pool() {
  ThreadPool* p = g_pool.load(std::memory_order_acquire);
  if (p) return *p;
  static const int registered = pthread_atfork(nullptr, nullptr, reset_pool_in_child);
  (void)registered;
  auto* fresh = new ThreadPool();  // helpers start lazily, so a losing candidate costs nothing
  if (g_pool.compare_exchange_strong(p, fresh)) return *fresh;
  delete fresh;
  return *p;
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  {
    std::lock_guard<std::mutex> lk(sleep_mutex_);
  }
  wake_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::grow(int helpers) {
  while (static_cast<int>(threads_.size()) < helpers) {
    const int index = static_cast<int>(threads_.size());
    threads_.emplace_back([this, index] { helper_main(index); });
  }
}

void ThreadPool::run_chunk(int64_t idx, int slot) {
  if (!job_.failed.load(std::memory_order_relaxed)) {
    try {
      const int64_t end = std::min(job_.n_user, (idx + 1) * job_.group);
      for (int64_t c = idx * job_.group; c < end; ++c) job_.fn(job_.ctx, c, slot);
    } catch (...) {
      if (!job_.failed.exchange(true)) job_.error = std::current_exception();
    }
  }
  job_.done.fetch_add(1, std::memory_order_release);
}

// Claims one chunk and runs it; false (and *seen = the ticket that said so) when none is left
// for this slot.
bool ThreadPool::claim_and_run(int slot, uint64_t* seen) {
  uint64_t t = ticket_.load(std::memory_order_acquire);
  for (;;) {
    const uint64_t next = t & kFieldMask, n = (t >> kNShift) & kFieldMask;
    const int threads = static_cast<int>((t >> kThreadShift) & kMaxThreads);
    if (next >= n || slot >= threads) {
      *seen = t;
      return false;
    }
    if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
      run_chunk(static_cast<int64_t>(next), slot);
      return true;
    }
  }
}

void ThreadPool::helper_main(int index) {
  tl_in_parallel = true;
  const int slot = index + 1;
  uint64_t seen_epoch = kNoEpoch;  // a helper started for a job joins it at once
  for (;;) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    if ((t >> kEpochShift) == seen_epoch) {
      const auto deadline = std::chrono::steady_clock::now() + spin_time();
      for (int i = 1; (t >> kEpochShift) == seen_epoch && !stop_.load(std::memory_order_relaxed); ++i) {
        SK_PAUSE();
        if (i % 64 == 0 && std::chrono::steady_clock::now() > deadline) {
          std::unique_lock<std::mutex> lk(sleep_mutex_);
          sleepers_.fetch_add(1);
          while ((ticket_.load() >> kEpochShift) == seen_epoch && !stop_.load()) wake_.wait(lk);
          sleepers_.fetch_sub(1);
        }
        t = ticket_.load(std::memory_order_acquire);
      }
    }
    if (stop_.load()) return;
    if (on_wake_) on_wake_();
    uint64_t last;
    while (claim_and_run(slot, &last)) {
    }
    seen_epoch = last >> kEpochShift;
  }
}

bool ThreadPool::working_alone() const { return now_ns() < alone_until_ns_.load(std::memory_order_relaxed); }

void ThreadPool::run(int64_t n_chunks, int threads, ChunkFn fn, void* ctx) {
  if (n_chunks <= 0) return;
  threads = threads < 1 ? 1 : threads > kMaxThreads ? kMaxThreads : threads;
  if (threads > n_chunks) threads = static_cast<int>(n_chunks);
  std::unique_lock<std::mutex> busy(run_mutex_, std::defer_lock);
  if (threads == 1 || tl_in_parallel || working_alone() || !busy.try_lock()) {
    InParallel mark;
    for (int64_t c = 0; c < n_chunks; ++c) fn(ctx, c, 0);
    return;
  }
  grow(threads - 1);
  const int64_t group = (n_chunks + kMaxTickets - 1) / kMaxTickets, n = (n_chunks + group - 1) / group;
  job_.fn = fn;
  job_.ctx = ctx;
  job_.group = group;
  job_.n_user = n_chunks;
  job_.done.store(0, std::memory_order_relaxed);
  job_.failed.store(false, std::memory_order_relaxed);
  job_.error = nullptr;
  const uint64_t epoch = ((ticket_.load(std::memory_order_relaxed) >> kEpochShift) + 1) & ((1u << 14) - 1);
  ticket_.store(epoch << kEpochShift | static_cast<uint64_t>(threads) << kThreadShift |
                static_cast<uint64_t>(n) << kNShift);
  // Dekker pair with the sleeper's sleepers_++ then ticket_ load (both seq_cst): either it sees
  // the new ticket or this sees it asleep.
  if (sleepers_.load() > 0) {
    {
      std::lock_guard<std::mutex> lk(sleep_mutex_);
    }
    wake_.notify_all();
  }
  const int64_t start = now_ns();
  int64_t mine = 0;  // chunks the caller ran
  {
    InParallel mark;
    uint64_t last;
    while (claim_and_run(0, &last)) ++mine;
  }
  // Only chunks a running helper has claimed are left: wait for those alone.
  const int64_t own_done = now_ns();
  for (int i = 1; job_.done.load(std::memory_order_acquire) < n; ++i) {
    if (i < 4096) {
      SK_PAUSE();
    } else {
      std::this_thread::yield();
    }
  }
  const int64_t end = now_ns(), waited = end - own_done;
  if (waited > kStallMinNs && waited > own_done - start) {  // a helper stopped running mid-chunk
    alone_ns_ = std::min(kAloneMaxNs, alone_ns_ ? 2 * alone_ns_ : kAloneMinNs);
    alone_until_ns_.store(end + alone_ns_, std::memory_order_relaxed);
  } else if (mine < n) {  // shared without a stall
    alone_ns_ = 0;
  }
  if (job_.failed.load(std::memory_order_relaxed)) {
    std::exception_ptr e = job_.error;
    job_.error = nullptr;
    std::rethrow_exception(e);
  }
}

}  // namespace sparsekern
