#include "core/multihead_attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/half_float.h"
#include "common/status_macros.h"
#include "core/activation_rows.h"
#include "core/attention_masks.h"
#include "core/bf16_rows.h"
#include "core/flash_attention.h"
#include "core/omp_threads.h"
#include "core/row_softmax.h"
#include "core/tasks_in_turn.h"

namespace attnserve {
namespace {

// Scratch buffers larger than this are freed after each call, so one long request does not pin its
// high-water mark on a worker thread for good.
constexpr size_t kRetainBytes = size_t{256} << 20;

// Per-thread scratch, reused across calls and layers.
struct Workspace {
  std::vector<float> gather_q, gather_k, gather_v;  // inputs of a group, concatenated
  std::vector<uint16_t> gather16_q, gather16_k, gather16_v;  // the same for a bf16 layer's matmuls
  std::vector<float> q, k, v;                       // projections: q is [N, 3E] (fused) or [N, E]
  std::vector<float> context_out;                   // output projection of a multi-request group
  std::vector<float> scores;                        // one query block, [nb, H, lb, S]
  std::vector<float> mask_rows;                     // combined additive mask of a block, [nb, lb, S]
  std::vector<uint8_t> dead_rows;                   // rows whose keys are all masked, [nb, H, lb]
  std::vector<uint16_t> q16, k16, v16;              // bf16 layers: the projections in bf16, as q, k, v
  std::vector<uint16_t> probs16;                    // bf16 layers: one block's probabilities in bf16
  std::vector<uint16_t> context16;                  // bf16 layers on the short path: the context, [N, E]

  template <typename T>
  static T* Grow(std::vector<T>& buf, size_t n) {
    if (buf.size() < n) buf.resize(n);
    return buf.data();
  }
  void ReleaseLarge(size_t keep_bytes = kRetainBytes) {
    for (auto* buf : {&gather_q, &gather_k, &gather_v, &q, &k, &v, &context_out, &scores, &mask_rows}) {
      if (buf->capacity() * sizeof(float) > keep_bytes) std::vector<float>().swap(*buf);
    }
    if (dead_rows.capacity() > keep_bytes) std::vector<uint8_t>().swap(dead_rows);
    for (auto* buf : {&gather16_q, &gather16_k, &gather16_v, &q16, &k16, &v16, &probs16, &context16}) {
      if (buf->capacity() * sizeof(uint16_t) > keep_bytes) std::vector<uint16_t>().swap(*buf);
    }
  }
};

Workspace& ThreadWorkspace() {
  thread_local Workspace ws;
  return ws;
}

// How Attend cuts a request into blocks whose scores [seqs, heads, rows, S] fit the budget.
struct BlockPlan {
  int64_t seqs, heads, rows;
};

// Short sequences: whole sequences, all heads, as many as fit (few, larger matmuls). Long ones: one
// sequence, all heads or one head, at least min_block_rows query rows (Options::min_block_rows).
BlockPlan PlanBlocks(int64_t batch, int64_t heads, int64_t len_q, int64_t len_k, int64_t budget_bytes,
                     int64_t min_block_rows) {
  const int64_t row_bytes = len_k * static_cast<int64_t>(sizeof(float));
  const int64_t seq_bytes = heads * len_q * row_bytes;
  if (seq_bytes <= budget_bytes) return {std::min(batch, budget_bytes / seq_bytes), heads, len_q};
  const int64_t min_rows = std::min(len_q, min_block_rows);
  const int64_t rows_all_heads = budget_bytes / (heads * row_bytes);
  if (rows_all_heads >= min_rows) return {1, heads, std::min(len_q, rows_all_heads)};
  return {1, 1, std::clamp(budget_bytes / row_bytes, min_rows, len_q)};
}

}  // namespace

int64_t MultiheadAttention::ScoresBlockBytes(const ParsedAttention& p) const {
  constexpr int64_t kF32 = sizeof(float);
  const int64_t h = options_.config.num_heads;
  // Each thread holds a whole sequence's heads (or a group of them) at a time: no block plan.
  if (UsesShort(p)) return short_attention_->ScratchBytes(h, p.q_len, p.kv_len) * omp_get_max_threads();
  const int64_t attention_flops = 4 * p.batch * p.q_len * p.kv_len * options_.config.embed_dim;
  if (attention_flops >= options_.small_attention_flops && UsesFlash(p)) {
    return FlashScratchBytes(FlashShape(p)) * omp_get_max_threads() + KeyPaddingBiasFloats(p) * kF32;
  }
  const BlockPlan plan = PlanBlocks(p.batch, h, p.q_len, p.kv_len, options_.scores_block_bytes,
                                    options_.min_block_rows);
  const int64_t block = plan.seqs * plan.heads * plan.rows * p.kv_len * kF32;
  if (plan.seqs >= p.batch || attention_flops >= options_.small_attention_flops) return block;
  // A small request is cut into units that run side by side (PlanAttentionUnits), each thread with a block.
  const int64_t all_scores = p.batch * h * p.q_len * p.kv_len * kF32;
  return std::min(all_scores, block * omp_get_max_threads());
}

int64_t MultiheadAttention::Bf16ScratchBytes(const ParsedAttention& p) const {
  if (compute_ != ComputeType::kBFloat16) return 0;
  constexpr int64_t kBf16 = 2;
  const MhaConfig& c = options_.config;
  const int64_t e = c.embed_dim;
  // Inputs converted for the projections, Q/K/V in bf16, the scores block's probabilities, the context.
  const int64_t inputs = kBf16 * (p.query_tokens() * e + p.kv_tokens() * (c.key_dim() + c.value_dim()));
  const int64_t qkv = kBf16 * (p.query_tokens() * e + p.kv_tokens() * 2 * e);
  return inputs + qkv + ScoresBlockBytes(p) / 2 + kBf16 * p.query_tokens() * e;
}

void ReleaseThreadScratch(size_t keep_bytes) {
  ThreadWorkspace().ReleaseLarge(keep_bytes);
  ReleaseShortAttentionBuffers(keep_bytes);
}

struct MultiheadAttention::Group {
  bool self_attention = false;
  std::vector<const ParsedAttention*> members;
  std::vector<AttentionOutputs*> outputs;  // same order as members
  std::vector<size_t> index;               // each member's index in the ForwardParsed call
};

// A group's projections: Q (then the context, written over it) with row stride ldq, K and V; rows of all
// members one after another.
struct MultiheadAttention::Projected {
  float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t ldq = 0, ldk = 0, ldv = 0;
  int64_t q_rows = 0;
  // bf16 layers: Q, K and V in bf16 (row stride ld16), which the attention matmuls read; null in f32.
  const uint16_t* q16 = nullptr;
  const uint16_t* k16 = nullptr;
  const uint16_t* v16 = nullptr;
  int64_t ld16 = 0;
  uint16_t* qkv16 = nullptr;  // ProjectShortToBf16Buffers: the rows of q16, k16 and v16, to be written
  // bf16 layers whose members all take ShortAttention: the context in bf16 [q_rows, E], which the output
  // projection reads (no f32 context, no conversion); null otherwise (the context is written over Q).
  uint16_t* context16 = nullptr;
};

// One block of Attend: sequences [b0, b0+nb), heads [h0, h0+hb), query rows [l0, l0+lb), keys [0, cols).
struct MultiheadAttention::Block {
  int64_t b0, nb, h0, hb, l0, lb, cols;
};

MultiheadAttention::~MultiheadAttention() = default;

namespace {

// ShortAttention holds [hb, L, S] scores per thread and caches a shape per (L, S) in 16s: past 512 tokens both
// grow beyond what its per-sequence design is for (FlashAttention takes such lengths).
constexpr int64_t kMaxShortAttentionLen = 512;

// The options that shape the attention's blocks and threads (every one is a size or a threshold).
absl::Status CheckBlockOptions(const MultiheadAttention::Options& options) {
  if (options.scores_block_bytes < 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("scores_block_bytes must be >= 4, got ", options.scores_block_bytes));
  }
  if (options.min_block_rows < 1) {
    return absl::InvalidArgumentError(absl::StrCat("min_block_rows must be >= 1, got ", options.min_block_rows));
  }
  if (options.softmax_cache_capacity < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("softmax_cache_capacity must be >= 1, got ", options.softmax_cache_capacity));
  }
  if (options.single_thread_below_flops < 0 || options.small_attention_flops < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "single_thread_below_flops and small_attention_flops must be >= 0, got ", options.single_thread_below_flops,
        " and ", options.small_attention_flops));
  }
  if (options.flash_min_keys < 0 || options.flash_query_rows < 0 || options.flash_key_cols < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "flash_min_keys, flash_query_rows and flash_key_cols must be >= 0, got ", options.flash_min_keys,
        ", ", options.flash_query_rows, " and ", options.flash_key_cols));
  }
  if (options.short_attention_max_len < 0 || options.short_attention_max_len > kMaxShortAttentionLen) {
    return absl::InvalidArgumentError(absl::StrCat("short_attention_max_len must be in [0, ", kMaxShortAttentionLen,
                                                   "], got ", options.short_attention_max_len));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<MultiheadAttention>> MultiheadAttention::Create(const Options& options,
                                                                              MhaWeights weights) {
  ATTN_RETURN_IF_ERROR(options.config.Validate());
  ATTN_RETURN_IF_ERROR(weights.CheckShapes(options.config));
  ATTN_RETURN_IF_ERROR(CheckBlockOptions(options));
  Options resolved = options;
  const auto [cpu_rows, cpu_keys] = FlashBlockForCpu(options.compute);
  if (resolved.flash_query_rows == 0) resolved.flash_query_rows = cpu_rows;
  if (resolved.flash_key_cols == 0) resolved.flash_key_cols = cpu_keys;
  auto layer = std::unique_ptr<MultiheadAttention>(new MultiheadAttention(resolved));
  layer->compute_ = options.compute == ComputeType::kBFloat16 && OnednnBf16Support() != Bf16Support::kUnavailable
                        ? ComputeType::kBFloat16
                        : ComputeType::kFloat32;
  ATTN_RETURN_IF_ERROR(layer->BuildPrimitives(std::move(weights)));
  return layer;
}

namespace {

// Q, K or V alone: a slice of the fused projection, sharing its weights, where there is one; else an op of its
// own.
absl::StatusOr<std::unique_ptr<LinearOp>> SliceOrBuild(const LinearOp* fused, int64_t n_begin, int64_t k, int64_t n,
                                                       const std::vector<float>& weight,
                                                       const std::vector<float>& bias, ComputeType compute) {
  if (fused != nullptr) {
    absl::StatusOr<std::unique_ptr<LinearOp>> slice = LinearOp::CreateSlice(*fused, n_begin, n, bias);
    if (!absl::IsUnimplemented(slice.status())) return slice;
  }
  return LinearOp::Create(k, n, weight, bias, compute);
}

}  // namespace

// Self-attention layers hold 4 E^2 weights: the fused Q/K/V op, the Q, K and V ops as slices of it, the output
// op. Each source matrix is freed once an op holds it, and none is copied on the way.
absl::Status MultiheadAttention::BuildPrimitives(MhaWeights weights) {
  const MhaConfig& c = options_.config;
  const int64_t e = c.embed_dim;
  // 1/sqrt(Dh) is folded into the Q weights and bias: the scores matmul then needs no scaling pass.
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim()));
  std::vector<float> bq, bk, bv;
  if (c.bias) {
    for (int64_t i = 0; i < e; ++i) weights.in_proj_bias[i] *= scale;
    bq.assign(weights.in_proj_bias.begin(), weights.in_proj_bias.begin() + e);
    bk.assign(weights.in_proj_bias.begin() + e, weights.in_proj_bias.begin() + 2 * e);
    bv.assign(weights.in_proj_bias.begin() + 2 * e, weights.in_proj_bias.end());
  }
  ATTN_RETURN_IF_ERROR(weights.bf16() ? BuildProjectionsFromBf16(weights, scale, {&bq, &bk, &bv})
                                      : BuildProjections(weights, scale, {&bq, &bk, &bv}));
  using Kind = HeadMatmulOp::Kind;
  const ComputeType ct = compute_;
  ATTN_ASSIGN_OR_RETURN(scores_op_, HeadMatmulOp::Create(Kind::kScores, c.head_dim(), ct));
  ATTN_ASSIGN_OR_RETURN(context_op_, HeadMatmulOp::Create(Kind::kContext, c.head_dim(), ct));
  ATTN_ASSIGN_OR_RETURN(context_add_op_, HeadMatmulOp::Create(Kind::kContextAdd, c.head_dim(), ct));
  return BuildBlockMatmuls();
}

absl::Status MultiheadAttention::BuildProjections(MhaWeights& weights, float scale,
                                                  const std::array<const std::vector<float>*, 3>& qkv_bias) {
  const MhaConfig& c = options_.config;
  const int64_t e = c.embed_dim;
  for (float& w : weights.q_proj_weight) w *= scale;
  const ComputeType ct = compute_;
  if (c.same_qkv_dim()) {
    ATTN_ASSIGN_OR_RETURN(
        qkv_proj_, LinearOp::CreateStacked(e, {&weights.q_proj_weight, &weights.k_proj_weight, &weights.v_proj_weight},
                                           weights.in_proj_bias, ct));
  }
  ATTN_ASSIGN_OR_RETURN(q_proj_, SliceOrBuild(qkv_proj_.get(), 0, e, e, weights.q_proj_weight, *qkv_bias[0], ct));
  ATTN_ASSIGN_OR_RETURN(k_proj_,
                        SliceOrBuild(qkv_proj_.get(), e, c.key_dim(), e, weights.k_proj_weight, *qkv_bias[1], ct));
  ATTN_ASSIGN_OR_RETURN(
      v_proj_, SliceOrBuild(qkv_proj_.get(), 2 * e, c.value_dim(), e, weights.v_proj_weight, *qkv_bias[2], ct));
  for (std::vector<float>* part : {&weights.q_proj_weight, &weights.k_proj_weight, &weights.v_proj_weight}) {
    std::vector<float>().swap(*part);
  }
  ATTN_ASSIGN_OR_RETURN(out_proj_, LinearOp::Create(e, e, weights.out_proj_weight, weights.out_proj_bias, ct));
  return absl::OkStatus();
}

// A bf16 checkpoint's matrices as loaded, with no f32 copy: only Wq's rows are rescaled (exactly when Dh is a
// power of 4, 1/sqrt(Dh) then being a power of 2; else rounded once to nearest even, within bf16's own error).
absl::Status MultiheadAttention::BuildProjectionsFromBf16(MhaWeights& weights, float scale,
                                                          const std::array<const std::vector<float>*, 3>& qkv_bias) {
  const int64_t e = options_.config.embed_dim;
  std::vector<uint16_t>& in_proj = weights.in_proj_weight_bf16;
  for (int64_t i = 0; i < e * e; ++i) in_proj[i] = FloatToBFloat16(BFloat16ToFloat(in_proj[i]) * scale);
  ATTN_ASSIGN_OR_RETURN(qkv_proj_, LinearOp::CreateFromBf16(e, 3 * e, in_proj, weights.in_proj_bias, compute_));
  std::unique_ptr<LinearOp>* parts[] = {&q_proj_, &k_proj_, &v_proj_};
  for (int64_t p = 0; p < 3; ++p) {
    absl::StatusOr<std::unique_ptr<LinearOp>> slice = LinearOp::CreateSlice(*qkv_proj_, p * e, e, *qkv_bias[p]);
    if (absl::IsUnimplemented(slice.status())) {  // a blocked layout: an op of its own rows
      const std::vector<uint16_t> rows(in_proj.begin() + p * e * e, in_proj.begin() + (p + 1) * e * e);
      slice = LinearOp::CreateFromBf16(e, e, rows, *qkv_bias[p], compute_);
    }
    if (!slice.ok()) return slice.status();
    *parts[p] = std::move(*slice);
  }
  std::vector<uint16_t>().swap(in_proj);
  ATTN_ASSIGN_OR_RETURN(out_proj_,
                        LinearOp::CreateFromBf16(e, e, weights.out_proj_weight_bf16, weights.out_proj_bias, compute_));
  std::vector<uint16_t>().swap(weights.out_proj_weight_bf16);
  return absl::OkStatus();
}

absl::Status MultiheadAttention::BuildBlockMatmuls() {
  if (compute_ != ComputeType::kBFloat16) return absl::OkStatus();
  if (options_.short_attention_max_len > 0) {
    absl::StatusOr<std::unique_ptr<ShortAttention>> short_attention =
        ShortAttention::Create({options_.config.head_dim(), options_.short_attention_max_len});
    if (!short_attention.ok() && !absl::IsUnimplemented(short_attention.status())) return short_attention.status();
    if (short_attention.ok()) short_attention_ = *std::move(short_attention);
  }
  if (options_.flash_min_keys == 0) return absl::OkStatus();
  ATTN_ASSIGN_OR_RETURN(
      FlashBlockMatmuls blocks,
      CreateFlashBlockMatmuls(options_.flash_query_rows, options_.flash_key_cols, options_.config.head_dim()));
  block_scores_ = std::move(blocks.scores);
  block_context_ = std::move(blocks.context);
  return absl::OkStatus();
}

absl::StatusOr<ParsedAttention> MultiheadAttention::Validate(const AttentionInputs& inputs) const {
  return ParseAttentionInputs(inputs, options_.config, options_.limits);
}

absl::StatusOr<AttentionOutputs> MultiheadAttention::Forward(const AttentionInputs& inputs, int max_threads) const {
  const AttentionInputs* one[] = {&inputs};
  return std::move(ForwardBatch(one, max_threads)[0]);
}

std::vector<absl::StatusOr<AttentionOutputs>> MultiheadAttention::ForwardBatch(
    absl::Span<const AttentionInputs* const> requests, int max_threads) const {
  std::vector<absl::StatusOr<ParsedAttention>> parsed;
  parsed.reserve(requests.size());
  std::vector<const ParsedAttention*> valid;
  for (const AttentionInputs* in : requests) {
    parsed.push_back(Validate(*in));
    if (parsed.back().ok()) valid.push_back(&*parsed.back());
  }
  std::vector<absl::StatusOr<AttentionOutputs>> computed = ForwardParsed(valid, max_threads);
  std::vector<absl::StatusOr<AttentionOutputs>> results;
  results.reserve(requests.size());
  for (size_t i = 0, next = 0; i < requests.size(); ++i) {
    if (parsed[i].ok()) {
      results.push_back(std::move(computed[next++]));
    } else {
      results.emplace_back(parsed[i].status());
    }
  }
  return results;
}

namespace {

// The answer tensors of one request, zeroed: [B, L, E] and, with need_weights, [B, L, S] or [B, H, L, S]
// (B dropped when unbatched).
AttentionOutputs AllocateOutputs(const ParsedAttention& p, const MhaConfig& c) {
  AttentionOutputs out;
  const int64_t b = p.batch, l = p.q_len, s = p.kv_len;
  out.output = Tensor(p.unbatched ? Shape{l, c.embed_dim} : Shape{b, l, c.embed_dim});
  if (p.inputs->need_weights) {
    Shape ws = p.inputs->average_attn_weights ? Shape{b, l, s} : Shape{b, c.num_heads, l, s};
    if (p.unbatched) ws.erase(ws.begin());
    out.attn_weights = Tensor(ws);
  }
  return out;
}

}  // namespace

std::vector<absl::StatusOr<AttentionOutputs>> MultiheadAttention::ForwardParsed(
    absl::Span<const ParsedAttention* const> requests, int max_threads, const StopFn& stop) const {
  std::vector<absl::StatusOr<AttentionOutputs>> results;
  results.reserve(requests.size());
  Group groups[2];  // [0]: self-attention (fused QKV), [1]: cross-attention
  groups[0].self_attention = true;
  int64_t flops = 0;
  for (const ParsedAttention* p : requests) results.emplace_back(AllocateOutputs(*p, options_.config));
  for (size_t i = 0; i < requests.size(); ++i) {
    flops += requests[i]->flops;
    Group& g = groups[requests[i]->self_attention ? 0 : 1];
    g.members.push_back(requests[i]);
    g.outputs.push_back(&*results[i]);
    g.index.push_back(i);
  }
  const int budget = max_threads > 0 ? max_threads : omp_get_max_threads();
  const int threads = flops < options_.single_thread_below_flops ? 1 : budget;
  // oneDNN reads the team size of the calling thread when it executes a primitive.
  const ScopedOmpThreads team(threads);
  for (const Group& g : groups) {
    if (g.members.empty()) continue;
    std::vector<absl::Status> member_status(g.members.size());
    const absl::Status status = RunGroup(g, threads, stop, &member_status);
    for (size_t m = 0; m < g.members.size(); ++m) {
      if (!status.ok()) {
        results[g.index[m]] = status;
      } else if (!member_status[m].ok()) {
        results[g.index[m]] = member_status[m];
      }
    }
  }
  ThreadWorkspace().ReleaseLarge();
  return results;
}

absl::Status MultiheadAttention::RunGroup(const Group& g, int threads, const StopFn& stop,
                                          std::vector<absl::Status>* member_status) const {
  if (absl::StatusOr<std::vector<absl::Status>> fused = RunShortFused(g, threads, stop);
      !absl::IsUnimplemented(fused.status())) {
    ATTN_RETURN_IF_ERROR(fused.status());
    *member_status = *std::move(fused);
    return absl::OkStatus();
  }
  ATTN_ASSIGN_OR_RETURN(const Projected proj, Project(g));
  *member_status = AttendGroup(g, proj, threads, stop);
  // Members that stopped still go through the output projection (one matmul for all); their rows are
  // simply not answered.
  return ProjectOutput(g, proj);
}

namespace {

// One of the members' input tensors (query, key or value: `field`), in the members' order.
std::vector<const TensorView*> MemberTensors(const std::vector<const ParsedAttention*>& members,
                                             TensorView AttentionInputs::*field) {
  std::vector<const TensorView*> tensors;
  for (const ParsedAttention* p : members) tensors.push_back(&(p->inputs->*field));
  return tensors;
}

}  // namespace

absl::StatusOr<MultiheadAttention::Projected> MultiheadAttention::Project(const Group& g) const {
  const MhaConfig& c = options_.config;
  const int64_t e = c.embed_dim;
  Workspace& ws = ThreadWorkspace();
  if (absl::StatusOr<Projected> direct = ProjectShortToBf16(g); !absl::IsUnimplemented(direct.status())) {
    return direct;
  }
  int64_t n_q = 0, n_kv = 0;
  for (const ParsedAttention* p : g.members) {
    n_q += p->query_tokens();
    n_kv += p->kv_tokens();
  }
  const std::vector<const TensorView*> queries = MemberTensors(g.members, &AttentionInputs::query);
  Projected proj;
  proj.q_rows = n_q;
  if (g.self_attention) {
    proj.q = Workspace::Grow(ws.q, static_cast<size_t>(n_q * 3 * e));
    ATTN_RETURN_IF_ERROR(ProjectRows(*qkv_proj_, queries, n_q, e, ws.gather_q, ws.gather16_q, proj.q, 3 * e));
    proj.ldq = proj.ldk = proj.ldv = 3 * e;
    proj.k = proj.q + e;
    proj.v = proj.q + 2 * e;
    PrepareBf16(g, n_q, n_q, &proj);
    return proj;
  }
  proj.q = Workspace::Grow(ws.q, static_cast<size_t>(n_q * e));
  float* kp = Workspace::Grow(ws.k, static_cast<size_t>(n_kv * e));
  float* vp = Workspace::Grow(ws.v, static_cast<size_t>(n_kv * e));
  ATTN_RETURN_IF_ERROR(ProjectRows(*q_proj_, queries, n_q, e, ws.gather_q, ws.gather16_q, proj.q, e));
  const std::vector<const TensorView*> keys = MemberTensors(g.members, &AttentionInputs::key);
  const std::vector<const TensorView*> values = MemberTensors(g.members, &AttentionInputs::value);
  ATTN_RETURN_IF_ERROR(ProjectRows(*k_proj_, keys, n_kv, c.key_dim(), ws.gather_k, ws.gather16_k, kp, e));
  ATTN_RETURN_IF_ERROR(ProjectRows(*v_proj_, values, n_kv, c.value_dim(), ws.gather_v, ws.gather16_v, vp, e));
  proj.ldq = proj.ldk = proj.ldv = e;
  proj.k = kp;
  proj.v = vp;
  PrepareBf16(g, n_q, n_kv, &proj);
  return proj;
}

bool MultiheadAttention::AllShort(const Group& g) const {
  return std::all_of(g.members.begin(), g.members.end(), [&](const ParsedAttention* p) { return UsesShort(*p); });
}

absl::StatusOr<MultiheadAttention::Projected> MultiheadAttention::ProjectShortToBf16Buffers(const Group& g) const {
  if (!g.self_attention || qkv_proj_ == nullptr || !qkv_proj_->writes_bf16() || !AllShort(g)) {
    return absl::UnimplementedError("Q, K and V are projected in f32 here");
  }
  const int64_t e = options_.config.embed_dim;
  Workspace& ws = ThreadWorkspace();
  Projected proj;
  for (const ParsedAttention* p : g.members) proj.q_rows += p->query_tokens();
  const int64_t n_q = proj.q_rows;
  uint16_t* qkv16 = Workspace::Grow(ws.q16, static_cast<size_t>(n_q * 3 * e));
  proj.qkv16 = qkv16;
  proj.q16 = qkv16;
  proj.k16 = qkv16 + e;
  proj.v16 = qkv16 + 2 * e;
  proj.ld16 = 3 * e;
  // f32 rows [n_q, E] that only AttendShort's fallback to the blocked path writes (its context, reading the
  // bf16 rows); K and V are never read in f32 here. Zeroed when first grown (std::vector), then kept.
  proj.q = Workspace::Grow(ws.q, static_cast<size_t>(n_q * e));
  proj.k = proj.v = proj.q;
  proj.ldq = proj.ldk = proj.ldv = e;
  proj.context16 = Workspace::Grow(ws.context16, static_cast<size_t>(n_q * e));
  return proj;
}

absl::StatusOr<MultiheadAttention::Projected> MultiheadAttention::ProjectShortToBf16(const Group& g) const {
  ATTN_ASSIGN_OR_RETURN(Projected proj, ProjectShortToBf16Buffers(g));
  const int64_t e = options_.config.embed_dim;
  const std::vector<const TensorView*> queries = MemberTensors(g.members, &AttentionInputs::query);
  ATTN_RETURN_IF_ERROR(
      ProjectRowsToBf16(*qkv_proj_, queries, proj.q_rows, e, ThreadWorkspace().gather16_q, proj.qkv16, proj.ld16));
  return proj;
}

namespace {

// Sequences [seq_begin, seq_end) of one member of a group: a chunk of RunShortFused's work.
struct ShortChunk {
  size_t member;
  int64_t seq_begin, seq_end;
  int64_t q_row;  // the chunk's first row in the group's projections
};

// Rows per chunk: 128-row pieces ran the projections fastest (onednn_linear_op.cc); a longer sequence is a chunk.
constexpr int64_t kFusedChunkRows = 128;
// Weights (QKV and output projections) a fused group may have: 2 MiB, a core's L2 on the AMX Xeons (E=512 in bf16:
// exactly). On 1 MiB of L2 (AMD EPYC, AVX512_BF16) E=512 still ran 2-6% faster fused than staged (BENCHMARKS.md).
constexpr int64_t kFusedWeightBytes = int64_t{2} << 20;

std::vector<ShortChunk> ShortChunks(const std::vector<const ParsedAttention*>& members) {
  std::vector<ShortChunk> chunks;
  int64_t row = 0;
  for (size_t i = 0; i < members.size(); ++i) {
    const ParsedAttention& p = *members[i];
    const int64_t per_chunk = std::max<int64_t>(1, kFusedChunkRows / p.q_len);
    for (int64_t b = 0; b < p.batch; b += per_chunk) {
      chunks.push_back({i, b, std::min(p.batch, b + per_chunk), row + b * p.q_len});
    }
    row += p.query_tokens();
  }
  return chunks;
}

// Rows [b0 * L, b1 * L) of a request's query [B, L, E] as a view of their own.
TensorView QueryRows(const ParsedAttention& p, int64_t b0, int64_t b1, int64_t e) {
  const TensorView& q = p.inputs->query;
  const size_t offset = static_cast<size_t>(b0 * p.q_len * e) * DTypeSize(q.dtype);
  return TensorView{q.dtype, {(b1 - b0) * p.q_len, e}, static_cast<const char*>(q.data) + offset};
}

}  // namespace

absl::StatusOr<std::vector<absl::Status>> MultiheadAttention::RunShortFused(const Group& g, int threads,
                                                                           const StopFn& stop) const {
  // Each chunk reads the QKV and output weights: only while they stay near a core's L2 (the column-panel ops
  // above 4 MiB are read once per call instead, onednn_linear_op.cc).
  if (threads < 2 || compute_ != ComputeType::kBFloat16 || !out_proj_->writes_bf16() ||
      qkv_proj_ == nullptr || qkv_proj_->owned_weight_bytes() + out_proj_->owned_weight_bytes() > kFusedWeightBytes) {
    return absl::UnimplementedError("not fused: one thread, or weights over kFusedWeightBytes");
  }
  const std::vector<ShortChunk> chunks = ShortChunks(g.members);
  if (static_cast<int64_t>(chunks.size()) < 2 * threads) return absl::UnimplementedError("not fused: too few chunks");
  ATTN_ASSIGN_OR_RETURN(Projected proj, ProjectShortToBf16Buffers(g));
  const int64_t e = options_.config.embed_dim, heads = options_.config.num_heads;
  auto run_chunk = [&](const ShortChunk& c) -> absl::Status {
    const ParsedAttention& p = *g.members[c.member];
    auto should_stop = [&] { return stop ? stop(g.index[c.member]) : absl::OkStatus(); };
    ATTN_RETURN_IF_ERROR(should_stop());
    const int64_t rows = (c.seq_end - c.seq_begin) * p.q_len, member_row = c.q_row - c.seq_begin * p.q_len;
    const TensorView input = QueryRows(p, c.seq_begin, c.seq_end, e);
    const TensorView* inputs[] = {&input};
    ATTN_RETURN_IF_ERROR(ProjectRowsToBf16(*qkv_proj_, inputs, rows, e, ThreadWorkspace().gather16_q,
                                           proj.qkv16 + c.q_row * proj.ld16, proj.ld16));
    ATTN_RETURN_IF_ERROR(
        AttendShort(p, c.seq_begin, c.seq_end, 0, heads, proj, member_row, member_row, should_stop));
    float* out = g.outputs[c.member]->output.values.data() + c.seq_begin * p.q_len * e;
    return out_proj_->ExecuteBf16(proj.context16 + c.q_row * e, rows, e, out, e);
  };
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  const std::vector<absl::Status> chunk_status =
      RunTasksInTurn(threads, num_chunks, [&](int64_t i) { return run_chunk(chunks[i]); },
                     "attention: out of memory in a chunk of rows");
  fused_short_chunks_.fetch_add(num_chunks, std::memory_order_relaxed);
  std::vector<absl::Status> member_status(g.members.size());
  for (size_t i = 0; i < chunks.size(); ++i) {
    if (!chunk_status[i].ok() && member_status[chunks[i].member].ok()) {
      member_status[chunks[i].member] = chunk_status[i];
    }
  }
  return member_status;
}

void MultiheadAttention::PrepareBf16(const Group& g, int64_t q_rows, int64_t kv_rows, Projected* proj) const {
  if (compute_ != ComputeType::kBFloat16) return;
  if (!AllShort(g)) {
    MirrorBf16(q_rows, kv_rows, proj);
    return;
  }
  const size_t context_values = static_cast<size_t>(q_rows * options_.config.embed_dim);
  proj->context16 = Workspace::Grow(ThreadWorkspace().context16, context_values);
}

void MultiheadAttention::MirrorBf16(int64_t q_rows, int64_t kv_rows, Projected* proj) const {
  const int64_t e = options_.config.embed_dim;
  Workspace& ws = ThreadWorkspace();
  if (proj->k == proj->q + e) {  // fused [N, 3E]: one pass over all three, row stride 3E kept
    uint16_t* qkv16 = Workspace::Grow(ws.q16, static_cast<size_t>(q_rows * 3 * e));
    FloatRowsToBf16Parallel(proj->q, q_rows, 3 * e, proj->ldq, qkv16, 3 * e);
    proj->q16 = qkv16;
    proj->k16 = qkv16 + e;
    proj->v16 = qkv16 + 2 * e;
    proj->ld16 = 3 * e;
    return;
  }
  uint16_t* q16 = Workspace::Grow(ws.q16, static_cast<size_t>(q_rows * e));
  uint16_t* k16 = Workspace::Grow(ws.k16, static_cast<size_t>(kv_rows * e));
  uint16_t* v16 = Workspace::Grow(ws.v16, static_cast<size_t>(kv_rows * e));
  FloatRowsToBf16Parallel(proj->q, q_rows, e, proj->ldq, q16, e);
  FloatRowsToBf16Parallel(proj->k, kv_rows, e, proj->ldk, k16, e);
  FloatRowsToBf16Parallel(proj->v, kv_rows, e, proj->ldv, v16, e);
  proj->q16 = q16;
  proj->k16 = k16;
  proj->v16 = v16;
  proj->ld16 = e;
}

namespace {

// Sequences [seq_begin, seq_end), heads [h_begin, h_end) of one member of a group: the unit of attention work.
struct AttentionUnit {
  size_t member;
  int64_t seq_begin, seq_end, h_begin, h_end;
};

// Small requests (attention below `small_flops`) are cut into units of a few sequences, about four per
// thread from one request so that a lone request still spreads over the threads; large ones are listed
// whole, to run one after another with every thread inside oneDNN. Requests on the short path (`is_short`)
// are units whatever their size (their matmuls are single-threaded), with the heads of a sequence split in
// groups when there are fewer than two sequences per thread.
void PlanAttentionUnits(const std::vector<const ParsedAttention*>& members, int64_t embed_dim, int64_t heads,
                        int64_t threads, int64_t small_flops, absl::FunctionRef<bool(const ParsedAttention&)> is_short,
                        std::vector<AttentionUnit>* small, std::vector<size_t>* large) {
  for (size_t i = 0; i < members.size(); ++i) {
    const ParsedAttention& p = *members[i];
    const int64_t attention_flops = 4 * p.batch * p.q_len * p.kv_len * embed_dim;
    const bool short_path = is_short(p);
    if (attention_flops >= small_flops && !short_path) {
      large->push_back(i);
      continue;
    }
    const int64_t head_groups = short_path && threads > 1 && p.batch < 2 * threads
                                    ? std::min(heads, (2 * threads + p.batch - 1) / p.batch)
                                    : 1;
    const int64_t per_group = (heads + head_groups - 1) / head_groups;
    const int64_t per_unit = head_groups > 1 ? 1 : std::max<int64_t>(1, p.batch / (4 * threads));
    for (int64_t b = 0; b < p.batch; b += per_unit) {
      for (int64_t h = 0; h < heads; h += per_group) {
        small->push_back({i, b, std::min(p.batch, b + per_unit), h, std::min(heads, h + per_group)});
      }
    }
  }
}

}  // namespace

std::vector<absl::Status> MultiheadAttention::AttendGroup(const Group& g, const Projected& proj, int threads,
                                                          const StopFn& stop) const {
  const size_t n = g.members.size();
  std::vector<int64_t> q_rows(n), kv_rows(n);  // each member's first row in the projections
  for (size_t i = 0, q_row = 0, kv_row = 0; i < n; ++i) {
    q_rows[i] = static_cast<int64_t>(q_row);
    kv_rows[i] = static_cast<int64_t>(kv_row);
    q_row += g.members[i]->query_tokens();
    kv_row += g.members[i]->kv_tokens();
  }
  std::vector<AttentionUnit> small;
  std::vector<size_t> large;
  const int64_t heads = options_.config.num_heads;
  PlanAttentionUnits(
      g.members, options_.config.embed_dim, heads, threads, options_.small_attention_flops,
      [this](const ParsedAttention& p) { return UsesShort(p); }, &small, &large);
  auto attend = [&](const AttentionUnit& u) {
    const ParsedAttention& p = *g.members[u.member];
    auto should_stop = [&] { return stop ? stop(g.index[u.member]) : absl::OkStatus(); };
    if (UsesShort(p)) {
      return AttendShort(p, u.seq_begin, u.seq_end, u.h_begin, u.h_end, proj, q_rows[u.member], kv_rows[u.member],
                         should_stop);
    }
    Tensor* weights = p.inputs->need_weights ? &g.outputs[u.member]->attn_weights : nullptr;
    return Attend(p, u.seq_begin, u.seq_end, u.h_begin, u.h_end, proj, q_rows[u.member], kv_rows[u.member], weights,
                  should_stop);
  };
  std::vector<absl::Status> unit_statuses(small.size());
  const int64_t num_small = static_cast<int64_t>(small.size());
  if (num_small == 1 || threads == 1) {
    // No parallel construct at all: even a serialized one (`if` false) would make every oneDNN call
    // inside it a nested region, and libgomp starts fresh threads for each nested team.
    for (int64_t u = 0; u < num_small; ++u) unit_statuses[u] = attend(small[u]);
  } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t u = 0; u < num_small; ++u) unit_statuses[u] = attend(small[u]);
  }
  std::vector<absl::Status> member_status(n);
  for (size_t u = 0; u < small.size(); ++u) {
    if (!unit_statuses[u].ok()) member_status[small[u].member] = unit_statuses[u];
  }
  for (size_t i : large) {
    const ParsedAttention& p = *g.members[i];
    auto should_stop = [&] { return stop ? stop(g.index[i]) : absl::OkStatus(); };
    member_status[i] = UsesFlash(p) ? AttendFlash(p, proj, q_rows[i], kv_rows[i], threads, should_stop)
                                    : attend({i, 0, p.batch, 0, heads});
  }
  return member_status;
}

bool MultiheadAttention::UsesShort(const ParsedAttention& p) const {
  return short_attention_ != nullptr && !p.inputs->need_weights && short_attention_->Serves(p.q_len, p.kv_len);
}

bool MultiheadAttention::UsesFlash(const ParsedAttention& p) const {
  if (options_.flash_min_keys == 0 || p.inputs->need_weights) return false;
  // Whole blocks on brgemm kernels beat the blocked path from one whole key block up (BENCHMARKS.md: +33% at 512
  // on AMX; on AVX512_BF16, 1.01x at 512 keys, and 256 x 256 blocks 1.03x 512 x 512 ones on gemm at 2048).
  const int64_t min_keys =
      flash_blocks_on_brgemm() ? std::min(options_.flash_min_keys, options_.flash_key_cols) : options_.flash_min_keys;
  return p.kv_len >= min_keys;
}

FlashAttentionArgs MultiheadAttention::FlashShape(const ParsedAttention& p) const {
  FlashAttentionArgs a;
  a.batch = p.batch;
  a.heads = options_.config.num_heads;
  a.q_len = p.q_len;
  a.kv_len = p.kv_len;
  a.head_dim = options_.config.head_dim();
  a.causal = p.inputs->is_causal;
  a.query_rows = options_.flash_query_rows;
  a.key_cols = options_.flash_key_cols;
  a.strips = options_.flash_strips;
  if (compute_ == ComputeType::kBFloat16) {
    a.bf16.scores_op = scores_op_.get();
    a.bf16.context_add_op = context_add_op_.get();
    a.bf16.block_scores = block_scores_.get();
    a.bf16.block_context = block_context_.get();
  }
  return a;
}

absl::Status MultiheadAttention::AttendFlash(const ParsedAttention& p, const Projected& proj, int64_t q_row,
                                             int64_t kv_row, int threads,
                                             absl::FunctionRef<absl::Status()> should_stop) const {
  FlashAttentionArgs a = FlashShape(p);
  a.q = {proj.q + q_row * proj.ldq, proj.ldq, p.q_len * proj.ldq};
  a.k = {proj.k + kv_row * proj.ldk, proj.ldk, p.kv_len * proj.ldk};
  a.v = {proj.v + kv_row * proj.ldv, proj.ldv, p.kv_len * proj.ldv};
  if (a.bf16.scores_op != nullptr) {
    a.bf16.q = proj.q16 + q_row * proj.ld16;
    a.bf16.k = proj.k16 + kv_row * proj.ld16;
    a.bf16.v = proj.v16 + kv_row * proj.ld16;
    a.bf16.ld = proj.ld16;
    a.bf16.q_seq_stride = p.q_len * proj.ld16;
    a.bf16.kv_seq_stride = p.kv_len * proj.ld16;
  }
  a.out = proj.q + q_row * proj.ldq;
  a.out_ld = proj.ldq;
  a.out_seq_stride = p.q_len * proj.ldq;
  std::vector<float> key_bias;  // [B, S] floats: within the request's own mask size x 4
  if (const int64_t bias_floats = KeyPaddingBiasFloats(p); bias_floats > 0) {
    key_bias.resize(static_cast<size_t>(bias_floats));
    KeyPaddingBias(p, key_bias.data());
    a.key_bias = key_bias.data();
  }
  if (p.attn_mask != MaskType::kNone) {
    a.add_mask = [&p, heads = a.heads](int64_t b, int64_t h, int64_t l0, int64_t rows, int64_t k0, int64_t cols,
                                       float* scores, int64_t ld) {
      AddAttnMaskBlock(p, heads, b, h, l0, rows, k0, cols, scores, ld);
    };
  }
  return FlashAttention(a, threads, should_stop);
}

absl::Status MultiheadAttention::AttendShort(const ParsedAttention& p, int64_t seq_begin, int64_t seq_end,
                                             int64_t h_begin, int64_t h_end, const Projected& proj, int64_t q_row,
                                             int64_t kv_row, absl::FunctionRef<absl::Status()> should_stop) const {
  ShortAttention::Args a;
  a.q_len = p.q_len;
  a.kv_len = p.kv_len;
  a.q = {proj.q + q_row * proj.ldq, proj.ldq, p.q_len * proj.ldq};
  a.k = {proj.k + kv_row * proj.ldk, proj.ldk, p.kv_len * proj.ldk};
  a.v = {proj.v + kv_row * proj.ldv, proj.ldv, p.kv_len * proj.ldv};
  const int64_t e = options_.config.embed_dim, dh = options_.config.head_dim();
  if (proj.q16 != nullptr) {  // the bf16 projections or their mirror: read as they are
    a.q16 = {proj.q16 + q_row * proj.ld16, proj.ld16, p.q_len * proj.ld16};
    a.k16 = {proj.k16 + kv_row * proj.ld16, proj.ld16, p.kv_len * proj.ld16};
    a.v16 = {proj.v16 + kv_row * proj.ld16, proj.ld16, p.kv_len * proj.ld16};
  }
  a.out = proj.q + q_row * proj.ldq;
  a.out_ld = proj.ldq;
  if (proj.context16 != nullptr) {
    a.out16 = proj.context16 + q_row * e;
    a.out_ld = e;
  }
  a.out_seq_stride = p.q_len * a.out_ld;
  auto add_masks = [&](int64_t b, int64_t h0, int64_t hb, float* scores, int64_t ld, int64_t head_rows) {
    return MaskBlock(p, Block{b, 1, h0, hb, 0, p.q_len, p.kv_len}, scores, ld, head_rows);
  };
  const ShortAttention::MaskFn mask = add_masks;
  const int64_t hb = h_end - h_begin;
  for (int64_t b = seq_begin, nb = 0; b < seq_end; b += nb) {
    ATTN_RETURN_IF_ERROR(should_stop());
    nb = short_attention_->SequencesPerCall(hb, p.q_len, p.kv_len, seq_end - b);
    absl::Status status = short_attention_->Run(a, b, nb, h_begin, hb, p.has_mask() ? &mask : nullptr);
    if (absl::IsUnimplemented(status) && nb > 1) {  // no brgemm kernel for nb * hb heads: one sequence may have one
      nb = 1;
      status = short_attention_->Run(a, b, nb, h_begin, hb, p.has_mask() ? &mask : nullptr);
    }
    if (absl::IsUnimplemented(status)) {  // no brgemm kernel for this shape: nothing was written
      status = Attend(p, b, b + nb, h_begin, h_end, proj, q_row, kv_row, nullptr, should_stop);
      if (status.ok() && a.out16 != nullptr) {  // Attend wrote the f32 context over Q (sequences' rows in a row)
        FloatRowsToBf16(a.out + b * p.q_len * proj.ldq + h_begin * dh, nb * p.q_len, hb * dh, proj.ldq,
                        a.out16 + b * a.out_seq_stride + h_begin * dh, e);
      }
    }
    ATTN_RETURN_IF_ERROR(status);
  }
  return absl::OkStatus();
}

absl::Status MultiheadAttention::ProjectOutput(const Group& g, const Projected& proj) const {
  const int64_t e = options_.config.embed_dim;
  auto project = [&](float* out) {
    return proj.context16 != nullptr ? out_proj_->ExecuteBf16(proj.context16, proj.q_rows, e, out, e)
                                     : out_proj_->Execute(proj.q, proj.q_rows, proj.ldq, out, e);
  };
  if (g.members.size() == 1) return project(g.outputs[0]->output.values.data());
  float* out = Workspace::Grow(ThreadWorkspace().context_out, static_cast<size_t>(proj.q_rows * e));
  ATTN_RETURN_IF_ERROR(project(out));
  for (AttentionOutputs* o : g.outputs) {
    std::memcpy(o->output.values.data(), out, o->output.values.size() * sizeof(float));
    out += o->output.values.size();
  }
  return absl::OkStatus();
}

namespace {

// The matmul inputs of a block: rows of a projection, f32 or bf16, `row` rows and `col` columns in.
View4 HeadsView(const float* f32, const uint16_t* bf16, int64_t ld, int64_t row, int64_t col,
                std::initializer_list<int64_t> dims, std::initializer_list<int64_t> strides) {
  View4 v;
  std::copy(dims.begin(), dims.end(), v.dims);
  std::copy(strides.begin(), strides.end(), v.strides);
  v.bf16 = bf16 != nullptr;
  v.data = v.bf16 ? static_cast<void*>(const_cast<uint16_t*>(bf16 + row * ld + col))
                  : static_cast<void*>(const_cast<float*>(f32 + row * ld + col));
  return v;
}

// A block's softmax as bf16 for the context matmul (in this thread's buffer), split over the calling thread's
// team when large (ParallelRanges).
uint16_t* SoftmaxToBf16(float* scores, int64_t rows, int64_t cols, const uint8_t* dead) {
  uint16_t* out = Workspace::Grow(ThreadWorkspace().probs16, static_cast<size_t>(rows * cols));
  ParallelRanges(rows, cols, [&](int64_t r0, int64_t r1) {
    RowSoftmaxToBf16(scores + r0 * cols, r1 - r0, cols, cols, dead == nullptr ? nullptr : dead + r0,
                     out + r0 * cols, cols);
  });
  return out;
}

}  // namespace

absl::Status MultiheadAttention::Attend(const ParsedAttention& p, int64_t seq_begin, int64_t seq_end,
                                        int64_t h_begin, int64_t h_end, const Projected& proj, int64_t q_row,
                                        int64_t kv_row, Tensor* weights,
                                        absl::FunctionRef<absl::Status()> should_stop) const {
  const int64_t dh = options_.config.head_dim();
  float* q = proj.q + q_row * proj.ldq;
  const int64_t ldq = proj.ldq;
  // bf16 layers read Q, K and V from their bf16 copies; the context goes to the f32 Q columns.
  const bool bf16 = proj.q16 != nullptr;
  const int64_t ldq_in = bf16 ? proj.ld16 : proj.ldq, ldk = bf16 ? proj.ld16 : proj.ldk;
  const int64_t ldv = bf16 ? proj.ld16 : proj.ldv;
  const int64_t len_q = p.q_len, len_k = p.kv_len;
  Workspace& ws = ThreadWorkspace();
  const BlockPlan plan =
      PlanBlocks(p.batch, h_end - h_begin, len_q, len_k, options_.scores_block_bytes, options_.min_block_rows);
  for (int64_t b0 = seq_begin; b0 < seq_end; b0 += plan.seqs) {
    const int64_t nb = std::min(plan.seqs, seq_end - b0);
    // Heads outer, query blocks inner: one head's K and V stay in cache across its query blocks.
    for (int64_t h0 = h_begin; h0 < h_end; h0 += plan.heads) {
      const int64_t hb = std::min(plan.heads, h_end - h0);
      const int64_t kv_first = kv_row + b0 * len_k;
      for (int64_t l0 = 0; l0 < len_q; l0 += plan.rows) {
        const int64_t lb = std::min(plan.rows, len_q - l0);
        ATTN_RETURN_IF_ERROR(should_stop());
        // Causal: keys past the block's last query are masked for every row of it, so they are not
        // computed at all (their weights stay zero). Halves the work of a causal self-attention.
        const Block blk{b0, nb, h0, hb, l0, lb, p.inputs->is_causal ? std::min(len_k, l0 + lb) : len_k};
        const int64_t cols = blk.cols;
        float* scores = Workspace::Grow(ws.scores, static_cast<size_t>(nb * hb * lb * cols));
        float* q_blk = q + (b0 * len_q + l0) * ldq + h0 * dh;
        const View4 probs{scores, {nb, hb, lb, cols}, {hb * lb * cols, lb * cols, cols, 1}};
        const View4 qa = HeadsView(proj.q, proj.q16, ldq_in, q_row + b0 * len_q + l0, h0 * dh, {nb, hb, lb, dh},
                                   {len_q * ldq_in, dh, ldq_in, 1});
        const View4 kb = HeadsView(proj.k, proj.k16, ldk, kv_first, h0 * dh, {nb, hb, dh, cols},
                                   {len_k * ldk, dh, 1, ldk});
        ATTN_RETURN_IF_ERROR(scores_op_->Execute(qa, kb, probs));
        const uint8_t* dead = MaskBlock(p, blk, scores);
        View4 probs_in = probs;
        if (bf16 && weights == nullptr) {
          probs_in.data = SoftmaxToBf16(scores, nb * hb * lb, cols, dead);
          probs_in.bf16 = true;
        } else {
          ATTN_RETURN_IF_ERROR(softmax_.Execute(scores, nb * hb * lb, cols));
          for (int64_t r = 0; dead != nullptr && r < nb * hb * lb; ++r) {
            if (dead[r]) std::fill_n(scores + r * cols, cols, 0.0f);
          }
        }
        if (weights != nullptr) AddBlockWeights(p, blk, scores, weights);
        // Context over the block's Q columns: Q of these heads and rows is no longer needed.
        const View4 vb = HeadsView(proj.v, proj.v16, ldv, kv_first, h0 * dh, {nb, hb, cols, dh},
                                   {len_k * ldv, dh, ldv, 1});
        const View4 ctx{q_blk, {nb, hb, lb, dh}, {len_q * ldq, dh, ldq, 1}};
        ATTN_RETURN_IF_ERROR(context_op_->Execute(probs_in, vb, ctx));
      }
    }
  }
  return absl::OkStatus();
}

const uint8_t* MultiheadAttention::MaskBlock(const ParsedAttention& p, const Block& blk, float* scores) const {
  return MaskBlock(p, blk, scores, blk.cols, blk.lb);
}

const uint8_t* MultiheadAttention::MaskBlock(const ParsedAttention& p, const Block& blk, float* scores, int64_t ld,
                                             int64_t head_rows) const {
  if (!p.has_mask()) return nullptr;
  Workspace& ws = ThreadWorkspace();
  const int64_t h = options_.config.num_heads, cols = blk.cols;
  uint8_t* dead = Workspace::Grow(ws.dead_rows, static_cast<size_t>(blk.nb * blk.hb * blk.lb));
  float* shared = Workspace::Grow(ws.mask_rows, static_cast<size_t>(cols));
  for (int64_t sb = 0; sb < blk.nb; ++sb) {
    for (int64_t i = 0; i < blk.lb; ++i) {
      const bool any_open = BuildSharedMaskRow(p, blk.b0 + sb, blk.l0 + i, cols, shared);
      for (int64_t hi = 0; hi < blk.hb; ++hi) {
        float* row = scores + ((sb * blk.hb + hi) * head_rows + i) * ld;
        const bool open = AddMaskRow(p, h, blk.b0 + sb, blk.h0 + hi, blk.l0 + i, cols, shared, row);
        dead[(sb * blk.hb + hi) * blk.lb + i] = !(any_open && open);
      }
    }
  }
  return dead;
}

void MultiheadAttention::AddBlockWeights(const ParsedAttention& p, const Block& blk, const float* probs,
                                         Tensor* weights) const {
  const int64_t h = options_.config.num_heads, len_q = p.q_len, len_k = p.kv_len, cols = blk.cols;
  const float inv_heads = 1.0f / static_cast<float>(h);
  float* w = weights->values.data();
  for (int64_t sb = 0; sb < blk.nb; ++sb) {
    const int64_t b = blk.b0 + sb;
    for (int64_t hi = 0; hi < blk.hb; ++hi) {
      for (int64_t i = 0; i < blk.lb; ++i) {
        const float* src = probs + ((sb * blk.hb + hi) * blk.lb + i) * cols;
        if (p.inputs->average_attn_weights) {
          float* dst = w + (b * len_q + blk.l0 + i) * len_k;
          for (int64_t j = 0; j < cols; ++j) dst[j] += src[j] * inv_heads;
        } else {
          std::memcpy(w + ((b * h + blk.h0 + hi) * len_q + blk.l0 + i) * len_k, src, cols * sizeof(float));
        }
      }
    }
  }
}

int64_t MultiheadAttention::weight_bytes() const {
  int64_t bytes = 0;
  for (const LinearOp* op : {qkv_proj_.get(), q_proj_.get(), k_proj_.get(), v_proj_.get(), out_proj_.get()}) {
    if (op != nullptr) bytes += op->owned_weight_bytes();
  }
  return bytes;
}

int64_t MultiheadAttention::flash_brgemm_block_matmuls() const {
  return block_scores_ == nullptr ? 0 : block_scores_->executions() + block_context_->executions();
}

std::vector<std::string> MultiheadAttention::ImplementationsUsed() const {
  std::vector<std::string> impls;
  auto add = [&](const std::string& s) {
    if (std::find(impls.begin(), impls.end(), s) == impls.end()) impls.push_back(s);
  };
  for (const LinearOp* op : {qkv_proj_.get(), q_proj_.get(), k_proj_.get(), v_proj_.get(), out_proj_.get()}) {
    if (op != nullptr) {
      for (const std::string& impl : op->Impls()) add(impl);
    }
  }
  for (const HeadMatmulOp* op : {scores_op_.get(), context_op_.get(), context_add_op_.get()}) {
    for (const std::string& impl : op->Impls()) add(impl);
  }
  for (const Bf16BlockMatmul* op : {block_scores_.get(), block_context_.get()}) {
    if (op != nullptr) {
      for (const std::string& impl : op->Impls()) add(impl);
    }
  }
  if (short_attention_ != nullptr) {
    for (const std::string& impl : short_attention_->Impls()) add(impl);
  }
  for (const std::string& s : softmax_.Impls()) add(s);
  return impls;
}

}  // namespace attnserve
