// The parameters of one attention layer in PyTorch's layout (row-major f32, y = x W^T + b), loaded from a
// PyTorch state_dict saved as .safetensors or initialised from a seed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/mha_config.h"
#include "core/onednn_ops.h"

namespace attnserve {

struct MhaWeights {
  std::vector<float> q_proj_weight;    // [E, E]
  std::vector<float> k_proj_weight;    // [E, kdim]
  std::vector<float> v_proj_weight;    // [E, vdim]
  std::vector<float> in_proj_bias;     // [3E] (q, k, v); empty when !bias
  std::vector<float> out_proj_weight;  // [E, E]
  std::vector<float> out_proj_bias;    // [E]; empty when !bias
  // A bf16 layer's weight matrices as loaded from its checkpoint (LoadMhaWeights with ComputeType::kBFloat16),
  // instead of the four f32 ones, which are then empty: bfloat16 bit patterns, Q, K and V rows fused as
  // PyTorch's in_proj_weight holds them. Biases stay f32. Only for kdim == vdim == embed_dim.
  std::vector<uint16_t> in_proj_weight_bf16;   // [3E, E]
  std::vector<uint16_t> out_proj_weight_bf16;  // [E, E]

  bool bf16() const { return !out_proj_weight_bf16.empty(); }
  // InvalidArgument naming the first tensor whose size does not match `config`.
  absl::Status CheckShapes(const MhaConfig& config) const;
};

// Reads `prefix + name` tensors of a state_dict: in_proj_weight [3E, E] (or q_proj_weight [E, E],
// k_proj_weight [E, kdim], v_proj_weight [E, vdim]), in_proj_bias [3E], out_proj.weight [E, E],
// out_proj.bias [E]. F32, F16, BF16 (and F64) are accepted and kept as f32, or, for a layer computing in bf16
// (`weights` kBFloat16) with kdim == vdim == embed_dim, as bf16 (in_proj_weight_bf16, out_proj_weight_bf16:
// a BF16 checkpoint's matrices as stored, with no f32 copy; other types rounded to nearest even). Refuses,
// naming the tensor: a missing or mis-shaped tensor, bias tensors when config.bias is false, bias_k/bias_v
// (add_bias_kv is not supported), and any other tensor under the prefix.
absl::StatusOr<MhaWeights> LoadMhaWeights(const std::string& path, const std::string& prefix, const MhaConfig& config,
                                          ComputeType weights = ComputeType::kFloat32);

// Deterministic initialisation as PyTorch's _reset_parameters does it: xavier-uniform in_proj (fans of the
// fused [3E, E] matrix, or of each q/k/v matrix when kdim/vdim differ), out_proj.weight from nn.Linear's
// default (uniform in +-1/sqrt(E)), zero biases. Same seed and config, same weights, on every machine.
MhaWeights RandomMhaWeights(const MhaConfig& config, uint64_t seed);

}  // namespace attnserve
