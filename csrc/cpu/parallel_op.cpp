// Torch registration of the parallel runtime's team switch: sparsekern::_cpu_parallel_team(str team="")
// -> str. "" reads the team of the process's pool; "auto", "pool" or "openmp" sets it (the same
// choice as SPARSEKERN_PARALLEL; see csrc/cpu/parallel.h). Benchmarks use it to compare the teams
// in one process.
#include <torch/library.h>

#include <string>

#include "cpu/parallel.h"

namespace {
using Team = sparsekern::ThreadPool::Team;

std::string cpu_parallel_team(std::string team) {
  auto& pool = sparsekern::default_pool();
  if (!team.empty()) {
    Team want = Team::kAuto;
    TORCH_CHECK_VALUE(sparsekern::ThreadPool::parse_team(team.c_str(), &want),
                      "team: expected 'auto', 'pool' or 'openmp', got '", team, "'");
    pool.set_team(want);
  }
  return sparsekern::ThreadPool::team_name(pool.team());
}
}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CompositeExplicitAutograd, m) { m.impl("_cpu_parallel_team", &cpu_parallel_team); }
