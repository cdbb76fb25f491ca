// One decoder attention layer (Llama, Mistral, Qwen2, Gemma, Phi) in Hugging Face's formulas, eval mode:
//   q = x Wq^T (+bq) as [B, L, H, D]; k, v = x Wk^T (+bk), x Wv^T (+bv) as [B, L, Hkv, D];
//   RoPE on q and k at each token's position; head h reads kv head h / (H / Hkv) (K and V are not repeated);
//   scores = scale * q k^T, soft-capped (c * tanh(scores / c)), then causal, sliding-window and padding
//   masks; output = concat(softmax(scores) v) Wo^T (+bo): [B, L, E].
// As MultiheadAttention does, a query row whose keys are all masked (a padding token with only padding before
// it) gets a zero attention output (output = o_proj.bias there), not NaN.
//
// Compute, on oneDNN: one fused [H*D + 2*Hkv*D, E] projection matmul over every token; RoPE in place; then
// per (sequence, query block) and kv head, the r = H / Hkv query heads of the group stacked into one
// [r * rows, D] matrix (scaled as it is copied) for a single scores matmul against that kv head's keys, read
// in place; only the keys the block can see (causal, window) are computed. The context goes back over the
// block's q columns, which the output projection reads. Long requests (Options::flash_min_keys) take
// FlashAttention instead (core/flash_attention.h): per (sequence, query head, query block) the key blocks in turn
// with an online softmax, the scores of a few query rows at a time kept in the L1 cache on its strip kernels, each
// kv head's keys and values packed once per thread for the query heads of its group, the keys outside a sliding
// window skipped by whole panels, soft caps applied block by block.
//
// Thread-safety: immutable after Create(); Forward may run on many threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "core/append_engine.h"
#include "core/attention_inputs.h"
#include "core/decoder_config.h"
#include "core/decoder_inputs.h"
#include "core/decoder_weights.h"
#include "core/flash_attention.h"
#include "core/onednn_ops.h"
#include "core/rope.h"
#include "core/tensor.h"

namespace attnserve {

// Frees the calling thread's decoder scratch (projection buffer, block scratch) larger than `keep_bytes`: for a
// worker about to idle, as ReleaseThreadScratch does for the multi-head attention engine's.
void ReleaseDecoderScratch(size_t keep_bytes = size_t{1} << 20);
// What the calling thread's decoder buffers hold now (projection buffer, block scratch, FlashAttention's scratch), in
// bytes: the per-thread part of what WorkspaceBytes counts.
int64_t DecoderScratchHeldBytes();

class DecoderAttention : public AppendEngine {
 public:
  struct Options {
    DecoderConfig config;
    AttentionLimits limits;
    // Scores of one kv head's query group for one query block, at most (rows are cut to fit, down to
    // min_block_rows).
    int64_t scores_block_bytes = int64_t{4} << 20;
    int64_t min_block_rows = 16;
    // A request with fewer FLOPs than this runs on the calling thread alone (see MultiheadAttention).
    int64_t single_thread_below_flops = int64_t{64} << 20;
    // Sessions' appends: cached keys or values copied together for one matmul (at least one token; tests
    // set it small to cross many spans).
    int64_t cache_span_bytes = int64_t{1} << 20;
    // What the matmuls multiply in (see MultiheadAttention::Options::compute): bf16 weights, activations
    // converted at each matmul, f32 accumulation, RoPE, masks and softmax in f32.
    ComputeType compute = ComputeType::kFloat32;
    // Requests of at least this many tokens take FlashAttention when they ask for no weights (sliding windows and
    // soft caps included). 0 disables.
    // Measured (BENCHMARKS.md, BM_DecoderFlash): FlashAttention was faster from 256 tokens up in f32 and bf16, on
    // the AVX-512 strips and on AVX2's sgemm blocks; about even with the blocked path at 128 tokens.
    int64_t flash_min_keys = 256;
    // FlashAttention's blocks: query rows x keys per thread at a time. 0: FlashBlockForCpu(compute).
    int64_t flash_query_rows = 0;
    int64_t flash_key_cols = 0;
    // false: FlashAttention's blocks on sgemm or the bf16 matmuls, never its strip kernels (tests, benchmarks).
    bool flash_strips = true;
  };

  // InvalidArgument for a bad config or weights that do not match it.
  // `weights` (f32, or bf16 as LoadDecoderWeights gives a bf16 layer) are consumed: each matrix is freed as soon
  // as its op holds its own copy.
  static absl::StatusOr<std::unique_ptr<DecoderAttention>> Create(const Options& options, DecoderWeights weights);
  ~DecoderAttention();

  const DecoderConfig& config() const { return options_.config; }
  // As given, with the flash blocks resolved.
  const Options& options() const { return options_; }
  // The compute type in effect (Options::compute unless this CPU has no bf16 matmul).
  ComputeType compute() const { return compute_; }

  // InvalidArgument naming the field with expected and actual ("query: expected last dim 64 (E), got 32");
  // the limits' errors as MultiheadAttention's.
  absl::StatusOr<ParsedDecoder> Validate(const DecoderInputs& inputs) const;
  // Bytes of scratch one request holds while it runs: its q/k/v projections and one block's scores per
  // thread (omp_get_max_threads() of the caller). What a memory budget must count for it besides the answer.
  int64_t WorkspaceBytes(const ParsedDecoder& parsed) const;

  // `max_threads`: the OpenMP team size the call may use; 0 takes omp_get_max_threads().
  absl::StatusOr<AttentionOutputs> Forward(const DecoderInputs& inputs, int max_threads = 0) const;
  absl::StatusOr<AttentionOutputs> ForwardParsed(const ParsedDecoder& parsed, int max_threads) const;
  // Requests validated by this layer's Validate as one ragged batch: one projection matmul over every token
  // of all of them, their query blocks on the threads together, one output projection. Result i answers
  // requests[i], equal to ForwardParsed of it alone. `stop` (may be empty) is asked before each query block.
  std::vector<absl::StatusOr<AttentionOutputs>> ForwardBatch(absl::Span<const ParsedDecoder* const> requests,
                                                             int max_threads, const StopFn& stop = nullptr) const;

  // AppendEngine: session appends over a cache of Hkv * D floats of keys (and of values) per token, after
  // RoPE, at positions continuing the session's (a cache of n tokens places the next token at n). Decoder
  // sessions are self-attention only.
  int64_t embed_dim() const override { return options_.config.embed_dim; }
  int64_t attention_heads() const override { return options_.config.num_heads; }
  int64_t cache_width() const override { return options_.config.kv_width(); }
  int64_t sliding_window() const override { return options_.config.sliding_window; }
  const AttentionLimits& limits() const override { return options_.limits; }
  int64_t AppendFlops(int64_t tokens, int64_t context_after, bool cross_attention) const override;
  int64_t AppendWorkspaceBytes(int64_t tokens, int64_t context_after) const override;
  std::vector<absl::StatusOr<AttentionOutputs>> ForwardAppends(absl::Span<const CachedAppend* const> appends,
                                                               int max_threads = 0) const override;

  // The bytes of projection weights the layer holds: its fused qkv and output projections, f32 or bf16.
  int64_t weight_bytes() const;
  // impl_info_str() of every oneDNN primitive this layer has built.
  std::vector<std::string> ImplementationsUsed() const;

 private:
  struct Block;
  DecoderAttention(const Options& options, Rope rope) : options_(options), rope_(std::move(rope)) {}
  // qkv_proj_ and o_proj_ in compute_, from weights checked against the config.
  absl::Status BuildProjections(DecoderWeights weights);
  int64_t BlockRows(const ParsedDecoder& p, int threads) const;
  // RoPE on p's q and k columns of qkv; for a request on FlashAttention (`flash` set) also the score scale on its
  // q columns, and for a bf16 layer the rows' bf16 copy into flash->rows16 ([tokens, width]).
  struct FlashRows {
    float q_scale = 1.0f;
    uint16_t* rows16 = nullptr;
  };
  void ApplyRope(const ParsedDecoder& p, float* qkv, int threads, const FlashRows* flash = nullptr) const;
  // Whether p's attention runs on FlashAttention, and its sizes and blocks there (no operands).
  bool UsesFlash(const ParsedDecoder& p) const;
  FlashAttentionArgs FlashShape(const ParsedDecoder& p) const;
  // RoPE and the attention of each request, those on FlashAttention one after another on `threads` threads, then
  // the others' query blocks together; an error (or stop) fails its request in *results.
  void Attend(absl::Span<const ParsedDecoder* const> requests, const std::vector<int64_t>& first_row, float* qkv,
              int threads, const StopFn& stop, std::vector<absl::StatusOr<AttentionOutputs>>* results) const;
  // A whole request on FlashAttention: qkv is its first row (RoPE applied here); the context over its q columns.
  absl::Status AttendFlash(const ParsedDecoder& p, float* qkv, int threads,
                           absl::FunctionRef<absl::Status()> should_stop) const;
  // qkv [tokens, q_width + 2 kv_width] = the batch's queries (f32, bf16 or f16 rows, gathered and converted
  // as the projection multiplies, core/activation_rows.h) through qkv_proj_.
  absl::Status ProjectQueries(absl::Span<const ParsedDecoder* const> requests, int64_t tokens, float* qkv) const;
  // The batch's outputs (zeros, weights when asked) and each request's first row in the projection.
  std::vector<absl::StatusOr<AttentionOutputs>> MakeOutputs(absl::Span<const ParsedDecoder* const> requests,
                                                            std::vector<int64_t>* first_row) const;
  // The query blocks of every request, each request's rows cut by BlockRows.
  std::vector<Block> PlanBlocks(absl::Span<const ParsedDecoder* const> requests, int threads) const;
  // Each block on the threads; a block's error (or stop) fails its request.
  void AttendBlocks(absl::Span<const ParsedDecoder* const> requests, const std::vector<Block>& blocks,
                    const std::vector<int64_t>& first_row, float* qkv, int threads, const StopFn& stop,
                    std::vector<absl::StatusOr<AttentionOutputs>>* results) const;
  absl::Status AttendBlock(const ParsedDecoder& p, const Block& blk, float* qkv, Tensor* weights) const;
  absl::Status AttendGroup(const ParsedDecoder& p, const Block& blk, int64_t g, float* qkv, Tensor* weights) const;
  // Session appends (decoder_cached_attention.cc): query rows per block of an append over `context_after`
  // keys, and one block's attention over the cache, its context written over its q columns.
  struct CachedBlock;
  int64_t AppendBlockRows(int64_t tokens, int64_t context_after) const;
  absl::Status CheckAppend(const CachedAppend& a) const;
  // Checks each append and makes its outputs: first_row[m] its first row in the batch's projection (stays -1
  // when refused, its result the error). Returns the rows; adds their FLOPs to *flops.
  int64_t PrepareAppends(absl::Span<const CachedAppend* const> appends,
                         std::vector<absl::StatusOr<AttentionOutputs>>* results, std::vector<int64_t>* first_row,
                         int64_t* flops) const;
  // Appends the new keys and values (after RoPE) to their caches and plans the query blocks.
  std::vector<CachedBlock> CacheAppends(absl::Span<const CachedAppend* const> appends,
                                        const std::vector<int64_t>& first_row, const float* qkv,
                                        std::vector<absl::StatusOr<AttentionOutputs>>* results) const;
  void RopeAppends(absl::Span<const CachedAppend* const> appends, const std::vector<int64_t>& first_row, float* qkv,
                   int threads) const;
  absl::Status AttendCachedBlock(const CachedBlock& blk, float* qkv) const;
  void AddBlockWeights(const ParsedDecoder& p, const Block& blk, int64_t g, const float* probs,
                       Tensor* weights) const;

  Options options_;
  ComputeType compute_ = ComputeType::kFloat32;
  Rope rope_;
  std::unique_ptr<LinearOp> qkv_proj_, o_proj_;
  std::unique_ptr<HeadMatmulOp> scores_op_, context_op_, context_add_op_;
  // A bf16 layer's FlashAttention whole blocks on brgemm kernels where oneDNN has them (else null).
  FlashBlockMatmuls flash_blocks_;
};

}  // namespace attnserve
