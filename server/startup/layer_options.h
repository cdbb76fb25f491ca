// What a LayerConfig (proto/attnserve/v1/config.proto) means to the engine and the batcher: the one place
// each config field becomes an option, so the config's validation and the layers the server builds agree.
#pragma once

#include "attnserve/v1/config.pb.h"
#include "core/decoder_attention.h"
#include "core/multihead_attention.h"
#include "server/batching/batch_queue.h"

namespace attnserve {

// embed_dim, num_heads, kdim, vdim as given (0 = embed_dim), bias unset = true.
MhaConfig ToMhaConfig(const attnserve::v1::LayerConfig& layer);

// LayerConfig.compute_dtype as the engine's ComputeType.
ComputeType ToComputeType(const attnserve::v1::LayerConfig& layer);
// The engine's options: ToMhaConfig, the layer's request limits (max_sequence_length, max_batch,
// max_tokens, max_response_bytes) and compute type; the rest at their defaults.
MultiheadAttention::Options ToEngineOptions(const attnserve::v1::LayerConfig& layer);

// A DECODER_ATTENTION layer's config: embed_dim, num_heads and the `decoder` section with its zero
// defaults filled (num_kv_heads = H, head_dim = E / H, rope.theta = 10000, rope.rotary_dim = head_dim,
// scaling = 1 / sqrt(head_dim)), as given otherwise.
DecoderConfig ToDecoderConfig(const attnserve::v1::LayerConfig& layer);
// ToDecoderConfig and the layer's request limits, as ToEngineOptions.
DecoderAttention::Options ToDecoderOptions(const attnserve::v1::LayerConfig& layer);

// Field by field; zero fields are left to ApplyDefaultsAndValidate, which fills them from BatchingOptions'
// own defaults (the one source of each default).
BatchingOptions ToBatchingOptions(const attnserve::v1::BatchingConfig& batching);

}  // namespace attnserve
