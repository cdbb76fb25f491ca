// The oneDNN adapter (onednn_ops.cc, onednn_linear_op.cc and their onednn_internal.h): the only code that
// includes dnnl.hpp or sees dnnl::error. Each op is built once (with oneDNN runtime dimensions where a size
// changes from call to call, or per fixed size where only that reaches a kernel) and then executed many times.
//
// oneDNN (OpenMP runtime) fixes a primitive's threading when it is created, so every op builds one
// primitive per OpenMP team size it is executed with (omp_get_max_threads() of the calling thread), on
// first use; the weights are shared between them.
//
// Thread-safety: every op may be executed from many threads at once; each calling thread gets its own
// oneDNN stream and scratchpad (user scratchpad mode), and the per-team-size primitives are built under
// a mutex.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/lru_cache.h"

namespace attnserve {

// The type the matmuls multiply in. kBFloat16 converts both inputs of every matmul to bfloat16 (weights once,
// activations per call) and accumulates and writes in f32; everything else (bias, masks, softmax) stays f32.
enum class ComputeType { kFloat32, kBFloat16 };
const char* ComputeTypeName(ComputeType type);

// Frees the calling thread's oneDNN scratchpad and conversion buffers when they hold more than keep_bytes
// (ReleaseTeamScratch).
void ReleaseOnednnThreadScratch(size_t keep_bytes);

// What this oneDNN build does with bfloat16 matmuls on this CPU (its effective ISA, so ONEDNN_MAX_CPU_ISA
// counts): kNative (AVX512_BF16 or AMX), kEmulated (AVX-512 without BF16: correct, often slower than f32) or
// kUnavailable (oneDNN 2.6 creates no bf16 matmul below AVX-512).
enum class Bf16Support { kNative, kEmulated, kUnavailable };
Bf16Support OnednnBf16Support();

// Whether oneDNN runs its AVX-512 kernels here (effective ISA avx512_core or above, ONEDNN_MAX_CPU_ISA counted).
bool OnednnUsesAvx512();
// Whether oneDNN runs AMX kernels here (effective ISA avx512_core_amx); for Bf16SupportName's label.
bool OnednnUsesAmx();
// Whether oneDNN has its bf16 brgemm kernels here (effective ISA avx512_core_bf16 or above: AVX512_BF16
// instructions or AMX tiles). Fixed-size bf16 matmuls (bf16 linear ops in fixed-rows pieces, Bf16BlockMatmul,
// ShortAttention) are built only then: oneDNN 2.6 gives brgemm nothing of runtime sizes, and its gemm:jit for
// bf16 ran up to 1.4x slower on AVX512_BF16 and 1.3-2.7x slower on AMX (BENCHMARKS.md).
bool OnednnHasBf16Brgemm();
const char* Bf16SupportName(Bf16Support support);

// C[M, N] = A[M, K] . B (B[K, N], or B^T with B given as [N, K] when transpose_b) + beta C, row-major with
// row strides lda, ldb, ldc: oneDNN's sgemm (the gemm behind its f32 matmul primitive) without a primitive's
// per-call cost (memory objects, argument map): 55 us instead of 71 for a 128 x 256 x 64 block, measured.
// For the many small blocks of FlashAttention. Uses the calling thread's OpenMP team (one thread inside a
// parallel region).
absl::Status Sgemm(bool transpose_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                   int64_t ldb, float beta, float* c, int64_t ldc);

// y[M, N] = x[M, K] . W^T (+ b), PyTorch's nn.Linear: W is [N, K] row-major, b is [N]. M and the row strides of x and y
// are given per call, so one op serves any number of tokens. Where bf16 has brgemm kernels, a bf16 op of whole blocks
// (k % 32 == 0, n % 64 == 0) runs on them: its weights in oneDNN's blocked layout and primitives of fixed row counts,
// built on first use; ops over 4 MiB in column panels of 1 MiB when k <= 1024, while larger k stays on the runtime-M
// gemm (see onednn_linear_op.cc).
class LinearOp {
 public:
  // `weight` [n, k] and `bias` [n] (empty: no bias) are copied into oneDNN's preferred layout (in bf16 for
  // ComputeType::kBFloat16, rounded to nearest even; the bias stays f32).
  static absl::StatusOr<std::unique_ptr<LinearOp>> Create(int64_t k, int64_t n, const std::vector<float>& weight,
                                                          const std::vector<float>& bias,
                                                          ComputeType compute = ComputeType::kFloat32);
  // The same from bf16 weights (bit patterns, [n, k]), which a bf16 op takes as they are and an f32 op widens
  // (exactly): a bf16 checkpoint's layer is built without an f32 copy of its weights.
  static absl::StatusOr<std::unique_ptr<LinearOp>> CreateFromBf16(int64_t k, int64_t n,
                                                                  const std::vector<uint16_t>& weight,
                                                                  const std::vector<float>& bias,
                                                                  ComputeType compute = ComputeType::kBFloat16);
  // One op over weight matrices stacked along n (the fused Q/K/V projection): parts[i] [n_i, k] in PyTorch's
  // layout, each reordered straight into its rows of the op's weights (no stacked copy where the op's layout
  // is plain, as oneDNN's gemm-based matmul chooses). bias [sum n_i] or empty.
  static absl::StatusOr<std::unique_ptr<LinearOp>> CreateStacked(int64_t k,
                                                                 const std::vector<const std::vector<float>*>& parts,
                                                                 const std::vector<float>& bias,
                                                                 ComputeType compute = ComputeType::kFloat32);
  // The op of outputs [n_begin, n_begin + n) of `whole` (Q, K or V of the fused projection), reading whole's
  // weights in place: no copy; it keeps them alive, so it may outlive `whole`. bias [n] or empty.
  // Unimplemented when whole's weights are in a blocked layout (no such column block): build the op from its
  // own weights then.
  static absl::StatusOr<std::unique_ptr<LinearOp>> CreateSlice(const LinearOp& whole, int64_t n_begin, int64_t n,
                                                               const std::vector<float>& bias);
  ~LinearOp();
  // x: m rows of k floats, row stride ldx; y: m rows of n floats, row stride ldy. m == 0 is a no-op. A bf16
  // op first converts x into a per-thread buffer (m * k * 2 bytes).
  absl::Status Execute(const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy) const;
  // The same with x already in bf16 (bf16 ops only: FailedPrecondition otherwise).
  absl::Status ExecuteBf16(const uint16_t* x, int64_t m, int64_t ldx, float* y, int64_t ldy) const;
  // The same with y in bf16 too (rounded to nearest even from the f32 sums), for a consumer that reads bf16: half
  // the bytes written and no conversion pass. Ops on brgemm kernels only (writes_bf16(); FailedPrecondition otherwise).
  absl::Status ExecuteBf16ToBf16(const uint16_t* x, int64_t m, int64_t ldx, uint16_t* y, int64_t ldy) const;
  // Whether ExecuteBf16ToBf16 runs: a bf16 op on brgemm kernels (fixed-rows primitives).
  bool writes_bf16() const;
  ComputeType compute() const;
  // The bytes of weights this op holds itself: 0 for a slice, which reads another op's.
  int64_t owned_weight_bytes() const;
  // impl_info_str() of each primitive built so far (one per OpenMP team size used).
  std::vector<std::string> Impls() const;

  struct Impl;

 private:
  explicit LinearOp(std::unique_ptr<Impl> impl);
  // One weight matrix [rows, k] in PyTorch's layout: bf16 bit patterns when bf16, else f32.
  struct WeightPart {
    const void* data;
    int64_t rows;
    bool bf16;
  };
  // The factories' body: the parts stacked along n into the op's weights.
  static absl::StatusOr<std::unique_ptr<LinearOp>> Build(int64_t k, const std::vector<WeightPart>& parts,
                                                         const std::vector<float>& bias, ComputeType compute);
  // CreateSlice of an op on brgemm kernels: whole blocks of 64 outputs only (Unimplemented otherwise).
  static absl::StatusOr<std::unique_ptr<LinearOp>> CreateFixedRowsSlice(const Impl& whole, int64_t n_begin, int64_t n,
                                                                        const std::vector<float>& bias);
  // x in the op's compute type. A bf16 op on brgemm kernels runs x in fixed-size pieces (onednn_linear_op.cc). An f32
  // op of k x n >= 250k (64 rows: 32 MFLOP) called outside a parallel region with a team of threads shares
  // m >= 128 rows out in 64-row pieces dynamically over the team, each piece through the single-thread primitive
  // (RunTeam).
  absl::Status Run(const void* x, int64_t m, int64_t ldx, float* y, int64_t ldy) const;
  // The whole of x through the primitive of the calling thread's team size.
  absl::Status RunTeam(const void* x, int64_t m, int64_t ldx, float* y, int64_t ldy) const;
  std::unique_ptr<Impl> impl_ptr_;
};

// A rank-4 strided view: element (i0, i1, i2, i3) at data[i0*s0 + i1*s1 + i2*s2 + i3*s3], of f32 values, or of
// bf16 values (uint16_t bit patterns) when `bf16`.
struct View4 {
  void* data = nullptr;
  int64_t dims[4] = {0, 0, 0, 0};
  int64_t strides[4] = {0, 0, 0, 0};
  bool bf16 = false;
};

// Batched matmul over [sequences, heads]: C[b, h, M, N] = A[b, h, M, K] . B[b, h, K, N]. The head dim
// (K or N) and the unit inner strides are fixed at creation; everything else, including the other
// strides, comes per call. That is how the head split reads Q, K and V in place inside the projection output
// (row stride 3E, head h at column offset h*Dh) without a transpose copy.
class HeadMatmulOp {
 public:
  enum class Kind {
    kScores,   // A = Q [b,h,M,Dh] (inner stride 1), B = K^T [b,h,Dh,N] (stride 1 along Dh), C dense.
    kContext,  // A = P [b,h,M,K] dense, B = V [b,h,K,Dh] (inner stride 1), C [b,h,M,Dh] (inner stride 1).
    kContextAdd,  // kContext added to what C holds (C += P . V): a context summed over key blocks.
  };
  // kBFloat16: A and B multiply in bf16; C stays f32.
  static absl::StatusOr<std::unique_ptr<HeadMatmulOp>> Create(Kind kind, int64_t head_dim,
                                                              ComputeType compute = ComputeType::kFloat32);
  ~HeadMatmulOp();
  // C must be f32. A and B must be f32 for an f32 op; a bf16 op takes them in bf16 as they are and converts
  // f32 ones into a dense per-thread copy first (the unit-stride axis kept).
  absl::Status Execute(const View4& a, const View4& b, const View4& c) const;
  // impl_info_str() of each primitive built so far (one per OpenMP team size used).
  std::vector<std::string> Impls() const;

 private:
  struct Impl;
  explicit HeadMatmulOp(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_ptr_;
};

// C[M, N] = A[M, K] . B[K, N] (+ C when `accumulate`): bf16 A and B, f32 C, all dense row-major (B given as
// B^T [N, K] when `transpose_b`), with M, N and K fixed at creation; `batch` such products at once, each operand
// [batch, ...] dense. oneDNN 2.6 reaches its brgemm kernels only when every size and stride is fixed: a bf16 layer's
// FlashAttention runs its whole blocks here (scores: a Q block . a K^T block; context: probabilities . a V block),
// and ShortAttention all the heads of a short sequence at once, on dense copies. Create is Unimplemented where
// the kernel would not be brgemm (callers keep HeadMatmulOp then).
class Bf16BlockMatmul {
 public:
  static absl::StatusOr<std::unique_ptr<Bf16BlockMatmul>> Create(int64_t m, int64_t n, int64_t k, bool transpose_b,
                                                                 bool accumulate, int64_t batch = 1);
  ~Bf16BlockMatmul();
  // a [batch, M, K], b [batch, K, N] or [batch, N, K] (bf16 bit patterns), c [batch, M, N] f32.
  absl::Status Execute(const uint16_t* a, const uint16_t* b, float* c) const;
  std::vector<std::string> Impls() const;
  int64_t batch() const;
  int64_t m() const;
  int64_t n() const;
  int64_t k() const;
  // Executions so far (every thread's): what shows a layer's blocks ran here.
  int64_t executions() const;

 private:
  struct Impl;
  explicit Bf16BlockMatmul(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_ptr_;
};

// In-place softmax over the last axis of a dense [rows, cols] matrix, with the softmax primitive. oneDNN's
// softmax has no runtime dimensions, so primitives are cached per (rows, cols, OpenMP team size), least
// recently used first out once `capacity` is reached.
class SoftmaxCache {
 public:
  explicit SoftmaxCache(size_t capacity);
  ~SoftmaxCache();
  absl::Status Execute(float* data, int64_t rows, int64_t cols) const;
  // impl_info_str() of every softmax primitive this cache has created, deduplicated.
  std::vector<std::string> Impls() const;
  size_t size() const;

 private:
  struct Entry;
  using Key = std::tuple<int64_t, int64_t, int>;  // rows, cols, OpenMP team size
  absl::StatusOr<std::shared_ptr<const Entry>> Get(int64_t rows, int64_t cols) const;

  mutable LruCache<Key, Entry> cache_;
  mutable absl::Mutex impls_mu_;
  mutable std::vector<std::string> impls_seen_ ABSL_GUARDED_BY(impls_mu_);
};

}  // namespace attnserve
