#include "server/layer_registry.h"

#include "absl/strings/str_cat.h"

namespace attnserve {
namespace {

absl::StatusOr<std::unique_ptr<ServedLayer>> BuildLayer(const attnserve::v1::LayerConfig& lc) {
  auto layer = std::make_unique<ServedLayer>();
  layer->config = lc;
  MultiheadAttention::Options options;
  options.config.embed_dim = lc.embed_dim();
  options.config.num_heads = lc.num_heads();
  options.config.kdim = lc.kdim();
  options.config.vdim = lc.vdim();
  options.config.bias = !lc.has_bias() || lc.bias();
  options.limits.max_sequence_length = lc.max_sequence_length();
  absl::StatusOr<MhaWeights> weights = lc.weights_path().empty()
                                           ? RandomMhaWeights(options.config, lc.seed())
                                           : LoadMhaWeights(lc.weights_path(), lc.weights_prefix(), options.config);
  if (!weights.ok()) return weights.status();
  auto engine = MultiheadAttention::Create(options, *weights);
  if (!engine.ok()) return engine.status();
  layer->engine = std::move(*engine);
  return layer;
}

}  // namespace

absl::StatusOr<std::unique_ptr<LayerRegistry>> LayerRegistry::Create(const attnserve::v1::ServerConfig& config) {
  auto registry = std::make_unique<LayerRegistry>();
  for (int i = 0; i < config.layers_size(); ++i) {
    const auto& lc = config.layers(i);
    auto layer = BuildLayer(lc);
    if (!layer.ok()) {
      return absl::Status(layer.status().code(),
                          absl::StrCat("layers[", i, "] '", lc.name(), "': ", layer.status().message()));
    }
    registry->ordered_.push_back(layer->get());
    registry->layers_[lc.name()] = std::move(*layer);
  }
  return registry;
}

const ServedLayer* LayerRegistry::Find(const std::string& name) const {
  auto it = layers_.find(name);
  return it == layers_.end() ? nullptr : it->second.get();
}

}  // namespace attnserve
