#include "server/runtime/layer_catalog.h"

#include <set>
#include <utility>

#include <google/protobuf/util/message_differencer.h>

#include "absl/strings/str_cat.h"
#include "common/log_string.h"

namespace attnserve {
namespace {

// Names the catalog keeps a state for at most: loads of new names beyond it are refused, so that failed
// loads of ever new names cannot grow it without bound.
constexpr size_t kMaxLayersKnown = 1024;

}  // namespace

const char* LayerStateName(LayerState state) {
  switch (state) {
    case LayerState::kReady:
      return "READY";
    case LayerState::kLoading:
      return "LOADING";
    case LayerState::kUnloading:
      return "UNLOADING";
    case LayerState::kUnavailable:
      return "UNAVAILABLE";
  }
  return "UNAVAILABLE";
}

absl::StatusOr<std::unique_ptr<LayerCatalog>> LayerCatalog::Create(Options options) {
  if (options.registry == nullptr || !options.load || !options.unload) {
    return absl::InvalidArgumentError("LayerCatalog: registry, load and unload are required");
  }
  return std::unique_ptr<LayerCatalog>(new LayerCatalog(std::move(options)));
}

LayerCatalog::LayerCatalog(Options options) : options_(std::move(options)) {
  absl::MutexLock lock(&state_mu_);
  for (const auto& config : options_.configured) {
    Entry& entry = entries_[config.name()];
    entry.config = config;
    entry.in_config_file = true;
    entry.file_config = config;
  }
}

std::vector<LayerStatus> LayerCatalog::Index() const {
  absl::MutexLock lock(&state_mu_);
  std::vector<LayerStatus> out;
  for (const auto& [name, entry] : entries_) {
    const std::shared_ptr<const ServedLayer> serving = options_.registry->Find(name);
    out.push_back({name, serving ? serving->version : 0, entry.state, entry.reason});
  }
  return out;
}

void LayerCatalog::Set(const std::string& name, LayerState state, const std::string& reason) {
  absl::MutexLock lock(&state_mu_);
  entries_[name].state = state;
  entries_[name].reason = reason;
}

absl::Status LayerCatalog::Load(const std::string& name, const attnserve::v1::LayerConfig* override_config) {
  if (override_config != nullptr && override_config->name() != name) {
    return absl::InvalidArgumentError(absl::StrCat("parameters.config: name '", BoundedForLog(override_config->name()),
                                                   "' differs from model_name '", BoundedForLog(name), "'"));
  }
  absl::MutexLock change(&change_mu_);
  return LoadLocked(name, override_config);
}

absl::Status LayerCatalog::LoadLocked(const std::string& name, const attnserve::v1::LayerConfig* override_config) {
  attnserve::v1::LayerConfig config;
  {
    absl::MutexLock lock(&state_mu_);
    const auto it = entries_.find(name);
    // An entry without a config is what a failed first load of a given config left: nothing to load from.
    if (override_config == nullptr && (it == entries_.end() || it->second.config.name().empty())) {
      return absl::NotFoundError(absl::StrCat("model_name: no layer named '", BoundedForLog(name),
                                              "' in the config; give its config as parameter \"config\""));
    }
    if (it == entries_.end() && entries_.size() >= kMaxLayersKnown) {
      return absl::ResourceExhaustedError(absl::StrCat("the server knows ", kMaxLayersKnown, " layers already"));
    }
    config = override_config != nullptr ? *override_config : it->second.config;
    Entry& entry = entries_[name];
    entry.state = LayerState::kLoading;
    entry.reason.clear();
  }
  const absl::Status loaded = options_.load(config);
  absl::MutexLock lock(&state_mu_);
  Entry& entry = entries_[name];
  if (loaded.ok()) {
    entry.config = config;
    entry.state = LayerState::kReady;
    entry.reason.clear();
    return loaded;
  }
  const bool still_serving = options_.registry->Find(name) != nullptr;
  entry.state = still_serving ? LayerState::kReady : LayerState::kUnavailable;
  entry.reason = absl::StrCat(still_serving ? "the last load failed (the previous version serves): " : "",
                              loaded.message());
  return loaded;
}

absl::Status LayerCatalog::Unload(const std::string& name) {
  absl::MutexLock change(&change_mu_);
  return UnloadLocked(name);
}

absl::Status LayerCatalog::UnloadLocked(const std::string& name) {
  if (options_.registry->Find(name) == nullptr) {
    return absl::NotFoundError(absl::StrCat("model_name: no layer named '", BoundedForLog(name), "' is loaded"));
  }
  Set(name, LayerState::kUnloading, "");
  const absl::Status unloaded = options_.unload(name);
  const bool still_serving = options_.registry->Find(name) != nullptr;
  Set(name, still_serving ? LayerState::kReady : LayerState::kUnavailable,
      unloaded.ok() ? "unloaded" : std::string(unloaded.message()));
  return unloaded;
}

void LayerCatalog::PlanReconcile(const std::vector<attnserve::v1::LayerConfig>& desired, bool reload_all,
                                 std::vector<std::string>* to_load, std::vector<std::string>* to_unload) {
  std::set<std::string> names;
  for (const auto& layer : desired) names.insert(layer.name());
  for (auto& [name, entry] : entries_) {
    if (!entry.in_config_file || names.count(name) > 0) continue;
    entry.in_config_file = false;
    if (options_.registry->Find(name) != nullptr) to_unload->push_back(name);
  }
  for (const auto& layer : desired) {
    Entry& entry = entries_[layer.name()];
    const bool changed = !entry.in_config_file ||
                         !google::protobuf::util::MessageDifferencer::Equals(entry.file_config, layer);
    entry.in_config_file = true;
    entry.file_config = layer;
    if (changed) entry.config = layer;  // a Load without a config now reads the file's entry
    const bool serving = options_.registry->Find(layer.name()) != nullptr;
    if (changed || reload_all || !serving) {
      to_load->push_back(layer.name());
      // Not READY before its turn comes: a layer new to the file serves nothing until it is loaded.
      if (!serving) {
        entry.state = LayerState::kLoading;
        entry.reason.clear();
      }
    }
  }
}

absl::Status LayerCatalog::Reconcile(const std::vector<attnserve::v1::LayerConfig>& desired, bool reload_all) {
  // Held from the plan to its last step: a load through the RPCs comes before or after, never in between
  // (it would change what the plan read, e.g. a layer's config).
  absl::MutexLock change(&change_mu_);
  std::vector<std::string> to_load, to_unload;
  {
    absl::MutexLock lock(&state_mu_);
    PlanReconcile(desired, reload_all, &to_load, &to_unload);
  }
  absl::Status first_error;
  auto note = [&first_error](const std::string& name, const absl::Status& s) {
    if (!s.ok() && first_error.ok()) {
      first_error = absl::Status(s.code(), absl::StrCat("layer '", name, "': ", s.message()));
    }
  };
  for (const std::string& name : to_unload) {
    const absl::Status s = UnloadLocked(name);
    if (s.ok()) Set(name, LayerState::kUnavailable, "removed from the config file");
    note(name, s);
  }
  for (const std::string& name : to_load) note(name, LoadLocked(name, nullptr));
  return first_error;
}

}  // namespace attnserve
