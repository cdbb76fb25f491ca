// The batching policy of one queue (one model layer), apart from threads: which waiting requests close into
// the next batch, and when. Drivable from one test thread with a fake clock; BatchScheduler
// (server/batching/batch_scheduler.h) adds the locking and the worker threads.
//
// A batch closes ("Ready") as soon as waiting longer cannot make it any bigger, or the oldest request has
// waited long enough:
//   - max_queue_delay_us == 0 (eager): whenever a worker asks. Under load, requests arriving while every
//     worker computes pile up and form the next batch, so batching happens without adding latency.
//   - max_queue_delay_us > 0: an idle worker waits until the batch is full (max_batch_size entries, or
//     max_batch_tokens reached by its first entries) or the oldest request has waited that long.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <utility>
#include <vector>

#include "absl/base/macros.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "server/batching/clock.h"

namespace attnserve {

struct BatchingOptions {
  // Requests per batch at most (1 = no batching).
  int32_t max_batch_size = 32;
  // How long an idle worker holds the oldest request back waiting for the batch to fill, in microseconds;
  // 0 = eager (see above).
  int64_t max_queue_delay_us = 0;
  // Requests waiting in the queue at most (not counting the batches being run); Push fails beyond.
  int32_t max_queue_size = 1024;
  // Sum of the items' tokens per batch at most. A single larger item still forms a batch, alone.
  int64_t max_batch_tokens = 8192;

  // InvalidArgument naming the field, e.g. "max_batch_size must be >= 1, got 0".
  absl::Status Validate() const;
};

// A FIFO of waiting items of type T (movable, e.g. std::unique_ptr<Request>), each with its token count and
// enqueue time.
//
// Thread-safety: none; the caller locks (BatchScheduler does). `clock` is not owned and must outlive the
// queue.
template <typename T>
class BatchQueue {
 public:
  struct Entry {
    T item;
    int64_t tokens;       // >= 0, as given to Push
    absl::Time enqueued;  // clock->Now() at Push
  };

  // `options` must be valid (options.Validate().ok()).
  BatchQueue(const BatchingOptions& options, const Clock* clock) : options_(options), clock_(clock) {
    ABSL_ASSERT(options.Validate().ok());
    ABSL_ASSERT(clock != nullptr);
  }

  BatchQueue(const BatchQueue&) = delete;
  BatchQueue& operator=(const BatchQueue&) = delete;

  // Appends `item` (moved from on success). On error `item` is left untouched so the caller can still
  // answer it: RESOURCE_EXHAUSTED ("queue full: 1024 requests waiting (max_queue_size)") when the queue holds
  // max_queue_size entries; INVALID_ARGUMENT when tokens < 0.
  absl::Status Push(T& item, int64_t tokens) {
    if (tokens < 0) return absl::InvalidArgumentError(absl::StrCat("tokens must be >= 0, got ", tokens));
    if (entries_.size() >= static_cast<size_t>(options_.max_queue_size)) {
      return absl::ResourceExhaustedError(
          absl::StrCat("queue full: ", entries_.size(), " requests waiting (max_queue_size)"));
    }
    entries_.push_back(Entry{std::move(item), tokens, clock_->Now()});
    tokens_ += tokens;
    return absl::OkStatus();
  }

  // True when a batch can close now: the queue holds max_batch_size entries, or the first entries (those
  // TakeBatch would take) reach max_batch_tokens or leave out the next one for lack of tokens, or the oldest
  // entry has waited >= max_queue_delay_us, or max_queue_delay_us == 0 and the queue is non-empty.
  bool Ready() const {
    if (entries_.empty()) return false;
    if (options_.max_queue_delay_us == 0) return true;
    if (clock_->Now() >= NextReadyTime()) return true;
    // Full by size or tokens: the same walk as TakeBatch, stopping at the first reason to close.
    int64_t count = 0, running = 0;
    for (const Entry& e : entries_) {
      if (count > 0 && e.tokens > options_.max_batch_tokens - running) return true;  // next does not fit
      running += e.tokens;
      if (++count >= options_.max_batch_size || running >= options_.max_batch_tokens) return true;
    }
    return false;
  }

  // The oldest entry; null when empty.
  const Entry* Front() const { return entries_.empty() ? nullptr : &entries_.front(); }
  // The oldest entry alone, whatever the batching options say (the express lane's batch of one).
  std::vector<Entry> TakeFront() {
    std::vector<Entry> batch;
    if (entries_.empty()) return batch;
    batch.push_back(std::move(entries_.front()));
    entries_.pop_front();
    return batch;
  }

  // Takes the next batch in FIFO order: entries while count < max_batch_size and running tokens +
  // next.tokens <= max_batch_tokens (the first entry is always taken). Returns empty when !Ready(), unless
  // `force` (shutdown flush: take a batch regardless of time; the size and token limits still hold).
  std::vector<Entry> TakeBatch(bool force = false) {
    std::vector<Entry> batch;
    if (entries_.empty() || (!force && !Ready())) return batch;
    int64_t running = 0;
    while (!entries_.empty() && batch.size() < static_cast<size_t>(options_.max_batch_size)) {
      // Written as a subtraction: no overflow, and an oversize first entry (running > max) stops here.
      if (!batch.empty() && entries_.front().tokens > options_.max_batch_tokens - running) break;
      running += entries_.front().tokens;
      batch.push_back(std::move(entries_.front()));
      entries_.pop_front();
    }
    tokens_ -= running;
    return batch;
  }

  // When Ready() becomes true through time alone: oldest.enqueued + max_queue_delay_us (so oldest.enqueued
  // when the delay is 0); absl::InfiniteFuture() when empty. Ready() may already be true before, because of
  // size or tokens.
  absl::Time NextReadyTime() const {
    if (entries_.empty()) return absl::InfiniteFuture();
    return entries_.front().enqueued + absl::Microseconds(options_.max_queue_delay_us);
  }

  // Enqueue time of the oldest entry; absl::InfiniteFuture() when empty. (For fairness across queues.)
  absl::Time OldestEnqueued() const {
    return entries_.empty() ? absl::InfiniteFuture() : entries_.front().enqueued;
  }

  size_t size() const { return entries_.size(); }
  int64_t tokens() const { return tokens_; }  // sum over the waiting entries
  bool empty() const { return entries_.empty(); }
  const BatchingOptions& options() const { return options_; }
  // `options` must be valid; applies from the next Push / Ready / TakeBatch on.
  void SetOptions(const BatchingOptions& options) {
    ABSL_ASSERT(options.Validate().ok());
    options_ = options;
  }

  // Removes and returns the entries for which pred(const Entry&) is true (e.g. cancelled requests), in
  // queue order, preserving the order of the rest.
  template <typename Pred>
  std::vector<Entry> RemoveIf(Pred pred) {
    std::vector<Entry> removed;
    auto first = std::find_if(entries_.begin(), entries_.end(), [&](const Entry& e) { return pred(e); });
    if (first == entries_.end()) return removed;  // the common case: nothing to rebuild
    std::deque<Entry> kept(std::make_move_iterator(entries_.begin()), std::make_move_iterator(first));
    for (auto it = first; it != entries_.end(); ++it) {
      if (it == first || pred(static_cast<const Entry&>(*it))) {
        tokens_ -= it->tokens;
        removed.push_back(std::move(*it));
      } else {
        kept.push_back(std::move(*it));
      }
    }
    entries_ = std::move(kept);
    return removed;
  }

 private:
  BatchingOptions options_;
  const Clock* const clock_;
  std::deque<Entry> entries_;  // FIFO: front = oldest
  int64_t tokens_ = 0;         // sum of entries_[i].tokens
};

}  // namespace attnserve
