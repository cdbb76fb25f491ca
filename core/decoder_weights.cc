#include "core/decoder_weights.h"

#include <cmath>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/safetensors_checkpoint.h"
#include "core/seeded_uniform.h"

namespace attnserve {
namespace {

template <typename T>
absl::Status CheckSize(const std::vector<T>& values, int64_t expected, const char* name) {
  if (static_cast<int64_t>(values.size()) == expected) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("weight '", name, "' has ", values.size(), " values, expected ", expected));
}

bool KnownTensor(const std::string& local, const DecoderConfig& c) {
  for (const char* proj : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
    const bool has_bias = std::string(proj) == "o_proj" ? c.o_bias : c.qkv_bias;
    if (local == absl::StrCat(proj, ".weight") || (has_bias && local == absl::StrCat(proj, ".bias"))) return true;
  }
  return local == "rotary_emb.inv_freq";
}

}  // namespace

absl::Status DecoderWeights::CheckShapes(const DecoderConfig& c) const {
  const int64_t e = c.embed_dim, q = c.q_width(), kv = c.kv_width();
  const int64_t f32 = bf16() ? 0 : 1, half = 1 - f32;
  ATTN_RETURN_IF_ERROR(CheckSize(q_proj_weight, f32 * q * e, "q_proj.weight"));
  ATTN_RETURN_IF_ERROR(CheckSize(k_proj_weight, f32 * kv * e, "k_proj.weight"));
  ATTN_RETURN_IF_ERROR(CheckSize(v_proj_weight, f32 * kv * e, "v_proj.weight"));
  ATTN_RETURN_IF_ERROR(CheckSize(o_proj_weight, f32 * e * q, "o_proj.weight"));
  ATTN_RETURN_IF_ERROR(CheckSize(qkv_proj_weight_bf16, half * (q + 2 * kv) * e, "qkv_proj.weight (bf16)"));
  ATTN_RETURN_IF_ERROR(CheckSize(o_proj_weight_bf16, half * e * q, "o_proj.weight (bf16)"));
  ATTN_RETURN_IF_ERROR(CheckSize(q_proj_bias, c.qkv_bias ? q : 0, "q_proj.bias"));
  ATTN_RETURN_IF_ERROR(CheckSize(k_proj_bias, c.qkv_bias ? kv : 0, "k_proj.bias"));
  ATTN_RETURN_IF_ERROR(CheckSize(v_proj_bias, c.qkv_bias ? kv : 0, "v_proj.bias"));
  ATTN_RETURN_IF_ERROR(CheckSize(o_proj_bias, c.o_bias ? e : 0, "o_proj.bias"));
  return absl::OkStatus();
}

absl::StatusOr<DecoderWeights> LoadDecoderWeights(const std::string& path, const std::string& prefix,
                                                  const DecoderConfig& config, ComputeType weights) {
  ATTN_RETURN_IF_ERROR(config.Validate());
  ATTN_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsCheckpoint> file, SafetensorsCheckpoint::Open(path));
  for (const std::string& name : file->Names()) {
    if (!absl::StartsWith(name, prefix)) continue;
    if (!KnownTensor(name.substr(prefix.size()), config)) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tensor '", name, "' is not part of a decoder attention layer with ", config.DebugString(),
          " (expected {q,k,v,o}_proj.weight", config.qkv_bias || config.o_bias ? " and biases" : "",
          " under the prefix '", prefix, "')"));
    }
  }
  const int64_t e = config.embed_dim, q = config.q_width(), kv = config.kv_width();
  DecoderWeights w;
  if (weights == ComputeType::kBFloat16) {
    ATTN_ASSIGN_OR_RETURN(w.o_proj_weight_bf16, file->ReadShapedBFloat16(prefix + "o_proj.weight", {e, q}));
    w.qkv_proj_weight_bf16.reserve(static_cast<size_t>((q + 2 * kv) * e));
    for (const auto& [name, rows] : {std::pair{"q_proj.weight", q}, {"k_proj.weight", kv}, {"v_proj.weight", kv}}) {
      ATTN_ASSIGN_OR_RETURN(std::vector<uint16_t> part, file->ReadShapedBFloat16(prefix + name, {rows, e}));
      w.qkv_proj_weight_bf16.insert(w.qkv_proj_weight_bf16.end(), part.begin(), part.end());
    }
  } else {
    ATTN_ASSIGN_OR_RETURN(w.q_proj_weight, file->ReadShaped(prefix + "q_proj.weight", {q, e}));
    ATTN_ASSIGN_OR_RETURN(w.k_proj_weight, file->ReadShaped(prefix + "k_proj.weight", {kv, e}));
    ATTN_ASSIGN_OR_RETURN(w.v_proj_weight, file->ReadShaped(prefix + "v_proj.weight", {kv, e}));
    ATTN_ASSIGN_OR_RETURN(w.o_proj_weight, file->ReadShaped(prefix + "o_proj.weight", {e, q}));
  }
  if (config.qkv_bias) {
    ATTN_ASSIGN_OR_RETURN(w.q_proj_bias, file->ReadShaped(prefix + "q_proj.bias", {q}));
    ATTN_ASSIGN_OR_RETURN(w.k_proj_bias, file->ReadShaped(prefix + "k_proj.bias", {kv}));
    ATTN_ASSIGN_OR_RETURN(w.v_proj_bias, file->ReadShaped(prefix + "v_proj.bias", {kv}));
  }
  if (config.o_bias) {
    ATTN_ASSIGN_OR_RETURN(w.o_proj_bias, file->ReadShaped(prefix + "o_proj.bias", {e}));
  }
  return w;
}

DecoderWeights RandomDecoderWeights(const DecoderConfig& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t e = c.embed_dim, q = c.q_width(), kv = c.kv_width();
  const float in_bound = 1.0f / std::sqrt(static_cast<float>(e)), out_bound = 1.0f / std::sqrt(static_cast<float>(q));
  DecoderWeights w;
  auto fill = [&](std::vector<float>& v, int64_t n, float bound) {
    v.resize(static_cast<size_t>(n));
    FillUniform(rng, bound, v);
  };
  fill(w.q_proj_weight, q * e, in_bound);
  fill(w.k_proj_weight, kv * e, in_bound);
  fill(w.v_proj_weight, kv * e, in_bound);
  fill(w.o_proj_weight, e * q, out_bound);
  if (c.qkv_bias) {
    fill(w.q_proj_bias, q, in_bound);
    fill(w.k_proj_bias, kv, in_bound);
    fill(w.v_proj_bias, kv, in_bound);
  }
  if (c.o_bias) fill(w.o_proj_bias, e, out_bound);
  return w;
}

}  // namespace attnserve
