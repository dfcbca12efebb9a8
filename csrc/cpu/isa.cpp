#include "cpu/isa.h"

#include <cstdlib>
#include <cstring>

namespace sparsekern {

Isa detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

static Isa parse(const char* s, Isa fallback) {
  if (s == nullptr) return fallback;
  if (!std::strcmp(s, "portable")) return Isa::kPortable;
  if (!std::strcmp(s, "avx2")) return Isa::kAvx2;
  if (!std::strcmp(s, "avx512")) return Isa::kAvx512;
  if (!std::strcmp(s, "avx512bf16")) return Isa::kAvx512Bf16;
  return fallback;
}

Isa active_isa() {
  // Read each call (cheap) so a test can switch paths inside one process.
  Isa best = detect_isa();
  Isa want = parse(std::getenv("SPARSEKERN_CPU_ISA"), best);
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512bf16";
    default: return "portable";
  }
}

}  // namespace sparsekern
