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
// Every sender takes the clients of the run, one per connection (attnbench --connections): a request of lane
// i goes through clients[i % size], so a closed loop's workers, and an open loop's requests, spread evenly.
//
// Thread-safety: Send may be called from any number of threads at once.
#pragma once

#include <grpcpp/generic/generic_stub.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "bench/echo.grpc.pb.h"
#include "client/client.h"
#include "inference/grpc_service.grpc.pb.h"
#include "tools/attnbench_requests.h"
#include "tools/attnbench_runner.h"

namespace attnserve {

// The clients a run sends through (not owned; non-empty), and which one serves a lane.
class ClientLanes {
 public:
  explicit ClientLanes(std::vector<const Client*> clients) : clients_(std::move(clients)) {}
  const Client& ForLane(uint64_t lane) const { return *clients_[lane % clients_.size()]; }
  size_t size() const { return clients_.size(); }

 private:
  std::vector<const Client*> clients_;
};

// Sends a fixed-shape run's request as bytes serialized once for the whole run (with --seq-dist, each request's
// own bytes) and reads from each answer only its timing and error (FromWire), not its tensors: attnbench runs on the
// server's CPUs, and serializing each request and parsing each answer's output took 14 % of its CPU at c=64, E=512,
// L=32.
class UnaryInferSender final : public RequestSender {
 public:
  // `source` not owned; it and the clients must outlive the sender. `timeout_ms` as
  // Client::InferOptions::timeout_ms.
  UnaryInferSender(ClientLanes clients, const InferRequestSource* source, std::optional<int64_t> timeout_ms);
  void Send(uint64_t seq, uint64_t lane, std::function<void(const Outcome&)> done) override;
  bool SendNeverBlocks() const override { return true; }  // one async unary call

 private:
  ClientLanes clients_;
  const InferRequestSource* source_;
  std::optional<int64_t> timeout_ms_;
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs_;  // one per client
  std::optional<grpc::ByteBuffer> fixed_wire_;             // the request's bytes when every request is the same
};

// The outcome of an Infer answer from its bytes: the status, then the answer's error and timing. Only timing
// and error are parsed; the rest (the tensors) is skipped without being copied. Bytes that do not parse are
// INTERNAL.
Outcome FromWire(const grpc::Status& status, grpc::ByteBuffer* wire);

class KServeInferSender final : public RequestSender {
 public:
  // `source` not owned; it and the clients must outlive the sender.
  KServeInferSender(ClientLanes clients, const InferRequestSource* source, std::optional<int64_t> timeout_ms);
  void Send(uint64_t seq, uint64_t lane, std::function<void(const Outcome&)> done) override;
  bool SendNeverBlocks() const override { return true; }  // one async unary call

 private:
  // The ModelInferRequest of the source's request `seq`, converted once per query length.
  std::shared_ptr<const inference::ModelInferRequest> RequestFor(uint64_t seq);

  ClientLanes clients_;
  const InferRequestSource* source_;
  std::optional<int64_t> timeout_ms_;
  std::vector<std::unique_ptr<inference::GRPCInferenceService::Stub>> stubs_;  // one per client
  absl::Mutex mu_;
  std::map<int64_t, std::shared_ptr<const inference::ModelInferRequest>> by_len_ ABSL_GUARDED_BY(mu_);
};

class InferStreamReactor;

class StreamInferSender final : public RequestSender {
 public:
  // `source` not owned. `streams` >= 1 streams; a lane always uses stream lane % streams, and stream j
  // client j % clients. Every stream ends at `deadline` at the latest (so a stalled server cannot hang a run).
  StreamInferSender(ClientLanes clients, const InferRequestSource* source, int64_t streams,
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
  ClientLanes clients_;
  const InferRequestSource* source_;
  std::chrono::system_clock::time_point deadline_;
  std::vector<std::unique_ptr<Slot>> slots_;
};

class EchoSender final : public RequestSender {
 public:
  // The clients give the channels and the deadline rule; the payload is `payload_bytes` random bytes.
  EchoSender(ClientLanes clients, int64_t payload_bytes, std::optional<int64_t> timeout_ms);
  void Send(uint64_t seq, uint64_t lane, std::function<void(const Outcome&)> done) override;
  bool SendNeverBlocks() const override { return true; }  // one async unary call

 private:
  ClientLanes clients_;
  std::vector<std::unique_ptr<attnserve::bench::EchoService::Stub>> stubs_;  // one per client
  attnserve::bench::EchoMessage message_;
  std::optional<int64_t> timeout_ms_;
};

}  // namespace attnserve
