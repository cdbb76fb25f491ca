// Writes safetensors files for tests: well-formed ones, and the raw pieces needed to build corrupted ones.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace attnserve::testing {

struct TensorToWrite {
  std::string dtype;             // "F32", "F16", "BF16", "BOOL", ...
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;    // raw little-endian data, numel * dtype size bytes
};

// f32 values encoded as `dtype` ("F32", "F16" or "BF16").
TensorToWrite FloatTensor(const std::vector<float>& values, std::vector<int64_t> shape,
                          const std::string& dtype = "F32");

// A whole file in memory: tensors laid out in name order, header padded with spaces to a multiple of 8.
std::string SerializeSafetensors(const std::map<std::string, TensorToWrite>& tensors,
                                 const std::map<std::string, std::string>& metadata = {});
absl::Status WriteFile(const std::string& path, const std::string& bytes);

}  // namespace attnserve::testing
