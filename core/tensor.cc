#include "core/tensor.h"

#include <sys/mman.h>

#include <cstdint>

#include "absl/strings/str_join.h"

namespace attnserve {

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "FLOAT32";
    case DType::kBool: return "BOOL";
    case DType::kInt64: return "INT64";
    case DType::kBFloat16: return "BFLOAT16";
    case DType::kFloat16: return "FLOAT16";
  }
  return "UNKNOWN";
}

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kBool: return 1;
    case DType::kInt64: return 8;
    case DType::kBFloat16:
    case DType::kFloat16: return 2;
  }
  return 1;
}

std::string ShapeToString(absl::Span<const int64_t> shape) {
  // Shapes come from clients: a message never echoes more than a bounded number of dims.
  constexpr size_t kMaxDims = 8;
  if (shape.size() <= kMaxDims) return "[" + absl::StrJoin(shape, ", ") + "]";
  return "[" + absl::StrJoin(shape.subspan(0, kMaxDims), ", ") + ", ... (" + std::to_string(shape.size()) +
         " dims)]";
}

int64_t NumElements(absl::Span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

namespace {

// madvise(advice) over the 2 MiB-aligned interior of [data, data + bytes) when it holds two huge pages or more.
void AdviseInterior(void* data, size_t bytes, int advice) {
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(data), end = begin + bytes;
  const uintptr_t first = (begin + kHugePage - 1) / kHugePage * kHugePage, last = end / kHugePage * kHugePage;
  if (last >= first + 2 * kHugePage) ::madvise(reinterpret_cast<void*>(first), last - first, advice);
}

}  // namespace

void AdviseHugePages(void* data, size_t bytes) { AdviseInterior(data, bytes, MADV_HUGEPAGE); }

void UnadviseHugePages(void* data, size_t bytes) { AdviseInterior(data, bytes, MADV_NOHUGEPAGE); }

Tensor::Tensor(Shape s) : shape(std::move(s)) {
  const auto n = static_cast<size_t>(NumElements(shape));
  values.reserve(n);  // allocated, not yet touched
  AdviseHugePages(values.data(), n * sizeof(float));
  values.resize(n);
}

Tensor& Tensor::operator=(Tensor&& other) noexcept {
  if (this != &other) {
    UnadviseHugePages(values.data(), values.capacity() * sizeof(float));
    shape = std::move(other.shape);
    values = std::move(other.values);
  }
  return *this;
}

Tensor& Tensor::operator=(const Tensor& other) {
  if (this != &other) *this = Tensor(other);
  return *this;
}

Tensor::~Tensor() { UnadviseHugePages(values.data(), values.capacity() * sizeof(float)); }

}  // namespace attnserve
