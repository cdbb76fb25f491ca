// A reader for the safetensors format (https://github.com/huggingface/safetensors), written from the spec:
//   [8 bytes: N, little-endian u64] [N bytes: JSON header] [data buffer]
// The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the
// start of the data buffer) plus an optional "__metadata__" map of string to string.
//
// Open() validates everything the spec demands and names the tensor in every error:
//   - N fits inside the file (and below 100 MB), the header is valid UTF-8 JSON object starting with '{';
//   - every entry has a known dtype, a non-negative integer shape and two ordered offsets;
//   - end - begin == numel(shape) * dtype size;
//   - the tensors' byte ranges, sorted, tile the data buffer exactly: no gap, no overlap, nothing past the
//     end of the file, and no trailing bytes after the last tensor.
// Data is not assumed aligned: readers copy with memcpy.
//
// Open() maps the file (read-only, private) instead of reading it: validation reads the header alone, and a
// tensor's pages are read when its values are, so one layer of a multi-GiB checkpoint costs that layer's
// bytes. The mapping lives as long as the object; entries' `data` point into it.
//
// Thread-safety: immutable after Open(); all const methods may be called concurrently.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace attnserve {

// The spec's dtype names: "BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
// "I64", "U64" (also "F8_E4M3"/"F8_E5M2", 1 byte, accepted but not convertible).
// Returns 0 for an unknown name.
size_t SafetensorsDtypeSize(std::string_view dtype);

struct SafetensorsEntry {
  std::string name;
  std::string dtype;            // as written in the header, e.g. "F32"
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the file's buffer; may be unaligned
  size_t num_bytes = 0;
  int64_t num_elements() const;
};

class SafetensorsFile {
 public:
  // Maps and validates a file. Errors: NotFound (no such file), InvalidArgument (malformed, or it cannot be
  // mapped), with the path and, where one is at fault, the tensor's name.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // The same validation on bytes in memory; `source` names them in errors.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Parse(std::string bytes,
                                                                 const std::string& source = "<memory>");

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;  // entries point into bytes_ or the mapping
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // nullptr when absent.
  const SafetensorsEntry* Find(std::string_view name) const;
  // All tensor names, sorted.
  std::vector<std::string> Names() const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& source() const { return source_; }

  // The tensor's values as f32, converted from F32, F16, BF16 or F64. InvalidArgument for another dtype,
  // NotFound when absent; both name the tensor.
  absl::StatusOr<std::vector<float>> ReadFloat32(std::string_view name) const;
  // The tensor's values as bfloat16 bit patterns: BF16 as stored; F32, F16 and F64 through f32, rounded to
  // nearest even (what a bf16 matmul would make of them). Same errors; the same reading and page dropping.
  absl::StatusOr<std::vector<uint16_t>> ReadBFloat16(std::string_view name) const;
  // The tensor's values as bytes 0/1, from BOOL or U8. Same errors.
  absl::StatusOr<std::vector<uint8_t>> ReadBool(std::string_view name) const;

 private:
  SafetensorsFile() = default;
  // Validates `all` (the whole file: bytes_ or the mapping) and fills entries_ and metadata_.
  absl::Status Index(std::string_view all);
  // The entry of a floating-point tensor: NotFound, or InvalidArgument for another dtype, naming it.
  absl::StatusOr<const SafetensorsEntry*> FindFloating(std::string_view name) const;

  std::string source_;
  std::string bytes_;         // Parse(): the bytes
  // madvise(advice) over the mapped pages wholly inside `entry`. ReadFloat32 reads a tensor sequentially
  // and then drops its pages (MADV_DONTNEED): a layer of a multi-GiB checkpoint holds its f32 copy and one
  // tensor's pages at a time, not every page it read.
  void AdvisePages(const SafetensorsEntry& entry, int advice) const;
  void* map_ = nullptr;       // Open(): the mapping, map_bytes_ long (nullptr for an empty file)
  size_t map_bytes_ = 0;
  std::map<std::string, SafetensorsEntry, std::less<>> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace attnserve
