// The oneDNN adapter's own helpers, shared by its files (onednn_ops.cc, onednn_linear_op.cc) and by nothing
// else: with onednn_ops.h's ops they are the only code that sees dnnl.hpp or dnnl::error.
#pragma once

#include <dnnl.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "core/onednn_ops.h"

namespace attnserve::onednn_internal {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;
constexpr dnnl::memory::dim kRt = DNNL_RUNTIME_DIM_VAL;

const dnnl::engine& CpuEngine();

// One fixed-size matmul's arguments on one thread: memory objects made once, their data handles set per call.
// Only for descriptors without padding: set_data_handle zero-pads a padded one on every call, which would write
// into weights other threads read (fixed-rows weights are whole blocks, block matmuls plain).
struct FixedMatmulArgs {
  dnnl::memory src, weights, dst, bias, scratchpad;
};

// Per calling thread: a stream (streams are not thread-safe) and a scratchpad that grows to the largest
// request of any op run on this thread.
struct ThreadState {
  dnnl::stream stream{CpuEngine()};
  // By MatmulVariants::Variant::id (ids are never reused, so an entry cannot outlive its primitive's meaning);
  // cleared past kMaxFixedMatmulArgs entries, so that layers loaded and unloaded do not grow it for good.
  absl::flat_hash_map<uint64_t, FixedMatmulArgs> fixed_args;
  static constexpr size_t kMaxFixedMatmulArgs = 1024;
  std::vector<uint8_t> scratchpad;
  std::vector<uint16_t> bf16_a, bf16_b;  // bf16 copies of f32 matmul inputs (bf16 ops)
  std::vector<uint16_t> padded_x;        // a fixed-rows piece's rows, padded to its primitive's
  std::vector<float> padded_y;

  dnnl::memory Scratchpad(const dnnl::memory::desc& md) {
    const size_t size = md.get_size();
    if (scratchpad.size() < size) scratchpad.resize(size);
    return dnnl::memory(md, CpuEngine(), size ? scratchpad.data() : nullptr);
  }
};

ThreadState& ThisThread();
// Executes a matmul primitive on the calling thread's stream and scratchpad and waits for it; `bias` may be
// empty. Throws dnnl::error (and std::bad_alloc when the scratchpad grows).
void ExecuteMatmul(const dnnl::matmul::primitive_desc& pd, const dnnl::matmul& prim, const dnnl::memory& src,
                   const dnnl::memory& weights, const dnnl::memory& dst, const dnnl::memory& bias = {});
dnnl::primitive_attr UserScratchpad();
// A oneDNN error as an Internal status naming `what` failed.
absl::Status FromDnnl(const dnnl::error& e, const char* what);
dt DataType(ComputeType compute);
uint16_t* Grow(std::vector<uint16_t>& buf, size_t n);
// Whether oneDNN's effective ISA (ONEDNN_MAX_CPU_ISA counted) includes `want`.
bool EffectiveIsaHas(dnnl::cpu_isa want);
// Whether a primitive's impl_info_str() names oneDNN's bf16 brgemm kernel of the best ISA here, which the
// fixed-size bf16 paths are built for: "brg:avx512_core_amx_bf16" where oneDNN runs AMX (an AVX512_BF16 brgemm on
// such a CPU was never measured against the runtime-size gemm), else "brg:avx512_core_bf16". gemm:jit is not.
bool IsBrgemmImpl(const std::string& impl_info);

// oneDNN with the OpenMP runtime fixes a primitive's threading when the primitive is created (from
// omp_get_max_threads() then); run under a smaller team it still wakes the threads it was built for, which
// costs more than a small matmul itself. So each op keeps one primitive per team size it is executed with.
int TeamSize();

// A process-wide unique id for each matmul variant built (ExecuteFixedMatmul's key).
uint64_t NextVariantId();

// The matmul primitives of one op, by team size, built on first use from one descriptor.
class MatmulVariants {
 public:
  struct Variant {
    dnnl::matmul::primitive_desc pd;
    dnnl::matmul prim;
    dnnl::memory weights;  // LinearOp only: the weights in this primitive's layout
    const uint64_t id = NextVariantId();
  };

  explicit MatmulVariants(const dnnl::matmul::desc& desc, bool add_to_dst = false) : desc_(desc) {
    attr_.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    if (add_to_dst) {
      dnnl::post_ops ops;
      ops.append_sum(1.0f);
      attr_.set_post_ops(ops);
    }
  }

  // Throws dnnl::error (callers are the ops below, which convert it).
  std::vector<std::string> Impls() {
    absl::MutexLock lock(&mu_);
    std::vector<std::string> impls;
    for (const auto& [team, v] : variants_) impls.push_back(v->pd.impl_info_str());
    return impls;
  }

  Variant& Get() {
    const int team = TeamSize();
    absl::MutexLock lock(&mu_);
    auto found = variants_.find(team);
    if (found != variants_.end()) return *found->second;
    // Built before it is stored: a build that throws leaves no empty entry behind.
    auto made = std::make_unique<Variant>();
    made->pd = dnnl::matmul::primitive_desc(desc_, attr_, CpuEngine());
    made->prim = dnnl::matmul(made->pd);
    return *variants_.emplace(team, std::move(made)).first->second;
  }

 private:
  const dnnl::matmul::desc desc_;
  dnnl::primitive_attr attr_;
  absl::Mutex mu_;
  std::map<int, std::unique_ptr<Variant>> variants_ ABSL_GUARDED_BY(mu_);  // nodes never move
};

// ExecuteMatmul for a primitive whose memory descriptors are all fully defined (no runtime dimension), from raw
// pointers (`bias` null: none): memory objects are kept per thread and variant and only their data handles set
// per call, through the C API (no argument map). Making four memory objects and a map per call cost 1.3 us, more
// than a 4 x 16 x 16 x 64 bf16 matmul on brgemm kernels. Throws dnnl::error (and std::bad_alloc).
void ExecuteFixedMatmul(const MatmulVariants::Variant& v, const void* src, const void* weights, void* dst,
                        const void* bias = nullptr);

}  // namespace attnserve::onednn_internal
