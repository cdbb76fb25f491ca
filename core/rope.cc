#include "core/rope.h"

#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"

namespace attnserve {
namespace {

// Llama 3.1's frequency bands (transformers' _compute_llama3_parameters): long wavelengths slowed by
// `factor`, short ones kept, the band between interpolated.
float Llama3(float inv_freq, const RopeOptions& o) {
  const double old_len = static_cast<double>(o.original_max_position_embeddings);
  const double low_freq_wavelen = old_len / o.low_freq_factor, high_freq_wavelen = old_len / o.high_freq_factor;
  const double wavelen = 2 * M_PI / inv_freq;
  if (wavelen > low_freq_wavelen) return static_cast<float>(inv_freq / o.factor);
  if (wavelen < high_freq_wavelen) return inv_freq;
  const double smooth = (old_len / wavelen - o.low_freq_factor) / (o.high_freq_factor - o.low_freq_factor);
  return static_cast<float>((1 - smooth) * inv_freq / o.factor + smooth * inv_freq);
}

}  // namespace

absl::StatusOr<Rope> Rope::Create(const RopeOptions& o) {
  auto bad = [](const char* field, auto value, const char* need) {
    return absl::InvalidArgumentError(absl::StrCat("rope.", field, ": must be ", need, ", got ", value));
  };
  if (o.rotary_dim <= 0 || o.rotary_dim % 2 != 0) return bad("rotary_dim", o.rotary_dim, "even and > 0");
  if (!(o.theta > 0)) return bad("theta", o.theta, "> 0");
  if (o.scaling != RopeOptions::Scaling::kNone && !(o.factor > 0)) return bad("scaling.factor", o.factor, "> 0");
  if (o.scaling == RopeOptions::Scaling::kLlama3) {
    if (!(o.high_freq_factor > o.low_freq_factor) || !(o.low_freq_factor > 0)) {
      return bad("scaling.high_freq_factor", o.high_freq_factor, "> low_freq_factor > 0");
    }
    if (o.original_max_position_embeddings <= 0) {
      return bad("scaling.original_max_position_embeddings", o.original_max_position_embeddings, "> 0");
    }
  }
  Rope rope(o);
  const int64_t half = o.rotary_dim / 2;
  rope.inv_freq_.resize(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    // float32 throughout, as torch computes arange(0, dim, 2).float() / dim and base ** that.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(o.rotary_dim);
    float f = 1.0f / std::pow(static_cast<float>(o.theta), exponent);
    if (o.scaling == RopeOptions::Scaling::kLinear) f = static_cast<float>(f / o.factor);
    if (o.scaling == RopeOptions::Scaling::kLlama3) f = Llama3(f, o);
    rope.inv_freq_[static_cast<size_t>(i)] = f;
  }
  return rope;
}

void Rope::Apply(float* data, int64_t rows, int64_t ld, int64_t heads, int64_t head_dim,
                 const int64_t* positions) const {
  const int64_t half = options_.rotary_dim / 2;
  std::vector<float> cos(static_cast<size_t>(half)), sin(static_cast<size_t>(half));
  for (int64_t r = 0; r < rows; ++r) {
    const auto p = static_cast<float>(positions[r]);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = p * inv_freq_[static_cast<size_t>(i)];
      cos[static_cast<size_t>(i)] = std::cos(angle);
      sin[static_cast<size_t>(i)] = std::sin(angle);
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* x = data + r * ld + h * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const int64_t a = options_.interleaved ? 2 * i : i, b = options_.interleaved ? 2 * i + 1 : i + half;
        const float c = cos[static_cast<size_t>(i)], s = sin[static_cast<size_t>(i)];
        const float xa = x[a], xb = x[b];
        x[a] = xa * c - xb * s;
        x[b] = xb * c + xa * s;
      }
    }
  }
}

}  // namespace attnserve
