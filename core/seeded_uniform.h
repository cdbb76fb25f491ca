// Deterministic uniform values for seeded weights: the same seed gives the same values on every machine.
#pragma once

#include <random>
#include <vector>

namespace attnserve {

// Uniform in [-bound, bound) from the top 24 bits of a 64-bit Mersenne twister draw: std's distributions
// are implementation-defined.
inline void FillUniform(std::mt19937_64& rng, float bound, std::vector<float>& values) {
  for (float& v : values) {
    const float unit = static_cast<float>(rng() >> 40) * (1.0f / 16777216.0f);
    v = (2.0f * unit - 1.0f) * bound;
  }
}

}  // namespace attnserve
