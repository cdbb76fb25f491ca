#include "core/onednn_ops.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <omp.h>

#include <dnnl.hpp>
#include <map>
#include <new>
#include <unordered_map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/bf16_rows.h"
#include "core/omp_threads.h"
#include "core/onednn_internal.h"

namespace attnserve {
namespace onednn_internal {

const dnnl::engine& CpuEngine() {
  static const dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

ThreadState& ThisThread() {
  thread_local ThreadState state;
  return state;
}

}  // namespace onednn_internal

void ReleaseOnednnThreadScratch(size_t keep_bytes) {
  onednn_internal::ThreadState& ts = onednn_internal::ThisThread();
  if (ts.scratchpad.capacity() > keep_bytes) std::vector<uint8_t>().swap(ts.scratchpad);
  for (std::vector<uint16_t>* buf : {&ts.bf16_a, &ts.bf16_b, &ts.padded_x}) {
    if (buf->capacity() * sizeof(uint16_t) > keep_bytes) std::vector<uint16_t>().swap(*buf);
  }
  if (ts.padded_y.capacity() * sizeof(float) > keep_bytes) std::vector<float>().swap(ts.padded_y);
}

namespace onednn_internal {

void ExecuteMatmul(const dnnl::matmul::primitive_desc& pd, const dnnl::matmul& prim, const dnnl::memory& src,
                   const dnnl::memory& weights, const dnnl::memory& dst, const dnnl::memory& bias) {
  ThreadState& ts = ThisThread();
  std::unordered_map<int, dnnl::memory> args = {{DNNL_ARG_SRC, src},
                                                {DNNL_ARG_WEIGHTS, weights},
                                                {DNNL_ARG_DST, dst},
                                                {DNNL_ARG_SCRATCHPAD, ts.Scratchpad(pd.scratchpad_desc())}};
  if (bias) args.emplace(DNNL_ARG_BIAS, bias);
  prim.execute(ts.stream, args);
  ts.stream.wait();
}

uint64_t NextVariantId() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

namespace {

FixedMatmulArgs& ArgsOf(ThreadState& ts, const MatmulVariants::Variant& v) {
  auto found = ts.fixed_args.find(v.id);
  if (found != ts.fixed_args.end()) return found->second;
  if (ts.fixed_args.size() >= ThreadState::kMaxFixedMatmulArgs) ts.fixed_args.clear();
  FixedMatmulArgs args;
  args.src = dnnl::memory(v.pd.src_desc(), CpuEngine(), nullptr);
  args.weights = dnnl::memory(v.pd.weights_desc(), CpuEngine(), nullptr);
  args.dst = dnnl::memory(v.pd.dst_desc(), CpuEngine(), nullptr);
  if (v.pd.bias_desc().get_size() > 0) args.bias = dnnl::memory(v.pd.bias_desc(), CpuEngine(), nullptr);
  args.scratchpad = dnnl::memory(v.pd.scratchpad_desc(), CpuEngine(), nullptr);
  return ts.fixed_args.emplace(v.id, std::move(args)).first->second;
}

}  // namespace

void ExecuteFixedMatmul(const MatmulVariants::Variant& v, const void* src, const void* weights, void* dst,
                        const void* bias) {
  ThreadState& ts = ThisThread();
  FixedMatmulArgs& args = ArgsOf(ts, v);
  const size_t scratch_bytes = v.pd.scratchpad_desc().get_size();
  if (ts.scratchpad.size() < scratch_bytes) ts.scratchpad.resize(scratch_bytes);
  args.src.set_data_handle(const_cast<void*>(src));
  args.weights.set_data_handle(const_cast<void*>(weights));
  args.dst.set_data_handle(dst);
  args.scratchpad.set_data_handle(scratch_bytes > 0 ? ts.scratchpad.data() : nullptr);
  dnnl_exec_arg_t exec_args[5] = {{DNNL_ARG_SRC, args.src.get()},
                                  {DNNL_ARG_WEIGHTS, args.weights.get()},
                                  {DNNL_ARG_DST, args.dst.get()},
                                  {DNNL_ARG_SCRATCHPAD, args.scratchpad.get()},
                                  {DNNL_ARG_BIAS, nullptr}};
  int nargs = 4;
  if (bias != nullptr) {
    args.bias.set_data_handle(const_cast<void*>(bias));
    exec_args[nargs++].memory = args.bias.get();
  }
  dnnl::error::wrap_c_api(dnnl_primitive_execute(v.prim.get(), ts.stream.get(), nargs, exec_args),
                          "could not execute a fixed-size matmul");
  ts.stream.wait();
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

absl::Status FromDnnl(const dnnl::error& e, const char* what) {
  return absl::InternalError(absl::StrCat("oneDNN ", what, " failed: ", e.what(), " (status ", e.status, ")"));
}

dt DataType(ComputeType compute) { return compute == ComputeType::kBFloat16 ? dt::bf16 : dt::f32; }

uint16_t* Grow(std::vector<uint16_t>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

int TeamSize() { return omp_get_max_threads(); }

// cpu_isa values are bit masks (avx2_vnni > avx512_core numerically), so test bits, not order.
bool EffectiveIsaHas(dnnl::cpu_isa want) {
  const auto have = static_cast<unsigned>(dnnl::get_effective_cpu_isa()), w = static_cast<unsigned>(want);
  return (have & w) == w;
}

bool IsBrgemmImpl(const std::string& impl_info) {
  return absl::StartsWith(impl_info, "brg:") && (!OnednnUsesAmx() || absl::StrContains(impl_info, "amx"));
}

}  // namespace onednn_internal

using namespace onednn_internal;  // NOLINT: the adapter's own helpers

namespace {

dnnl::memory::desc Desc4(const View4& v) {
  return dnnl::memory::desc({v.dims[0], v.dims[1], v.dims[2], v.dims[3]}, v.bf16 ? dt::bf16 : dt::f32,
                            {v.strides[0], v.strides[1], v.strides[2], v.strides[3]});
}

// An f32 view converted into a dense bf16 copy in `buf`; its unit-stride axis (3, else 2) stays unit-stride.
View4 DenseBf16(const View4& v, std::vector<uint16_t>& buf) {
  const int64_t* d = v.dims;
  View4 out{Grow(buf, static_cast<size_t>(d[0] * d[1] * d[2] * d[3])), {d[0], d[1], d[2], d[3]}, {}, true};
  const bool rows_on_2 = v.strides[3] == 1;  // else the unit stride is on axis 2 (K^T)
  out.strides[0] = d[1] * d[2] * d[3];
  out.strides[1] = d[2] * d[3];
  out.strides[2] = rows_on_2 ? d[3] : 1;
  out.strides[3] = rows_on_2 ? 1 : d[2];
  const int64_t rows = rows_on_2 ? d[2] : d[3], cols = rows_on_2 ? d[3] : d[2];
  const int64_t ld_src = rows_on_2 ? v.strides[2] : v.strides[3];
  const float* src = static_cast<const float*>(v.data);
  uint16_t* dst = static_cast<uint16_t*>(out.data);
  // A large request's scores block is worth splitting over the calling thread's team.
  ParallelRanges(d[0] * d[1], rows * cols, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t i0 = m / d[1], i1 = m % d[1];
      FloatRowsToBf16(src + i0 * v.strides[0] + i1 * v.strides[1], rows, cols, ld_src,
                      dst + i0 * out.strides[0] + i1 * out.strides[1], cols);
    }
  });
  return out;
}

}  // namespace

const char* ComputeTypeName(ComputeType type) {
  return type == ComputeType::kBFloat16 ? "BFLOAT16" : "FLOAT32";
}

Bf16Support OnednnBf16Support() {
  if (EffectiveIsaHas(dnnl::cpu_isa::avx512_core_bf16)) return Bf16Support::kNative;
  if (EffectiveIsaHas(dnnl::cpu_isa::avx512_core)) return Bf16Support::kEmulated;
  return Bf16Support::kUnavailable;
}

bool OnednnUsesAvx512() { return EffectiveIsaHas(dnnl::cpu_isa::avx512_core); }
bool OnednnUsesAmx() { return EffectiveIsaHas(dnnl::cpu_isa::avx512_core_amx); }
bool OnednnHasBf16Brgemm() { return EffectiveIsaHas(dnnl::cpu_isa::avx512_core_bf16); }

const char* Bf16SupportName(Bf16Support support) {
  switch (support) {
    case Bf16Support::kNative:
      return OnednnUsesAmx() ? "native (AMX)" : "native (AVX512_BF16)";
    case Bf16Support::kEmulated:
      return "emulated (AVX-512 without BF16)";
    case Bf16Support::kUnavailable:
      break;
  }
  return "unavailable (no AVX-512)";
}

// ------------------------------------------------------------------------------------------ HeadMatmulOp

struct HeadMatmulOp::Impl {
  Impl(const dnnl::matmul::desc& desc, bool add_to_dst, ComputeType compute)
      : variants(desc, add_to_dst), compute(compute) {}
  MatmulVariants variants;
  ComputeType compute;
};

HeadMatmulOp::HeadMatmulOp(std::unique_ptr<Impl> impl) : impl_ptr_(std::move(impl)) {}
HeadMatmulOp::~HeadMatmulOp() = default;
std::vector<std::string> HeadMatmulOp::Impls() const { return impl_ptr_->variants.Impls(); }

absl::StatusOr<std::unique_ptr<HeadMatmulOp>> HeadMatmulOp::Create(Kind kind, int64_t head_dim,
                                                                    ComputeType compute) {
  try {
    // A fixed head dim and unit inner strides keep oneDNN 2.6 on gemm:jit; a fully runtime-shaped
    // matmul falls back to ref:any.
    const int64_t h = kRt, d = head_dim;
    const dt in = DataType(compute);
    dnnl::memory::desc a_md, b_md, c_md;
    if (kind == Kind::kScores) {
      a_md = dnnl::memory::desc({kRt, h, kRt, d}, in, {kRt, kRt, kRt, 1});
      b_md = dnnl::memory::desc({kRt, h, d, kRt}, in, {kRt, kRt, 1, kRt});
      c_md = dnnl::memory::desc({kRt, h, kRt, kRt}, dt::f32, {kRt, kRt, kRt, 1});
    } else {
      a_md = dnnl::memory::desc({kRt, h, kRt, kRt}, in, {kRt, kRt, kRt, 1});
      b_md = dnnl::memory::desc({kRt, h, kRt, d}, in, {kRt, kRt, kRt, 1});
      c_md = dnnl::memory::desc({kRt, h, kRt, d}, dt::f32, {kRt, kRt, kRt, 1});
    }
    auto impl = std::make_unique<Impl>(dnnl::matmul::desc(a_md, b_md, c_md), kind == Kind::kContextAdd, compute);
    impl->variants.Get();  // build the primitive for the creating thread's team size now
    return std::unique_ptr<HeadMatmulOp>(new HeadMatmulOp(std::move(impl)));
  } catch (const dnnl::error& e) {
    return FromDnnl(e, "attention matmul creation");
  }
}

absl::Status HeadMatmulOp::Execute(const View4& a_in, const View4& b_in, const View4& c) const {
  const bool bf16 = impl_ptr_->compute == ComputeType::kBFloat16;
  if (c.bf16 || (!bf16 && (a_in.bf16 || b_in.bf16))) {
    return absl::FailedPreconditionError("HeadMatmulOp: bf16 view given where f32 is expected");
  }
  try {
    MatmulVariants::Variant& v = impl_ptr_->variants.Get();
    ThreadState& ts = ThisThread();
    const View4 a = bf16 && !a_in.bf16 ? DenseBf16(a_in, ts.bf16_a) : a_in;
    const View4 b = bf16 && !b_in.bf16 ? DenseBf16(b_in, ts.bf16_b) : b_in;
    ExecuteMatmul(v.pd, v.prim, dnnl::memory(Desc4(a), CpuEngine(), a.data),
                  dnnl::memory(Desc4(b), CpuEngine(), b.data), dnnl::memory(Desc4(c), CpuEngine(), c.data));
    return absl::OkStatus();
  } catch (const dnnl::error& e) {
    return FromDnnl(e, "attention matmul");
  } catch (const std::bad_alloc&) {  // bf16 copies or the scratchpad; callers may be inside a parallel region
    return absl::ResourceExhaustedError("attention matmul: out of memory for its bf16 copies or scratchpad");
  }
}

// ------------------------------------------------------------------------------------------ Bf16BlockMatmul

struct Bf16BlockMatmul::Impl {
  Impl(const dnnl::matmul::desc& desc, bool accumulate, int64_t batch, int64_t m, int64_t n, int64_t k)
      : variants(desc, accumulate), batch(batch), m(m), n(n), k(k) {}
  MatmulVariants variants;
  const int64_t batch, m, n, k;
  std::atomic<int64_t> executions{0};
};

Bf16BlockMatmul::Bf16BlockMatmul(std::unique_ptr<Impl> impl) : impl_ptr_(std::move(impl)) {}
Bf16BlockMatmul::~Bf16BlockMatmul() = default;
std::vector<std::string> Bf16BlockMatmul::Impls() const { return impl_ptr_->variants.Impls(); }
int64_t Bf16BlockMatmul::batch() const { return impl_ptr_->batch; }
int64_t Bf16BlockMatmul::m() const { return impl_ptr_->m; }
int64_t Bf16BlockMatmul::n() const { return impl_ptr_->n; }
int64_t Bf16BlockMatmul::k() const { return impl_ptr_->k; }
int64_t Bf16BlockMatmul::executions() const { return impl_ptr_->executions.load(std::memory_order_relaxed); }

absl::StatusOr<std::unique_ptr<Bf16BlockMatmul>> Bf16BlockMatmul::Create(int64_t m, int64_t n, int64_t k,
                                                                          bool transpose_b, bool accumulate,
                                                                          int64_t batch) {
  if (m <= 0 || n <= 0 || k <= 0 || batch <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("Bf16BlockMatmul: sizes must be > 0, got ", batch, " x ", m, " x ",
                                                   n, " x ", k, " (batch x m x n x k)"));
  }
  if (!OnednnHasBf16Brgemm()) return absl::UnimplementedError("Bf16BlockMatmul: no bf16 brgemm kernels here");
  try {
    const dnnl::memory::desc a_md({batch, m, k}, dt::bf16, tag::abc);
    const dnnl::memory::desc b_md({batch, k, n}, dt::bf16, transpose_b ? tag::acb : tag::abc);
    const dnnl::memory::desc c_md({batch, m, n}, dt::f32, tag::abc);
    auto impl = std::make_unique<Impl>(dnnl::matmul::desc(a_md, b_md, c_md), accumulate, batch, m, n, k);
    if (!IsBrgemmImpl(impl->variants.Get().pd.impl_info_str())) {
      return absl::UnimplementedError(
          absl::StrCat("Bf16BlockMatmul: no brgemm kernel for ", batch, " x ", m, " x ", n, " x ", k));
    }
    return std::unique_ptr<Bf16BlockMatmul>(new Bf16BlockMatmul(std::move(impl)));
  } catch (const dnnl::error& e) {
    return FromDnnl(e, "bf16 block matmul creation");
  } catch (const std::bad_alloc&) {  // built on first use, inside parallel regions
    return absl::ResourceExhaustedError("bf16 block matmul creation: out of memory");
  }
}

absl::Status Bf16BlockMatmul::Execute(const uint16_t* a, const uint16_t* b, float* c) const {
  try {
    MatmulVariants::Variant& v = impl_ptr_->variants.Get();
    ExecuteFixedMatmul(v, a, b, c);
    impl_ptr_->executions.fetch_add(1, std::memory_order_relaxed);
    return absl::OkStatus();
  } catch (const dnnl::error& e) {
    return FromDnnl(e, "bf16 block matmul");
  } catch (const std::bad_alloc&) {  // the scratchpad; callers are inside a parallel region
    return absl::ResourceExhaustedError("bf16 block matmul: out of memory for its scratchpad");
  }
}

absl::Status Sgemm(bool transpose_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                   int64_t ldb, float beta, float* c, int64_t ldc) {
  const dnnl_status_t status =
      dnnl_sgemm('N', transpose_b ? 'T' : 'N', m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
  if (status != dnnl_success) {
    return absl::InternalError(absl::StrCat("oneDNN sgemm failed: status ", static_cast<int>(status), " (", m, " x ",
                                            n, " x ", k, ")"));
  }
  return absl::OkStatus();
}

// ------------------------------------------------------------------------------------------ SoftmaxCache

struct SoftmaxCache::Entry {
  dnnl::softmax_forward::primitive_desc pd;
  dnnl::softmax_forward prim;
};

SoftmaxCache::SoftmaxCache(size_t capacity) : cache_(capacity) {}
SoftmaxCache::~SoftmaxCache() = default;

absl::StatusOr<std::shared_ptr<const SoftmaxCache::Entry>> SoftmaxCache::Get(int64_t rows, int64_t cols) const {
  auto build = [&]() -> absl::StatusOr<std::shared_ptr<Entry>> {
    auto entry = std::make_shared<Entry>();
    try {
      const dnnl::memory::desc md({rows, cols}, dt::f32, tag::ab);
      entry->pd = dnnl::softmax_forward::primitive_desc(
          dnnl::softmax_forward::desc(dnnl::prop_kind::forward_inference, md, 1), UserScratchpad(), CpuEngine());
      entry->prim = dnnl::softmax_forward(entry->pd);
    } catch (const dnnl::error& e) {
      return FromDnnl(e, "softmax creation");
    }
    return entry;
  };
  auto record_impl = [&](const Entry& entry) {
    absl::MutexLock lock(&impls_mu_);
    const std::string impl = entry.pd.impl_info_str();
    if (std::find(impls_seen_.begin(), impls_seen_.end(), impl) == impls_seen_.end()) impls_seen_.push_back(impl);
  };
  return cache_.GetOrBuild(Key{rows, cols, TeamSize()}, build, record_impl);
}

absl::Status SoftmaxCache::Execute(float* data, int64_t rows, int64_t cols) const {
  if (rows == 0) return absl::OkStatus();
  auto entry = Get(rows, cols);
  if (!entry.ok()) return entry.status();
  try {
    ThreadState& ts = ThisThread();
    dnnl::memory mem((*entry)->pd.src_desc(), CpuEngine(), data);
    (*entry)->prim.execute(ts.stream, {{DNNL_ARG_SRC, mem},
                                       {DNNL_ARG_DST, mem},
                                       {DNNL_ARG_SCRATCHPAD, ts.Scratchpad((*entry)->pd.scratchpad_desc())}});
    ts.stream.wait();
    return absl::OkStatus();
  } catch (const dnnl::error& e) {
    return FromDnnl(e, "softmax");
  }
}

std::vector<std::string> SoftmaxCache::Impls() const {
  absl::MutexLock lock(&impls_mu_);
  return impls_seen_;
}

size_t SoftmaxCache::size() const { return cache_.size(); }

}  // namespace attnserve
