// DecoderAttention's session appends: new tokens attend over a paged KV cache (core/kv_cache_pool.h) that holds
// Hkv * D floats of keys and of values per token, after RoPE. K and V are not repeated per query head: as in
// Forward, a kv head's r query heads are stacked into one [r * rows, D] matrix. The visible keys (causal,
// sliding window) are read in spans of cache_span_bytes, copied contiguous from their blocks for the matmuls;
// every kv head's scores of a query block are held at once (H * rows * keys, within scores_block_bytes), so
// each span is copied once for the scores and once for the context (summed over spans by kContextAdd).
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/activation_rows.h"
#include "core/attention_inputs.h"
#include "core/decoder_attention.h"
#include "core/decoder_kernels.h"
#include "core/omp_threads.h"

namespace attnserve {
using decoder_internal::AddGroupWeights;
using decoder_internal::Grow;
using decoder_internal::KeysTransposed;
using decoder_internal::Matrix;
using decoder_internal::RowBounds;
using decoder_internal::SoftmaxGroupRows;
using decoder_internal::StackGroupQueries;
using decoder_internal::ThreadBlockScratch;
using decoder_internal::ThreadProjectionBuffer;
using decoder_internal::UnstackGroupContext;
using decoder_internal::WeightsSink;

namespace {

constexpr int64_t kF32 = sizeof(float);

// Rows [t0, t0 + n) of the cache's keys (or values) into dst [n, width].
void CopyCachedRows(const KvSequence& cache, bool values, int64_t t0, int64_t n, float* dst) {
  const int64_t bt = cache.block_tokens(), width = cache.width();
  for (int64_t t = t0; t < t0 + n;) {
    const int64_t b = t / bt, row = t % bt, count = std::min(bt - row, t0 + n - t);
    const float* src = (values ? cache.values(b) : cache.keys(b)) + row * width;
    std::memcpy(dst + (t - t0) * width, src, static_cast<size_t>(count * width) * sizeof(float));
    t += count;
  }
}

// Tokens visible to the query rows at positions [p0, p1): keys [k0, p1).
int64_t FirstVisibleKey(int64_t p0, int64_t window) { return window > 0 ? std::max<int64_t>(0, p0 - window + 1) : 0; }

}  // namespace

// One query block of one append: rows [l0, l0 + rows) of the append, at positions first + l0 + i.
struct DecoderAttention::CachedBlock {
  const CachedAppend* append = nullptr;
  size_t index = 0;       // of the append in the call
  int64_t first = 0;      // the position of the append's row 0 (its cache's tokens before it)
  int64_t proj_row = 0;   // the append's row 0 in the projection buffer
  int64_t l0 = 0, rows = 0;
  Tensor* weights = nullptr;
};

int64_t DecoderAttention::AppendFlops(int64_t tokens, int64_t context_after, bool /*cross_attention*/) const {
  const DecoderConfig& c = options_.config;
  const int64_t keys = c.sliding_window > 0 ? std::min(context_after, c.sliding_window + tokens) : context_after;
  return 2 * tokens * c.embed_dim * (2 * c.q_width() + 2 * c.kv_width()) + 4 * tokens * keys * c.q_width();
}

int64_t DecoderAttention::AppendBlockRows(int64_t tokens, int64_t context_after) const {
  const DecoderConfig& c = options_.config;
  const int64_t keys = c.sliding_window > 0 ? std::min(context_after, c.sliding_window + tokens) : context_after;
  const int64_t row_bytes = c.num_heads * std::max<int64_t>(keys, 1) * kF32;
  return std::clamp(options_.scores_block_bytes / row_bytes, std::min(tokens, options_.min_block_rows), tokens);
}

int64_t DecoderAttention::AppendWorkspaceBytes(int64_t tokens, int64_t context_after) const {
  const DecoderConfig& c = options_.config;
  const int64_t rows = AppendBlockRows(tokens, context_after);
  const int64_t keys = c.sliding_window > 0 ? std::min(context_after, c.sliding_window + rows) : context_after;
  const int64_t span = std::max<int64_t>(options_.cache_span_bytes, c.kv_width() * kF32);
  // Inputs, projections and output of the new rows; one block's stacked q, scores and context; a span.
  const int64_t rows_bytes = tokens * (2 * c.embed_dim + c.q_width() + 2 * c.kv_width()) * kF32 + tokens * 8;
  const int64_t f32 = rows_bytes + rows * c.num_heads * (keys + 2 * c.head_dim) * kF32 + span;
  if (compute_ != ComputeType::kBFloat16) return f32;
  // bf16 copies of each matmul's inputs: the rows for the projections, a block's q and probabilities, a span.
  return f32 + tokens * (c.embed_dim + c.q_width()) * 2 + rows * c.num_heads * (keys + c.head_dim) * 2 + span / 2;
}

absl::Status DecoderAttention::CheckAppend(const CachedAppend& a) const {
  const DecoderConfig& c = options_.config;
  if (a.query == nullptr || a.cache == nullptr) {
    return absl::InvalidArgumentError("append: query and cache are required");
  }
  if (a.tokens < 1) return absl::InvalidArgumentError(absl::StrCat("query: expected T >= 1 tokens, got ", a.tokens));
  ATTN_RETURN_IF_ERROR(CheckActivation("query", a.query_view(c.embed_dim)));
  if (a.cross_attention) {
    return absl::InvalidArgumentError("memory: decoder layers have no cross-attention sessions");
  }
  if (a.cache->width() != c.kv_width()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cache: expected width ", c.kv_width(), " (num_kv_heads * head_dim), got ", a.cache->width()));
  }
  const int64_t first = a.cache->tokens();
  if (first + a.tokens > kMaxRopePosition) {
    return absl::OutOfRangeError(absl::StrCat("query: positions up to ", first + a.tokens - 1, " are past ",
                                              kMaxRopePosition - 1, ", the largest rotary position"));
  }
  if (FirstVisibleKey(first, c.sliding_window) < a.cache->first_token()) {
    return absl::FailedPreconditionError(absl::StrCat("cache: the keys from token ", a.cache->first_token(),
                                                      " on are held, the append needs them from token ",
                                                      FirstVisibleKey(first, c.sliding_window)));
  }
  return absl::OkStatus();
}

void DecoderAttention::RopeAppends(absl::Span<const CachedAppend* const> appends,
                                   const std::vector<int64_t>& first_row, float* qkv, int threads) const {
  const DecoderConfig& c = options_.config;
  const int64_t width = c.q_width() + 2 * c.kv_width();
#pragma omp parallel for num_threads(threads) if (threads > 1 && appends.size() > 1) schedule(dynamic, 1)
  for (size_t m = 0; m < appends.size(); ++m) {
    if (first_row[m] < 0) continue;
    const CachedAppend& a = *appends[m];
    std::vector<int64_t> positions(static_cast<size_t>(a.tokens));
    for (int64_t i = 0; i < a.tokens; ++i) positions[i] = a.cache->tokens() + i;
    float* rows = qkv + first_row[m] * width;
    rope_.Apply(rows, a.tokens, width, c.num_heads, c.head_dim, positions.data());
    rope_.Apply(rows + c.q_width(), a.tokens, width, c.num_kv_heads, c.head_dim, positions.data());
  }
}

int64_t DecoderAttention::PrepareAppends(absl::Span<const CachedAppend* const> appends,
                                        std::vector<absl::StatusOr<AttentionOutputs>>* results,
                                        std::vector<int64_t>* first_row, int64_t* flops) const {
  const DecoderConfig& c = options_.config;
  int64_t rows = 0;
  for (size_t m = 0; m < appends.size(); ++m) {
    const CachedAppend& a = *appends[m];
    if (absl::Status s = CheckAppend(a); !s.ok()) {
      (*results)[m] = s;
      continue;
    }
    const int64_t context = a.cache->tokens() + a.tokens;
    AttentionOutputs out;
    out.output = Tensor({a.tokens, c.embed_dim});
    if (a.need_weights) {
      out.attn_weights = Tensor::Zeros(a.average_attn_weights ? Shape{a.tokens, context}
                                                              : Shape{c.num_heads, a.tokens, context});
    }
    (*results)[m] = std::move(out);
    (*first_row)[m] = rows;
    rows += a.tokens;
    *flops += AppendFlops(a.tokens, context, false);
  }
  return rows;
}

std::vector<DecoderAttention::CachedBlock> DecoderAttention::CacheAppends(
    absl::Span<const CachedAppend* const> appends, const std::vector<int64_t>& first_row, const float* qkv,
    std::vector<absl::StatusOr<AttentionOutputs>>* results) const {
  const DecoderConfig& c = options_.config;
  const int64_t width = c.q_width() + 2 * c.kv_width();
  std::vector<CachedBlock> blocks;
  for (size_t m = 0; m < appends.size(); ++m) {
    if (first_row[m] < 0) continue;
    const CachedAppend& a = *appends[m];
    const int64_t first = a.cache->tokens();
    const float* k = qkv + first_row[m] * width + c.q_width();
    // Reserved beforehand by the caller; a failure here is the pool's, and this append's alone.
    if (absl::Status s = a.cache->Append(k, k + c.kv_width(), a.tokens, width); !s.ok()) {
      (*results)[m] = s;
      continue;
    }
    Tensor* weights = a.need_weights ? &(*results)[m]->attn_weights : nullptr;
    const int64_t block_rows = AppendBlockRows(a.tokens, first + a.tokens);
    for (int64_t l0 = 0; l0 < a.tokens; l0 += block_rows) {
      blocks.push_back({&a, m, first, first_row[m], l0, std::min(block_rows, a.tokens - l0), weights});
    }
  }
  return blocks;
}

std::vector<absl::StatusOr<AttentionOutputs>> DecoderAttention::ForwardAppends(
    absl::Span<const CachedAppend* const> appends, int max_threads) const {
  const DecoderConfig& c = options_.config;
  const int64_t e = c.embed_dim, width = c.q_width() + 2 * c.kv_width();
  std::vector<absl::StatusOr<AttentionOutputs>> results(appends.size());
  std::vector<int64_t> first_row(appends.size(), -1);
  int64_t flops = 0;
  const int64_t rows = PrepareAppends(appends, &results, &first_row, &flops);
  if (rows == 0) return results;
  const int budget = max_threads > 0 ? max_threads : omp_get_max_threads();
  const int threads = flops < options_.single_thread_below_flops ? 1 : budget;
  const ScopedOmpThreads team(threads);

  // One projection over every accepted append's rows, in order (f32, bf16 or f16 as they came).
  std::vector<TensorView> views;
  for (size_t m = 0; m < appends.size(); ++m) {
    if (first_row[m] >= 0) views.push_back(appends[m]->query_view(e));
  }
  float* qkv = ThreadProjectionBuffer().Get(static_cast<size_t>(rows * width));
  decoder_internal::BlockScratch& scratch = ThreadBlockScratch();
  absl::Status status = ProjectRows(*qkv_proj_, views, rows, e, scratch.inputs, scratch.inputs16, qkv, width);
  std::vector<CachedBlock> blocks;
  if (status.ok()) {
    RopeAppends(appends, first_row, qkv, threads);
    blocks = CacheAppends(appends, first_row, qkv, &results);
  }
  std::vector<absl::Status> block_status(blocks.size());
  const auto n = static_cast<int64_t>(blocks.size());
  if (threads == 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) block_status[i] = AttendCachedBlock(blocks[i], qkv);
  } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) block_status[i] = AttendCachedBlock(blocks[i], qkv);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!block_status[i].ok() && results[blocks[i].index].ok()) results[blocks[i].index] = block_status[i];
  }
  float* out = Grow(ThreadBlockScratch().out, rows * e);
  if (status.ok()) status = o_proj_->Execute(qkv, rows, width, out, e);
  for (size_t m = 0; m < appends.size(); ++m) {
    if (first_row[m] < 0 || !results[m].ok()) continue;
    if (!status.ok()) {
      results[m] = status;
      continue;
    }
    std::memcpy(results[m]->output.values.data(), out + first_row[m] * e,
                static_cast<size_t>(appends[m]->tokens * e) * sizeof(float));
  }
  ThreadProjectionBuffer().Trim();
  return results;
}

absl::Status DecoderAttention::AttendCachedBlock(const CachedBlock& blk, float* qkv) const {
  const DecoderConfig& c = options_.config;
  const KvSequence& cache = *blk.append->cache;
  const int64_t r = c.group_size(), d = c.head_dim, hkv = c.num_kv_heads, width = c.q_width() + 2 * c.kv_width();
  const int64_t p0 = blk.first + blk.l0, k0 = FirstVisibleKey(p0, c.sliding_window), k1 = p0 + blk.rows;
  const int64_t keys = k1 - k0, m = r * blk.rows, kv_width = c.kv_width();
  const int64_t span_tokens = std::max<int64_t>(1, options_.cache_span_bytes / (kv_width * kF32));
  auto& ws = ThreadBlockScratch();
  float* rows_qkv = qkv + (blk.proj_row + blk.l0) * width;
  float* q = Grow(ws.q, hkv * m * d);
  float* scores = Grow(ws.scores, hkv * m * keys);
  float* ctx = Grow(ws.context, hkv * m * d);
  float* span = Grow(ws.span, std::min(span_tokens, keys) * kv_width);
  for (int64_t g = 0; g < hkv; ++g) {
    StackGroupQueries(rows_qkv, width, blk.rows, g, r, d, c.score_scale(), q + g * m * d);
  }
  for (int64_t s0 = k0; s0 < k1; s0 += span_tokens) {
    const int64_t n = std::min(span_tokens, k1 - s0);
    CopyCachedRows(cache, /*values=*/false, s0, n, span);
    for (int64_t g = 0; g < hkv; ++g) {
      ATTN_RETURN_IF_ERROR(scores_op_->Execute(Matrix(q + g * m * d, m, d, d),
                                               KeysTransposed(span + g * d, d, n, kv_width),
                                               Matrix(scores + g * m * keys + (s0 - k0), m, n, keys)));
    }
  }
  const RowBounds bounds{p0, blk.rows, k0, keys, c.sliding_window, static_cast<float>(c.attn_logit_softcapping),
                         /*padded=*/false};
  const CachedAppend& a = *blk.append;
  const int64_t context = blk.first + a.tokens;
  for (int64_t g = 0; g < hkv; ++g) {
    SoftmaxGroupRows(bounds, m, nullptr, scores + g * m * keys);
    if (blk.weights == nullptr) continue;
    const WeightsSink sink{blk.weights->values.data() + blk.l0 * context + k0, a.tokens * context, context,
                           a.average_attn_weights, 1.0f / static_cast<float>(c.num_heads)};
    AddGroupWeights(sink, g, r, blk.rows, keys, scores + g * m * keys);
  }
  for (int64_t s0 = k0; s0 < k1; s0 += span_tokens) {
    const int64_t n = std::min(span_tokens, k1 - s0);
    CopyCachedRows(cache, /*values=*/true, s0, n, span);
    const HeadMatmulOp& op = s0 == k0 ? *context_op_ : *context_add_op_;
    for (int64_t g = 0; g < hkv; ++g) {
      ATTN_RETURN_IF_ERROR(op.Execute(Matrix(scores + g * m * keys + (s0 - k0), m, n, keys),
                                      Matrix(span + g * d, n, d, kv_width), Matrix(ctx + g * m * d, m, d, d)));
    }
  }
  for (int64_t g = 0; g < hkv; ++g) UnstackGroupContext(ctx + g * m * d, blk.rows, g, r, d, rows_qkv, width);
  return absl::OkStatus();
}

}  // namespace attnserve
