// The attention layers the server holds, as immutable versions that can be added, replaced and removed
// while requests run; each name keeps up to its config's max_versions versions.
//
// A request takes the layer's newest version when it is validated and holds that shared_ptr until it is
// answered: a replaced or removed layer's queued and running requests finish on the version they were
// admitted with, and its memory is freed when the last of them is answered.
//
// Thread-safety: every method may be called from any thread at once; ServedLayer is immutable once
// published.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "attnserve/v1/config.pb.h"
#include "core/decoder_attention.h"
#include "core/multihead_attention.h"
#include "server/runtime/live_layer_bytes.h"

namespace attnserve {

struct ServedLayer {
  attnserve::v1::LayerConfig config;  // with defaults filled in
  int64_t version = 0;                // 1 for a layer's first version, +1 per replacement; set by Publish
  // Exactly one of them, by config.kind(): MULTIHEAD_ATTENTION's engine or DECODER_ATTENTION's decoder.
  std::unique_ptr<MultiheadAttention> engine;
  std::unique_ptr<DecoderAttention> decoder;
  // The engine's weight bytes, counted in LiveLayerWeightBytes() while this version lives (set by LoadLayer).
  LiveLayerBytes weights_counted;
  // The one that is set, as sessions see it.
  const AppendEngine& appender() const {
    return engine != nullptr ? static_cast<const AppendEngine&>(*engine) : *decoder;
  }
};

// Builds one layer from its config (weights from weights_path, or seeded); slow (reads weights, builds
// primitives), so callers run it off the request path. The config must have passed
// ApplyDefaultsAndValidate.
absl::StatusOr<std::unique_ptr<ServedLayer>> LoadLayer(const attnserve::v1::LayerConfig& config);

class LayerRegistry {
 public:
  // Loads every layer of `config` (validated). Errors name the layer: "layers[1] 'base': ...".
  static absl::StatusOr<std::unique_ptr<LayerRegistry>> Create(const attnserve::v1::ServerConfig& config);

  // The newest version of `name`; null when there is none.
  std::shared_ptr<const ServedLayer> Find(const std::string& name) const ABSL_LOCKS_EXCLUDED(mu_);
  // Version `version` of `name` if it is still loaded; null otherwise.
  std::shared_ptr<const ServedLayer> Find(const std::string& name, int64_t version) const ABSL_LOCKS_EXCLUDED(mu_);
  // The versions of `name` loaded, oldest first; empty when none.
  std::vector<int64_t> Versions(const std::string& name) const ABSL_LOCKS_EXCLUDED(mu_);
  // The newest version of every layer, in the order they were first published.
  std::vector<std::shared_ptr<const ServedLayer>> Layers() const ABSL_LOCKS_EXCLUDED(mu_);

  // Makes `layer` the newest version of its name (adding the name); the oldest versions beyond its config's
  // max_versions (at least 1) are dropped. Sets layer->version and returns it.
  int64_t Publish(std::unique_ptr<ServedLayer> layer) ABSL_LOCKS_EXCLUDED(mu_);
  // Removes the name: Find no longer returns it; holders of its versions keep them. NOT_FOUND when absent.
  absl::Status Remove(const std::string& name) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Entry {
    std::shared_ptr<const ServedLayer> newest;
    std::map<int64_t, std::shared_ptr<const ServedLayer>> versions;  // every loaded one, newest included
    int64_t order = 0;  // first publication
  };
  mutable absl::Mutex mu_;
  std::map<std::string, Entry> layers_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> last_version_ ABSL_GUARDED_BY(mu_);  // kept after Remove: versions never repeat
  int64_t next_order_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace attnserve
