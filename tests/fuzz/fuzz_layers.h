// What the request harnesses share: the two small layers every fuzzed request is validated against, the
// engine run on a validated call with the checks that its answer is the size validation reserved, and the
// harness's own failure and verbosity switches.
//
// Small layers, so that valid requests are cheap: "mha16" (E=16, H=4, self- and cross-attention, the
// default limits), "bf16x16" (the same computing in BFLOAT16: the engine's 16-bit input paths), "cross8"
// (E=8, H=2, kdim=6, vdim=4, no bias, small limits), and two decoder layers (DECODER_ATTENTION: positions,
// RoPE, causal): "gqa16" (E=16, H=4, Hkv=2, q/k/v biases, partial rotary) and "mqa16" (E=16, H=4, Hkv=1,
// D=6, a sliding window of 5, soft-capped scores, BFLOAT16, small limits).
// ATTNSERVE_FUZZ_VERBOSE=1 prints each input's status (to check what the seeds reach).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "attnserve/v1/config.pb.h"
#include "google/protobuf/text_format.h"
#include "server/runtime/inference_call.h"
#include "server/runtime/layer_registry.h"
#include "server/startup/server_config.h"

namespace attnserve::fuzz {

inline constexpr char kLayers[] = R"pb(
  layers { name: "mha16" embed_dim: 16 num_heads: 4 seed: 1 }
  layers { name: "bf16x16" embed_dim: 16 num_heads: 4 seed: 3 compute_dtype: BFLOAT16 }
  layers {
    name: "cross8" embed_dim: 8 num_heads: 2 kdim: 6 vdim: 4 bias: false seed: 2
    max_sequence_length: 64 max_batch: 8 max_tokens: 256 max_response_bytes: 65536
  }
  layers {
    name: "gqa16" embed_dim: 16 num_heads: 4 seed: 4 kind: DECODER_ATTENTION
    decoder { num_kv_heads: 2 qkv_bias: true rope { rotary_dim: 2 } }
  }
  layers {
    name: "mqa16" embed_dim: 16 num_heads: 4 seed: 5 kind: DECODER_ATTENTION compute_dtype: BFLOAT16
    decoder { num_kv_heads: 1 head_dim: 6 sliding_window: 5 attn_logit_softcapping: 30 }
    max_sequence_length: 64 max_batch: 8 max_tokens: 256 max_response_bytes: 65536
  }
)pb";

// Requests above this many FLOPs are validated but not computed, so that an iteration stays fast.
inline constexpr int64_t kMaxComputedFlops = 5'000'000;

inline bool Verbose() {
  static const bool verbose = std::getenv("ATTNSERVE_FUZZ_VERBOSE") != nullptr;
  return verbose;
}

[[noreturn]] inline void Die(const char* what) {
  std::fprintf(stderr, "fuzz harness: %s\n", what);
  std::abort();
}

inline const LayerRegistry& Registry() {
  static const LayerRegistry* const registry = [] {
    attnserve::v1::ServerConfig config;
    if (!google::protobuf::TextFormat::ParseFromString(kLayers, &config)) Die("bad layer config");
    if (!ApplyDefaultsAndValidate(&config).ok()) Die("layer config does not validate");
    auto created = LayerRegistry::Create(config);
    if (!created.ok()) Die(created.status().ToString().c_str());
    return created->release();  // lives for the process
  }();
  return *registry;
}

// The engine on one validated call (as the batch executor runs it); true with call.outputs set when it
// computed. Dies when the answer's size differs from what validation reserved for it.
inline bool Compute(InferenceCall& call) {
  absl::StatusOr<AttentionOutputs> result;
  if (call.layer->decoder != nullptr) {
    const ParsedDecoder* one[] = {&call.decoder_parsed};
    auto results = call.layer->decoder->ForwardBatch(one, /*max_threads=*/1);
    if (results.size() != 1) Die("ForwardBatch returned the wrong number of results");
    result = std::move(results[0]);
  } else {
    const ParsedAttention* one[] = {&call.parsed};
    auto results = call.layer->engine->ForwardParsed(one, /*max_threads=*/1);
    if (results.size() != 1) Die("ForwardParsed returned the wrong number of results");
    result = std::move(results[0]);
  }
  if (Verbose()) std::fprintf(stderr, "  engine: %s\n", result.status().ToString().c_str());
  if (!result.ok()) return false;
  call.outputs = std::move(*result);
  const auto output_bytes = static_cast<int64_t>(call.outputs.output.values.size() * sizeof(float));
  const auto weights_bytes = static_cast<int64_t>(call.outputs.attn_weights.values.size() * sizeof(float));
  if (output_bytes != call.parsed.output_bytes) Die("output size differs from parsed.output_bytes");
  if (weights_bytes != call.parsed.weights_bytes) Die("attn_weights size differs from parsed.weights_bytes");
  if (call.outputs.output.num_elements() != static_cast<int64_t>(call.outputs.output.values.size())) {
    Die("output shape does not match its values");
  }
  return true;
}

}  // namespace attnserve::fuzz
