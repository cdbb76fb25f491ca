// MemoryBudget: reservations never exceed the budget, even from many threads; release on destruction or
// move; what a request costs; the default from the cgroup limit.
#include "server/runtime/memory_budget.h"

#include <atomic>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

TEST(MemoryBudgetTest, ReservesUpToTheBudgetAndReleases) {
  std::vector<int64_t> seen;
  MemoryBudget budget(100, [&](int64_t reserved) { seen.push_back(reserved); });
  auto a = budget.Reserve(60);
  ASSERT_TRUE(a.ok());
  auto b = budget.Reserve(41);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status(), absl::ResourceExhaustedError("memory budget: the request needs 41 bytes, 60 of 100 are "
                                                     "reserved"));
  auto c = budget.Reserve(40);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(budget.reserved_bytes(), 100);
  MemoryBudget::Reservation moved = std::move(*a);
  EXPECT_EQ(a->bytes(), 0);
  EXPECT_EQ(moved.bytes(), 60);
  moved.Release();
  EXPECT_EQ(budget.reserved_bytes(), 40);
  { MemoryBudget::Reservation dropped = std::move(*c); }
  EXPECT_EQ(budget.reserved_bytes(), 0);
  EXPECT_EQ(seen, (std::vector<int64_t>{60, 100, 40, 0}));
}

// A session append tops up what it holds (its request) to its whole cost: one reservation, released once.
TEST(MemoryBudgetTest, AbsorbHoldsBothAndReleasesTogether) {
  MemoryBudget budget(100);
  MemoryBudget::Reservation held;
  auto first = budget.Reserve(30);
  ASSERT_TRUE(first.ok());
  held.Absorb(std::move(*first));  // into an empty one: taken over
  EXPECT_EQ(held.bytes(), 30);
  auto rest = budget.Reserve(50);
  ASSERT_TRUE(rest.ok());
  held.Absorb(std::move(*rest));
  EXPECT_EQ(held.bytes(), 80);
  EXPECT_EQ(rest->bytes(), 0);
  held.Absorb(MemoryBudget::Reservation());  // nothing to take
  EXPECT_EQ(budget.reserved_bytes(), 80);
  held.Release();
  EXPECT_EQ(budget.reserved_bytes(), 0);
}

TEST(MemoryBudgetTest, ManyThreadsNeverExceedTheBudget) {
  MemoryBudget budget(1000);
  std::atomic<int64_t> peak{0};
  std::atomic<int> refused{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 2000; ++i) {
        auto r = budget.Reserve(1 + (t * 37 + i * 11) % 300);
        if (!r.ok()) {
          ++refused;
          continue;
        }
        int64_t now = budget.reserved_bytes(), old = peak.load();
        while (now > old && !peak.compare_exchange_weak(old, now)) {
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_LE(peak.load(), 1000);
  EXPECT_EQ(budget.reserved_bytes(), 0);
}

TEST(MemoryBudgetTest, RequestCostCoversRequestWorkspaceAndAnswerAsWritten) {
  const MhaConfig config{256, 4, 0, 0, true};
  ParsedAttention p;
  AttentionInputs in;
  p.inputs = &in;
  p.batch = 2;
  p.q_len = p.kv_len = 100;
  p.output_bytes = 2 * 100 * 256 * 4;
  p.weights_bytes = 2 * 100 * 100 * 4;
  const AnswerWire copied{DType::kFloat32, false}, in_place{DType::kFloat32, true}, bf16{DType::kBFloat16, true};
  const int64_t cost = RequestCostBytes(p, config, 4 << 20, 123456, copied);
  EXPECT_GE(cost, 123456 + 2 * p.answer_bytes() + (4 << 20));
  EXPECT_GE(cost - 123456 - 2 * p.answer_bytes() - (4 << 20), 4 * 200 * 256 * 3);  // inputs and QKV at least
  // Sent from the engine's tensors, the answer is held once; a BF16 answer is the tensors and a half-size copy.
  EXPECT_EQ(cost - RequestCostBytes(p, config, 4 << 20, 123456, in_place), p.answer_bytes());
  EXPECT_EQ(RequestCostBytes(p, config, 4 << 20, 123456, bf16) - RequestCostBytes(p, config, 4 << 20, 123456, in_place),
            p.answer_bytes() / 2);
  EXPECT_EQ(AnswerHeldBytes(1000, {DType::kFloat16, false}), 1500);
  EXPECT_EQ(AnswerHeldBytes(1000, in_place), 1000);
  EXPECT_EQ(AnswerHeldBytes(1000, copied), 2000);
}

TEST(MemoryBudgetTest, CgroupLimits) {
  EXPECT_EQ(MemoryLimitFromCgroup("max"), 0);
  EXPECT_EQ(MemoryLimitFromCgroup(""), 0);
  EXPECT_EQ(MemoryLimitFromCgroup("2147483648"), int64_t{2} << 30);
  EXPECT_EQ(MemoryLimitFromCgroup("9223372036854771712"), 0);  // cgroup v1's "no limit"
  EXPECT_EQ(MemoryLimitFromCgroup("junk"), 0);
  std::string source;
  EXPECT_GT(DefaultMemoryBudgetBytes(&source), 0);
  EXPECT_NE(source.find("half of"), std::string::npos) << source;
}

// A layer is weighed before it is built: what building it holds at its peak against what the process may
// still take.
TEST(MemoryBudgetTest, LayerFitsOrIsRefusedWithItsNumbers) {
  attnserve::v1::LayerConfig layer;
  layer.set_name("big");
  layer.set_embed_dim(1024);
  layer.set_num_heads(8);
  constexpr int64_t kE2 = 1024 * 1024;
  const int64_t weights = 4 * kE2 + 4 * 1024;  // floats: Q, K, V, out and the biases
  // The weights as loaded and the mapped pages they were read from; building holds less (the weights and the
  // fused QKV op: Q, K and V read it in place).
  const int64_t self_attention = 4 * 2 * weights;
  EXPECT_EQ(LayerBuildBytes(layer, 0), self_attention);
  // The file is mapped: a 1 GiB checkpoint costs the layer's tensors, not its size.
  EXPECT_EQ(LayerBuildBytes(layer, int64_t{1} << 30), self_attention);
  // A bf16 layer from a checkpoint reads its matrices into bf16: as loaded, its ops' copies (Q, K and V apart
  // too, in a blocked layout) and the pages of in_proj_weight mapped.
  layer.set_compute_dtype(attnserve::v1::LayerConfig::BFLOAT16);
  layer.set_weights_path("w.safetensors");
  EXPECT_EQ(LayerBuildBytes(layer, 0), 2 * 11 * kE2 + 4 * (3 * kE2 + 4 * 1024));
  layer.clear_compute_dtype();
  layer.clear_weights_path();
  layer.set_kdim(512);  // cross-attention: no fused QKV
  layer.set_vdim(256);
  const int64_t cross_weights = 1024 * (1024 + 512 + 256) + kE2 + 4 * 1024;
  EXPECT_EQ(LayerBuildBytes(layer, 0), 4 * 2 * cross_weights);
  layer.clear_kdim();
  layer.clear_vdim();
  {
    // Llama-like GQA: H=8 of D=128 over Hkv=2: q/k/v [(8+2+2)*128, 1024], o [1024, 1024].
    attnserve::v1::LayerConfig decoder = layer;
    decoder.set_kind(attnserve::v1::LayerConfig::DECODER_ATTENTION);
    decoder.mutable_decoder()->set_num_kv_heads(2);
    const int64_t qkv = 1024 * 12 * 128, o = kE2, biases = 12 * 128 + 1024;
    EXPECT_EQ(LayerBuildBytes(decoder, int64_t{1} << 30), 4 * (4 * qkv + 3 * o + 2 * biases));
    // BF16 from a checkpoint: read straight into bf16, so about a third of that. Seeded weights are f32.
    decoder.set_compute_dtype(attnserve::v1::LayerConfig::BFLOAT16);
    EXPECT_EQ(LayerBuildBytes(decoder, 0), 4 * (4 * qkv + 3 * o + 2 * biases));
    decoder.set_weights_path("model.safetensors.index.json");
    EXPECT_EQ(LayerBuildBytes(decoder, 0), 2 * (2 * (qkv + o) + o) + 4 * o + 4 * 2 * biases);
  }
  constexpr int64_t kMiB = 1 << 20;
  EXPECT_TRUE(CheckLayerFits(layer, 0, 1024 * kMiB, 100 * kMiB, 512 * kMiB).ok());
  // A request budget configured past half the limit is counted as half: layers stay loadable.
  EXPECT_TRUE(CheckLayerFits(layer, 0, 1024 * kMiB, 100 * kMiB, 4096 * kMiB).ok());
  const absl::Status refused = CheckLayerFits(layer, 0, 256 * kMiB, 100 * kMiB, 128 * kMiB);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  for (const std::string& part : {std::string("layer 'big'"), absl::StrCat(self_attention), absl::StrCat(256 * kMiB),
                                  absl::StrCat(100 * kMiB), absl::StrCat(128 * kMiB), std::string("leaving ")}) {
    EXPECT_NE(refused.message().find(part), std::string::npos) << part << " not in: " << refused;
  }
  // The largest layer the config allows (E = 32768: 17 GiB of weights) on a 24 GiB machine.
  layer.set_embed_dim(32768);
  EXPECT_EQ(CheckLayerFits(layer, 0, int64_t{24} << 30, 50 * kMiB, int64_t{12} << 30).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_GT(ProcessMemoryLimitBytes(nullptr), 0);
}

}  // namespace
}  // namespace attnserve
