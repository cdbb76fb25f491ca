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

namespace {

AttentionLimits ToLimits(const attnserve::v1::LayerConfig& layer) {
  AttentionLimits limits;
  limits.max_sequence_length = layer.max_sequence_length();
  limits.max_batch = layer.max_batch();
  limits.max_tokens = layer.max_tokens();
  limits.max_answer_bytes = layer.max_response_bytes();
  return limits;
}

RopeOptions ToRopeOptions(const attnserve::v1::RopeConfig& rope, int64_t head_dim) {
  RopeOptions o;
  o.theta = rope.theta() > 0 ? rope.theta() : 10000;
  o.rotary_dim = rope.rotary_dim() > 0 ? rope.rotary_dim() : head_dim;
  o.interleaved = rope.style() == attnserve::v1::RopeConfig::INTERLEAVED;
  const attnserve::v1::RopeScaling& s = rope.scaling();
  o.scaling = s.type() == attnserve::v1::RopeScaling::LINEAR   ? RopeOptions::Scaling::kLinear
              : s.type() == attnserve::v1::RopeScaling::LLAMA3 ? RopeOptions::Scaling::kLlama3
                                                                : RopeOptions::Scaling::kNone;
  o.factor = s.factor();
  // The zero defaults of Llama 3.1's published values.
  o.low_freq_factor = s.low_freq_factor() > 0 ? s.low_freq_factor() : 1;
  o.high_freq_factor = s.high_freq_factor() > 0 ? s.high_freq_factor() : 4;
  o.original_max_position_embeddings =
      s.original_max_position_embeddings() > 0 ? s.original_max_position_embeddings() : 8192;
  return o;
}

}  // namespace

ComputeType ToComputeType(const attnserve::v1::LayerConfig& layer) {
  return layer.compute_dtype() == attnserve::v1::LayerConfig::BFLOAT16 ? ComputeType::kBFloat16
                                                                      : ComputeType::kFloat32;
}

MultiheadAttention::Options ToEngineOptions(const attnserve::v1::LayerConfig& layer) {
  MultiheadAttention::Options options;
  options.config = ToMhaConfig(layer);
  options.limits = ToLimits(layer);
  options.compute = ToComputeType(layer);
  return options;
}

DecoderConfig ToDecoderConfig(const attnserve::v1::LayerConfig& layer) {
  const attnserve::v1::DecoderAttentionConfig& d = layer.decoder();
  DecoderConfig c;
  c.embed_dim = layer.embed_dim();
  c.num_heads = layer.num_heads();
  c.num_kv_heads = d.num_kv_heads() > 0 ? d.num_kv_heads() : c.num_heads;
  c.head_dim = d.head_dim() > 0 ? d.head_dim() : (c.num_heads > 0 ? c.embed_dim / c.num_heads : 0);
  c.qkv_bias = d.qkv_bias();
  c.o_bias = d.o_bias();
  c.rope = ToRopeOptions(d.rope(), c.head_dim);
  c.sliding_window = d.sliding_window();
  c.attn_logit_softcapping = d.attn_logit_softcapping();
  c.scaling = d.scaling();
  return c;
}

DecoderAttention::Options ToDecoderOptions(const attnserve::v1::LayerConfig& layer) {
  DecoderAttention::Options options;
  options.config = ToDecoderConfig(layer);
  options.limits = ToLimits(layer);
  options.compute = ToComputeType(layer);
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
