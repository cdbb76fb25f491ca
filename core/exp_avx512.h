// exp on AVX-512 registers, for the kernels written with intrinsics (row_softmax_avx512.cc,
// flash_strips_avx512.cc, flash_strips_bf16.cc): the polynomial of row_softmax.cc's portable one, with 2^n by
// vscalefps, and a shorter one for values that are then rounded to bf16.
#pragma once

#include "core/avx512_target.h"

namespace attnserve {

// x = n ln2 + r, |r| <= ln2 / 2 (ln2 in two parts, the first exact in float); `kept`: the lanes at or above -87
// (or NaN), whose exp is not flushed to 0. max(-110, NaN) keeps the NaN, and NaN is not below -87.
struct ExpReduced {
  __m512 n, r;
  __mmask16 kept;
};
ATTN_AVX512_INLINE ExpReduced ReduceExpArgument(__m512 x) {
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
  x = _mm512_max_ps(_mm512_set1_ps(-110.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  return {n, r, kept};
}

// exp(x) for x <= 0 (or NaN, kept): 2^n . p(r), p the Taylor series to r^7 (Estrin), as row_softmax.cc's
// ExpNonPositive, with 2^n by vscalefps. Below -87 (-inf included) 0, as there: no denormals.
ATTN_AVX512_INLINE __m512 ExpNonPositiveAvx512(__m512 x) {
  const ExpReduced e = ReduceExpArgument(x);
  const __m512 r = e.r, r2 = _mm512_mul_ps(r, r), r4 = _mm512_mul_ps(r2, r2);
  const __m512 a0 = _mm512_add_ps(r, _mm512_set1_ps(1.0f));
  const __m512 a1 = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 6), _mm512_set1_ps(0.5f));
  const __m512 a2 = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 120), _mm512_set1_ps(1.0f / 24));
  const __m512 a3 = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 5040), _mm512_set1_ps(1.0f / 720));
  const __m512 p = _mm512_fmadd_ps(_mm512_fmadd_ps(a3, r2, a2), r4, _mm512_fmadd_ps(a1, r2, a0));
  return _mm512_maskz_scalef_ps(e.kept, p, e.n);
}

// ExpNonPositiveAvx512 with a degree-4 polynomial (least squares of the relative error on Chebyshev nodes of
// [-ln2/2, ln2/2]; evaluated by Horner, 5 operations fewer): relative error below 3e-6 (exp_avx512_test measures
// it against float64 over [-87, 0]; exp(0) is 0.99999917), a six-hundredth of bf16's half ulp (at least 2^-9),
// for probabilities that are rounded to bf16. The f32 sums of the same values are within 3e-6 of exact as well,
// far inside the bf16 products they divide.
ATTN_AVX512_INLINE __m512 ExpNonPositiveForBf16Avx512(__m512 x) {
  const ExpReduced e = ReduceExpArgument(x);
  __m512 p = _mm512_fmadd_ps(e.r, _mm512_set1_ps(0.04141705483198166f), _mm512_set1_ps(0.16790661215782166f));
  p = _mm512_fmadd_ps(p, e.r, _mm512_set1_ps(0.5000485181808472f));
  p = _mm512_fmadd_ps(p, e.r, _mm512_set1_ps(0.999963641166687f));
  p = _mm512_fmadd_ps(p, e.r, _mm512_set1_ps(0.9999991655349731f));
  return _mm512_maskz_scalef_ps(e.kept, p, e.n);
}

}  // namespace attnserve
