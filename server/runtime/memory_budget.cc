#include "server/runtime/memory_budget.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "server/startup/layer_options.h"

namespace attnserve {

MemoryBudget::Reservation& MemoryBudget::Reservation::operator=(Reservation&& other) noexcept {
  if (this != &other) {
    Release();
    budget_ = other.budget_;
    bytes_ = other.bytes_;
    other.budget_ = nullptr;
  }
  return *this;
}

void MemoryBudget::Reservation::Release() {
  if (budget_ != nullptr) budget_->Changed(budget_->reserved_.fetch_sub(bytes_, std::memory_order_relaxed) - bytes_);
  budget_ = nullptr;
}

void MemoryBudget::Reservation::Absorb(Reservation&& other) {
  if (other.budget_ == nullptr) return;
  if (budget_ == nullptr) {
    *this = std::move(other);
    return;
  }
  bytes_ += other.bytes_;
  other.budget_ = nullptr;
}

absl::StatusOr<MemoryBudget::Reservation> MemoryBudget::Reserve(int64_t bytes) {
  int64_t reserved = reserved_.load(std::memory_order_relaxed);
  do {
    if (bytes > budget_bytes_ - reserved) {
      return absl::ResourceExhaustedError(absl::StrCat("memory budget: the request needs ", bytes, " bytes, ",
                                                       reserved, " of ", budget_bytes_, " are reserved"));
    }
  } while (!reserved_.compare_exchange_weak(reserved, reserved + bytes, std::memory_order_relaxed));
  Changed(reserved + bytes);
  return Reservation(this, bytes);
}

int64_t AnswerHeldBytes(int64_t answer_bytes, AnswerWire wire) {
  if (wire.dtype == DType::kFloat32) return wire.in_place ? answer_bytes : 2 * answer_bytes;
  return answer_bytes + answer_bytes / 4 * static_cast<int64_t>(DTypeSize(wire.dtype));
}

int64_t RequestCostBytes(const ParsedAttention& p, const MhaConfig& c, int64_t engine_scratch_bytes,
                         int64_t request_bytes, AnswerWire answer_wire) {
  constexpr int64_t kF32 = 4;
  const int64_t e = c.embed_dim;
  // Inputs gathered into one matrix (when batched with others), and the projections: fused [N, 3E] for
  // self-attention, Q [N, E] and K, V [N_kv, E] otherwise; the output projection's buffer.
  const int64_t gathered = kF32 * (p.query_tokens() * e + p.kv_tokens() * (c.key_dim() + c.value_dim()));
  const int64_t projections = kF32 * (p.query_tokens() * 2 * e + p.kv_tokens() * 2 * e);
  const int64_t workspace = gathered + projections + engine_scratch_bytes;
  return request_bytes + workspace + AnswerHeldBytes(p.answer_bytes(), answer_wire);
}

int64_t AppendWeightsBytes(const AppendEngine& engine, int64_t tokens, int64_t context, bool averaged) {
  return int64_t{4} * tokens * context * (averaged ? 1 : engine.attention_heads());
}

int64_t AppendAnswerBytes(const CachedAppend& a, const AppendEngine& engine) {
  const int64_t context = a.cache->tokens() + (a.cross_attention ? 0 : a.tokens);
  const int64_t weights = a.need_weights ? AppendWeightsBytes(engine, a.tokens, context, a.average_attn_weights) : 0;
  return int64_t{4} * a.tokens * engine.embed_dim() + weights;
}

int64_t AppendCostBytes(const CachedAppend& a, const AppendEngine& engine, int64_t request_bytes,
                        AnswerWire answer_wire) {
  const int64_t context = a.cache->tokens() + (a.cross_attention ? 0 : a.tokens);
  const int64_t workspace = engine.AppendWorkspaceBytes(a.tokens, context);
  return request_bytes + workspace + AnswerHeldBytes(AppendAnswerBytes(a, engine), answer_wire);
}

int64_t ChunkedAnswerHeldBytes(const CachedAppend& a, const AppendEngine& engine, AnswerWire answer_wire) {
  const int64_t answer = AppendAnswerBytes(a, engine);
  return answer + AnswerHeldBytes(answer, answer_wire);
}

int64_t DecoderCostBytes(const ParsedDecoder& parsed, const DecoderAttention& decoder, int64_t request_bytes,
                         AnswerWire answer_wire) {
  return request_bytes + decoder.WorkspaceBytes(parsed) + AnswerHeldBytes(parsed.answer_bytes(), answer_wire);
}

int64_t MemoryLimitFromCgroup(const std::string& line) {
  if (line.empty() || line == "max") return 0;
  try {
    const long long v = std::stoll(line);
    // cgroup v1 reports "no limit" as a huge page-rounded number.
    return v <= 0 || v >= (int64_t{1} << 60) ? 0 : v;
  } catch (...) {
    return 0;
  }
}

namespace {

std::string FirstLine(const char* path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

}  // namespace

int64_t ProcessMemoryLimitBytes(std::string* source) {
  int64_t limit = MemoryLimitFromCgroup(FirstLine("/sys/fs/cgroup/memory.max"));
  std::string from = "cgroup memory.max";
  if (limit == 0) {
    limit = MemoryLimitFromCgroup(FirstLine("/sys/fs/cgroup/memory/memory.limit_in_bytes"));
    from = "cgroup memory.limit_in_bytes";
  }
  if (limit == 0) {
    limit = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<int64_t>(sysconf(_SC_PAGE_SIZE));
    from = "physical memory";
  }
  if (source != nullptr) *source = absl::StrCat(from, " (", limit, " bytes)");
  return limit;
}

int64_t DefaultMemoryBudgetBytes(std::string* source) {
  const int64_t limit = ProcessMemoryLimitBytes(source);
  if (source != nullptr) *source = absl::StrCat("half of ", *source);
  return limit / 2;
}

int64_t LayerBuildBytes(const attnserve::v1::LayerConfig& layer, int64_t weights_file_bytes) {
  constexpr int64_t kF32 = 4;
  (void)weights_file_bytes;  // the file is mapped: only the layer's own tensors are read from it
  if (layer.kind() == attnserve::v1::LayerConfig::DECODER_ATTENTION) {
    const DecoderConfig c = ToDecoderConfig(layer);
    const int64_t qkv = c.embed_dim * (c.q_width() + 2 * c.kv_width()), o = c.embed_dim * c.q_width();
    const int64_t biases = kF32 * 2 * (c.q_width() + 2 * c.kv_width() + c.embed_dim);
    if (layer.compute_dtype() == attnserve::v1::LayerConfig::BFLOAT16 && !layer.weights_path().empty()) {
      // Loaded straight into bf16: the matrices as loaded, each op's own copy, while loading Wq's part beside
      // the fused QKV rows, and the mapped pages of one tensor (at most its f32 size).
      constexpr int64_t kBf16 = 2;
      return kBf16 * (2 * (qkv + o) + o) + kF32 * o + biases;
    }
    // DecoderAttention::Create holds the weights as loaded and each op's own layout, and the mapped pages of
    // the tensors read (at most their f32 size); one fused QKV copy more is counted, as a margin.
    return kF32 * (4 * qkv + 3 * o) + biases;
  }
  const int64_t e = layer.embed_dim(), k = layer.kdim() > 0 ? layer.kdim() : e, v = layer.vdim() > 0 ? layer.vdim() : e;
  if (layer.compute_dtype() == attnserve::v1::LayerConfig::BFLOAT16 && !layer.weights_path().empty() && k == e &&
      v == e) {
    // Loaded straight into bf16 (LoadMhaWeights): the matrices as loaded, the fused and output ops' own copies,
    // Q, K and V ops of their own where the layout is blocked, and the mapped pages of the largest tensor read
    // (in_proj_weight, at most its f32 size).
    constexpr int64_t kBf16 = 2;
    return kBf16 * (4 * e * e + 4 * e * e + 3 * e * e) + kF32 * (3 * e * e + 4 * e);
  }
  const int64_t weights = e * (e + k + v) + e * e + 4 * e;  // floats: in_proj (Q, K, V), out_proj, biases
  // MultiheadAttention::BuildPrimitives holds, beside the weights as loaded, the input projections' own layout
  // (the fused Q/K/V op, or Q, K and V apart), and frees each matrix as an op takes it: less than reading
  // (this assumes the plain weights layout oneDNN 2.6's runtime-M matmuls take; a blocked one would add a
  // stacked copy and Q, K and V ops of their own, 6 E^2 more),
  // which holds the mapped pages of the tensors read (at most their f32 size) beside the weights taken from them.
  const int64_t building = kF32 * (weights + e * (e + k + v));
  const int64_t reading = 2 * kF32 * weights;
  return std::max(building, reading);
}

absl::Status CheckLayerFits(const attnserve::v1::LayerConfig& layer, int64_t weights_file_bytes,
                            int64_t limit_bytes, int64_t resident_bytes, int64_t request_budget_bytes) {
  const int64_t need = LayerBuildBytes(layer, weights_file_bytes);
  // A budget configured past half the limit would leave no layer loadable; half is the default anyway.
  const int64_t kept = std::min(request_budget_bytes, limit_bytes / 2);
  const int64_t available = limit_bytes - resident_bytes - kept;
  if (need <= available) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      "layer '", layer.name(), "': building it needs about ", need, " bytes; the process may use ", limit_bytes,
      ", holds ", resident_bytes, " and keeps ", kept, " for requests (memory_budget_bytes, at most half), leaving ",
      std::max<int64_t>(0, available)));
}

}  // namespace attnserve
