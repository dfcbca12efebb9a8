// ctest: the ISA switch only ever lowers the detected instruction set.
#include <cstdio>
#include <cstdlib>

#include "cpu/isa.h"

using sparsekern::Isa;

int main() {
  Isa best = sparsekern::detect_isa();
  setenv("SPARSEKERN_CPU_ISA", "portable", 1);
  if (sparsekern::active_isa() != Isa::kPortable) return std::puts("portable not honoured"), 1;
  setenv("SPARSEKERN_CPU_ISA", "avx512bf16", 1);
  if (sparsekern::active_isa() != best) return std::puts("switch raised the ISA"), 1;
  unsetenv("SPARSEKERN_CPU_ISA");
  if (sparsekern::active_isa() != best) return std::puts("default is not the detected ISA"), 1;
  std::printf("detected ISA: %s\n", sparsekern::isa_name(best));
  return 0;
}
