// attnbench's command line.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tools/attnbench_requests.h"

namespace attnserve {

struct BenchArgs {
  enum class Format { kTable, kJson, kCsv };

  std::string target = "127.0.0.1:50051";  // --target: any gRPC target, several addresses round-robin
  bool tls = false;                        // --tls
  std::string tls_root_certs;              // --tls-root-certs PEM
  std::string tls_cert;                    // --tls-cert PEM (mTLS)
  std::string tls_key;                     // --tls-key PEM
  std::string token_file;                  // --token-file; empty: $ATTNSERVE_TOKEN
  std::string traceparent;                 // --traceparent: sent on every call; empty: none
  // What to send.
  bool echo = false;                       // --echo: attnserve.bench.EchoService instead of attention
  int64_t payload_bytes = 4096;            // --payload-bytes (echo)
  std::string layer = "small";             // --layer
  int64_t batch = 1;                       // --batch B
  int64_t seq = 128;                       // --seq L
  SeqDist seq_dist;                        // --seq-dist uniform:A:B (instead of --seq)
  int64_t kv_seq = 0;                      // --kv-seq S (cross-attention); 0: self-attention
  bool causal = false;                     // --causal
  std::string input_dtype = "FP32";        // --input-dtype FP32, BF16 or FP16: the wire type of the inputs
  bool stream = false;                     // --stream: InferStream instead of unary Infer
  bool kserve = false;                     // --kserve: the Open Inference Protocol's ModelInfer instead
  int64_t streams = 4;                     // --streams: streams of an open-loop --stream run
  int64_t connections = 1;                 // --connections: gRPC connections the requests spread over
  int64_t sessions = 0;                    // --sessions N: decode steps on N sessions (0: stateless calls)
  int64_t context = 1024;                  // --context C: tokens each session holds
  int64_t prefill = 0;                     // --prefill T: a background session prefilling T tokens at a time
  // How: one step per concurrency (closed loop), or per rate when --rate is given (open loop).
  std::vector<int64_t> concurrency = {1};  // --concurrency 1,4,16,64
  std::vector<double> rates;               // --rate N[,M...] requests per second
  absl::Duration duration = absl::Seconds(10);  // --duration, per step
  absl::Duration warmup = absl::Seconds(1);     // --warmup, per step, not recorded
  int64_t timeout_ms = 30'000;             // --timeout-ms per request (0: none)
  uint64_t seed = 1;                       // --seed of the random inputs and drawn lengths
  Format format = Format::kTable;          // --json / --csv
  bool quiet = false;                      // --quiet: no progress line
  bool help = false;                       // --help / -h

  bool open_loop() const { return !rates.empty(); }
};

// `args` excludes the program name. InvalidArgument naming the flag: unknown flags, positional arguments,
// bad values, --concurrency together with --rate, --seq together with --seq-dist, --json with --csv,
// --stream with --echo.
absl::StatusOr<BenchArgs> ParseBenchArgs(const std::vector<std::string>& args);

std::string BenchUsage();

}  // namespace attnserve
