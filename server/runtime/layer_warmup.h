// A new layer version's first forwards, before it gets traffic: oneDNN builds and JIT-compiles its
// primitives on first use (matmuls per thread count, softmax per shape), which would otherwise fall on the
// first requests after a load and show as a latency spike. Runs one self- (or cross-) attention forward per
// shape class, L = S in {1, 8, 32, 128} within the layer's max_sequence_length, with the server's thread
// budget, on the calling thread (a loader, never a request thread).
#pragma once

#include "absl/status/status.h"
#include "core/decoder_attention.h"
#include "core/multihead_attention.h"
#include "server/runtime/layer_registry.h"

namespace attnserve {

// The engine's error if a warm-up forward fails (the version must then not be published).
absl::Status WarmUpLayer(const MultiheadAttention& engine, int max_threads);
// The same for a decoder layer (causal self-attention, positions from 0).
absl::Status WarmUpLayer(const DecoderAttention& decoder, int max_threads);
// Whichever of the two `layer` holds.
absl::Status WarmUpLayer(const ServedLayer& layer, int max_threads);

}  // namespace attnserve
