// The parallel runtime behind parallel_for (see parallel.h for the rule it keeps and why).
#include "cpu/parallel.h"

#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

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

ThreadPool::Team team_from_env() {
  ThreadPool::Team team = ThreadPool::Team::kAuto;
  const char* e = std::getenv("SPARSEKERN_PARALLEL");
  if (e) ThreadPool::parse_team(e, &team);  // any other value: automatic
  return team;
}

// What a calling thread knows of its OpenMP team (each thread that starts regions has its own
// team): the CPU clock of the team's first worker and the last reading of it.
struct TeamClock {
  bool known = false;
  clockid_t worker{};
  int64_t wall_ns = 0, cpu_ns = 0;
};
thread_local TeamClock tl_team;

// A thread's CPU time in ns from its clock, or -1 where the clock cannot be read.
int64_t cpu_clock_ns(clockid_t clock) {
  timespec ts;
  return clock_gettime(clock, &ts) == 0 ? int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec : -1;
}

std::atomic<ThreadPool*> g_pool{nullptr};

// A forked child has none of the parent's helper threads: it starts a fresh pool (the old one is
// leaked on purpose; its mutexes may have been held by threads that do not exist in the child).
void reset_pool_in_child() {
  g_pool.store(nullptr);
  tl_team = TeamClock{};  // the parent's team threads do not exist here
}

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

ThreadPool::ThreadPool(void (*on_wake)()) : on_wake_(on_wake), team_(team_from_env()) {}

bool ThreadPool::parse_team(const char* name, Team* team) {
  for (Team t : {Team::kAuto, Team::kPool, Team::kOpenMP}) {
    if (std::strcmp(name, team_name(t)) == 0) {
      *team = t;
      return true;
    }
  }
  return false;
}

const char* ThreadPool::team_name(Team team) {
  return team == Team::kPool ? "pool" : team == Team::kOpenMP ? "openmp" : "auto";
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  {
    std::lock_guard<std::mutex> lk(sleep_mutex_);
  }
  wake_.notify_all();
  for (auto& t : threads_) t.join();
}

// The CPUs of OpenMP's places, or false where none are defined (no OMP_PLACES / OMP_PROC_BIND /
// GOMP_CPU_AFFINITY): then a helper keeps the mask it inherits.
#if defined(__linux__)
static bool openmp_places_cpus(cpu_set_t* cpus) {
  const int places = omp_get_num_places();
  if (places <= 0) return false;
  CPU_ZERO(cpus);
  std::vector<int> ids;
  for (int p = 0; p < places; ++p) {
    ids.resize(static_cast<size_t>(std::max(0, omp_get_place_num_procs(p))));
    if (ids.empty()) continue;
    omp_get_place_proc_ids(p, ids.data());
    for (int id : ids)
      if (id >= 0 && id < CPU_SETSIZE) CPU_SET(id, cpus);
  }
  return CPU_COUNT(cpus) > 0;
}
#endif

// A helper starts with its creator's CPU mask. Where OpenMP binds threads to places (vLLM's CPU
// worker sets GOMP_CPU_AFFINITY / OMP_PLACES; so do users tuning OpenMP), the creator is the
// team's first thread, bound to one CPU, and a helper that kept that mask would share its core.
// It takes the CPUs of all the places instead, so the OS runs it on one the caller leaves free.
// NOTE: 2:4 fp32 11008x4096, 1 row, 2 threads, Zen 5, GOMP_CPU_AFFINITY="0 1": with the
// inherited mask {0} 3.2-3.3 ms against 2.3 unbound (tests/test_parallel_teams.py checks the mask).
void ThreadPool::grow(int helpers) {
  while (static_cast<int>(threads_.size()) < helpers) {
    const int index = static_cast<int>(threads_.size());
    threads_.emplace_back([this, index] { helper_main(index); });
#if defined(__linux__)
    const std::string name = "sk-pool-" + std::to_string(index + 1);
    pthread_setname_np(threads_.back().native_handle(), name.c_str());
    cpu_set_t cpus;
    if (openmp_places_cpus(&cpus)) pthread_setaffinity_np(threads_.back().native_handle(), sizeof(cpus), &cpus);
#endif
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

// Hot when the team's first worker ran for at least 80% of the wall time since the last check
// (spinning for the next region, or working in torch's): it joins a region at once. A calling
// thread that has no team clock yet (first call, or the worker's clock could not be read) goes to
// OpenMP, which records it.
bool ThreadPool::openmp_team_hot(int64_t now) {
#if defined(__linux__)
  TeamClock& tc = tl_team;
  if (!tc.known) return true;
  const int64_t cpu = cpu_clock_ns(tc.worker);
  if (cpu < 0) {
    tc.known = false;
    return true;
  }
  const int64_t wall = now - tc.wall_ns, ran = cpu - tc.cpu_ns;
  tc.wall_ns = now;
  tc.cpu_ns = cpu;
  return 5 * ran >= 4 * wall;
#else
  (void)now;
  return false;
#endif
}

// Chunks on OpenMP's team, claimed from one counter; returns the caller's count of chunks and
// sets *own_done to when it found none left. The region's end waits for every team thread.
int64_t ThreadPool::run_on_openmp(int64_t n_chunks, int threads, ChunkFn fn, void* ctx, int64_t* own_done) {
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  int64_t mine = 0;
  bool recorded = false;
  clockid_t worker{};
#pragma omp parallel num_threads(threads)
  {
    InParallel mark;
    const int slot = omp_get_thread_num();
#if defined(__linux__)
    if (slot == 1) recorded = pthread_getcpuclockid(pthread_self(), &worker) == 0;
#endif
    int64_t ran = 0;
    for (int64_t c; !failed.load(std::memory_order_relaxed) && (c = next.fetch_add(1)) < n_chunks; ++ran) {
      try {
        fn(ctx, c, slot);
      } catch (...) {
        if (!failed.exchange(true)) error = std::current_exception();
      }
    }
    if (slot == 0) {
      mine = ran;
      *own_done = now_ns();
    }
  }
  TeamClock& tc = tl_team;
  if (recorded && (!tc.known || worker != tc.worker)) {
    const int64_t cpu = cpu_clock_ns(worker);
    if (cpu >= 0) tc = TeamClock{true, worker, now_ns(), cpu};
  }
  if (error) std::rethrow_exception(error);
  return mine;
}

// Chunks on this pool's helpers (see the file comment); returns the caller's count of chunks and
// sets *own_done to when it found none left.
int64_t ThreadPool::run_on_pool(int64_t n_chunks, int threads, ChunkFn fn, void* ctx, int64_t* own_done) {
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
  int64_t mine = 0;  // tickets the caller ran
  {
    InParallel mark;
    uint64_t last;
    while (claim_and_run(0, &last)) ++mine;
  }
  // Only chunks a running helper has claimed are left: wait for those alone.
  *own_done = now_ns();
  for (int i = 1; job_.done.load(std::memory_order_acquire) < n; ++i) {
    if (i < 4096) {
      SK_PAUSE();
    } else {
      std::this_thread::yield();
    }
  }
  if (job_.failed.load(std::memory_order_relaxed)) {
    std::exception_ptr e = job_.error;
    job_.error = nullptr;
    std::rethrow_exception(e);
  }
  return mine < n ? mine : n_chunks;  // in chunks once it is all of them (tickets may group chunks)
}

void ThreadPool::run(int64_t n_chunks, int threads, ChunkFn fn, void* ctx, Team prefer) {
  if (n_chunks <= 0) return;
  threads = threads < 1 ? 1 : threads > kMaxThreads ? kMaxThreads : threads;
  if (threads > n_chunks) threads = static_cast<int>(n_chunks);
  std::unique_lock<std::mutex> busy(run_mutex_, std::defer_lock);
  if (threads == 1 || tl_in_parallel || working_alone() || !busy.try_lock()) {
    InParallel mark;
    for (int64_t c = 0; c < n_chunks; ++c) fn(ctx, c, 0);
    return;
  }
  const int64_t start = now_ns();
  Team team = team_.load(std::memory_order_relaxed);
  if (team == Team::kAuto) team = prefer;
  const bool openmp = team == Team::kOpenMP || (team == Team::kAuto && openmp_team_hot(start));
  int64_t own_done = start;
  // A chunk's exception propagates from here: a failed call says nothing about stalls.
  const int64_t mine = openmp ? run_on_openmp(n_chunks, threads, fn, ctx, &own_done)
                              : run_on_pool(n_chunks, threads, fn, ctx, &own_done);
  const int64_t end = now_ns(), waited = end - own_done;
  if (waited > kStallMinNs && waited > own_done - start) {  // a helper stopped running mid-chunk
    alone_ns_ = std::min(kAloneMaxNs, alone_ns_ ? 2 * alone_ns_ : kAloneMinNs);
    alone_until_ns_.store(end + alone_ns_, std::memory_order_relaxed);
  } else if (mine < n_chunks) {  // shared without a stall
    alone_ns_ = 0;
  }
}

}  // namespace sparsekern
