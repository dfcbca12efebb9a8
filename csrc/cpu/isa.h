// CPU instruction-set choice, made once at run time. Torch-free (unit-tested by ctest).
#pragma once

namespace sparsekern {

enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// Best instruction set this CPU supports.
Isa detect_isa();

// The one the kernels use: detect_isa(), lowered (never raised) by the environment variable
// SPARSEKERN_CPU_ISA=portable|avx2|avx512|avx512bf16 so tests can force each path.
Isa active_isa();

const char* isa_name(Isa isa);

}  // namespace sparsekern
