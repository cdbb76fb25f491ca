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

// The key_padding_mask as additive values, bias[b * S + j] (0 or -inf for a bool mask, the values of a
// float one), [B, S]; zeros when the request has none.
void KeyPaddingBias(const ParsedAttention& p, float* bias);
// The floats of that bias for a request on the flash-style path: B * S with a key_padding_mask, else 0.
int64_t KeyPaddingBiasFloats(const ParsedAttention& p);

// scores[r * ld + j] += the request's attn_mask (2-D, or head `head`'s slice of a [B*H, L, S] one) at query
// l0 + r and key k0 + j, for r in [0, rows), j in [0, cols): one block of the flash-style path. A bool mask's
// true becomes -inf. Reads only: safe from many threads on different blocks.
void AddAttnMaskBlock(const ParsedAttention& p, int64_t num_heads, int64_t b, int64_t head, int64_t l0,
                      int64_t rows, int64_t k0, int64_t cols, float* scores, int64_t ld);

}  // namespace attnserve
