// Kernel output allocation shared by the CPU ops (torch side only).
#pragma once
#ifdef SPARSEKERN_TORCH
#include <ATen/ATen.h>

#include <cstdlib>
#include <limits>

namespace sparsekern {

// Uninitialised output; NaN-filled when SPARSEKERN_POISON_OUTPUTS=1 (the tests set it) so an
// element a kernel forgets to write fails the comparison instead of passing on stale memory.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool poison = [] {
    const char* v = std::getenv("SPARSEKERN_POISON_OUTPUTS");
    return v != nullptr && v[0] == '1';
  }();
  at::Tensor out = at::empty(sizes, options);
  if (poison) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

}  // namespace sparsekern
#endif
