// Vector kernels compiled for AVX-512, AVX2 and the baseline, the variant picked once at run time.
//
// ATTN_KERNEL_VARIANTS(Name, (params), (args)) defines NameAvx512, NameAvx2, NameBaseline (each calling
// `NameBody args`, which must be always_inline so that it is compiled for each target), the pointer type
// NameFn and NameFn PickName(). Not target_clones: its ifunc resolvers run during relocation, before
// ThreadSanitizer's runtime is up, and crash the process.
//
// ATTN_KERNEL_VARIANTS_BY_WIDTH(Name, (params), (args)) does the same with `NameBody<W> args`, W being
// VectorWidth16 for AVX-512, VectorWidth8 for AVX2 and VectorWidth4 for the baseline (SSE2): one register
// each. GCC 12 splits a vector wider than the target's registers for arithmetic, but spills it through the
// stack around loads and stores and does its comparisons and selects lane by lane in scalar code.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <strings.h>

namespace attnserve {

struct VectorWidth16 {
  static constexpr int64_t kLanes = 16;
  typedef float F __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  typedef uint16_t U16 __attribute__((vector_size(32)));
};

struct VectorWidth8 {
  static constexpr int64_t kLanes = 8;
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef uint16_t U16 __attribute__((vector_size(16)));
};

struct VectorWidth4 {
  static constexpr int64_t kLanes = 4;
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
  typedef uint16_t U16 __attribute__((vector_size(8)));
};

enum class KernelIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest variant the environment allows: ATTNSERVE_MAX_KERNEL_ISA=AVX2 or BASELINE (any case) caps it, as
// ONEDNN_MAX_CPU_ISA caps oneDNN's, so that tests run the narrower variants on any machine; unset or any other
// value caps nothing. (bf16_rows.cc's conversions pick by CPU feature alone.)
inline KernelIsa MaxKernelIsa() {
  const char* cap = std::getenv("ATTNSERVE_MAX_KERNEL_ISA");
  if (cap != nullptr && strcasecmp(cap, "BASELINE") == 0) return KernelIsa::kBaseline;
  if (cap != nullptr && strcasecmp(cap, "AVX2") == 0) return KernelIsa::kAvx2;
  return KernelIsa::kAvx512;
}

// The variant every ATTN_KERNEL_VARIANTS kernel runs here: the widest this CPU has, within MaxKernelIsa().
inline KernelIsa PickedKernelIsa() {
  __builtin_cpu_init();
  const KernelIsa cap = MaxKernelIsa();
  if (cap >= KernelIsa::kAvx512 && __builtin_cpu_supports("avx512f")) return KernelIsa::kAvx512;
  if (cap >= KernelIsa::kAvx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return KernelIsa::kAvx2;
  }
  return KernelIsa::kBaseline;
}

}  // namespace attnserve

// The pointer type NameFn and PickName(): the variant PickedKernelIsa() names.
#define ATTN_KERNEL_PICK(Name, Params)                              \
  using Name##Fn = void (*) Params;                                 \
  inline Name##Fn Pick##Name() {                                    \
    switch (::attnserve::PickedKernelIsa()) {                       \
      case ::attnserve::KernelIsa::kAvx512: return Name##Avx512;    \
      case ::attnserve::KernelIsa::kAvx2: return Name##Avx2;        \
      case ::attnserve::KernelIsa::kBaseline: break;                \
    }                                                               \
    return Name##Baseline;                                          \
  }

#define ATTN_KERNEL_VARIANTS(Name, Params, Args)                                    \
  __attribute__((target("avx512f"))) void Name##Avx512 Params { Name##Body Args; } \
  __attribute__((target("avx2,fma"))) void Name##Avx2 Params { Name##Body Args; }  \
  void Name##Baseline Params { Name##Body Args; }                                    \
  ATTN_KERNEL_PICK(Name, Params)

#define ATTN_KERNEL_VARIANTS_BY_WIDTH(Name, Params, Args)                                                         \
  __attribute__((target("avx512f"))) void Name##Avx512 Params { Name##Body<::attnserve::VectorWidth16> Args; } \
  __attribute__((target("avx2,fma"))) void Name##Avx2 Params { Name##Body<::attnserve::VectorWidth8> Args; }   \
  void Name##Baseline Params { Name##Body<::attnserve::VectorWidth4> Args; }                                    \
  ATTN_KERNEL_PICK(Name, Params)
