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

// Kernels using AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16) with AVX-512 BW/VL's 16-bit masked stores: called only
// where the CPU has AVX512_BF16 (CpuHasAvx512Bf16, core/bf16_rows.h), which every such CPU pairs with BW and VL.
#define ATTN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define ATTN_AVX512_BF16_INLINE __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) inline
