#include "tests/testing/safetensors_writer.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "common/half_float.h"
#include "nlohmann/json.hpp"

namespace attnserve::testing {
namespace {

template <typename T>
void AppendLittleEndian(T value, std::vector<uint8_t>* out) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "writer assumes a little-endian host");
  uint8_t raw[sizeof(T)];
  std::memcpy(raw, &value, sizeof(T));
  out->insert(out->end(), raw, raw + sizeof(T));
}

}  // namespace

TensorToWrite FloatTensor(const std::vector<float>& values, std::vector<int64_t> shape, const std::string& dtype) {
  // The shape is not checked against values.size(): tests build mismatched tensors on purpose.
  TensorToWrite tensor{dtype, std::move(shape), {}};
  for (float value : values) {
    if (dtype == "F32") {
      AppendLittleEndian(value, &tensor.bytes);
    } else if (dtype == "F16") {
      AppendLittleEndian(FloatToHalf(value), &tensor.bytes);
    } else if (dtype == "BF16") {
      AppendLittleEndian(FloatToBFloat16(value), &tensor.bytes);
    } else {
      // A test bug, not a runtime condition: fail loudly rather than write a silently wrong file.
      std::fprintf(stderr, "FloatTensor: unsupported dtype \"%s\"\n", dtype.c_str());
      std::abort();
    }
  }
  return tensor;
}

std::string SerializeSafetensors(const std::map<std::string, TensorToWrite>& tensors,
                                 const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  for (const auto& [name, tensor] : tensors) {  // std::map: name order
    const size_t begin = data.size();
    data.append(tensor.bytes.begin(), tensor.bytes.end());
    header[name] = {{"dtype", tensor.dtype}, {"shape", tensor.shape}, {"data_offsets", {begin, data.size()}}};
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  // `replace` keeps dump() from throwing on a name that is not valid UTF-8.
  std::string text = header.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  text.append((8 - text.size() % 8) % 8, ' ');  // the reference writer pads so the data starts 8-aligned

  std::string file(8, '\0');
  const uint64_t length = text.size();
  std::memcpy(file.data(), &length, sizeof(length));
  return file + text + data;
}

absl::Status WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::InternalError(absl::StrCat("cannot open ", path, " for writing"));
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("failed writing ", bytes.size(), " bytes to ", path));
  return absl::OkStatus();
}

}  // namespace attnserve::testing
