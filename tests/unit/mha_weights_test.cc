// Loading a PyTorch state_dict from .safetensors, and seeded initialisation.
#include "core/mha_weights.h"

#include <cmath>
#include <cstdio>
#include <random>

#include "common/half_float.h"
#include "core/multihead_attention.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_mha.h"
#include "tests/testing/safetensors_writer.h"

namespace attnserve {
namespace {

using testing::FloatTensor;
using testing::RandomValues;
using testing::TensorToWrite;

class MhaWeightsTest : public ::testing::Test {
 protected:
  std::string Write(const std::map<std::string, TensorToWrite>& tensors) {
    const std::string path = ::testing::TempDir() + "/weights_" + std::to_string(counter_++) + ".safetensors";
    EXPECT_TRUE(testing::WriteFile(path, testing::SerializeSafetensors(tensors)).ok());
    return path;
  }
  std::map<std::string, TensorToWrite> StateDict(const MhaConfig& c, const std::string& prefix,
                                                 const std::string& dtype = "F32") {
    const int64_t e = c.embed_dim;
    std::map<std::string, TensorToWrite> t;
    t[prefix + "in_proj_weight"] = FloatTensor(RandomValues(rng_, 3 * e * e), {3 * e, e}, dtype);
    t[prefix + "out_proj.weight"] = FloatTensor(RandomValues(rng_, e * e), {e, e}, dtype);
    if (c.bias) {
      t[prefix + "in_proj_bias"] = FloatTensor(RandomValues(rng_, 3 * e), {3 * e}, dtype);
      t[prefix + "out_proj.bias"] = FloatTensor(RandomValues(rng_, e), {e}, dtype);
    }
    return t;
  }
  std::mt19937_64 rng_{99};
  int counter_ = 0;
};

TEST_F(MhaWeightsTest, LoadsFusedInProjWithPrefix) {
  MhaConfig c{8, 2, 0, 0, true};
  const std::string prefix = "encoder.layers.0.self_attn.";
  auto dict = StateDict(c, prefix);
  dict["encoder.layers.0.linear1.weight"] = FloatTensor(RandomValues(rng_, 4), {2, 2});  // outside prefix
  auto w = LoadMhaWeights(Write(dict), prefix, c);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_TRUE(w->CheckShapes(c).ok());
  EXPECT_EQ(w->k_proj_weight.size(), 64u);
}

TEST_F(MhaWeightsTest, LoadsSeparateProjectionsForKdimVdim) {
  MhaConfig c{8, 2, 5, 3, true};
  std::map<std::string, TensorToWrite> t;
  const auto q = RandomValues(rng_, 64), k = RandomValues(rng_, 40), v = RandomValues(rng_, 24);
  t["q_proj_weight"] = FloatTensor(q, {8, 8});
  t["k_proj_weight"] = FloatTensor(k, {8, 5});
  t["v_proj_weight"] = FloatTensor(v, {8, 3});
  t["in_proj_bias"] = FloatTensor(RandomValues(rng_, 24), {24});
  t["out_proj.weight"] = FloatTensor(RandomValues(rng_, 64), {8, 8});
  t["out_proj.bias"] = FloatTensor(RandomValues(rng_, 8), {8});
  auto w = LoadMhaWeights(Write(t), "", c);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->k_proj_weight, k);
  EXPECT_EQ(w->v_proj_weight, v);
}

TEST_F(MhaWeightsTest, HalfAndBFloat16AreKeptAsF32) {
  MhaConfig c{8, 2, 0, 0, false};
  for (const char* dtype : {"F16", "BF16"}) {
    auto w = LoadMhaWeights(Write(StateDict(c, "", dtype)), "", c);
    ASSERT_TRUE(w.ok()) << dtype << ": " << w.status();
    EXPECT_EQ(w->out_proj_weight.size(), 64u);
  }
}

// A layer computing in bf16 reads a checkpoint's matrices into bf16 (a BF16 one as stored, with no f32 copy; an
// F32 one rounded), fused or as separate q/k/v tensors, and builds the same layer as from f32 weights: with
// Dh = 16, 1/sqrt(Dh) is a power of 2, so even Wq's rescaling is exact and the outputs are equal bit for bit.
TEST_F(MhaWeightsTest, ABFloat16LayerReadsItsCheckpointIntoBf16) {
  MhaConfig c{64, 4, 0, 0, true};
  for (const char* dtype : {"BF16", "F32"}) {
    for (const bool fused : {true, false}) {
      std::map<std::string, TensorToWrite> dict = StateDict(c, "", dtype);
      if (!fused) {
        const std::vector<float> in_proj = RandomValues(rng_, 3 * 64 * 64);
        dict.erase("in_proj_weight");
        for (int p = 0; p < 3; ++p) {
          const std::vector<float> part(in_proj.begin() + p * 64 * 64, in_proj.begin() + (p + 1) * 64 * 64);
          dict[std::string("qkv").substr(p, 1) + "_proj_weight"] = FloatTensor(part, {64, 64}, dtype);
        }
      }
      const std::string path = Write(dict);
      const std::string what = std::string(dtype) + (fused ? ", fused" : ", q/k/v apart");
      absl::StatusOr<MhaWeights> as_bf16 = LoadMhaWeights(path, "", c, ComputeType::kBFloat16);
      absl::StatusOr<MhaWeights> as_f32 = LoadMhaWeights(path, "", c);
      ASSERT_TRUE(as_bf16.ok() && as_f32.ok()) << what << ": " << as_bf16.status() << " " << as_f32.status();
      ASSERT_TRUE(as_bf16->bf16()) << what;
      EXPECT_TRUE(as_bf16->q_proj_weight.empty() && as_bf16->out_proj_weight.empty()) << what;
      ASSERT_TRUE(as_bf16->CheckShapes(c).ok()) << what;
      std::vector<float> qkv = as_f32->q_proj_weight;
      qkv.insert(qkv.end(), as_f32->k_proj_weight.begin(), as_f32->k_proj_weight.end());
      qkv.insert(qkv.end(), as_f32->v_proj_weight.begin(), as_f32->v_proj_weight.end());
      for (size_t i = 0; i < qkv.size(); ++i) {
        ASSERT_EQ(as_bf16->in_proj_weight_bf16[i], FloatToBFloat16(qkv[i])) << what << ", element " << i;
      }
      MultiheadAttention::Options o;
      o.config = c;
      o.compute = ComputeType::kBFloat16;
      auto from_bf16 = MultiheadAttention::Create(o, *as_bf16);
      auto from_f32 = MultiheadAttention::Create(o, *as_f32);
      ASSERT_TRUE(from_bf16.ok() && from_f32.ok()) << what;
      const std::vector<float> x = RandomValues(rng_, 2 * 24 * 64);
      AttentionInputs in;
      in.query = TensorView::F32(x.data(), {2, 24, 64});
      auto a = (*from_bf16)->Forward(in, 1);
      auto b = (*from_f32)->Forward(in, 1);
      ASSERT_TRUE(a.ok() && b.ok()) << what;
      EXPECT_EQ(a->output.values, b->output.values) << what;
      EXPECT_EQ((*from_bf16)->weight_bytes(), (*from_f32)->weight_bytes()) << what;
    }
  }
}

TEST_F(MhaWeightsTest, RefusalsNameTheTensor) {
  MhaConfig c{8, 2, 0, 0, true};
  struct Bad {
    std::function<void(std::map<std::string, TensorToWrite>&)> edit;
    std::string expect;
  };
  const std::vector<Bad> cases = {
      {[&](auto& t) { t["bias_k"] = FloatTensor(RandomValues(rng_, 8), {1, 1, 8}); }, "add_bias_kv"},
      {[&](auto& t) { t["bias_v"] = FloatTensor(RandomValues(rng_, 8), {1, 1, 8}); }, "bias_v"},
      {[&](auto& t) { t.erase("out_proj.bias"); }, "'out_proj.bias' is missing"},
      {[&](auto& t) { t["in_proj_weight"] = FloatTensor(RandomValues(rng_, 16 * 8), {16, 8}); },
       "'in_proj_weight' has shape [16, 8], expected [24, 8]"},
      {[&](auto& t) { t["surprise"] = FloatTensor(RandomValues(rng_, 2), {2}); }, "unexpected tensor 'surprise'"},
      {[&](auto& t) {
         t["out_proj.weight"] = TensorToWrite{"I32", {8, 8}, std::vector<uint8_t>(256, 1)};
       },
       "out_proj.weight"},
  };
  for (const Bad& bad : cases) {
    auto dict = StateDict(c, "");
    bad.edit(dict);
    auto w = LoadMhaWeights(Write(dict), "", c);
    ASSERT_FALSE(w.ok()) << bad.expect;
    EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(w.status().message().find(bad.expect), std::string::npos) << w.status();
  }
  // Bias tensors for a layer configured without bias.
  MhaConfig nobias = c;
  nobias.bias = false;
  auto w = LoadMhaWeights(Write(StateDict(c, "")), "", nobias);
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("without bias"), std::string::npos) << w.status();
  // Missing file.
  EXPECT_EQ(LoadMhaWeights("/nonexistent/w.safetensors", "", c).status().code(), absl::StatusCode::kNotFound);
}

TEST(RandomMhaWeightsTest, DeterministicXavierBoundsZeroBias) {
  MhaConfig c{64, 4, 0, 0, true};
  const MhaWeights a = RandomMhaWeights(c, 7), b = RandomMhaWeights(c, 7), d = RandomMhaWeights(c, 8);
  EXPECT_EQ(a.q_proj_weight, b.q_proj_weight);
  EXPECT_EQ(a.out_proj_weight, b.out_proj_weight);
  EXPECT_NE(a.q_proj_weight, d.q_proj_weight);
  EXPECT_TRUE(a.CheckShapes(c).ok());
  const float bound = std::sqrt(6.0f / (64 + 3 * 64));
  float max_abs = 0;
  for (float w : a.k_proj_weight) max_abs = std::max(max_abs, std::fabs(w));
  EXPECT_LE(max_abs, bound);
  EXPECT_GT(max_abs, 0.9f * bound);  // really spread over the range
  for (float w : a.out_proj_weight) EXPECT_LE(std::fabs(w), 1.0f / 8.0f);
  for (float x : a.in_proj_bias) EXPECT_EQ(x, 0.0f);
  // A layer built from them runs.
  MultiheadAttention::Options options;
  options.config = c;
  EXPECT_TRUE(MultiheadAttention::Create(options, a).ok());
}

}  // namespace
}  // namespace attnserve
