// The float64 reference of a decoder attention layer (Hugging Face's formulas, loop by loop), for tests
// only. RoPE's inv_freq and angles are float32 as the spec computes them; everything after is double.
#pragma once

#include <vector>

#include "core/decoder_config.h"
#include "core/decoder_inputs.h"
#include "core/decoder_weights.h"
#include "tests/testing/naive_mha.h"

namespace attnserve::testing {

// `inputs` must be valid for `config` (run ParseDecoderInputs first).
NaiveOutputs NaiveDecoderAttention(const DecoderConfig& config, const DecoderWeights& weights,
                                   const DecoderInputs& inputs);

}  // namespace attnserve::testing
