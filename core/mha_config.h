// The dimensions of one multi-head attention layer, as PyTorch's nn.MultiheadAttention takes them.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace attnserve {

struct MhaConfig {
  int64_t embed_dim = 0;  // E: query and output feature size.
  int64_t num_heads = 0;  // H: must divide E.
  int64_t kdim = 0;       // key feature size; 0 means E.
  int64_t vdim = 0;       // value feature size; 0 means E.
  bool bias = true;       // in_proj_bias [3E] and out_proj.bias [E].

  int64_t key_dim() const { return kdim > 0 ? kdim : embed_dim; }
  int64_t value_dim() const { return vdim > 0 ? vdim : embed_dim; }
  int64_t head_dim() const { return embed_dim / num_heads; }
  // PyTorch's _qkv_same_embed_dim: weights come as one in_proj_weight [3E, E].
  bool same_qkv_dim() const { return key_dim() == embed_dim && value_dim() == embed_dim; }

  // InvalidArgument for non-positive dims, E % H != 0, or negative kdim/vdim.
  absl::Status Validate() const;
  std::string DebugString() const;
};

}  // namespace attnserve
