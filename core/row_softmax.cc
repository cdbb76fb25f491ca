#include "core/row_softmax.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "core/kernel_variants.h"

// The vector values never cross a call boundary (every function taking one is always_inline), but GCC and
// clang warn about the ABI of the baseline variant's calls before inlining them.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace attnserve {
namespace {

// 16 floats as one value: GCC lowers its operations to one AVX-512 register, two AVX2 ones or four SSE ones
// in each variant. Spelled out because the loop does not auto-vectorize here (GCC turns the underflow
// select into a branch first).
typedef float F16 __attribute__((vector_size(64)));
typedef int I16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

// exp(x) for x <= 0: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series to r^7 (truncation below
// 1e-8 relative on that range), 2^n through the exponent bits. Below -87 (exp < 1.7e-38, under the smallest
// normal float) and for -inf: 0. NaN stays NaN (and never reaches the float-to-int conversion).
__attribute__((always_inline)) inline F16 ExpNonPositive(F16 x) {
  const F16 log2e = F16{} + 1.44269504088896341f, ln2_hi = F16{} + 0.693359375f, ln2_lo = F16{} - 2.12194440e-4f;
  const F16 input = x;
  const I16 keep = x >= -87.0f;  // all ones, or 0 (also for NaN)
  x = x >= -87.0f ? x : F16{} - 87.0f;  // NaN too
  const I16 n = __builtin_convertvector(x * log2e - 0.5f, I16);  // truncation: rounds to nearest for x <= 0
  const F16 nf = __builtin_convertvector(n, F16);
  const F16 r = (x - nf * ln2_hi) - nf * ln2_lo;
  F16 p = F16{} + 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I16 scale = ((n + 127) << 23) & keep;  // 0.0f where x was below -87
  const F16 e = p * __builtin_bit_cast(F16, scale);
  return input == input ? e : input;
}

// n <= kLanes floats at p; lanes past n hold `fill`. A whole vector is one load (constant-size memcpy).
__attribute__((always_inline)) inline F16 Load(const float* p, int64_t n, float fill) {
  F16 v = F16{} + fill;
  if (n == kLanes) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    std::memcpy(&v, p, static_cast<size_t>(n) * sizeof(float));
  }
  return v;
}

__attribute__((always_inline)) inline void Store(float* p, int64_t n, F16 v) {
  if (n == kLanes) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    std::memcpy(p, &v, static_cast<size_t>(n) * sizeof(float));
  }
}

// Replaces the row by exp(x - max) and returns 1 / the sum of those.
__attribute__((always_inline)) inline float ExpRowInPlace(float* row, int64_t cols) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  F16 max16 = F16{} + kNegInf;
  for (int64_t j = 0; j < cols; j += kLanes) {
    const F16 v = Load(row + j, std::min(kLanes, cols - j), kNegInf);
    max16 = v > max16 ? v : max16;
  }
  float max = kNegInf;
  for (int64_t i = 0; i < kLanes; ++i) max = std::max(max, max16[i]);
  F16 sum16 = F16{};
  for (int64_t j = 0; j < cols; j += kLanes) {
    const int64_t n = std::min(kLanes, cols - j);
    const F16 e = ExpNonPositive(Load(row + j, n, kNegInf) - max);  // the fill lanes: exp(-inf) = 0
    Store(row + j, n, e);
    sum16 += e;
  }
  float sum = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) sum += sum16[i];
  return 1.0f / sum;
}

__attribute__((always_inline)) inline void RowSoftmaxBody(float* data, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = data + r * ld;
    const float inv = ExpRowInPlace(row, cols);
    for (int64_t j = 0; j < cols; j += kLanes) {
      const int64_t n = std::min(kLanes, cols - j);
      Store(row + j, n, Load(row + j, n, 0.0f) * inv);
    }
  }
}

ATTN_KERNEL_VARIANTS(RowSoftmax, (float* data, int64_t rows, int64_t cols, int64_t ld), (data, rows, cols, ld))

// bf16 bit patterns of 16 finite floats, rounded to nearest even (softmax outputs: no NaN, no infinity).
__attribute__((always_inline)) inline void StoreBf16(uint16_t* p, int64_t n, F16 v) {
  const I16 bits = __builtin_bit_cast(I16, v);
  typedef uint16_t U16 __attribute__((vector_size(32)));
  const U16 out = __builtin_convertvector((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, U16);
  if (n == kLanes) {
    std::memcpy(p, &out, sizeof(out));
  } else {
    std::memcpy(p, &out, static_cast<size_t>(n) * sizeof(uint16_t));
  }
}

// As RowSoftmaxBody, the normalisation writing bf16 to `out` instead of f32 in place (data keeps exp(x -
// max), unnormalised); rows flagged in `dead` (may be null) get zeros without being read.
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
    const float inv = ExpRowInPlace(row, cols);
    for (int64_t j = 0; j < cols; j += kLanes) {
      const int64_t n = std::min(kLanes, cols - j);
      StoreBf16(dst + j, n, Load(row + j, n, 0.0f) * inv);
    }
  }
}

ATTN_KERNEL_VARIANTS(RowSoftmaxToBf16,
                     (float* data, int64_t rows, int64_t cols, int64_t ld, const uint8_t* dead, uint16_t* out,
                      int64_t ld_out),
                     (data, rows, cols, ld, dead, out, ld_out))

}  // namespace

void RowSoftmaxToBf16(float* data, int64_t rows, int64_t cols, int64_t ld, const uint8_t* dead, uint16_t* out,
                      int64_t ld_out) {
  static const RowSoftmaxToBf16Fn picked = PickRowSoftmaxToBf16();
  picked(data, rows, cols, ld, dead, out, ld_out);
}

void RowSoftmax(float* data, int64_t rows, int64_t cols, int64_t ld) {
  static const RowSoftmaxFn picked = PickRowSoftmax();  // on first use: safe from any static initialiser
  picked(data, rows, cols, ld);
}

}  // namespace attnserve
