// One request to a decoder attention layer (DecoderAttention), and its validation.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "core/attention_inputs.h"
#include "core/decoder_config.h"
#include "core/tensor.h"

namespace attnserve {

struct DecoderInputs {
  TensorView query;             // [B, L, E], or [L, E] unbatched. FLOAT32.
  TensorView key_padding_mask;  // [B, L] / [L]: BOOL (true = padding, never attended) or FLOAT32 (added).
  int64_t position_offset = 0;  // RoPE position of token i is position_offset + i ...
  TensorView position_ids;      // ... unless given: [B, L] / [L] INT64, each >= 0.
  bool need_weights = false;    // also return the attention probabilities
  bool average_attn_weights = true;  // [B, L, L] averaged over heads, else [B, H, L, L]
};

// A request that passed validation. Views point into the caller's data.
struct ParsedDecoder {
  const DecoderInputs* inputs = nullptr;
  bool unbatched = false;
  int64_t batch = 0;  // B
  int64_t len = 0;    // L
  MaskType key_padding_mask = MaskType::kNone;
  int64_t flops = 0;          // DecoderFlops
  int64_t output_bytes = 0;   // [B, L, E] FLOAT32
  int64_t weights_bytes = 0;  // attn_weights when need_weights
  int64_t answer_bytes() const { return output_bytes + weights_bytes; }
};

// Positions past this lose integer exactness in the float32 angle p * inv_freq.
inline constexpr int64_t kMaxRopePosition = int64_t{1} << 24;

// Checks every tensor against the layer and the limits. InvalidArgument names the field and gives the
// expected and actual value, e.g. "position_ids: expected shape [2, 7] (B, L), got [2, 8]".
absl::StatusOr<ParsedDecoder> ParseDecoderInputs(const DecoderInputs& inputs, const DecoderConfig& config,
                                                 const AttentionLimits& limits);

}  // namespace attnserve
