#include "tools/attnbench_requests.h"

#include <algorithm>
#include <cstring>
#include <random>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/half_float.h"

namespace attnserve {
namespace {

constexpr int64_t kMaxElements = int64_t{1} << 31;

// SplitMix64: a per-request draw from (seed, seq) alone, so threads need no shared generator.
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

std::vector<float> RandomValues(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = normal(rng);
  return v;
}

// The first (product of shape) values, as `dtype` ("FP32", "BF16" or "FP16") little-endian raw data.
void SetTensor(const std::vector<float>& values, std::vector<int64_t> shape, const std::string& dtype,
               attnserve::v1::Tensor* out) {
  int64_t n = 1;
  for (int64_t d : shape) {
    n *= d;
    out->add_shape(d);
  }
  if (dtype == "FP32") {
    out->set_dtype(attnserve::v1::FLOAT32);
    out->set_raw_data(reinterpret_cast<const char*>(values.data()), static_cast<size_t>(n) * sizeof(float));
    return;
  }
  const bool bf16 = dtype == "BF16";
  out->set_dtype(bf16 ? attnserve::v1::BFLOAT16 : attnserve::v1::FLOAT16);
  std::string* raw = out->mutable_raw_data();
  raw->resize(static_cast<size_t>(n) * 2);
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t bits = bf16 ? FloatToBFloat16(values[i]) : FloatToHalf(values[i]);
    std::memcpy(raw->data() + 2 * i, &bits, 2);
  }
}

}  // namespace

absl::StatusOr<SeqDist> ParseSeqDist(const std::string& text) {
  const std::vector<std::string> parts = absl::StrSplit(text, ':');
  SeqDist d;
  d.drawn = true;
  if (parts.size() != 3 || parts[0] != "uniform" || !absl::SimpleAtoi(parts[1], &d.min) ||
      !absl::SimpleAtoi(parts[2], &d.max) || d.min < 1 || d.max < d.min) {
    return absl::InvalidArgumentError(
        absl::StrCat("--seq-dist: expected uniform:MIN:MAX with 1 <= MIN <= MAX, got \"", text, "\""));
  }
  return d;
}

absl::StatusOr<std::unique_ptr<InferRequestSource>> InferRequestSource::Create(const Options& options) {
  const int64_t max_len = options.seq_dist.drawn ? options.seq_dist.max : options.seq_len;
  const bool cross = options.kv_seq_len > 0;
  if (options.embed_dim < 1 || options.batch < 1 || max_len < 1 || options.kv_seq_len < 0 ||
      (cross && (options.kdim < 1 || options.vdim < 1))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "request shape: every dimension must be positive (embed_dim ", options.embed_dim, ", batch ", options.batch,
        ", seq ", max_len, ", kv_seq ", options.kv_seq_len, ", kdim ", options.kdim, ", vdim ", options.vdim, ")"));
  }
  if (options.input_dtype != "FP32" && options.input_dtype != "BF16" && options.input_dtype != "FP16") {
    return absl::InvalidArgumentError(
        absl::StrCat("input_dtype: expected FP32, BF16 or FP16, got \"", options.input_dtype, "\""));
  }
  const int64_t max_features = std::max({options.embed_dim, cross ? options.kdim : 0, cross ? options.vdim : 0});
  const int64_t max_tokens = options.batch * std::max(max_len, options.kv_seq_len);
  if (max_tokens > kMaxElements / max_features) {
    return absl::InvalidArgumentError("request shape: more than 2^31 elements in one tensor");
  }
  auto source = std::unique_ptr<InferRequestSource>(new InferRequestSource(options));
  source->query_values_ = RandomValues(options.batch * max_len * options.embed_dim, options.seed);
  if (cross) {
    source->key_values_ = RandomValues(options.batch * options.kv_seq_len * options.kdim, options.seed + 1);
    source->value_values_ = RandomValues(options.batch * options.kv_seq_len * options.vdim, options.seed + 2);
  }
  if (!options.seq_dist.drawn) source->fixed_ = source->Build(options.seq_len);
  return source;
}

int64_t InferRequestSource::SeqLenFor(uint64_t seq) const {
  if (!options_.seq_dist.drawn) return options_.seq_len;
  const uint64_t span = static_cast<uint64_t>(options_.seq_dist.max - options_.seq_dist.min) + 1;
  return options_.seq_dist.min + static_cast<int64_t>(Mix(options_.seed ^ Mix(seq)) % span);
}

std::shared_ptr<const attnserve::v1::InferRequest> InferRequestSource::Get(uint64_t seq) const {
  if (fixed_ != nullptr) return fixed_;
  return Build(SeqLenFor(seq));
}

std::shared_ptr<const attnserve::v1::InferRequest> InferRequestSource::Build(int64_t seq_len) const {
  auto request = std::make_shared<attnserve::v1::InferRequest>();
  request->set_layer(options_.layer);
  const int64_t b = options_.batch;
  SetTensor(query_values_, {b, seq_len, options_.embed_dim}, options_.input_dtype, request->mutable_query());
  if (options_.kv_seq_len > 0) {
    SetTensor(key_values_, {b, options_.kv_seq_len, options_.kdim}, options_.input_dtype, request->mutable_key());
    SetTensor(value_values_, {b, options_.kv_seq_len, options_.vdim}, options_.input_dtype,
              request->mutable_value());
  }
  request->set_is_causal(options_.is_causal);
  return request;
}

}  // namespace attnserve
