// LayerRegistry: versions published, replaced and removed while readers hold and use them. Readers run real
// forwards on the version they found and compare with that version's own answer, so a reader that saw a
// half-published or freed layer fails (and ThreadSanitizer sees the races, in make test-tsan).
#include "server/runtime/layer_registry.h"

#include <atomic>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "server/startup/server_config.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

v1::LayerConfig TinyLayer(const std::string& name, uint64_t seed) {
  v1::LayerConfig c;
  c.set_name(name);
  c.set_embed_dim(16);
  c.set_num_heads(2);
  c.set_seed(seed);
  EXPECT_TRUE(ApplyLayerDefaultsAndValidate(&c).ok());
  return c;
}

std::unique_ptr<ServedLayer> Load(const std::string& name, uint64_t seed) {
  auto layer = LoadLayer(TinyLayer(name, seed));
  EXPECT_TRUE(layer.ok()) << layer.status();
  return layer.ok() ? std::move(*layer) : nullptr;
}

TEST(LayerRegistryTest, CreateLoadsTheConfigInOrder) {
  v1::ServerConfig config;
  *config.add_layers() = TinyLayer("b", 1);
  *config.add_layers() = TinyLayer("a", 2);
  auto registry = LayerRegistry::Create(config);
  ASSERT_TRUE(registry.ok()) << registry.status();
  const auto layers = (*registry)->Layers();
  ASSERT_EQ(layers.size(), 2u);
  EXPECT_EQ(layers[0]->config.name(), "b");
  EXPECT_EQ(layers[1]->config.name(), "a");
  EXPECT_EQ(layers[0]->version, 1);
  EXPECT_EQ((*registry)->Find("a"), layers[1]);
  EXPECT_EQ((*registry)->Find("c"), nullptr);
}

// compute_dtype reaches both engines: BFLOAT16 layers compute in bf16 (f32 only where oneDNN has no bf16
// matmul), and answer within bf16 accuracy of the f32 layer built from the same seed.
TEST(LayerRegistryTest, ComputeDtypeReachesTheEngines) {
  for (auto kind : {v1::LayerConfig::MULTIHEAD_ATTENTION, v1::LayerConfig::DECODER_ATTENTION}) {
    v1::LayerConfig f32;
    f32.set_name("x");
    f32.set_embed_dim(16);
    f32.set_num_heads(2);
    f32.set_seed(3);
    f32.set_kind(kind);
    ASSERT_TRUE(ApplyLayerDefaultsAndValidate(&f32).ok());
    v1::LayerConfig bf16 = f32;
    bf16.set_compute_dtype(v1::LayerConfig::BFLOAT16);
    auto a = LoadLayer(f32), b = LoadLayer(bf16);
    ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
    const ComputeType want = OnednnBf16Support() == Bf16Support::kUnavailable ? ComputeType::kFloat32
                                                                              : ComputeType::kBFloat16;
    const bool decoder = kind == v1::LayerConfig::DECODER_ATTENTION;
    EXPECT_EQ(decoder ? (*b)->decoder->compute() : (*b)->engine->compute(), want);
    EXPECT_EQ(decoder ? (*a)->decoder->compute() : (*a)->engine->compute(), ComputeType::kFloat32);
    std::mt19937_64 rng(4);
    const std::vector<float> x = testing::RandomValues(rng, 5 * 16);
    std::vector<float> outs[2];
    for (int i = 0; i < 2; ++i) {
      const ServedLayer& layer = i == 0 ? **a : **b;
      absl::StatusOr<AttentionOutputs> out;
      if (decoder) {
        DecoderInputs in;
        in.query = TensorView::F32(x.data(), {5, 16});
        out = layer.decoder->Forward(in);
      } else {
        AttentionInputs in;
        in.query = TensorView::F32(x.data(), {5, 16});
        out = layer.engine->Forward(in);
      }
      ASSERT_TRUE(out.ok()) << out.status();
      outs[i] = out->output.values;
    }
    EXPECT_LE(testing::MaxAbsDiff(outs[0], outs[1]), 3e-2);
  }
}

TEST(LayerRegistryTest, CreateNamesTheLayerThatFailed) {
  v1::ServerConfig config;
  *config.add_layers() = TinyLayer("ok", 1);
  v1::LayerConfig bad = TinyLayer("broken", 2);
  bad.set_weights_path("/nonexistent/weights.safetensors");
  *config.add_layers() = bad;
  auto registry = LayerRegistry::Create(config);
  ASSERT_FALSE(registry.ok());
  EXPECT_NE(registry.status().message().find("layers[1] 'broken': "), absl::string_view::npos) << registry.status();
}

TEST(LayerRegistryTest, VersionsCountUpAndNeverRepeatAfterRemove) {
  LayerRegistry registry;
  EXPECT_EQ(registry.Publish(Load("x", 1)), 1);
  std::shared_ptr<const ServedLayer> v1 = registry.Find("x");
  EXPECT_EQ(registry.Publish(Load("x", 2)), 2);
  EXPECT_EQ(registry.Find("x")->version, 2);
  EXPECT_EQ(v1->version, 1);  // the holder keeps its version
  EXPECT_EQ(registry.Layers().size(), 1u);
  ASSERT_TRUE(registry.Remove("x").ok());
  EXPECT_EQ(registry.Find("x"), nullptr);
  EXPECT_EQ(registry.Remove("x").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(registry.Publish(Load("x", 3)), 3);
}

TEST(LayerRegistryTest, AVersionIsFreedWithItsLastHolder) {
  LayerRegistry registry;
  registry.Publish(Load("x", 1));
  std::shared_ptr<const ServedLayer> held = registry.Find("x");
  std::weak_ptr<const ServedLayer> watch = held;
  registry.Publish(Load("x", 2));
  EXPECT_FALSE(watch.expired());  // a request still holds version 1
  held.reset();
  EXPECT_TRUE(watch.expired());
  std::weak_ptr<const ServedLayer> second = registry.Find("x");
  ASSERT_TRUE(registry.Remove("x").ok());
  EXPECT_TRUE(second.expired());  // nobody held version 2
}

// What the memory guard moves its limit by: a layer's weights count from its load until its last holder lets
// go, whichever engine it has and whatever it computes in.
TEST(LayerRegistryTest, LiveLayerBytesCountEachVersionUntilItIsFreed) {
  const int64_t before = LiveLayerWeightBytes();
  LayerRegistry registry;
  registry.Publish(Load("x", 1));
  const int64_t one = LiveLayerWeightBytes() - before;
  EXPECT_EQ(one, 4 * 16 * 16 * 4);  // E=16 self-attention: four E x E f32 projections
  EXPECT_EQ(one, registry.Find("x")->engine->weight_bytes());
  std::shared_ptr<const ServedLayer> held = registry.Find("x");
  registry.Publish(Load("x", 2));
  EXPECT_EQ(LiveLayerWeightBytes() - before, 2 * one);
  ASSERT_TRUE(registry.Remove("x").ok());
  EXPECT_EQ(LiveLayerWeightBytes() - before, one);  // version 1 still answers a request
  held.reset();
  EXPECT_EQ(LiveLayerWeightBytes(), before);

  v1::LayerConfig decoder;  // GQA, in bf16 where this CPU has it
  decoder.set_name("d");
  decoder.set_embed_dim(16);
  decoder.set_num_heads(2);
  decoder.set_seed(3);
  decoder.set_kind(v1::LayerConfig::DECODER_ATTENTION);
  decoder.mutable_decoder()->set_num_kv_heads(1);
  decoder.set_compute_dtype(v1::LayerConfig::BFLOAT16);
  ASSERT_TRUE(ApplyLayerDefaultsAndValidate(&decoder).ok());
  {
    absl::StatusOr<std::unique_ptr<ServedLayer>> d = LoadLayer(decoder);
    ASSERT_TRUE(d.ok()) << d.status();
    const int64_t value_bytes = (*d)->decoder->compute() == ComputeType::kBFloat16 ? 2 : 4;
    // [E + 2 Hkv D, E] fused q/k/v (D = 8) and [E, E] out.
    EXPECT_EQ((*d)->decoder->weight_bytes(), ((16 + 2 * 8) * 16 + 16 * 16) * value_bytes);
    EXPECT_EQ(LiveLayerWeightBytes() - before, (*d)->decoder->weight_bytes());
    std::unique_ptr<ServedLayer> moved = std::move(*d);  // the count moves with the layer, once
    EXPECT_EQ(LiveLayerWeightBytes() - before, moved->decoder->weight_bytes());
  }
  EXPECT_EQ(LiveLayerWeightBytes(), before);
  v1::LayerConfig missing = TinyLayer("missing", 5);  // a failed load counts nothing
  missing.set_weights_path("/nonexistent/weights.safetensors");
  EXPECT_FALSE(LoadLayer(missing).ok());
  EXPECT_EQ(LiveLayerWeightBytes(), before);
}

TEST(LayerRegistryTest, KeepsMaxVersionsAndDropsTheOldest) {
  LayerRegistry registry;
  auto with_versions = [](uint64_t seed) {
    v1::LayerConfig c = TinyLayer("x", seed);
    c.set_max_versions(2);
    auto layer = LoadLayer(c);
    EXPECT_TRUE(layer.ok()) << layer.status();
    return std::move(*layer);
  };
  registry.Publish(with_versions(1));
  registry.Publish(with_versions(2));
  EXPECT_EQ(registry.Versions("x"), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(registry.Find("x", 1)->config.seed(), 1u);
  EXPECT_EQ(registry.Find("x")->version, 2);
  std::weak_ptr<const ServedLayer> first = registry.Find("x", 1);
  registry.Publish(with_versions(3));
  EXPECT_EQ(registry.Versions("x"), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(registry.Find("x", 1), nullptr);
  EXPECT_TRUE(first.expired());  // dropped and held by nobody: freed
  EXPECT_EQ(registry.Find("y", 1), nullptr);
  EXPECT_TRUE(registry.Versions("y").empty());
}

// Readers find and run the layer while a writer replaces it and removes and re-adds it: every reader's
// answer equals the answer of the version it holds (computed once per seed up front).
TEST(LayerRegistryTest, ReadersUseTheVersionTheyHoldWhileItChanges) {
  constexpr int kReaders = 3, kIterations = 60, kVersions = 4;
  std::mt19937_64 rng(5);
  const std::vector<float> query = testing::RandomValues(rng, 2 * 5 * 16);
  AttentionInputs in;
  in.query = TensorView::F32(query.data(), {2, 5, 16});
  std::vector<std::vector<float>> expected(kVersions + 1);  // by seed
  for (uint64_t seed = 1; seed <= kVersions; ++seed) {
    auto out = Load("x", seed)->engine->Forward(in, 1);
    ASSERT_TRUE(out.ok());
    expected[seed] = out->output.values;
  }
  LayerRegistry registry;
  registry.Publish(Load("x", 1));
  std::atomic<bool> stop{false};
  std::atomic<int> mismatches{0}, found{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < kReaders; ++r) {
    readers.emplace_back([&] {
      // Until the writer is done and this reader has used kIterations versions (bounded, should it hang).
      for (int used = 0, i = 0; (used < kIterations || !stop.load()) && i < 1'000'000; ++i) {
        std::shared_ptr<const ServedLayer> layer = registry.Find("x");
        if (layer == nullptr) {  // between a remove and the re-add
          std::this_thread::yield();
          continue;
        }
        ++used;
        ++found;
        auto out = layer->engine->Forward(in, 1);
        if (!out.ok() || testing::MaxAbsDiff(out->output.values, expected[layer->config.seed()]) > 1e-6) {
          ++mismatches;
        }
      }
    });
  }
  for (int round = 0; round < 20; ++round) {
    const uint64_t seed = 1 + round % kVersions;
    std::unique_ptr<ServedLayer> next = Load("x", seed);  // slow: built before the name goes away
    if (round % 5 == 4) {
      ASSERT_TRUE(registry.Remove("x").ok());
    }
    registry.Publish(std::move(next));
  }
  stop.store(true);
  for (std::thread& t : readers) t.join();
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_GE(found.load(), kReaders * kIterations);
}

}  // namespace
}  // namespace attnserve
