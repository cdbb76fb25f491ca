#include "core/tensor.h"

#include "absl/strings/str_join.h"

namespace attnserve {

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "FLOAT32";
    case DType::kBool: return "BOOL";
    case DType::kInt64: return "INT64";
  }
  return "UNKNOWN";
}

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kBool: return 1;
    case DType::kInt64: return 8;
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

}  // namespace attnserve
