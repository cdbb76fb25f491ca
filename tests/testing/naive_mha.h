// The float64 reference: nn.MultiheadAttention written out loop by loop, for tests only. Same semantics
// as the engine, including zero output for a query row whose keys are all masked.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "core/attention_inputs.h"
#include "core/mha_config.h"
#include "core/mha_weights.h"

namespace attnserve::testing {

struct NaiveOutputs {
  std::vector<double> output;        // [B, L, E]
  std::vector<double> attn_weights;  // [B, L, S] averaged or [B, H, L, S]; empty unless need_weights
};

// `inputs` must be valid for `config` (run ParseAttentionInputs first).
NaiveOutputs NaiveMultiheadAttention(const MhaConfig& config, const MhaWeights& weights,
                                     const AttentionInputs& inputs);

// Max |a - b| over all elements; +inf when sizes differ or either side has a NaN.
double MaxAbsDiff(const std::vector<float>& a, const std::vector<double>& b);
double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b);

// Normal(0, 1) values, never all zeros.
std::vector<float> RandomValues(std::mt19937_64& rng, int64_t n, float stddev = 1.0f);
// MhaWeights with every tensor random (biases too), to exercise every term.
MhaWeights RandomTestWeights(const MhaConfig& config, std::mt19937_64& rng);

}  // namespace attnserve::testing
