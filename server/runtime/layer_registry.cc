#include "server/runtime/layer_registry.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "server/startup/layer_options.h"

namespace attnserve {

namespace {

// What the layer will compute in: f32 where oneDNN has no bf16 matmul, whose weights must then stay exact.
ComputeType EffectiveCompute(ComputeType requested) {
  return OnednnBf16Support() == Bf16Support::kUnavailable ? ComputeType::kFloat32 : requested;
}

absl::StatusOr<std::unique_ptr<ServedLayer>> LoadDecoderLayer(const attnserve::v1::LayerConfig& lc) {
  const DecoderAttention::Options options = ToDecoderOptions(lc);
  absl::StatusOr<DecoderWeights> weights =
      lc.weights_path().empty() ? RandomDecoderWeights(options.config, lc.seed())
                                : LoadDecoderWeights(lc.weights_path(), lc.weights_prefix(), options.config,
                                                     EffectiveCompute(options.compute));
  if (!weights.ok()) return weights.status();
  auto decoder = DecoderAttention::Create(options, std::move(*weights));
  if (!decoder.ok()) return decoder.status();
  auto layer = std::make_unique<ServedLayer>();
  layer->config = lc;
  layer->decoder = std::move(*decoder);
  return layer;
}

absl::StatusOr<std::unique_ptr<ServedLayer>> LoadMultiheadLayer(const attnserve::v1::LayerConfig& lc) {
  const MultiheadAttention::Options options = ToEngineOptions(lc);
  absl::StatusOr<MhaWeights> weights =
      lc.weights_path().empty()
          ? RandomMhaWeights(options.config, lc.seed())
          : LoadMhaWeights(lc.weights_path(), lc.weights_prefix(), options.config, EffectiveCompute(options.compute));
  if (!weights.ok()) return weights.status();
  auto engine = MultiheadAttention::Create(options, std::move(*weights));
  if (!engine.ok()) return engine.status();
  auto layer = std::make_unique<ServedLayer>();
  layer->config = lc;
  layer->engine = std::move(*engine);
  return layer;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ServedLayer>> LoadLayer(const attnserve::v1::LayerConfig& lc) {
  absl::StatusOr<std::unique_ptr<ServedLayer>> layer =
      lc.kind() == attnserve::v1::LayerConfig::DECODER_ATTENTION ? LoadDecoderLayer(lc) : LoadMultiheadLayer(lc);
  if (!layer.ok()) return layer;
  ServedLayer& l = **layer;
  l.weights_counted = LiveLayerBytes(l.engine != nullptr ? l.engine->weight_bytes() : l.decoder->weight_bytes());
  return layer;
}

absl::StatusOr<std::unique_ptr<LayerRegistry>> LayerRegistry::Create(const attnserve::v1::ServerConfig& config) {
  auto registry = std::make_unique<LayerRegistry>();
  for (int i = 0; i < config.layers_size(); ++i) {
    const auto& lc = config.layers(i);
    auto layer = LoadLayer(lc);
    if (!layer.ok()) {
      return absl::Status(layer.status().code(),
                          absl::StrCat("layers[", i, "] '", lc.name(), "': ", layer.status().message()));
    }
    registry->Publish(std::move(*layer));
  }
  return registry;
}

std::shared_ptr<const ServedLayer> LayerRegistry::Find(const std::string& name) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = layers_.find(name);
  return it == layers_.end() ? nullptr : it->second.newest;
}

std::shared_ptr<const ServedLayer> LayerRegistry::Find(const std::string& name, int64_t version) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = layers_.find(name);
  if (it == layers_.end()) return nullptr;
  auto v = it->second.versions.find(version);
  return v == it->second.versions.end() ? nullptr : v->second;
}

std::vector<int64_t> LayerRegistry::Versions(const std::string& name) const {
  absl::ReaderMutexLock lock(&mu_);
  std::vector<int64_t> out;
  auto it = layers_.find(name);
  if (it == layers_.end()) return out;
  for (const auto& [version, layer] : it->second.versions) out.push_back(version);
  return out;
}

std::vector<std::shared_ptr<const ServedLayer>> LayerRegistry::Layers() const {
  std::vector<const Entry*> entries;
  std::vector<std::shared_ptr<const ServedLayer>> out;
  absl::ReaderMutexLock lock(&mu_);
  for (const auto& [name, entry] : layers_) entries.push_back(&entry);
  std::sort(entries.begin(), entries.end(), [](const Entry* a, const Entry* b) { return a->order < b->order; });
  for (const Entry* e : entries) out.push_back(e->newest);
  return out;
}

int64_t LayerRegistry::Publish(std::unique_ptr<ServedLayer> layer) {
  std::vector<std::shared_ptr<const ServedLayer>> dropped;  // freed after the lock, if the last references
  absl::MutexLock lock(&mu_);
  const std::string name = layer->config.name();
  const size_t keep = static_cast<size_t>(std::max(1, layer->config.max_versions()));
  layer->version = ++last_version_[name];
  const int64_t version = layer->version;
  auto [it, added] = layers_.try_emplace(name);
  if (added) it->second.order = next_order_++;
  Entry& entry = it->second;
  entry.newest = std::move(layer);
  entry.versions[version] = entry.newest;
  while (entry.versions.size() > keep) {
    dropped.push_back(std::move(entry.versions.begin()->second));
    entry.versions.erase(entry.versions.begin());
  }
  return version;
}

absl::Status LayerRegistry::Remove(const std::string& name) {
  std::map<int64_t, std::shared_ptr<const ServedLayer>> previous;  // freed after the lock, if the last references
  absl::MutexLock lock(&mu_);
  auto it = layers_.find(name);
  if (it == layers_.end()) return absl::NotFoundError(absl::StrCat("no layer named '", name, "'"));
  previous = std::move(it->second.versions);
  layers_.erase(it);
  return absl::OkStatus();
}

}  // namespace attnserve
