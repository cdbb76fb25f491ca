// Parity with PyTorch: every case of tests/golden/cases.json (written by make_golden.py with PyTorch),
// weights loaded from the saved state_dict, inputs and expected outputs from the .io.safetensors file.
#include <fstream>

#include "core/mha_weights.h"
#include "core/multihead_attention.h"
#include "core/safetensors.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

const char* kGoldenDir = "tests/golden/";

std::vector<nlohmann::json> LoadCases() {
  std::ifstream in(std::string(kGoldenDir) + "cases.json");
  return nlohmann::json::parse(in)["cases"].get<std::vector<nlohmann::json>>();
}

// Holds a mask's decoded values so the view stays valid.
struct LoadedMask {
  std::vector<uint8_t> bools;
  std::vector<float> floats;
};

TensorView LoadMask(const SafetensorsFile& io, const std::string& name, LoadedMask& storage) {
  const SafetensorsEntry* entry = io.Find(name);
  if (entry == nullptr) return {};
  if (entry->dtype == "BOOL") {
    storage.bools = *io.ReadBool(name);
    return TensorView::Bool(storage.bools.data(), entry->shape);
  }
  storage.floats = *io.ReadFloat32(name);
  return TensorView::F32(storage.floats.data(), entry->shape);
}

class GoldenTest : public ::testing::TestWithParam<nlohmann::json> {};

TEST_P(GoldenTest, MatchesPyTorch) {
  const nlohmann::json& c = GetParam();
  const std::string name = c["name"];
  MhaConfig config;
  config.embed_dim = c["embed_dim"];
  config.num_heads = c["num_heads"];
  config.kdim = c["kdim"];
  config.vdim = c["vdim"];
  config.bias = c["bias"];
  auto weights = LoadMhaWeights(kGoldenDir + name + ".weights.safetensors", c["weights_prefix"], config);
  ASSERT_TRUE(weights.ok()) << weights.status();
  MultiheadAttention::Options options;
  options.config = config;
  auto layer = MultiheadAttention::Create(options, *weights);
  ASSERT_TRUE(layer.ok()) << layer.status();

  auto io = SafetensorsFile::Open(kGoldenDir + name + ".io.safetensors");
  ASSERT_TRUE(io.ok()) << io.status();
  const std::vector<float> query = *(*io)->ReadFloat32("query");
  std::vector<float> key, value;
  AttentionInputs in;
  in.query = TensorView::F32(query.data(), (*io)->Find("query")->shape);
  if (!c["self_attention"].get<bool>()) {
    key = *(*io)->ReadFloat32("key");
    value = *(*io)->ReadFloat32("value");
    in.key = TensorView::F32(key.data(), (*io)->Find("key")->shape);
    in.value = TensorView::F32(value.data(), (*io)->Find("value")->shape);
  }
  LoadedMask kpm, am;
  in.key_padding_mask = LoadMask(**io, "key_padding_mask", kpm);
  in.attn_mask = LoadMask(**io, "attn_mask", am);
  in.is_causal = c["is_causal"];
  in.need_weights = c["need_weights"];
  in.average_attn_weights = c["average_attn_weights"];

  auto got = (*layer)->Forward(in);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->output.shape, (*io)->Find("output")->shape);
  EXPECT_LE(testing::MaxAbsDiff(got->output.values, *(*io)->ReadFloat32("output")), 1e-4);
  if (in.need_weights) {
    EXPECT_EQ(got->attn_weights.shape, (*io)->Find("attn_weights")->shape);
    EXPECT_LE(testing::MaxAbsDiff(got->attn_weights.values, *(*io)->ReadFloat32("attn_weights")), 1e-5);
  }
  // The naive float64 reference agrees with PyTorch too, so the two references back each other up.
  const testing::NaiveOutputs naive = testing::NaiveMultiheadAttention(config, *weights, in);
  std::vector<float> expected = *(*io)->ReadFloat32("output");
  EXPECT_LE(testing::MaxAbsDiff(expected, naive.output), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(PyTorch, GoldenTest, ::testing::ValuesIn(LoadCases()),
                         [](const ::testing::TestParamInfo<nlohmann::json>& info) {
                           return info.param["name"].get<std::string>();
                         });

TEST(GoldenCasesTest, AtLeastTwelveCases) { EXPECT_GE(LoadCases().size(), 12u); }

}  // namespace
}  // namespace attnserve
