// MultiheadAttention's incremental attention for sessions: new tokens attend over a paged KV cache
// (core/kv_cache_pool.h), its blocks read in place. Few query rows (decode steps) go through vector kernels
// that stream each block's keys and values once; more rows (prefill chunks) through oneDNN matmuls over
// spans of blocks copied together (about 1 MiB of keys or values each), the context summed over spans by the
// matmul itself (kContextAdd).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/activation_rows.h"
#include "core/attention_inputs.h"
#include "core/kernel_variants.h"
#include "core/multihead_attention.h"
#include "core/omp_threads.h"
#include "core/row_softmax.h"
#include "core/simd_loops.h"
#include "core/vector_ops.h"

namespace attnserve {
namespace {

// Query rows at most this many use the vector kernels: a matmul of so few rows would re-read every key
// block for little work, and oneDNN's per-call cost (per key block) would dominate.
constexpr int64_t kVectorRows = 4;
constexpr size_t kRetainBytes = size_t{256} << 20;

// Per-thread scratch, reused across calls.
struct AppendScratch {
  std::vector<float> inputs;       // the batch's queries, concatenated [N, E] (f32 layers)
  std::vector<uint16_t> inputs16;  // the same in bf16 (bf16 layers)
  std::vector<float> proj;    // projections [N, 3E] (self-attention) or [N, E] (cross)
  std::vector<float> out;     // output projection [N, E]
  std::vector<float> scores;  // one query block [H, lb, cols]
  std::vector<float> span;    // keys or values of a span of blocks, contiguous [tokens, width]

  // Geometric growth of the capacity: a prefill's scores grow with its context chunk after chunk, and
  // reallocating them each time costs a fresh mapping and its page faults (more than the chunk's attention, in
  // a VM). Only the first n are touched: the reserved rest is not resident.
  static float* Grow(std::vector<float>& buf, int64_t n) {
    const auto want = static_cast<size_t>(n);
    if (buf.capacity() < want) buf.reserve(std::max(want, buf.capacity() * 3 / 2));
    if (buf.size() < want) buf.resize(want);
    return buf.data();
  }
  void ReleaseLarge() {
    for (auto* buf : {&inputs, &proj, &out, &scores, &span}) {
      if (buf->capacity() * sizeof(float) > kRetainBytes) std::vector<float>().swap(*buf);
    }
    if (inputs16.capacity() * sizeof(uint16_t) > kRetainBytes) std::vector<uint16_t>().swap(inputs16);
  }
};

AppendScratch& ThreadScratch() {
  thread_local AppendScratch scratch;
  return scratch;
}

// The vector kernels walk a block's rows in order, every head of a row before the next row: a row of keys
// or values is E floats in one piece (4 KiB at E=1024), so the block streams through the cache; walking one
// head down the rows instead would touch a new 4 KiB page per row, which the prefetchers do not follow.

// Two rows ahead (four measured slower), into L2 (prefetcht2: 10-15 % faster than into L1, whose few miss
// buffers the pending rows fill): each row starts a new page, where the hardware prefetchers stop.
__attribute__((always_inline)) inline void PrefetchRowsAhead(const float* row, int64_t ld, int64_t n) {
  for (int64_t d = 0; d < n; d += 16) __builtin_prefetch(row + 2 * ld + d, 0, 1);
}

// q . k over dh floats: two vector accumulators (a chain of dependent multiply-adds is what costs at dh = 64),
// summed by halves, then the tail past the last whole vector.
template <typename W>
__attribute__((always_inline)) inline float HeadDot(const float* q, const float* k, int64_t dh) {
  constexpr int64_t kLanes = W::kLanes;
  typename W::F acc0{}, acc1{};
  int64_t d = 0;
  for (; d + 2 * kLanes <= dh; d += 2 * kLanes) {
    acc0 += simd::LoadFull<W>(q + d) * simd::LoadFull<W>(k + d);
    acc1 += simd::LoadFull<W>(q + d + kLanes) * simd::LoadFull<W>(k + d + kLanes);
  }
  if (d + kLanes <= dh) {
    acc0 += simd::LoadFull<W>(q + d) * simd::LoadFull<W>(k + d);
    d += kLanes;
  }
  float s = simd::ReduceAdd(acc0 + acc1);
  for (; d < dh; ++d) s += q[d] * k[d];
  return s;
}

// scores[h][i][j0 + j] = q[i][head h] . keys[j][head h] for heads [h0, h1), rows i < rows, keys j < n.
template <typename W>
__attribute__((always_inline)) inline void BlockScoresBody(const float* q, int64_t ldq, int64_t rows,
                                                           const float* keys, int64_t ldk, int64_t n, int64_t h0,
                                                           int64_t h1, int64_t dh, float* scores, int64_t cols,
                                                           int64_t j0) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t h = h0; h < h1; ++h) {
      const float* k = keys + j * ldk + h * dh;
      PrefetchRowsAhead(k, ldk, dh);
      for (int64_t i = 0; i < rows; ++i) {
        scores[(h * rows + i) * cols + j0 + j] = HeadDot<W>(q + i * ldq + h * dh, k, dh);
      }
    }
  }
}

// ctx[i][head h] += sum_j probs[h][i][j0 + j] * values[j][head h] for heads [h0, h1).
__attribute__((always_inline)) inline void BlockContextBody(
    const float* probs, int64_t cols, int64_t j0, int64_t rows, const float* values, int64_t ldv, int64_t n,
    int64_t h0, int64_t h1, int64_t dh, float* ctx, int64_t ldc) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t h = h0; h < h1; ++h) {
      const float* v = values + j * ldv + h * dh;
      PrefetchRowsAhead(v, ldv, dh);
      for (int64_t i = 0; i < rows; ++i) {
        const float p = probs[(h * rows + i) * cols + j0 + j];
        float* c = ctx + i * ldc + h * dh;
#pragma omp simd
        for (int64_t d = 0; d < dh; ++d) c[d] += p * v[d];
      }
    }
  }
}

ATTN_KERNEL_VARIANTS_BY_WIDTH(BlockScores,
                              (const float* q, int64_t ldq, int64_t rows, const float* keys, int64_t ldk, int64_t n,
                               int64_t h0, int64_t h1, int64_t dh, float* scores, int64_t cols, int64_t j0),
                              (q, ldq, rows, keys, ldk, n, h0, h1, dh, scores, cols, j0))
ATTN_KERNEL_VARIANTS(BlockContext,
                     (const float* probs, int64_t cols, int64_t j0, int64_t rows, const float* values, int64_t ldv,
                      int64_t n, int64_t h0, int64_t h1, int64_t dh, float* ctx, int64_t ldc),
                     (probs, cols, j0, rows, values, ldv, n, h0, h1, dh, ctx, ldc))

const BlockScoresFn BlockScores = PickBlockScores();
const BlockContextFn BlockContext = PickBlockContext();

// Softmax of each of `rows` rows of `scores` [rows, cols] over its first `keys` columns, where row r holds
// query row r % lb, which sees keys [0, keys + r % lb) (capped at cols); the columns past them become 0
// (causal). Rows go over the OpenMP team when there are enough and no enclosing parallel region.
void CausalSoftmax(float* scores, int64_t rows, int64_t lb, int64_t cols, int64_t keys) {
  const int threads = omp_in_parallel() || rows * cols < (int64_t{1} << 16) ? 1 : omp_get_max_threads();
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * cols;
    const int64_t seen = std::min(cols, keys + r % lb);
    RowSoftmax(row, 1, seen, cols);
    std::fill(row + seen, row + cols, 0.0f);
  }
}

// Whole blocks of `cache` in a span of at most `span_bytes` of keys (or values), at least one.
int64_t SpanBlocks(const KvSequence& cache, int64_t span_bytes) {
  const int64_t block_bytes = cache.block_tokens() * cache.width() * int64_t{sizeof(float)};
  return std::max<int64_t>(1, span_bytes / block_bytes);
}

// Rows [0, tokens) of blocks b0, b0 + 1, ... of `cache` (keys or values) into `span` [tokens, width].
void CopySpan(const KvSequence& cache, bool values, int64_t b0, int64_t tokens, float* span) {
  const int64_t bt = cache.block_tokens(), width = cache.width();
  for (int64_t done = 0, b = b0; done < tokens; done += bt, ++b) {
    const float* src = values ? cache.values(b) : cache.keys(b);
    std::memcpy(span + done * width, src, static_cast<size_t>(std::min(bt, tokens - done) * width) * sizeof(float));
  }
}

// proj [rows, ldq] = op(the queries of `members` one after another [rows, E]): f32, bf16 or f16 rows as they
// came, converted while they are gathered (read in place for one append already in the op's type).
absl::Status ProjectQueries(const LinearOp& op, const std::vector<const CachedAppend*>& members, int64_t rows,
                            int64_t e, float* proj, int64_t ldq) {
  std::vector<TensorView> views;
  views.reserve(members.size());
  for (const CachedAppend* a : members) views.push_back(a->query_view(e));
  AppendScratch& scratch = ThreadScratch();
  return ProjectRows(op, views, rows, e, scratch.inputs, scratch.inputs16, proj, ldq);
}

absl::Status CheckAppend(const CachedAppend& a, const MhaConfig& c) {
  if (a.query == nullptr || a.cache == nullptr)
    return absl::InvalidArgumentError("append: query and cache are required");
  if (a.tokens < 1) return absl::InvalidArgumentError(absl::StrCat("query: expected T >= 1 tokens, got ", a.tokens));
  ATTN_RETURN_IF_ERROR(CheckActivation("query", a.query_view(c.embed_dim)));
  if (a.cache->width() != c.embed_dim) {
    return absl::InvalidArgumentError(absl::StrCat("cache: expected width ", c.embed_dim, ", got ", a.cache->width()));
  }
  if (!a.cross_attention && !c.same_qkv_dim()) {
    return absl::FailedPreconditionError("self-attention sessions need kdim == vdim == embed_dim");
  }
  if (a.cross_attention && a.cache->tokens() == 0)
    return absl::FailedPreconditionError("cross-attention memory is empty");
  return absl::OkStatus();
}

int64_t ContextAfter(const CachedAppend& a) {
  return a.cross_attention ? a.cache->tokens() : a.cache->tokens() + a.tokens;
}

}  // namespace

int64_t MultiheadAttention::AppendScoresBytes(int64_t tokens, int64_t context) const {
  const int64_t row_bytes = options_.config.num_heads * context * int64_t{sizeof(float)};
  const int64_t rows = std::clamp(options_.scores_block_bytes / std::max<int64_t>(row_bytes, 1),
                                  std::min(tokens, options_.min_block_rows), std::max<int64_t>(tokens, 1));
  return rows * row_bytes;
}

absl::Status MultiheadAttention::ProjectMemory(const float* memory, int64_t tokens, KvSequence* cache,
                                               int max_threads) const {
  const MhaConfig& c = options_.config;
  if (c.key_dim() != c.value_dim()) {
    return absl::FailedPreconditionError(absl::StrCat("memory: one source for keys and values needs kdim == vdim, got ",
                                                      c.key_dim(), " and ", c.value_dim()));
  }
  const int64_t e = c.embed_dim;
  std::vector<float> k(static_cast<size_t>(tokens * e)), v(static_cast<size_t>(tokens * e));
  const ScopedOmpThreads team(max_threads > 0 ? max_threads : omp_get_max_threads());
  ATTN_RETURN_IF_ERROR(k_proj_->Execute(memory, tokens, c.key_dim(), k.data(), e));
  ATTN_RETURN_IF_ERROR(v_proj_->Execute(memory, tokens, c.value_dim(), v.data(), e));
  return cache->Append(k.data(), v.data(), tokens);
}

std::vector<absl::StatusOr<AttentionOutputs>> MultiheadAttention::ForwardAppends(
    absl::Span<const CachedAppend* const> appends, int max_threads) const {
  const MhaConfig& c = options_.config;
  const int64_t e = c.embed_dim, h = c.num_heads;
  std::vector<absl::StatusOr<AttentionOutputs>> results(appends.size());
  std::vector<const CachedAppend*> groups[2];  // [0]: self-attention, [1]: cross-attention
  std::vector<size_t> index[2];
  int64_t flops = 0;
  for (size_t i = 0; i < appends.size(); ++i) {
    const CachedAppend& a = *appends[i];
    if (absl::Status s = CheckAppend(a, c); !s.ok()) {
      results[i] = s;
      continue;
    }
    const int64_t context = ContextAfter(a);
    AttentionOutputs out;
    out.output = Tensor({a.tokens, e});
    if (a.need_weights) {
      out.attn_weights = a.average_attn_weights ? Tensor({a.tokens, context}) : Tensor({h, a.tokens, context});
    }
    results[i] = std::move(out);
    flops += CachedAppendFlops(e, a.tokens, context, a.cross_attention);
    groups[a.cross_attention ? 1 : 0].push_back(&a);
    index[a.cross_attention ? 1 : 0].push_back(i);
  }
  const int budget = max_threads > 0 ? max_threads : omp_get_max_threads();
  const int threads = flops < options_.single_thread_below_flops ? 1 : budget;
  const ScopedOmpThreads team(threads);
  for (int g = 0; g < 2; ++g) {
    if (groups[g].empty()) continue;
    std::vector<AttentionOutputs*> outs;
    for (size_t i : index[g]) outs.push_back(&*results[i]);
    std::vector<absl::Status> status = RunAppends(groups[g], outs, threads);
    for (size_t m = 0; m < status.size(); ++m) {
      if (!status[m].ok()) results[index[g][m]] = status[m];
    }
  }
  ThreadScratch().ReleaseLarge();
  return results;
}

std::vector<absl::Status> MultiheadAttention::RunAppends(const std::vector<const CachedAppend*>& members,
                                                         const std::vector<AttentionOutputs*>& outs,
                                                         int threads) const {
  const int64_t e = options_.config.embed_dim;
  const bool cross = members.front()->cross_attention;
  std::vector<absl::Status> status(members.size());
  int64_t rows = 0;
  for (const CachedAppend* a : members) rows += a->tokens;
  const int64_t ldq = cross ? e : 3 * e;
  float* proj = AppendScratch::Grow(ThreadScratch().proj, rows * ldq);
  const absl::Status projected = ProjectQueries(cross ? *q_proj_ : *qkv_proj_, members, rows, e, proj, ldq);
  if (!projected.ok()) return std::vector<absl::Status>(members.size(), projected);
  std::vector<int64_t> first_row(members.size());
  for (size_t m = 0, row = 0; m < members.size(); row += members[m]->tokens, ++m) {
    first_row[m] = static_cast<int64_t>(row);
    if (cross) continue;
    const float* k = proj + first_row[m] * ldq + e;
    status[m] = members[m]->cache->Append(k, k + e, members[m]->tokens, ldq);
  }
  auto attend = [&](size_t m) {
    if (!status[m].ok()) return;
    Tensor* weights = members[m]->need_weights ? &outs[m]->attn_weights : nullptr;
    status[m] = AttendCached(*members[m], proj + first_row[m] * ldq, ldq, weights);
  };
  std::vector<size_t> small, large;
  for (size_t m = 0; m < members.size(); ++m) {
    const int64_t attention_flops = 4 * members[m]->tokens * ContextAfter(*members[m]) * e;
    (attention_flops < options_.small_attention_flops ? small : large).push_back(m);
  }
  if (threads == 1 || small.size() < 2) {
    for (size_t m : small) attend(m);
  } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (size_t u = 0; u < small.size(); ++u) attend(small[u]);
  }
  for (size_t m : large) attend(m);
  float* out = AppendScratch::Grow(ThreadScratch().out, rows * e);
  if (absl::Status s = out_proj_->Execute(proj, rows, ldq, out, e); !s.ok()) {
    return std::vector<absl::Status>(members.size(), s);
  }
  for (size_t m = 0; m < members.size(); ++m) {
    std::memcpy(outs[m]->output.values.data(), out + first_row[m] * e,
                static_cast<size_t>(members[m]->tokens * e) * sizeof(float));
  }
  return status;
}

absl::Status MultiheadAttention::AttendCached(const CachedAppend& a, float* q, int64_t ldq, Tensor* weights) const {
  const int64_t context = a.cache->tokens();
  const int64_t row_bytes = options_.config.num_heads * context * int64_t{sizeof(float)};
  const int64_t rows = AppendScoresBytes(a.tokens, context) / std::max<int64_t>(row_bytes, 1);
  float* scores = AppendScratch::Grow(ThreadScratch().scores, std::max<int64_t>(rows, 1) * row_bytes / 4);
  for (int64_t l0 = 0; l0 < a.tokens; l0 += rows) {
    const int64_t lb = std::min(rows, a.tokens - l0);
    ATTN_RETURN_IF_ERROR(AttendCachedRows(a, l0, lb, q + l0 * ldq, ldq, scores, weights));
  }
  return absl::OkStatus();
}

absl::Status MultiheadAttention::AttendCachedRows(const CachedAppend& a, int64_t l0, int64_t lb, float* q, int64_t ldq,
                                                  float* scores, Tensor* weights) const {
  const int64_t h = options_.config.num_heads, dh = options_.config.head_dim(), e = options_.config.embed_dim;
  const KvSequence& cache = *a.cache;
  const int64_t context = cache.tokens(), bt = cache.block_tokens(), width = cache.width();
  const int64_t first = context - (a.cross_attention ? 0 : a.tokens) + l0;  // position of row 0 (self)
  // Causal: keys past the block's last query are not computed at all.
  const int64_t cols = a.cross_attention ? context : first + lb;
  const int64_t blocks = (cols + bt - 1) / bt;
  const bool vector = lb <= kVectorRows;
  // A lone large decode step (not inside a batch's parallel units) splits its heads over the threads.
  const int threads = vector && omp_get_max_threads() > 1 && !omp_in_parallel() ? omp_get_max_threads() : 1;
  const int64_t heads_per_thread = (h + threads - 1) / threads;
  if (vector) {
#pragma omp parallel for num_threads(threads) if (threads > 1)
    for (int t = 0; t < threads; ++t) {
      const int64_t h0 = t * heads_per_thread, h1 = std::min(h, h0 + heads_per_thread);
      for (int64_t b = 0; b < blocks; ++b) {
        BlockScores(q, ldq, lb, cache.keys(b), width, std::min(bt, cols - b * bt), h0, h1, dh, scores, cols, b * bt);
      }
    }
  }
  const int64_t span_blocks = SpanBlocks(cache, options_.cache_span_bytes), span_tokens = span_blocks * bt;
  float* span = vector ? nullptr : AppendScratch::Grow(ThreadScratch().span, span_tokens * width);
  for (int64_t b = 0; b < blocks && !vector; b += span_blocks) {
    const int64_t n = std::min(span_tokens, cols - b * bt);
    CopySpan(cache, /*values=*/false, b, n, span);
    const View4 qa{q, {1, h, lb, dh}, {lb * ldq, dh, ldq, 1}};
    const View4 kb{span, {1, h, dh, n}, {n * width, dh, 1, width}};
    const View4 sc{scores + b * bt, {1, h, lb, n}, {h * lb * cols, lb * cols, cols, 1}};
    ATTN_RETURN_IF_ERROR(scores_op_->Execute(qa, kb, sc));
  }
  CausalSoftmax(scores, h * lb, lb, cols, a.cross_attention ? cols : first + 1);
  if (weights != nullptr) AddAppendWeights(a, l0, lb, cols, scores, weights);
  // The context over the block's Q columns: Q is no longer needed.
  if (vector) {
    for (int64_t i = 0; i < lb; ++i) std::fill_n(q + i * ldq, e, 0.0f);
#pragma omp parallel for num_threads(threads) if (threads > 1)
    for (int t = 0; t < threads; ++t) {
      const int64_t h0 = t * heads_per_thread, h1 = std::min(h, h0 + heads_per_thread);
      for (int64_t b = 0; b < blocks; ++b) {
        BlockContext(scores, cols, b * bt, lb, cache.values(b), width, std::min(bt, cols - b * bt), h0, h1, dh, q,
                     ldq);
      }
    }
    return absl::OkStatus();
  }
  for (int64_t b = 0; b < blocks; b += span_blocks) {
    const int64_t n = std::min(span_tokens, cols - b * bt);
    CopySpan(cache, /*values=*/true, b, n, span);
    const View4 pa{scores + b * bt, {1, h, lb, n}, {h * lb * cols, lb * cols, cols, 1}};
    const View4 vb{span, {1, h, n, dh}, {n * width, dh, width, 1}};
    const View4 ctx{q, {1, h, lb, dh}, {lb * ldq, dh, ldq, 1}};
    ATTN_RETURN_IF_ERROR((b == 0 ? context_op_ : context_add_op_)->Execute(pa, vb, ctx));
  }
  return absl::OkStatus();
}

void MultiheadAttention::AddAppendWeights(const CachedAppend& a, int64_t l0, int64_t lb, int64_t cols,
                                          const float* probs, Tensor* weights) const {
  const int64_t h = options_.config.num_heads, context = a.cache->tokens();
  const float inv_heads = 1.0f / static_cast<float>(h);
  float* w = weights->values.data();
  for (int64_t hi = 0; hi < h; ++hi) {
    for (int64_t i = 0; i < lb; ++i) {
      const float* src = probs + (hi * lb + i) * cols;
      if (a.average_attn_weights) {
        float* dst = w + (l0 + i) * context;
        for (int64_t j = 0; j < cols; ++j) dst[j] += src[j] * inv_heads;
      } else {
        std::memcpy(w + (hi * a.tokens + l0 + i) * context, src, static_cast<size_t>(cols) * sizeof(float));
      }
    }
  }
}

}  // namespace attnserve
