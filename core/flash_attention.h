// Attention for long sequences with the scores kept in cache (flash-style): softmax(Q K^T [+ causal]) V
// computed per (sequence, head, query block), the key blocks in turn, with an online softmax (a running
// max and sum per row, the context rescaled as the max grows), so that no scores block larger than
// query_rows x key_cols ever exists. Causal key blocks past a query block's last row (and, under a sliding window,
// before its first row's window) are not computed, and on
// sgemm the diagonal block, which its rows see only in part, is taken in quarters of the rows, each over the keys
// its last row sees.
// In f32 on AVX-512 (head_dim <= 128) the blocks run on the project's strip kernels (core/flash_strips_avx512.h):
// each thread packs the keys of the head it works on as panels and copies its values dense once, then takes a
// query block in strips of 6 rows per key chunk (key_cols rounded up to 16), whose scores stay in the L1 cache
// from the matmul through the softmax step to the context. A causal strip stops at its last row's last key. bf16
// layers on AVX512_BF16 without AMX take the same strips on bf16 kernels (core/flash_strips_bf16.h): keys and
// values packed in pairs from the layer's bf16 rows, products in bf16, the softmax in f32, each strip's
// probabilities rounded to bf16 for its context.
// Elsewhere each f32 thread copies the head's keys and values into dense [S, Dh] buffers (rows of the
// projections are 3E floats apart) for oneDNN's sgemm (Sgemm: a primitive's per-call cost is a tenth of a
// block's time); so does a bf16 layer with block matmuls on brgemm kernels (in bf16), which also copies each
// query block dense; their softmax is the project's OnlineSoftmaxBlock. bf16 layers pass their bf16 copies of
// Q, K and V and their bf16 matmul primitives (`bf16`): the block matmuls then multiply in bf16 (oneDNN 2.6 has
// no bf16 gemm function), the softmax stays f32 and each block's probabilities are rounded to bf16 for the
// context matmul.
//
// The scale (1/sqrt(Dh)) must already be in Q. Other masks come in as `key_bias` (key padding) and through `add_mask`
// (attn_mask), block by block. No attention weights: callers send those requests through the blocked path that
// materialises whole score rows. A query row whose keys are all masked gets a zero context.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/onednn_ops.h"

namespace attnserve {

// Rows of one projection: element (b, h, i, d) at data[b * seq_stride + i * ld + h * head_dim + d]; for k and v,
// h is the kv head (FlashAttentionArgs::kv_heads).
struct FlashOperand {
  const float* data = nullptr;
  int64_t ld = 0, seq_stride = 0;
};

// A bf16 layer's operands: its bf16 copies of the projections (same layout as FlashOperand, row stride `ld`),
// and its bf16 matmuls, kScores and kContextAdd, created for the layer's head_dim (not owned).
struct FlashBf16 {
  const uint16_t *q = nullptr, *k = nullptr, *v = nullptr;
  int64_t ld = 0, q_seq_stride = 0, kv_seq_stride = 0;
  const HeadMatmulOp* scores_op = nullptr;
  const HeadMatmulOp* context_add_op = nullptr;
  // Optional, both or neither (where bf16 has brgemm kernels): whole blocks on those, from dense bf16 copies of
  // a query block and of the head's keys and values. block_scores: [query_rows, key_cols] = Q [query_rows, Dh] . K^T
  // (K rows [key_cols, Dh]); block_context: [query_rows, Dh] += P [query_rows, key_cols] . V [key_cols, Dh].
  const Bf16BlockMatmul* block_scores = nullptr;
  const Bf16BlockMatmul* block_context = nullptr;
};

struct FlashAttentionArgs {
  int64_t batch = 0, heads = 0, q_len = 0, kv_len = 0, head_dim = 0;
  // Grouped-query attention: K and V have kv_heads heads, query head h reads kv head h / (heads / kv_heads), and a
  // thread packs a group's keys once for its query heads in turn. 0: as many as the query heads. Must divide heads.
  int64_t kv_heads = 0;
  bool causal = false;  // query i sees keys j <= i
  // A sliding window (with causal only): query i sees keys (i - window, i]; key blocks a query block's rows no
  // longer see are not computed. 0: none.
  int64_t window = 0;
  // Optional [B, S] (row stride kv_len): added to every query's score of key j of sequence b (0 open, -inf
  // masked: a key padding mask), after add_mask (so a mask that transforms scores, a soft cap, leaves masked keys
  // -inf). A key block masked whole is skipped, matmuls included; one with no masked key costs nothing more.
  const float* key_bias = nullptr;
  // When set: applies per-query masks of sequence b, head h to a scores block, rows = queries [l0, l0 + rows),
  // columns = keys [k0, k0 + cols), row stride ld (adds them, -inf where a key is masked; or transforms the scores,
  // as a soft cap does), before key_bias is added. Called from several threads at once.
  std::function<void(int64_t b, int64_t h, int64_t l0, int64_t rows, int64_t k0, int64_t cols, float* scores,
                     int64_t ld)>
      add_mask;
  FlashOperand q, k, v;
  // Set (scores_op and context_add_op both non-null): the block matmuls multiply these bf16 operands; q, k and
  // v are then not read. One op without the other is InvalidArgument.
  FlashBf16 bf16;
  // The context [B, L, H * Dh] as `out` reads it (f32). It may be Q's own f32 rows: a block's context is
  // written once its Q block is no longer read.
  float* out = nullptr;
  int64_t out_ld = 0, out_seq_stride = 0;
  // Blocks on the strip kernels where FlashOnStrips; false: on sgemm or the bf16 matmuls everywhere (for tests
  // and benchmarks to compare the two on one machine).
  bool strips = true;
  // Block sizes: one thread holds query_rows x key_cols scores (on the strip kernels 6 x key_cols, rounded up to
  // 16) and query_rows x Dh of context at a time.
  // MultiheadAttention passes its resolved Options::flash_query_rows / flash_key_cols (FlashBlockForCpu
  // unless configured); these defaults serve direct callers such as the tests.
  int64_t query_rows = 128, key_cols = 512;
};

// FlashAttention's blocks (query rows, keys) on this CPU: 512 x 512 where oneDNN runs AVX-512 kernels (1 MiB of
// scores per thread), 128 x 256 otherwise (128 KiB), the best of the sizes measured on each; for bf16 layers on
// bf16 brgemm kernels (Bf16BlockMatmul), 256 x 256, where their scores matmul runs fastest (BENCHMARKS.md).
std::pair<int64_t, int64_t> FlashBlockForCpu(ComputeType compute = ComputeType::kFloat32);

// A bf16 layer's whole-block matmuls for FlashBf16::block_scores and block_context, at its blocks (query_rows x
// key_cols) and head_dim, on oneDNN's brgemm kernels; both null where oneDNN has none for these sizes (the blocks then
// stay on the layer's HeadMatmulOps).
struct FlashBlockMatmuls {
  std::unique_ptr<Bf16BlockMatmul> scores, context;
};
absl::StatusOr<FlashBlockMatmuls> CreateFlashBlockMatmuls(int64_t query_rows, int64_t key_cols, int64_t head_dim);

// Whether `a`'s blocks run on the strip kernels here: `strips`, and in f32 FlashStripsAvailable(head_dim); for a bf16
// layer FlashBf16StripsAvailable(head_dim) where oneDNN does not run AMX (there its brgemm blocks stay: a TDPBF16PS
// does 4,096 bf16 pairs against a vdpbf16ps's 16; not measured against the strips).
bool FlashOnStrips(const FlashAttentionArgs& a);
// The same for a bf16 layer of head_dim (with `strips` set).
bool FlashBf16OnStrips(int64_t head_dim);

// The scratch one thread holds, in bytes (its blocks and one head's keys and values, dense or packed): what a
// memory budget counts per OpenMP thread.
int64_t FlashScratchBytes(const FlashAttentionArgs& args);

// What the calling thread's FlashAttention buffers hold now (kept from call to call, grown to the largest), and
// freeing them when that is more than keep_bytes (ReleaseTeamScratch).
int64_t FlashScratchHeldBytes();
void ReleaseFlashScratch(size_t keep_bytes);

// Runs on `threads` OpenMP threads (1: on the caller alone, no parallel region), work items (sequence, head,
// query block) taken in turn, each on the calling thread's strip kernels or single-threaded sgemm calls. `should_stop`
// (thread-safe) is asked before each item; its first error, or a matmul's, is returned (the context is then partly
// written).
absl::Status FlashAttention(const FlashAttentionArgs& args, int threads, absl::FunctionRef<absl::Status()> should_stop);

}  // namespace attnserve
