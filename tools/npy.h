// NumPy .npy files (format versions 1.0 and 2.0), limited to what attnserve exchanges: little-endian
// float32 ('<f4') and bool ('|b1'), C order. Anything else is refused with a message saying how to convert
// it in NumPy, rather than being reinterpreted.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace attnserve {

struct NpyArray {
  enum class DType { kFloat32, kBool };
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;    // () is a scalar, one element
  std::vector<float> floats;     // kFloat32 values, row-major
  std::vector<uint8_t> bools;    // kBool values, 0 or 1, row-major
};

// Parses a whole .npy file's bytes. InvalidArgument for a bad magic, an unsupported version, dtype or
// order, a malformed header, or a data size that does not match the shape.
absl::StatusOr<NpyArray> ParseNpy(absl::string_view bytes);
// ParseNpy on a file's contents; errors start with the path. NotFound when the file cannot be read.
absl::StatusOr<NpyArray> ReadNpy(const std::string& path);

// A version 1.0 file (2.0 when the header needs more than 64 KiB), header padded to 64 bytes as NumPy does.
// InvalidArgument when the value count does not match the shape.
absl::StatusOr<std::string> EncodeNpyFloat32(absl::Span<const float> values, absl::Span<const int64_t> shape);
absl::StatusOr<std::string> EncodeNpyBool(absl::Span<const uint8_t> values, absl::Span<const int64_t> shape);
// Writes EncodeNpyFloat32 to `path` (replacing it). Errors start with the path.
absl::Status WriteNpyFloat32(const std::string& path, absl::Span<const float> values,
                             absl::Span<const int64_t> shape);

}  // namespace attnserve
