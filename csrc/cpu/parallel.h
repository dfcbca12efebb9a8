// The CPU kernels' parallel runtime: a caller never waits for a thread that has not started,
// except on OpenMP's team while that team is hot (below), which joins at once.
//
// Work is split into chunks claimed one at a time from an atomic ticket. The calling thread
// claims and runs chunks itself and, once none are left, waits only for chunks that a helper has
// already claimed (and so is running). A helper that wakes late finds nothing left and goes back
// to sleep; the call is never slower than the caller doing all the work alone.
//
// NOTE: why not OpenMP. With `#pragma omp parallel` the region's join waits for every team
// thread, scheduled or not. On the 2-core EPYC (quiet moment), 2:4 fp32 4096x4096 at 1 row:
// hot 1.5 ms, first call after 200 ms idle 5.5-7.8 ms (libgomp's helper had gone to sleep and
// the join waited for its wake-up); with one busy process on the other core, 2:4 fp32
// 11008x4096 decode fell from 2.4x to 1.1x dense (1 thread alone was faster than 2). Numbers for
// this runtime: bench/bench_cpu_threads.py.
//
// But inside a model the pool's helper is the intruder: after each torch op, torch's OpenMP
// threads spin for a few milliseconds waiting for the next parallel region, on the very cores
// the helper needs, so the helper runs late or not at all (perf, HF generate decode, 2:4 bf16:
// torch's OpenMP worker spun for 31.6% of all samples). Such a team joins a region at once. So a
// call goes to OpenMP's team (still claiming chunks from one counter) when that team is hot, and
// to this pool otherwise. Hot: the team's first worker thread ran for at least 80% of the wall
// time since the previous check (its CPU clock, one clock_gettime), i.e. it was spinning or
// working, not asleep and not sharing its core with another process. The first call of a
// calling thread goes to OpenMP to learn its team. NOTE: TinyLlama-1.1B shapes, fp32, 2:4,
// HF `generate`, Zen 4, both teams in one process, interleaved (bench/bench_generate_rounds.py
// --teams auto,pool): batch 1 6.6 -> 8.3 tokens/s, batch 8 18.4 -> 31.4; the lean decode path
// unchanged. Always OpenMP fails where the pool is right: block 90% 4096x4096, first call after
// 200 ms idle 4.1-4.5 ms against 0.54-0.66 (the join waits for a sleeping thread), and 0.43x
// dense beside a busy process (pool: 24x); the automatic choice keeps the pool's figures there
// (bench/bench_cpu_threads.py). SPARSEKERN_PARALLEL=pool|openmp pins one team. The 2:4 GEMM
// (nm_gemm_avx512.cpp, prefill) asks for OpenMP's team, hot or not (run's `prefer`): a call of
// many milliseconds pays little for a late team thread. NOTE: TinyLlama-1.1B shapes, bf16, 2:4,
// forward of 512 tokens against the dense model, Zen 4, same process, random order: GEMM on this
// pool 0.89x, on OpenMP 1.00-1.10x (128 tokens: 0.81x, 1.02x).
//
// Helpers spin for a short while after a job (back-to-back decode calls never pay a wake-up),
// then sleep on a condition variable, so an idle process burns no CPU. Nested calls (from inside
// a chunk) and calls made while another thread is using the pool run inline on the caller.
//
// A helper that is preempted while it holds a chunk (another process wants its core) still makes
// the caller wait, for up to a scheduler time slice (on OpenMP's team: any team thread that is
// not running). When the caller waits longer for claimed chunks than it worked itself, the pool
// works alone (every call inline on the caller) for a
// while: 10 ms, doubling while stalls repeat (up to 320 ms), back to 10 ms after a call the
// helpers shared without one. NOTE: 2:4 fp32 11008x4096, 1 row, one busy-loop process pinned to
// the other core of the 2-core Zen 4: see bench/bench_cpu_threads.py's busy column.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace sparsekern {

// fn(ctx, chunk, slot): slot in [0, threads) names the thread running the chunk for the length
// of one run (0 = the caller), so per-thread scratch can be indexed by it.
using ChunkFn = void (*)(void* ctx, int64_t chunk, int slot);

class ThreadPool {
 public:
  // on_wake (tests only): called by a helper each time it sees a new job, before claiming.
  explicit ThreadPool(void (*on_wake)() = nullptr);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Whose threads share a call: kAuto (OpenMP's team while it is hot, else this pool's helpers;
  // see the file comment), or always one of them (tests, SPARSEKERN_PARALLEL).
  enum class Team { kAuto, kPool, kOpenMP };

  // Runs fn(ctx, c, slot) for every c in [0, n_chunks) exactly once, on up to `threads` threads
  // (the caller included). The first exception a chunk throws is rethrown here once every
  // claimed chunk has finished; the chunks not yet claimed then are skipped. `prefer`: the team
  // for this call when none is pinned (set_team); kAuto chooses as the file comment says.
  void run(int64_t n_chunks, int threads, ChunkFn fn, void* ctx, Team prefer = Team::kAuto);

  template <class F>
  void run(int64_t n_chunks, int threads, F&& f, Team prefer = Team::kAuto) {
    using Fn = std::remove_reference_t<F>;
    run(n_chunks, threads, [](void* c, int64_t i, int s) { (*static_cast<Fn*>(c))(i, s); },
        const_cast<void*>(static_cast<const void*>(&f)), prefer);
  }

  int helpers() const { return static_cast<int>(threads_.size()); }

  // True while a stall (see the file comment) keeps every call on the caller alone.
  bool working_alone() const;

  void set_team(Team team) { team_.store(team, std::memory_order_relaxed); }
  Team team() const { return team_.load(std::memory_order_relaxed); }
  // "auto", "pool", "openmp" (SPARSEKERN_PARALLEL, _cpu_parallel_team): false for any other name.
  static bool parse_team(const char* name, Team* team);
  static const char* team_name(Team team);

 private:
  struct Job {
    ChunkFn fn = nullptr;
    void* ctx = nullptr;
    int64_t group = 1;  // user chunks per ticket index (when n_chunks exceeds the ticket's field)
    int64_t n_user = 0;
    std::atomic<int64_t> done{0};
    std::atomic<bool> failed{false};
    std::exception_ptr error;
  };
  bool claim_and_run(int slot, uint64_t* seen);
  int64_t run_on_pool(int64_t n_chunks, int threads, ChunkFn fn, void* ctx, int64_t* own_done);
  int64_t run_on_openmp(int64_t n_chunks, int threads, ChunkFn fn, void* ctx, int64_t* own_done);
  bool openmp_team_hot(int64_t now);
  void run_chunk(int64_t idx, int slot);
  void helper_main(int index);
  void grow(int helpers);

  void (*on_wake_)();
  // [epoch:14][threads:8][n:21][next:21]: everything a thread needs to decide whether it may
  // claim is in this one word, so a stale reader can never claim a chunk of a finished job (the
  // job's other fields are read only after a claim succeeds, while the job is still running).
  std::atomic<uint64_t> ticket_{0};
  Job job_;
  std::mutex run_mutex_;  // one job at a time; a second concurrent caller runs inline
  std::atomic<Team> team_;
  std::atomic<int64_t> alone_until_ns_{0};  // steady-clock time before which run() works alone
  int64_t alone_ns_ = 0;                    // the next such period (under run_mutex_)
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;
};

// The process-wide pool the kernels use (created on first use, recreated in a forked child).
ThreadPool& default_pool();

// True on a thread that is running a chunk (nested calls run inline).
bool in_parallel_region();

// fn(chunk, slot) for chunk in [0, n_chunks) on the default pool; `prefer` as ThreadPool::run.
template <class F>
void parallel_for(int64_t n_chunks, int threads, F&& fn, ThreadPool::Team prefer = ThreadPool::Team::kAuto) {
  default_pool().run(n_chunks, threads, std::forward<F>(fn), prefer);
}

// Items per chunk for loops whose items are `elems` elements each: loops under ~64K elements in
// all run serially (a thread hand-off costs more than they do).
inline int64_t grain_for(int64_t elems) {
  return elems >= (int64_t{1} << 15) ? 1 : (int64_t{1} << 15) / (elems > 0 ? elems : 1);
}

// Threads for a decode (few-row) linear of `macs` multiply-adds (rows x stored weights): the
// caller alone below 32K (1 row of 2:4 at 128 x 512), where a hand-off costs about what the
// second thread saves.
// NOTE: 2-core EPYC, 1 row, back-to-back calls (helpers spinning), 2:4 at K=576, 1 vs 2 threads
// (python op call, ~4 us of it overhead): 72x72 fp32 5.1 vs 6.7 us, bf16 5.1 vs 5.7; 96x576 fp32
// 6.9 vs 8.7, bf16 6.8 vs 6.3; 384x576 fp32 16.1 vs 16.0, bf16 16.3 vs 10.8; 960x576 34 vs 20-27.
inline int decode_threads(int threads, int64_t macs) { return macs < (int64_t{1} << 15) ? 1 : threads; }

// fn(lo, hi, slot) over [0, n) split into about 8 chunks per thread (a late helper leaves at most
// a small chunk to the others), each at least `grain` long; serial when n < 2 * grain.
template <class F>
void parallel_range(int64_t n, int threads, int64_t grain, F&& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  if (threads <= 1 || n < 2 * grain) return fn(int64_t{0}, n, 0);
  int64_t len = (n + 8 * threads - 1) / (8 * threads);
  if (len < grain) len = grain;
  const int64_t chunks = (n + len - 1) / len;
  parallel_for(chunks, threads, [&](int64_t c, int slot) { fn(c * len, std::min(n, c * len + len), slot); });
}

}  // namespace sparsekern
