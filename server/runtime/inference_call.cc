#include "server/runtime/inference_call.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log_string.h"
#include "common/status_macros.h"
#include "core/activation_rows.h"

namespace attnserve {
namespace {

DecoderInputs ToDecoderInputs(const AttentionInputs& in) {
  DecoderInputs d;
  d.query = in.query;
  d.key_padding_mask = in.key_padding_mask;
  d.position_offset = in.position_offset;
  d.position_ids = in.position_ids;
  d.need_weights = in.need_weights;
  d.average_attn_weights = in.average_attn_weights;
  return d;
}

// A decoder layer is self-attention, causal, with padding alone as its mask: the other inputs are refused
// rather than ignored. `parsed` gets the summary the later stages read.
absl::Status ValidateDecoderCall(InferenceCall* call) {
  const AttentionInputs& in = call->inputs;
  for (const auto& [field, view] : {std::pair<const char*, const TensorView*>{"key", &in.key},
                                    {"value", &in.value},
                                    {"attn_mask", &in.attn_mask}}) {
    if (view->present()) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ": layer '", call->layer_name,
          "' is DECODER_ATTENTION (causal self-attention; its only mask is key_padding_mask)"));
    }
  }
  call->decoder_inputs = ToDecoderInputs(in);
  ATTN_ASSIGN_OR_RETURN(call->decoder_parsed, call->layer->decoder->Validate(call->decoder_inputs));
  const ParsedDecoder& d = call->decoder_parsed;
  call->parsed = ParsedAttention{};
  call->parsed.inputs = &call->inputs;
  call->parsed.unbatched = d.unbatched;
  call->parsed.self_attention = true;
  call->parsed.batch = d.batch;
  call->parsed.q_len = call->parsed.kv_len = d.len;
  call->parsed.key_padding_mask = d.key_padding_mask;
  call->parsed.flops = d.flops;
  call->parsed.output_bytes = d.output_bytes;
  call->parsed.weights_bytes = d.weights_bytes;
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateCall(const LayerRegistry& registry, InferenceCall* call) {
  if (call->layer_name.empty()) return absl::NotFoundError(absl::StrCat(call->layer_field, ": is required"));
  call->layer = registry.Find(call->layer_name);
  if (call->layer == nullptr) {
    return absl::NotFoundError(
        absl::StrCat(call->layer_field, ": no layer named '", BoundedForLog(call->layer_name), "'"));
  }
  if (call->version != 0 && call->version != call->layer->version) {
    call->layer = registry.Find(call->layer_name, call->version);
    if (call->layer == nullptr) {
      return absl::NotFoundError(absl::StrCat(call->version_field, ": layer '", call->layer_name, "' has version(s) ",
                                              absl::StrJoin(registry.Versions(call->layer_name), ", "), ", not ",
                                              call->version));
    }
  }
  ATTN_RETURN_IF_ERROR(call->decode_status);
  if (call->layer->decoder != nullptr) return ValidateDecoderCall(call);
  ATTN_ASSIGN_OR_RETURN(call->parsed, call->layer->engine->Validate(call->inputs));
  return absl::OkStatus();
}

int64_t CallCostBytes(const InferenceCall& call) {
  const ServedLayer& layer = *call.layer;
  const AnswerWire wire{call.output_dtype, call.answer_values_in_place};
  if (call.session != nullptr) {
    return AppendCostBytes(call.session->append, layer.appender(), call.request_bytes, wire);
  }
  if (layer.decoder != nullptr) return DecoderCostBytes(call.decoder_parsed, *layer.decoder, call.request_bytes, wire);
  const MultiheadAttention& engine = *layer.engine;
  return RequestCostBytes(call.parsed, engine.config(),
                          engine.ScoresBlockBytes(call.parsed) + engine.Bf16ScratchBytes(call.parsed),
                          call.request_bytes, wire);
}

}  // namespace attnserve
