#include "core/kv_cache_pool.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include "absl/strings/str_cat.h"

namespace attnserve {

KvBlockRef::KvBlockRef(KvCachePool* pool, KvBlock* block) : pool_(pool), block_(block) {
  block_->refs.fetch_add(1, std::memory_order_relaxed);
}

KvBlockRef::KvBlockRef(const KvBlockRef& other) : pool_(other.pool_), block_(other.block_) {
  if (block_ != nullptr) block_->refs.fetch_add(1, std::memory_order_relaxed);
}

KvBlockRef& KvBlockRef::operator=(const KvBlockRef& other) {
  if (this != &other) {
    KvBlockRef copy(other);
    *this = std::move(copy);
  }
  return *this;
}

KvBlockRef& KvBlockRef::operator=(KvBlockRef&& other) noexcept {
  if (this != &other) {
    Reset();
    pool_ = other.pool_;
    block_ = other.block_;
    other.block_ = nullptr;
  }
  return *this;
}

void KvBlockRef::Reset() {
  if (block_ == nullptr) return;
  // acq_rel: the last holder's writes to the block happen before whoever takes it from the pool next.
  if (block_->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) pool_->Release(block_);
  block_ = nullptr;
}

absl::StatusOr<std::unique_ptr<KvCachePool>> KvCachePool::Create(const Options& options) {
  if (options.kv_cache_bytes <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("kv_cache_bytes must be > 0, got ", options.kv_cache_bytes));
  }
  if (options.block_tokens < 1 || options.block_tokens > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_block_tokens must be between 1 and 4096, got ", options.block_tokens));
  }
  return std::unique_ptr<KvCachePool>(new KvCachePool(options));
}

KvCachePool::~KvCachePool() {
  // Blocks still referenced (blocks_in_use_ > 0) would be released into a destroyed pool: a caller's bug.
  absl::MutexLock lock(&mu_);
  for (auto& [width, blocks] : free_) {
    for (KvBlock* b : blocks) FreeBlockLocked(b);
  }
}

void KvCachePool::FreeBlockLocked(KvBlock* block) {
  std::free(block->data);
  held_bytes_ -= BlockBytes(block->width);
  delete block;
}

bool KvCachePool::MakeRoomLocked(int64_t bytes, int64_t width) {
  if (held_bytes_ + bytes <= options_.kv_cache_bytes) return true;
  const auto same = free_.find(width);
  const int64_t same_width_free = same == free_.end() ? 0 : BlockBytes(width) * int64_t(same->second.size());
  if (held_bytes_ - (free_bytes_ - same_width_free) + bytes > options_.kv_cache_bytes) return false;
  for (auto it = free_.begin(); it != free_.end() && held_bytes_ + bytes > options_.kv_cache_bytes; ++it) {
    if (it->first == width) continue;
    std::vector<KvBlock*>& blocks = it->second;
    while (!blocks.empty() && held_bytes_ + bytes > options_.kv_cache_bytes) {
      free_bytes_ -= BlockBytes(blocks.back()->width);
      FreeBlockLocked(blocks.back());
      blocks.pop_back();
    }
  }
  return true;
}

absl::StatusOr<KvBlockRef> KvCachePool::Allocate(int64_t width) {
  if (width < 1 || width > kMaxWidth) {
    return absl::InvalidArgumentError(absl::StrCat("KV width must be between 1 and ", kMaxWidth, ", got ", width));
  }
  const int64_t bytes = BlockBytes(width);
  absl::MutexLock lock(&mu_);
  std::vector<KvBlock*>& kept = free_[width];
  if (!kept.empty()) {
    KvBlock* block = kept.back();
    kept.pop_back();
    free_bytes_ -= bytes;
    ++blocks_in_use_;
    return KvBlockRef(this, block);
  }
  if (!MakeRoomLocked(bytes, width)) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache pool full: a block needs ", bytes, " bytes, ",
                                                     held_bytes_ - free_bytes_, " of ", options_.kv_cache_bytes,
                                                     " (kv_cache_bytes) are in use"));
  }
  // 64-byte aligned for the matmul kernels; aligned_alloc wants a multiple of the alignment.
  void* data = std::aligned_alloc(64, static_cast<size_t>(bytes));  // bytes: a multiple of 64
  if (data == nullptr) return absl::ResourceExhaustedError("KV cache pool: out of memory for a block");
  auto* block = new KvBlock;
  block->data = static_cast<float*>(data);
  block->width = width;
  held_bytes_ += bytes;
  ++blocks_in_use_;
  ++system_allocations_;
  return KvBlockRef(this, block);
}

void KvCachePool::Release(KvBlock* block) {
  absl::MutexLock lock(&mu_);
  --blocks_in_use_;
  free_bytes_ += BlockBytes(block->width);
  free_[block->width].push_back(block);
}

int64_t KvCachePool::used_bytes() const {
  absl::MutexLock lock(&mu_);
  return held_bytes_ - free_bytes_;
}

int64_t KvCachePool::free_bytes() const {
  absl::MutexLock lock(&mu_);
  return free_bytes_;
}

int64_t KvCachePool::blocks_in_use() const {
  absl::MutexLock lock(&mu_);
  return blocks_in_use_;
}

int64_t KvCachePool::blocks_available(int64_t width) const {
  absl::MutexLock lock(&mu_);
  return (options_.kv_cache_bytes - (held_bytes_ - free_bytes_)) / BlockBytes(std::max<int64_t>(width, 1));
}

int64_t KvCachePool::system_allocations() const {
  absl::MutexLock lock(&mu_);
  return system_allocations_;
}

int64_t KvSequence::shared_blocks() const {
  return std::count_if(blocks_.begin(), blocks_.end(), [](const KvBlockRef& b) { return b.shared(); });
}

int64_t KvSequence::BlocksNeeded(int64_t count) const {
  if (count <= 0) return 0;
  const int64_t bt = block_tokens();
  const bool copy_last = tokens_ % bt > 0 && blocks_.back().shared();
  const int64_t new_blocks = (tokens_ + count + bt - 1) / bt - num_blocks();
  return std::max<int64_t>(0, new_blocks - static_cast<int64_t>(reserved_.size())) + (copy_last ? 1 : 0);
}

absl::Status KvSequence::Reserve(int64_t count) {
  if (count > 0 && tokens_ % block_tokens() > 0 && !blocks_.back()) {
    return absl::FailedPreconditionError(absl::StrCat("cache: truncated to ", tokens_,
                                                      " tokens inside blocks already freed (from token ",
                                                      first_token(), " on are held): nothing can follow them"));
  }
  const int64_t needed = BlocksNeeded(count);
  // Every block first, so that a full pool leaves the sequence as it was.
  std::vector<KvBlockRef> taken;
  for (int64_t i = 0; i < needed; ++i) {
    absl::StatusOr<KvBlockRef> block = pool_->Allocate(width_);
    if (!block.ok()) return block.status();
    taken.push_back(std::move(*block));
  }
  const int64_t bt = block_tokens(), filled = tokens_ % bt;
  if (filled > 0 && blocks_.back().shared()) {  // copy-on-write: the rows written so far, into a block of its own
    KvBlockRef own = std::move(taken.back());
    taken.pop_back();
    const size_t bytes = static_cast<size_t>(filled * width_) * sizeof(float);
    std::memcpy(own.keys(), blocks_.back().keys(), bytes);
    std::memcpy(own.values(bt), blocks_.back().values(bt), bytes);
    blocks_.back() = std::move(own);
  }
  for (KvBlockRef& b : taken) reserved_.push_back(std::move(b));
  return absl::OkStatus();
}

absl::Status KvSequence::Append(const float* keys, const float* values, int64_t count, int64_t ld) {
  if (count <= 0) return absl::OkStatus();
  if (ld == 0) ld = width_;
  if (absl::Status s = Reserve(count); !s.ok()) return s;
  const int64_t bt = block_tokens();
  const size_t row_bytes = static_cast<size_t>(width_) * sizeof(float);
  for (int64_t done = 0; done < count; ++done, ++tokens_) {
    const int64_t row = tokens_ % bt;
    if (row == 0) {
      blocks_.push_back(std::move(reserved_.back()));
      reserved_.pop_back();
    }
    std::memcpy(blocks_.back().keys() + row * width_, keys + done * ld, row_bytes);
    std::memcpy(blocks_.back().values(bt) + row * width_, values + done * ld, row_bytes);
  }
  return absl::OkStatus();
}

KvSequence KvSequence::Fork() const {
  KvSequence fork(pool_, width_);
  fork.tokens_ = tokens_;
  fork.dropped_blocks_ = dropped_blocks_;
  fork.blocks_ = blocks_;
  return fork;
}

void KvSequence::Truncate(int64_t tokens) {
  if (tokens < 0 || tokens >= tokens_) return;
  const int64_t keep_blocks = (tokens + block_tokens() - 1) / block_tokens();
  blocks_.resize(static_cast<size_t>(keep_blocks));
  dropped_blocks_ = std::min(dropped_blocks_, keep_blocks);
  reserved_.clear();
  tokens_ = tokens;
}

void KvSequence::DropBefore(int64_t token) {
  const int64_t last = std::min(token / block_tokens(), num_blocks() - 1);
  for (; dropped_blocks_ < last; ++dropped_blocks_) blocks_[dropped_blocks_].Reset();
}

}  // namespace attnserve
