#include "core/multihead_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace attnserve {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Scratch buffers larger than this are freed after each call, so one long request does not pin its
// high-water mark on a worker thread for good.
constexpr size_t kRetainBytes = size_t{64} << 20;

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

// Element i of a mask view as an additive value (bool true -> -inf). Float data may be unaligned.
inline float MaskValue(MaskType type, const void* data, int64_t i) {
  if (type == MaskType::kBool) return static_cast<const uint8_t*>(data)[i] ? kNegInf : 0.0f;
  float v;
  std::memcpy(&v, static_cast<const char*>(data) + i * sizeof(float), sizeof(float));
  return v;
}

// Copies the float data of `views` one after another into `dst`.
void Gather(const std::vector<const TensorView*>& views, float* dst) {
  for (const TensorView* t : views) {
    std::memcpy(dst, t->data, t->num_bytes());
    dst += t->num_elements();
  }
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
  ASSIGN_OR_RETURN(layer->scores_op_, HeadMatmulOp::Create(HeadMatmulOp::Kind::kScores, c.num_heads, c.head_dim()));
  ASSIGN_OR_RETURN(layer->context_op_,
                   HeadMatmulOp::Create(HeadMatmulOp::Kind::kContext, c.num_heads, c.head_dim()));
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
  for (size_t i = 0; i < requests.size(); ++i) {
    if (!results[i].ok()) continue;
    Group& g = groups[parsed[i].self_attention ? 0 : 1];
    g.members.push_back(&parsed[i]);
    g.outputs.push_back(&*results[i]);
  }
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

  int64_t q_row = 0, kv_row = 0;
  for (size_t i = 0; i < g.members.size(); ++i) {
    const ParsedAttention& p = *g.members[i];
    Tensor* weights = p.inputs->need_weights ? &g.outputs[i]->attn_weights : nullptr;
    RETURN_IF_ERROR(Attend(p, q + q_row * ldq, ldq, k + kv_row * ldk, ldk, v + kv_row * ldv, ldv, weights));
    q_row += p.query_tokens();
    kv_row += p.kv_tokens();
  }

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

absl::Status MultiheadAttention::Attend(const ParsedAttention& p, float* q, int64_t ldq, const float* k,
                                        int64_t ldk, const float* v, int64_t ldv, Tensor* weights) const {
  const MhaConfig& c = options_.config;
  const AttentionInputs& in = *p.inputs;
  const int64_t h = c.num_heads, dh = c.head_dim();
  const int64_t batch = p.batch, len_q = p.q_len, len_k = p.kv_len;
  Workspace& ws = ThreadWorkspace();

  // Whole sequences per call when they fit the scores budget (fewer, larger matmuls for short
  // sequences); otherwise one sequence in blocks of query rows.
  const int64_t row_bytes = h * len_k * static_cast<int64_t>(sizeof(float));
  const int64_t budget_rows = std::max<int64_t>(1, options_.scores_block_bytes / row_bytes);
  const int64_t seqs_per_call = budget_rows >= len_q ? std::min(batch, budget_rows / len_q) : 1;
  const int64_t rows_per_block = std::min(len_q, budget_rows);

  const bool masked = p.has_mask();
  const float inv_heads = 1.0f / static_cast<float>(h);

  for (int64_t b0 = 0; b0 < batch; b0 += seqs_per_call) {
    const int64_t nb = std::min(seqs_per_call, batch - b0);
    for (int64_t l0 = 0; l0 < len_q; l0 += rows_per_block) {
      const int64_t lb = std::min(rows_per_block, len_q - l0);
      float* scores = Workspace::Grow(ws.scores, static_cast<size_t>(nb * h * lb * len_k));
      float* q_blk = q + (b0 * len_q + l0) * ldq;
      const float* k_seq = k + b0 * len_k * ldk;
      const float* v_seq = v + b0 * len_k * ldv;

      View4 qa{q_blk, {nb, h, lb, dh}, {len_q * ldq, dh, ldq, 1}};
      View4 kb{const_cast<float*>(k_seq), {nb, h, dh, len_k}, {len_k * ldk, dh, 1, ldk}};
      View4 sc{scores, {nb, h, lb, len_k}, {h * lb * len_k, lb * len_k, len_k, 1}};
      RETURN_IF_ERROR(scores_op_->Execute(qa, kb, sc));

      uint8_t* dead = nullptr;
      if (masked) {
        dead = Workspace::Grow(ws.dead_rows, static_cast<size_t>(nb * h * lb));
        float* comb = Workspace::Grow(ws.mask_rows, static_cast<size_t>(nb * lb * len_k));
        for (int64_t sb = 0; sb < nb; ++sb) {
          const int64_t b = b0 + sb;
          // Masks shared by all heads, combined once per block row.
          for (int64_t i = 0; i < lb; ++i) {
            const int64_t l = l0 + i;
            float* row = comb + (sb * lb + i) * len_k;
            for (int64_t j = 0; j < len_k; ++j) {
              float m = (in.is_causal && j > l) ? kNegInf : 0.0f;
              if (p.key_padding_mask != MaskType::kNone) {
                m += MaskValue(p.key_padding_mask, in.key_padding_mask.data, b * len_k + j);
              }
              if (p.attn_mask != MaskType::kNone && !p.attn_mask_per_head) {
                m += MaskValue(p.attn_mask, in.attn_mask.data, l * len_k + j);
              }
              row[j] = m;
            }
          }
          for (int64_t hh = 0; hh < h; ++hh) {
            for (int64_t i = 0; i < lb; ++i) {
              const int64_t l = l0 + i;
              float* s = scores + ((sb * h + hh) * lb + i) * len_k;
              const float* m = comb + (sb * lb + i) * len_k;
              bool any_open = false;
              if (p.attn_mask_per_head) {
                const int64_t base = ((b * h + hh) * len_q + l) * len_k;
                for (int64_t j = 0; j < len_k; ++j) {
                  s[j] += m[j] + MaskValue(p.attn_mask, in.attn_mask.data, base + j);
                  any_open |= s[j] != kNegInf;
                }
              } else {
                for (int64_t j = 0; j < len_k; ++j) {
                  s[j] += m[j];
                  any_open |= s[j] != kNegInf;
                }
              }
              dead[(sb * h + hh) * lb + i] = !any_open;
            }
          }
        }
      }

      RETURN_IF_ERROR(softmax_.Execute(scores, nb * h * lb, len_k));

      if (dead != nullptr) {
        for (int64_t r = 0; r < nb * h * lb; ++r) {
          if (dead[r]) std::fill_n(scores + r * len_k, len_k, 0.0f);
        }
      }
      if (weights != nullptr) {
        float* w = weights->values.data();
        for (int64_t sb = 0; sb < nb; ++sb) {
          const int64_t b = b0 + sb;
          for (int64_t hh = 0; hh < h; ++hh) {
            for (int64_t i = 0; i < lb; ++i) {
              const float* src = scores + ((sb * h + hh) * lb + i) * len_k;
              if (in.average_attn_weights) {
                float* dst = w + (b * len_q + l0 + i) * len_k;
                for (int64_t j = 0; j < len_k; ++j) dst[j] += src[j] * inv_heads;
              } else {
                std::memcpy(w + ((b * h + hh) * len_q + l0 + i) * len_k, src, len_k * sizeof(float));
              }
            }
          }
        }
      }

      // Context over the block's Q columns: Q of these rows is no longer needed.
      View4 pa{scores, {nb, h, lb, len_k}, {h * lb * len_k, lb * len_k, len_k, 1}};
      View4 vb{const_cast<float*>(v_seq), {nb, h, len_k, dh}, {len_k * ldv, dh, ldv, 1}};
      View4 ctx{q_blk, {nb, h, lb, dh}, {len_q * ldq, dh, ldq, 1}};
      RETURN_IF_ERROR(context_op_->Execute(pa, vb, ctx));
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
    if (op != nullptr) add(op->impl());
  }
  add(scores_op_->impl());
  add(context_op_->impl());
  for (const std::string& s : softmax_.Impls()) add(s);
  return impls;
}

}  // namespace attnserve
