// Vector kernels compiled for AVX-512, AVX2 and the baseline, the variant picked once at run time.
//
// ATTN_KERNEL_VARIANTS(Name, (params), (args)) defines NameAvx512, NameAvx2, NameBaseline (each calling
// `NameBody args`, which must be always_inline so that it is compiled for each target), the pointer type
// NameFn and NameFn PickName(). Not target_clones: its ifunc resolvers run during relocation, before
// ThreadSanitizer's runtime is up, and crash the process.
#pragma once

#define ATTN_KERNEL_VARIANTS(Name, Params, Args)                                           \
  __attribute__((target("avx512f"))) void Name##Avx512 Params { Name##Body Args; }        \
  __attribute__((target("avx2,fma"))) void Name##Avx2 Params { Name##Body Args; }         \
  void Name##Baseline Params { Name##Body Args; }                                           \
  using Name##Fn = void (*) Params;                                                         \
  inline Name##Fn Pick##Name() {                                                            \
    __builtin_cpu_init();                                                                   \
    if (__builtin_cpu_supports("avx512f")) return Name##Avx512;                            \
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Name##Avx2; \
    return Name##Baseline;                                                                  \
  }
