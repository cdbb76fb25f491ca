// The requests attnbench sends: random tensors (FLOAT32, or rounded to BFLOAT16 / FLOAT16) of a fixed shape
// (built once, shared by every send), or with the query length drawn per request to exercise ragged batching
// (then each send copies a prefix of pre-generated random values: memcpy speed, small next to the attention it
// asks for; caching every length instead could take hundreds of MiB).
//
// Thread-safety: immutable after Create; Get may run on any number of threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "attnserve/v1/attention.pb.h"

namespace attnserve {

// How the query length L is chosen per request: fixed, or uniform over [min, max].
struct SeqDist {
  bool drawn = false;
  int64_t min = 0;
  int64_t max = 0;
};
// "uniform:A:B" with 1 <= A <= B. InvalidArgument naming the expected form otherwise.
absl::StatusOr<SeqDist> ParseSeqDist(const std::string& text);

class InferRequestSource {
 public:
  struct Options {
    std::string layer;
    int64_t embed_dim = 0;  // E of the layer (query features)
    int64_t kdim = 0;       // key features; with kv_seq_len > 0 only
    int64_t vdim = 0;       // value features; with kv_seq_len > 0 only
    int64_t batch = 1;      // B
    int64_t seq_len = 128;  // L when !seq_dist.drawn
    SeqDist seq_dist;       // L per request when drawn
    int64_t kv_seq_len = 0;  // S of a separate key/value (cross-attention); 0: self-attention
    bool is_causal = false;
    std::string input_dtype = "FP32";  // FP32, BF16 or FP16: query, key and value rounded to it on the wire
    uint64_t seed = 1;      // the random values, and which L each request number draws
  };

  // InvalidArgument for non-positive dimensions, more than 2^31 elements in one tensor, or another input_dtype.
  static absl::StatusOr<std::unique_ptr<InferRequestSource>> Create(const Options& options);

  // The request to send as number `seq`; the same `seq` and seed always give the same L.
  std::shared_ptr<const attnserve::v1::InferRequest> Get(uint64_t seq) const;
  // The query length request `seq` has.
  int64_t SeqLenFor(uint64_t seq) const;
  // True when every request is the same one (the query length is not drawn).
  bool Fixed() const { return fixed_ != nullptr; }

 private:
  explicit InferRequestSource(Options options) : options_(std::move(options)) {}
  std::shared_ptr<const attnserve::v1::InferRequest> Build(int64_t seq_len) const;

  Options options_;
  std::vector<float> query_values_;  // B * max L * E random values; a request takes a prefix
  std::vector<float> key_values_, value_values_;
  std::shared_ptr<const attnserve::v1::InferRequest> fixed_;  // when !seq_dist.drawn
};

}  // namespace attnserve
