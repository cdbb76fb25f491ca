#include "core/decoder_inputs.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace attnserve {
namespace {

// A per-token tensor: [B, L], or [L] unbatched.
absl::Status CheckTokenShape(const char* field, const TensorView& t, const ParsedDecoder& p) {
  const Shape expected = p.unbatched ? Shape{p.len} : Shape{p.batch, p.len};
  if (t.shape != expected) {
    return ShapeError(field, ShapeToString(expected) + (p.unbatched ? " (L)" : " (B, L)"), t.shape);
  }
  return CheckDimsAndData(field, t);
}

// RoPE positions: position_ids [B, L] INT64, or position_offset + i; all in [0, kMaxRopePosition).
absl::Status CheckPositions(const DecoderInputs& in, const ParsedDecoder& p) {
  if (!in.position_ids.present()) {
    if (in.position_offset < 0 || in.position_offset > kMaxRopePosition - p.len) {
      return absl::InvalidArgumentError(absl::StrCat("position_offset: must be in [0, ", kMaxRopePosition - p.len,
                                                     "] (positions below 2^24 for L=", p.len, "), got ",
                                                     in.position_offset));
    }
    return absl::OkStatus();
  }
  if (in.position_ids.dtype != DType::kInt64) {
    return absl::InvalidArgumentError(
        absl::StrCat("position_ids: dtype must be INT64, got ", DTypeName(in.position_ids.dtype)));
  }
  ATTN_RETURN_IF_ERROR(CheckTokenShape("position_ids", in.position_ids, p));
  for (int64_t t = 0; t < p.batch * p.len; ++t) {
    int64_t pos;
    std::memcpy(&pos, static_cast<const char*>(in.position_ids.data) + t * 8, sizeof(pos));
    if (pos < 0 || pos >= kMaxRopePosition) {
      return absl::InvalidArgumentError(absl::StrCat("position_ids: values must be in [0, ", kMaxRopePosition,
                                                     "), got ", pos, " at [", t / p.len, ", ", t % p.len, "]"));
    }
  }
  return absl::OkStatus();
}

// The answer's size, in double first (hostile shapes must not overflow), then against the limit.
absl::Status SizeAnswer(const DecoderConfig& c, const AttentionLimits& limits, ParsedDecoder* p) {
  const double b = static_cast<double>(p->batch), l = static_cast<double>(p->len);
  const double output = 4 * b * l * static_cast<double>(c.embed_dim);
  double weights = 0;
  if (p->inputs->need_weights) {
    weights = 4 * b * l * l * (p->inputs->average_attn_weights ? 1.0 : static_cast<double>(c.num_heads));
  }
  constexpr double kCap = 9.0e18;
  p->output_bytes = static_cast<int64_t>(std::min(output, kCap));
  p->weights_bytes = static_cast<int64_t>(std::min(weights, kCap));
  if (limits.max_answer_bytes <= 0 || p->answer_bytes() <= limits.max_answer_bytes) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      p->weights_bytes > 0 ? "need_weights: " : "", "the answer would be ", p->answer_bytes(), " bytes (output ",
      p->output_bytes, ", attn_weights ", p->weights_bytes, "), past the layer's max_response_bytes of ",
      limits.max_answer_bytes));
}

}  // namespace

absl::StatusOr<ParsedDecoder> ParseDecoderInputs(const DecoderInputs& in, const DecoderConfig& config,
                                                 const AttentionLimits& limits) {
  ParsedDecoder p;
  p.inputs = &in;
  ATTN_ASSIGN_OR_RETURN(const QueryShape q, ParseQueryShape(in.query, config.embed_dim));
  p.unbatched = q.unbatched;
  p.batch = q.batch;
  p.len = q.len;
  ATTN_RETURN_IF_ERROR(CheckLimit("batch size B", p.batch, limits.max_batch, "max_batch"));
  ATTN_RETURN_IF_ERROR(CheckLimit("query length L", p.len, limits.max_sequence_length, "max_sequence_length"));
  ATTN_RETURN_IF_ERROR(CheckLimit("query tokens B*L", p.batch * p.len, limits.max_tokens, "max_tokens"));
  ATTN_ASSIGN_OR_RETURN(p.key_padding_mask, MaskDType("key_padding_mask", in.key_padding_mask));
  if (p.key_padding_mask != MaskType::kNone) {
    ATTN_RETURN_IF_ERROR(CheckTokenShape("key_padding_mask", in.key_padding_mask, p));
  }
  ATTN_RETURN_IF_ERROR(CheckPositions(in, p));
  ATTN_RETURN_IF_ERROR(SizeAnswer(config, limits, &p));
  p.flops = DecoderFlops(config, p.batch, p.len);
  return p;
}

}  // namespace attnserve
