// The mask pass: turns a request's masks (key_padding_mask, attn_mask, is_causal; bool or float) into
// additive rows over the attention scores, and finds query rows whose keys are all masked.
#pragma once

#include <cstdint>

#include "core/attention_inputs.h"

namespace attnserve {

// Writes row[j], j in [0, cols), for sequence b and query l: the sum of the masks every head shares
// (causal, key padding, a 2-D attn_mask), -inf where a bool mask forbids the key. Returns whether any key
// is open (some row[j] != -inf).
bool BuildSharedMaskRow(const ParsedAttention& p, int64_t b, int64_t l, int64_t cols, float* row);

// scores[j] += shared[j] (+ the [B*H, L, S] attn_mask of head `head`, when the request has one) for
// j in [0, cols). Returns whether any key is open.
bool AddMaskRow(const ParsedAttention& p, int64_t num_heads, int64_t b, int64_t head, int64_t l, int64_t cols,
                const float* shared, float* scores);

}  // namespace attnserve
