// Which layers the server knows and what state each is in, for the model-management RPCs: every layer the
// config names and every one loaded since, READY, LOADING, UNLOADING or UNAVAILABLE (with why). Load and
// Unload run the server's own load and unload (off the request path: the layer is built before it is
// published; see Server::LoadLayer) one at a time, and record the outcome. A failed reload leaves the
// previous version serving.
//
// Thread-safety: every method may be called from any thread; Load, Unload and Reconcile (as a whole) are
// serialised, Index never waits for them.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "attnserve/v1/config.pb.h"
#include "server/runtime/layer_registry.h"

namespace attnserve {

enum class LayerState { kReady, kLoading, kUnloading, kUnavailable };
const char* LayerStateName(LayerState state);  // "READY", "LOADING", "UNLOADING", "UNAVAILABLE"

struct LayerStatus {
  std::string name;
  int64_t version = 0;  // the newest version serving; 0 when none
  LayerState state = LayerState::kUnavailable;
  std::string reason;   // why it is not ready, or the last failed load's error
};

class LayerCatalog {
 public:
  struct Options {
    // The config's layers (validated), all loaded when the catalog is made.
    std::vector<attnserve::v1::LayerConfig> configured;
    const LayerRegistry* registry = nullptr;  // required; not owned
    // The server's load (publishes a new version) and unload (drains, then removes). Required.
    std::function<absl::Status(const attnserve::v1::LayerConfig&)> load;
    std::function<absl::Status(const std::string& name)> unload;
  };
  static absl::StatusOr<std::unique_ptr<LayerCatalog>> Create(Options options);

  // Every layer known, by name.
  std::vector<LayerStatus> Index() const ABSL_LOCKS_EXCLUDED(state_mu_);

  // Loads `name` from its last known config (the config file's, or the last override loaded), or from
  // `override_config` when not null (its name must be `name`): a new layer, or a new version of a loaded one.
  // NOT_FOUND for a name neither known nor given a config; INVALID_ARGUMENT for a name mismatch;
  // RESOURCE_EXHAUSTED for a new name once 1024 are known; the load's own error otherwise (recorded as the
  // reason).
  absl::Status Load(const std::string& name, const attnserve::v1::LayerConfig* override_config)
      ABSL_LOCKS_EXCLUDED(change_mu_, state_mu_);
  // Unloads `name`: NOT_FOUND unless it is loaded.
  absl::Status Unload(const std::string& name) ABSL_LOCKS_EXCLUDED(change_mu_, state_mu_);

  // Makes the config file's layers `desired` (validated): layers new to it are loaded, layers whose entry
  // changed are reloaded (all of them when `reload_all`: the weights files may have changed), layers it no
  // longer names are unloaded. Layers loaded only through Load with a config are left alone. Every layer
  // is tried; the first error, naming its layer, is returned.
  absl::Status Reconcile(const std::vector<attnserve::v1::LayerConfig>& desired, bool reload_all)
      ABSL_LOCKS_EXCLUDED(change_mu_, state_mu_);

 private:
  struct Entry {
    attnserve::v1::LayerConfig config;  // what it was last loaded from
    LayerState state = LayerState::kReady;
    std::string reason;
    bool in_config_file = false;
    attnserve::v1::LayerConfig file_config;  // its entry in the config file, when in_config_file
  };
  // Under state_mu_: what Reconcile must load and unload to reach `desired`.
  void PlanReconcile(const std::vector<attnserve::v1::LayerConfig>& desired, bool reload_all,
                     std::vector<std::string>* to_load, std::vector<std::string>* to_unload)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_mu_);
  explicit LayerCatalog(Options options);
  absl::Status LoadLocked(const std::string& name, const attnserve::v1::LayerConfig* override_config)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(change_mu_) ABSL_LOCKS_EXCLUDED(state_mu_);
  absl::Status UnloadLocked(const std::string& name) ABSL_EXCLUSIVE_LOCKS_REQUIRED(change_mu_)
      ABSL_LOCKS_EXCLUDED(state_mu_);
  void Set(const std::string& name, LayerState state, const std::string& reason) ABSL_LOCKS_EXCLUDED(state_mu_);

  const Options options_;
  absl::Mutex change_mu_;  // one Load, Unload or Reconcile at a time
  mutable absl::Mutex state_mu_;
  std::map<std::string, Entry> entries_ ABSL_GUARDED_BY(state_mu_);
};

}  // namespace attnserve
