#include "core/tensor.h"

#include "absl/strings/str_join.h"

namespace attnserve {

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "FLOAT32";
    case DType::kBool: return "BOOL";
  }
  return "UNKNOWN";
}

size_t DTypeSize(DType dtype) { return dtype == DType::kFloat32 ? 4 : 1; }

std::string ShapeToString(absl::Span<const int64_t> shape) {
  return "[" + absl::StrJoin(shape, ", ") + "]";
}

int64_t NumElements(absl::Span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

}  // namespace attnserve
