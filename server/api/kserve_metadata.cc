#include "server/api/kserve_metadata.h"

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "absl/strings/str_cat.h"

namespace attnserve {
namespace {

// One tensor of the model's signature. Batched shapes: B, L and S vary by request.
struct TensorSpec {
  const char* name;
  inference::DataType type;
  std::initializer_list<int64_t> dims;
  bool optional;
};

const char* DataTypeName(inference::DataType type) {
  switch (type) {
    case inference::TYPE_BOOL:
      return "BOOL";
    case inference::TYPE_FP32:
      return "FP32";
    case inference::TYPE_INT64:
      return "INT64";
    default:
      return "FP32";
  }
}

bool IsDecoder(const attnserve::v1::LayerConfig& c) {
  return c.kind() == attnserve::v1::LayerConfig::DECODER_ATTENTION;
}

// A decoder layer takes the query, its padding and its tokens' positions (parameter position_offset
// otherwise); a multi-head attention layer the inputs of nn.MultiheadAttention.forward.
template <typename Fn>
void ForEachInput(const attnserve::v1::LayerConfig& c, Fn fn) {
  fn(TensorSpec{"query", inference::TYPE_FP32, {-1, -1, c.embed_dim()}, false});
  if (IsDecoder(c)) {
    fn(TensorSpec{"key_padding_mask", inference::TYPE_BOOL, {-1, -1}, true});
    fn(TensorSpec{"position_ids", inference::TYPE_INT64, {-1, -1}, true});
    return;
  }
  fn(TensorSpec{"key", inference::TYPE_FP32, {-1, -1, c.kdim()}, true});
  fn(TensorSpec{"value", inference::TYPE_FP32, {-1, -1, c.vdim()}, true});
  fn(TensorSpec{"key_padding_mask", inference::TYPE_BOOL, {-1, -1}, true});
  fn(TensorSpec{"attn_mask", inference::TYPE_BOOL, {-1, -1}, true});
}

template <typename Fn>
void ForEachOutput(const attnserve::v1::LayerConfig& c, Fn fn) {
  fn(TensorSpec{"output", inference::TYPE_FP32, {-1, -1, c.embed_dim()}, false});
  fn(TensorSpec{"attn_weights", inference::TYPE_FP32, {-1, -1, -1}, true});
}

void SetDuration(const CountAndNanos& from, inference::StatisticDuration* to) {
  to->set_count(from.count);
  to->set_ns(from.ns);
}

}  // namespace

void DescribeModelMetadata(const ServedLayer& layer, const std::vector<int64_t>& versions,
                           inference::ModelMetadataResponse* out) {
  out->set_name(layer.config.name());
  for (int64_t v : versions) out->add_versions(absl::StrCat(v));
  out->set_platform("attnserve");
  auto add = [](const TensorSpec& spec, inference::ModelMetadataResponse::TensorMetadata* t) {
    t->set_name(spec.name);
    t->set_datatype(DataTypeName(spec.type));
    for (int64_t d : spec.dims) t->add_shape(d);
  };
  ForEachInput(layer.config, [&](const TensorSpec& spec) { add(spec, out->add_inputs()); });
  ForEachOutput(layer.config, [&](const TensorSpec& spec) { add(spec, out->add_outputs()); });
}

void DescribeModelConfig(const ServedLayer& layer, inference::ModelConfig* out) {
  const attnserve::v1::LayerConfig& c = layer.config;
  out->set_name(c.name());
  out->set_platform("attnserve");
  out->set_backend("attnserve");
  out->mutable_version_policy()->mutable_latest()->set_num_versions(
      static_cast<uint32_t>(std::max(1, c.max_versions())));
  out->set_max_batch_size(0);
  ForEachInput(c, [&](const TensorSpec& spec) {
    inference::ModelInput* in = out->add_input();
    in->set_name(spec.name);
    in->set_data_type(spec.type);
    for (int64_t d : spec.dims) in->add_dims(d);
    in->set_optional(spec.optional);
  });
  ForEachOutput(c, [&](const TensorSpec& spec) {
    inference::ModelOutput* o = out->add_output();
    o->set_name(spec.name);
    o->set_data_type(spec.type);
    for (int64_t d : spec.dims) o->add_dims(d);
  });
  out->mutable_dynamic_batching()->set_max_queue_delay_microseconds(
      static_cast<uint64_t>(c.batching().max_queue_delay_us()));
  auto& params = *out->mutable_parameters();
  params["embed_dim"].set_string_value(absl::StrCat(c.embed_dim()));
  params["num_heads"].set_string_value(absl::StrCat(c.num_heads()));
  if (IsDecoder(c)) {
    const DecoderConfig d = layer.decoder->config();
    params["kind"].set_string_value("DECODER_ATTENTION");
    params["num_kv_heads"].set_string_value(absl::StrCat(d.num_kv_heads));
    params["head_dim"].set_string_value(absl::StrCat(d.head_dim));
    params["rotary_dim"].set_string_value(absl::StrCat(d.rope.rotary_dim));
    params["rope_theta"].set_string_value(absl::StrCat(d.rope.theta));
    params["sliding_window"].set_string_value(absl::StrCat(d.sliding_window));
  } else {
    params["kdim"].set_string_value(absl::StrCat(c.kdim()));
    params["vdim"].set_string_value(absl::StrCat(c.vdim()));
    params["bias"].set_string_value(c.bias() ? "true" : "false");
  }
  params["max_batch_size"].set_string_value(absl::StrCat(c.batching().max_batch_size()));
}

void DescribeModelStatistics(const VersionStatistics& stats, inference::ModelStatistics* out) {
  out->set_name(stats.layer);
  out->set_version(absl::StrCat(stats.version));
  out->set_last_inference(static_cast<uint64_t>(absl::ToUnixMillis(stats.last_inference)));
  out->set_inference_count(stats.inference_count);
  out->set_execution_count(stats.execution_count);
  inference::InferStatistics* s = out->mutable_inference_stats();
  SetDuration(stats.success, s->mutable_success());
  SetDuration(stats.fail, s->mutable_fail());
  SetDuration(stats.queue, s->mutable_queue());
  SetDuration(stats.compute, s->mutable_compute_infer());
  for (const auto& [size, batches] : stats.batches) {
    inference::InferBatchStatistics* b = out->add_batch_stats();
    b->set_batch_size(static_cast<uint64_t>(size));
    SetDuration(batches, b->mutable_compute_infer());
  }
}

}  // namespace attnserve
