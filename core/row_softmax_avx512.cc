#include "core/row_softmax_avx512.h"

#include <algorithm>
#include <limits>

#include "core/avx512_target.h"
#include "core/exp_avx512.h"
#include "core/kernel_variants.h"

namespace attnserve {
namespace {

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
      v[i] = ExpNonPositiveAvx512(_mm512_sub_ps(v[i], row_max));
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
