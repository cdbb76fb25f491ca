// The parameters of one decoder attention layer in Hugging Face's layout (row-major, y = x W^T + b),
// loaded from a checkpoint (one .safetensors file or a sharded one's index) under a prefix such as
// "model.layers.17.self_attn.", or initialised from a seed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/decoder_config.h"
#include "core/onednn_ops.h"

namespace attnserve {

struct DecoderWeights {
  std::vector<float> q_proj_weight;  // [H*D, E]
  std::vector<float> k_proj_weight;  // [Hkv*D, E]
  std::vector<float> v_proj_weight;  // [Hkv*D, E]
  std::vector<float> o_proj_weight;  // [E, H*D]
  std::vector<float> q_proj_bias, k_proj_bias, v_proj_bias;  // [H*D], [Hkv*D], [Hkv*D]; empty unless qkv_bias
  std::vector<float> o_proj_bias;                            // [E]; empty unless o_bias
  // A bf16 layer's weight matrices as loaded (LoadDecoderWeights with ComputeType::kBFloat16), instead of the
  // four f32 ones, which are then empty: bfloat16 bit patterns, Wq, Wk and Wv rows fused as the layer's
  // projection takes them. Biases stay f32.
  std::vector<uint16_t> qkv_proj_weight_bf16;  // [(H + 2 Hkv) * D, E]
  std::vector<uint16_t> o_proj_weight_bf16;    // [E, H*D]

  bool bf16() const { return !o_proj_weight_bf16.empty(); }
  // InvalidArgument naming the first tensor whose size does not match `config`.
  absl::Status CheckShapes(const DecoderConfig& config) const;
};

// Reads `prefix` + {q,k,v,o}_proj.weight (and .bias where the config has biases), F32, F16, BF16 or F64, as
// f32, or for `weights` kBFloat16 into the bf16 members (BF16 values as stored, other types rounded to nearest
// even: the values a bf16 layer would compute with either way, at half the memory). Only the pages of those
// tensors are read (the file is mapped). Refuses, naming the tensor: a missing or mis-shaped tensor, a bias the
// config does not have, and any other tensor under the prefix except `rotary_emb.inv_freq` (older checkpoints
// store the table that the config's rope options define).
absl::StatusOr<DecoderWeights> LoadDecoderWeights(const std::string& path, const std::string& prefix,
                                                  const DecoderConfig& config,
                                                  ComputeType weights = ComputeType::kFloat32);

// Deterministic initialisation as nn.Linear's default (uniform in +-1/sqrt(fan_in)), biases included.
DecoderWeights RandomDecoderWeights(const DecoderConfig& config, uint64_t seed);

}  // namespace attnserve
