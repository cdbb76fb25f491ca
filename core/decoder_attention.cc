#include "core/decoder_attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>

#include "absl/memory/memory.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/activation_rows.h"
#include "core/decoder_kernels.h"
#include "core/omp_threads.h"

namespace attnserve {
using decoder_internal::AddGroupWeights;
using decoder_internal::BlockScratch;
using decoder_internal::Grow;
using decoder_internal::KeysTransposed;
using decoder_internal::kF32;
using decoder_internal::LoadUnaligned;
using decoder_internal::Matrix;
using decoder_internal::ProjectionBuffer;
using decoder_internal::RowBounds;
using decoder_internal::SoftmaxGroupRows;
using decoder_internal::StackGroupQueries;
using decoder_internal::ThreadBlockScratch;
using decoder_internal::ThreadProjectionBuffer;
using decoder_internal::UnstackGroupContext;
using decoder_internal::WeightsSink;

namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
}  // namespace

void ReleaseDecoderScratch(size_t keep_bytes) {
  ThreadProjectionBuffer().Trim(keep_bytes);
  BlockScratch& s = ThreadBlockScratch();
  for (std::vector<float>* buf : {&s.q, &s.scores, &s.context, &s.pad, &s.span, &s.inputs, &s.out}) {
    if (buf->capacity() * sizeof(float) > keep_bytes) std::vector<float>().swap(*buf);
  }
  if (s.inputs16.capacity() * sizeof(uint16_t) > keep_bytes) std::vector<uint16_t>().swap(s.inputs16);
}

struct DecoderAttention::Block {
  size_t request = 0;         // its index in the batch
  int64_t b = 0;              // sequence
  int64_t l0 = 0, rows = 0;   // query rows [l0, l0 + rows)
  int64_t k0 = 0, k1 = 0;     // the keys any of them may see (causal, window)
};

DecoderAttention::~DecoderAttention() = default;

// Each source matrix is freed once its op holds it, so building costs the layer plus its largest source.
absl::Status DecoderAttention::BuildProjections(DecoderWeights w) {
  const DecoderConfig& c = options_.config;
  const int64_t width = c.q_width() + 2 * c.kv_width();
  // One fused projection: rows of Wq, then Wk, then Wv.
  std::vector<float> fused_bias = std::move(w.q_proj_bias);
  fused_bias.insert(fused_bias.end(), w.k_proj_bias.begin(), w.k_proj_bias.end());
  fused_bias.insert(fused_bias.end(), w.v_proj_bias.begin(), w.v_proj_bias.end());
  if (w.bf16()) {
    ATTN_ASSIGN_OR_RETURN(qkv_proj_,
                          LinearOp::CreateFromBf16(c.embed_dim, width, w.qkv_proj_weight_bf16, fused_bias, compute_));
    std::vector<uint16_t>().swap(w.qkv_proj_weight_bf16);
    ATTN_ASSIGN_OR_RETURN(
        o_proj_, LinearOp::CreateFromBf16(c.q_width(), c.embed_dim, w.o_proj_weight_bf16, w.o_proj_bias, compute_));
    return absl::OkStatus();
  }
  ATTN_ASSIGN_OR_RETURN(qkv_proj_, LinearOp::CreateStacked(c.embed_dim,
                                                           {&w.q_proj_weight, &w.k_proj_weight, &w.v_proj_weight},
                                                           fused_bias, compute_));
  for (std::vector<float>* part : {&w.q_proj_weight, &w.k_proj_weight, &w.v_proj_weight}) {
    std::vector<float>().swap(*part);
  }
  ATTN_ASSIGN_OR_RETURN(o_proj_, LinearOp::Create(c.q_width(), c.embed_dim, w.o_proj_weight, w.o_proj_bias, compute_));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<DecoderAttention>> DecoderAttention::Create(const Options& options,
                                                                           DecoderWeights weights) {
  const DecoderConfig& c = options.config;
  ATTN_RETURN_IF_ERROR(c.Validate());
  ATTN_RETURN_IF_ERROR(weights.CheckShapes(c));
  ATTN_ASSIGN_OR_RETURN(Rope rope, Rope::Create(c.rope));
  auto layer = absl::WrapUnique(new DecoderAttention(options, std::move(rope)));
  const ComputeType ct =
      options.compute == ComputeType::kBFloat16 && OnednnBf16Support() != Bf16Support::kUnavailable
          ? ComputeType::kBFloat16
          : ComputeType::kFloat32;
  layer->compute_ = ct;
  ATTN_RETURN_IF_ERROR(layer->BuildProjections(std::move(weights)));
  using Kind = HeadMatmulOp::Kind;
  ATTN_ASSIGN_OR_RETURN(layer->scores_op_, HeadMatmulOp::Create(Kind::kScores, c.head_dim, ct));
  ATTN_ASSIGN_OR_RETURN(layer->context_op_, HeadMatmulOp::Create(Kind::kContext, c.head_dim, ct));
  ATTN_ASSIGN_OR_RETURN(layer->context_add_op_, HeadMatmulOp::Create(Kind::kContextAdd, c.head_dim, ct));
  return layer;
}

int64_t DecoderAttention::weight_bytes() const {
  return qkv_proj_->owned_weight_bytes() + o_proj_->owned_weight_bytes();
}

std::vector<std::string> DecoderAttention::ImplementationsUsed() const {
  std::vector<std::string> all;
  for (const auto* op : {qkv_proj_.get(), o_proj_.get()}) {
    for (std::string& s : op->Impls()) all.push_back(std::move(s));
  }
  for (const auto* op : {scores_op_.get(), context_op_.get(), context_add_op_.get()}) {
    for (std::string& s : op->Impls()) all.push_back(std::move(s));
  }
  std::sort(all.begin(), all.end());
  all.erase(std::unique(all.begin(), all.end()), all.end());
  return all;
}

absl::StatusOr<ParsedDecoder> DecoderAttention::Validate(const DecoderInputs& inputs) const {
  return ParseDecoderInputs(inputs, options_.config, options_.limits);
}

absl::StatusOr<AttentionOutputs> DecoderAttention::Forward(const DecoderInputs& inputs, int max_threads) const {
  ATTN_ASSIGN_OR_RETURN(const ParsedDecoder parsed, Validate(inputs));
  return ForwardParsed(parsed, max_threads);
}

int64_t DecoderAttention::BlockRows(const ParsedDecoder& p, int threads) const {
  const DecoderConfig& c = options_.config;
  const int64_t min_rows = std::min(p.len, std::max<int64_t>(options_.min_block_rows, 1));
  // Capped before adding: a window may be as large as int64 allows.
  const int64_t keys = c.sliding_window > 0 ? std::min(p.len, std::min(p.len, c.sliding_window) + min_rows) : p.len;
  int64_t rows = std::clamp(options_.scores_block_bytes / (c.group_size() * keys * kF32), min_rows, p.len);
  // Enough blocks for every thread, twice over, when the batch alone does not give them.
  const int64_t blocks_per_seq = (2 * threads + p.batch - 1) / p.batch;
  if (threads > 1 && blocks_per_seq > 1) rows = std::min(rows, std::max(min_rows, p.len / blocks_per_seq));
  return rows;
}

int64_t DecoderAttention::WorkspaceBytes(const ParsedDecoder& p) const {
  const DecoderConfig& c = options_.config;
  const int threads = omp_get_max_threads();
  // The projections, the query gathered with a batch's others (or aligned), the output projection's rows in
  // a batch, the positions.
  const int64_t qkv = p.batch * p.len * ((c.q_width() + 2 * c.kv_width() + 2 * c.embed_dim) * kF32 + 8);
  const int64_t rows = BlockRows(p, threads) * c.group_size();
  const int64_t keys = std::min(p.len, c.sliding_window > 0 ? std::min(p.len, c.sliding_window) + rows : p.len);
  const int64_t block = rows * (keys + 2 * c.head_dim) * kF32 + keys * kF32 + rows;
  if (compute_ != ComputeType::kBFloat16) return qkv + threads * block;
  // bf16 copies: the inputs and the context for the projections, and per thread a block's matmul inputs.
  const int64_t inputs16 = p.batch * p.len * (c.embed_dim + c.q_width()) * 2;
  const int64_t block16 = (rows * (keys + c.head_dim) + keys * c.head_dim) * 2;
  return qkv + inputs16 + threads * (block + block16);
}

void DecoderAttention::ApplyRope(const ParsedDecoder& p, float* qkv, int threads) const {
  const DecoderConfig& c = options_.config;
  const int64_t tokens = p.batch * p.len, width = c.q_width() + 2 * c.kv_width();
  const DecoderInputs& in = *p.inputs;
  std::vector<int64_t> positions(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) {
    positions[t] = in.position_ids.present() ? LoadUnaligned<int64_t>(in.position_ids.data, t)
                                             : in.position_offset + t % p.len;
  }
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (tokens + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(threads) if (threads > 1 && chunks > 1) schedule(static)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t r0 = ch * kChunk, n = std::min(kChunk, tokens - r0);
    float* rows = qkv + r0 * width;
    rope_.Apply(rows, n, width, c.num_heads, c.head_dim, positions.data() + r0);
    rope_.Apply(rows + c.q_width(), n, width, c.num_kv_heads, c.head_dim, positions.data() + r0);
  }
}

absl::StatusOr<AttentionOutputs> DecoderAttention::ForwardParsed(const ParsedDecoder& p, int max_threads) const {
  const ParsedDecoder* one[] = {&p};
  return std::move(ForwardBatch(one, max_threads)[0]);
}

std::vector<absl::StatusOr<AttentionOutputs>> DecoderAttention::MakeOutputs(
    absl::Span<const ParsedDecoder* const> requests, std::vector<int64_t>* first_row) const {
  const DecoderConfig& c = options_.config;
  std::vector<absl::StatusOr<AttentionOutputs>> results;
  int64_t rows = 0;
  for (const ParsedDecoder* p : requests) {
    AttentionOutputs out;
    out.output = Tensor::Zeros(p->unbatched ? Shape{p->len, c.embed_dim} : Shape{p->batch, p->len, c.embed_dim});
    if (p->inputs->need_weights) {
      Shape ws = p->inputs->average_attn_weights ? Shape{p->batch, p->len, p->len}
                                                 : Shape{p->batch, c.num_heads, p->len, p->len};
      if (p->unbatched) ws.erase(ws.begin());
      out.attn_weights = Tensor::Zeros(std::move(ws));
    }
    results.push_back(std::move(out));
    first_row->push_back(rows);
    rows += p->batch * p->len;
  }
  first_row->push_back(rows);  // the end
  return results;
}

std::vector<DecoderAttention::Block> DecoderAttention::PlanBlocks(absl::Span<const ParsedDecoder* const> requests,
                                                                  int threads) const {
  const int64_t window = options_.config.sliding_window;
  std::vector<Block> blocks;
  for (size_t r = 0; r < requests.size(); ++r) {
    const ParsedDecoder& p = *requests[r];
    const int64_t rows = BlockRows(p, threads);
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t l0 = 0; l0 < p.len; l0 += rows) {
        Block blk{r, b, l0, std::min(rows, p.len - l0), 0, 0};
        blk.k0 = window > 0 ? std::max<int64_t>(0, l0 - window + 1) : 0;
        blk.k1 = l0 + blk.rows;
        blocks.push_back(blk);
      }
    }
  }
  return blocks;
}

void DecoderAttention::AttendBlocks(absl::Span<const ParsedDecoder* const> requests, const std::vector<Block>& blocks,
                                    const std::vector<int64_t>& first_row, float* qkv, int threads,
                                    const StopFn& stop, std::vector<absl::StatusOr<AttentionOutputs>>* results) const {
  const int64_t width = options_.config.q_width() + 2 * options_.config.kv_width();
  std::vector<absl::Status> statuses(blocks.size());
  auto attend = [&](size_t i) {
    const Block& blk = blocks[i];
    if (stop && !(statuses[i] = stop(blk.request)).ok()) return;
    absl::StatusOr<AttentionOutputs>& result = (*results)[blk.request];
    Tensor* weights = requests[blk.request]->inputs->need_weights ? &result->attn_weights : nullptr;
    statuses[i] = AttendBlock(*requests[blk.request], blk, qkv + first_row[blk.request] * width, weights);
  };
  const auto n = static_cast<int64_t>(blocks.size());
  if (threads == 1 || n == 1) {
    // No parallel construct at all: inside one, every oneDNN call would start a nested team.
    for (int64_t i = 0; i < n; ++i) attend(static_cast<size_t>(i));
  } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) attend(static_cast<size_t>(i));
  }
  for (size_t i = 0; i < blocks.size(); ++i) {
    absl::StatusOr<AttentionOutputs>& result = (*results)[blocks[i].request];
    if (!statuses[i].ok() && result.ok()) result = statuses[i];
  }
}

absl::Status DecoderAttention::ProjectQueries(absl::Span<const ParsedDecoder* const> requests, int64_t tokens,
                                             float* qkv) const {
  const DecoderConfig& c = options_.config;
  const int64_t e = c.embed_dim, width = c.q_width() + 2 * c.kv_width();
  std::vector<const TensorView*> queries;
  for (const ParsedDecoder* p : requests) queries.push_back(&p->inputs->query);
  BlockScratch& scratch = ThreadBlockScratch();
  return ProjectRows(*qkv_proj_, queries, tokens, e, scratch.inputs, scratch.inputs16, qkv, width);
}

std::vector<absl::StatusOr<AttentionOutputs>> DecoderAttention::ForwardBatch(
    absl::Span<const ParsedDecoder* const> requests, int max_threads, const StopFn& stop) const {
  const DecoderConfig& c = options_.config;
  const int64_t e = c.embed_dim, width = c.q_width() + 2 * c.kv_width();
  std::vector<int64_t> first_row;
  std::vector<absl::StatusOr<AttentionOutputs>> results = MakeOutputs(requests, &first_row);
  const int64_t tokens = first_row.back();
  int64_t flops = 0;
  for (const ParsedDecoder* p : requests) flops += p->flops;
  const int budget = max_threads > 0 ? max_threads : omp_get_max_threads();
  const int threads = flops < options_.single_thread_below_flops ? 1 : budget;
  const ScopedOmpThreads team(threads);  // oneDNN reads the calling thread's team size

  ProjectionBuffer& buffer = ThreadProjectionBuffer();
  float* qkv = buffer.Get(static_cast<size_t>(tokens * width));
  absl::Status status = ProjectQueries(requests, tokens, qkv);
  if (status.ok()) {
    for (size_t r = 0; r < requests.size(); ++r) ApplyRope(*requests[r], qkv + first_row[r] * width, threads);
    AttendBlocks(requests, PlanBlocks(requests, threads), first_row, qkv, threads, stop, &results);
  }
  // One output projection; a single request's straight into its answer.
  float* out = requests.size() == 1 && results[0].ok() ? results[0]->output.values.data()
                                                       : Grow(ThreadBlockScratch().out, tokens * e);
  if (status.ok()) status = o_proj_->Execute(qkv, tokens, width, out, e);
  for (size_t r = 0; r < requests.size(); ++r) {
    if (!status.ok() && results[r].ok()) results[r] = status;
    if (!results[r].ok() || out == results[r]->output.values.data()) continue;
    std::memcpy(results[r]->output.values.data(), out + first_row[r] * e,
                static_cast<size_t>((first_row[r + 1] - first_row[r]) * e) * sizeof(float));
  }
  buffer.Trim();
  return results;
}

absl::Status DecoderAttention::AttendBlock(const ParsedDecoder& p, const Block& blk, float* qkv,
                                           Tensor* weights) const {
  // The keys' padding as an additive row, shared by every query row and head of the block.
  const DecoderInputs& in = *p.inputs;
  BlockScratch& ws = ThreadBlockScratch();
  const int64_t keys = blk.k1 - blk.k0;
  float* pad = Grow(ws.pad, keys);
  for (int64_t k = 0; k < keys; ++k) {
    const int64_t at = blk.b * p.len + blk.k0 + k;
    if (p.key_padding_mask == MaskType::kBool) {
      pad[k] = static_cast<const uint8_t*>(in.key_padding_mask.data)[at] != 0 ? kNegInf : 0.0f;
    } else if (p.key_padding_mask == MaskType::kFloat) {
      pad[k] = LoadUnaligned<float>(in.key_padding_mask.data, at);
    } else {
      pad[k] = 0.0f;
    }
  }
  for (int64_t g = 0; g < options_.config.num_kv_heads; ++g) ATTN_RETURN_IF_ERROR(AttendGroup(p, blk, g, qkv, weights));
  return absl::OkStatus();
}

absl::Status DecoderAttention::AttendGroup(const ParsedDecoder& p, const Block& blk, int64_t g, float* qkv,
                                           Tensor* weights) const {
  const DecoderConfig& c = options_.config;
  BlockScratch& ws = ThreadBlockScratch();
  const int64_t r = c.group_size(), d = c.head_dim, width = c.q_width() + 2 * c.kv_width();
  const int64_t m = r * blk.rows, keys = blk.k1 - blk.k0;
  float* seq = qkv + blk.b * p.len * width;
  float* q = Grow(ws.q, m * d);
  StackGroupQueries(seq + blk.l0 * width, width, blk.rows, g, r, d, c.score_scale(), q);
  const float* k = seq + blk.k0 * width + c.q_width() + g * d;
  const float* v = k + c.kv_width();
  float* scores = Grow(ws.scores, m * keys);
  ATTN_RETURN_IF_ERROR(scores_op_->Execute(Matrix(q, m, d, d), KeysTransposed(k, d, keys, width),
                                           Matrix(scores, m, keys, keys)));
  const RowBounds bounds{blk.l0, blk.rows, blk.k0, keys, c.sliding_window,
                         static_cast<float>(c.attn_logit_softcapping), p.key_padding_mask != MaskType::kNone};
  SoftmaxGroupRows(bounds, m, ws.pad.data(), scores);
  if (weights != nullptr) AddBlockWeights(p, blk, g, scores, weights);
  float* ctx = Grow(ws.context, m * d);
  ATTN_RETURN_IF_ERROR(context_op_->Execute(Matrix(scores, m, keys, keys), Matrix(v, keys, d, width),
                                            Matrix(ctx, m, d, d)));
  // The context replaces the group's q columns, which the output projection reads.
  UnstackGroupContext(ctx, blk.rows, g, r, d, seq + blk.l0 * width, width);
  return absl::OkStatus();
}

void DecoderAttention::AddBlockWeights(const ParsedDecoder& p, const Block& blk, int64_t g, const float* probs,
                                       Tensor* weights) const {
  const DecoderConfig& c = options_.config;
  const int64_t len = p.len;
  const bool averaged = p.inputs->average_attn_weights;
  const int64_t first_row = averaged ? blk.b * len + blk.l0 : blk.b * c.num_heads * len + blk.l0;
  const WeightsSink sink{weights->values.data() + first_row * len + blk.k0, len * len, len, averaged,
                         1.0f / static_cast<float>(c.num_heads)};
  AddGroupWeights(sink, g, c.group_size(), blk.rows, blk.k1 - blk.k0, probs);
}

}  // namespace attnserve
