// The keys and values of attention sessions, paged: fixed-size blocks of `block_tokens` tokens from one pool
// with a byte budget (the sessions issue's kv_cache_bytes). A session's cache for one layer (KvSequence) is a
// list of blocks; it takes a block when its last one is full, so an append never reallocates or copies what
// the session holds. A fork shares every block by reference count and copies only a shared, partly filled
// last block, on its next append (copy-on-write). Freed blocks stay in the pool for the next allocation of
// their width; they go back to the system only to make room for another width.
//
// Layout of one block: keys [block_tokens, width] then values [block_tokens, width], f32, row-major, 64-byte
// aligned; `width` is the layer's projected key/value width (E for nn.MultiheadAttention; Hkv * D for a
// decoder layer).
//
// Thread-safety: KvCachePool may be used from any thread at once. A KvBlockRef may be copied and destroyed on
// any thread (its count is atomic). A KvSequence is not thread-safe: one append, fork or truncate of it at a
// time (the sessions' appends of one layer run in order), and reads only between them.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace attnserve {

class KvCachePool;

// One block's storage and its reference count; owned by the pool.
struct KvBlock {
  float* data = nullptr;  // keys then values
  int64_t width = 0;
  std::atomic<int64_t> refs{0};
};

// A counted reference to a block: the block returns to its pool when the last reference goes.
class KvBlockRef {
 public:
  KvBlockRef() = default;
  KvBlockRef(const KvBlockRef& other);
  KvBlockRef& operator=(const KvBlockRef& other);
  KvBlockRef(KvBlockRef&& other) noexcept : pool_(other.pool_), block_(other.block_) { other.block_ = nullptr; }
  KvBlockRef& operator=(KvBlockRef&& other) noexcept;
  ~KvBlockRef() { Reset(); }

  explicit operator bool() const { return block_ != nullptr; }
  bool shared() const { return block_ != nullptr && block_->refs.load(std::memory_order_acquire) > 1; }
  float* keys() const { return block_->data; }
  float* values(int64_t block_tokens) const { return block_->data + block_tokens * block_->width; }
  void Reset();

 private:
  friend class KvCachePool;
  KvBlockRef(KvCachePool* pool, KvBlock* block);  // takes a new reference
  KvCachePool* pool_ = nullptr;
  KvBlock* block_ = nullptr;
};

class KvCachePool {
 public:
  struct Options {
    // The pool never holds more than this, in use or kept free (> 0).
    int64_t kv_cache_bytes = 0;
    // Tokens per block (>= 1): larger blocks waste up to a block per sequence, smaller ones cost more
    // bookkeeping per token.
    int64_t block_tokens = 16;
  };

  // InvalidArgument naming the option when one is out of range.
  static absl::StatusOr<std::unique_ptr<KvCachePool>> Create(const Options& options);
  // Every KvBlockRef and KvSequence of the pool must be gone first.
  ~KvCachePool();
  KvCachePool(const KvCachePool&) = delete;
  KvCachePool& operator=(const KvCachePool&) = delete;

  static constexpr int64_t kMaxWidth = int64_t{1} << 20;

  // A block for keys and values of `width` floats per token (1 <= width <= kMaxWidth), uninitialised.
  // RESOURCE_EXHAUSTED with the numbers when the budget cannot hold another.
  absl::StatusOr<KvBlockRef> Allocate(int64_t width) ABSL_LOCKS_EXCLUDED(mu_);
  // Bytes a block of `width` takes from the budget (its allocation: keys and values, rounded up to 64).
  int64_t BlockBytes(int64_t width) const {
    return (2 * options_.block_tokens * width * int64_t{sizeof(float)} + 63) / 64 * 64;
  }

  int64_t block_tokens() const { return options_.block_tokens; }
  int64_t capacity_bytes() const { return options_.kv_cache_bytes; }
  // Bytes of blocks referenced by someone.
  int64_t used_bytes() const ABSL_LOCKS_EXCLUDED(mu_);
  // Bytes of blocks kept free for reuse.
  int64_t free_bytes() const ABSL_LOCKS_EXCLUDED(mu_);
  int64_t blocks_in_use() const ABSL_LOCKS_EXCLUDED(mu_);
  // Blocks of `width` the budget could still give (kept free ones and room for new ones).
  int64_t blocks_available(int64_t width) const ABSL_LOCKS_EXCLUDED(mu_);
  // Blocks taken from the system since the pool was made (a reused block is not counted).
  int64_t system_allocations() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  friend class KvBlockRef;
  explicit KvCachePool(const Options& options) : options_(options) {}
  void Release(KvBlock* block) ABSL_LOCKS_EXCLUDED(mu_);
  // Whether `bytes` more fit, freeing kept blocks of widths other than `width` when that makes room (and only
  // then).
  bool MakeRoomLocked(int64_t bytes, int64_t width) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FreeBlockLocked(KvBlock* block) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  mutable absl::Mutex mu_;
  std::map<int64_t, std::vector<KvBlock*>> free_ ABSL_GUARDED_BY(mu_);  // by width
  int64_t held_bytes_ ABSL_GUARDED_BY(mu_) = 0;                        // in use + free
  int64_t free_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t blocks_in_use_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t system_allocations_ ABSL_GUARDED_BY(mu_) = 0;
};

// One session's keys and values for one layer: `tokens()` tokens in blocks of the pool's block_tokens.
// Token i is row i % block_tokens of block i / block_tokens. The pool must outlive it.
class KvSequence {
 public:
  KvSequence(KvCachePool* pool, int64_t width) : pool_(pool), width_(width) {}

  int64_t tokens() const { return tokens_; }
  int64_t width() const { return width_; }
  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  int64_t block_tokens() const { return pool_->block_tokens(); }
  // Keys [block_tokens, width] and values of block `b` (b >= first_token() / block_tokens()); rows past
  // tokens() are not defined.
  const float* keys(int64_t b) const { return blocks_[b].keys(); }
  const float* values(int64_t b) const { return blocks_[b].values(block_tokens()); }
  // Blocks this sequence shares with another (after a fork).
  int64_t shared_blocks() const;

  // Takes now every block an Append of `count` more tokens needs (new blocks, and the copy of a shared,
  // partly filled last block), so that the append itself cannot fail: how a server admits an append before
  // it computes. RESOURCE_EXHAUSTED (nothing changed) when the pool cannot hold them. Blocks reserved and
  // not used stay reserved until a Truncate or the sequence's end.
  absl::Status Reserve(int64_t count);
  // Blocks the next Append of `count` tokens takes from the pool beyond those reserved.
  int64_t BlocksNeeded(int64_t count) const;
  // Appends `count` tokens: keys [count, width] and values [count, width], row-major with row stride `ld`
  // (0: width). Takes every block it needs (beyond the reserved ones) first: on RESOURCE_EXHAUSTED nothing
  // changed.
  absl::Status Append(const float* keys, const float* values, int64_t count, int64_t ld = 0);
  // A sequence with the same tokens, sharing every block (not the reserved ones).
  KvSequence Fork() const;
  // Keeps the first `tokens` tokens (no-op when it holds fewer); the blocks past them go back to the pool.
  // Tokens before first_token() stay gone: a caller that needs their keys must not truncate below them (an
  // append after a truncate inside a freed block is FAILED_PRECONDITION).
  void Truncate(int64_t tokens);
  // Gives the blocks Reserve took and no Append used back to the pool (an append that was refused).
  void ReleaseReserved() { reserved_.clear(); }
  // Gives the pool back the whole blocks before token `token` (a sliding window will not read them again),
  // never the last block. Token indices do not change: tokens() still counts them.
  void DropBefore(int64_t token);
  // The first token whose keys and values are held (0 unless DropBefore freed some).
  int64_t first_token() const { return dropped_blocks_ * block_tokens(); }
  // Bytes of the pool this sequence holds (its blocks, shared ones included, and reserved ones).
  int64_t bytes() const {
    return (num_blocks() - dropped_blocks_ + static_cast<int64_t>(reserved_.size())) * pool_->BlockBytes(width_);
  }

 private:
  KvCachePool* pool_;
  int64_t width_;
  int64_t tokens_ = 0;
  int64_t dropped_blocks_ = 0;  // blocks_[0, dropped_blocks_) are empty references
  std::vector<KvBlockRef> blocks_;
  std::vector<KvBlockRef> reserved_;  // taken by Reserve, used by Append first
};

}  // namespace attnserve
