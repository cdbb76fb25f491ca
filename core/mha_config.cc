#include "core/mha_config.h"

#include "absl/strings/str_cat.h"

namespace attnserve {

absl::Status MhaConfig::Validate() const {
  if (embed_dim <= 0) return absl::InvalidArgumentError(absl::StrCat("embed_dim must be > 0, got ", embed_dim));
  if (num_heads <= 0) return absl::InvalidArgumentError(absl::StrCat("num_heads must be > 0, got ", num_heads));
  if (embed_dim % num_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("embed_dim (", embed_dim, ") must be divisible by num_heads (",
                                                   num_heads, ")"));
  }
  if (kdim < 0) return absl::InvalidArgumentError(absl::StrCat("kdim must be >= 0 (0 = embed_dim), got ", kdim));
  if (vdim < 0) return absl::InvalidArgumentError(absl::StrCat("vdim must be >= 0 (0 = embed_dim), got ", vdim));
  return absl::OkStatus();
}

std::string MhaConfig::DebugString() const {
  return absl::StrCat("E=", embed_dim, " H=", num_heads, " kdim=", key_dim(), " vdim=", value_dim(),
                      " bias=", bias ? "true" : "false");
}

}  // namespace attnserve
