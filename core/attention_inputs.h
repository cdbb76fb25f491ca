// One attention request as nn.MultiheadAttention.forward takes it (batch_first=True, eval mode), and its
// validation into the engine's canonical batched form.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "core/mha_config.h"
#include "core/tensor.h"

namespace attnserve {

struct AttentionInputs {
  TensorView query;             // [B, L, E], or [L, E] unbatched. FLOAT32, BFLOAT16 or FLOAT16 (as key, value).
  TensorView key;               // [B, S, kdim] / [S, kdim]. Absent with value: self-attention (key = query).
  TensorView value;             // [B, S, vdim] / [S, vdim].
  TensorView key_padding_mask;  // [B, S] / [S]. BOOL (true = ignore that key) or FLOAT32 (added to scores).
  TensorView attn_mask;         // [L, S] or [B*H, L, S] (head index b*H + h). BOOL (true = may not attend) or
                                // FLOAT32 (added).
  bool is_causal = false;       // query i may attend keys j <= i only; combines with the masks above.
  bool need_weights = false;    // also return the attention probabilities
  bool average_attn_weights = true;  // weights [B, L, S] averaged over heads, else [B, H, L, S]
  // Decoder layers' rotary positions (see DecoderInputs); ParseAttentionInputs refuses them.
  TensorView position_ids;      // [B, L] / [L] INT64
  int64_t position_offset = 0;
};

// Asked before each query block of request `i` (its index in the call): a non-OK status stops that request
// there (its result is the status; the other requests go on). Called from the engine's threads at once.
using StopFn = std::function<absl::Status(size_t i)>;

struct AttentionOutputs {
  Tensor output;        // [B, L, E] ([L, E] unbatched)
  Tensor attn_weights;  // need_weights only: [B, L, S] or [B, H, L, S] (B dropped when unbatched)
};

// Per-layer limits on what a request may ask for; 0 means no limit. Together they bound what one request
// can cost before anything is computed: its compute (B*L*S), its workspace and its answer's size.
struct AttentionLimits {
  int64_t max_sequence_length = 0;  // bound on L and S
  int64_t max_tokens = 0;           // bound on B*L and B*S
  int64_t max_batch = 0;            // bound on B
  int64_t max_answer_bytes = 0;     // bound on answer_bytes (output, and attn_weights when asked)
};

enum class MaskType { kNone, kBool, kFloat };

// A request that passed validation, in batched form. Views point into the caller's data.
struct ParsedAttention {
  const AttentionInputs* inputs = nullptr;
  bool unbatched = false;
  bool self_attention = false;
  int64_t batch = 0;    // B (1 when unbatched)
  int64_t q_len = 0;    // L
  int64_t kv_len = 0;   // S
  MaskType key_padding_mask = MaskType::kNone;
  MaskType attn_mask = MaskType::kNone;
  bool attn_mask_per_head = false;  // [B*H, L, S] rather than [L, S]
  int64_t flops = 0;                // AttentionFlops of this request, counted once here
  int64_t output_bytes = 0;         // the output tensor, [B, L, E] FLOAT32
  int64_t weights_bytes = 0;        // attn_weights when need_weights: [B, L, S] or [B, H, L, S] FLOAT32

  bool has_mask() const {
    return key_padding_mask != MaskType::kNone || attn_mask != MaskType::kNone || inputs->is_causal;
  }
  int64_t query_tokens() const { return batch * q_len; }
  int64_t kv_tokens() const { return batch * kv_len; }
  int64_t answer_bytes() const { return output_bytes + weights_bytes; }
};

// Checks every tensor against the layer and the limits. InvalidArgument names the field and gives the
// expected and actual shape or dtype, e.g. "key_padding_mask: expected shape [2, 7] (B, S), got [2, 8]".
absl::StatusOr<ParsedAttention> ParseAttentionInputs(const AttentionInputs& inputs, const MhaConfig& config,
                                                     const AttentionLimits& limits);

// Useful floating-point operations of one request: the four projections and the two attention matmuls.
int64_t AttentionFlops(const MhaConfig& config, int64_t batch, int64_t q_len, int64_t kv_len);

// Checks shared by the layer kinds' validation; each error names `field`.
// "field: expected shape <expected>, got [..]".
absl::Status ShapeError(const char* field, const std::string& expected, const Shape& actual);
// Dims positive, at most 2^40 elements in all (so products of dims fit in int64), data present.
absl::Status CheckDimsAndData(const char* field, const TensorView& t);
// kNone when absent; BOOL or FLOAT32 otherwise.
absl::StatusOr<MaskType> MaskDType(const char* field, const TensorView& t);
// FLOAT32, BFLOAT16 or FLOAT16 (IsActivationDType): the engines convert 16-bit rows as they gather them.
absl::Status CheckActivation(const char* field, const TensorView& t);
// query [B, L, E] or [L, E] unbatched, an activation dtype, with its dims checked.
struct QueryShape {
  bool unbatched = false;
  int64_t batch = 0, len = 0;
};
absl::StatusOr<QueryShape> ParseQueryShape(const TensorView& query, int64_t embed_dim);
// "<what> is <value>, past the layer's <limit_name> of <limit>" when limit > 0 and value > limit.
absl::Status CheckLimit(const char* what, int64_t value, int64_t limit, const char* limit_name);

}  // namespace attnserve
