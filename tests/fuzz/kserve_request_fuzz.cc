// Fuzzes the Open Inference Protocol's request path without gRPC: ModelInferRequest wire bytes ->
// PrepareModelInferCall (decode, validate against a layer; FP16/BF16 inputs viewed as they are) -> the engine ->
// EncodeModelInferResponse, and the answer as it is served (EncodeModelInferAnswer, SerializeWire), parsed back:
// the same message. Any status is fine; a crash, a sanitizer report, a huge allocation, or an answer larger than
// what validation reserved for it is a bug. The layers: fuzz_layers.h.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>

#include "absl/status/status.h"
#include "inference/grpc_service.pb.h"
#include "server/api/kserve_answer.h"
#include "server/api/kserve_request.h"
#include "server/api/wire_message.h"
#include "tests/fuzz/fuzz_layers.h"
#include "tests/testing/answer_wire.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace attnserve;  // NOLINT: a harness of one function
  inference::ModelInferRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  auto call = std::make_unique<InferenceCall>();  // the call must not move once validated
  call->request_bytes = static_cast<int64_t>(size);
  const absl::Status status = PrepareModelInferCall(fuzz::Registry(), request, call.get());
  if (fuzz::Verbose()) std::fprintf(stderr, "  prepare: %s\n", status.ToString().c_str());
  if (!status.ok() || call->parsed.flops >= fuzz::kMaxComputedFlops || !fuzz::Compute(*call)) return 0;
  inference::ModelInferResponse response;
  EncodeModelInferResponse(*call, request, &response);
  size_t answer_bytes = 0;
  for (const auto& raw : response.raw_output_contents()) answer_bytes += raw.size();
  if (answer_bytes > static_cast<size_t>(call->parsed.answer_bytes())) fuzz::Die("answer larger than reserved");
  KServeAnswer served;
  EncodeModelInferAnswer(call.get(), request, &served.message, &served.raw_outputs);
  grpc::ByteBuffer wire;
  inference::ModelInferResponse parsed;
  if (!SerializeWire(served, &wire).ok() || !ParseWire(&wire, &parsed).ok()) fuzz::Die("served answer");
  if (testing::CanonicalBytes(parsed) != testing::CanonicalBytes(response)) fuzz::Die("served answer differs");
  return 0;
}
