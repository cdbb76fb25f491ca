// Scores are computed in query blocks, so memory stays bounded for long sequences: B=1, L=32768, E=1024,
// H=16 self-attention must run with a peak RSS under 1 GiB (PyTorch 1.13 needs 4.4 GiB at L=8192). This
// measures memory, not time, so it is stable on a noisy machine; it takes about a minute of compute.
#include <sys/resource.h>

#include <cmath>
#include <random>

#include "core/multihead_attention.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

int64_t PeakRssBytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;
}

TEST(LongSequenceMemoryTest, L32768E1024H16UnderOneGiB) {
  const int64_t len = 32768, e = 1024;
  MhaConfig config{e, 16, 0, 0, true};
  MultiheadAttention::Options options;
  options.config = config;
  auto layer = MultiheadAttention::Create(options, RandomMhaWeights(config, 3));
  ASSERT_TRUE(layer.ok());
  std::vector<float> query(len * e);
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (float& x : query) x = u(rng);
  AttentionInputs in;
  in.query = TensorView::F32(query.data(), {1, len, e});
  in.is_causal = true;
  auto out = (*layer)->Forward(in);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->output.values.size(), static_cast<size_t>(len * e));
  for (size_t i = 0; i < out->output.values.size(); i += 4099) ASSERT_TRUE(std::isfinite(out->output.values[i]));
  const int64_t peak = PeakRssBytes();
  std::cout << "peak RSS " << peak / (1 << 20) << " MiB\n";
  RecordProperty("peak_rss_mib", static_cast<int>(peak >> 20));
  EXPECT_LT(peak, int64_t{1} << 30);
}

}  // namespace
}  // namespace attnserve
