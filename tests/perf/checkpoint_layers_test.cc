// A Llama-3-8B-sized attention stack as checkpoints ship it: 32 layers of E=4096, H=32 over Hkv=8 (D=128),
// BF16, in one 2.5 GiB shard with its model.safetensors.index.json. Loading layer 17 alone raises the peak
// RSS by at most that layer's f32 size + 64 MiB (the file is mapped; each tensor's pages are dropped once
// converted); a BF16 layer built from it (read straight into bf16) at most its bf16 size + 64 MiB; loading all
// 32 through the index gives every value exactly. Measures memory, not time.
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/decoder_attention.h"
#include "core/decoder_weights.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace attnserve {
namespace {

constexpr int kLayers = 32;
constexpr int64_t kE = 4096, kH = 32, kHkv = 8, kD = 128;

struct TensorSpec {
  std::string name;
  int64_t rows, cols;
};

std::vector<TensorSpec> LayerTensors(int layer) {
  const std::string p = absl::StrCat("model.layers.", layer, ".self_attn.");
  return {{p + "q_proj.weight", kH * kD, kE},
          {p + "k_proj.weight", kHkv * kD, kE},
          {p + "v_proj.weight", kHkv * kD, kE},
          {p + "o_proj.weight", kE, kH * kD}};
}

// Exactly representable in BF16: k / 256 for |k| <= 255, from a hash of (tensor, index).
float Pattern(uint32_t tensor, uint64_t i) {
  const uint64_t h = (i * 0x9E3779B97F4A7C15ull + tensor * 0xD1B54A32D192ED03ull) >> 40;
  return static_cast<float>(static_cast<int64_t>(h % 511) - 255) / 256.0f;
}

uint16_t ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>(bits >> 16);  // exact for the pattern's values
}

// The shard, written tensor by tensor (never whole in memory), and the index naming it for every tensor.
std::string WriteCheckpoint(const std::string& dir) {
  nlohmann::json header = nlohmann::json::object(), weight_map = nlohmann::json::object();
  int64_t offset = 0;
  std::vector<TensorSpec> all;
  for (int l = 0; l < kLayers; ++l) {
    for (const TensorSpec& t : LayerTensors(l)) {
      const int64_t bytes = t.rows * t.cols * 2;
      header[t.name] = {{"dtype", "BF16"}, {"shape", {t.rows, t.cols}}, {"data_offsets", {offset, offset + bytes}}};
      weight_map[t.name] = "model-00001-of-00001.safetensors";
      offset += bytes;
      all.push_back(t);
    }
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::ofstream out(dir + "/model-00001-of-00001.safetensors", std::ios::binary);
  const uint64_t n = text.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  std::vector<uint16_t> buf;
  for (size_t t = 0; t < all.size(); ++t) {
    buf.resize(static_cast<size_t>(all[t].rows * all[t].cols));
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = ToBf16(Pattern(static_cast<uint32_t>(t), i));
    out.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(buf.size() * 2));
  }
  std::ofstream(dir + "/model.safetensors.index.json")
      << nlohmann::json{{"metadata", {{"total_size", offset}}}, {"weight_map", weight_map}}.dump();
  return dir + "/model.safetensors.index.json";
}

int64_t StatusKiB(const std::string& key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) return std::stoll(line.substr(key.size() + 1));
  }
  return -1;
}

DecoderConfig LlamaAttention() {
  DecoderConfig c;
  c.embed_dim = kE;
  c.num_heads = kH;
  c.num_kv_heads = kHkv;
  c.head_dim = kD;
  c.rope.rotary_dim = kD;
  return c;
}

class CheckpointLayersTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(absl::StrCat(::testing::TempDir(), "/checkpoint_layers_", getpid()));
    std::filesystem::create_directories(*dir_);
    index_ = new std::string(WriteCheckpoint(*dir_));
  }
  static void TearDownTestSuite() {
    std::filesystem::remove_all(*dir_);
    delete dir_;
    delete index_;
  }
  static std::string* dir_;
  static std::string* index_;
};
std::string* CheckpointLayersTest::dir_ = nullptr;
std::string* CheckpointLayersTest::index_ = nullptr;

TEST_F(CheckpointLayersTest, OneLayerOfAMultiGiBShardCostsThatLayer) {
  const std::string shard = *dir_ + "/model-00001-of-00001.safetensors";
  ASSERT_GT(std::filesystem::file_size(shard), uint64_t{2} << 30);
  // Reset the peak to the current RSS (Linux: clear_refs 5), then load layer 17 alone.
  std::ofstream("/proc/self/clear_refs") << "5";
  const int64_t before_kib = StatusKiB("VmRSS");
  auto weights = LoadDecoderWeights(shard, "model.layers.17.self_attn.", LlamaAttention());
  ASSERT_TRUE(weights.ok()) << weights.status();
  const int64_t peak_growth = (StatusKiB("VmHWM") - before_kib) * 1024;
  const int64_t layer_bytes = 4 * (2 * kH * kD * kE + 2 * kHkv * kD * kE);  // f32
  std::cout << "layer 17: " << (layer_bytes >> 20) << " MiB of f32 weights, peak RSS grew "
            << (peak_growth >> 20) << " MiB\n";
  RecordProperty("peak_growth_mib", static_cast<int>(peak_growth >> 20));
  EXPECT_LE(peak_growth, layer_bytes + (int64_t{64} << 20));
  EXPECT_EQ(weights->q_proj_weight[12345], Pattern(17 * 4 + 0, 12345));
}

// What a BF16 layer costs to build from the shard: its matrices read straight into bf16 (no f32 copy), each freed
// once its oneDNN op holds it.
TEST_F(CheckpointLayersTest, Bf16LayerOfAMultiGiBShardCostsItsBf16Size) {
  const std::string shard = *dir_ + "/model-00001-of-00001.safetensors";
  std::ofstream("/proc/self/clear_refs") << "5";
  const int64_t before_kib = StatusKiB("VmRSS");
  auto weights = LoadDecoderWeights(shard, "model.layers.17.self_attn.", LlamaAttention(), ComputeType::kBFloat16);
  ASSERT_TRUE(weights.ok()) << weights.status();
  EXPECT_EQ(weights->qkv_proj_weight_bf16[12345], ToBf16(Pattern(17 * 4 + 0, 12345)));
  EXPECT_EQ(weights->o_proj_weight_bf16[54321], ToBf16(Pattern(17 * 4 + 3, 54321)));
  DecoderAttention::Options options;
  options.config = LlamaAttention();
  options.compute = ComputeType::kBFloat16;
  auto layer = DecoderAttention::Create(options, std::move(*weights));
  ASSERT_TRUE(layer.ok()) << layer.status();
  const int64_t peak_growth = (StatusKiB("VmHWM") - before_kib) * 1024;
  const int64_t held = (StatusKiB("VmRSS") - before_kib) * 1024;
  const int64_t layer_bytes = 2 * (2 * kH * kD * kE + 2 * kHkv * kD * kE);  // bf16
  std::cout << "layer 17 in BF16: " << (layer_bytes >> 20) << " MiB of bf16 weights, peak RSS grew "
            << (peak_growth >> 20) << " MiB, " << (held >> 20) << " MiB held after building\n";
  RecordProperty("bf16_peak_growth_mib", static_cast<int>(peak_growth >> 20));
  EXPECT_LE(peak_growth, layer_bytes + (int64_t{64} << 20));
  EXPECT_LE(held, layer_bytes + (int64_t{16} << 20));
}

TEST_F(CheckpointLayersTest, EveryLayerThroughTheIndexIsExact) {
  for (int l = 0; l < kLayers; ++l) {
    auto weights = LoadDecoderWeights(*index_, absl::StrCat("model.layers.", l, ".self_attn."), LlamaAttention());
    ASSERT_TRUE(weights.ok()) << weights.status();
    const std::vector<float>* tensors[] = {&weights->q_proj_weight, &weights->k_proj_weight, &weights->v_proj_weight,
                                           &weights->o_proj_weight};
    for (uint32_t t = 0; t < 4; ++t) {
      const std::vector<float>& v = *tensors[t];
      size_t wrong = 0;
      for (size_t i = 0; i < v.size(); ++i) wrong += v[i] != Pattern(static_cast<uint32_t>(l * 4) + t, i);
      ASSERT_EQ(wrong, 0u) << "layer " << l << " tensor " << t;
    }
  }
}

}  // namespace
}  // namespace attnserve
