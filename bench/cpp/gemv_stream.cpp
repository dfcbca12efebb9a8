// The lean step's dense GEMV (csrc/cpu/gemv.cpp) over TinyLlama-1.1B's bf16 linears and head, one
// x row, torch-free: 22 x (qkv 2560x2048, o 2048x2048, gate_up 11264x2048, down 2048x5632) + head
// 32000x2048 = 2.07 GB per pass, as one decode token reads them. Prints the median and best GB/s
// of 30 passes. Each weight has its own anonymous mapping, advised MADV_HUGEPAGE or
// MADV_NOHUGEPAGE by the first argument. AVX-512 BF16 CPUs run the vdpbf16ps loops, others with
// AVX2 the widening ones.
//
//   g++ -O3 -std=c++17 -march=x86-64-v3 -fopenmp -Icsrc -o /tmp/gemv_stream bench/cpp/gemv_stream.cpp \
//       csrc/cpu/gemv.cpp csrc/cpu/linear_common.cpp csrc/cpu/parallel.cpp csrc/cpu/isa.cpp -lpthread
//   /tmp/gemv_stream 1 [threads]
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/gemv.h"

using sparsekern::DType;

int main(int argc, char** argv) {
  const bool huge = argc > 1 && std::atoi(argv[1]) != 0;
  const int threads = argc > 2 ? std::atoi(argv[2]) : 2;
  if (!sparsekern::gemv_supported(DType::kBF16)) {
    std::puts("this CPU has no AVX2: nothing to measure");
    return 0;
  }
  struct Shape {
    int64_t n, k;
  };
  std::vector<Shape> shapes;
  for (int l = 0; l < 22; ++l) {
    for (Shape s : {Shape{2560, 2048}, Shape{2048, 2048}, Shape{11264, 2048}, Shape{2048, 5632}}) shapes.push_back(s);
  }
  shapes.push_back({32000, 2048});
  std::vector<void*> w;
  size_t total = 0;
  for (const Shape& s : shapes) {
    const size_t bytes = s.n * s.k * 2;
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 1;
    madvise(p, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    std::memset(p, 0x3f, bytes);  // bf16 0.74: finite sums
    w.push_back(p);
    total += bytes;
  }
  std::vector<uint16_t> x(5632, 0x3f80), y(32000);
  std::vector<double> seconds;
  for (int rep = 0; rep < 30; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (size_t i = 0; i < shapes.size(); ++i) {
      const Shape& s = shapes[i];
      sparsekern::gemv(x.data(), 1, s.k, w[i], nullptr, s.n, s.k, y.data(), s.n, DType::kBF16, threads);
    }
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(seconds.begin(), seconds.end());
  std::printf("huge pages %d, %d threads: median %.1f ms (%.1f GB/s), best %.1f ms (%.1f GB/s)\n", huge, threads,
              seconds[15] * 1e3, total / seconds[15] / 1e9, seconds[0] * 1e3, total / seconds[0] / 1e9);
  return 0;
}
