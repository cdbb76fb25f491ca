// The dimensions of one decoder attention layer, as today's decoder models (Llama, Mistral, Qwen, Gemma,
// Phi) define it: separate q/k/v/o projections, H query heads sharing Hkv key/value heads (GQA; Hkv == 1 is
// MQA), rotary positions on q and k, causal, optionally a sliding window and a logit soft cap.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "core/rope.h"

namespace attnserve {

// The soft caps a decoder takes (Gemma 2's are 30 and 50), well inside float's range: the cap is applied in float
// through 1 / c.
inline constexpr double kMinSoftCap = 1e-6;
inline constexpr double kMaxSoftCap = 1e30;

struct DecoderConfig {
  int64_t embed_dim = 0;     // E: input and output feature size
  int64_t num_heads = 0;     // H: query heads
  int64_t num_kv_heads = 0;  // Hkv: key/value heads, divides H
  int64_t head_dim = 0;      // D (need not be E / H, as in Gemma)
  bool qkv_bias = false;     // q_proj, k_proj, v_proj biases (Qwen2)
  bool o_bias = false;       // o_proj bias
  RopeOptions rope;          // rope.rotary_dim <= head_dim
  // A token attends to at most this many tokens, itself included (Mistral); 0 = no window.
  int64_t sliding_window = 0;
  // scores = c * tanh(scores / c) before the masks (Gemma 2); 0 = none, else in [kMinSoftCap, kMaxSoftCap].
  double attn_logit_softcapping = 0;
  double scaling = 0;  // of q k^T; 0 = 1 / sqrt(D)

  int64_t group_size() const { return num_heads / num_kv_heads; }  // query heads per kv head
  int64_t q_width() const { return num_heads * head_dim; }          // H*D
  int64_t kv_width() const { return num_kv_heads * head_dim; }      // Hkv*D
  float score_scale() const;

  // InvalidArgument naming the field: non-positive dims, H % Hkv != 0, rotary_dim > head_dim or invalid
  // rope options, negative window or soft cap or scaling.
  absl::Status Validate() const;
  std::string DebugString() const;
};

// Multiply-adds x2 of a causal forward over B sequences of L tokens: the projections and, per query head,
// the scores and context over the keys each query may see (at most sliding_window of them).
int64_t DecoderFlops(const DecoderConfig& config, int64_t batch, int64_t len);

}  // namespace attnserve
