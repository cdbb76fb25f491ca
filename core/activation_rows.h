// The activations of a batch (the query, key or value of each request) as the one row-major matrix a
// projection multiplies. Inputs come as the engine computes (f32) or as they came on the wire (BFLOAT16 or
// FLOAT16 bit patterns, little-endian, possibly unaligned): the conversion happens while the rows are
// gathered, so a 16-bit input costs no pass of its own, and a bf16 layer given bf16 rows reads them in place.
//
// Conversions: bf16 and f16 widen to f32 exactly (every value of both is an f32 value); f32 and f16 narrow to
// bf16 rounded to nearest even (f16 through its exact f32 value), as FloatRowsToBf16 rounds.
//
// Thread-safety: pure functions. The gathers split large inputs over the calling thread's OpenMP team
// (serial inside a parallel region), as FloatRowsToBf16Parallel does.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "core/onednn_ops.h"
#include "core/tensor.h"

namespace attnserve {

// Whether the engines take activations of this dtype: kFloat32, kBFloat16 or kFloat16.
bool IsActivationDType(DType dtype);

// The rows of `views` (each of `cols` columns, all of them `rows` rows) one after another as f32 [rows, cols]:
// the only view's data itself when it is f32 and 4-byte aligned, else written into `buf` (grown to rows x cols).
const float* ActivationRowsF32(absl::Span<const TensorView* const> views, int64_t rows, int64_t cols,
                               std::vector<float>& buf);

// The same as bf16 bit patterns [rows, cols]: the only view's data itself when it is bf16 and 2-byte aligned.
const uint16_t* ActivationRowsBf16(absl::Span<const TensorView* const> views, int64_t rows, int64_t cols,
                                   std::vector<uint16_t>& buf);

// y [rows, ldy] = op(the rows of `views` as one matrix [rows, cols]), gathered into `f32` or `bf16` as the op
// multiplies (ActivationRowsF32 / ActivationRowsBf16).
absl::Status ProjectRows(const LinearOp& op, absl::Span<const TensorView* const> views, int64_t rows, int64_t cols,
                         std::vector<float>& f32, std::vector<uint16_t>& bf16, float* y, int64_t ldy);
// The same with y in bf16, for an op that writes_bf16() (FailedPrecondition otherwise).
absl::Status ProjectRowsToBf16(const LinearOp& op, absl::Span<const TensorView* const> views, int64_t rows,
                               int64_t cols, std::vector<uint16_t>& bf16, uint16_t* y, int64_t ldy);
// The same for views held by value.
absl::Status ProjectRows(const LinearOp& op, absl::Span<const TensorView> views, int64_t rows, int64_t cols,
                         std::vector<float>& f32, std::vector<uint16_t>& bf16, float* y, int64_t ldy);

// Element conversions of `count` values from `src` (any alignment), on the calling thread: F16C (f16) and
// AVX2 (bf16) widening where the CPU has them, else scalar; the bf16 rounding is FloatRowsToBf16's.
void HalfToFloatValues(const void* src, int64_t count, float* dst);
void Bf16ToFloatValues(const void* src, int64_t count, float* dst);
void HalfToBf16Values(const void* src, int64_t count, uint16_t* dst);
// The scalar variants, for tests that compare.
void HalfToFloatValuesScalar(const void* src, int64_t count, float* dst);
void Bf16ToFloatValuesScalar(const void* src, int64_t count, float* dst);

}  // namespace attnserve
