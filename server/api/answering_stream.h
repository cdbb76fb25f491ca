// A bidirectional stream of inference requests, whatever the protocol (attnserve.v1's InferStream, the Open
// Inference Protocol's ModelStreamInfer): each request read is submitted like a unary one; answers are
// written back in the order they complete (the client matches them by id), one write in flight at a time.
// The stream finishes once the client has closed its side and every request read has been answered and
// written. A failed request is answered in its own response (WriteError), and the stream goes on. The stream
// reads and writes bytes (its method is marked raw) and parses them here (wire_message.h): a message that is
// not a Request ends the stream INVALID_ARGUMENT, once every request read before it has been answered.
//
// Flow control: at most `max_inflight` requests are read and not yet written back. At that many the stream
// stops reading until a write completes, so HTTP/2 flow control holds the client back, and a client that
// never reads its answers costs at most that many of them.
//
// Thread-safety: gRPC calls the reactor methods; answers may arrive from any worker thread.
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <new>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "server/api/served_rpc.h"
#include "server/api/wire_message.h"
#include "server/runtime/memory_budget.h"
#include "server/transport/delivered_bytes.h"

namespace attnserve {

// What a service does with an answer: the final status (the response is filled on OK) and the call's share
// of the memory budget, to release once the answer has been written.
using OnAnswer = std::function<void(const grpc::Status&, MemoryBudget::Reservation)>;

template <typename Request, typename Response>
class AnsweringStream final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  // Submits one request read from the stream (it lives until answered); `on_answer` is called exactly once.
  using Submit = std::function<void(const Request& request, Response* response, OnAnswer on_answer)>;
  // Fills `response` for a request that failed with `status`.
  using WriteError = std::function<void(const Request& request, const grpc::Status& status, Response* response)>;

  // `rpc` is the stream's (its context must outlive the stream, as gRPC's does).
  AnsweringStream(const ServedRpc& rpc, int64_t max_inflight, Submit submit, WriteError write_error)
      : rpc_(rpc),
        ctx_(rpc.ctx()),
        max_inflight_(max_inflight),
        submit_(std::move(submit)),
        write_error_(std::move(write_error)) {
    this->StartRead(&incoming_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      absl::MutexLock lock(&mu_);
      reads_done_ = true;
      MaybeFinishLocked();
      return;
    }
    DeliveredBytes::Process().Record(ctx_->peer(), static_cast<int64_t>(incoming_.Length()));
    auto item = std::make_shared<Item>();
    if (grpc::Status unparsed = ParseWire(&incoming_, &item->request); !unparsed.ok()) {
      absl::MutexLock lock(&mu_);
      reads_done_ = true;  // the client's messages can no longer be trusted to be requests
      ending_ = unparsed;
      MaybeFinishLocked();
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      ++pending_;
    }
    submit_(item->request, &item->response, [this, item](const grpc::Status& status, MemoryBudget::Reservation m) {
      item->memory = std::move(m);  // released once written
      Answered(item, status);
    });
    absl::MutexLock lock(&mu_);
    if (InflightLocked() < max_inflight_) {
      this->StartRead(&incoming_);
    } else {
      read_paused_ = true;  // resumed by OnWriteDone
    }
  }

  void OnWriteDone(bool /*ok*/) override {
    absl::MutexLock lock(&mu_);
    writes_.pop_front();
    if (read_paused_ && InflightLocked() < max_inflight_) {
      read_paused_ = false;
      this->StartRead(&incoming_);
    }
    if (!writes_.empty()) {
      this->StartWrite(&writes_.front()->wire);
    } else {
      MaybeFinishLocked();
    }
  }

  void OnDone() override { delete this; }

 private:
  struct Item {
    Request request;
    Response response;
    grpc::ByteBuffer wire;  // the response serialized, what is written
    MemoryBudget::Reservation memory;
  };

  void Answered(const std::shared_ptr<Item>& item, const grpc::Status& status) {
    grpc::Status failed = status;
    if (failed.ok()) failed = SerializeWire(item->response, &item->wire);
    if (!failed.ok()) {
      item->response = Response();
      try {  // on a worker's OpenMP thread, where an escaping exception would end the process
        write_error_(item->request, failed, &item->response);
        SerializeWire(item->response, &item->wire).IgnoreError();  // an error response: a few bytes
      } catch (const std::bad_alloc&) {
        grpc::Slice none;  // an empty message (gRPC aborts rather than throws if even this fails)
        item->wire = grpc::ByteBuffer(&none, 1);
      }
    }
    // Answered and serialized: its tensors need not wait for the write (nor their memory).
    Request().Swap(&item->request);
    item->response = Response();
    absl::MutexLock lock(&mu_);
    --pending_;
    writes_.push_back(item);
    if (writes_.size() == 1) this->StartWrite(&writes_.front()->wire);
  }

  // Read and not yet written back: computing, or waiting to be written.
  int64_t InflightLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return pending_ + static_cast<int64_t>(writes_.size());
  }

  void MaybeFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (reads_done_ && pending_ == 0 && writes_.empty() && !finished_) {
      finished_ = true;
      this->Finish(rpc_.Ended(ctx_->IsCancelled() ? grpc::Status::CANCELLED : ending_));
    }
  }

  const ServedRpc rpc_;
  grpc::CallbackServerContext* ctx_;
  const int64_t max_inflight_;
  const Submit submit_;
  const WriteError write_error_;
  grpc::ByteBuffer incoming_;  // only touched by the read chain, one read at a time
  absl::Mutex mu_;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool read_paused_ ABSL_GUARDED_BY(mu_) = false;  // no read started: max_inflight_ reached
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status ending_ ABSL_GUARDED_BY(mu_);  // the stream's status once all is answered: OK unless a read failed
  int64_t pending_ ABSL_GUARDED_BY(mu_) = 0;                       // submitted, not yet answered
  std::deque<std::shared_ptr<Item>> writes_ ABSL_GUARDED_BY(mu_);  // front is being written
};

}  // namespace attnserve
