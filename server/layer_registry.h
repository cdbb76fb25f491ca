// The attention layers the server holds, built from the config at start-up.
//
// Thread-safety: immutable after Create(); lookups from any thread.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "attnserve/v1/config.pb.h"
#include "core/multihead_attention.h"

namespace attnserve {

struct ServedLayer {
  attnserve::v1::LayerConfig config;  // with defaults filled in
  std::unique_ptr<MultiheadAttention> engine;
};

class LayerRegistry {
 public:
  // Loads every layer (weights from weights_path, or seeded). The config must have passed
  // ApplyDefaultsAndValidate. Errors name the layer: "layers[1] 'base': ...".
  static absl::StatusOr<std::unique_ptr<LayerRegistry>> Create(const attnserve::v1::ServerConfig& config);

  // nullptr when there is no such layer.
  const ServedLayer* Find(const std::string& name) const;
  // In config order.
  const std::vector<const ServedLayer*>& layers() const { return ordered_; }

 private:
  std::map<std::string, std::unique_ptr<ServedLayer>> layers_;
  std::vector<const ServedLayer*> ordered_;
};

}  // namespace attnserve
