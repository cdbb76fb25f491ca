#include "tests/testing/naive_mha.h"

#include <cmath>
#include <cstring>
#include <limits>

namespace attnserve::testing {
namespace {

double MaskAt(MaskType type, const TensorView& t, int64_t i) {
  if (type == MaskType::kNone) return 0.0;
  if (type == MaskType::kBool) {
    return static_cast<const uint8_t*>(t.data)[i] ? -std::numeric_limits<double>::infinity() : 0.0;
  }
  float v;
  std::memcpy(&v, static_cast<const char*>(t.data) + 4 * i, 4);
  return v;
}

float LoadF(const TensorView& t, int64_t i) {
  float v;
  std::memcpy(&v, static_cast<const char*>(t.data) + 4 * i, 4);
  return v;
}

// y[rows, out] = x[rows, in] W^T + b, in double.
std::vector<double> Linear(const std::vector<double>& x, int64_t rows, int64_t in, const std::vector<float>& w,
                           const float* b, int64_t out) {
  std::vector<double> y(rows * out);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      double acc = b ? b[o] : 0.0;
      for (int64_t i = 0; i < in; ++i) acc += x[r * in + i] * static_cast<double>(w[o * in + i]);
      y[r * out + o] = acc;
    }
  }
  return y;
}

std::vector<double> ToDouble(const TensorView& t) {
  std::vector<double> v(t.num_elements());
  for (int64_t i = 0; i < t.num_elements(); ++i) v[i] = LoadF(t, i);
  return v;
}

}  // namespace

NaiveOutputs NaiveMultiheadAttention(const MhaConfig& config, const MhaWeights& w, const AttentionInputs& in) {
  const ParsedAttention p = *ParseAttentionInputs(in, config, {});
  const int64_t e = config.embed_dim, h = config.num_heads, dh = config.head_dim();
  const int64_t bsz = p.batch, len_q = p.q_len, len_k = p.kv_len;
  const TensorView& key = p.self_attention ? in.query : in.key;
  const TensorView& value = p.self_attention ? in.query : in.value;
  const float* bias = config.bias ? w.in_proj_bias.data() : nullptr;

  const std::vector<double> q = Linear(ToDouble(in.query), bsz * len_q, e, w.q_proj_weight, bias, e);
  const std::vector<double> k =
      Linear(ToDouble(key), bsz * len_k, config.key_dim(), w.k_proj_weight, bias ? bias + e : nullptr, e);
  const std::vector<double> v =
      Linear(ToDouble(value), bsz * len_k, config.value_dim(), w.v_proj_weight, bias ? bias + 2 * e : nullptr, e);

  NaiveOutputs out;
  std::vector<double> context(bsz * len_q * e, 0.0);
  std::vector<double> probs_all(bsz * h * len_q * len_k, 0.0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dh));
  std::vector<double> scores(len_k);
  for (int64_t b = 0; b < bsz; ++b) {
    for (int64_t hh = 0; hh < h; ++hh) {
      for (int64_t l = 0; l < len_q; ++l) {
        double max_score = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < len_k; ++j) {
          double s = 0.0;
          for (int64_t d = 0; d < dh; ++d) {
            s += q[(b * len_q + l) * e + hh * dh + d] * k[(b * len_k + j) * e + hh * dh + d];
          }
          s *= scale;
          s += MaskAt(p.key_padding_mask, in.key_padding_mask, b * len_k + j);
          const int64_t am_index = p.attn_mask_per_head ? ((b * h + hh) * len_q + l) * len_k + j : l * len_k + j;
          s += MaskAt(p.attn_mask, in.attn_mask, am_index);
          if (in.is_causal && j > l) s = -std::numeric_limits<double>::infinity();
          scores[j] = s;
          max_score = std::max(max_score, s);
        }
        if (std::isinf(max_score) && max_score < 0) continue;  // every key masked: zeros
        double sum = 0.0;
        for (int64_t j = 0; j < len_k; ++j) sum += (scores[j] = std::exp(scores[j] - max_score));
        for (int64_t j = 0; j < len_k; ++j) {
          const double prob = scores[j] / sum;
          probs_all[((b * h + hh) * len_q + l) * len_k + j] = prob;
          for (int64_t d = 0; d < dh; ++d) {
            context[(b * len_q + l) * e + hh * dh + d] += prob * v[(b * len_k + j) * e + hh * dh + d];
          }
        }
      }
    }
  }
  out.output = Linear(context, bsz * len_q, e, w.out_proj_weight,
                      config.bias ? w.out_proj_bias.data() : nullptr, e);
  if (in.need_weights) {
    if (in.average_attn_weights) {
      out.attn_weights.assign(bsz * len_q * len_k, 0.0);
      for (int64_t b = 0; b < bsz; ++b)
        for (int64_t hh = 0; hh < h; ++hh)
          for (int64_t l = 0; l < len_q; ++l)
            for (int64_t j = 0; j < len_k; ++j)
              out.attn_weights[(b * len_q + l) * len_k + j] +=
                  probs_all[((b * h + hh) * len_q + l) * len_k + j] / static_cast<double>(h);
    } else {
      out.attn_weights = probs_all;
    }
  }
  return out;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double m = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - b[i]);
    if (std::isnan(d)) return std::numeric_limits<double>::infinity();
    m = std::max(m, d);
  }
  return m;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  return MaxAbsDiff(a, std::vector<double>(b.begin(), b.end()));
}

std::vector<float> RandomValues(std::mt19937_64& rng, int64_t n, float stddev) {
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

MhaWeights RandomTestWeights(const MhaConfig& c, std::mt19937_64& rng) {
  const int64_t e = c.embed_dim;
  const float s = 1.0f / std::sqrt(static_cast<float>(e));
  MhaWeights w;
  w.q_proj_weight = RandomValues(rng, e * e, s);
  w.k_proj_weight = RandomValues(rng, e * c.key_dim(), 1.0f / std::sqrt(static_cast<float>(c.key_dim())));
  w.v_proj_weight = RandomValues(rng, e * c.value_dim(), 1.0f / std::sqrt(static_cast<float>(c.value_dim())));
  w.out_proj_weight = RandomValues(rng, e * e, s);
  if (c.bias) {
    w.in_proj_bias = RandomValues(rng, 3 * e, 0.1f);
    w.out_proj_bias = RandomValues(rng, e, 0.1f);
  }
  return w;
}

}  // namespace attnserve::testing
