#include "tools/attnbench_senders.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/wire_format_lite.h>
#include <grpcpp/support/proto_buffer_reader.h>

#include <climits>
#include <deque>
#include <map>
#include <random>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "client/grpc_status.h"

namespace attnserve {
namespace {

using attnserve::v1::InferRequest;
using attnserve::v1::InferResponse;

Outcome FromResponse(const grpc::Status& status, const InferResponse& response) {
  Outcome o;
  o.code = static_cast<int>(status.error_code());
  if (status.ok() && response.has_error() && response.error().code() != 0) o.code = response.error().code();
  if (o.code == 0 && response.has_timing()) {
    o.has_timing = true;
    o.queue_us = response.timing().queue_us();
    o.compute_us = response.timing().compute_us();
    o.batch_size = response.timing().batch_size();
  }
  return o;
}

}  // namespace

namespace {

constexpr char kInferMethod[] = "/attnserve.v1.AttentionService/Infer";

grpc::ByteBuffer RequestWire(const InferRequest& request) {
  grpc::ByteBuffer wire;
  bool own_buffer = false;
  grpc::SerializationTraits<InferRequest>::Serialize(request, &wire, &own_buffer).IgnoreError();  // < 2 GiB
  return wire;
}

// Reads the length-delimited field at `in` into `message`.
bool ReadSubMessage(google::protobuf::io::CodedInputStream* in, google::protobuf::MessageLite* message) {
  uint32_t length = 0;
  if (!in->ReadVarint32(&length)) return false;
  const auto limit = in->PushLimit(static_cast<int>(length));
  const bool parsed = message->MergePartialFromCodedStream(in) && in->ConsumedEntireMessage();
  in->PopLimit(limit);
  return parsed;
}

// The answer's fields FromResponse reads (timing, error), into `head`; false when the bytes are not an
// InferResponse.
bool ParseAnswerHead(grpc::ByteBuffer* wire, InferResponse* head) {
  using google::protobuf::internal::WireFormatLite;
  if (!wire->Valid()) return false;
  grpc::ProtoBufferReader reader(wire);
  if (!reader.status().ok()) return false;
  google::protobuf::io::CodedInputStream in(&reader);
  in.SetTotalBytesLimit(INT_MAX);
  while (const uint32_t tag = in.ReadTag()) {
    const bool delimited = WireFormatLite::GetTagWireType(tag) == WireFormatLite::WIRETYPE_LENGTH_DELIMITED;
    const int field = WireFormatLite::GetTagFieldNumber(tag);
    bool ok = true;
    if (delimited && field == InferResponse::kTimingFieldNumber) {
      ok = ReadSubMessage(&in, head->mutable_timing());
    } else if (delimited && field == InferResponse::kErrorFieldNumber) {
      ok = ReadSubMessage(&in, head->mutable_error());
    } else {
      ok = WireFormatLite::SkipField(&in, tag);  // the tensors: skipped in gRPC's slices, not copied
    }
    if (!ok) return false;
  }
  return in.ConsumedEntireMessage();
}

}  // namespace

Outcome FromWire(const grpc::Status& status, grpc::ByteBuffer* wire) {
  InferResponse head;
  if (status.ok() && !ParseAnswerHead(wire, &head)) {
    return FromResponse(grpc::Status(grpc::StatusCode::INTERNAL, "answer: not an InferResponse"), head);
  }
  return FromResponse(status, head);
}

UnaryInferSender::UnaryInferSender(ClientLanes clients, const InferRequestSource* source,
                                   std::optional<int64_t> timeout_ms)
    : clients_(std::move(clients)), source_(source), timeout_ms_(timeout_ms) {
  for (size_t i = 0; i < clients_.size(); ++i) {
    stubs_.push_back(std::make_unique<grpc::GenericStub>(clients_.ForLane(i).channel()));
  }
  if (source_->Fixed()) fixed_wire_ = RequestWire(*source_->Get(0));
}

void UnaryInferSender::Send(uint64_t seq, uint64_t lane, std::function<void(const Outcome&)> done) {
  struct Call {
    grpc::ClientContext context;
    grpc::ByteBuffer request;  // shares the fixed request's slices: no copy
    grpc::ByteBuffer response;
  };
  auto* call = new Call;
  call->request = fixed_wire_.has_value() ? *fixed_wire_ : RequestWire(*source_->Get(seq));
  clients_.ForLane(lane).PrepareContext(&call->context, timeout_ms_);
  stubs_[lane % stubs_.size()]->UnaryCall(&call->context, kInferMethod, grpc::StubOptions(), &call->request,
                                          &call->response, [call, done = std::move(done)](grpc::Status status) {
                                            Outcome o = FromWire(status, &call->response);
                                            if (o.code != 0) o.trace_id = ServerTraceId(call->context);
                                            // before done: once the last answer is done, the run may end and exit
                                            delete call;
                                            done(o);
                                          });
}

// One InferStream. Writes go out one at a time (the reactor allows one in flight) from a queue; a read is
// always pending; answers find their callback by id. A hold keeps OnDone back while Send may still start a
// write from outside the reactor's own callbacks, and is released once the stream stops taking requests.
class InferStreamReactor final : public grpc::ClientBidiReactor<InferRequest, InferResponse> {
 public:
  // `client`'s token and traceparent go with the stream; its deadline is the run's.
  InferStreamReactor(const Client& client, std::chrono::system_clock::time_point deadline) {
    client.PrepareContext(&context_, std::nullopt);
    context_.set_deadline(deadline);
    client.stub()->async()->InferStream(&context_, this);
    StartRead(&response_);
    AddHold();
    StartCall();
  }

  // Takes `request` and `done` and returns true, or leaves both untouched and returns false once the stream
  // no longer takes requests.
  bool Send(InferRequest& request, std::function<void(const Outcome&)>& done) {
    absl::MutexLock lock(&mu_);
    if (closing_) return false;
    pending_.emplace(request.id(), std::move(done));
    queue_.push_back(std::move(request));
    if (!writing_) {
      writing_ = true;
      StartWrite(&queue_.front());
    }
    return true;
  }

  // Half-closes after the queued writes, then waits for the stream to end.
  void CloseAndWait() {
    {
      absl::MutexLock lock(&mu_);
      closing_ = true;
      if (!writing_) ReleaseLocked();
    }
    ended_.WaitForNotification();
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    queue_.pop_front();
    if (!ok) {  // the stream broke; OnDone fails what is pending
      closing_ = true;
      queue_.clear();
    }
    if (!queue_.empty()) {
      StartWrite(&queue_.front());
      return;
    }
    writing_ = false;
    if (closing_) ReleaseLocked();
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      absl::MutexLock lock(&mu_);
      closing_ = true;
      if (!writing_) ReleaseLocked();
      return;
    }
    const Outcome outcome = FromResponse(grpc::Status::OK, response_);
    std::function<void(const Outcome&)> done;
    {
      absl::MutexLock lock(&mu_);
      auto it = pending_.find(response_.id());
      if (it != pending_.end()) {
        done = std::move(it->second);
        pending_.erase(it);
      }
    }
    StartRead(&response_);
    if (done) done(outcome);
  }

  void OnDone(const grpc::Status& status) override {
    std::map<std::string, std::function<void(const Outcome&)>> unanswered;
    {
      absl::MutexLock lock(&mu_);
      unanswered.swap(pending_);
    }
    Outcome failed;
    failed.code = status.ok() ? static_cast<int>(grpc::StatusCode::UNKNOWN) : static_cast<int>(status.error_code());
    for (auto& [id, done] : unanswered) done(failed);
    ended_.Notify();  // last: the owner may free this reactor from here on
  }

 private:
  void ReleaseLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (released_) return;
    released_ = true;
    StartWritesDone();
    RemoveHold();
  }

  grpc::ClientContext context_;
  InferResponse response_;
  absl::Notification ended_;
  absl::Mutex mu_;
  std::deque<InferRequest> queue_ ABSL_GUARDED_BY(mu_);  // front: the write in flight
  std::map<std::string, std::function<void(const Outcome&)>> pending_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  bool released_ ABSL_GUARDED_BY(mu_) = false;
};

StreamInferSender::StreamInferSender(ClientLanes clients, const InferRequestSource* source, int64_t streams,
                                     std::chrono::system_clock::time_point deadline)
    : clients_(std::move(clients)), source_(source), deadline_(deadline) {
  for (int64_t i = 0; i < std::max<int64_t>(1, streams); ++i) slots_.push_back(std::make_unique<Slot>());
}

StreamInferSender::~StreamInferSender() {
  for (auto& slot : slots_) {
    absl::MutexLock lock(&slot->mu);
    if (slot->stream != nullptr) slot->stream->CloseAndWait();
    for (auto& old : slot->retired) old->CloseAndWait();
  }
}

void StreamInferSender::Send(uint64_t seq, uint64_t lane, std::function<void(const Outcome&)> done) {
  InferRequest request = *source_->Get(seq);  // a copy: each send needs its own id
  request.set_id(absl::StrCat(seq));
  const size_t slot_index = lane % slots_.size();
  Slot& slot = *slots_[slot_index];
  {
    absl::MutexLock lock(&slot.mu);
    for (int attempt = 0; attempt < 2; ++attempt) {
      if (slot.stream == nullptr) {
        slot.stream = std::make_unique<InferStreamReactor>(clients_.ForLane(slot_index), deadline_);
      }
      if (slot.stream->Send(request, done)) return;
      slot.retired.push_back(std::move(slot.stream));  // ended: the next attempt opens a new stream
    }
  }
  // Even a fresh stream refused it: it failed at once (e.g. no server reachable).
  Outcome failed;
  failed.code = static_cast<int>(grpc::StatusCode::UNAVAILABLE);
  done(failed);
}

namespace {

void AddRawInput(const char* name, const attnserve::v1::Tensor& t, inference::ModelInferRequest* out) {
  if (t.shape_size() == 0) return;
  auto* in = out->add_inputs();
  in->set_name(name);
  in->set_datatype(t.dtype() == attnserve::v1::BFLOAT16  ? "BF16"
                   : t.dtype() == attnserve::v1::FLOAT16 ? "FP16"
                                                         : "FP32");
  for (int64_t d : t.shape()) in->add_shape(d);
  out->add_raw_input_contents(t.raw_data());
}

}  // namespace

KServeInferSender::KServeInferSender(ClientLanes clients, const InferRequestSource* source,
                                     std::optional<int64_t> timeout_ms)
    : clients_(std::move(clients)), source_(source), timeout_ms_(timeout_ms) {
  for (size_t i = 0; i < clients_.size(); ++i) {
    stubs_.push_back(inference::GRPCInferenceService::NewStub(clients_.ForLane(i).channel()));
  }
}

std::shared_ptr<const inference::ModelInferRequest> KServeInferSender::RequestFor(uint64_t seq) {
  const int64_t len = source_->SeqLenFor(seq);
  absl::MutexLock lock(&mu_);
  auto& cached = by_len_[len];
  if (cached != nullptr) return cached;
  const std::shared_ptr<const InferRequest> v1 = source_->Get(seq);
  auto request = std::make_shared<inference::ModelInferRequest>();
  request->set_model_name(v1->layer());
  AddRawInput("query", v1->query(), request.get());
  AddRawInput("key", v1->key(), request.get());
  AddRawInput("value", v1->value(), request.get());
  (*request->mutable_parameters())["is_causal"].set_bool_param(v1->is_causal());
  cached = std::move(request);
  return cached;
}

void KServeInferSender::Send(uint64_t seq, uint64_t lane, std::function<void(const Outcome&)> done) {
  struct Call {
    grpc::ClientContext context;
    std::shared_ptr<const inference::ModelInferRequest> request;
    inference::ModelInferResponse response;
  };
  auto* call = new Call;
  call->request = RequestFor(seq);
  clients_.ForLane(lane).PrepareContext(&call->context, timeout_ms_);
  stubs_[lane % stubs_.size()]->async()->ModelInfer(&call->context, call->request.get(), &call->response,
                             [call, done = std::move(done)](grpc::Status status) {
                               Outcome o;
                               o.code = static_cast<int>(status.error_code());
                               const auto& params = call->response.parameters();
                               if (status.ok() && params.count("batch_size") > 0) {
                                 o.has_timing = true;
                                 o.queue_us = params.at("queue_us").int64_param();
                                 o.compute_us = params.at("compute_us").int64_param();
                                 o.batch_size = static_cast<int32_t>(params.at("batch_size").int64_param());
                               }
                               if (o.code != 0) o.trace_id = ServerTraceId(call->context);
                               // before done: once the last answer is done, the run may end and exit
                               delete call;
                               done(o);
                             });
}

EchoSender::EchoSender(ClientLanes clients, int64_t payload_bytes, std::optional<int64_t> timeout_ms)
    : clients_(std::move(clients)), timeout_ms_(timeout_ms) {
  for (size_t i = 0; i < clients_.size(); ++i) {
    stubs_.push_back(attnserve::bench::EchoService::NewStub(clients_.ForLane(i).channel()));
  }
  std::mt19937_64 rng(1);
  std::string payload(static_cast<size_t>(std::max<int64_t>(0, payload_bytes)), '\0');
  for (char& c : payload) c = static_cast<char>(rng());
  message_.set_payload(std::move(payload));
}

void EchoSender::Send(uint64_t /*seq*/, uint64_t lane, std::function<void(const Outcome&)> done) {
  struct Call {
    grpc::ClientContext context;
    attnserve::bench::EchoMessage response;
  };
  auto* call = new Call;
  clients_.ForLane(lane).PrepareContext(&call->context, timeout_ms_);
  stubs_[lane % stubs_.size()]->async()->Echo(&call->context, &message_, &call->response,
                                              [call, done = std::move(done)](grpc::Status s) {
    Outcome o;
    o.code = static_cast<int>(s.error_code());
    // before done: once the last answer is done, the run may end and exit
    delete call;
    done(o);
  });
}

}  // namespace attnserve
