#include "core/row_softmax_avx512.h"

// GCC 12's AVX-512 intrinsic headers start some results from _mm*_undefined_*(), which -Wmaybe-uninitialized
// reports once inlined (as in bf16_rows.cc). Clang has no such warning (and would reject the name).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <immintrin.h>

#include <algorithm>
#include <limits>

#include "core/kernel_variants.h"

namespace attnserve {
namespace {

#define ATTN_AVX512 __attribute__((target("avx512f")))
#define ATTN_AVX512_INLINE __attribute__((target("avx512f"), always_inline)) inline

// exp(x) for x <= 0 (or NaN, kept): 2^n . p(r), x = n ln2 + r, p the Taylor series to r^7 (Estrin), as
// row_softmax.cc's ExpNonPositive, with 2^n by vscalefps. Below -87 (-inf included) 0, as there: no denormals.
// max(-110, NaN) keeps the NaN, and NaN is not below -87.
ATTN_AVX512_INLINE __m512 ExpNonPositive(__m512 x) {
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
  x = _mm512_max_ps(_mm512_set1_ps(-110.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  const __m512 r2 = _mm512_mul_ps(r, r), r4 = _mm512_mul_ps(r2, r2);
  const __m512 a0 = _mm512_add_ps(r, _mm512_set1_ps(1.0f));
  const __m512 a1 = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 6), _mm512_set1_ps(0.5f));
  const __m512 a2 = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 120), _mm512_set1_ps(1.0f / 24));
  const __m512 a3 = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 5040), _mm512_set1_ps(1.0f / 720));
  const __m512 p = _mm512_fmadd_ps(_mm512_fmadd_ps(a3, r2, a2), r4, _mm512_fmadd_ps(a1, r2, a0));
  return _mm512_maskz_scalef_ps(kept, p, n);
}

// 16 floats (no NaN: softmax outputs of a finite row) as bf16, rounded to nearest even, `mask` lanes stored.
ATTN_AVX512_INLINE void StoreBf16(uint16_t* p, __mmask16 mask, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd), 16);
  _mm512_mask_cvtepi32_storeu_epi16(p, mask, rounded);
}

// Rows of up to 16 * kVectors keys: the last vector masked to `cols`, its missing lanes read as -inf (exp 0).
template <int kVectors>
ATTN_AVX512 void SoftmaxRows(const float* data, int64_t rows, int64_t cols, int64_t ld, const uint8_t* dead,
                             uint16_t* out, int64_t ld_out) {
  const __mmask16 tail = static_cast<__mmask16>((1u << (cols - 16 * (kVectors - 1))) - 1);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* dst = out + r * ld_out;
    if (dead != nullptr && dead[r]) {
      std::fill_n(dst, cols, uint16_t{0});
      continue;
    }
    const float* row = data + r * ld;
    __m512 v[kVectors];
    __m512 max = neg_inf;  // NaN lanes never enter it: vmaxps returns its second operand then
    for (int i = 0; i < kVectors; ++i) {
      v[i] = i + 1 < kVectors ? _mm512_loadu_ps(row + 16 * i) : _mm512_mask_loadu_ps(neg_inf, tail, row + 16 * i);
      max = _mm512_max_ps(v[i], max);
    }
    const __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < kVectors; ++i) {
      v[i] = ExpNonPositive(_mm512_sub_ps(v[i], row_max));
      sum = _mm512_add_ps(sum, v[i]);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int i = 0; i < kVectors; ++i) {
      StoreBf16(dst + 16 * i, i + 1 < kVectors ? __mmask16{0xFFFF} : tail, _mm512_mul_ps(v[i], inv));
    }
  }
}

using SoftmaxRowsFn = void (*)(const float*, int64_t, int64_t, int64_t, const uint8_t*, uint16_t*, int64_t);

template <int... kVectors>
constexpr SoftmaxRowsFn kByVectors[] = {SoftmaxRows<kVectors>...};

}  // namespace

bool RegisterSoftmaxAvailable() {
  static const bool available = PickedKernelIsa() == KernelIsa::kAvx512;
  return available;
}

void RowSoftmaxToBf16InRegisters(const float* data, int64_t rows, int64_t cols, int64_t ld, const uint8_t* dead,
                                 uint16_t* out, int64_t ld_out) {
  static constexpr const SoftmaxRowsFn* table = kByVectors<1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>;
  table[(cols + 15) / 16 - 1](data, rows, cols, ld, dead, out, ld_out);
}

}  // namespace attnserve
