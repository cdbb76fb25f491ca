#include "core/mha_weights.h"

#include <cmath>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/safetensors_checkpoint.h"
#include "common/status_macros.h"
#include "core/seeded_uniform.h"
#include "core/tensor.h"

namespace attnserve {
namespace {

template <typename T>
absl::Status CheckSize(const std::vector<T>& values, size_t expected, const char* name) {
  if (values.size() == expected) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("weight '", name, "' has ", values.size(), " values, expected ", expected));
}

// in_proj_weight [3E, E] as bf16: the fused tensor, or q_proj_weight, k_proj_weight and v_proj_weight stacked.
absl::StatusOr<std::vector<uint16_t>> ReadInProjBf16(const SafetensorsCheckpoint& file, const std::string& prefix,
                                                     int64_t e) {
  if (file.Find(prefix + "in_proj_weight").ok()) return file.ReadShapedBFloat16(prefix + "in_proj_weight", {3 * e, e});
  std::vector<uint16_t> fused;
  fused.reserve(static_cast<size_t>(3 * e * e));
  for (const char* name : {"q_proj_weight", "k_proj_weight", "v_proj_weight"}) {
    ATTN_ASSIGN_OR_RETURN(std::vector<uint16_t> part, file.ReadShapedBFloat16(prefix + name, {e, e}));
    fused.insert(fused.end(), part.begin(), part.end());
  }
  return fused;
}

}  // namespace

absl::Status MhaWeights::CheckShapes(const MhaConfig& config) const {
  const size_t e = config.embed_dim;
  if (bf16()) {
    if (!config.same_qkv_dim()) return absl::InvalidArgumentError("bf16 weights need kdim == vdim == embed_dim");
    ATTN_RETURN_IF_ERROR(CheckSize(in_proj_weight_bf16, 3 * e * e, "in_proj_weight"));
    ATTN_RETURN_IF_ERROR(CheckSize(out_proj_weight_bf16, e * e, "out_proj.weight"));
    ATTN_RETURN_IF_ERROR(CheckSize(in_proj_bias, config.bias ? 3 * e : 0, "in_proj_bias"));
    return CheckSize(out_proj_bias, config.bias ? e : 0, "out_proj.bias");
  }
  ATTN_RETURN_IF_ERROR(CheckSize(q_proj_weight, e * e, "q_proj_weight"));
  ATTN_RETURN_IF_ERROR(CheckSize(k_proj_weight, e * config.key_dim(), "k_proj_weight"));
  ATTN_RETURN_IF_ERROR(CheckSize(v_proj_weight, e * config.value_dim(), "v_proj_weight"));
  ATTN_RETURN_IF_ERROR(CheckSize(out_proj_weight, e * e, "out_proj.weight"));
  ATTN_RETURN_IF_ERROR(CheckSize(in_proj_bias, config.bias ? 3 * e : 0, "in_proj_bias"));
  ATTN_RETURN_IF_ERROR(CheckSize(out_proj_bias, config.bias ? e : 0, "out_proj.bias"));
  return absl::OkStatus();
}

absl::StatusOr<MhaWeights> LoadMhaWeights(const std::string& path, const std::string& prefix, const MhaConfig& config,
                                          ComputeType weights) {
  ATTN_RETURN_IF_ERROR(config.Validate());
  ATTN_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsCheckpoint> file, SafetensorsCheckpoint::Open(path));
  const int64_t e = config.embed_dim;

  // Every tensor under the prefix must be one we know: a stray one means the config does not describe the
  // layer that was saved.
  for (const std::string& name : file->Names()) {
    if (!absl::StartsWith(name, prefix)) continue;
    const std::string local = name.substr(prefix.size());
    if (local == "bias_k" || local == "bias_v") {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tensor '", name, "' comes from add_bias_kv=True, which attnserve does not support"));
    }
    const bool known = local == "in_proj_weight" || local == "q_proj_weight" || local == "k_proj_weight" ||
                       local == "v_proj_weight" || local == "out_proj.weight" ||
                       (config.bias && (local == "in_proj_bias" || local == "out_proj.bias"));
    if (!known) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": unexpected tensor '", name, "' for a layer with ", config.DebugString(),
          local == "in_proj_bias" || local == "out_proj.bias" ? " (the layer is configured without bias)" : ""));
    }
  }

  MhaWeights w;
  if (weights == ComputeType::kBFloat16 && config.same_qkv_dim()) {
    ATTN_ASSIGN_OR_RETURN(w.in_proj_weight_bf16, ReadInProjBf16(*file, prefix, e));
    ATTN_ASSIGN_OR_RETURN(w.out_proj_weight_bf16, file->ReadShapedBFloat16(prefix + "out_proj.weight", {e, e}));
  } else if (file->Find(prefix + "in_proj_weight").ok()) {
    if (!config.same_qkv_dim()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", prefix,
                                                     "in_proj_weight' is only valid when kdim == vdim == embed_dim; "
                                                     "expected q_proj_weight, k_proj_weight, v_proj_weight for ",
                                                     config.DebugString()));
    }
    ATTN_ASSIGN_OR_RETURN(std::vector<float> in_proj, file->ReadShaped(prefix + "in_proj_weight", {3 * e, e}));
    const auto block = static_cast<ptrdiff_t>(e * e);
    w.q_proj_weight.assign(in_proj.begin(), in_proj.begin() + block);
    w.k_proj_weight.assign(in_proj.begin() + block, in_proj.begin() + 2 * block);
    w.v_proj_weight.assign(in_proj.begin() + 2 * block, in_proj.end());
  } else {
    ATTN_ASSIGN_OR_RETURN(w.q_proj_weight, file->ReadShaped(prefix + "q_proj_weight", {e, e}));
    ATTN_ASSIGN_OR_RETURN(w.k_proj_weight, file->ReadShaped(prefix + "k_proj_weight", {e, config.key_dim()}));
    ATTN_ASSIGN_OR_RETURN(w.v_proj_weight, file->ReadShaped(prefix + "v_proj_weight", {e, config.value_dim()}));
  }
  if (!w.bf16()) {
    ATTN_ASSIGN_OR_RETURN(w.out_proj_weight, file->ReadShaped(prefix + "out_proj.weight", {e, e}));
  }
  if (config.bias) {
    ATTN_ASSIGN_OR_RETURN(w.in_proj_bias, file->ReadShaped(prefix + "in_proj_bias", {3 * e}));
    ATTN_ASSIGN_OR_RETURN(w.out_proj_bias, file->ReadShaped(prefix + "out_proj.bias", {e}));
  }
  return w;
}

MhaWeights RandomMhaWeights(const MhaConfig& config, uint64_t seed) {
  const int64_t e = config.embed_dim, kd = config.key_dim(), vd = config.value_dim();
  std::mt19937_64 rng(seed);
  MhaWeights w;
  w.q_proj_weight.resize(e * e);
  w.k_proj_weight.resize(e * kd);
  w.v_proj_weight.resize(e * vd);
  if (config.same_qkv_dim()) {
    // xavier_uniform_ on the fused [3E, E] in_proj_weight: fan_in = E, fan_out = 3E.
    const float bound = std::sqrt(6.0f / static_cast<float>(e + 3 * e));
    FillUniform(rng, bound, w.q_proj_weight);
    FillUniform(rng, bound, w.k_proj_weight);
    FillUniform(rng, bound, w.v_proj_weight);
  } else {
    FillUniform(rng, std::sqrt(6.0f / static_cast<float>(e + e)), w.q_proj_weight);
    FillUniform(rng, std::sqrt(6.0f / static_cast<float>(kd + e)), w.k_proj_weight);
    FillUniform(rng, std::sqrt(6.0f / static_cast<float>(vd + e)), w.v_proj_weight);
  }
  w.out_proj_weight.resize(e * e);
  FillUniform(rng, 1.0f / std::sqrt(static_cast<float>(e)), w.out_proj_weight);
  if (config.bias) {
    w.in_proj_bias.assign(3 * e, 0.0f);
    w.out_proj_bias.assign(e, 0.0f);
  }
  return w;
}

}  // namespace attnserve
