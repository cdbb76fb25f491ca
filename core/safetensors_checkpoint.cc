#include "core/safetensors_checkpoint.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/memory/memory.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/tensor.h"
#include "nlohmann/json.hpp"

namespace attnserve {
namespace {

using Json = nlohmann::json;

// Index files are a few MB at most (one entry per tensor); past this one is not an index.
constexpr std::streamoff kMaxIndexBytes = std::streamoff{64} << 20;

absl::Status BadIndex(const std::string& path, std::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": not a safetensors index: ", std::string(what)));
}

absl::StatusOr<std::string> ReadIndex(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) {
    if (!std::filesystem::exists(path)) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot open"));
  }
  const std::streamoff size = in.tellg();
  if (size < 0 || size > kMaxIndexBytes) {
    return BadIndex(path, absl::StrCat(size, " bytes (at most ", kMaxIndexBytes, ")"));
  }
  in.seekg(0);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// A shard's name must stay in the index's folder: a bare file name (or a relative path without "..").
bool StaysInFolder(const std::string& shard) {
  if (shard.empty() || shard.front() == '/') return false;
  for (const auto& part : std::filesystem::path(shard)) {
    if (part == "..") return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> SafetensorsCheckpoint::Open(const std::string& path) {
  auto checkpoint = absl::WrapUnique(new SafetensorsCheckpoint());
  checkpoint->source_ = path;
  if (!absl::EndsWith(path, ".index.json")) {
    ATTN_ASSIGN_OR_RETURN(checkpoint->single_, SafetensorsFile::Open(path));
    return checkpoint;
  }
  ATTN_ASSIGN_OR_RETURN(const std::string text, ReadIndex(path));
  const Json index = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!index.is_object()) return BadIndex(path, "not a JSON object");
  const auto map = index.find("weight_map");
  if (map == index.end() || !map->is_object()) return BadIndex(path, "no \"weight_map\" object");
  for (const auto& [tensor, shard] : map->items()) {
    if (!shard.is_string()) return BadIndex(path, absl::StrCat("weight_map[\"", tensor, "\"] is not a string"));
    const std::string file = shard.get<std::string>();
    if (!StaysInFolder(file)) {
      return BadIndex(path, absl::StrCat("weight_map[\"", tensor, "\"] = \"", file,
                                         "\" leaves the index's folder (absolute, empty or with \"..\")"));
    }
    checkpoint->weight_map_.emplace(tensor, file);
  }
  const std::filesystem::path folder = std::filesystem::path(path).parent_path();
  checkpoint->folder_ = folder.empty() ? "" : folder.string() + "/";
  return checkpoint;
}

std::vector<std::string> SafetensorsCheckpoint::Names() const {
  if (single_ != nullptr) return single_->Names();
  std::vector<std::string> names;
  names.reserve(weight_map_.size());
  for (const auto& [name, shard] : weight_map_) names.push_back(name);
  return names;
}

absl::StatusOr<const SafetensorsFile*> SafetensorsCheckpoint::Shard(const std::string& file) const {
  absl::MutexLock lock(&mu_);
  std::unique_ptr<SafetensorsFile>& shard = shards_[file];
  if (shard == nullptr) {
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> opened = SafetensorsFile::Open(folder_ + file);
    if (!opened.ok()) {
      shards_.erase(file);
      return opened.status();
    }
    shard = std::move(*opened);
  }
  return shard.get();
}

absl::StatusOr<const SafetensorsEntry*> SafetensorsCheckpoint::Find(std::string_view name) const {
  if (single_ != nullptr) {
    const SafetensorsEntry* entry = single_->Find(name);
    if (entry == nullptr) {
      return absl::NotFoundError(absl::StrCat(source_, ": tensor '", std::string(name), "' not found"));
    }
    return entry;
  }
  const auto it = weight_map_.find(name);
  if (it == weight_map_.end()) {
    return absl::NotFoundError(absl::StrCat(source_, ": tensor '", std::string(name), "' is not in the weight_map"));
  }
  ATTN_ASSIGN_OR_RETURN(const SafetensorsFile* shard, Shard(it->second));
  const SafetensorsEntry* entry = shard->Find(name);
  if (entry == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": the weight_map puts tensor '", std::string(name),
                                                   "' in ", shard->source(), ", which does not hold it"));
  }
  return entry;
}

absl::StatusOr<const SafetensorsFile*> SafetensorsCheckpoint::FileOf(std::string_view name) const {
  if (single_ != nullptr) return single_.get();
  ATTN_RETURN_IF_ERROR(Find(name).status());
  return Shard(weight_map_.find(name)->second);
}

absl::StatusOr<std::vector<float>> SafetensorsCheckpoint::ReadFloat32(std::string_view name) const {
  ATTN_ASSIGN_OR_RETURN(const SafetensorsFile* file, FileOf(name));
  return file->ReadFloat32(name);
}

absl::StatusOr<std::vector<uint16_t>> SafetensorsCheckpoint::ReadBFloat16(std::string_view name) const {
  ATTN_ASSIGN_OR_RETURN(const SafetensorsFile* file, FileOf(name));
  return file->ReadBFloat16(name);
}

absl::Status SafetensorsCheckpoint::CheckShape(const std::string& name, const std::vector<int64_t>& expected) const {
  absl::StatusOr<const SafetensorsEntry*> found = Find(name);
  if (absl::IsNotFound(found.status())) {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": tensor '", name, "' is missing (expected shape ",
                                                   ShapeToString(expected), ")"));
  }
  ATTN_RETURN_IF_ERROR(found.status());
  if ((*found)->shape != expected) {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": tensor '", name, "' has shape ",
                                                   ShapeToString((*found)->shape), ", expected ",
                                                   ShapeToString(expected)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> SafetensorsCheckpoint::ReadShaped(const std::string& name,
                                                                   const std::vector<int64_t>& expected) const {
  ATTN_RETURN_IF_ERROR(CheckShape(name, expected));
  return ReadFloat32(name);
}

absl::StatusOr<std::vector<uint16_t>> SafetensorsCheckpoint::ReadShapedBFloat16(
    const std::string& name, const std::vector<int64_t>& expected) const {
  ATTN_RETURN_IF_ERROR(CheckShape(name, expected));
  return ReadBFloat16(name);
}

}  // namespace attnserve
