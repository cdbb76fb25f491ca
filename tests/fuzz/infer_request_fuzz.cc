// Fuzzes the request path without gRPC: InferRequest wire bytes -> PrepareInferenceCall (decode, then
// validate against a layer) -> the engine (ForwardParsed, as the batch executor calls it) -> EncodeInferResponse,
// and the answer as it is served (EncodeInferAnswer, SerializeWire), parsed back: the same message.
// Any status is fine; a crash, a sanitizer report, a huge allocation, or an answer whose size differs from
// what validation reserved for it (ParsedAttention::output_bytes / weights_bytes; half of it in output_dtype
// BFLOAT16 or FLOAT16) is a bug. The layers:
// fuzz_layers.h.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>

#include "absl/status/status.h"
#include "attnserve/v1/attention.pb.h"
#include "server/api/infer_request.h"
#include "server/api/wire_message.h"
#include "tests/fuzz/fuzz_layers.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace attnserve;  // NOLINT: a harness of one function
  attnserve::v1::InferRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  auto call = std::make_unique<InferenceCall>();  // the call must not move once validated
  call->request_bytes = static_cast<int64_t>(size);
  const absl::Status status = PrepareInferenceCall(fuzz::Registry(), request, call.get());
  if (fuzz::Verbose()) std::fprintf(stderr, "  prepare: %s\n", status.ToString().c_str());
  if (!status.ok() || call->parsed.flops >= fuzz::kMaxComputedFlops) return 0;
  if (!fuzz::Compute(*call)) return 0;
  attnserve::v1::InferResponse response;
  EncodeInferResponse(*call, &response);
  // output_bytes counts f32; a BFLOAT16 or FLOAT16 answer (output_dtype) is half of it.
  const size_t divisor = call->output_dtype == DType::kFloat32 ? 1 : 2;
  if (response.output().raw_data().size() != static_cast<size_t>(call->parsed.output_bytes) / divisor) {
    fuzz::Die("encoded output size");
  }
  InferAnswer served;
  EncodeInferAnswer(call.get(), &served);
  grpc::ByteBuffer wire;
  attnserve::v1::InferResponse parsed;
  if (!SerializeWire(served, &wire).ok() || !ParseWire(&wire, &parsed).ok()) fuzz::Die("served answer");
  if (parsed.SerializeAsString() != response.SerializeAsString()) fuzz::Die("served answer differs");
  return 0;
}
