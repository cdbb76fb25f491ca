// What sessions need of a layer kind (server/sessions): a layer's incremental attention over a paged KV cache
// (core/kv_cache_pool.h), and what an append costs before it is computed. MultiheadAttention and
// DecoderAttention implement it.
//
// Thread-safety: implementations are immutable after creation; ForwardAppends may run on many threads at
// once, on appends of different caches.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/attention_inputs.h"
#include "core/kv_cache_pool.h"
#include "core/tensor.h"

namespace attnserve {

// One append of a session to a layer: T new tokens attend over what the session's cache holds for the layer.
struct CachedAppend {
  // [T, E], row-major: the new tokens' inputs as they came, f32, bf16 or f16 (query_dtype) at any alignment:
  // the engine converts them while it gathers a batch's rows for its projection (core/activation_rows.h).
  const void* query = nullptr;
  int64_t tokens = 0;  // T >= 1
  // Self-attention: the session's keys and values, [tokens, cache_width()] each; the new tokens' are appended
  // (reserve them first, KvSequence::Reserve(T), so that the engine's append cannot fail) and token i attends
  // over every cached token and the new ones up to itself (within the layer's sliding window, if any).
  // Cross-attention: the projected memory, read as is.
  KvSequence* cache = nullptr;
  bool cross_attention = false;
  bool need_weights = false;        // attn_weights [T, S] averaged, or [H, T, S]; S: the cache's tokens after
  bool average_attn_weights = true;
  DType query_dtype = DType::kFloat32;  // of `query`: kFloat32, kBFloat16 or kFloat16

  // The query as a view [T, E].
  TensorView query_view(int64_t embed_dim) const { return {query_dtype, {tokens, embed_dim}, query}; }
  // Where row `row` of the query starts.
  const void* query_row(int64_t row, int64_t embed_dim) const {
    return static_cast<const unsigned char*>(query) + row * embed_dim * static_cast<int64_t>(DTypeSize(query_dtype));
  }
};

class AppendEngine {
 public:
  virtual ~AppendEngine() = default;

  // E: the width of a query row and of an output row.
  virtual int64_t embed_dim() const = 0;
  // H: the heads of attn_weights [H, T, S].
  virtual int64_t attention_heads() const = 0;
  // Floats per cached token of keys (and as many of values): E for nn.MultiheadAttention, Hkv * D for a
  // decoder layer.
  virtual int64_t cache_width() const = 0;
  // Tokens a new token attends to at most, itself included (0: all). Keys older than that are never read
  // again: a session may free them (KvSequence::DropBefore).
  virtual int64_t sliding_window() const { return 0; }
  // Whether the layer can attend over a projected memory (cross-attention sessions).
  virtual bool supports_cross_attention() const { return false; }
  virtual const AttentionLimits& limits() const = 0;

  // Multiply-adds x2 of an append of `tokens` to a cache holding `context_after` tokens once they are in.
  virtual int64_t AppendFlops(int64_t tokens, int64_t context_after, bool cross_attention) const = 0;
  // Bytes of scratch such an append holds while it runs, besides its answer.
  virtual int64_t AppendWorkspaceBytes(int64_t tokens, int64_t context_after) const = 0;

  // Appends of sessions (any mix, each with its own cache; no two on one cache) as one batch. Result i
  // answers appends[i]: output [T, E] and the weights it asked for; equal to a causal forward over the whole
  // sequence, restricted to the new rows. `max_threads`: the OpenMP team size; 0 takes omp_get_max_threads().
  virtual std::vector<absl::StatusOr<AttentionOutputs>> ForwardAppends(
      absl::Span<const CachedAppend* const> appends, int max_threads = 0) const = 0;
};

}  // namespace attnserve
