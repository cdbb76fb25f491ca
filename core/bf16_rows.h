// f32 -> bfloat16 conversion of strided rows, for the matmul inputs of BF16 layers (round to nearest even).
// The AVX512-BF16 variant (vcvtneps2bf16) treats f32 denormal inputs as zero and flushes denormal results;
// the other variants keep them. NaN stays NaN and infinities stay infinite in every variant.
//
// Thread-safety: pure functions. Single-threaded: callers parallelise over rows if they want to.
#pragma once

#include <cstdint>

namespace attnserve {

// dst[r * ld_dst + c] = bf16(src[r * ld_src + c]) for r < rows, c < cols.
void FloatRowsToBf16(const float* src, int64_t rows, int64_t cols, int64_t ld_src, uint16_t* dst, int64_t ld_dst);

// The same on the calling thread's OpenMP team (omp_get_max_threads()), split by rows; serial inside a
// parallel region or for small inputs (a nested team would start fresh threads).
void FloatRowsToBf16Parallel(const float* src, int64_t rows, int64_t cols, int64_t ld_src, uint16_t* dst,
                             int64_t ld_dst);

// Which variant FloatRowsToBf16 runs on this CPU: "avx512bf16", "avx512f" or "scalar".
const char* Bf16ConversionKernel();

// The variants themselves, for tests that compare them (each runs only where the CPU supports it).
void FloatRowsToBf16Scalar(const float* src, int64_t rows, int64_t cols, int64_t ld_src, uint16_t* dst,
                           int64_t ld_dst);
bool CpuHasAvx512Bf16();
bool CpuHasAvx512F();
void FloatRowsToBf16Avx512Bf16(const float* src, int64_t rows, int64_t cols, int64_t ld_src, uint16_t* dst,
                               int64_t ld_dst);
void FloatRowsToBf16Avx512F(const float* src, int64_t rows, int64_t cols, int64_t ld_src, uint16_t* dst,
                            int64_t ld_dst);

}  // namespace attnserve
