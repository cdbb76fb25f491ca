#include "core/attention_inputs.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/activation_rows.h"

namespace attnserve {
absl::Status ShapeError(const char* field, const std::string& expected, const Shape& actual) {
  return absl::InvalidArgumentError(
      absl::StrCat(field, ": expected shape ", expected, ", got ", ShapeToString(actual)));
}

// Dims must be positive, the data present, and the element count sane (at most 2^40, as the wire decoder
// allows) before anything multiplies it: B*L, B*S and the FLOPs then fit in int64.
absl::Status CheckDimsAndData(const char* field, const TensorView& t) {
  constexpr int64_t kMaxElements = int64_t{1} << 40;
  int64_t count = 1;
  for (int64_t d : t.shape) {
    if (d <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": every dimension must be positive, got shape ", ShapeToString(t.shape)));
    }
    if (d > kMaxElements || count > kMaxElements / d) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": shape ", ShapeToString(t.shape), " is too large"));
    }
    count *= d;
  }
  if (t.data == nullptr) return absl::InvalidArgumentError(absl::StrCat(field, ": has a shape but no data"));
  return absl::OkStatus();
}

absl::StatusOr<MaskType> MaskDType(const char* field, const TensorView& t) {
  if (!t.present()) return MaskType::kNone;
  if (t.dtype == DType::kBool) return MaskType::kBool;
  if (t.dtype == DType::kFloat32) return MaskType::kFloat;
  return absl::InvalidArgumentError(absl::StrCat(field, ": dtype must be BOOL or FLOAT32"));
}

absl::Status CheckActivation(const char* field, const TensorView& t) {
  if (IsActivationDType(t.dtype)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(field, ": dtype must be FLOAT32, BFLOAT16 or FLOAT16, got ", DTypeName(t.dtype)));
}

absl::StatusOr<QueryShape> ParseQueryShape(const TensorView& query, int64_t embed_dim) {
  if (!query.present()) return absl::InvalidArgumentError("query: is required");
  ATTN_RETURN_IF_ERROR(CheckActivation("query", query));
  const Shape& qs = query.shape;
  if ((qs.size() != 2 && qs.size() != 3) || qs.back() != embed_dim) {
    return ShapeError("query", absl::StrCat("[B, L, ", embed_dim, "] or [L, ", embed_dim, "] (unbatched)"), qs);
  }
  ATTN_RETURN_IF_ERROR(CheckDimsAndData("query", query));
  const bool unbatched = qs.size() == 2;
  return QueryShape{unbatched, unbatched ? 1 : qs[0], qs[qs.size() - 2]};
}

absl::Status CheckLimit(const char* what, int64_t value, int64_t limit, const char* limit_name) {
  if (limit <= 0 || value <= limit) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(what, " is ", value, ", past the layer's ", limit_name, " of ", limit));
}

namespace {

// query: [B, L, E] or [L, E]. Sets unbatched, batch and q_len.
absl::Status ParseQuery(const AttentionInputs& in, const MhaConfig& config, ParsedAttention* p) {
  ATTN_ASSIGN_OR_RETURN(const QueryShape q, ParseQueryShape(in.query, config.embed_dim));
  p->unbatched = q.unbatched;
  p->batch = q.batch;
  p->q_len = q.len;
  return absl::OkStatus();
}

// key [B, S, kdim] and value [B, S, vdim]: both or neither (self-attention). Sets self_attention and kv_len.
absl::Status ParseKeyValue(const AttentionInputs& in, const MhaConfig& config, ParsedAttention* p) {
  if (in.key.present() != in.value.present()) {
    return absl::InvalidArgumentError(absl::StrCat(
        in.key.present() ? "value" : "key",
        ": is required when ", in.key.present() ? "key" : "value", " is given (omit both for self-attention)"));
  }
  p->self_attention = !in.key.present();
  if (p->self_attention) {
    if (!config.same_qkv_dim()) {
      return absl::InvalidArgumentError(absl::StrCat("key: is required: the layer has kdim=", config.key_dim(),
                                                     " and vdim=", config.value_dim(), " != embed_dim=",
                                                     config.embed_dim,
                                                     ", so self-attention needs explicit key and value"));
    }
    p->kv_len = p->q_len;
    return absl::OkStatus();
  }
  ATTN_RETURN_IF_ERROR(CheckActivation("key", in.key));
  ATTN_RETURN_IF_ERROR(CheckActivation("value", in.value));
  const Shape& qs = in.query.shape;
  const std::string bdim = p->unbatched ? "" : absl::StrCat(p->batch, ", ");
  const Shape& ks = in.key.shape;
  if (ks.size() != qs.size() || ks.back() != config.key_dim() || (!p->unbatched && ks[0] != p->batch)) {
    return ShapeError("key", absl::StrCat("[", bdim, "S, ", config.key_dim(), "]"), ks);
  }
  ATTN_RETURN_IF_ERROR(CheckDimsAndData("key", in.key));
  p->kv_len = ks[ks.size() - 2];
  const Shape& vs = in.value.shape;
  if (vs.size() != qs.size() || vs.back() != config.value_dim() || (!p->unbatched && vs[0] != p->batch) ||
      vs[vs.size() - 2] != p->kv_len) {
    return ShapeError("value", absl::StrCat("[", bdim, p->kv_len, ", ", config.value_dim(), "]"), vs);
  }
  return CheckDimsAndData("value", in.value);
}

// The answer's tensors, sized before anything is computed. Sizes are products of dims each checked to be
// below 2^40, so they are computed in double first: a hostile shape must not overflow int64.
void SizeAnswer(const MhaConfig& config, ParsedAttention* p) {
  constexpr double kF32 = 4;
  const double output = kF32 * static_cast<double>(p->batch) * static_cast<double>(p->q_len) *
                        static_cast<double>(config.embed_dim);
  double weights = 0;
  if (p->inputs->need_weights) {
    weights = kF32 * static_cast<double>(p->batch) * static_cast<double>(p->q_len) * static_cast<double>(p->kv_len) *
              (p->inputs->average_attn_weights ? 1.0 : static_cast<double>(config.num_heads));
  }
  constexpr double kCap = 9.0e18;  // below INT64_MAX: what is past any limit stays past it
  p->output_bytes = static_cast<int64_t>(std::min(output, kCap));
  p->weights_bytes = static_cast<int64_t>(std::min(weights, kCap));
}

absl::Status CheckAnswerSize(const ParsedAttention& p, const MhaConfig& config, const AttentionLimits& limits) {
  if (limits.max_answer_bytes <= 0 || p.answer_bytes() <= limits.max_answer_bytes) return absl::OkStatus();
  std::string what = absl::StrCat("output [", p.batch, ", ", p.q_len, ", ", config.embed_dim, "] is ",
                                  p.output_bytes, " bytes");
  if (p.weights_bytes > 0) {
    const bool averaged = p.inputs->average_attn_weights;
    what = absl::StrCat("need_weights: the answer would be ", p.answer_bytes(), " bytes (", what,
                        ", attn_weights [", p.batch, averaged ? "" : absl::StrCat(", ", config.num_heads), ", ",
                        p.q_len, ", ", p.kv_len, "] with average_attn_weights=", averaged ? "true" : "false", " is ",
                        p.weights_bytes, " bytes)");
  } else {
    what = absl::StrCat("the answer would be ", p.answer_bytes(), " bytes (", what, ")");
  }
  return absl::InvalidArgumentError(
      absl::StrCat(what, ", past the layer's max_response_bytes of ", limits.max_answer_bytes));
}

absl::Status CheckLimits(const ParsedAttention& p, const AttentionLimits& limits) {
  ATTN_RETURN_IF_ERROR(CheckLimit("batch size B", p.batch, limits.max_batch, "max_batch"));
  ATTN_RETURN_IF_ERROR(CheckLimit("query length L", p.q_len, limits.max_sequence_length, "max_sequence_length"));
  ATTN_RETURN_IF_ERROR(CheckLimit("key length S", p.kv_len, limits.max_sequence_length, "max_sequence_length"));
  ATTN_RETURN_IF_ERROR(CheckLimit("query tokens B*L", p.query_tokens(), limits.max_tokens, "max_tokens"));
  return CheckLimit("key tokens B*S", p.kv_tokens(), limits.max_tokens, "max_tokens");
}

// key_padding_mask: [B, S] or [S].
absl::Status ParseKeyPaddingMask(const AttentionInputs& in, ParsedAttention* p) {
  ATTN_ASSIGN_OR_RETURN(p->key_padding_mask, MaskDType("key_padding_mask", in.key_padding_mask));
  if (p->key_padding_mask == MaskType::kNone) return absl::OkStatus();
  const Shape expected = p->unbatched ? Shape{p->kv_len} : Shape{p->batch, p->kv_len};
  if (in.key_padding_mask.shape != expected) {
    return ShapeError("key_padding_mask", ShapeToString(expected) + (p->unbatched ? " (S)" : " (B, S)"),
                      in.key_padding_mask.shape);
  }
  return CheckDimsAndData("key_padding_mask", in.key_padding_mask);
}

// attn_mask: [L, S] or [B*H, L, S].
absl::Status ParseAttnMask(const AttentionInputs& in, const MhaConfig& config, ParsedAttention* p) {
  ATTN_ASSIGN_OR_RETURN(p->attn_mask, MaskDType("attn_mask", in.attn_mask));
  if (p->attn_mask == MaskType::kNone) return absl::OkStatus();
  const Shape two_d{p->q_len, p->kv_len};
  const Shape three_d{p->batch * config.num_heads, p->q_len, p->kv_len};
  if (in.attn_mask.shape == three_d) {
    p->attn_mask_per_head = true;
  } else if (in.attn_mask.shape != two_d) {
    return ShapeError("attn_mask",
                      absl::StrCat(ShapeToString(two_d), " (L, S) or ", ShapeToString(three_d), " (B*H, L, S)"),
                      in.attn_mask.shape);
  }
  return CheckDimsAndData("attn_mask", in.attn_mask);
}

}  // namespace

absl::StatusOr<ParsedAttention> ParseAttentionInputs(const AttentionInputs& in, const MhaConfig& config,
                                                     const AttentionLimits& limits) {
  ParsedAttention p;
  p.inputs = &in;
  if (in.position_ids.present() || in.position_offset != 0) {
    return absl::InvalidArgumentError(absl::StrCat(in.position_ids.present() ? "position_ids" : "position_offset",
                                                   ": only DECODER_ATTENTION layers take rotary positions; this "
                                                   "layer is MULTIHEAD_ATTENTION"));
  }
  ATTN_RETURN_IF_ERROR(ParseQuery(in, config, &p));
  ATTN_RETURN_IF_ERROR(ParseKeyValue(in, config, &p));
  ATTN_RETURN_IF_ERROR(CheckLimits(p, limits));
  ATTN_RETURN_IF_ERROR(ParseKeyPaddingMask(in, &p));
  ATTN_RETURN_IF_ERROR(ParseAttnMask(in, config, &p));
  SizeAnswer(config, &p);
  ATTN_RETURN_IF_ERROR(CheckAnswerSize(p, config, limits));
  p.flops = AttentionFlops(config, p.batch, p.q_len, p.kv_len);
  return p;
}

int64_t AttentionFlops(const MhaConfig& config, int64_t batch, int64_t q_len, int64_t kv_len) {
  // In double: shapes that passed validation without a layer's limits can still make B*L*S*E overflow.
  const double e = static_cast<double>(config.embed_dim), b = static_cast<double>(batch);
  const double q_tokens = b * static_cast<double>(q_len), kv_tokens = b * static_cast<double>(kv_len);
  const double projections = 2 * q_tokens * e * e                                                  // Q
                             + 2 * kv_tokens * e * static_cast<double>(config.key_dim() + config.value_dim())  // K, V
                             + 2 * q_tokens * e * e;                                                // output
  const double attention = 2 * 2 * q_tokens * static_cast<double>(kv_len) * e;  // QK^T and PV, all heads
  return static_cast<int64_t>(std::min(projections + attention, 9.0e18));
}

}  // namespace attnserve
