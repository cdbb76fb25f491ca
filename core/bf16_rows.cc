#include "core/bf16_rows.h"

// GCC 12's AVX-512 intrinsic headers start some results from _mm*_undefined_*(), which -Wmaybe-uninitialized
// reports at -O3 (a known false positive). Clang has no such warning (and would reject the name).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <algorithm>

#include "common/half_float.h"
#include "core/omp_threads.h"

namespace attnserve {

void FloatRowsToBf16Scalar(const float* src, int64_t rows, int64_t cols, int64_t ld_src, uint16_t* dst,
                           int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[r * ld_dst + c] = FloatToBFloat16(src[r * ld_src + c]);
  }
}

__attribute__((target("avx512f,avx512bf16,avx512vl"))) void FloatRowsToBf16Avx512Bf16(
    const float* src, int64_t rows, int64_t cols, int64_t ld_src, uint16_t* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * ld_src;
    uint16_t* d = dst + r * ld_dst;
    int64_t c = 0;
    for (; c + 32 <= cols; c += 32) {
      const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + c + 16), _mm512_loadu_ps(s + c));
      _mm512_storeu_si512(d + c, reinterpret_cast<__m512i>(pair));
    }
    if (c < cols) {
      const __mmask16 lo = static_cast<__mmask16>((1u << std::min<int64_t>(16, cols - c)) - 1);
      const __m256bh half = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(lo, s + c));
      _mm256_mask_storeu_epi16(d + c, lo, reinterpret_cast<__m256i>(half));
      c += 16;
      if (c < cols) {
        const __mmask16 hi = static_cast<__mmask16>((1u << (cols - c)) - 1);
        const __m256bh rest = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(hi, s + c));
        _mm256_mask_storeu_epi16(d + c, hi, reinterpret_cast<__m256i>(rest));
      }
    }
  }
}

namespace {

// Round to nearest even on the bit pattern; a NaN keeps its sign and gets a quiet payload bit.
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m256i RoundToBf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512i quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x00400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_mask_blend_epi32(nan, rounded, quiet), 16));
}

}  // namespace

__attribute__((target("avx512f,avx512bw,avx512vl"))) void FloatRowsToBf16Avx512F(
    const float* src, int64_t rows, int64_t cols, int64_t ld_src, uint16_t* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * ld_src;
    uint16_t* d = dst + r * ld_dst;
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, cols - c)) - 1);
      _mm256_mask_storeu_epi16(d + c, m, RoundToBf16(_mm512_maskz_loadu_ps(m, s + c)));
    }
  }
}

bool CpuHasAvx512Bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl");
}

bool CpuHasAvx512F() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

namespace {

using RowsFn = void (*)(const float*, int64_t, int64_t, int64_t, uint16_t*, int64_t);

struct Picked {
  RowsFn fn;
  const char* name;
};

const Picked& Pick() {
  static const Picked picked = CpuHasAvx512Bf16() ? Picked{FloatRowsToBf16Avx512Bf16, "avx512bf16"}
                               : CpuHasAvx512F()  ? Picked{FloatRowsToBf16Avx512F, "avx512f"}
                                                  : Picked{FloatRowsToBf16Scalar, "scalar"};
  return picked;
}

}  // namespace

void FloatRowsToBf16(const float* src, int64_t rows, int64_t cols, int64_t ld_src, uint16_t* dst, int64_t ld_dst) {
  Pick().fn(src, rows, cols, ld_src, dst, ld_dst);
}

void FloatRowsToBf16Parallel(const float* src, int64_t rows, int64_t cols, int64_t ld_src, uint16_t* dst,
                             int64_t ld_dst) {
  ParallelRanges(rows, cols, [&](int64_t r0, int64_t r1) {
    FloatRowsToBf16(src + r0 * ld_src, r1 - r0, cols, ld_src, dst + r0 * ld_dst, ld_dst);
  });
}

const char* Bf16ConversionKernel() { return Pick().name; }

}  // namespace attnserve
