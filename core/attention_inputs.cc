#include "core/attention_inputs.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace attnserve {
namespace {

absl::Status ShapeError(const char* field, const std::string& expected, const Shape& actual) {
  return absl::InvalidArgumentError(
      absl::StrCat(field, ": expected shape ", expected, ", got ", ShapeToString(actual)));
}

// Dims must be positive, the data present, and the element count sane before anything multiplies it.
absl::Status CheckDimsAndData(const char* field, const TensorView& t) {
  for (int64_t d : t.shape) {
    if (d <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": every dimension must be positive, got shape ", ShapeToString(t.shape)));
    }
    if (d > (int64_t{1} << 40)) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": dimension ", d, " is too large"));
    }
  }
  if (t.data == nullptr) return absl::InvalidArgumentError(absl::StrCat(field, ": has a shape but no data"));
  return absl::OkStatus();
}

absl::StatusOr<MaskType> MaskDType(const char* field, const TensorView& t) {
  if (!t.present()) return MaskType::kNone;
  if (t.dtype == DType::kBool) return MaskType::kBool;
  if (t.dtype == DType::kFloat32) return MaskType::kFloat;
  return absl::InvalidArgumentError(absl::StrCat(field, ": dtype must be BOOL or FLOAT32"));
}

absl::Status CheckFloat(const char* field, const TensorView& t) {
  if (t.dtype == DType::kFloat32) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(field, ": dtype must be FLOAT32, got ", DTypeName(t.dtype)));
}

absl::Status CheckLimit(const char* what, int64_t value, int64_t limit, const char* limit_name) {
  if (limit <= 0 || value <= limit) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(what, " is ", value, ", past the layer's ", limit_name, " of ", limit));
}

}  // namespace

absl::StatusOr<ParsedAttention> ParseAttentionInputs(const AttentionInputs& in, const MhaConfig& config,
                                                     const AttentionLimits& limits) {
  ParsedAttention p;
  p.inputs = &in;
  const int64_t e = config.embed_dim, h = config.num_heads;

  // query: [B, L, E] or [L, E].
  if (!in.query.present()) return absl::InvalidArgumentError("query: is required");
  if (auto s = CheckFloat("query", in.query); !s.ok()) return s;
  const Shape& qs = in.query.shape;
  if ((qs.size() != 2 && qs.size() != 3) || qs.back() != e) {
    return ShapeError("query", absl::StrCat("[B, L, ", e, "] or [L, ", e, "] (unbatched)"), qs);
  }
  if (auto s = CheckDimsAndData("query", in.query); !s.ok()) return s;
  p.unbatched = qs.size() == 2;
  p.batch = p.unbatched ? 1 : qs[0];
  p.q_len = qs[qs.size() - 2];

  // key and value: both or neither.
  if (in.key.present() != in.value.present()) {
    return absl::InvalidArgumentError(absl::StrCat(
        in.key.present() ? "value" : "key",
        ": is required when ", in.key.present() ? "key" : "value", " is given (omit both for self-attention)"));
  }
  p.self_attention = !in.key.present();
  if (p.self_attention) {
    if (!config.same_qkv_dim()) {
      return absl::InvalidArgumentError(absl::StrCat("key: is required: the layer has kdim=", config.key_dim(),
                                                     " and vdim=", config.value_dim(), " != embed_dim=", e,
                                                     ", so self-attention needs explicit key and value"));
    }
    p.kv_len = p.q_len;
  } else {
    if (auto s = CheckFloat("key", in.key); !s.ok()) return s;
    if (auto s = CheckFloat("value", in.value); !s.ok()) return s;
    const std::string bdim = p.unbatched ? "" : absl::StrCat(p.batch, ", ");
    const Shape& ks = in.key.shape;
    if (ks.size() != qs.size() || ks.back() != config.key_dim() || (!p.unbatched && ks[0] != p.batch)) {
      return ShapeError("key", absl::StrCat("[", bdim, "S, ", config.key_dim(), "]"), ks);
    }
    if (auto s = CheckDimsAndData("key", in.key); !s.ok()) return s;
    p.kv_len = ks[ks.size() - 2];
    const Shape& vs = in.value.shape;
    if (vs.size() != qs.size() || vs.back() != config.value_dim() || (!p.unbatched && vs[0] != p.batch) ||
        vs[vs.size() - 2] != p.kv_len) {
      return ShapeError("value", absl::StrCat("[", bdim, p.kv_len, ", ", config.value_dim(), "]"), vs);
    }
    if (auto s = CheckDimsAndData("value", in.value); !s.ok()) return s;
  }

  if (auto s = CheckLimit("query length L", p.q_len, limits.max_sequence_length, "max_sequence_length"); !s.ok()) {
    return s;
  }
  if (auto s = CheckLimit("key length S", p.kv_len, limits.max_sequence_length, "max_sequence_length"); !s.ok()) {
    return s;
  }
  if (auto s = CheckLimit("query tokens B*L", p.query_tokens(), limits.max_tokens, "max_tokens"); !s.ok()) return s;
  if (auto s = CheckLimit("key tokens B*S", p.kv_tokens(), limits.max_tokens, "max_tokens"); !s.ok()) return s;

  // key_padding_mask: [B, S] or [S].
  auto kpm = MaskDType("key_padding_mask", in.key_padding_mask);
  if (!kpm.ok()) return kpm.status();
  p.key_padding_mask = *kpm;
  if (p.key_padding_mask != MaskType::kNone) {
    const Shape expected = p.unbatched ? Shape{p.kv_len} : Shape{p.batch, p.kv_len};
    if (in.key_padding_mask.shape != expected) {
      return ShapeError("key_padding_mask", ShapeToString(expected) + (p.unbatched ? " (S)" : " (B, S)"),
                        in.key_padding_mask.shape);
    }
    if (auto s = CheckDimsAndData("key_padding_mask", in.key_padding_mask); !s.ok()) return s;
  }

  // attn_mask: [L, S] or [B*H, L, S].
  auto am = MaskDType("attn_mask", in.attn_mask);
  if (!am.ok()) return am.status();
  p.attn_mask = *am;
  if (p.attn_mask != MaskType::kNone) {
    const Shape two_d{p.q_len, p.kv_len};
    const Shape three_d{p.batch * h, p.q_len, p.kv_len};
    if (in.attn_mask.shape == three_d) {
      p.attn_mask_per_head = true;
    } else if (in.attn_mask.shape != two_d) {
      return ShapeError("attn_mask",
                        absl::StrCat(ShapeToString(two_d), " (L, S) or ", ShapeToString(three_d), " (B*H, L, S)"),
                        in.attn_mask.shape);
    }
    if (auto s = CheckDimsAndData("attn_mask", in.attn_mask); !s.ok()) return s;
  }
  return p;
}

int64_t AttentionFlops(const MhaConfig& config, int64_t batch, int64_t q_len, int64_t kv_len) {
  const int64_t e = config.embed_dim;
  const int64_t q_tokens = batch * q_len, kv_tokens = batch * kv_len;
  const int64_t projections = 2 * q_tokens * e * e                                    // Q
                              + 2 * kv_tokens * e * (config.key_dim() + config.value_dim())  // K, V
                              + 2 * q_tokens * e * e;                                 // output
  const int64_t attention = 2 * 2 * batch * q_len * kv_len * e;  // QK^T and PV over all heads
  return projections + attention;
}

}  // namespace attnserve
