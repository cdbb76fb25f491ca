#include "tools/attnbench_args.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/command_line.h"
#include "common/status_macros.h"

namespace attnserve {
namespace {

constexpr int64_t kMaxDim = int64_t{1} << 20;

constexpr FlagSpec kFlags[] = {
    {"help", false},        {"target", true},      {"tls", false},       {"tls-root-certs", true},
    {"echo", false},        {"payload-bytes", true}, {"layer", true},    {"batch", true},
    {"seq", true},          {"seq-dist", true},    {"kv-seq", true},     {"causal", false},
    {"stream", false},      {"streams", true},     {"concurrency", true}, {"rate", true},
    {"duration", true},     {"warmup", true},      {"timeout-ms", true}, {"seed", true},
    {"json", false},        {"csv", false},        {"quiet", false},      {"tls-cert", true},
    {"tls-key", true},      {"token-file", true}, {"traceparent", true},  {"kserve", false},    {"sessions", true},
    {"context", true},      {"prefill", true},     {"connections", true}, {"input-dtype", true},
};

// --sessions N --context C [--prefill T]: decode steps on sessions, N closed-loop workers.
absl::Status ParseSessionFlags(const CommandLine& cl, BenchArgs* out) {
  if (!cl.Has("sessions")) {
    if (cl.Has("context") || cl.Has("prefill")) {
      return absl::InvalidArgumentError("--context and --prefill need --sessions");
    }
    return absl::OkStatus();
  }
  ATTN_ASSIGN_OR_RETURN(out->sessions, ParseIntFlag("sessions", *cl.Get("sessions"), 1, 4096));
  if (auto v = cl.Get("context")) {
    ATTN_ASSIGN_OR_RETURN(out->context, ParseIntFlag("context", *v, 1, kMaxDim));
  }
  if (auto v = cl.Get("prefill")) {
    ATTN_ASSIGN_OR_RETURN(out->prefill, ParseIntFlag("prefill", *v, 1, kMaxDim));
  }
  if (out->echo || out->stream || out->kserve || cl.Has("rate") || cl.Has("concurrency") || cl.Has("connections")) {
    return absl::InvalidArgumentError(
        "--sessions: a closed loop of one worker per session on one connection (not with --rate, --concurrency, "
        "--stream, --kserve, --echo, --connections)");
  }
  out->concurrency = {out->sessions};
  return absl::OkStatus();
}

}  // namespace

namespace {

// --target, TLS, token and trace context.
absl::Status ParseConnectionFlags(const CommandLine& cl, BenchArgs* out) {
  if (auto v = cl.Get("target")) out->target = *v;
  out->tls = cl.Has("tls");
  if (auto v = cl.Get("tls-root-certs")) out->tls_root_certs = *v;
  if (auto v = cl.Get("tls-cert")) out->tls_cert = *v;
  if (auto v = cl.Get("tls-key")) out->tls_key = *v;
  if (auto v = cl.Get("token-file")) out->token_file = *v;
  if (auto v = cl.Get("traceparent")) out->traceparent = *v;
  if ((!out->tls_root_certs.empty() || !out->tls_cert.empty()) && !out->tls) {
    return absl::InvalidArgumentError("--tls-root-certs and --tls-cert need --tls");
  }
  return absl::OkStatus();
}

// What each request is: echo payload, or the layer's shapes, and which RPC carries it.
absl::Status ParseRequestFlags(const CommandLine& cl, BenchArgs* out) {
  out->echo = cl.Has("echo");
  if (auto v = cl.Get("payload-bytes")) {
    ATTN_ASSIGN_OR_RETURN(out->payload_bytes, ParseIntFlag("payload-bytes", *v, 0, 64 << 20));
  }
  if (auto v = cl.Get("layer")) out->layer = *v;
  if (auto v = cl.Get("batch")) {
    ATTN_ASSIGN_OR_RETURN(out->batch, ParseIntFlag("batch", *v, 1, kMaxDim));
  }
  if (auto v = cl.Get("seq")) {
    ATTN_ASSIGN_OR_RETURN(out->seq, ParseIntFlag("seq", *v, 1, kMaxDim));
  }
  if (auto v = cl.Get("seq-dist")) {
    if (cl.Has("seq")) return absl::InvalidArgumentError("--seq and --seq-dist: give one of them");
    ATTN_ASSIGN_OR_RETURN(out->seq_dist, ParseSeqDist(*v));
  }
  if (auto v = cl.Get("kv-seq")) {
    ATTN_ASSIGN_OR_RETURN(out->kv_seq, ParseIntFlag("kv-seq", *v, 1, kMaxDim));
  }
  out->causal = cl.Has("causal");
  if (auto v = cl.Get("input-dtype")) {
    if (*v != "FP32" && *v != "BF16" && *v != "FP16") {
      return absl::InvalidArgumentError(absl::StrCat("--input-dtype: expected FP32, BF16 or FP16, got \"", *v, "\""));
    }
    out->input_dtype = *v;
  }
  out->stream = cl.Has("stream");
  if (out->stream && out->echo) return absl::InvalidArgumentError("--stream: the echo service is unary only");
  out->kserve = cl.Has("kserve");
  if (out->kserve && (out->stream || out->echo)) {
    return absl::InvalidArgumentError("--kserve: unary ModelInfer only (not with --stream or --echo)");
  }
  if (auto v = cl.Get("streams")) {
    ATTN_ASSIGN_OR_RETURN(out->streams, ParseIntFlag("streams", *v, 1, 1024));
  }
  return absl::OkStatus();
}

// How the load is offered: connections, closed or open loop, step timing, deadline, seed.
absl::Status ParseLoadFlags(const CommandLine& cl, BenchArgs* out) {
  if (auto v = cl.Get("connections")) {
    ATTN_ASSIGN_OR_RETURN(out->connections, ParseIntFlag("connections", *v, 1, 256));
  }
  if (auto v = cl.Get("concurrency")) {
    if (cl.Has("rate")) {
      return absl::InvalidArgumentError("--concurrency (closed loop) and --rate (open loop): give one of them");
    }
    ATTN_ASSIGN_OR_RETURN(out->concurrency, ParseIntListFlag("concurrency", *v, 1, 4096));
  }
  if (auto v = cl.Get("rate")) {
    ATTN_ASSIGN_OR_RETURN(out->rates, ParsePositiveDoubleListFlag("rate", *v));
  }
  if (auto v = cl.Get("duration")) {
    ATTN_ASSIGN_OR_RETURN(out->duration, ParseDurationFlag("duration", *v));
  }
  if (out->duration <= absl::ZeroDuration()) return absl::InvalidArgumentError("--duration: must be positive");
  if (auto v = cl.Get("warmup")) {
    ATTN_ASSIGN_OR_RETURN(out->warmup, ParseDurationFlag("warmup", *v));
  }
  if (auto v = cl.Get("timeout-ms")) {
    ATTN_ASSIGN_OR_RETURN(out->timeout_ms, ParseIntFlag("timeout-ms", *v, 0, 3'600'000));
  }
  if (auto v = cl.Get("seed")) {
    ATTN_ASSIGN_OR_RETURN(const int64_t seed, ParseIntFlag("seed", *v, 0, INT64_MAX));
    out->seed = static_cast<uint64_t>(seed);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<BenchArgs> ParseBenchArgs(const std::vector<std::string>& args) {
  ATTN_ASSIGN_OR_RETURN(const CommandLine cl, ParseCommandLine(args, kFlags));
  BenchArgs out;
  out.help = cl.Has("help");
  if (out.help) return out;
  if (!cl.positional.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("unexpected argument \"", cl.positional[0], "\" (attnbench takes flags only; see --help)"));
  }
  ATTN_RETURN_IF_ERROR(ParseConnectionFlags(cl, &out));
  ATTN_RETURN_IF_ERROR(ParseRequestFlags(cl, &out));
  ATTN_RETURN_IF_ERROR(ParseLoadFlags(cl, &out));
  if (cl.Has("json") && cl.Has("csv")) return absl::InvalidArgumentError("--json and --csv: give one of them");
  if (cl.Has("json")) out.format = BenchArgs::Format::kJson;
  if (cl.Has("csv")) out.format = BenchArgs::Format::kCsv;
  out.quiet = cl.Has("quiet");
  ATTN_RETURN_IF_ERROR(ParseSessionFlags(cl, &out));
  return out;
}

std::string BenchUsage() {
  return R"(Usage: attnbench [flags]

Load generator for attnserve (and for the echo server, the gRPC serving floor). One step per --concurrency
(closed loop) or --rate (open loop) value, each a --warmup then a --duration; per step: requests/s, latency
percentiles, errors by status code, the server's split of its time (queue, compute, batch size).

Target:
  --target TARGET        gRPC target (default 127.0.0.1:50051). Several servers round-robin:
                         ipv4:127.0.0.1:50051,127.0.0.1:50052 or dns:///name:50051
  --tls                  TLS instead of plaintext
  --tls-root-certs FILE  PEM root certificates for --tls (default: gRPC's)
  --tls-cert FILE        PEM client certificate (mTLS), with --tls-key FILE
  --token-file FILE      first line: the token sent as "authorization: Bearer" (default: $ATTNSERVE_TOKEN)
  --traceparent TP       W3C traceparent sent on every call (00-<trace id>-<span id>-<flags>); the first
                         error of each code is reported with the server's trace id either way
  --timeout-ms N         deadline per request, 0 = none (default 30000)

Requests (random values):
  --layer NAME           layer to call (default small); its dims come from GetLayer
  --batch B              sequences per request (default 1)
  --seq L                query length (default 128)
  --seq-dist uniform:A:B draw L per request, uniformly in [A, B] (ragged batching)
  --kv-seq S             separate key/value of length S (cross-attention); default self-attention
  --causal               causal attention
  --input-dtype T        FP32 (default), BF16 or FP16: query, key and value sent in that type (rounded)
  --stream               send on InferStream (answers matched by id) instead of unary Infer
  --kserve               send the Open Inference Protocol's ModelInfer (inference.GRPCInferenceService)
  --streams N            streams of an open-loop --stream run (default 4; closed loop: one per worker)
  --seed N               seed of the values and drawn lengths (default 1)
  --sessions N           decode steps on N sessions (attnserve.v1.SessionService), one worker each: each
                         session is prefilled with --context tokens, then every request appends one token
                         (the context kept within [C, C+64) by a truncation every 64 steps)
  --context C            tokens prefilled per session (default 1024)
  --prefill T            with --sessions: one more session prefills T tokens over and over meanwhile
  --echo                 call attnserve.bench.EchoService/Echo (attnserve_echo_server) instead
  --payload-bytes N      echo payload size (default 4096)

Load:
  --concurrency N[,M..]  closed loop: N workers, one request in flight each (default 1)
  --rate R[,S..]         open loop: R requests/s at fixed intended times; latency counts from the
                         intended time, so stalls show in the tail
  --duration D           measured time per step: 10s, 500ms, 2m or seconds (default 10s)
  --warmup D             unrecorded time before each step (default 1s)
  --connections N        gRPC connections (channels of their own) the requests spread over: worker i
                         (open loop: request i; --stream: stream i) uses connection i % N, so at most
                         that many are used (default 1: every request multiplexed on one HTTP/2
                         connection, as one client process would; many clients come on many)

Output:
  (default)              a table on stdout
  --json                 a JSON array of steps on stdout
  --csv                  CSV with a header row on stdout
  --quiet                no progress line (otherwise one per second on stderr when --duration > 2s)
  --help                 this text

Exit status: 0 when every step ran (failed requests are counted, not fatal), 1 for a usage error,
2 when the target cannot be reached or the layer cannot be looked up before the run.
)";
}

}  // namespace attnserve
