// One multi-head attention layer with PyTorch's nn.MultiheadAttention semantics (batch_first=True, eval):
//   output = softmax(Q K^T / sqrt(Dh) + masks) V, per head, with Q = query Wq^T + bq, K = key Wk^T + bk,
//   V = value Wv^T + bv, then output = concat(heads) Wo^T + bo.
// Differences from PyTorch 1.13: a query row whose keys are all masked gets zero weights and a zero
// attention output (so output = out_proj.bias there) where PyTorch returns NaN; is_causal is applied as a
// mask of its own (combined with any attn_mask) rather than being a hint about attn_mask.
//
// Compute, on oneDNN: the projections are single matmuls over all tokens of all requests concatenated (one
// fused [3E, E] matmul for self-attention); attention runs per sequence and per query block, reading the
// heads in place from the projection output through strided memory descriptors; the scores of one block
// (bounded by Options::scores_block_bytes) go through the mask pass and the softmax primitive; the context
// is written over the block's Q columns, which the output projection then reads. Long requests that do not
// ask for weights take FlashAttention instead (Options::flash_min_keys): key blocks in turn with an online
// softmax, masks added block by block, no scores block larger than flash_query_rows x flash_key_cols per thread.
//
// Thread-safety: immutable after Create(); Forward and ForwardBatch may run on many threads at once. Each
// thread keeps its own scratch buffers (grown to the high-water mark, released above 256 MiB).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/append_engine.h"
#include "core/attention_inputs.h"
#include "core/flash_attention.h"
#include "core/kv_cache_pool.h"
#include "core/mha_config.h"
#include "core/mha_weights.h"
#include "core/onednn_ops.h"
#include "core/short_attention.h"

namespace attnserve {

// Frees the calling thread's scratch buffers larger than `keep_bytes` (the engine keeps them from call to
// call, up to 256 MiB, to avoid reallocating): for a worker about to idle, so that a burst's memory goes back.
void ReleaseThreadScratch(size_t keep_bytes = size_t{1} << 20);

// Multiply-adds x2 of an append of `tokens` new tokens to a cache holding `context_after` tokens once they
// are in: projections (q, k, v and out; q and out alone for cross-attention) and the attention (scores and
// context over every cached key; the causal half is not subtracted: the kernels compute whole blocks).
inline int64_t CachedAppendFlops(int64_t embed_dim, int64_t tokens, int64_t context_after, bool cross_attention) {
  return 2 * tokens * embed_dim * (cross_attention ? 2 * embed_dim : 4 * embed_dim) +
         4 * tokens * context_after * embed_dim;
}

class MultiheadAttention : public AppendEngine {
 public:
  struct Options {
    MhaConfig config;
    AttentionLimits limits;
    // Attention scores held at once by one thread (one block of sequences x heads x query rows); bounds
    // the memory of long sequences (B=1, L=32768, H=16 needs 2 MiB per query row of all heads).
    int64_t scores_block_bytes = int64_t{4} << 20;
    // Query rows per block at least, even past scores_block_bytes: thinner blocks re-read K and V once per
    // block and turn the matmuls into matrix-vector products. Tests set 1 to exercise blocking.
    int64_t min_block_rows = 64;
    // A batch with fewer FLOPs than this runs on the calling thread alone: below it the fork/join of
    // OpenMP threads costs more than it saves, and on a loaded machine a descheduled team thread stalls
    // every barrier. 0 disables.
    int64_t single_thread_below_flops = int64_t{64} << 20;
    // Inside a batch, a request whose attention matmuls (QK^T and PV) have fewer FLOPs than this is cut
    // into units of a few sequences that run side by side on the OpenMP threads, each with single-threaded
    // oneDNN calls (one parallel region for the lot); larger ones run one after another on every thread.
    int64_t small_attention_flops = int64_t{32} << 20;
    // Sessions' prefill chunks: keys or values of the cache copied together (a span of whole blocks, at
    // least one) for one matmul. A matmul per cache block would be dominated by oneDNN's per-call cost, and
    // its context sum (C += P V) would rewrite C once per block. Tests set it small to cross many spans;
    // <= 0 means one block per span.
    int64_t cache_span_bytes = int64_t{1} << 20;
    // Requests with at least this many keys and no attention weights asked (any masks) go
    // through FlashAttention (core/flash_attention.h): key blocks in turn with an online softmax, the
    // scores never leaving the cache, causal blocks skipped. Others (and all when 0) take the blocked path,
    // whose whole score rows go through the mask pass and the softmax primitive. BFLOAT16 layers too: their
    // block matmuls then run in bf16, and where those run on brgemm kernels (flash_blocks_on_brgemm()) from one whole
    // key block (flash_key_cols) up when that is fewer.
    int64_t flash_min_keys = 1024;
    // FlashAttention's blocks: query rows x keys of scores per thread at a time. 0: chosen by the CPU
    // (FlashBlockForCpu). oneDNN's sgemm packs its operands per call, and its AVX-512 kernels need larger
    // blocks than its AVX2 ones to amortise that (BENCHMARKS.md has the measurements).
    int64_t flash_query_rows = 0;
    int64_t flash_key_cols = 0;
    // FlashAttention's blocks on the project's strip kernels where it has them (FlashOnStrips: f32 on AVX-512, bf16
    // on AVX512_BF16 without AMX); false: on sgemm or the layer's bf16 matmuls (to compare the two in one run).
    bool flash_strips = true;
    // bf16 layers on brgemm kernels: requests whose query and key lengths are both at most this many tokens and that
    // ask no weights run ShortAttention (core/short_attention.h): per sequence, all heads in two fixed-size bf16
    // matmuls on brgemm kernels, ahead of the blocked and flash paths. 0 disables.
    int64_t short_attention_max_len = 256;
    // Softmax primitives kept, one per (rows, S) shape seen.
    int64_t softmax_cache_capacity = 512;
    // What the matmuls multiply in. kBFloat16: weights held in bf16, activations converted at each matmul
    // (Q, K and V once per batch), f32 accumulation, masks and softmax in f32. Where oneDNN has no bf16 matmul
    // (OnednnBf16Support() == kUnavailable) the layer computes in f32: compute() says which it does.
    ComputeType compute = ComputeType::kFloat32;
  };

  // InvalidArgument for a bad config or weights that do not match it. The weights are taken by value and
  // freed as the layer's ops take them: move them in to build without a copy.
  static absl::StatusOr<std::unique_ptr<MultiheadAttention>> Create(const Options& options, MhaWeights weights);
  ~MultiheadAttention();

  const MhaConfig& config() const { return options_.config; }
  const Options& options() const { return options_; }
  // The compute type in effect (Options::compute unless this CPU has no bf16 matmul).
  ComputeType compute() const { return compute_; }

  // Validation alone (what Forward checks first), for callers that reject bad requests before queueing.
  absl::StatusOr<ParsedAttention> Validate(const AttentionInputs& inputs) const;

  // Bytes of attention scores the engine holds at once for this request: one block (a few whole sequences of
  // a short request, a slice of query rows of a long one; at most Options::scores_block_bytes unless
  // min_block_rows rows of one head need more), or one per thread (omp_get_max_threads() of the caller) for
  // a small request cut into units that run side by side or a request on the flash path. What a memory
  // budget must count for it.
  int64_t ScoresBlockBytes(const ParsedAttention& parsed) const;
  // What a request's batch holds besides the f32 inputs, projections and scores a memory budget counts for
  // it: the bf16 copies of a bf16 layer (inputs, Q/K/V, one scores block, the context); 0 in f32.
  int64_t Bf16ScratchBytes(const ParsedAttention& parsed) const;

  // The thread budget of one engine call: `max_threads` is the OpenMP team size the call may use (the
  // caller's share of the CPUs, >= 1); 0 takes omp_get_max_threads() of the calling thread (for tests and
  // benchmarks; the server always passes its budget). A batch below Options::single_thread_below_flops
  // runs on the calling thread alone whatever the budget.
  absl::StatusOr<AttentionOutputs> Forward(const AttentionInputs& inputs, int max_threads = 0) const;

  // Runs independent requests as one ragged batch, without padding. Result i answers requests[i]: its
  // outputs, or its own validation error; a bad request does not affect the others. Equal to calling
  // Forward on each request alone.
  std::vector<absl::StatusOr<AttentionOutputs>> ForwardBatch(absl::Span<const AttentionInputs* const> requests,
                                                             int max_threads = 0) const;

  // The same for requests already validated by this layer's Validate (the server validates once, when a
  // request arrives): nothing is parsed or counted again. Each ParsedAttention and the inputs it points to
  // must stay valid for the call. `stop` (may be empty) lets a request be abandoned between query blocks.
  std::vector<absl::StatusOr<AttentionOutputs>> ForwardParsed(absl::Span<const ParsedAttention* const> requests,
                                                              int max_threads, const StopFn& stop = nullptr) const;

  // Appends of sessions (any mix, each with its own cache; no two on one cache) as one batch: one projection
  // matmul over the new tokens of all of them, then attention per append over its cache blocks, read in
  // place. Result i answers appends[i]: output [T, E] and the weights it asked for. Equal to a causal
  // Forward over the whole sequence, restricted to the new rows.
  std::vector<absl::StatusOr<AttentionOutputs>> ForwardAppends(absl::Span<const CachedAppend* const> appends,
                                                               int max_threads = 0) const override;
  // A cross-attention session's memory [S, kdim] (kdim == vdim) projected to keys and values, appended to
  // `cache` (width E), on at most `max_threads` OpenMP threads (0: the caller's default). A memory projected
  // in parts, in order, gives the cache the rows projected whole would, up to float rounding.
  absl::Status ProjectMemory(const float* memory, int64_t tokens, KvSequence* cache, int max_threads = 0) const;
  // Bytes of scores ForwardAppends holds at once for an append of `tokens` over `context` cached tokens (its
  // query blocks are planned within Options::scores_block_bytes, as Forward's are).
  int64_t AppendScoresBytes(int64_t tokens, int64_t context) const;

  // AppendEngine.
  int64_t embed_dim() const override { return options_.config.embed_dim; }
  int64_t attention_heads() const override { return options_.config.num_heads; }
  int64_t cache_width() const override { return options_.config.embed_dim; }
  bool supports_cross_attention() const override { return true; }
  const AttentionLimits& limits() const override { return options_.limits; }
  int64_t AppendFlops(int64_t tokens, int64_t context_after, bool cross_attention) const override {
    return CachedAppendFlops(options_.config.embed_dim, tokens, context_after, cross_attention);
  }
  // The new rows' inputs, projections and output, and one query block's scores; for a bf16 layer also the
  // bf16 copies each matmul makes of its inputs (rows, a scores block, a span of cached keys or values).
  int64_t AppendWorkspaceBytes(int64_t tokens, int64_t context_after) const override {
    const int64_t e = options_.config.embed_dim, scores = AppendScoresBytes(tokens, context_after);
    const int64_t f32 = int64_t{4} * tokens * 5 * e + scores;
    if (compute_ != ComputeType::kBFloat16) return f32;
    return f32 + int64_t{2} * tokens * 2 * e + scores / 2 + options_.cache_span_bytes / 2 + int64_t{2} * tokens * e;
  }

  // The bytes of projection weights the layer holds: 4 E^2 floats (or bf16 values) for self-attention.
  int64_t weight_bytes() const;

  // impl_info_str() of every oneDNN primitive this layer has built (for every OpenMP team size it ran
  // with), e.g. "gemm:jit".
  std::vector<std::string> ImplementationsUsed() const;
  // Whether this (bf16) layer's FlashAttention runs its whole blocks on brgemm kernels (Bf16BlockMatmul), and how many
  // (scores and context) it has run there so far.
  bool flash_blocks_on_brgemm() const { return block_scores_ != nullptr; }
  int64_t flash_brgemm_block_matmuls() const;
  // Whether this (bf16) layer runs short requests through ShortAttention, and how many sequences (or head
  // groups of one) it has run there so far.
  bool short_attention_on_brgemm() const { return short_attention_ != nullptr; }
  const ShortAttention* short_attention() const { return short_attention_.get(); }  // null: not on brgemm
  int64_t short_attention_runs() const { return short_attention_ == nullptr ? 0 : short_attention_->executions(); }
  // Chunks of sequences taken projection to output projection by one thread (RunShortFused) so far, including
  // those that failed or stopped.
  int64_t fused_short_chunks() const { return fused_short_chunks_.load(std::memory_order_relaxed); }

 private:
  struct Group;
  struct Projected;
  struct Block;
  MultiheadAttention(const Options& options) : options_(options), softmax_(options.softmax_cache_capacity) {}
  absl::Status BuildPrimitives(MhaWeights weights);
  // The Q, K, V (and fused) and output projections from f32 weights or a bf16 checkpoint's (MhaWeights::bf16),
  // with 1/sqrt(Dh) (`scale`) folded into Wq; `qkv_bias` are Q's (scaled), K's and V's biases (empty: none).
  absl::Status BuildProjections(MhaWeights& weights, float scale,
                                const std::array<const std::vector<float>*, 3>& qkv_bias);
  absl::Status BuildProjectionsFromBf16(MhaWeights& weights, float scale,
                                        const std::array<const std::vector<float>*, 3>& qkv_bias);
  // block_scores_ and block_context_ for the resolved flash blocks, and short_attention_, where bf16 has brgemm
  // kernels for them.
  absl::Status BuildBlockMatmuls();
  // The stages of one group (self- or cross-attention members of a batch): projections, attention per
  // request on `threads` OpenMP threads, output projection.
  // A projection error fails the group; Attend's errors (and stops) fail their own member, in *member_status.
  absl::Status RunGroup(const Group& group, int threads, const StopFn& stop,
                        std::vector<absl::Status>* member_status) const;
  absl::StatusOr<Projected> Project(const Group& group) const;
  std::vector<absl::Status> AttendGroup(const Group& group, const Projected& proj, int threads,
                                        const StopFn& stop) const;
  absl::Status ProjectOutput(const Group& group, const Projected& proj) const;
  bool UsesFlash(const ParsedAttention& p) const;
  bool UsesShort(const ParsedAttention& p) const;
  bool AllShort(const Group& group) const;
  // A self-attention group whose members all take ShortAttention, on a QKV projection on brgemm kernels: Q, K and V
  // projected straight to bf16 (no f32 rows, no conversion pass); Unimplemented where that does not apply.
  absl::StatusOr<Projected> ProjectShortToBf16(const Group& group) const;
  // Its buffers (Q, K and V in bf16, the f32 room of the fallback, the bf16 context), not yet written.
  absl::StatusOr<Projected> ProjectShortToBf16Buffers(const Group& group) const;
  // Such a group on a team of threads, its sequences cut into chunks of about kFusedChunkRows rows, each
  // projected, attended and projected out by one thread in turn (ShortChunks): a chunk's Q, K and V are read back
  // from that thread's cache, not from memory after the whole group's projection, and the team waits once, not
  // after each stage. Unimplemented (nothing done) where the group does not qualify.
  absl::StatusOr<std::vector<absl::Status>> RunShortFused(const Group& group, int threads, const StopFn& stop) const;
  // The sizes and blocks of p's FlashAttention (no operands).
  FlashAttentionArgs FlashShape(const ParsedAttention& p) const;
  // Attention of a whole request through FlashAttention on `threads` threads.
  absl::Status AttendFlash(const ParsedAttention& p, const Projected& proj, int64_t q_row, int64_t kv_row,
                           int threads, absl::FunctionRef<absl::Status()> should_stop) const;
  // bf16 layers: Q, K and V copied to bf16 (the attention matmuls' inputs, MirrorBf16); nothing in f32. When
  // every member takes ShortAttention, which makes its own copies from the f32 rows, no mirror but a bf16 context
  // buffer (Projected::context16, also ProjectShortToBf16's).
  void PrepareBf16(const Group& group, int64_t q_rows, int64_t kv_rows, Projected* proj) const;
  void MirrorBf16(int64_t q_rows, int64_t kv_rows, Projected* proj) const;
  // Attention of sequences [seq_begin, seq_end), heads [h_begin, h_end) of one request whose first query row is
  // `q_row` and first key/value row `kv_row` of the projections.
  absl::Status Attend(const ParsedAttention& p, int64_t seq_begin, int64_t seq_end, int64_t h_begin, int64_t h_end,
                      const Projected& proj, int64_t q_row, int64_t kv_row, Tensor* weights,
                      absl::FunctionRef<absl::Status()> should_stop) const;
  // The same through ShortAttention (no weights); sequences whose shape has no brgemm kernel go through Attend.
  absl::Status AttendShort(const ParsedAttention& p, int64_t seq_begin, int64_t seq_end, int64_t h_begin,
                           int64_t h_end, const Projected& proj, int64_t q_row, int64_t kv_row,
                           absl::FunctionRef<absl::Status()> should_stop) const;
  // The parts of one Attend block: additive masks over the block's scores (returns the rows with every key
  // masked, [nb, hb, lb], or null when unmasked), and the weights it adds to `weights`. Row i of head hi of
  // sequence sb at scores[((sb * hb + hi) * head_rows + i) * ld]: MaskBlock(p, blk, scores) is a dense block
  // (ld = cols, head_rows = lb).
  const uint8_t* MaskBlock(const ParsedAttention& p, const Block& blk, float* scores) const;
  const uint8_t* MaskBlock(const ParsedAttention& p, const Block& blk, float* scores, int64_t ld,
                           int64_t head_rows) const;
  void AddBlockWeights(const ParsedAttention& p, const Block& blk, const float* probs, Tensor* weights) const;
  // ForwardAppends for appends of one kind (self- or cross-attention): projections, the cache appends,
  // attention per append, output projection; a status per member.
  std::vector<absl::Status> RunAppends(const std::vector<const CachedAppend*>& members,
                                       const std::vector<AttentionOutputs*>& outs, int threads) const;
  // The attention of one append: its new rows' Q (then the context, written over it) at `q`, row stride ldq,
  // in query blocks of AppendScoresBytes.
  absl::Status AttendCached(const CachedAppend& a, float* q, int64_t ldq, Tensor* weights) const;
  absl::Status AttendCachedRows(const CachedAppend& a, int64_t l0, int64_t lb, float* q, int64_t ldq,
                                float* scores, Tensor* weights) const;
  void AddAppendWeights(const CachedAppend& a, int64_t l0, int64_t lb, int64_t cols, const float* probs,
                        Tensor* weights) const;

  Options options_;
  ComputeType compute_ = ComputeType::kFloat32;
  std::unique_ptr<LinearOp> qkv_proj_;  // fused [3E, E], only when kdim == vdim == E
  std::unique_ptr<LinearOp> q_proj_, k_proj_, v_proj_, out_proj_;
  std::unique_ptr<HeadMatmulOp> scores_op_, context_op_, context_add_op_;
  // bf16 layers on brgemm kernels: FlashAttention's whole blocks (FlashBf16::block_scores, block_context); else null.
  std::unique_ptr<Bf16BlockMatmul> block_scores_, block_context_;
  // bf16 layers on brgemm kernels: short requests' attention (Options::short_attention_max_len); else null.
  std::unique_ptr<ShortAttention> short_attention_;
  mutable std::atomic<int64_t> fused_short_chunks_{0};
  SoftmaxCache softmax_;
};

}  // namespace attnserve
