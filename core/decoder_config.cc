#include "core/decoder_config.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace attnserve {
namespace {

absl::Status Bad(const char* field, double value, const char* need) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": must be ", need, ", got ", value));
}

}  // namespace

float DecoderConfig::score_scale() const {
  return static_cast<float>(scaling > 0 ? scaling : 1.0 / std::sqrt(static_cast<double>(head_dim)));
}

absl::Status DecoderConfig::Validate() const {
  if (embed_dim <= 0) return Bad("embed_dim", embed_dim, "> 0");
  if (num_heads <= 0) return Bad("num_heads", num_heads, "> 0");
  if (num_kv_heads <= 0) return Bad("decoder.num_kv_heads", num_kv_heads, "> 0");
  if (num_heads % num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("decoder.num_kv_heads: must divide num_heads (", num_heads,
                                                   "), got ", num_kv_heads));
  }
  if (head_dim <= 0) return Bad("decoder.head_dim", head_dim, "> 0");
  if (rope.rotary_dim > head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("decoder.rope.rotary_dim: must be <= head_dim (", head_dim,
                                                   "), got ", rope.rotary_dim));
  }
  if (absl::Status s = Rope::Create(rope).status(); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("decoder.", s.message()));
  }
  if (sliding_window < 0) return Bad("decoder.sliding_window", sliding_window, ">= 0 (0 = none)");
  // The cap is applied in float, through 1 / c: near float's limits 1 / c overflows (NaN scores) or is subnormal.
  const double cap = attn_logit_softcapping;
  if (!(cap == 0 || (cap >= kMinSoftCap && cap <= kMaxSoftCap))) {
    return Bad("decoder.attn_logit_softcapping", cap, "0 (none) or in [1e-06, 1e+30]");
  }
  if (!(scaling >= 0) || std::isinf(scaling)) return Bad("decoder.scaling", scaling, "finite and >= 0");
  return absl::OkStatus();
}

std::string DecoderConfig::DebugString() const {
  return absl::StrCat("E=", embed_dim, " H=", num_heads, " Hkv=", num_kv_heads, " D=", head_dim,
                      " rotary_dim=", rope.rotary_dim, " theta=", rope.theta,
                      rope.interleaved ? " interleaved" : "", " window=", sliding_window,
                      " softcap=", attn_logit_softcapping, " qkv_bias=", qkv_bias ? "true" : "false",
                      " o_bias=", o_bias ? "true" : "false");
}

int64_t DecoderFlops(const DecoderConfig& c, int64_t batch, int64_t len) {
  // In double: validated shapes without limits can still overflow int64 here.
  const double tokens = static_cast<double>(batch) * static_cast<double>(len);
  const double projections = 2 * tokens * static_cast<double>(c.embed_dim) *
                             static_cast<double>(2 * c.q_width() + 2 * c.kv_width());
  // Keys seen by query i: min(i + 1, window), summed over i.
  const double l = static_cast<double>(len);
  const double w = c.sliding_window > 0 ? std::min(static_cast<double>(c.sliding_window), l) : l;
  const double pairs = w * (w + 1) / 2 + (l - w) * w;
  const double attention = 4 * static_cast<double>(batch) * pairs * static_cast<double>(c.q_width());
  return static_cast<int64_t>(std::min(projections + attention, 9.0e18));
}

}  // namespace attnserve
