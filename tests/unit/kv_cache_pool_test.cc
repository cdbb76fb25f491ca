// KvCachePool and KvSequence: a sequence appended in any split holds exactly the rows appended, forks share
// blocks until one of them writes (copy-on-write), truncation drops rows and blocks, the byte budget is never
// exceeded and a refused append changes nothing, freed blocks are reused, and references may be dropped from
// many threads at once.
#include "core/kv_cache_pool.h"

#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

using testing::RandomValues;

std::unique_ptr<KvCachePool> Pool(int64_t bytes, int64_t block_tokens) {
  auto pool = KvCachePool::Create({bytes, block_tokens});
  EXPECT_TRUE(pool.ok()) << pool.status();
  return pool.ok() ? std::move(*pool) : nullptr;
}

// Rows [0, n) of keys and values as one [n, width] matrix each, read block by block.
void ExpectHolds(const KvSequence& seq, const std::vector<float>& keys, const std::vector<float>& values,
                 const std::string& what) {
  const int64_t w = seq.width(), bt = seq.block_tokens();
  ASSERT_EQ(seq.tokens() * w, static_cast<int64_t>(keys.size())) << what;
  ASSERT_EQ(seq.num_blocks(), (seq.tokens() + bt - 1) / bt) << what;
  for (int64_t t = 0; t < seq.tokens(); ++t) {
    for (int64_t c = 0; c < w; ++c) {
      ASSERT_EQ(seq.keys(t / bt)[(t % bt) * w + c], keys[t * w + c]) << what << ": key of token " << t;
      ASSERT_EQ(seq.values(t / bt)[(t % bt) * w + c], values[t * w + c]) << what << ": value of token " << t;
    }
  }
}

struct Appended {
  std::vector<float> keys, values;
};

// Appends `count` random tokens to `seq` and to `mirror`.
absl::Status AppendRandom(std::mt19937_64& rng, int64_t count, KvSequence* seq, Appended* mirror) {
  const std::vector<float> k = RandomValues(rng, count * seq->width());
  const std::vector<float> v = RandomValues(rng, count * seq->width());
  absl::Status s = seq->Append(k.data(), v.data(), count);
  if (s.ok()) {
    mirror->keys.insert(mirror->keys.end(), k.begin(), k.end());
    mirror->values.insert(mirror->values.end(), v.begin(), v.end());
  }
  return s;
}

TEST(KvCachePoolTest, AnySplitOfAppendsHoldsTheRowsInOrder) {
  std::mt19937_64 rng(3);
  for (int64_t bt : {1, 4, 16}) {
    auto pool = Pool(int64_t{64} << 20, bt);
    KvSequence seq(pool.get(), 24);
    Appended want;
    for (int64_t count : {1, 1, 7, 16, 3, 33, 1, 1, 1, 64}) {
      ASSERT_TRUE(AppendRandom(rng, count, &seq, &want).ok());
      ExpectHolds(seq, want.keys, want.values, "block_tokens " + std::to_string(bt));
    }
    EXPECT_EQ(pool->blocks_in_use(), seq.num_blocks());
    EXPECT_EQ(pool->used_bytes(), seq.num_blocks() * pool->BlockBytes(24));
  }
}

TEST(KvCachePoolTest, ForkSharesBlocksAndCopiesOnlyAPartlyFilledLastBlock) {
  std::mt19937_64 rng(5);
  auto pool = Pool(int64_t{64} << 20, 16);
  KvSequence a(pool.get(), 8);
  Appended want_a;
  ASSERT_TRUE(AppendRandom(rng, 40, &a, &want_a).ok());  // 2 full blocks and 8 rows of a third
  KvSequence b = a.Fork();
  Appended want_b = want_a;
  EXPECT_EQ(pool->blocks_in_use(), 3) << "a fork copied blocks";
  EXPECT_EQ(b.shared_blocks(), 3);
  ASSERT_TRUE(AppendRandom(rng, 1, &b, &want_b).ok());  // writes into the shared third block: copied first
  EXPECT_EQ(pool->blocks_in_use(), 4);
  EXPECT_EQ(b.shared_blocks(), 2);
  EXPECT_EQ(a.shared_blocks(), 2);
  ASSERT_TRUE(AppendRandom(rng, 30, &a, &want_a).ok());  // a's third block is its own again: written in place
  EXPECT_EQ(pool->blocks_in_use(), 6);
  ASSERT_TRUE(AppendRandom(rng, 5, &b, &want_b).ok());
  ExpectHolds(a, want_a.keys, want_a.values, "a after both diverged");
  ExpectHolds(b, want_b.keys, want_b.values, "b after both diverged");
}

TEST(KvCachePoolTest, TruncateThenAppendAgain) {
  std::mt19937_64 rng(7);
  auto pool = Pool(int64_t{64} << 20, 16);
  KvSequence a(pool.get(), 8);
  Appended want;
  ASSERT_TRUE(AppendRandom(rng, 50, &a, &want).ok());
  KvSequence forked = a.Fork();
  const Appended forked_want = want;
  a.Truncate(20);  // drops 2 of 4 blocks; the second kept one is shared with the fork and partly filled
  want.keys.resize(20 * 8);
  want.values.resize(20 * 8);
  ExpectHolds(a, want.keys, want.values, "truncated");
  ASSERT_TRUE(AppendRandom(rng, 13, &a, &want).ok());  // must not write into the fork's block
  ExpectHolds(a, want.keys, want.values, "truncated and appended");
  ExpectHolds(forked, forked_want.keys, forked_want.values, "the fork after the other was truncated");
  a.Truncate(0);
  EXPECT_EQ(a.tokens(), 0);
  EXPECT_EQ(a.num_blocks(), 0);
  a.Truncate(10);  // more than it holds: no-op
  EXPECT_EQ(a.tokens(), 0);
}

TEST(KvCachePoolTest, DropBeforeFreesWholeBlocksButNeverTheLastAndForksKeepTheirs) {
  std::mt19937_64 rng(9);
  auto pool = Pool(int64_t{64} << 20, 4);
  KvSequence a(pool.get(), 8);
  Appended want;
  ASSERT_TRUE(AppendRandom(rng, 18, &a, &want).ok());  // 5 blocks, the last holding 2 tokens
  KvSequence fork = a.Fork();
  const int64_t block = pool->BlockBytes(8);
  a.DropBefore(11);  // blocks 0 and 1 (tokens 0..7); block 2 holds token 11
  EXPECT_EQ(a.first_token(), 8);
  EXPECT_EQ(a.tokens(), 18);
  EXPECT_EQ(a.bytes(), 3 * block);
  EXPECT_EQ(pool->used_bytes(), 5 * block);  // the fork still holds the dropped ones
  fork = KvSequence(pool.get(), 8);
  EXPECT_EQ(pool->used_bytes(), 3 * block);
  for (int64_t t = 8; t < 18; ++t) {
    EXPECT_EQ(a.keys(t / 4)[(t % 4) * 8], want.keys[t * 8]) << "token " << t;
  }
  a.DropBefore(1000);  // never the last block: the next append writes into it
  EXPECT_EQ(a.first_token(), 16);
  ASSERT_TRUE(AppendRandom(rng, 3, &a, &want).ok());
  EXPECT_EQ(a.values(5)[0], want.values[20 * 8]);
  EXPECT_EQ(a.bytes(), 2 * block);
  KvSequence copy = a.Fork();  // a fork of a dropped sequence holds the same tokens
  EXPECT_EQ(copy.first_token(), 16);
  EXPECT_EQ(copy.bytes(), 2 * block);
  a.Truncate(6);  // below what it holds: the sequence keeps its count, its dropped blocks stay gone
  EXPECT_EQ(a.tokens(), 6);
  EXPECT_EQ(a.bytes(), 0);
  const absl::Status next = AppendRandom(rng, 1, &a, &want);  // into a freed block: refused, not a crash
  EXPECT_EQ(next.code(), absl::StatusCode::kFailedPrecondition) << next;
}

TEST(KvCachePoolTest, BudgetIsNeverExceededAndARefusedAppendChangesNothing) {
  std::mt19937_64 rng(9);
  auto pool = Pool(5 * 2 * 4 * 8 * 4, 4);  // room for 5 blocks of width 8, block_tokens 4
  KvSequence a(pool.get(), 8);
  Appended want;
  ASSERT_TRUE(AppendRandom(rng, 18, &a, &want).ok());  // 5 blocks, the last with 2 rows
  const absl::Status full = AppendRandom(rng, 3, &a, &want);  // needs a sixth
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_NE(full.message().find("kv_cache_bytes"), std::string::npos) << full;
  ExpectHolds(a, want.keys, want.values, "after a refused append");
  // A fork whose shared last block is partly filled must copy it before writing: with the pool full it is
  // refused, and neither sequence changes.
  KvSequence b = a.Fork();
  Appended want_b = want;
  EXPECT_EQ(AppendRandom(rng, 1, &b, &want_b).code(), absl::StatusCode::kResourceExhausted);
  ExpectHolds(a, want.keys, want.values, "a after its fork's refused append");
  ExpectHolds(b, want_b.keys, want_b.values, "the fork after its refused append");
  EXPECT_EQ(AppendRandom(rng, 1, &a, &want).code(), absl::StatusCode::kResourceExhausted);  // a shares it too
  EXPECT_EQ(pool->blocks_in_use(), 5);
  b.Truncate(0);  // the fork lets go: a's last block is its own again and fills in place
  ASSERT_TRUE(AppendRandom(rng, 2, &a, &want).ok());
  ExpectHolds(a, want.keys, want.values, "a after filling its last block in place");
  EXPECT_LE(pool->used_bytes() + pool->free_bytes(), pool->capacity_bytes());
  EXPECT_EQ(pool->Allocate(8 * 100).status().code(), absl::StatusCode::kResourceExhausted);  // larger than all
}

// An append refused after it reserved its blocks gives them back without touching the rows held.
TEST(KvCachePoolTest, ReleaseReservedGivesUnusedBlocksBack) {
  std::mt19937_64 rng(12);
  auto pool = Pool(5 * 2 * 4 * 8 * 4, 4);
  KvSequence a(pool.get(), 8);
  Appended want;
  ASSERT_TRUE(AppendRandom(rng, 6, &a, &want).ok());  // 2 blocks
  ASSERT_TRUE(a.Reserve(9).ok());                      // the second's 2 free rows, then 2 more blocks (7 rows)
  EXPECT_EQ(pool->blocks_in_use(), 4);
  a.ReleaseReserved();
  EXPECT_EQ(pool->blocks_in_use(), 2);
  ExpectHolds(a, want.keys, want.values, "after releasing the reservation");
  ASSERT_TRUE(AppendRandom(rng, 3, &a, &want).ok());
  ExpectHolds(a, want.keys, want.values, "appending after it");
}

TEST(KvCachePoolTest, FreedBlocksAreReusedAndMakeRoomForOtherWidths) {
  std::mt19937_64 rng(11);
  auto pool = Pool(4 * 2 * 16 * 32 * 4, 16);  // 4 blocks of width 32
  {
    KvSequence a(pool.get(), 32);
    Appended want;
    ASSERT_TRUE(AppendRandom(rng, 64, &a, &want).ok());
  }
  EXPECT_EQ(pool->used_bytes(), 0);
  EXPECT_EQ(pool->free_bytes(), 4 * pool->BlockBytes(32));
  {
    KvSequence again(pool.get(), 32);
    Appended want;
    ASSERT_TRUE(AppendRandom(rng, 64, &again, &want).ok());
    EXPECT_EQ(pool->system_allocations(), 4) << "the freed blocks were not reused";
  }
  KvSequence other(pool.get(), 64);  // another layer's width: the kept blocks make room
  Appended want;
  ASSERT_TRUE(AppendRandom(rng, 32, &other, &want).ok());
  EXPECT_EQ(pool->used_bytes(), 2 * pool->BlockBytes(64));
  EXPECT_EQ(pool->free_bytes(), 0);
}

TEST(KvCachePoolTest, OptionsAreChecked) {
  EXPECT_EQ(KvCachePool::Create({0, 16}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KvCachePool::Create({1 << 20, 0}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(KvCachePool::Create({1 << 20, 0}).status().message().find("kv_block_tokens"), std::string::npos);
  auto pool = Pool(1 << 20, 16);
  EXPECT_EQ(pool->Allocate(0).status().code(), absl::StatusCode::kInvalidArgument);
}

// Forks of one sequence appended to and dropped on many threads at once: every block goes back exactly once.
TEST(KvCachePoolTest, ForksDroppedFromManyThreads) {
  auto pool = Pool(int64_t{64} << 20, 4);
  std::mt19937_64 rng(13);
  KvSequence root(pool.get(), 16);
  Appended want;
  ASSERT_TRUE(AppendRandom(rng, 30, &root, &want).ok());
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&root, t] {
      std::mt19937_64 local(100 + t);
      for (int i = 0; i < 200; ++i) {
        KvSequence fork = root.Fork();  // reading root's block list: root is not written meanwhile
        Appended unused;
        EXPECT_TRUE(AppendRandom(local, 1 + i % 6, &fork, &unused).ok());
        if (i % 3 == 0) fork.Truncate(i % 30);
      }
    });
  }
  for (auto& th : threads) th.join();
  ExpectHolds(root, want.keys, want.values, "the root after its forks came and went");
  EXPECT_EQ(pool->blocks_in_use(), root.num_blocks());
}

}  // namespace
}  // namespace attnserve
