// Parity with Hugging Face's decoder attention formulas: every case of tests/golden/decoder_cases.json
// (written by make_golden.py with PyTorch): the layer loaded from a three-layer checkpoint under its prefix,
// inputs and expected outputs from the .io.safetensors file.
#include <cstring>
#include <fstream>

#include "core/decoder_attention.h"
#include "core/safetensors.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/naive_decoder.h"

namespace attnserve {
namespace {

const char* kGoldenDir = "tests/golden/";

std::vector<nlohmann::json> LoadCases() {
  std::ifstream in(std::string(kGoldenDir) + "decoder_cases.json");
  return nlohmann::json::parse(in)["cases"].get<std::vector<nlohmann::json>>();
}

DecoderConfig ConfigOf(const nlohmann::json& c) {
  DecoderConfig config;
  config.embed_dim = c["E"];
  config.num_heads = c["H"];
  config.num_kv_heads = c["Hkv"];
  config.head_dim = c["D"];
  config.qkv_bias = c["qkv_bias"];
  config.o_bias = c["o_bias"];
  config.rope.theta = c["theta"];
  config.rope.rotary_dim = c["rotary_dim"];
  config.rope.interleaved = c["interleaved"];
  const nlohmann::json& s = c["scaling"];
  const std::string type = s["type"];
  config.rope.scaling = type == "LINEAR"   ? RopeOptions::Scaling::kLinear
                        : type == "LLAMA3" ? RopeOptions::Scaling::kLlama3
                                           : RopeOptions::Scaling::kNone;
  config.rope.factor = s.value("factor", 1.0);
  config.rope.low_freq_factor = s.value("low_freq_factor", 1.0);
  config.rope.high_freq_factor = s.value("high_freq_factor", 4.0);
  config.rope.original_max_position_embeddings = s.value("original_max_position_embeddings", 8192);
  config.sliding_window = c["window"];
  config.attn_logit_softcapping = c["softcap"];
  config.scaling = c["score_scale"];
  return config;
}

class DecoderGoldenTest : public ::testing::TestWithParam<nlohmann::json> {};

TEST_P(DecoderGoldenTest, MatchesHuggingFaceFormulas) {
  const nlohmann::json& c = GetParam();
  const std::string name = c["name"];
  DecoderAttention::Options options;
  options.config = ConfigOf(c);
  auto weights = LoadDecoderWeights(kGoldenDir + name + ".weights.safetensors", c["weights_prefix"], options.config);
  ASSERT_TRUE(weights.ok()) << weights.status();
  auto io = SafetensorsFile::Open(kGoldenDir + name + ".io.safetensors");
  ASSERT_TRUE(io.ok()) << io.status();
  const std::vector<float> query = *(*io)->ReadFloat32("query");
  DecoderInputs in;
  in.query = TensorView::F32(query.data(), (*io)->Find("query")->shape);
  in.position_offset = c["position_offset"];
  std::vector<int64_t> positions;
  if (const SafetensorsEntry* ids = (*io)->Find("position_ids")) {
    positions.resize(static_cast<size_t>(ids->num_elements()));
    std::memcpy(positions.data(), ids->data, ids->num_bytes);
    in.position_ids = TensorView::I64(positions.data(), ids->shape);
  }
  std::vector<uint8_t> bool_mask;
  std::vector<float> float_mask;
  if (const SafetensorsEntry* kpm = (*io)->Find("key_padding_mask")) {
    if (kpm->dtype == "BOOL") {
      bool_mask = *(*io)->ReadBool("key_padding_mask");
      in.key_padding_mask = TensorView::Bool(bool_mask.data(), kpm->shape);
    } else {
      float_mask = *(*io)->ReadFloat32("key_padding_mask");
      in.key_padding_mask = TensorView::F32(float_mask.data(), kpm->shape);
    }
  }
  in.need_weights = c["need_weights"];
  in.average_attn_weights = c["average"];
  // Small blocks as well as the default: query blocks and window bounds must not change the answer.
  for (int64_t block_bytes : {int64_t{2} << 20, int64_t{64}}) {
    options.scores_block_bytes = block_bytes;
    options.min_block_rows = 1;
    auto layer = DecoderAttention::Create(options, *weights);
    ASSERT_TRUE(layer.ok()) << layer.status();
    auto got = (*layer)->Forward(in);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->output.shape, (*io)->Find("output")->shape);
    EXPECT_LE(testing::MaxAbsDiff(got->output.values, *(*io)->ReadFloat32("output")), 1e-4) << block_bytes;
    if (in.need_weights) {
      EXPECT_EQ(got->attn_weights.shape, (*io)->Find("attn_weights")->shape);
      EXPECT_LE(testing::MaxAbsDiff(got->attn_weights.values, *(*io)->ReadFloat32("attn_weights")), 1e-5);
    }
  }
  // The float64 naive reference agrees with PyTorch too, so the two references back each other up.
  const testing::NaiveOutputs naive = testing::NaiveDecoderAttention(options.config, *weights, in);
  EXPECT_LE(testing::MaxAbsDiff(*(*io)->ReadFloat32("output"), naive.output), 2e-5);
}

INSTANTIATE_TEST_SUITE_P(HuggingFace, DecoderGoldenTest, ::testing::ValuesIn(LoadCases()),
                         [](const ::testing::TestParamInfo<nlohmann::json>& info) {
                           return info.param["name"].get<std::string>();
                         });

TEST(DecoderGoldenCasesTest, EveryFeatureHasACase) { EXPECT_GE(LoadCases().size(), 15u); }

}  // namespace
}  // namespace attnserve
