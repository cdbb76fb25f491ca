#include "tests/testing/naive_decoder.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "core/rope.h"

namespace attnserve::testing {
namespace {

// y[n] = sum_k x[k] W[n, k] (+ b[n]).
std::vector<double> Linear(const std::vector<double>& x, const std::vector<float>& w, const std::vector<float>& b,
                           int64_t in, int64_t out) {
  std::vector<double> y(static_cast<size_t>(out));
  for (int64_t n = 0; n < out; ++n) {
    double s = b.empty() ? 0.0 : b[n];
    for (int64_t k = 0; k < in; ++k) s += x[k] * w[n * in + k];
    y[n] = s;
  }
  return y;
}

void RotateHeads(std::vector<double>& x, int64_t heads, int64_t d, const RopeOptions& ro,
                 const std::vector<float>& inv_freq, int64_t pos) {
  const int64_t half = ro.rotary_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    double* v = x.data() + h * d;
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(pos) * inv_freq[i];
      const double c = std::cos(angle), s = std::sin(angle);
      const int64_t a = ro.interleaved ? 2 * i : i, b = ro.interleaved ? 2 * i + 1 : i + half;
      const double xa = v[a], xb = v[b];
      v[a] = xa * c - xb * s;
      v[b] = xb * c + xa * s;
    }
  }
}

double PaddingTerm(const DecoderInputs& in, int64_t at) {
  if (!in.key_padding_mask.present()) return 0;
  if (in.key_padding_mask.dtype == DType::kBool) {
    return static_cast<const uint8_t*>(in.key_padding_mask.data)[at] ? -std::numeric_limits<double>::infinity() : 0;
  }
  return static_cast<const float*>(in.key_padding_mask.data)[at];
}

}  // namespace

NaiveOutputs NaiveDecoderAttention(const DecoderConfig& c, const DecoderWeights& w, const DecoderInputs& in) {
  const Shape& qs = in.query.shape;
  const bool unbatched = qs.size() == 2;
  const int64_t B = unbatched ? 1 : qs[0], L = qs[qs.size() - 2], E = c.embed_dim;
  const int64_t H = c.num_heads, Hkv = c.num_kv_heads, D = c.head_dim, r = H / Hkv;
  const std::vector<float> inv_freq = Rope::Create(c.rope)->inv_freq();
  const auto* x = static_cast<const float*>(in.query.data);
  const double scale = c.scaling > 0 ? c.scaling : 1.0 / std::sqrt(static_cast<double>(D));
  const double cap = c.attn_logit_softcapping, inf = std::numeric_limits<double>::infinity();
  NaiveOutputs out;
  out.output.assign(static_cast<size_t>(B * L * E), 0.0);
  if (in.need_weights) out.attn_weights.assign(static_cast<size_t>(B * (in.average_attn_weights ? 1 : H) * L * L), 0);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<std::vector<double>> q(L), k(L), v(L);
    for (int64_t l = 0; l < L; ++l) {
      std::vector<double> xl(x + (b * L + l) * E, x + (b * L + l + 1) * E);
      q[l] = Linear(xl, w.q_proj_weight, w.q_proj_bias, E, H * D);
      k[l] = Linear(xl, w.k_proj_weight, w.k_proj_bias, E, Hkv * D);
      v[l] = Linear(xl, w.v_proj_weight, w.v_proj_bias, E, Hkv * D);
      const int64_t pos = in.position_ids.present() ? static_cast<const int64_t*>(in.position_ids.data)[b * L + l]
                                                    : in.position_offset + l;
      RotateHeads(q[l], H, D, c.rope, inv_freq, pos);
      RotateHeads(k[l], Hkv, D, c.rope, inv_freq, pos);
    }
    for (int64_t l = 0; l < L; ++l) {
      std::vector<double> ctx(static_cast<size_t>(H * D), 0.0);
      for (int64_t h = 0; h < H; ++h) {
        const int64_t g = h / r;
        std::vector<double> s(static_cast<size_t>(L), -inf);
        double mx = -inf;
        for (int64_t j = 0; j <= l; ++j) {
          if (c.sliding_window > 0 && l - j >= c.sliding_window) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += q[l][h * D + d] * k[j][g * D + d];
          dot *= scale;
          if (cap > 0) dot = cap * std::tanh(dot / cap);
          s[j] = dot + PaddingTerm(in, b * L + j);
          mx = std::max(mx, s[j]);
        }
        if (mx == -inf) continue;  // every key masked: zero context
        double sum = 0;
        for (int64_t j = 0; j < L; ++j) sum += s[j] == -inf ? 0 : std::exp(s[j] - mx);
        for (int64_t j = 0; j < L; ++j) {
          const double p = s[j] == -inf ? 0 : std::exp(s[j] - mx) / sum;
          for (int64_t d = 0; d < D; ++d) ctx[h * D + d] += p * v[j][g * D + d];
          if (!in.need_weights) continue;
          if (in.average_attn_weights) {
            out.attn_weights[(b * L + l) * L + j] += p / static_cast<double>(H);
          } else {
            out.attn_weights[((b * H + h) * L + l) * L + j] = p;
          }
        }
      }
      const std::vector<double> o = Linear(ctx, w.o_proj_weight, w.o_proj_bias, H * D, E);
      std::copy(o.begin(), o.end(), out.output.begin() + (b * L + l) * E);
    }
  }
  return out;
}

}  // namespace attnserve::testing
