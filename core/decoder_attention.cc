#include "core/decoder_attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/memory/memory.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/activation_rows.h"
#include "core/bf16_rows.h"
#include "core/decoder_kernels.h"
#include "core/omp_threads.h"
#include "core/row_softmax.h"

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

// Elements [at, at + n) of p's key padding mask ([B, L] flattened) as additive floats: 0 open, -inf masked (a
// bool mask), the value itself (a float mask), all 0 without a mask.
void KeyPaddingRow(const ParsedDecoder& p, int64_t at, int64_t n, float* bias) {
  const DecoderInputs& in = *p.inputs;
  for (int64_t k = 0; k < n; ++k) {
    if (p.key_padding_mask == MaskType::kBool) {
      bias[k] = static_cast<const uint8_t*>(in.key_padding_mask.data)[at + k] != 0 ? kNegInf : 0.0f;
    } else if (p.key_padding_mask == MaskType::kFloat) {
      bias[k] = LoadUnaligned<float>(in.key_padding_mask.data, at + k);
    } else {
      bias[k] = 0.0f;
    }
  }
}

// Soft-caps FlashAttention's scores (cap * tanh(score / cap)) block by block. FlashAttention adds the key padding
// (key_bias) after add_mask, so a masked key stays -inf, and key blocks padded whole are still skipped.
void SoftCapScores(float cap, FlashAttentionArgs* a) {
  a->add_mask = [cap](int64_t, int64_t, int64_t, int64_t rows, int64_t, int64_t cols, float* scores, int64_t ld) {
    SoftCapRows(scores, rows, cols, ld, cap);
  };
}
}  // namespace

void ReleaseDecoderScratch(size_t keep_bytes) {
  ThreadProjectionBuffer().Trim(keep_bytes);
  ThreadBlockScratch().ForEachBuffer([keep_bytes](auto& buf) {
    if (buf.capacity() * sizeof(buf[0]) > keep_bytes) std::decay_t<decltype(buf)>().swap(buf);
  });
}

int64_t DecoderScratchHeldBytes() {
  size_t bytes = ThreadProjectionBuffer().capacity * sizeof(float);
  ThreadBlockScratch().ForEachBuffer([&bytes](auto& buf) { bytes += buf.capacity() * sizeof(buf[0]); });
  return static_cast<int64_t>(bytes) + FlashScratchHeldBytes();
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
  if (options.flash_min_keys < 0 || options.flash_query_rows < 0 || options.flash_key_cols < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("flash_min_keys, flash_query_rows and flash_key_cols must be >= 0, got ", options.flash_min_keys,
                     ", ", options.flash_query_rows, " and ", options.flash_key_cols));
  }
  Options resolved = options;
  const auto [cpu_rows, cpu_keys] = FlashBlockForCpu(options.compute);
  if (resolved.flash_query_rows == 0) resolved.flash_query_rows = cpu_rows;
  if (resolved.flash_key_cols == 0) resolved.flash_key_cols = cpu_keys;
  auto layer = absl::WrapUnique(new DecoderAttention(resolved, std::move(rope)));
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
  if (ct == ComputeType::kBFloat16 && resolved.flash_min_keys > 0) {
    ATTN_ASSIGN_OR_RETURN(layer->flash_blocks_,
                          CreateFlashBlockMatmuls(resolved.flash_query_rows, resolved.flash_key_cols, c.head_dim));
  }
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
  for (const Bf16BlockMatmul* op : {flash_blocks_.scores.get(), flash_blocks_.context.get()}) {
    if (op == nullptr) continue;
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
  const int64_t tokens = p.batch * p.len, width = c.q_width() + 2 * c.kv_width();
  const bool bf16 = compute_ == ComputeType::kBFloat16;
  // The projections, the query gathered with a batch's others (or aligned), the output projection's rows in
  // a batch, the positions; a bf16 layer's copies of the inputs and the context for the projections.
  const int64_t qkv =
      tokens * ((width + 2 * c.embed_dim) * kF32 + 8) + (bf16 ? tokens * (c.embed_dim + c.q_width()) * 2 : 0);
  if (UsesFlash(p)) {  // per thread its blocks; the key padding as a bias; a bf16 layer's copy of the rows
    return qkv + threads * FlashScratchBytes(FlashShape(p)) + tokens * kF32 + (bf16 ? tokens * width * 2 : 0);
  }
  const int64_t rows = BlockRows(p, threads) * c.group_size();
  const int64_t keys = std::min(p.len, c.sliding_window > 0 ? std::min(p.len, c.sliding_window) + rows : p.len);
  const int64_t block = rows * (keys + 2 * c.head_dim) * kF32 + keys * kF32 + rows;
  if (!bf16) return qkv + threads * block;
  // A block's matmul inputs in bf16.
  const int64_t block16 = (rows * (keys + c.head_dim) + keys * c.head_dim) * 2;
  return qkv + threads * (block + block16);
}

void DecoderAttention::ApplyRope(const ParsedDecoder& p, float* qkv, int threads, const FlashRows* flash) const {
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
    if (flash == nullptr) continue;
    const int64_t q_width = c.q_width();
    const float q_scale = flash->q_scale;
    for (int64_t t = 0; t < n; ++t) {  // FlashAttention takes the scale in Q
      float* q = rows + t * width;
      for (int64_t j = 0; j < q_width; ++j) q[j] *= q_scale;
    }
    if (flash->rows16 != nullptr) FloatRowsToBf16(rows, n, width, width, flash->rows16 + r0 * width, width);
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
    if (UsesFlash(p)) continue;
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
  if (blocks.empty()) return;  // every request on FlashAttention
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

void DecoderAttention::Attend(absl::Span<const ParsedDecoder* const> requests, const std::vector<int64_t>& first_row,
                              float* qkv, int threads, const StopFn& stop,
                              std::vector<absl::StatusOr<AttentionOutputs>>* results) const {
  const int64_t width = options_.config.q_width() + 2 * options_.config.kv_width();
  for (size_t r = 0; r < requests.size(); ++r) {
    float* rows = qkv + first_row[r] * width;
    if (!UsesFlash(*requests[r])) {
      ApplyRope(*requests[r], rows, threads);
      continue;
    }
    auto should_stop = [&] { return stop ? stop(r) : absl::OkStatus(); };
    absl::Status status = AttendFlash(*requests[r], rows, threads, should_stop);
    if (!status.ok()) (*results)[r] = std::move(status);
  }
  AttendBlocks(requests, PlanBlocks(requests, threads), first_row, qkv, threads, stop, results);
}

bool DecoderAttention::UsesFlash(const ParsedDecoder& p) const {
  return options_.flash_min_keys > 0 && p.len >= options_.flash_min_keys && !p.inputs->need_weights;
}

FlashAttentionArgs DecoderAttention::FlashShape(const ParsedDecoder& p) const {
  const DecoderConfig& c = options_.config;
  FlashAttentionArgs a;
  a.batch = p.batch;
  a.heads = c.num_heads;
  a.kv_heads = c.num_kv_heads;
  a.q_len = a.kv_len = p.len;
  a.head_dim = c.head_dim;
  a.causal = true;
  a.window = std::max<int64_t>(0, c.sliding_window);
  a.query_rows = options_.flash_query_rows;
  a.key_cols = options_.flash_key_cols;
  a.strips = options_.flash_strips;
  if (compute_ == ComputeType::kBFloat16) {
    a.bf16.scores_op = scores_op_.get();
    a.bf16.context_add_op = context_add_op_.get();
    a.bf16.block_scores = flash_blocks_.scores.get();
    a.bf16.block_context = flash_blocks_.context.get();
  }
  return a;
}

absl::Status DecoderAttention::AttendFlash(const ParsedDecoder& p, float* qkv, int threads,
                                           absl::FunctionRef<absl::Status()> should_stop) const {
  const DecoderConfig& c = options_.config;
  const int64_t tokens = p.batch * p.len, width = c.q_width() + 2 * c.kv_width(), stride = p.len * width;
  FlashAttentionArgs a = FlashShape(p);
  FlashRows rows{c.score_scale(), nullptr};
  if (a.bf16.scores_op != nullptr) rows.rows16 = Grow(ThreadBlockScratch().rows16, tokens * width);
  ApplyRope(p, qkv, threads, &rows);
  a.q = {qkv, width, stride};
  a.k = {qkv + c.q_width(), width, stride};
  a.v = {qkv + c.q_width() + c.kv_width(), width, stride};
  if (rows.rows16 != nullptr) {
    a.bf16.q = rows.rows16;
    a.bf16.k = rows.rows16 + c.q_width();
    a.bf16.v = rows.rows16 + c.q_width() + c.kv_width();
    a.bf16.ld = width;
    a.bf16.q_seq_stride = a.bf16.kv_seq_stride = stride;
  }
  a.out = qkv;  // the context over the q columns, which the output projection reads
  a.out_ld = width;
  a.out_seq_stride = stride;
  std::vector<float> key_bias;  // [B, L]
  if (p.key_padding_mask != MaskType::kNone) {
    key_bias.resize(static_cast<size_t>(tokens));
    KeyPaddingRow(p, 0, tokens, key_bias.data());
    a.key_bias = key_bias.data();
  }
  if (c.attn_logit_softcapping > 0) SoftCapScores(static_cast<float>(c.attn_logit_softcapping), &a);
  return FlashAttention(a, threads, should_stop);
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
  if (status.ok()) Attend(requests, first_row, qkv, threads, stop, &results);
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
  BlockScratch& ws = ThreadBlockScratch();
  const int64_t keys = blk.k1 - blk.k0;
  KeyPaddingRow(p, blk.b * p.len + blk.k0, keys, Grow(ws.pad, keys));
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
