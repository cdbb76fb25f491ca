// ReleaseTeamScratch (core/team_scratch.h): a worker about to idle frees the kernels' per-thread buffers on its
// OpenMP team's threads too, not only on its own: after a flash request on two threads (head copies on both),
// both threads' buffers are gone; keep_bytes above what they hold keeps them.
#include "core/team_scratch.h"

#include <omp.h>

#include <random>
#include <vector>

#include "core/flash_attention.h"
#include "core/multihead_attention.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

// FlashScratchHeldBytes of each thread of a team of two, from this thread (libgomp's pool for it: the threads its
// engine calls ran on).
std::vector<int64_t> TeamFlashBytes() {
  std::vector<int64_t> bytes(2, -1);
#pragma omp parallel num_threads(2)
  bytes[omp_get_thread_num()] = FlashScratchHeldBytes();
  return bytes;
}

TEST(TeamScratchTest, ReleasesTheTeamsBuffers) {
  if (omp_get_max_threads() < 2) omp_set_num_threads(2);
  std::mt19937_64 rng(21);
  MultiheadAttention::Options o;
  o.config = MhaConfig{64, 4, 0, 0, true};
  o.flash_min_keys = 64;
  auto layer = MultiheadAttention::Create(o, testing::RandomTestWeights(o.config, rng));
  ASSERT_TRUE(layer.ok()) << layer.status();
  const std::vector<float> q = testing::RandomValues(rng, 2000 * 64);
  AttentionInputs in;
  in.query = TensorView::F32(q.data(), {1, 2000, 64});
  auto run = [&] { ASSERT_TRUE((*layer)->Forward(in, 2).ok()); };
  run();
  std::vector<int64_t> before = TeamFlashBytes();
  // 16 items (4 heads x 4 query blocks) taken in turn: both threads copied a head's keys and values.
  EXPECT_GT(before[0], 2000 * 16 * 4) << "this thread";
  EXPECT_GT(before[1], 2000 * 16 * 4) << "the team's other thread";
  ReleaseTeamScratch(2, /*keep_bytes=*/size_t{1} << 30);
  EXPECT_EQ(TeamFlashBytes(), before) << "under keep_bytes: kept";
  ReleaseTeamScratch(2, 0);
  EXPECT_EQ(TeamFlashBytes(), std::vector<int64_t>({0, 0}));
  run();  // and the next request grows them again
  ReleaseTeamScratch(1, 0);
  EXPECT_EQ(TeamFlashBytes()[0], 0) << "a team of one: the calling thread";
}

}  // namespace
}  // namespace attnserve
