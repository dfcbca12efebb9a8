// The decode job of the grouped (MoE) CPU ops (nm_grouped_linear_op.cpp, bsr_grouped_linear_op.cpp):
// every decode expert's output cut into chunks, all claimed from one ticket of the pool.
// NOTE: one decode call per expert would start a job per expert and wake (and wait for) the
// pool's helpers once per expert; a decode token hits top-k (2) experts of a MoE layer.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/parallel.h"

namespace sparsekern {

// Rows x[r0, r0 + rows) routed to expert e.
struct ExpertRows {
  int64_t e, r0, rows;
};

// Output rows per chunk: at least this many (each chunk re-prepares its expert's x rows for the
// kernel, a K-sized cost against the chunk's share of the weights) ...
constexpr int64_t kMinChunkRows = 64;
// ... and about this many chunks per thread, so a helper that starts late leaves little behind.
constexpr int64_t kChunksPerThread = 4;

// run(i, u0, n) for chunks [u0, u0 + n) of the `units` units of each of `experts` experts, as
// one job of `threads` threads. A unit is `unit_rows` output rows (1 for N:M, bm for a BSR block row).
template <class Run>
void expert_chunks(int64_t experts, int64_t units, int64_t unit_rows, int threads, Run run) {
  const int64_t total = units * experts, per_job = kChunksPerThread * threads;
  const int64_t len = std::max((kMinChunkRows + unit_rows - 1) / unit_rows, (total + per_job - 1) / per_job);
  const int64_t per_expert = (units + len - 1) / len;
  parallel_for(per_expert * experts, threads, [&](int64_t c, int) {
    const int64_t u0 = c % per_expert * len;
    run(c / per_expert, u0, std::min(len, units - u0));
  });
}

}  // namespace sparsekern
