// A checkpoint as models ship: one .safetensors file, or a sharded one's index (`*.safetensors.index.json`:
// {"metadata": {...}, "weight_map": {"tensor name": "shard file name", ...}}) whose shards sit in the index's
// folder. Shards are opened (mapped, see safetensors.h) on first use, so a layer's tensors cost the shards
// that hold them and the pages they occupy, not the whole model.
//
// Thread-safety: all methods may be called concurrently (shards open under a mutex).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/safetensors.h"

namespace attnserve {

class SafetensorsCheckpoint {
 public:
  // A path ending in ".index.json" is an index, anything else one file (opened at once). Errors name the
  // path: NotFound, InvalidArgument for a malformed index (not an object, a weight_map that is not an object of
  // strings, a shard name that is absolute or leaves the folder).
  static absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> Open(const std::string& path);

  const std::string& source() const { return source_; }
  // Every tensor name (the index's, or the file's), sorted.
  std::vector<std::string> Names() const;
  // The tensor, its shard opened if needed. NotFound when no shard lists it; the shard's own errors
  // (NotFound, InvalidArgument) when it cannot be opened; InvalidArgument when the shard does not hold the
  // tensor its index maps to it.
  absl::StatusOr<const SafetensorsEntry*> Find(std::string_view name) const;
  // Find, then SafetensorsFile::ReadFloat32 (F32, F16, BF16, F64 as f32).
  absl::StatusOr<std::vector<float>> ReadFloat32(std::string_view name) const;
  // ReadFloat32 of a tensor that must exist with `expected` shape: InvalidArgument naming the source, the
  // tensor and both shapes otherwise ("... tensor 'x' is missing (expected shape [4, 8])").
  absl::StatusOr<std::vector<float>> ReadShaped(const std::string& name, const std::vector<int64_t>& expected) const;
  // The same as bfloat16 (SafetensorsFile::ReadBFloat16: BF16 as stored, other types rounded).
  absl::StatusOr<std::vector<uint16_t>> ReadBFloat16(std::string_view name) const;
  absl::StatusOr<std::vector<uint16_t>> ReadShapedBFloat16(const std::string& name,
                                                           const std::vector<int64_t>& expected) const;

 private:
  SafetensorsCheckpoint() = default;
  absl::StatusOr<const SafetensorsFile*> Shard(const std::string& file) const;
  // The file that holds `name` (opened if needed), or Find's error.
  absl::StatusOr<const SafetensorsFile*> FileOf(std::string_view name) const;
  // OK when `name` exists with shape `expected`; InvalidArgument naming both otherwise.
  absl::Status CheckShape(const std::string& name, const std::vector<int64_t>& expected) const;

  std::string source_;
  std::string folder_;                                          // of the index, with a trailing '/'
  std::map<std::string, std::string, std::less<>> weight_map_;  // tensor -> shard file (an index)
  std::unique_ptr<SafetensorsFile> single_;                     // one file, no index
  mutable absl::Mutex mu_;
  mutable std::map<std::string, std::unique_ptr<SafetensorsFile>> shards_ ABSL_GUARDED_BY(mu_);
};

}  // namespace attnserve
