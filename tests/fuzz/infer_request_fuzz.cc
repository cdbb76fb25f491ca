// Fuzzes the request path without gRPC: InferRequest wire bytes -> PrepareInferenceCall (decode, then
// validate against a layer) -> the engine (ForwardParsed, as the batch executor calls it) -> EncodeInferResponse.
// Any status is fine; a crash, a sanitizer report, a huge allocation, or an answer whose size differs from
// what validation reserved for it (ParsedAttention::output_bytes / weights_bytes) is a bug.
//
// Two small layers, so that valid requests are cheap: "mha16" (E=16, H=4, self- and cross-attention, the
// default limits) and "cross8" (E=8, H=2, kdim=6, vdim=4, no bias, small limits).
// ATTNSERVE_FUZZ_VERBOSE=1 prints each input's status (to check what the seeds reach).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "attnserve/v1/attention.pb.h"
#include "attnserve/v1/config.pb.h"
#include "google/protobuf/text_format.h"
#include "server/api/infer_request.h"
#include "server/runtime/inference_call.h"
#include "server/runtime/layer_registry.h"
#include "server/startup/server_config.h"

namespace {

using attnserve::InferenceCall;
using attnserve::LayerRegistry;

constexpr char kLayers[] = R"pb(
  layers { name: "mha16" embed_dim: 16 num_heads: 4 seed: 1 }
  layers {
    name: "cross8" embed_dim: 8 num_heads: 2 kdim: 6 vdim: 4 bias: false seed: 2
    max_sequence_length: 64 max_batch: 8 max_tokens: 256 max_response_bytes: 65536
  }
)pb";

// Requests above this many FLOPs are validated but not computed, so that an iteration stays fast.
constexpr int64_t kMaxComputedFlops = 5'000'000;

bool Verbose() {
  static const bool verbose = std::getenv("ATTNSERVE_FUZZ_VERBOSE") != nullptr;
  return verbose;
}

[[noreturn]] void Die(const char* what) {
  std::fprintf(stderr, "infer_request_fuzz: %s\n", what);
  std::abort();
}

const LayerRegistry& Registry() {
  static const LayerRegistry* const registry = [] {
    attnserve::v1::ServerConfig config;
    if (!google::protobuf::TextFormat::ParseFromString(kLayers, &config)) Die("bad layer config");
    if (!attnserve::ApplyDefaultsAndValidate(&config).ok()) Die("layer config does not validate");
    auto created = LayerRegistry::Create(config);
    if (!created.ok()) Die(created.status().ToString().c_str());
    return created->release();  // lives for the process
  }();
  return *registry;
}

// The engine on one validated call, then the response; checks that the answer is the size it was validated at.
void ComputeAndEncode(InferenceCall& call) {
  const attnserve::ParsedAttention* one[] = {&call.parsed};
  auto results = call.layer->engine->ForwardParsed(one, /*max_threads=*/1);
  if (results.size() != 1) Die("ForwardParsed returned the wrong number of results");
  if (Verbose()) std::fprintf(stderr, "  engine: %s\n", results[0].status().ToString().c_str());
  if (!results[0].ok()) return;
  call.outputs = std::move(*results[0]);
  const auto output_bytes = static_cast<int64_t>(call.outputs.output.values.size() * sizeof(float));
  const auto weights_bytes = static_cast<int64_t>(call.outputs.attn_weights.values.size() * sizeof(float));
  if (output_bytes != call.parsed.output_bytes) Die("output size differs from parsed.output_bytes");
  if (weights_bytes != call.parsed.weights_bytes) Die("attn_weights size differs from parsed.weights_bytes");
  if (call.outputs.output.num_elements() != static_cast<int64_t>(call.outputs.output.values.size())) {
    Die("output shape does not match its values");
  }
  attnserve::v1::InferResponse response;
  attnserve::EncodeInferResponse(call, &response);
  if (response.output().raw_data().size() != static_cast<size_t>(output_bytes)) Die("encoded output size");
  (void)response.ByteSizeLong();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const LayerRegistry& registry = Registry();
  attnserve::v1::InferRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  auto call = std::make_unique<InferenceCall>();  // the call must not move once validated
  call->request_bytes = static_cast<int64_t>(size);
  const absl::Status status = attnserve::PrepareInferenceCall(registry, request, call.get());
  if (Verbose()) std::fprintf(stderr, "  prepare: %s\n", status.ToString().c_str());
  if (!status.ok()) return 0;
  if (call->parsed.flops < kMaxComputedFlops) ComputeAndEncode(*call);
  return 0;
}
