#include "server/startup/layer_options.h"

namespace attnserve {

MhaConfig ToMhaConfig(const attnserve::v1::LayerConfig& layer) {
  MhaConfig c;
  c.embed_dim = layer.embed_dim();
  c.num_heads = layer.num_heads();
  c.kdim = layer.kdim();
  c.vdim = layer.vdim();
  c.bias = !layer.has_bias() || layer.bias();
  return c;
}

MultiheadAttention::Options ToEngineOptions(const attnserve::v1::LayerConfig& layer) {
  MultiheadAttention::Options options;
  options.config = ToMhaConfig(layer);
  options.limits.max_sequence_length = layer.max_sequence_length();
  options.limits.max_batch = layer.max_batch();
  options.limits.max_tokens = layer.max_tokens();
  options.limits.max_answer_bytes = layer.max_response_bytes();
  return options;
}

BatchingOptions ToBatchingOptions(const attnserve::v1::BatchingConfig& batching) {
  BatchingOptions o;
  o.max_batch_size = batching.max_batch_size();
  o.max_queue_delay_us = batching.max_queue_delay_us();
  o.max_queue_size = batching.max_queue_size();
  o.max_batch_tokens = batching.max_batch_tokens();
  return o;
}

}  // namespace attnserve
