// Attention of short sequences on brgemm kernels, for bf16 layers: heads [h0, h0 + hb) of nb sequences at a time,
// through two batched bf16 matmuls of fixed sizes (oneDNN 2.6 gives its brgemm kernels to nothing else; the
// runtime-size head matmuls run `gemm:jit` at 13-300 GFLOP/s on such shapes, BENCHMARKS.md):
//   scores  [nb * hb, Lp, Sp] = Q [nb * hb, Lp, Dh] . K^T (K [nb * hb, Sp, Dh]),
//   context [nb * hb, Lp, Dh] = P [nb * hb, Lp, Sp] . V [nb * hb, Sp, Dh],
// on dense bf16 copies made from the projections (f32, or bf16 as they are). L and S are padded to Lp and Sp, multiples
// of 16, which bounds the shapes to (max_len / 16)^2 per count of heads in a call and avoids oneDNN's ragged blockings
// (a 61-row block ran 3.7x slower than a 64-row one). Padded key rows of V and padded columns of P are zeroed, so
// padding adds nothing to the context; padded query rows are computed and dropped. Several sequences go in one call
// when they are short (SequencesPerCall): a 4 x 16 x 16 x 64 matmul costs its overhead, not its arithmetic (1.2-1.7 us
// for 0.5 MFLOP).
//
// The scale (1/sqrt(Dh)) must already be in Q. Masks come through a callback over the scores, which also names
// the rows whose keys are all masked: their context is zero, as in the blocked path and FlashAttention.
//
// Thread-safety: Run may be called from many threads at once; each thread keeps its own buffers (ScratchBytes).
// The matmuls of a shape are built on first use, outside the cache's mutex, and kept for at most
// Options::shape_capacity shapes, least recently used first out.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/flash_attention.h"
#include "core/lru_cache.h"
#include "core/onednn_ops.h"

namespace attnserve {

// Frees the calling thread's ShortAttention buffers when they hold more than `keep_bytes` (ReleaseThreadScratch).
void ReleaseShortAttentionBuffers(size_t keep_bytes);

class ShortAttention {
 public:
  struct Options {
    int64_t head_dim = 0;         // Dh, a multiple of 16 (brgemm blocks)
    int64_t max_len = 256;        // longest query and key lengths served (tokens; Serves)
    size_t shape_capacity = 64;   // (nb * hb, Lp, Sp) shapes whose matmuls are kept
  };
  // Unimplemented where oneDNN has no brgemm kernels here or Dh is not a multiple of 16 (callers keep the blocked
  // path); InvalidArgument for options out of range.
  static absl::StatusOr<std::unique_ptr<ShortAttention>> Create(const Options& options);

  // Most sequences one Run call takes. 8 sequences of 4 heads of 16 x 16 x 64: 18.4 us of matmuls in one call
  // against 23.2 us in 8 (ONEDNN_VERBOSE): oneDNN's cost is per head matrix more than per call.
  static constexpr int64_t kMaxSequencesPerCall = 8;

  bool Serves(int64_t q_len, int64_t kv_len) const {
    return q_len >= 1 && kv_len >= 1 && q_len <= options_.max_len && kv_len <= options_.max_len;
  }

  struct Args {
    int64_t q_len = 0, kv_len = 0;
    FlashOperand q, k, v;  // f32 projections: element (b, h, i, d) at data[b * seq_stride + i * ld + h * Dh + d]
    // Or the projections in bf16, laid out the same, read instead when q16.data is set (no conversion pass); then
    // k16 and v16 must be set too.
    struct Bf16Operand {
      const uint16_t* data = nullptr;
      int64_t ld = 0, seq_stride = 0;
    };
    Bf16Operand q16, k16, v16;
    // The context [B, L, H * Dh] (f32), as FlashAttentionArgs::out: may be Q's own rows, which are read first.
    // Or, when out16 is set, in bf16 there instead (rounded to nearest even): the output projection's input.
    float* out = nullptr;
    uint16_t* out16 = nullptr;
    int64_t out_ld = 0, out_seq_stride = 0;
  };
  // Adds sequence b's masks (causal included) to the scores of heads [h0, h0 + hb): row i of head hi at
  // scores[(hi * head_rows + i) * ld], keys [0, kv_len). Returns the rows whose keys are all masked, [hb, q_len]
  // (non-zero: all masked), or null when none is.
  using MaskFn = absl::FunctionRef<const uint8_t*(int64_t b, int64_t h0, int64_t hb, float* scores, int64_t ld,
                                                  int64_t head_rows)>;

  // Sequences [b0, b0 + nb), heads [h0, h0 + hb), on the calling thread (its OpenMP team inside oneDNN when called
  // outside a parallel region); nb in [1, kMaxSequencesPerCall]. `mask` null: no mask. ResourceExhausted when its
  // buffers cannot be allocated; Unimplemented when oneDNN has no brgemm kernel for the shape (nothing was written
  // then); InvalidArgument for nb out of range.
  absl::Status Run(const Args& args, int64_t b0, int64_t nb, int64_t h0, int64_t hb, const MaskFn* mask) const;

  // How many of `available` sequences (>= 1) of these lengths the next Run call should take: a power of two, at
  // most kMaxSequencesPerCall, whose buffers stay within kCallBytes (one sequence whatever its size).
  int64_t SequencesPerCall(int64_t hb, int64_t q_len, int64_t kv_len, int64_t available) const;

  // The buffers one thread holds for hb heads of these lengths, in bytes: what a memory budget counts (the calls
  // of SequencesPerCall sequences included).
  int64_t ScratchBytes(int64_t hb, int64_t q_len, int64_t kv_len) const;
  // Sequences run so far (every thread's): what shows a layer's requests took this path.
  int64_t executions() const { return executions_.load(std::memory_order_relaxed); }
  size_t cached_shapes() const;
  std::vector<std::string> Impls() const;
  // Tests: shapes built from now on have no kernel (Run is Unimplemented, as where oneDNN has none), so that the
  // callers' fallback runs on a machine where every shape has one. Shapes already built keep theirs.
  void DenyKernelsForTesting() const { deny_kernels_for_testing_.store(true, std::memory_order_relaxed); }

 private:
  struct Shape;
  using Key = std::tuple<int64_t, int64_t, int64_t>;  // nb * hb, Lp, Sp
  // Buffers of one call with several sequences stay within this (a quarter of a 2 MiB L2, half of a 1 MiB one).
  static constexpr int64_t kCallBytes = int64_t{512} << 10;
  int64_t SequenceBytes(int64_t hb, int64_t q_len, int64_t kv_len) const;
  explicit ShortAttention(const Options& options) : options_(options), shapes_(options.shape_capacity) {}
  absl::StatusOr<std::shared_ptr<const Shape>> GetShape(int64_t heads, int64_t lp, int64_t sp) const;

  const Options options_;
  mutable std::atomic<int64_t> executions_{0};
  mutable std::atomic<bool> deny_kernels_for_testing_{false};
  mutable LruCache<Key, Shape> shapes_;
  mutable absl::Mutex impls_mu_;
  mutable std::vector<std::string> impls_seen_ ABSL_GUARDED_BY(impls_mu_);
};

}  // namespace attnserve
