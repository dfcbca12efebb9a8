// Torch registration of the ISA query: sparsekern::_cpu_isa() -> int (see csrc/cpu/isa.h).
#include <torch/library.h>

#include "cpu/isa.h"

namespace {
int64_t cpu_isa() { return static_cast<int64_t>(sparsekern::active_isa()); }
}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CompositeExplicitAutograd, m) { m.impl("_cpu_isa", &cpu_isa); }
