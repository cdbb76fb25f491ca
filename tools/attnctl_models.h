// attnctl's model-management commands, over the Open Inference Protocol's repository RPCs: load (or reload)
// a layer, optionally from a LayerConfig JSON file, unload it, and list every layer with its version and
// state. They need an admin token, or a server started with --enable-model-control.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/client.h"

namespace attnserve {

struct LayerVersionInfo {
  std::string name;
  std::string version;  // empty when none is loaded
  std::string state;    // READY, LOADING, UNLOADING, UNAVAILABLE
  std::string reason;
};

// RepositoryModelLoad of `name`; `config_json` (a LayerConfig in JSON) when not empty.
absl::Status LoadModel(const Client& client, const std::string& name, const std::string& config_json,
                       std::optional<int64_t> timeout_ms);
absl::Status UnloadModel(const Client& client, const std::string& name, std::optional<int64_t> timeout_ms);
// RepositoryIndex: every layer the server knows, by name.
absl::StatusOr<std::vector<LayerVersionInfo>> ListModelVersions(const Client& client,
                                                                std::optional<int64_t> timeout_ms);

}  // namespace attnserve
