// The RequestSenders attnbench drives (see attnbench_runner.h), all on gRPC's callback API so a send never
// blocks the runner:
// - UnaryInferSender: AttentionService/Infer, one call per request.
// - StreamInferSender: AttentionService/InferStream, requests written on a few long-lived streams and
//   answers matched by id. A stream that breaks (e.g. its server died) fails the requests it had in flight
//   with the stream's status and is replaced by a new one on the next send.
// - KServeInferSender: the Open Inference Protocol's GRPCInferenceService/ModelInfer with the same tensors
//   (raw_input_contents, as tritonclient sends them), one call per request.
// - EchoSender: attnserve.bench.EchoService/Echo with a fixed random payload, the serving floor.
//
// Thread-safety: Send may be called from any number of threads at once.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "bench/echo.grpc.pb.h"
#include "inference/grpc_service.grpc.pb.h"
#include "tools/attnbench_requests.h"
#include "tools/attnbench_runner.h"
#include "client/client.h"

namespace attnserve {

class UnaryInferSender final : public RequestSender {
 public:
  // Neither owned; both must outlive the sender. `timeout_ms` as Client::InferOptions::timeout_ms.
  UnaryInferSender(const Client* client, const InferRequestSource* source, std::optional<int64_t> timeout_ms)
      : client_(client), source_(source), timeout_ms_(timeout_ms) {}
  void Send(uint64_t seq, uint64_t lane, std::function<void(const Outcome&)> done) override;
  bool SendNeverBlocks() const override { return true; }  // one async unary call

 private:
  const Client* client_;
  const InferRequestSource* source_;
  std::optional<int64_t> timeout_ms_;
};

class KServeInferSender final : public RequestSender {
 public:
  // Neither owned; both must outlive the sender.
  KServeInferSender(const Client* client, const InferRequestSource* source, std::optional<int64_t> timeout_ms);
  void Send(uint64_t seq, uint64_t lane, std::function<void(const Outcome&)> done) override;
  bool SendNeverBlocks() const override { return true; }  // one async unary call

 private:
  // The ModelInferRequest of the source's request `seq`, converted once per query length.
  std::shared_ptr<const inference::ModelInferRequest> RequestFor(uint64_t seq);

  const Client* client_;
  const InferRequestSource* source_;
  std::optional<int64_t> timeout_ms_;
  std::unique_ptr<inference::GRPCInferenceService::Stub> stub_;
  absl::Mutex mu_;
  std::map<int64_t, std::shared_ptr<const inference::ModelInferRequest>> by_len_ ABSL_GUARDED_BY(mu_);
};

class InferStreamReactor;

class StreamInferSender final : public RequestSender {
 public:
  // Neither owned. `streams` >= 1 streams; a lane always uses stream lane % streams. Every stream ends at
  // `deadline` at the latest (so a stalled server cannot hang a run).
  StreamInferSender(const Client* client, const InferRequestSource* source, int64_t streams,
                    std::chrono::system_clock::time_point deadline);
  // Half-closes every stream and waits until each has ended.
  ~StreamInferSender() override;
  void Send(uint64_t seq, uint64_t lane, std::function<void(const Outcome&)> done) override;

 private:
  struct Slot {
    absl::Mutex mu;
    std::unique_ptr<InferStreamReactor> stream ABSL_GUARDED_BY(mu);
    std::vector<std::unique_ptr<InferStreamReactor>> retired ABSL_GUARDED_BY(mu);  // ended; freed at the end
  };
  const Client* client_;
  const InferRequestSource* source_;
  std::chrono::system_clock::time_point deadline_;
  std::vector<std::unique_ptr<Slot>> slots_;
};

class EchoSender final : public RequestSender {
 public:
  // `client` (not owned) gives the channel and the deadline rule; the payload is `payload_bytes` random bytes.
  EchoSender(const Client* client, int64_t payload_bytes, std::optional<int64_t> timeout_ms);
  void Send(uint64_t seq, uint64_t lane, std::function<void(const Outcome&)> done) override;
  bool SendNeverBlocks() const override { return true; }  // one async unary call

 private:
  const Client* client_;
  std::unique_ptr<attnserve::bench::EchoService::Stub> stub_;
  attnserve::bench::EchoMessage message_;
  std::optional<int64_t> timeout_ms_;
};

}  // namespace attnserve
