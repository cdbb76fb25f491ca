// LruCache (core/lru_cache.h): least recently used first out, errors not stored, one value per key when threads
// build it at once.
#include "core/lru_cache.h"

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace attnserve {
namespace {

struct Counted {
  int key;
};

absl::StatusOr<std::shared_ptr<const Counted>> Get(LruCache<int, Counted>& cache, int key, int* builds,
                                                   int* stores) {
  return cache.GetOrBuild(
      key,
      [&]() -> absl::StatusOr<std::shared_ptr<Counted>> {
        ++*builds;
        if (key < 0) return absl::UnimplementedError("negative");
        return std::make_shared<Counted>(Counted{key});
      },
      [&](const Counted&) { ++*stores; });
}

TEST(LruCacheTest, EvictsTheLeastRecentlyUsed) {
  LruCache<int, Counted> cache(2);
  int builds = 0, stores = 0;
  ASSERT_EQ((*Get(cache, 1, &builds, &stores))->key, 1);
  ASSERT_EQ((*Get(cache, 2, &builds, &stores))->key, 2);
  ASSERT_TRUE(Get(cache, 1, &builds, &stores).ok());  // 1 is now the most recent: 3 evicts 2
  ASSERT_TRUE(Get(cache, 3, &builds, &stores).ok());
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_EQ(builds, 3);
  ASSERT_TRUE(Get(cache, 1, &builds, &stores).ok());
  EXPECT_EQ(builds, 3) << "1 was kept";
  ASSERT_TRUE(Get(cache, 2, &builds, &stores).ok());
  EXPECT_EQ(builds, 4) << "2 was evicted";
  EXPECT_EQ(stores, 4);
}

TEST(LruCacheTest, ErrorsAreReturnedNotStored) {
  LruCache<int, Counted> cache(4);
  int builds = 0, stores = 0;
  EXPECT_TRUE(absl::IsUnimplemented(Get(cache, -1, &builds, &stores).status()));
  EXPECT_TRUE(absl::IsUnimplemented(Get(cache, -1, &builds, &stores).status()));
  EXPECT_EQ(builds, 2);
  EXPECT_EQ(stores, 0);
  EXPECT_EQ(cache.size(), 0u);
}

TEST(LruCacheTest, ThreadsBuildingOneKeyShareTheFirstStored) {
  LruCache<int, Counted> cache(4);
  std::atomic<int> stores{0};
  std::vector<const Counted*> seen(8);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < seen.size(); ++t) {
    threads.emplace_back([&, t] {
      auto value = cache.GetOrBuild(
          7, [] { return absl::StatusOr<std::shared_ptr<Counted>>(std::make_shared<Counted>(Counted{7})); },
          [&](const Counted&) { ++stores; });
      seen[t] = value.ok() ? value->get() : nullptr;
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(stores.load(), 1);
  EXPECT_EQ(cache.size(), 1u);
  for (const Counted* v : seen) EXPECT_EQ(v, seen[0]);
}

}  // namespace
}  // namespace attnserve
