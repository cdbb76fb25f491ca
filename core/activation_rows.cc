#include "core/activation_rows.h"

#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "core/bf16_rows.h"
#include "common/half_float.h"
#include "core/omp_threads.h"

namespace attnserve {
namespace {

// Wire bytes may sit at any offset of a message: 16-bit values are read through memcpy, never a cast.
uint16_t LoadBits(const unsigned char* p, int64_t i) {
  uint16_t bits;
  std::memcpy(&bits, p + 2 * i, sizeof(bits));
  return bits;
}

bool AlignedTo(const void* p, size_t alignment) { return reinterpret_cast<uintptr_t>(p) % alignment == 0; }

__attribute__((target("avx,f16c"))) void HalfToFloatF16c(const void* src, int64_t count, float* dst) {
  const auto* p = static_cast<const unsigned char*>(src);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * i))));
  }
  HalfToFloatValuesScalar(p + 2 * i, count - i, dst + i);
}

__attribute__((target("avx2"))) void Bf16ToFloatAvx2(const void* src, int64_t count, float* dst) {
  const auto* p = static_cast<const unsigned char*>(src);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
  Bf16ToFloatValuesScalar(p + 2 * i, count - i, dst + i);
}

// CPUID rather than __builtin_cpu_supports("f16c"), which clang 14 (the fuzz build's compiler) does not know.
bool CpuHasF16c() {
  __builtin_cpu_init();
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __builtin_cpu_supports("avx") && __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
}

bool CpuHasAvx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
}

// `count` values of `dtype` at `src` (any alignment) as f32.
void ToFloatValues(DType dtype, const unsigned char* src, int64_t count, float* dst) {
  if (dtype == DType::kBFloat16) return Bf16ToFloatValues(src, count, dst);
  if (dtype == DType::kFloat16) return HalfToFloatValues(src, count, dst);
  std::memcpy(dst, src, static_cast<size_t>(count) * sizeof(float));
}

// The same rounded to bf16: f32 read in place when aligned, otherwise (and f16) through a small f32 buffer.
void ToBf16Values(DType dtype, const unsigned char* src, int64_t count, uint16_t* dst) {
  if (dtype == DType::kBFloat16) {
    std::memcpy(dst, src, static_cast<size_t>(count) * sizeof(uint16_t));
    return;
  }
  if (dtype == DType::kFloat32 && AlignedTo(src, alignof(float))) {
    FloatRowsToBf16(reinterpret_cast<const float*>(src), 1, count, count, dst, count);
    return;
  }
  constexpr int64_t kChunk = 1024;
  float chunk[kChunk];
  const size_t width = DTypeSize(dtype);
  for (int64_t i = 0; i < count; i += kChunk) {
    const int64_t n = std::min(kChunk, count - i);
    ToFloatValues(dtype, src + i * width, n, chunk);
    FloatRowsToBf16(chunk, 1, n, n, dst + i, n);
  }
}

// Writes the rows of `views` one after another into dst [rows, cols] with `convert`, split by rows over the
// calling thread's team in one parallel region (a batch of many small requests is one piece of work).
template <typename T, typename Convert>
void GatherRows(absl::Span<const TensorView* const> views, int64_t rows, int64_t cols, T* dst, Convert convert) {
  std::vector<int64_t> first_row(views.size() + 1, 0);
  for (size_t i = 0; i < views.size(); ++i) first_row[i + 1] = first_row[i] + views[i]->num_elements() / cols;
  // `rows` is their sum; the smaller of the two bounds both the reads and the writes all the same.
  ParallelRanges(std::min(rows, first_row.back()), cols, [&](int64_t r0, int64_t r1) {
    size_t i = static_cast<size_t>(std::upper_bound(first_row.begin(), first_row.end(), r0) - first_row.begin()) - 1;
    for (int64_t r = r0; r < r1; ++i) {
      const int64_t end = std::min(r1, first_row[i + 1]);
      if (end <= r) continue;  // an empty view
      const TensorView& v = *views[i];
      const auto* src = static_cast<const unsigned char*>(v.data) + (r - first_row[i]) * cols * DTypeSize(v.dtype);
      convert(v.dtype, src, (end - r) * cols, dst + r * cols);
      r = end;
    }
  });
}

// The rows as one [rows, cols] matrix of T (`native` on the wire): one request's own bytes when they already
// are, otherwise gathered into buf.
template <typename T, typename Convert>
const T* MatmulRows(absl::Span<const TensorView* const> views, int64_t rows, int64_t cols, DType native,
                    std::vector<T>& buf, Convert convert) {
  if (views.size() == 1 && views[0]->dtype == native && AlignedTo(views[0]->data, alignof(T))) {
    return static_cast<const T*>(views[0]->data);
  }
  if (buf.size() < static_cast<size_t>(rows * cols)) {  // exactly what is needed (the budget counts it), not doubled
    std::vector<T>().swap(buf);
    buf.resize(static_cast<size_t>(rows * cols));
  }
  GatherRows(views, rows, cols, buf.data(), convert);
  return buf.data();
}

}  // namespace

bool IsActivationDType(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kBFloat16 || dtype == DType::kFloat16;
}

void HalfToFloatValuesScalar(const void* src, int64_t count, float* dst) {
  const auto* p = static_cast<const unsigned char*>(src);
  for (int64_t i = 0; i < count; ++i) dst[i] = HalfToFloat(LoadBits(p, i));
}

void Bf16ToFloatValuesScalar(const void* src, int64_t count, float* dst) {
  const auto* p = static_cast<const unsigned char*>(src);
  for (int64_t i = 0; i < count; ++i) dst[i] = BFloat16ToFloat(LoadBits(p, i));
}

void HalfToFloatValues(const void* src, int64_t count, float* dst) {
  static const bool f16c = CpuHasF16c();
  f16c ? HalfToFloatF16c(src, count, dst) : HalfToFloatValuesScalar(src, count, dst);
}

void Bf16ToFloatValues(const void* src, int64_t count, float* dst) {
  static const bool avx2 = CpuHasAvx2();
  avx2 ? Bf16ToFloatAvx2(src, count, dst) : Bf16ToFloatValuesScalar(src, count, dst);
}

void HalfToBf16Values(const void* src, int64_t count, uint16_t* dst) {
  ToBf16Values(DType::kFloat16, static_cast<const unsigned char*>(src), count, dst);
}

const float* ActivationRowsF32(absl::Span<const TensorView* const> views, int64_t rows, int64_t cols,
                               std::vector<float>& buf) {
  return MatmulRows(views, rows, cols, DType::kFloat32, buf, ToFloatValues);
}

const uint16_t* ActivationRowsBf16(absl::Span<const TensorView* const> views, int64_t rows, int64_t cols,
                                   std::vector<uint16_t>& buf) {
  return MatmulRows(views, rows, cols, DType::kBFloat16, buf, ToBf16Values);
}

absl::Status ProjectRows(const LinearOp& op, absl::Span<const TensorView* const> views, int64_t rows, int64_t cols,
                         std::vector<float>& f32, std::vector<uint16_t>& bf16, float* y, int64_t ldy) {
  if (op.compute() == ComputeType::kBFloat16) {
    return op.ExecuteBf16(ActivationRowsBf16(views, rows, cols, bf16), rows, cols, y, ldy);
  }
  return op.Execute(ActivationRowsF32(views, rows, cols, f32), rows, cols, y, ldy);
}

absl::Status ProjectRowsToBf16(const LinearOp& op, absl::Span<const TensorView* const> views, int64_t rows,
                               int64_t cols, std::vector<uint16_t>& bf16, uint16_t* y, int64_t ldy) {
  if (!op.writes_bf16()) return absl::FailedPreconditionError("linear layer: no bf16 outputs from this op");
  return op.ExecuteBf16ToBf16(ActivationRowsBf16(views, rows, cols, bf16), rows, cols, y, ldy);
}

absl::Status ProjectRows(const LinearOp& op, absl::Span<const TensorView> views, int64_t rows, int64_t cols,
                         std::vector<float>& f32, std::vector<uint16_t>& bf16, float* y, int64_t ldy) {
  std::vector<const TensorView*> of(views.size());
  for (size_t i = 0; i < views.size(); ++i) of[i] = &views[i];
  return ProjectRows(op, absl::Span<const TensorView* const>(of), rows, cols, f32, bf16, y, ldy);
}

}  // namespace attnserve
