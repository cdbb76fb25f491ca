// The parameters of one attention layer in PyTorch's layout (row-major f32, y = x W^T + b), loaded from a
// PyTorch state_dict saved as .safetensors or initialised from a seed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/mha_config.h"

namespace attnserve {

struct MhaWeights {
  std::vector<float> q_proj_weight;    // [E, E]
  std::vector<float> k_proj_weight;    // [E, kdim]
  std::vector<float> v_proj_weight;    // [E, vdim]
  std::vector<float> in_proj_bias;     // [3E] (q, k, v); empty when !bias
  std::vector<float> out_proj_weight;  // [E, E]
  std::vector<float> out_proj_bias;    // [E]; empty when !bias

  // InvalidArgument naming the first tensor whose size does not match `config`.
  absl::Status CheckShapes(const MhaConfig& config) const;
};

// Reads `prefix + name` tensors of a state_dict: in_proj_weight [3E, E] (or q_proj_weight [E, E],
// k_proj_weight [E, kdim], v_proj_weight [E, vdim]), in_proj_bias [3E], out_proj.weight [E, E],
// out_proj.bias [E]. F32, F16, BF16 (and F64) are accepted and kept as f32. Refuses, naming the tensor:
// a missing or mis-shaped tensor, bias tensors when config.bias is false, bias_k/bias_v (add_bias_kv is not
// supported), and any other tensor under the prefix.
absl::StatusOr<MhaWeights> LoadMhaWeights(const std::string& path, const std::string& prefix,
                                          const MhaConfig& config);

// Deterministic initialisation as PyTorch's _reset_parameters does it: xavier-uniform in_proj (fans of the
// fused [3E, E] matrix, or of each q/k/v matrix when kdim/vdim differ), out_proj.weight from nn.Linear's
// default (uniform in +-1/sqrt(E)), zero biases. Same seed and config, same weights, on every machine.
MhaWeights RandomMhaWeights(const MhaConfig& config, uint64_t seed);

}  // namespace attnserve
