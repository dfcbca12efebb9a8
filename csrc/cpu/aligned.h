// 64-byte aligned scratch arrays for the CPU kernels (freed with std::free).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

namespace sparsekern {

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
template <class T>
using AlignedArray = std::unique_ptr<T[], AlignedFree>;

// n elements of T, uninitialized, 64-byte aligned.
template <class T>
AlignedArray<T> aligned_array(int64_t n) {
  void* p = std::aligned_alloc(64, (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64);
  if (p == nullptr) throw std::bad_alloc();
  return AlignedArray<T>(static_cast<T*>(p));
}

}  // namespace sparsekern
