// Loads, stores and sums of the vector kernels' W::F values (core/kernel_variants.h), for any of the widths.
// Every function is always_inline: a vector value never crosses a call boundary.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/kernel_variants.h"

// GCC warns about the ABI of returning a vector from a function compiled without its instruction set (the
// baseline variant) before inlining it. Outside push/pop: the warning is also given where a template is
// instantiated, in the including file.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace attnserve::simd {

// n <= kLanes floats at p; lanes past n hold `fill`. A whole vector is one load (constant-size memcpy).
template <typename W>
__attribute__((always_inline)) inline typename W::F Load(const float* p, int64_t n, float fill) {
  typename W::F v = typename W::F{} + fill;
  if (n == W::kLanes) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    std::memcpy(&v, p, static_cast<size_t>(n) * sizeof(float));
  }
  return v;
}

// kLanes floats at p.
template <typename W>
__attribute__((always_inline)) inline typename W::F LoadFull(const float* p) {
  typename W::F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename W>
__attribute__((always_inline)) inline void Store(float* p, int64_t n, typename W::F v) {
  if (n == W::kLanes) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    std::memcpy(p, &v, static_cast<size_t>(n) * sizeof(float));
  }
}

// The sum of a vector's lanes by halves: log2(kLanes) shuffles and adds. A lane-by-lane loop is what GCC makes
// of an `omp simd` reduction, a chain of kLanes dependent scalar adds through the stack.
__attribute__((always_inline)) inline float ReduceAdd(VectorWidth4::F v) {
  typedef float F2 __attribute__((vector_size(8)));
  const F2 pair = __builtin_shufflevector(v, v, 0, 1) + __builtin_shufflevector(v, v, 2, 3);
  return pair[0] + pair[1];
}

__attribute__((always_inline)) inline float ReduceAdd(VectorWidth8::F v) {
  return ReduceAdd(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
}

__attribute__((always_inline)) inline float ReduceAdd(VectorWidth16::F v) {
  return ReduceAdd(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}

}  // namespace attnserve::simd
