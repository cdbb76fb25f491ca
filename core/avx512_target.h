// Function attributes for kernels written with AVX-512 intrinsics in files compiled for the baseline ISA: each
// such function is compiled for AVX-512 F and called only where the CPU has it (core/kernel_variants.h). Include
// this header instead of <immintrin.h>: its warning pragma must come before the intrinsic headers.
#pragma once

// GCC 12's AVX-512 intrinsic headers start some results from _mm*_undefined_*(), which -Wmaybe-uninitialized
// reports once inlined (as in bf16_rows.cc). Clang has no such warning (and would reject the name). The warning
// stays off for the rest of the including file: include this header only from the kernel files.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <immintrin.h>

#define ATTN_AVX512 __attribute__((target("avx512f")))
#define ATTN_AVX512_INLINE __attribute__((target("avx512f"), always_inline)) inline
