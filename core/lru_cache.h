// A thread-safe cache of at most `capacity` values by key, least recently used first out: the oneDNN primitives
// built per shape (SoftmaxCache, ShortAttention). A missing value is built outside the mutex (creating a primitive
// takes 0.03-2 ms, and other keys need not wait for it); when two threads build one key at once, the first stored
// wins. Values are shared: one evicted while in use lives on until its last user lets it go.
#pragma once

#include <algorithm>
#include <cstddef>
#include <list>
#include <memory>
#include <new>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace attnserve {

template <typename Key, typename Value>
class LruCache {
 public:
  explicit LruCache(size_t capacity) : capacity_(std::max<size_t>(capacity, 1)) {}

  // The value of `key`, built by build() (absl::StatusOr<std::shared_ptr<Value>>) when missing; its error is
  // returned and nothing stored (a value that records a failure is the way to remember one). on_store(const
  // Value&) runs once for each value stored, under the mutex. Out of memory (callers run inside OpenMP regions,
  // which no exception may leave) is ResourceExhausted, the cache left as it was.
  template <typename Build, typename OnStore>
  absl::StatusOr<std::shared_ptr<const Value>> GetOrBuild(const Key& key, Build build, OnStore on_store) {
    {
      absl::MutexLock lock(&mu_);
      if (auto it = map_.find(key); it != map_.end()) {
        lru_.splice(lru_.begin(), lru_, it->second.second);
        return it->second.first;
      }
    }
    try {
      absl::StatusOr<std::shared_ptr<Value>> built = build();
      if (!built.ok()) return built.status();
      absl::MutexLock lock(&mu_);
      if (auto it = map_.find(key); it != map_.end()) return it->second.first;  // another thread's, stored first
      std::shared_ptr<const Value> value = *std::move(built);
      lru_.push_front(key);
      try {
        map_.emplace(key, std::make_pair(value, lru_.begin()));
      } catch (const std::bad_alloc&) {
        lru_.pop_front();
        throw;
      }
      on_store(*value);
      while (map_.size() > capacity_) {
        map_.erase(lru_.back());
        lru_.pop_back();
      }
      return value;
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError("out of memory building a cached primitive");
    }
  }

  size_t size() const {
    absl::MutexLock lock(&mu_);
    return map_.size();
  }

 private:
  const size_t capacity_;
  mutable absl::Mutex mu_;
  std::list<Key> lru_ ABSL_GUARDED_BY(mu_);  // front = most recently used
  absl::flat_hash_map<Key, std::pair<std::shared_ptr<const Value>, typename std::list<Key>::iterator>> map_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace attnserve
