#include "core/row_softmax.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "core/kernel_variants.h"
#include "core/row_softmax_avx512.h"
#include "core/vector_ops.h"

namespace attnserve {
namespace {

using simd::Load;
using simd::Store;

// The kernels are templates over the vector width W (core/kernel_variants.h): W::F holds W::kLanes floats
// as one value, one register of the variant's target, so that comparisons and selects are single
// instructions. Spelled out because the loops do not auto-vectorize here (GCC turns the underflow select
// into a branch first).
template <typename W>
__attribute__((always_inline)) inline typename W::F Max(typename W::F a, typename W::F b) {
  return a > b ? a : b;
}

// exp(x) for x <= 0: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series to r^7 (truncation below
// 1e-8 relative on that range), 2^n through the exponent bits. Below -87 (exp < 1.7e-38, under the smallest
// normal float) and for -inf: 0. NaN stays NaN (and never reaches the float-to-int conversion).
template <typename W>
__attribute__((always_inline)) inline typename W::F ExpNonPositive(typename W::F x) {
  using F = typename W::F;
  using I = typename W::I;
  const F log2e = F{} + 1.44269504088896341f, ln2_hi = F{} + 0.693359375f, ln2_lo = F{} - 2.12194440e-4f;
  const F input = x;
  const I keep = x >= -87.0f;  // all ones, or 0 (also for NaN)
  x = x >= -87.0f ? x : F{} - 87.0f;  // NaN too
  const I n = __builtin_convertvector(x * log2e - 0.5f, I);  // truncation: rounds to nearest for x <= 0
  const F nf = __builtin_convertvector(n, F);
  const F r = (x - nf * ln2_hi) - nf * ln2_lo;
  // Estrin's scheme: three dependent multiply-adds instead of Horner's seven. The loops are latency-bound
  // (a vector's chain outlasts what the out-of-order window holds), so the depth is what costs.
  const F r2 = r * r, r4 = r2 * r2;
  const F a0 = r + 1.0f, a1 = r * (1.0f / 6) + 0.5f, a2 = r * (1.0f / 120) + 1.0f / 24;
  const F a3 = r * (1.0f / 5040) + 1.0f / 720;
  const F p = (a0 + a1 * r2) + (a2 + a3 * r2) * r4;
  const I scale = ((n + 127) << 23) & keep;  // 0.0f where x was below -87
  const F e = p * __builtin_bit_cast(F, scale);
  return input == input ? e : input;
}

// A vector's lanes folded pairwise, halves onto halves, in registers: log2(lanes) shuffles and ops deep. A
// lane-by-lane chain of 16 dependent adds cost as much as a 64-key row's exponentials, and folding through a
// stack array stalled on store forwarding. Lane i meets lane i + half at each step as before, so the sums are the
// same bits. kMax: the largest lane, else the sum (no callable: a vector never crosses a call, vector_ops.h).
template <typename W, bool kMax>
__attribute__((always_inline)) inline typename W::F FoldStep(typename W::F a, typename W::F b) {
  if constexpr (kMax) {
    return Max<W>(a, b);
  } else {
    return a + b;
  }
}

template <typename W, bool kMax>
__attribute__((always_inline)) inline float FoldLanes(typename W::F v) {
  if constexpr (W::kLanes == 16) {
    v = FoldStep<W, kMax>(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    v = FoldStep<W, kMax>(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    v = FoldStep<W, kMax>(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    v = FoldStep<W, kMax>(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  } else if constexpr (W::kLanes == 8) {
    v = FoldStep<W, kMax>(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
    v = FoldStep<W, kMax>(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
    v = FoldStep<W, kMax>(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
  } else {
    static_assert(W::kLanes == 4, "vector widths of kernel_variants.h");
    v = FoldStep<W, kMax>(v, __builtin_shufflevector(v, v, 2, 3, 0, 1));
    v = FoldStep<W, kMax>(v, __builtin_shufflevector(v, v, 1, 0, 3, 2));
  }
  return v[0];
}

template <typename W>
__attribute__((always_inline)) inline float Sum(typename W::F v) {
  return FoldLanes<W, false>(v);
}

// Largest of the first n floats of row (n >= 1).
template <typename W>
__attribute__((always_inline)) inline float RowMax(const float* row, int64_t n) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  typename W::F max_v = typename W::F{} + kNegInf;
  for (int64_t j = 0; j < n; j += W::kLanes) {
    max_v = Max<W>(Load<W>(row + j, std::min(W::kLanes, n - j), kNegInf), max_v);
  }
  return FoldLanes<W, true>(max_v);
}

// Replaces the first n floats of row by exp(x - max) (max at least each of them) and returns their sum.
template <typename W>
__attribute__((always_inline)) inline float ExpSumInPlace(float* row, int64_t n, float max) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  typename W::F sum = typename W::F{};
  for (int64_t j = 0; j < n; j += W::kLanes) {
    const int64_t k = std::min(W::kLanes, n - j);
    const typename W::F e = ExpNonPositive<W>(Load<W>(row + j, k, kNegInf) - max);  // fill lanes: exp(-inf) = 0
    Store<W>(row + j, k, e);
    sum += e;
  }
  return Sum<W>(sum);
}

// Replaces the row by exp(x - max) and returns 1 / the sum of those.
template <typename W>
__attribute__((always_inline)) inline float ExpRowInPlace(float* row, int64_t cols) {
  return 1.0f / ExpSumInPlace<W>(row, cols, RowMax<W>(row, cols));
}

template <typename W>
__attribute__((always_inline)) inline void RowSoftmaxBody(float* data, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = data + r * ld;
    const float inv = ExpRowInPlace<W>(row, cols);
    for (int64_t j = 0; j < cols; j += W::kLanes) {
      const int64_t n = std::min(W::kLanes, cols - j);
      Store<W>(row + j, n, Load<W>(row + j, n, 0.0f) * inv);
    }
  }
}

ATTN_KERNEL_VARIANTS_BY_WIDTH(RowSoftmax, (float* data, int64_t rows, int64_t cols, int64_t ld),
                              (data, rows, cols, ld))

// bf16 bit patterns of kLanes finite floats, rounded to nearest even (softmax outputs: no NaN, no infinity).
template <typename W>
__attribute__((always_inline)) inline void StoreBf16(uint16_t* p, int64_t n, typename W::F v) {
  const typename W::I bits = __builtin_bit_cast(typename W::I, v);
  const typename W::U16 out = __builtin_convertvector((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, typename W::U16);
  if (n == W::kLanes) {
    std::memcpy(p, &out, sizeof(out));
  } else {
    std::memcpy(p, &out, static_cast<size_t>(n) * sizeof(uint16_t));
  }
}

// As RowSoftmaxBody, the normalisation writing bf16 to `out` instead of f32 in place (data keeps exp(x -
// max), unnormalised); rows flagged in `dead` (may be null) get zeros without being read.
template <typename W>
__attribute__((always_inline)) inline void RowSoftmaxToBf16Body(float* data, int64_t rows, int64_t cols,
                                                                int64_t ld, const uint8_t* dead, uint16_t* out,
                                                                int64_t ld_out) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = data + r * ld;
    uint16_t* dst = out + r * ld_out;
    if (dead != nullptr && dead[r]) {
      std::fill_n(dst, cols, uint16_t{0});
      continue;
    }
    const float inv = ExpRowInPlace<W>(row, cols);
    for (int64_t j = 0; j < cols; j += W::kLanes) {
      const int64_t n = std::min(W::kLanes, cols - j);
      StoreBf16<W>(dst + j, n, Load<W>(row + j, n, 0.0f) * inv);
    }
  }
}

ATTN_KERNEL_VARIANTS_BY_WIDTH(RowSoftmaxToBf16,
                              (float* data, int64_t rows, int64_t cols, int64_t ld, const uint8_t* dead,
                               uint16_t* out, int64_t ld_out),
                              (data, rows, cols, ld, dead, out, ld_out))

template <typename W>
__attribute__((always_inline)) inline void OnlineSoftmaxBlockBody(float* scores, int64_t rows, int64_t cols,
                                                                  int64_t ld, int64_t open0, float* row_max,
                                                                  float* row_sum, float* acc, int64_t acc_cols,
                                                                  int64_t ld_acc) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * ld;
    const int64_t open = std::clamp<int64_t>(open0 + r, 0, cols);
    const float m = open == 0 ? kNegInf : std::max(row_max[r], RowMax<W>(row, open));
    if (m == kNegInf) {
      std::fill_n(row, cols, 0.0f);
      continue;
    }
    const float sum = ExpSumInPlace<W>(row, open, m);
    std::fill(row + open, row + cols, 0.0f);
    FoldBlockIntoRow(m, sum, row_max + r, row_sum + r, acc + r * ld_acc, acc_cols);
  }
}

ATTN_KERNEL_VARIANTS_BY_WIDTH(OnlineSoftmaxBlock,
                              (float* scores, int64_t rows, int64_t cols, int64_t ld, int64_t open0,
                               float* row_max, float* row_sum, float* acc, int64_t acc_cols, int64_t ld_acc),
                              (scores, rows, cols, ld, open0, row_max, row_sum, acc, acc_cols, ld_acc))

// tanh(x) for x >= 0 (or NaN, kept): below 1/4 its odd Taylor series to x^9 (truncation below 3e-9), where
// 1 - exp(-2x) would cancel; above, (1 - e) / (1 + e) with e = exp(-2x) (1 at +inf).
template <typename W>
__attribute__((always_inline)) inline typename W::F TanhNonNegative(typename W::F x) {
  using F = typename W::F;
  const F x2 = x * x;
  const F series = x + x * x2 * (-1.0f / 3 + x2 * (2.0f / 15 + x2 * (-17.0f / 315 + x2 * (62.0f / 2835))));
  const F e = ExpNonPositive<W>(x * -2.0f);
  const F ratio = (1.0f - e) / (1.0f + e);
  return x < 0.25f ? series : ratio;
}

template <typename W>
__attribute__((always_inline)) inline void SoftCapRowsBody(float* data, int64_t rows, int64_t cols, int64_t ld,
                                                           float cap) {
  using F = typename W::F;
  using I = typename W::I;
  const float inv_cap = 1.0f / cap;
  const I sign_bit = I{} + static_cast<int32_t>(0x80000000u);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = data + r * ld;
    for (int64_t j = 0; j < cols; j += W::kLanes) {
      const int64_t k = std::min<int64_t>(W::kLanes, cols - j);
      const I bits = __builtin_bit_cast(I, Load<W>(row + j, k, 0.0f) * inv_cap);
      // tanh is odd: of |x|, the sign put back (-0 stays -0; NaN stays NaN).
      const F t = TanhNonNegative<W>(__builtin_bit_cast(F, bits & ~sign_bit)) * cap;
      Store<W>(row + j, k, __builtin_bit_cast(F, __builtin_bit_cast(I, t) | (bits & sign_bit)));
    }
  }
}

ATTN_KERNEL_VARIANTS_BY_WIDTH(SoftCapRows, (float* data, int64_t rows, int64_t cols, int64_t ld, float cap),
                              (data, rows, cols, ld, cap))

}  // namespace

void FoldBlockIntoRow(float block_max, float block_sum, float* row_max, float* row_sum, float* acc_row,
                      int64_t acc_cols) {
  if (*row_max == -std::numeric_limits<float>::infinity()) {
    *row_sum = block_sum;
  } else {
    const float alpha = std::exp(*row_max - block_max);
    *row_sum = *row_sum * alpha + block_sum;
    if (alpha != 1.0f) {
      for (int64_t j = 0; j < acc_cols; ++j) acc_row[j] *= alpha;
    }
  }
  *row_max = block_max;
}

void OnlineSoftmaxBlock(float* scores, int64_t rows, int64_t cols, int64_t ld, int64_t open0, float* row_max,
                        float* row_sum, float* acc, int64_t acc_cols, int64_t ld_acc) {
  static const OnlineSoftmaxBlockFn picked = PickOnlineSoftmaxBlock();
  picked(scores, rows, cols, ld, open0, row_max, row_sum, acc, acc_cols, ld_acc);
}

void RowSoftmaxToBf16(float* data, int64_t rows, int64_t cols, int64_t ld, const uint8_t* dead, uint16_t* out,
                      int64_t ld_out) {
  if (cols >= 1 && cols <= kMaxRegisterSoftmaxCols && RegisterSoftmaxAvailable()) {
    RowSoftmaxToBf16InRegisters(data, rows, cols, ld, dead, out, ld_out);
    return;
  }
  static const RowSoftmaxToBf16Fn picked = PickRowSoftmaxToBf16();
  picked(data, rows, cols, ld, dead, out, ld_out);
}

void SoftCapRows(float* data, int64_t rows, int64_t cols, int64_t ld, float cap) {
  static const SoftCapRowsFn picked = PickSoftCapRows();
  picked(data, rows, cols, ld, cap);
}

void RowSoftmax(float* data, int64_t rows, int64_t cols, int64_t ld) {
  static const RowSoftmaxFn picked = PickRowSoftmax();  // on first use: safe from any static initialiser
  picked(data, rows, cols, ld);
}

}  // namespace attnserve
