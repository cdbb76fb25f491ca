// SafetensorsCheckpoint: one file, or a sharded checkpoint through its index; shards opened on first use,
// index errors named; and a mapped file: reading one layer of a large shard touches that layer's pages only.
#include "core/safetensors_checkpoint.h"

#include <stdlib.h>

#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/testing/safetensors_writer.h"

namespace attnserve {
namespace {

using testing::FloatTensor;
using testing::SerializeSafetensors;
using testing::TensorToWrite;

std::string MakeDir() {
  std::string pattern = ::testing::TempDir() + "/checkpoint_XXXXXX";
  const char* dir = mkdtemp(pattern.data());
  EXPECT_NE(dir, nullptr);
  return dir == nullptr ? "" : std::string(dir);
}

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// Two shards of two layers each, and their index.
struct Sharded {
  std::string dir, index;
  std::map<std::string, std::vector<float>> values;
};

Sharded WriteSharded() {
  Sharded s;
  s.dir = MakeDir();
  std::string weight_map;
  for (int shard = 0; shard < 2; ++shard) {
    std::map<std::string, TensorToWrite> tensors;
    for (int layer = 2 * shard; layer < 2 * shard + 2; ++layer) {
      const std::string name = absl::StrCat("model.layers.", layer, ".self_attn.q_proj.weight");
      s.values[name] = Random(12, 100 + layer);
      tensors[name] = FloatTensor(s.values[name], {3, 4}, layer % 2 == 0 ? "F32" : "BF16");
      absl::StrAppend(&weight_map, weight_map.empty() ? "" : ", ", "\"", name, "\": \"model-0000", shard + 1,
                      "-of-00002.safetensors\"");
    }
    EXPECT_TRUE(testing::WriteFile(absl::StrCat(s.dir, "/model-0000", shard + 1, "-of-00002.safetensors"),
                                   SerializeSafetensors(tensors))
                    .ok());
  }
  s.index = s.dir + "/model.safetensors.index.json";
  WriteText(s.index, absl::StrCat("{\"metadata\": {\"total_size\": 96}, \"weight_map\": {", weight_map, "}}"));
  return s;
}

TEST(SafetensorsCheckpointTest, ReadsEveryTensorThroughTheIndex) {
  const Sharded s = WriteSharded();
  auto checkpoint = SafetensorsCheckpoint::Open(s.index);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_EQ((*checkpoint)->Names().size(), 4u);
  for (const auto& [name, want] : s.values) {
    auto got = (*checkpoint)->ReadFloat32(name);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->size(), want.size());
    const bool bf16 = name.find("layers.1.") != std::string::npos || name.find("layers.3.") != std::string::npos;
    for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR((*got)[i], want[i], bf16 ? 1e-2 * std::abs(want[i]) : 0.0f);
  }
  auto missing = (*checkpoint)->Find("model.layers.9.self_attn.q_proj.weight");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsCheckpointTest, ShardsOpenOnFirstUse) {
  Sharded s = WriteSharded();
  // The second shard is gone: the first one's tensors still read; the second's name the missing file.
  ASSERT_EQ(std::remove((s.dir + "/model-00002-of-00002.safetensors").c_str()), 0);
  auto checkpoint = SafetensorsCheckpoint::Open(s.index);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_TRUE((*checkpoint)->ReadFloat32("model.layers.0.self_attn.q_proj.weight").ok());
  auto gone = (*checkpoint)->ReadFloat32("model.layers.2.self_attn.q_proj.weight");
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(gone.status().message().find("model-00002-of-00002.safetensors"), std::string::npos) << gone.status();
}

TEST(SafetensorsCheckpointTest, BadIndexesAreRefusedWithTheReason) {
  const std::string dir = MakeDir();
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"[1, 2]", "not a JSON object"},
      {"{\"metadata\": {}}", "no \"weight_map\""},
      {"{\"weight_map\": {\"a\": 3}}", "is not a string"},
      {"{\"weight_map\": {\"a\": \"/etc/passwd\"}}", "leaves the index's folder"},
      {"{\"weight_map\": {\"a\": \"../x.safetensors\"}}", "leaves the index's folder"},
      {"{\"weight_map\": {\"a\": \"\"}}", "leaves the index's folder"},
      {"not json", "not a JSON object"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string path = absl::StrCat(dir, "/bad", i, ".safetensors.index.json");
    WriteText(path, cases[i].first);
    auto opened = SafetensorsCheckpoint::Open(path);
    ASSERT_FALSE(opened.ok()) << cases[i].first;
    EXPECT_EQ(opened.status().code(), absl::StatusCode::kInvalidArgument) << cases[i].first;
    EXPECT_NE(opened.status().message().find(cases[i].second), std::string::npos) << opened.status();
    EXPECT_NE(opened.status().message().find(path), std::string::npos) << opened.status();
  }
  EXPECT_EQ(SafetensorsCheckpoint::Open(dir + "/none.safetensors.index.json").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(SafetensorsCheckpointTest, AnIndexThatPutsATensorInTheWrongShard) {
  Sharded s = WriteSharded();
  WriteText(s.index, "{\"weight_map\": {\"model.layers.0.self_attn.q_proj.weight\": "
                     "\"model-00002-of-00002.safetensors\"}}");
  auto checkpoint = SafetensorsCheckpoint::Open(s.index);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto wrong = (*checkpoint)->Find("model.layers.0.self_attn.q_proj.weight");
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.status().message().find("does not hold it"), std::string::npos) << wrong.status();
}

// A mapped file: resident pages grow by the tensor read, not by the file (mincore-free check: the RSS of
// this process, from /proc/self/statm, before and after reading one 4 MiB tensor of a 256 MiB file).
int64_t ResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * 4096;
}

TEST(SafetensorsCheckpointTest, ReadingOneTensorOfALargeFileTouchesThatTensor) {
  const std::string dir = MakeDir();
  const std::string path = dir + "/large.safetensors";
  {
    std::map<std::string, TensorToWrite> tensors;
    for (int i = 0; i < 64; ++i) {
      tensors[absl::StrCat("t", i)] = TensorToWrite{"F32", {1 << 20}, std::vector<uint8_t>(4 << 20, 1)};
    }
    ASSERT_TRUE(testing::WriteFile(path, SerializeSafetensors(tensors)).ok());
  }
  const int64_t before = ResidentBytes();
  auto checkpoint = SafetensorsCheckpoint::Open(path);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto values = (*checkpoint)->ReadFloat32("t17");
  ASSERT_TRUE(values.ok()) << values.status();
  const int64_t grown = ResidentBytes() - before;
  // The 4 MiB read, its 4 MiB f32 copy, the header and slack; reading the whole file would be 256 MiB.
  EXPECT_LT(grown, int64_t{32} << 20) << "resident memory grew " << (grown >> 20) << " MiB";
}

}  // namespace
}  // namespace attnserve
