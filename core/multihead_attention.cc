#include "core/multihead_attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "core/attention_masks.h"
#include "core/status_macros.h"

namespace attnserve {
namespace {

// Scratch buffers larger than this are freed after each call, so one long request does not pin its
// high-water mark on a worker thread for good.
constexpr size_t kRetainBytes = size_t{256} << 20;
// Requests whose attention (QK^T and PV) is below this many FLOPs are run side by side, see RunGroup.
constexpr int64_t kSmallAttentionFlops = int64_t{32} << 20;

// Per-thread scratch, reused across calls and layers.
struct Workspace {
  std::vector<float> gather_q, gather_k, gather_v;  // inputs of a group, concatenated
  std::vector<float> q, k, v;                       // projections: q is [N, 3E] (fused) or [N, E]
  std::vector<float> context_out;                   // output projection of a multi-request group
  std::vector<float> scores;                        // one query block, [nb, H, lb, S]
  std::vector<float> mask_rows;                     // combined additive mask of a block, [nb, lb, S]
  std::vector<uint8_t> dead_rows;                   // rows whose keys are all masked, [nb, H, lb]

  template <typename T>
  static T* Grow(std::vector<T>& buf, size_t n) {
    if (buf.size() < n) buf.resize(n);
    return buf.data();
  }
  void ReleaseLarge() {
    for (auto* buf : {&gather_q, &gather_k, &gather_v, &q, &k, &v, &context_out, &scores, &mask_rows}) {
      if (buf->capacity() * sizeof(float) > kRetainBytes) std::vector<float>().swap(*buf);
    }
  }
};

Workspace& ThreadWorkspace() {
  thread_local Workspace ws;
  return ws;
}

bool Aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % alignof(float) == 0; }

// Copies the float data of `views` one after another into `dst`.
void Gather(const std::vector<const TensorView*>& views, float* dst) {
  for (const TensorView* t : views) {
    std::memcpy(dst, t->data, t->num_bytes());
    dst += t->num_elements();
  }
}

// Sets this thread's OpenMP team size (what oneDNN reads at execution) for a scope.
class ScopedOmpThreads {
 public:
  explicit ScopedOmpThreads(int threads) : saved_(omp_get_max_threads()) { omp_set_num_threads(threads); }
  ~ScopedOmpThreads() { omp_set_num_threads(saved_); }
  ScopedOmpThreads(const ScopedOmpThreads&) = delete;
  ScopedOmpThreads& operator=(const ScopedOmpThreads&) = delete;

 private:
  const int saved_;
};

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

struct MultiheadAttention::Group {
  bool self_attention = false;
  std::vector<const ParsedAttention*> members;
  std::vector<AttentionOutputs*> outputs;  // same order as members
};

MultiheadAttention::~MultiheadAttention() = default;

absl::StatusOr<std::unique_ptr<MultiheadAttention>> MultiheadAttention::Create(const Options& options,
                                                                              const MhaWeights& weights) {
  const MhaConfig& c = options.config;
  RETURN_IF_ERROR(c.Validate());
  RETURN_IF_ERROR(weights.CheckShapes(c));
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
  auto layer = std::unique_ptr<MultiheadAttention>(new MultiheadAttention(options));
  const int64_t e = c.embed_dim;

  // 1/sqrt(Dh) is folded into the Q weights and bias: the scores matmul then needs no scaling pass.
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim()));
  std::vector<float> wq = weights.q_proj_weight;
  for (float& w : wq) w *= scale;
  std::vector<float> bq, bk, bv;
  if (c.bias) {
    bq.assign(weights.in_proj_bias.begin(), weights.in_proj_bias.begin() + e);
    for (float& b : bq) b *= scale;
    bk.assign(weights.in_proj_bias.begin() + e, weights.in_proj_bias.begin() + 2 * e);
    bv.assign(weights.in_proj_bias.begin() + 2 * e, weights.in_proj_bias.end());
  }
  ASSIGN_OR_RETURN(layer->q_proj_, LinearOp::Create(e, e, wq, bq));
  ASSIGN_OR_RETURN(layer->k_proj_, LinearOp::Create(c.key_dim(), e, weights.k_proj_weight, bk));
  ASSIGN_OR_RETURN(layer->v_proj_, LinearOp::Create(c.value_dim(), e, weights.v_proj_weight, bv));
  if (c.same_qkv_dim()) {
    std::vector<float> w_qkv = wq;
    w_qkv.insert(w_qkv.end(), weights.k_proj_weight.begin(), weights.k_proj_weight.end());
    w_qkv.insert(w_qkv.end(), weights.v_proj_weight.begin(), weights.v_proj_weight.end());
    std::vector<float> b_qkv;
    if (c.bias) {
      b_qkv = bq;
      b_qkv.insert(b_qkv.end(), bk.begin(), bk.end());
      b_qkv.insert(b_qkv.end(), bv.begin(), bv.end());
    }
    ASSIGN_OR_RETURN(layer->qkv_proj_, LinearOp::Create(e, 3 * e, w_qkv, b_qkv));
  }
  ASSIGN_OR_RETURN(layer->out_proj_, LinearOp::Create(e, e, weights.out_proj_weight, weights.out_proj_bias));
  ASSIGN_OR_RETURN(layer->scores_op_, HeadMatmulOp::Create(HeadMatmulOp::Kind::kScores, c.head_dim()));
  ASSIGN_OR_RETURN(layer->context_op_,
                   HeadMatmulOp::Create(HeadMatmulOp::Kind::kContext, c.head_dim()));
  return layer;
}

absl::StatusOr<ParsedAttention> MultiheadAttention::Validate(const AttentionInputs& inputs) const {
  return ParseAttentionInputs(inputs, options_.config, options_.limits);
}

absl::StatusOr<AttentionOutputs> MultiheadAttention::Forward(const AttentionInputs& inputs) const {
  const AttentionInputs* one[] = {&inputs};
  return std::move(ForwardBatch(one)[0]);
}

std::vector<absl::StatusOr<AttentionOutputs>> MultiheadAttention::ForwardBatch(
    absl::Span<const AttentionInputs* const> requests) const {
  const MhaConfig& c = options_.config;
  std::vector<absl::StatusOr<AttentionOutputs>> results;
  results.reserve(requests.size());
  std::vector<ParsedAttention> parsed(requests.size());
  Group groups[2];  // [0]: self-attention (fused QKV), [1]: cross-attention
  groups[0].self_attention = true;
  for (size_t i = 0; i < requests.size(); ++i) {
    absl::StatusOr<ParsedAttention> p = Validate(*requests[i]);
    if (!p.ok()) {
      results.emplace_back(p.status());
      continue;
    }
    parsed[i] = *p;
    AttentionOutputs out;
    const int64_t b = p->batch, l = p->q_len, s = p->kv_len, h = c.num_heads;
    out.output = Tensor(p->unbatched ? Shape{l, c.embed_dim} : Shape{b, l, c.embed_dim});
    if (requests[i]->need_weights) {
      Shape ws = requests[i]->average_attn_weights ? Shape{b, l, s} : Shape{b, h, l, s};
      if (p->unbatched) ws.erase(ws.begin());
      out.attn_weights = Tensor(ws);
    }
    results.emplace_back(std::move(out));
  }
  int64_t flops = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    if (!results[i].ok()) continue;
    flops += AttentionFlops(c, parsed[i].batch, parsed[i].q_len, parsed[i].kv_len);
    Group& g = groups[parsed[i].self_attention ? 0 : 1];
    g.members.push_back(&parsed[i]);
    g.outputs.push_back(&*results[i]);
  }
  const ScopedOmpThreads threads(flops < options_.single_thread_below_flops ? 1 : omp_get_max_threads());
  for (Group& g : groups) {
    if (g.members.empty()) continue;
    absl::Status status = RunGroup(g);
    if (status.ok()) continue;
    for (size_t i = 0; i < requests.size(); ++i) {
      if (results[i].ok() && parsed[i].self_attention == g.self_attention) results[i] = status;
    }
  }
  ThreadWorkspace().ReleaseLarge();
  return results;
}

absl::Status MultiheadAttention::RunGroup(Group& g) const {
  const MhaConfig& c = options_.config;
  const int64_t e = c.embed_dim;
  Workspace& ws = ThreadWorkspace();
  int64_t n_q = 0, n_kv = 0;
  std::vector<const TensorView*> queries, keys, values;
  for (const ParsedAttention* p : g.members) {
    n_q += p->query_tokens();
    n_kv += p->kv_tokens();
    queries.push_back(&p->inputs->query);
    keys.push_back(&p->inputs->key);
    values.push_back(&p->inputs->value);
  }
  // One request with aligned data is read in place; otherwise its inputs are concatenated first, so each
  // projection is one matmul over every token of the batch.
  auto input_rows = [&](const std::vector<const TensorView*>& views, std::vector<float>& buf, int64_t rows,
                        int64_t cols) -> const float* {
    if (views.size() == 1 && Aligned(views[0]->data)) return static_cast<const float*>(views[0]->data);
    float* dst = Workspace::Grow(buf, static_cast<size_t>(rows * cols));
    Gather(views, dst);
    return dst;
  };

  float* q;  // projected Q (then the context, in place); row stride ldq
  int64_t ldq;
  const float *k, *v;
  int64_t ldk, ldv;
  if (g.self_attention) {
    const float* x = input_rows(queries, ws.gather_q, n_q, e);
    q = Workspace::Grow(ws.q, static_cast<size_t>(n_q * 3 * e));
    RETURN_IF_ERROR(qkv_proj_->Execute(x, n_q, e, q, 3 * e));
    ldq = ldk = ldv = 3 * e;
    k = q + e;
    v = q + 2 * e;
  } else {
    const float* xq = input_rows(queries, ws.gather_q, n_q, e);
    const float* xk = input_rows(keys, ws.gather_k, n_kv, c.key_dim());
    const float* xv = input_rows(values, ws.gather_v, n_kv, c.value_dim());
    q = Workspace::Grow(ws.q, static_cast<size_t>(n_q * e));
    float* kp = Workspace::Grow(ws.k, static_cast<size_t>(n_kv * e));
    float* vp = Workspace::Grow(ws.v, static_cast<size_t>(n_kv * e));
    RETURN_IF_ERROR(q_proj_->Execute(xq, n_q, e, q, e));
    RETURN_IF_ERROR(k_proj_->Execute(xk, n_kv, c.key_dim(), kp, e));
    RETURN_IF_ERROR(v_proj_->Execute(xv, n_kv, c.value_dim(), vp, e));
    ldq = e;
    ldk = ldv = e;
    k = kp;
    v = vp;
  }

  // Attention per request. Small requests are cut into work units of a few sequences that run side by
  // side on the OpenMP threads, each with single-threaded oneDNN calls: one parallel region for the lot,
  // rather than several per request whose fork/join costs more than their arithmetic. Large requests
  // run one after another, each using every thread inside oneDNN.
  struct Unit {
    size_t member;
    int64_t seq_begin, seq_end;
  };
  const size_t n = g.members.size();
  const int64_t threads = omp_get_max_threads();
  std::vector<int64_t> q_rows(n), kv_rows(n);
  std::vector<Unit> small;
  std::vector<size_t> large;
  for (size_t i = 0, q_row = 0, kv_row = 0; i < n; ++i) {
    const ParsedAttention& p = *g.members[i];
    q_rows[i] = static_cast<int64_t>(q_row);
    kv_rows[i] = static_cast<int64_t>(kv_row);
    q_row += p.query_tokens();
    kv_row += p.kv_tokens();
    const int64_t attention_flops = 4 * p.batch * p.q_len * p.kv_len * e;
    if (attention_flops >= kSmallAttentionFlops) {
      large.push_back(i);
      continue;
    }
    // About four units per thread from one request, so a lone request still spreads over the threads.
    const int64_t per_unit = std::max<int64_t>(1, p.batch / (4 * threads));
    for (int64_t b = 0; b < p.batch; b += per_unit) small.push_back({i, b, std::min(p.batch, b + per_unit)});
  }
  std::vector<absl::Status> statuses(n);
  auto attend = [&](size_t i, int64_t seq_begin, int64_t seq_end) {
    const ParsedAttention& p = *g.members[i];
    Tensor* weights = p.inputs->need_weights ? &g.outputs[i]->attn_weights : nullptr;
    return Attend(p, seq_begin, seq_end, q + q_rows[i] * ldq, ldq, k + kv_rows[i] * ldk, ldk,
                  v + kv_rows[i] * ldv, ldv, weights);
  };
  std::vector<absl::Status> unit_statuses(small.size());
  const int64_t num_small = static_cast<int64_t>(small.size());
  if (num_small == 1 || threads == 1) {
    // No parallel construct at all: even a serialized one (`if` false) would make every oneDNN call
    // inside it a nested region, and libgomp starts fresh threads for each nested team.
    for (int64_t u = 0; u < num_small; ++u) {
      unit_statuses[u] = attend(small[u].member, small[u].seq_begin, small[u].seq_end);
    }
  } else {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t u = 0; u < num_small; ++u) {
      unit_statuses[u] = attend(small[u].member, small[u].seq_begin, small[u].seq_end);
    }
  }
  for (size_t u = 0; u < small.size(); ++u) {
    if (!unit_statuses[u].ok()) statuses[small[u].member] = unit_statuses[u];
  }
  for (size_t i : large) statuses[i] = attend(i, 0, g.members[i]->batch);
  for (const absl::Status& status : statuses) RETURN_IF_ERROR(status);

  if (g.members.size() == 1) {
    return out_proj_->Execute(q, n_q, ldq, g.outputs[0]->output.values.data(), e);
  }
  float* out = Workspace::Grow(ws.context_out, static_cast<size_t>(n_q * e));
  RETURN_IF_ERROR(out_proj_->Execute(q, n_q, ldq, out, e));
  for (AttentionOutputs* o : g.outputs) {
    std::memcpy(o->output.values.data(), out, o->output.values.size() * sizeof(float));
    out += o->output.values.size();
  }
  return absl::OkStatus();
}

absl::Status MultiheadAttention::Attend(const ParsedAttention& p, int64_t seq_begin, int64_t seq_end, float* q,
                                        int64_t ldq, const float* k,
                                        int64_t ldk, const float* v, int64_t ldv, Tensor* weights) const {
  const MhaConfig& c = options_.config;
  const AttentionInputs& in = *p.inputs;
  const int64_t h = c.num_heads, dh = c.head_dim();
  const int64_t batch = p.batch, len_q = p.q_len, len_k = p.kv_len;
  Workspace& ws = ThreadWorkspace();

  const BlockPlan plan = PlanBlocks(batch, h, len_q, len_k, options_.scores_block_bytes, options_.min_block_rows);
  const bool masked = p.has_mask();
  const float inv_heads = 1.0f / static_cast<float>(h);

  for (int64_t b0 = seq_begin; b0 < seq_end; b0 += plan.seqs) {
    const int64_t nb = std::min(plan.seqs, seq_end - b0);
    // Heads outer, query blocks inner: one head's K and V stay in cache across its query blocks.
    for (int64_t h0 = 0; h0 < h; h0 += plan.heads) {
      const int64_t hb = std::min(plan.heads, h - h0);
      const float* k_seq = k + b0 * len_k * ldk + h0 * dh;
      const float* v_seq = v + b0 * len_k * ldv + h0 * dh;
      for (int64_t l0 = 0; l0 < len_q; l0 += plan.rows) {
        const int64_t lb = std::min(plan.rows, len_q - l0);
        // Causal: keys past the block's last query are masked for every row of it, so they are not
        // computed at all (their weights stay zero). Halves the work of a causal self-attention.
        const int64_t cols = in.is_causal ? std::min(len_k, l0 + lb) : len_k;
        float* scores = Workspace::Grow(ws.scores, static_cast<size_t>(nb * hb * lb * cols));
        float* q_blk = q + (b0 * len_q + l0) * ldq + h0 * dh;
        const View4 probs{scores, {nb, hb, lb, cols}, {hb * lb * cols, lb * cols, cols, 1}};
        const View4 qa{q_blk, {nb, hb, lb, dh}, {len_q * ldq, dh, ldq, 1}};
        const View4 kb{const_cast<float*>(k_seq), {nb, hb, dh, cols}, {len_k * ldk, dh, 1, ldk}};
        RETURN_IF_ERROR(scores_op_->Execute(qa, kb, probs));

        uint8_t* dead = nullptr;  // [nb, hb, lb]: rows with every key masked
        if (masked) {
          dead = Workspace::Grow(ws.dead_rows, static_cast<size_t>(nb * hb * lb));
          float* shared = Workspace::Grow(ws.mask_rows, static_cast<size_t>(cols));
          for (int64_t sb = 0; sb < nb; ++sb) {
            for (int64_t i = 0; i < lb; ++i) {
              const bool any_open = BuildSharedMaskRow(p, b0 + sb, l0 + i, cols, shared);
              for (int64_t hi = 0; hi < hb; ++hi) {
                float* row = scores + ((sb * hb + hi) * lb + i) * cols;
                const bool open = AddMaskRow(p, h, b0 + sb, h0 + hi, l0 + i, cols, shared, row);
                dead[(sb * hb + hi) * lb + i] = !(any_open && open);
              }
            }
          }
        }

        RETURN_IF_ERROR(softmax_.Execute(scores, nb * hb * lb, cols));

        if (dead != nullptr) {
          for (int64_t r = 0; r < nb * hb * lb; ++r) {
            if (dead[r]) std::fill_n(scores + r * cols, cols, 0.0f);
          }
        }
        if (weights != nullptr) {
          float* w = weights->values.data();
          for (int64_t sb = 0; sb < nb; ++sb) {
            const int64_t b = b0 + sb;
            for (int64_t hi = 0; hi < hb; ++hi) {
              for (int64_t i = 0; i < lb; ++i) {
                const float* src = scores + ((sb * hb + hi) * lb + i) * cols;
                if (in.average_attn_weights) {
                  float* dst = w + (b * len_q + l0 + i) * len_k;
                  for (int64_t j = 0; j < cols; ++j) dst[j] += src[j] * inv_heads;
                } else {
                  std::memcpy(w + ((b * h + h0 + hi) * len_q + l0 + i) * len_k, src, cols * sizeof(float));
                }
              }
            }
          }
        }

        // Context over the block's Q columns: Q of these heads and rows is no longer needed.
        const View4 vb{const_cast<float*>(v_seq), {nb, hb, cols, dh}, {len_k * ldv, dh, ldv, 1}};
        const View4 ctx{q_blk, {nb, hb, lb, dh}, {len_q * ldq, dh, ldq, 1}};
        RETURN_IF_ERROR(context_op_->Execute(probs, vb, ctx));
      }
    }
  }
  return absl::OkStatus();
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
  for (const HeadMatmulOp* op : {scores_op_.get(), context_op_.get()}) {
    for (const std::string& impl : op->Impls()) add(impl);
  }
  for (const std::string& s : softmax_.Impls()) add(s);
  return impls;
}

}  // namespace attnserve
