// Forward is safe to call from many threads at once on one layer: 8 threads, different inputs, each result
// equal to the one computed alone.
#include <random>
#include <thread>

#include "core/multihead_attention.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

TEST(MhaThreadsTest, EightThreadsOnOneLayer) {
  std::mt19937_64 rng(8);
  MhaConfig config{64, 8, 0, 0, true};
  MultiheadAttention::Options options;
  options.config = config;
  options.softmax_cache_capacity = 4;  // small, so threads also race on cache eviction
  auto layer = MultiheadAttention::Create(options, testing::RandomTestWeights(config, rng));
  ASSERT_TRUE(layer.ok());

  constexpr int kThreads = 8, kIters = 25;
  struct Work {
    std::vector<float> query;
    std::vector<uint8_t> mask;
    AttentionInputs in;
    AttentionOutputs expected;
  };
  std::vector<std::vector<Work>> work(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    work[t].resize(kIters);
    for (int i = 0; i < kIters; ++i) {
      Work& w = work[t][i];
      const int64_t b = 1 + (t + i) % 3, l = 3 + (7 * t + i) % 29;
      w.query = testing::RandomValues(rng, b * l * 64);
      for (int64_t j = 0; j < b * l; ++j) w.mask.push_back(j % 5 == 4);
      w.in.query = TensorView::F32(w.query.data(), {b, l, 64});
      w.in.key_padding_mask = TensorView::Bool(w.mask.data(), {b, l});
      w.in.need_weights = i % 2 == 0;
      auto r = (*layer)->Forward(w.in);
      ASSERT_TRUE(r.ok());
      w.expected = *r;
    }
  }
  std::vector<int> mismatches(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 4; ++rep) {
        for (Work& w : work[t]) {
          auto r = (*layer)->Forward(w.in);
          if (!r.ok() || testing::MaxAbsDiff(r->output.values, w.expected.output.values) > 1e-6 ||
              testing::MaxAbsDiff(r->attn_weights.values, w.expected.attn_weights.values) > 1e-6) {
            ++mismatches[t];
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(mismatches[t], 0) << "thread " << t;
}

}  // namespace
}  // namespace attnserve
