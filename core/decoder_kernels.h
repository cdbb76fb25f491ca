// The pieces DecoderAttention's two paths share (decoder_attention.cc: whole sequences; decoder_cached_
// attention.cc: session appends over a paged cache): per-thread scratch, matrix views for the head matmuls,
// a query group's stacking, and the masked softmax of a group's scores. Internal to core/.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "core/onednn_ops.h"

namespace attnserve::decoder_internal {

inline constexpr int64_t kF32 = sizeof(float);
// Per-thread buffers past this go back to the system after the call that grew them.
inline constexpr size_t kRetainBytes = size_t{256} << 20;

// Per-thread scratch of one query block, reused across calls (bounded by the block budget).
struct BlockScratch {
  std::vector<float> q;        // a group's queries stacked, [r * rows, D] (every group's, for appends)
  std::vector<float> scores;   // [r * rows, keys] (every group's, for appends)
  std::vector<float> context;  // [r * rows, D] (every group's, for appends)
  std::vector<float> pad;      // the block's additive key padding, [keys]
  std::vector<float> span;     // keys or values of a span of cached tokens, [n, Hkv*D] (appends)
  std::vector<float> inputs;   // appends' query rows gathered [N, E]
  std::vector<uint16_t> inputs16;  // the same for a bf16 layer's projection
  std::vector<uint16_t> rows16;    // a bf16 layer's projected rows for FlashAttention, [N, H*D + 2*Hkv*D]
  std::vector<float> out;      // appends' output projection [N, E]

  // Calls visit(buffer) on each of them.
  template <typename Visit>
  void ForEachBuffer(Visit visit) {
    for (std::vector<float>* buf : {&q, &scores, &context, &pad, &span, &inputs, &out}) visit(*buf);
    for (std::vector<uint16_t>* buf : {&inputs16, &rows16}) visit(*buf);
  }
};
BlockScratch& ThreadBlockScratch();

// The calling thread's projection buffer [N, H*D + 2*Hkv*D], kept from call to call (a fresh one would be
// zeroed and page-faulted in every time: a quarter of a call at L=2048) unless it grew past kRetainBytes.
struct ProjectionBuffer {
  std::unique_ptr<float[]> data;
  size_t capacity = 0;
  float* Get(size_t n);
  void Trim(size_t keep_bytes = kRetainBytes);
  ~ProjectionBuffer() { Trim(0); }  // takes the huge-page advice back (a thread's buffer, freed at its exit)
};
ProjectionBuffer& ThreadProjectionBuffer();

// `buf` with room for n values, its contents not kept. Grown to exactly n (not the vector's doubling), which the
// budget counts, with the old buffer freed first: never both at once.
template <typename T>
T* Grow(std::vector<T>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) {
    std::vector<T>().swap(buf);
    buf.resize(static_cast<size_t>(n));
  }
  return buf.data();
}

template <typename T>
T LoadUnaligned(const void* base, int64_t i) {
  T v;
  std::memcpy(&v, static_cast<const char*>(base) + i * static_cast<int64_t>(sizeof(T)), sizeof(T));
  return v;
}

// A [rows, cols] matrix with row stride ld, as the matmul's rank-4 view.
View4 Matrix(const float* data, int64_t rows, int64_t cols, int64_t ld);
// K^T of `keys` rows of D features, row stride ld: element (d, s) at data[s * ld + d].
View4 KeysTransposed(const float* data, int64_t head_dim, int64_t keys, int64_t ld);

// The r query heads of kv head g for `rows` tokens (row stride ld, heads of D floats from column 0), stacked
// into dst [r * rows, D] (head-major) and multiplied by `scale`.
void StackGroupQueries(const float* rows_src, int64_t ld, int64_t rows, int64_t g, int64_t r, int64_t d,
                       float scale, float* dst);
// The inverse, unscaled: ctx [r * rows, D] back over the group's query columns.
void UnstackGroupContext(const float* ctx, int64_t rows, int64_t g, int64_t r, int64_t d, float* rows_dst,
                         int64_t ld);

// The bounds of a group's stacked rows: row s is query position l0 + s % rows, which sees keys
// [max(k0, l - window + 1), l] (columns counted from k0).
struct RowBounds {
  int64_t l0, rows, k0, keys, window;
  float softcap;  // 0 = none
  bool padded;    // `pad` holds the keys' additive padding
};

// Probabilities in place of the scores [m, keys]: each row's softmax over the keys it may see, after the soft
// cap and the padding, zero elsewhere (the context matmul reads whole rows). Only the visible span is
// touched before the softmax: the causal and window bounds cost no exp. A row that sees no key (all its keys
// padding) becomes all zero, as MultiheadAttention's do.
void SoftmaxGroupRows(const RowBounds& rb, int64_t m, const float* pad, float* scores);

// Where a group's probabilities go in attn_weights: head h's row i at data + h * head_stride + i * row_stride
// (head_stride ignored when averaged: every head adds its share to one row).
struct WeightsSink {
  float* data;
  int64_t head_stride, row_stride;
  bool averaged;
  float share;  // 1 / H
};
// The probabilities of kv head g's r query heads over `rows` rows, [r * rows, keys], into the sink.
void AddGroupWeights(const WeightsSink& sink, int64_t g, int64_t r, int64_t rows, int64_t keys, const float* probs);

}  // namespace attnserve::decoder_internal
