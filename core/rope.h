// Rotary position embeddings (RoPE) as Hugging Face's modeling code computes them, in float32 as it does:
// inv_freq[i] = 1 / theta^(2i / rotary_dim) for i < rotary_dim / 2, scaled (LINEAR, LLAMA3), the angle of
// position p the float product p * inv_freq[i], its cos and sin in float. (Computing the angle in double
// would be more exact and differ from every checkpoint's reference by ~1e-3 at positions in the thousands.)
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace attnserve {

struct RopeOptions {
  double theta = 10000;
  int64_t rotary_dim = 0;   // even, > 0
  bool interleaved = false;  // false: rotate_half pairs (i, i + rotary_dim / 2); true: pairs (2i, 2i + 1)
  enum class Scaling { kNone, kLinear, kLlama3 } scaling = Scaling::kNone;
  double factor = 1;
  double low_freq_factor = 1, high_freq_factor = 4;
  int64_t original_max_position_embeddings = 8192;
};

class Rope {
 public:
  // InvalidArgument naming the field: rotary_dim odd or <= 0, theta <= 0, factor <= 0, LLAMA3 with
  // high_freq_factor <= low_freq_factor or original_max_position_embeddings <= 0.
  static absl::StatusOr<Rope> Create(const RopeOptions& options);

  // inv_freq [rotary_dim / 2], after scaling.
  const std::vector<float>& inv_freq() const { return inv_freq_; }
  int64_t rotary_dim() const { return options_.rotary_dim; }

  // Rotates `heads` heads of `rows` rows in place: row r is at `data + r * ld`, head h at offset h * head_dim
  // (head_dim >= rotary_dim; the features past rotary_dim are left alone), at position positions[r].
  void Apply(float* data, int64_t rows, int64_t ld, int64_t heads, int64_t head_dim,
             const int64_t* positions) const;

 private:
  explicit Rope(const RopeOptions& options) : options_(options) {}
  RopeOptions options_;
  std::vector<float> inv_freq_;
};

}  // namespace attnserve
