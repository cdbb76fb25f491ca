// LinearOp (onednn_ops.h): y = x . W^T (+ b) on oneDNN matmul primitives, in pieces of rows over a team of
// threads, and for bf16 through fixed-row-count primitives where oneDNN has bf16 brgemm kernels.
#include "core/onednn_ops.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <new>
#include <tuple>

#include "absl/base/call_once.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/bf16_rows.h"
#include "core/onednn_internal.h"
#include "core/tasks_in_turn.h"

namespace attnserve {

using namespace onednn_internal;  // NOLINT: the adapter's own helpers

namespace {

// ------------------------------------------------------------------------------ bf16 linear ops on brgemm kernels
//
// oneDNN 2.6 runs a bf16 matmul on its brgemm kernels (AMX tiles, or AVX512_BF16's dot products) only when every
// size and stride is fixed when the primitive is created; with M a runtime dimension it takes its gemm kernels,
// 1.3-2.7x slower on these ops on AMX, up to 1.4x on AVX512_BF16 (BENCHMARKS.md). So where bf16 has brgemm
// kernels, a bf16 op whose k and n are whole blocks keeps its weights in brgemm's
// layout (BA16a64b2a: blocks of 64 outputs, each contiguous, so a slice of whole blocks reads them in place) and
// runs fixed-size primitives: row counts in powers of two up to kFixedRowsMax, each built on first use per row
// strides and team size. A piece of rows that is no power of two goes through a padded copy.
//
// Each single-thread piece reads the weights it multiplies. Up to kMaxFixedRowsWeightBytes they stay in a core's
// L2 across pieces; larger ops are cut into column panels of at most kPanelWeightBytes, and the team takes
// (panel, rows) pieces panel by panel, so that a panel's weights are read from memory once per call rather
// than once per piece of rows (which lost 9-17% on decoders against oneDNN's gemm: BENCHMARKS.md).
// These sizes were chosen on AMX (2 MiB of L2); on AVX512_BF16 with 1 MiB the same ops ran 1.02-1.41x their gemm.
constexpr int64_t kFixedRowsMax = 128;
constexpr int64_t kFixedColumnBlock = 64;
constexpr int64_t kFixedDepthBlock = 32;
constexpr int64_t kMaxFixedRowsWeightBytes = int64_t{4} << 20;
constexpr int64_t kPanelWeightBytes = int64_t{1} << 20;
// Panels narrower than this (k > 1024 at 1 MiB) lost to oneDNN's gemm from 2048 rows (1.0-1.2 against 1.4
// TFLOP/s at 4096 x 6144) and at one row (33 against 53 GFLOP/s): those ops stay on it.
constexpr int64_t kMinPanelColumns = 512;
constexpr size_t kMaxFixedRowsPrimitives = 256;  // per op; the strides come from code, not from requests

dnnl::memory::desc FixedRowsWeightsMd(int64_t k, int64_t n) { return {{k, n}, dt::bf16, tag::BA16a64b2a}; }

int64_t PowerOfTwoAtLeast(int64_t rows) {
  int64_t p = 1;
  while (p < rows) p *= 2;
  return p;
}

class FixedRowsMatmuls {
 public:
  using Variant = MatmulVariants::Variant;

  FixedRowsMatmuls(int64_t k, int64_t n, bool has_bias) : k_(k), n_(n), has_bias_(has_bias) {
    attr_.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  }

  // The primitive of `rows` rows (a power of two, <= kFixedRowsMax) with row strides ldx and ldy and outputs of
  // type y_type (f32 or bf16) for the calling thread's team, or nullptr: past the cap (strides other than k and n
  // only), or when oneDNN has no brgemm kernel for it. Throws dnnl::error.
  const Variant* Get(int64_t rows, int64_t ldx, int64_t ldy, dt y_type) {
    const auto key = std::make_tuple(rows, ldx, ldy, TeamSize(), y_type);
    absl::MutexLock lock(&mu_);
    auto found = variants_.find(key);
    if (found != variants_.end()) return found->second->prim ? found->second.get() : nullptr;
    if (variants_.size() >= kMaxFixedRowsPrimitives && (ldx != k_ || ldy != n_)) return nullptr;
    const dnnl::memory::desc src_md({rows, k_}, dt::bf16, {ldx, 1}), dst_md({rows, n_}, y_type, {ldy, 1});
    const dnnl::memory::desc weights_md = FixedRowsWeightsMd(k_, n_), bias_md({1, n_}, dt::f32, tag::ab);
    auto made = std::make_unique<Variant>();
    made->pd = dnnl::matmul::primitive_desc(has_bias_ ? dnnl::matmul::desc(src_md, weights_md, bias_md, dst_md)
                                                      : dnnl::matmul::desc(src_md, weights_md, dst_md),
                                            attr_, CpuEngine());
    if (IsBrgemmImpl(made->pd.impl_info_str())) made->prim = dnnl::matmul(made->pd);
    Variant* stored = variants_.emplace(key, std::move(made)).first->second.get();
    return stored->prim ? stored : nullptr;
  }

  std::vector<std::string> Impls() {
    absl::MutexLock lock(&mu_);
    std::vector<std::string> impls;
    for (const auto& [key, v] : variants_) {
      if (v->prim) impls.push_back(v->pd.impl_info_str());  // not those refused for want of a brgemm kernel
    }
    return impls;
  }

 private:
  const int64_t k_, n_;
  const bool has_bias_;
  dnnl::primitive_attr attr_;
  absl::Mutex mu_;
  std::map<std::tuple<int64_t, int64_t, int64_t, int, dt>, std::unique_ptr<Variant>> variants_ ABSL_GUARDED_BY(mu_);
};

// Outputs [n_begin, n_begin + n) of an op on brgemm kernels, with views of its weights and bias.
struct FixedRowsPanel {
  int64_t n_begin = 0, n = 0;
  std::shared_ptr<FixedRowsMatmuls> matmuls;  // shared by the op's panels of one width
  dnnl::memory weights, bias;                 // bias empty when the op has none
};

}  // namespace

// ---------------------------------------------------------------------------------------------- LinearOp

struct LinearOp::Impl {
  Impl(const dnnl::matmul::desc& desc, int64_t k, int64_t n, ComputeType compute)
      : variants(desc), k(k), n(n), compute(compute) {}
  MatmulVariants variants;
  dnnl::memory weights_mem;  // in the layout of the first primitive built (or a view of another op's)
  dnnl::memory bias_mem;
  dnnl::memory shared_weights;  // a slice: the whole op's weights, which weights_mem points into
  std::vector<FixedRowsPanel> panels;  // brgemm: run through these instead of `variants` (AttachFixedRowsWeights)
  int64_t k = 0, n = 0;
  ComputeType compute = ComputeType::kFloat32;

  // The primitive for the current team size, with the weights in its layout (reordered once if it
  // chose another layout than the first).
  MatmulVariants::Variant& Get() {
    MatmulVariants::Variant& v = variants.Get();
    absl::MutexLock lock(&weights_mu);
    if (!v.weights) {
      if (v.pd.weights_desc() == weights_mem.get_desc()) {
        v.weights = weights_mem;
      } else {  // published only once filled: a reorder that throws leaves none behind
        dnnl::memory reordered(v.pd.weights_desc(), CpuEngine());
        dnnl::stream& stream = ThisThread().stream;
        dnnl::reorder(weights_mem, reordered).execute(stream, weights_mem, reordered);
        stream.wait();
        v.weights = reordered;
      }
    }
    return v;
  }
  absl::Mutex weights_mu;
  // Whether every panel has a brgemm kernel with a bf16 destination (writes_bf16), found on first ask.
  absl::once_flag bf16_out_once;
  bool bf16_out = false;
};

namespace {

// y [M, n] = x [M, k] . W^T (+ bias), M a runtime dimension; weights_md may be tag::any.
std::unique_ptr<LinearOp::Impl> NewLinearImpl(int64_t k, int64_t n, const dnnl::memory::desc& weights_md,
                                              const std::vector<float>& bias, ComputeType compute) {
  const dnnl::memory::desc src_md({kRt, k}, DataType(compute), {kRt, 1});
  const dnnl::memory::desc bias_md({1, n}, dt::f32, tag::ab);
  const dnnl::memory::desc dst_md({kRt, n}, dt::f32, {kRt, 1});
  auto impl = std::make_unique<LinearOp::Impl>(bias.empty() ? dnnl::matmul::desc(src_md, weights_md, dst_md)
                                                            : dnnl::matmul::desc(src_md, weights_md, bias_md, dst_md),
                                               k, n, compute);
  if (!bias.empty()) {
    impl->bias_mem = dnnl::memory(bias_md, CpuEngine());
    std::copy(bias.begin(), bias.end(), static_cast<float*>(impl->bias_mem.get_data_handle()));
  }
  return impl;
}

// Whether `md` is W^T [k, n] row-major ({n, 1} strides, no blocks): then any column block of it is a matrix
// a matmul can read in place.
bool IsPlainRowMajor(const dnnl::memory::desc& md, int64_t n) {
  const dnnl_memory_desc_t& d = md.data;
  return d.format_kind == dnnl_blocked && d.ndims == 2 && d.format_desc.blocking.inner_nblks == 0 &&
         d.format_desc.blocking.strides[1] == 1 && d.format_desc.blocking.strides[0] == n && d.offset0 == 0;
}

// The op's column panels: the whole op up to kMaxFixedRowsWeightBytes, else panels of kPanelWeightBytes (whole
// blocks of 64 outputs; the last may be narrower). Panels of one width share their primitives.
int64_t PanelWidth(int64_t k, int64_t n) {
  if (2 * k * n <= kMaxFixedRowsWeightBytes) return n;
  return kPanelWeightBytes / (2 * k) / kFixedColumnBlock * kFixedColumnBlock;
}

std::vector<FixedRowsPanel> FixedRowsPanels(int64_t k, int64_t n, bool has_bias) {
  const int64_t width = PanelWidth(k, n);
  std::vector<FixedRowsPanel> panels;
  std::map<int64_t, std::shared_ptr<FixedRowsMatmuls>> by_width;
  for (int64_t n_begin = 0; n_begin < n; n_begin += width) {
    const int64_t cols = std::min(width, n - n_begin);
    std::shared_ptr<FixedRowsMatmuls>& matmuls = by_width[cols];
    if (!matmuls) matmuls = std::make_shared<FixedRowsMatmuls>(k, cols, has_bias);
    panels.push_back({n_begin, cols, matmuls, {}, {}});
  }
  return panels;
}

// The op on brgemm kernels (see FixedRowsMatmuls) when this CPU, the compute type and the shape allow it and oneDNN
// runs the largest piece of each panel width on a brgemm kernel (AMX, or AVX512_BF16 where the CPU or the OS has
// no tiles); else nullptr, and the op takes the runtime-M path. Its
// weights are left to the caller (AttachFixedRowsWeights).
std::unique_ptr<LinearOp::Impl> NewFixedRowsImpl(int64_t k, int64_t n, const std::vector<float>& bias,
                                                 ComputeType compute) {
  if (compute != ComputeType::kBFloat16 || !OnednnHasBf16Brgemm() || k % kFixedDepthBlock != 0 ||
      n % kFixedColumnBlock != 0 || (PanelWidth(k, n) < n && PanelWidth(k, n) < kMinPanelColumns)) {
    return nullptr;
  }
  try {
    std::unique_ptr<LinearOp::Impl> impl = NewLinearImpl(k, n, FixedRowsWeightsMd(k, n), bias, compute);
    impl->panels = FixedRowsPanels(k, n, !bias.empty());
    for (const FixedRowsPanel& panel : impl->panels) {
      const MatmulVariants::Variant* largest = panel.matmuls->Get(kFixedRowsMax, k, panel.n, dt::f32);
      if (largest == nullptr || !IsBrgemmImpl(largest->pd.impl_info_str())) return nullptr;
    }
    return impl;
  } catch (const dnnl::error&) {
    return nullptr;
  }
}

// Points a brgemm op's weights (and its panels' views) at `data`, k x n bf16 values in FixedRowsWeightsMd's layout
// (owned by the caller or by the op `data` is a slice of), and its panels' bias at their part of the op's.
void AttachFixedRowsWeights(LinearOp::Impl& impl, char* data) {
  const int64_t k = impl.k;
  impl.weights_mem = dnnl::memory(FixedRowsWeightsMd(k, impl.n), CpuEngine(), data);
  for (FixedRowsPanel& panel : impl.panels) {
    panel.weights = dnnl::memory(FixedRowsWeightsMd(k, panel.n), CpuEngine(), data + panel.n_begin * k * 2);
    if (impl.bias_mem) {
      float* bias = static_cast<float*>(impl.bias_mem.get_data_handle()) + panel.n_begin;
      panel.bias = dnnl::memory(dnnl::memory::desc({1, panel.n}, dt::f32, tag::ab), CpuEngine(), bias);
    }
  }
}

}  // namespace

LinearOp::LinearOp(std::unique_ptr<Impl> impl) : impl_ptr_(std::move(impl)) {}
LinearOp::~LinearOp() = default;
std::vector<std::string> LinearOp::Impls() const {
  if (impl_ptr_->panels.empty()) return impl_ptr_->variants.Impls();
  std::vector<std::string> impls;
  for (const FixedRowsPanel& panel : impl_ptr_->panels) {
    for (std::string& impl : panel.matmuls->Impls()) {
      if (std::find(impls.begin(), impls.end(), impl) == impls.end()) impls.push_back(std::move(impl));
    }
  }
  return impls;
}
ComputeType LinearOp::compute() const { return impl_ptr_->compute; }
int64_t LinearOp::owned_weight_bytes() const {
  const Impl& p = *impl_ptr_;
  return p.shared_weights ? 0 : static_cast<int64_t>(p.weights_mem.get_desc().get_size());
}

absl::StatusOr<std::unique_ptr<LinearOp>> LinearOp::Create(int64_t k, int64_t n, const std::vector<float>& weight,
                                                          const std::vector<float>& bias, ComputeType compute) {
  if (k <= 0 || n <= 0 || weight.size() != static_cast<size_t>(k * n)) {
    return absl::InvalidArgumentError(
        absl::StrCat("LinearOp: weight must be [", n, ", ", k, "]; got ", weight.size(), " values"));
  }
  return Build(k, {{weight.data(), n, false}}, bias, compute);
}

absl::StatusOr<std::unique_ptr<LinearOp>> LinearOp::CreateFromBf16(int64_t k, int64_t n,
                                                                  const std::vector<uint16_t>& weight,
                                                                  const std::vector<float>& bias,
                                                                  ComputeType compute) {
  if (k <= 0 || n <= 0 || weight.size() != static_cast<size_t>(k * n)) {
    return absl::InvalidArgumentError(
        absl::StrCat("LinearOp: weight must be [", n, ", ", k, "]; got ", weight.size(), " values"));
  }
  return Build(k, {{weight.data(), n, true}}, bias, compute);
}

absl::StatusOr<std::unique_ptr<LinearOp>> LinearOp::CreateStacked(int64_t k,
                                                                 const std::vector<const std::vector<float>*>& parts,
                                                                 const std::vector<float>& bias,
                                                                 ComputeType compute) {
  if (parts.empty()) return absl::InvalidArgumentError("LinearOp: no weight matrices to stack");
  std::vector<WeightPart> stacked;
  for (size_t i = 0; i < parts.size(); ++i) {
    const size_t size = parts[i] == nullptr ? 0 : parts[i]->size();
    if (k <= 0 || size == 0 || size % static_cast<size_t>(k) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("LinearOp: part ", i, " must be [n_", i, ", ", k, "]; got ", size, " values"));
    }
    stacked.push_back({parts[i]->data(), static_cast<int64_t>(size) / k, false});
  }
  return Build(k, stacked, bias, compute);
}

namespace {

// Reorders parts (PyTorch's W [rows, k] row-major, all of one type `src_type`), stacked along n, into
// `weights`: each straight into its columns of W^T where the layout is plain, else through one stacked copy
// (a blocked layout's column blocks may not be addressable).
void ReorderStackedParts(const std::vector<std::pair<const void*, int64_t>>& parts, int64_t k, int64_t n,
                         dt src_type, dnnl::memory& weights, dnnl::stream& stream) {
  const size_t element_bytes = src_type == dt::bf16 ? 2 : 4;
  // W [n, k] row-major is W^T [k, n] with strides {1, k}; part i is its rows [row, row + rows).
  const dnnl::memory::desc torch_md({k, n}, src_type, {1, k});
  if (parts.size() == 1) {
    dnnl::memory torch_mem(torch_md, CpuEngine(), const_cast<void*>(parts[0].first));
    dnnl::reorder(torch_mem, weights).execute(stream, torch_mem, weights);
    return;
  }
  if (IsPlainRowMajor(weights.get_desc(), n)) {
    int64_t row = 0;
    for (const auto& [data, rows] : parts) {
      dnnl::memory part_mem(dnnl::memory::desc({k, rows}, src_type, {1, k}), CpuEngine(), const_cast<void*>(data));
      dnnl::memory columns(weights.get_desc().submemory_desc({k, rows}, {0, row}), CpuEngine(),
                           weights.get_data_handle());
      dnnl::reorder(part_mem, columns).execute(stream, part_mem, columns);
      row += rows;
    }
    return;
  }
  std::vector<uint8_t> stacked(static_cast<size_t>(k * n) * element_bytes);
  size_t offset = 0;
  for (const auto& [data, rows] : parts) {
    const size_t bytes = static_cast<size_t>(rows * k) * element_bytes;
    std::memcpy(stacked.data() + offset, data, bytes);
    offset += bytes;
  }
  dnnl::memory stacked_mem(torch_md, CpuEngine(), stacked.data());
  dnnl::reorder(stacked_mem, weights).execute(stream, stacked_mem, weights);
  stream.wait();  // before `stacked` goes
}

}  // namespace

absl::StatusOr<std::unique_ptr<LinearOp>> LinearOp::Build(int64_t k, const std::vector<WeightPart>& parts,
                                                         const std::vector<float>& bias, ComputeType compute) {
  int64_t n = 0;
  std::vector<std::pair<const void*, int64_t>> sources;
  for (const WeightPart& part : parts) {
    if (part.bf16 != parts[0].bf16) return absl::InvalidArgumentError("LinearOp: parts of mixed types");
    n += part.rows;
    sources.emplace_back(part.data, part.rows);
  }
  if (k <= 0 || n <= 0 || (!bias.empty() && bias.size() != static_cast<size_t>(n))) {
    return absl::InvalidArgumentError(
        absl::StrCat("LinearOp: bias must be [", n, "] or empty; got ", bias.size(), " values (k = ", k, ")"));
  }
  try {
    std::unique_ptr<Impl> impl = NewFixedRowsImpl(k, n, bias, compute);
    if (impl) {
      dnnl::memory owned(FixedRowsWeightsMd(k, n), CpuEngine());
      AttachFixedRowsWeights(*impl, static_cast<char*>(owned.get_data_handle()));
      impl->weights_mem = owned;  // the same bytes, now owned by the op
    } else {
      impl = NewLinearImpl(k, n, dnnl::memory::desc({k, n}, DataType(compute), tag::any), bias, compute);
      MatmulVariants::Variant& first = impl->variants.Get();
      impl->weights_mem = dnnl::memory(first.pd.weights_desc(), CpuEngine());
      first.weights = impl->weights_mem;
    }
    ThreadState& ts = ThisThread();
    ReorderStackedParts(sources, k, n, parts[0].bf16 ? dt::bf16 : dt::f32, impl->weights_mem, ts.stream);
    ts.stream.wait();
    return std::unique_ptr<LinearOp>(new LinearOp(std::move(impl)));
  } catch (const dnnl::error& e) {
    return FromDnnl(e, "linear layer creation");
  }
}

absl::StatusOr<std::unique_ptr<LinearOp>> LinearOp::CreateSlice(const LinearOp& whole, int64_t n_begin, int64_t n,
                                                               const std::vector<float>& bias) {
  const Impl& w = *whole.impl_ptr_;
  if (n_begin < 0 || n <= 0 || n_begin + n > w.n || (!bias.empty() && bias.size() != static_cast<size_t>(n))) {
    return absl::InvalidArgumentError(absl::StrCat("LinearOp: slice [", n_begin, ", ", n_begin + n, ") of ", w.n,
                                                   " outputs with ", bias.size(), " bias values"));
  }
  if (!w.panels.empty()) return CreateFixedRowsSlice(w, n_begin, n, bias);
  if (!IsPlainRowMajor(w.weights_mem.get_desc(), w.n)) {
    return absl::UnimplementedError("LinearOp: the whole op's weights are in a blocked layout");
  }
  try {
    // Columns [n_begin, n_begin + n) of W^T [k, N]: row stride N.
    const dnnl::memory::desc weights_md({w.k, n}, DataType(w.compute), {w.n, 1});
    std::unique_ptr<Impl> impl = NewLinearImpl(w.k, n, weights_md, bias, w.compute);
    const size_t element_bytes = w.compute == ComputeType::kBFloat16 ? 2 : 4;
    char* data = static_cast<char*>(w.weights_mem.get_data_handle());
    impl->weights_mem = dnnl::memory(weights_md, CpuEngine(), data + n_begin * element_bytes);
    impl->shared_weights = w.shared_weights ? w.shared_weights : w.weights_mem;  // the owner, for a slice's slice
    // The first primitive, built now as Build does: a strided layout only oneDNN's reference kernel takes
    // would cost more than a copy of the weights.
    if (absl::StartsWith(impl->Get().pd.impl_info_str(), "ref")) {
      return absl::UnimplementedError("LinearOp: only the reference matmul reads a weights slice");
    }
    return std::unique_ptr<LinearOp>(new LinearOp(std::move(impl)));
  } catch (const dnnl::error& e) {
    return FromDnnl(e, "linear layer slice");
  }
}

// A slice of whole blocks of 64 outputs of an op on brgemm kernels: those blocks are contiguous in its weights.
absl::StatusOr<std::unique_ptr<LinearOp>> LinearOp::CreateFixedRowsSlice(const Impl& w, int64_t n_begin, int64_t n,
                                                                         const std::vector<float>& bias) {
  if (n_begin % kFixedColumnBlock != 0 || n % kFixedColumnBlock != 0) {
    return absl::UnimplementedError("LinearOp: a slice of the brgemm layout must be whole blocks of 64 outputs");
  }
  try {
    std::unique_ptr<Impl> impl = NewFixedRowsImpl(w.k, n, bias, w.compute);
    if (!impl) return absl::UnimplementedError("LinearOp: no brgemm kernel for the slice");
    char* data = static_cast<char*>(w.weights_mem.get_data_handle());
    AttachFixedRowsWeights(*impl, data + n_begin * w.k * 2);
    impl->shared_weights = w.shared_weights ? w.shared_weights : w.weights_mem;
    return std::unique_ptr<LinearOp>(new LinearOp(std::move(impl)));
  } catch (const dnnl::error& e) {
    return FromDnnl(e, "linear layer slice");
  }
}

absl::Status LinearOp::Execute(const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy) const {
  if (impl_ptr_->compute == ComputeType::kFloat32) return Run(x, m, ldx, y, ldy);
  if (m == 0) return absl::OkStatus();
  const int64_t k = impl_ptr_->k;
  uint16_t* x16 = nullptr;
  try {  // callers may be inside a parallel region, which nothing may leave
    x16 = Grow(ThisThread().bf16_a, static_cast<size_t>(m * k));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("linear layer: out of memory for the bf16 copy of its input");
  }
  FloatRowsToBf16Parallel(x, m, k, ldx, x16, k);
  return Run(x16, m, k, y, ldy);
}

absl::Status LinearOp::ExecuteBf16(const uint16_t* x, int64_t m, int64_t ldx, float* y, int64_t ldy) const {
  if (impl_ptr_->compute != ComputeType::kBFloat16) {
    return absl::FailedPreconditionError("LinearOp: bf16 input given to an f32 op");
  }
  return Run(x, m, ldx, y, ldy);
}

// Pieces of rows when a team of threads shares one f32 linear op. On these 2-vCPU machines the team's cores are
// shared with gRPC's threads and the load: a oneDNN primitive split statically over the team stalls as a whole
// while any one of its threads is preempted, whereas single-threaded pieces taken in turn let the running
// thread take the preempted one's share. Measured (BENCHMARKS.md): 64-row pieces did best (32: slower);
// ops whose 64 rows carry less than 32 MFLOP (E=256) lost 6% alone and gained nothing beside other load, and
// bf16 ops lost 8-15% alone: those run whole.
constexpr int64_t kPieceRows = 64;
constexpr int64_t kMinPieceFlops = 32'000'000;

namespace {

// Runs task(i) for i in [0, count), taken in turn by a team of `team` threads, each task single-threaded (its
// op's single-thread primitive).
absl::Status ForEachTask(int team, int64_t count, const std::function<absl::Status(int64_t)>& task) {
  if (team == 1) {  // on the calling thread, which may be inside a parallel region: no nested one
    for (int64_t i = 0; i < count; ++i) ATTN_RETURN_IF_ERROR(task(i));
    return absl::OkStatus();
  }
  const std::vector<absl::Status> status =
      RunTasksInTurn(team, count, task, "linear layer: out of memory in a piece of rows");
  for (const absl::Status& s : status) ATTN_RETURN_IF_ERROR(s);
  return absl::OkStatus();
}

// Runs piece(r0, rows) for each piece of `piece_rows` rows of m, as tasks of ForEachTask.
absl::Status ForEachPiece(int team, int64_t m, int64_t piece_rows,
                          const std::function<absl::Status(int64_t, int64_t)>& piece) {
  return ForEachTask(team, (m + piece_rows - 1) / piece_rows, [&](int64_t i) {
    const int64_t r0 = i * piece_rows;
    return piece(r0, std::min(piece_rows, m - r0));
  });
}

// One linear primitive on src into dst, with the op's weights (in v's layout) and bias. Throws dnnl::error.
void ExecuteLinear(const MatmulVariants::Variant& v, const dnnl::memory& weights, const dnnl::memory& bias,
                   const dnnl::memory& src, const dnnl::memory& dst) {
  ExecuteMatmul(v.pd, v.prim, src, weights, dst, bias);
}

void ExecuteFixed(const FixedRowsMatmuls::Variant& v, const FixedRowsPanel& panel, const void* x, void* y) {
  ExecuteFixedMatmul(v, x, panel.weights.get_data_handle(), y, panel.bias ? panel.bias.get_data_handle() : nullptr);
}

// Where a fixed-rows op writes: f32, or bf16 (rounded to nearest even) for a bf16 consumer; ld in elements.
struct FixedRowsOut {
  void* data;
  int64_t ld;
  dt type;
  size_t element_bytes() const { return type == dt::bf16 ? 2 : 4; }
  // Row r, column c.
  void* At(int64_t r, int64_t c) const {
    return static_cast<char*>(data) + (r * ld + c) * static_cast<int64_t>(element_bytes());
  }
};

// rows <= kFixedRowsMax of bf16 x [rows, k] through the panel's fixed primitive of their count, or of the next
// power of two on a padded copy (the pad rows zero, so they cost no special values), into y [rows, panel.n].
absl::Status RunFixedRowsPiece(const FixedRowsPanel& panel, int64_t k, const uint16_t* x, int64_t rows, int64_t ldx,
                               const FixedRowsOut& y) {
  try {
    const int64_t padded = PowerOfTwoAtLeast(rows), n = panel.n;
    if (padded == rows) {
      if (const FixedRowsMatmuls::Variant* v = panel.matmuls->Get(rows, ldx, y.ld, y.type)) {
        ExecuteFixed(*v, panel, x, y.data);
        return absl::OkStatus();
      }
    }
    const FixedRowsMatmuls::Variant* v = nullptr;
    int64_t size = padded;  // the next size with a brgemm kernel (kFixedRowsMax has one)
    while ((v = panel.matmuls->Get(size, k, n, y.type)) == nullptr && size < kFixedRowsMax) size *= 2;
    if (v == nullptr) return absl::InternalError("linear layer: no brgemm primitive for a piece of rows");
    ThreadState& ts = ThisThread();
    uint16_t* xp = Grow(ts.padded_x, static_cast<size_t>(size * k));
    for (int64_t i = 0; i < rows; ++i) std::memcpy(xp + i * k, x + i * ldx, static_cast<size_t>(k) * 2);
    std::memset(xp + rows * k, 0, static_cast<size_t>((size - rows) * k) * 2);
    if (ts.padded_y.size() < static_cast<size_t>(size * n)) ts.padded_y.resize(static_cast<size_t>(size * n));
    ExecuteFixed(*v, panel, xp, ts.padded_y.data());  // dense [size, n] of y.type
    const FixedRowsOut padded_y{ts.padded_y.data(), n, y.type};
    for (int64_t i = 0; i < rows; ++i) {
      std::memcpy(y.At(i, 0), padded_y.At(i, 0), static_cast<size_t>(n) * y.element_bytes());
    }
    return absl::OkStatus();
  } catch (const dnnl::error& e) {
    return FromDnnl(e, "linear layer");
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("linear layer: out of memory for a piece of rows");
  }
}

// An op of one panel, with fewer than 2 x kPieceRows rows or no team: pieces of up to kFixedRowsMax rows in turn,
// each on the whole team. Else (panel, rows) pieces taken in turn by the team's threads as f32 ops do, panel by
// panel: of kFixedRowsMax rows (the fastest per thread, measured) where there are 4 of those or more, else of
// kPieceRows, so that both threads get work; with several panels, fewer rows make one piece per panel.
absl::Status RunFixedRows(const LinearOp::Impl& p, const uint16_t* x, int64_t m, int64_t ldx, const FixedRowsOut& y,
                          int team) {
  auto piece = [&](const FixedRowsPanel& panel, int64_t r0, int64_t rows) {
    return RunFixedRowsPiece(panel, p.k, x + r0 * ldx, rows, ldx, {y.At(r0, panel.n_begin), y.ld, y.type});
  };
  if (p.panels.size() == 1 && (team == 1 || m < 2 * kPieceRows)) {
    for (int64_t r0 = 0; r0 < m; r0 += kFixedRowsMax) {
      ATTN_RETURN_IF_ERROR(piece(p.panels[0], r0, std::min(kFixedRowsMax, m - r0)));
    }
    return absl::OkStatus();
  }
  const int64_t piece_rows = m >= 4 * kFixedRowsMax                          ? kFixedRowsMax
                             : m >= 2 * kPieceRows || p.panels.size() == 1 ? kPieceRows
                                                                             : m;
  const int64_t pieces = (m + piece_rows - 1) / piece_rows;
  return ForEachTask(team, pieces * static_cast<int64_t>(p.panels.size()), [&](int64_t i) {
    const int64_t r0 = i % pieces * piece_rows;
    return piece(p.panels[static_cast<size_t>(i / pieces)], r0, std::min(piece_rows, m - r0));
  });
}

}  // namespace

absl::Status LinearOp::Run(const void* x, int64_t m, int64_t ldx, float* y, int64_t ldy) const {
  if (m == 0) return absl::OkStatus();
  const int team = omp_in_parallel() ? 1 : omp_get_max_threads();
  const Impl& p = *impl_ptr_;
  if (!p.panels.empty()) return RunFixedRows(p, static_cast<const uint16_t*>(x), m, ldx, {y, ldy, dt::f32}, team);
  if (team == 1 || p.compute == ComputeType::kBFloat16 || 2 * kPieceRows * p.k * p.n < kMinPieceFlops ||
      m < 2 * kPieceRows) {
    return RunTeam(x, m, ldx, y, ldy);
  }
  const int64_t x_row_bytes = ldx * int64_t{sizeof(float)};  // f32 ops only (bf16 ones run whole, above)
  return ForEachPiece(team, m, kPieceRows, [&](int64_t r0, int64_t rows) {
    return RunTeam(static_cast<const char*>(x) + r0 * x_row_bytes, rows, ldx, y + r0 * ldy, ldy);
  });
}

absl::Status LinearOp::ExecuteBf16ToBf16(const uint16_t* x, int64_t m, int64_t ldx, uint16_t* y, int64_t ldy) const {
  if (!writes_bf16()) {
    return absl::FailedPreconditionError("LinearOp: bf16 outputs from an op not on brgemm kernels");
  }
  if (m == 0) return absl::OkStatus();
  const int team = omp_in_parallel() ? 1 : omp_get_max_threads();
  return RunFixedRows(*impl_ptr_, x, m, ldx, {y, ldy, dt::bf16}, team);
}

bool LinearOp::writes_bf16() const {
  Impl& p = *impl_ptr_;
  if (p.panels.empty()) return false;
  // The f32 destination's kernel was checked when the op was built; the bf16 one is checked here, once (its
  // primitive is kept for the calls).
  absl::call_once(p.bf16_out_once, [&p] {
    try {
      p.bf16_out = std::all_of(p.panels.begin(), p.panels.end(), [&](const FixedRowsPanel& panel) {
        return panel.matmuls->Get(kFixedRowsMax, p.k, panel.n, dt::bf16) != nullptr;
      });
    } catch (...) {  // dnnl::error or std::bad_alloc: the f32 destination then
      p.bf16_out = false;
    }
  });
  return p.bf16_out;
}

absl::Status LinearOp::RunTeam(const void* x, int64_t m, int64_t ldx, float* y, int64_t ldy) const {
  Impl& p = *impl_ptr_;
  try {
    MatmulVariants::Variant& v = p.Get();
    dnnl::memory src(dnnl::memory::desc({m, p.k}, DataType(p.compute), {ldx, 1}), CpuEngine(),
                     const_cast<void*>(x));
    dnnl::memory dst(dnnl::memory::desc({m, p.n}, dt::f32, {ldy, 1}), CpuEngine(), y);
    ExecuteLinear(v, v.weights, p.bias_mem, src, dst);
    return absl::OkStatus();
  } catch (const dnnl::error& e) {
    return FromDnnl(e, "linear layer");
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("linear layer: out of memory for its scratchpad");
  }
}

}  // namespace attnserve
