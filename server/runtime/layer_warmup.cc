#include "server/runtime/layer_warmup.h"

#include <cmath>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/strings/str_cat.h"

namespace attnserve {
namespace {

// Deterministic values of the order of activations; what they are does not matter, only that they are finite.
std::vector<float> Pattern(int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = 0.5f * std::sin(0.37f * static_cast<float>(i));
  return v;
}

// One forward per length of the shape classes within max_len (0: no limit), the first error named.
absl::Status ForEachWarmUpLength(int64_t max_len,
                                 absl::FunctionRef<absl::StatusOr<AttentionOutputs>(int64_t len)> forward) {
  for (int64_t len : {1, 8, 32, 128}) {
    if (max_len > 0 && len > max_len) break;
    const absl::StatusOr<AttentionOutputs> out = forward(len);
    if (!out.ok()) {
      return absl::Status(out.status().code(), absl::StrCat("warm-up forward (L=", len, "): ", out.status().message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status WarmUpLayer(const MultiheadAttention& engine, int max_threads) {
  const MhaConfig& c = engine.config();
  const int64_t kdim = c.kdim > 0 ? c.kdim : c.embed_dim;
  const int64_t vdim = c.vdim > 0 ? c.vdim : c.embed_dim;
  return ForEachWarmUpLength(engine.options().limits.max_sequence_length, [&](int64_t len) {
    const std::vector<float> query = Pattern(len * c.embed_dim);
    const std::vector<float> key = Pattern(len * kdim);
    const std::vector<float> value = Pattern(len * vdim);
    AttentionInputs inputs;
    inputs.query = TensorView::F32(query.data(), {1, len, c.embed_dim});
    if (kdim != c.embed_dim || vdim != c.embed_dim) {  // cross-attention layers need their own key and value
      inputs.key = TensorView::F32(key.data(), {1, len, kdim});
      inputs.value = TensorView::F32(value.data(), {1, len, vdim});
    }
    return engine.Forward(inputs, max_threads);
  });
}

absl::Status WarmUpLayer(const DecoderAttention& decoder, int max_threads) {
  const int64_t e = decoder.config().embed_dim;
  return ForEachWarmUpLength(decoder.options().limits.max_sequence_length, [&](int64_t len) {
    const std::vector<float> query = Pattern(len * e);
    DecoderInputs inputs;
    inputs.query = TensorView::F32(query.data(), {1, len, e});
    return decoder.Forward(inputs, max_threads);
  });
}

absl::Status WarmUpLayer(const ServedLayer& layer, int max_threads) {
  return layer.decoder != nullptr ? WarmUpLayer(*layer.decoder, max_threads) : WarmUpLayer(*layer.engine, max_threads);
}

}  // namespace attnserve
