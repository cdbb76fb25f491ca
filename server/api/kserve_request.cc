#include "server/api/kserve_request.h"

#include <array>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/log_string.h"
#include "common/status_macros.h"
#include "server/api/spliced_wire.h"
#include "server/api/tensor_codec.h"

namespace attnserve {
namespace {

using inference::InferParameter;
using inference::ModelInferRequest;
using InputTensor = inference::ModelInferRequest::InferInputTensor;

enum class WireType { kFp32, kFp16, kBf16, kBool, kInt64 };

// Activations take FP32, FP16 or BF16; masks FP32 or BOOL; positions INT64.
enum class InputKind { kActivation, kMask, kPositions };

struct InputSpec {
  const char* name;
  TensorView AttentionInputs::*field;
  InputKind kind;
};

constexpr std::array<InputSpec, 6> kInputs = {{
    {"query", &AttentionInputs::query, InputKind::kActivation},
    {"key", &AttentionInputs::key, InputKind::kActivation},
    {"value", &AttentionInputs::value, InputKind::kActivation},
    {"key_padding_mask", &AttentionInputs::key_padding_mask, InputKind::kMask},
    {"attn_mask", &AttentionInputs::attn_mask, InputKind::kMask},
    {"position_ids", &AttentionInputs::position_ids, InputKind::kPositions},
}};

constexpr char kOutput[] = "output";
constexpr char kAttnWeights[] = "attn_weights";

absl::StatusOr<WireType> ParseWireType(const InputTensor& t, const InputSpec& spec) {
  const std::string& d = t.datatype();
  const char* accepted = "INT64";
  switch (spec.kind) {
    case InputKind::kPositions:
      if (d == "INT64") return WireType::kInt64;
      break;
    case InputKind::kMask:
      if (d == "FP32") return WireType::kFp32;
      if (d == "BOOL") return WireType::kBool;
      accepted = "FP32 or BOOL";
      break;
    case InputKind::kActivation:
      if (d == "FP32") return WireType::kFp32;
      if (d == "FP16") return WireType::kFp16;
      if (d == "BF16") return WireType::kBf16;
      accepted = "FP32, FP16 or BF16";
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat(spec.name, ": datatype must be ", accepted, ", got '", BoundedForLog(d, 16), "'"));
}

size_t WireSize(WireType type) {
  switch (type) {
    case WireType::kFp32:
      return 4;
    case WireType::kFp16:
    case WireType::kBf16:
      return 2;
    case WireType::kBool:
      return 1;
    case WireType::kInt64:
      return 8;
  }
  return 4;
}

absl::StatusOr<TensorView> ViewRaw(const std::string& raw, size_t index, const InputSpec& spec, Shape shape,
                                   int64_t count, WireType type, const std::string& datatype) {
  const int64_t expected = count * static_cast<int64_t>(WireSize(type));
  if (static_cast<int64_t>(raw.size()) != expected) {
    return absl::InvalidArgumentError(absl::StrCat(spec.name, ": raw_input_contents[", index, "] holds ", raw.size(),
                                                   " bytes, expected ", expected, " (shape ", ShapeToString(shape),
                                                   " x ", datatype, ")"));
  }
  if (type == WireType::kBool) return TensorView{DType::kBool, std::move(shape), raw.data()};
  if (type == WireType::kInt64) return TensorView{DType::kInt64, std::move(shape), raw.data()};
  // 16-bit types too: the engines convert them as they gather a batch.
  const DType dtype = type == WireType::kFp16 ? DType::kFloat16 : type == WireType::kBf16 ? DType::kBFloat16
                                                                                          : DType::kFloat32;
  return TensorView{dtype, std::move(shape), raw.data()};
}

absl::StatusOr<TensorView> ViewContents(const InputTensor& t, const InputSpec& spec, Shape shape, int64_t count,
                                        WireType type) {
  if (type == WireType::kFp16 || type == WireType::kBf16) {
    return absl::InvalidArgumentError(
        absl::StrCat(spec.name, ": ", t.datatype(), " values must come in raw_input_contents"));
  }
  const auto& c = t.contents();
  const bool is_bool = type == WireType::kBool, is_int64 = type == WireType::kInt64;
  const int64_t got = is_bool ? c.bool_contents_size() : is_int64 ? c.int64_contents_size() : c.fp32_contents_size();
  const int64_t all = c.int_contents_size() + c.int64_contents_size() + c.uint_contents_size() +
                      c.uint64_contents_size() + c.fp64_contents_size() + c.bytes_contents_size() +
                      c.fp32_contents_size() + c.bool_contents_size();
  const char* wanted = is_bool    ? "contents.bool_contents"
                       : is_int64 ? "contents.int64_contents"
                                  : "contents.fp32_contents";
  if (all != got) {
    return absl::InvalidArgumentError(
        absl::StrCat(spec.name, ": datatype ", t.datatype(), " takes its values in ", wanted, " only"));
  }
  if (got != count) {
    return absl::InvalidArgumentError(absl::StrCat(spec.name, ": ", wanted, " holds ", got, " values, expected ",
                                                   count, " (shape ", ShapeToString(shape), ")"));
  }
  static_assert(sizeof(bool) == 1, "bool_contents is viewed as one byte per element");
  if (is_bool) return TensorView{DType::kBool, std::move(shape), c.bool_contents().data()};
  if (is_int64) return TensorView{DType::kInt64, std::move(shape), c.int64_contents().data()};
  return TensorView{DType::kFloat32, std::move(shape), c.fp32_contents().data()};
}

// One input; `raw` is its raw_input_contents entry, or null when values come in `contents`.
absl::StatusOr<TensorView> DecodeInput(const InputTensor& t, const std::string* raw, size_t index,
                                       const InputSpec& spec) {
  ATTN_ASSIGN_OR_RETURN(const WireType type, ParseWireType(t, spec));
  if (t.shape_size() == 0) return absl::InvalidArgumentError(absl::StrCat(spec.name, ": shape is required"));
  Shape shape(t.shape().begin(), t.shape().end());
  ATTN_ASSIGN_OR_RETURN(const int64_t count, CheckTensorShape(shape, spec.name));
  if (raw != nullptr) return ViewRaw(*raw, index, spec, std::move(shape), count, type, t.datatype());
  return ViewContents(t, spec, std::move(shape), count, type);
}

const InputSpec* FindInput(const std::string& name) {
  for (const InputSpec& spec : kInputs) {
    if (name == spec.name) return &spec;
  }
  return nullptr;
}

absl::Status CheckRawLayout(const ModelInferRequest& req) {
  if (req.raw_input_contents_size() == 0) return absl::OkStatus();
  if (req.raw_input_contents_size() != req.inputs_size()) {
    return absl::InvalidArgumentError(absl::StrCat("raw_input_contents: holds ", req.raw_input_contents_size(),
                                                   " entries, expected one per input (", req.inputs_size(), ")"));
  }
  for (int i = 0; i < req.inputs_size(); ++i) {
    if (req.inputs(i).has_contents()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "inputs[", i, "].contents: set although raw_input_contents holds the values; use one or the other"));
    }
  }
  return absl::OkStatus();
}

absl::Status DecodeInputs(const ModelInferRequest& req, InferenceCall* call) {
  ATTN_RETURN_IF_ERROR(CheckRawLayout(req));
  std::array<bool, kInputs.size()> seen{};
  for (int i = 0; i < req.inputs_size(); ++i) {
    const InputTensor& t = req.inputs(i);
    const InputSpec* spec = FindInput(t.name());
    if (spec == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("inputs[", i, "].name: unknown input '", BoundedForLog(t.name()),
                       "' (expected query, key, value, key_padding_mask, attn_mask, position_ids)"));
    }
    bool& was_seen = seen[static_cast<size_t>(spec - kInputs.data())];
    if (was_seen) {
      return absl::InvalidArgumentError(absl::StrCat("inputs[", i, "].name: '", spec->name, "' given twice"));
    }
    was_seen = true;
    const std::string* raw = req.raw_input_contents_size() > 0 ? &req.raw_input_contents(i) : nullptr;
    ATTN_ASSIGN_OR_RETURN(call->inputs.*(spec->field), DecodeInput(t, raw, static_cast<size_t>(i), *spec));
  }
  if (!seen[0]) return absl::InvalidArgumentError("inputs: 'query' is required");
  return absl::OkStatus();
}

// A bool_param; `fallback` when absent.
absl::StatusOr<bool> BoolParameter(const ModelInferRequest& req, const std::string& name, bool fallback) {
  const auto it = req.parameters().find(name);
  if (it == req.parameters().end()) return fallback;
  if (it->second.parameter_choice_case() != InferParameter::kBoolParam) {
    return absl::InvalidArgumentError(absl::StrCat("parameters.", name, ": expected a bool_param"));
  }
  return it->second.bool_param();
}

// An int64_param (uint64_param too: Triton's clients send unsigned integers that way), >= 0; 0 when absent.
absl::StatusOr<int64_t> PositionParameter(const ModelInferRequest& req, const std::string& name) {
  const auto it = req.parameters().find(name);
  if (it == req.parameters().end()) return 0;
  const InferParameter& p = it->second;
  if (p.parameter_choice_case() == InferParameter::kInt64Param && p.int64_param() >= 0) return p.int64_param();
  if (p.parameter_choice_case() == InferParameter::kUint64Param && p.uint64_param() < (uint64_t{1} << 62)) {
    return static_cast<int64_t>(p.uint64_param());
  }
  return absl::InvalidArgumentError(absl::StrCat("parameters.", name, ": expected an int64_param >= 0"));
}

absl::Status DecodeOptions(const ModelInferRequest& req, AttentionInputs& in) {
  bool wants_weights = false, wants_output = false;  // each at most once: the answer's size is bounded
  for (int i = 0; i < req.outputs_size(); ++i) {
    const std::string& name = req.outputs(i).name();
    if (name != kOutput && name != kAttnWeights) {
      return absl::InvalidArgumentError(absl::StrCat("outputs[", i, "].name: unknown output '", BoundedForLog(name),
                                                     "' (expected output, attn_weights)"));
    }
    bool& wanted = name == kOutput ? wants_output : wants_weights;
    if (wanted) return absl::InvalidArgumentError(absl::StrCat("outputs[", i, "].name: '", name, "' given twice"));
    wanted = true;
  }
  ATTN_ASSIGN_OR_RETURN(in.is_causal, BoolParameter(req, "is_causal", false));
  ATTN_ASSIGN_OR_RETURN(in.need_weights, BoolParameter(req, "need_weights", wants_weights));
  ATTN_ASSIGN_OR_RETURN(in.average_attn_weights, BoolParameter(req, "average_attn_weights", true));
  ATTN_ASSIGN_OR_RETURN(in.position_offset, PositionParameter(req, "position_offset"));
  if (wants_weights && !in.need_weights) {
    return absl::InvalidArgumentError("outputs: attn_weights requested with parameters.need_weights false");
  }
  return absl::OkStatus();
}

// parameters.output_dtype (string_param FP32, BF16 or FP16): the type the outputs are answered in.
absl::Status DecodeOutputDType(const ModelInferRequest& req, InferenceCall* call) {
  const auto it = req.parameters().find("output_dtype");
  if (it == req.parameters().end()) return absl::OkStatus();
  const InferParameter& p = it->second;
  const std::string& name = p.string_param();
  if (p.parameter_choice_case() == InferParameter::kStringParam &&
      (name == "FP32" || name == "BF16" || name == "FP16")) {
    call->output_dtype = name == "BF16" ? DType::kBFloat16 : name == "FP16" ? DType::kFloat16 : DType::kFloat32;
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("parameters.output_dtype: expected a string_param FP32, BF16 or FP16",
                                                 p.parameter_choice_case() == InferParameter::kStringParam
                                                     ? absl::StrCat(", got '", BoundedForLog(name, 16), "'")
                                                     : ""));
}

absl::Status DecodeVersion(const ModelInferRequest& req, InferenceCall* call) {
  if (req.model_version().empty()) return absl::OkStatus();
  int64_t version = 0;
  if (!absl::SimpleAtoi(req.model_version(), &version) || version <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("model_version: expected a positive integer, got '",
                                                   BoundedForLog(req.model_version(), 32), "'"));
  }
  call->version = version;
  return absl::OkStatus();
}

// Adds output `name`'s description (name, datatype, shape) to the response.
void AddOutputHead(const char* name, const Tensor& tensor, DType dtype, inference::ModelInferResponse* response) {
  auto* out = response->add_outputs();
  out->set_name(name);
  out->set_datatype(dtype == DType::kBFloat16 ? "BF16" : dtype == DType::kFloat16 ? "FP16" : "FP32");
  for (int64_t d : tensor.shape) out->add_shape(d);
}

// The outputs the answer holds, in order: those `request` names, or all (attn_weights when computed) when it
// names none. Validation has refused a name given twice.
std::vector<const char*> AnsweredOutputs(const InferenceCall& call, const ModelInferRequest& request) {
  std::vector<const char*> names;
  if (request.outputs_size() == 0) {
    names.push_back(kOutput);
    if (call.inputs.need_weights) names.push_back(kAttnWeights);
  }
  for (const auto& wanted : request.outputs()) names.push_back(wanted.name() == kAttnWeights ? kAttnWeights : kOutput);
  return names;
}

void SetInt64(inference::ModelInferResponse* response, const char* name, int64_t value) {
  (*response->mutable_parameters())[name].set_int64_param(value);
}

// Every field of the answer but its outputs.
void EncodeAnswerFields(const InferenceCall& call, inference::ModelInferResponse* response) {
  response->set_model_name(call.layer_name);
  response->set_model_version(absl::StrCat(call.layer->version));
  response->set_id(call.id);
  SetInt64(response, "queue_us", call.timing.queue_us);
  SetInt64(response, "compute_us", call.timing.compute_us);
  SetInt64(response, "batch_size", call.timing.batch_size);
}

}  // namespace

void DecodeModelInferRequest(const ModelInferRequest& request, InferenceCall* call) {
  call->layer_name = request.model_name();
  call->layer_field = "model_name";
  call->answer_values_in_place = kHostIsLittleEndian;  // EncodeModelInferAnswer
  call->version_field = "model_version";
  call->id = request.id();
  call->decode_status = DecodeVersion(request, call);
  if (call->decode_status.ok()) call->decode_status = DecodeOptions(request, call->inputs);
  if (call->decode_status.ok()) call->decode_status = DecodeOutputDType(request, call);
  if (call->decode_status.ok()) call->decode_status = DecodeInputs(request, call);
}

absl::Status PrepareModelInferCall(const LayerRegistry& registry, const ModelInferRequest& request,
                                   InferenceCall* call) {
  DecodeModelInferRequest(request, call);
  return ValidateCall(registry, call);
}

void EncodeModelInferResponse(const InferenceCall& call, const ModelInferRequest& request,
                              inference::ModelInferResponse* response) {
  EncodeAnswerFields(call, response);
  for (const char* name : AnsweredOutputs(call, request)) {
    const Tensor& tensor = name == kAttnWeights ? call.outputs.attn_weights : call.outputs.output;
    AddOutputHead(name, tensor, call.output_dtype, response);
    EncodeRawValues(tensor, call.output_dtype, response->add_raw_output_contents());
  }
}

void EncodeModelInferAnswer(InferenceCall* call, const ModelInferRequest& request,
                            inference::ModelInferResponse* response, std::vector<Tensor>* raw_outputs) {
  if (!AnswerSentInPlace(*call)) {
    EncodeModelInferResponse(*call, request, response);
    call->outputs = AttentionOutputs();  // held once encoded: the budget counts the tensors and one copy
    return;
  }
  EncodeAnswerFields(*call, response);
  for (const char* name : AnsweredOutputs(*call, request)) {
    Tensor& tensor = name == kAttnWeights ? call->outputs.attn_weights : call->outputs.output;
    AddOutputHead(name, tensor, DType::kFloat32, response);
    raw_outputs->push_back(std::move(tensor));
  }
}

}  // namespace attnserve
