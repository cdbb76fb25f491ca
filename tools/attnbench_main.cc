// attnbench: the load generator for attnserve and for the echo server. Wires the pieces together: flags
// (attnbench_args), requests (attnbench_requests), senders (attnbench_senders), the closed and open loops
// (attnbench_runner), and the report (attnbench_report); adds the progress line. See BenchUsage().
#include <malloc.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "tools/attnbench_args.h"
#include "tools/attnbench_report.h"
#include "tools/attnbench_requests.h"
#include "tools/attnbench_runner.h"
#include "tools/attnbench_senders.h"
#include "tools/attnbench_sessions.h"
#include "client/client.h"
#include "client/grpc_status.h"
#include "common/status_macros.h"

namespace attnserve {
namespace {

constexpr int kExitUsage = 1;
constexpr int kExitUnreachable = 2;
// Looking up the layer (or trying the echo service) before the run should not wait a whole request timeout.
constexpr int64_t kProbeTimeoutMs = 10'000;

std::string Workload(const BenchArgs& a) {
  const std::string connections = a.connections > 1 ? absl::StrCat(" connections=", a.connections) : "";
  if (a.echo) return absl::StrCat("echo payload=", a.payload_bytes, "B unary", connections);
  if (a.sessions > 0) {
    return absl::StrCat(a.layer, " sessions=", a.sessions, " context=", a.context, " decode",
                        a.prefill > 0 ? absl::StrCat(" +prefill ", a.prefill) : "");
  }
  std::string w = absl::StrCat(a.layer, " B=", a.batch, " L=",
                               a.seq_dist.drawn ? absl::StrCat("uniform:", a.seq_dist.min, ":", a.seq_dist.max)
                                                : absl::StrCat(a.seq));
  if (a.kv_seq > 0) absl::StrAppend(&w, " S=", a.kv_seq);
  if (a.causal) absl::StrAppend(&w, " causal");
  absl::StrAppend(&w, a.stream ? " stream" : a.kserve ? " kserve" : " unary", connections);
  return w;
}

// Prints a line a second on stderr while a step runs: over itself on a terminal, one per line otherwise.
class ProgressLine {
 public:
  ProgressLine(const StepRecorder* recorder, std::string label, absl::Duration warmup, absl::Duration duration)
      : recorder_(recorder), label_(std::move(label)), warmup_(warmup), duration_(duration),
        tty_(isatty(STDERR_FILENO) == 1), thread_([this] { Loop(); }) {}
  ~ProgressLine() {
    stop_.Notify();
    thread_.join();
    if (tty_) std::fputs("\r\033[K", stderr);
  }

 private:
  void Loop() {
    const absl::Time start = absl::Now();
    while (!stop_.WaitForNotificationWithTimeout(absl::Seconds(1))) {
      const absl::Duration elapsed = absl::Now() - start;
      const StepStats s = recorder_->Snapshot();
      const double measured = absl::ToDoubleSeconds(elapsed - warmup_);
      std::string line = absl::StrFormat("attnbench %s: %.0fs/%.0fs%s  %d ok  %d errors", label_,
                                         absl::ToDoubleSeconds(elapsed), absl::ToDoubleSeconds(warmup_ + duration_),
                                         measured < 0 ? " (warmup)" : "", s.ok, s.error_count());
      if (measured > 0) {
        absl::StrAppendFormat(&line, "  %.1f req/s  p50 %.2f ms  p99 %.2f ms",
                              static_cast<double>(s.requests()) / measured, s.latency_ns.Percentile(50) / 1e6,
                              s.latency_ns.Percentile(99) / 1e6);
      }
      std::fprintf(stderr, tty_ ? "\r\033[K%s" : "%s\n", line.c_str());
      std::fflush(stderr);
    }
  }

  const StepRecorder* recorder_;
  std::string label_;
  absl::Duration warmup_, duration_;
  bool tty_;
  absl::Notification stop_;
  std::thread thread_;
};

// The error exit for a failed probe, with what a shell user can do about it.
int ProbeFailed(const BenchArgs& args, const absl::Status& status) {
  std::fprintf(stderr, "attnbench: %s at %s: %s: %s\n", args.echo ? "echo service" : "layer lookup",
               args.target.c_str(), StatusCodeName(static_cast<int>(status.code())).c_str(),
               std::string(status.message()).c_str());
  if (status.code() == absl::StatusCode::kUnavailable || status.code() == absl::StatusCode::kDeadlineExceeded) {
    std::fprintf(stderr, "attnbench: is the server running at --target %s?\n", args.target.c_str());
  } else if (status.code() == absl::StatusCode::kNotFound) {
    std::fprintf(stderr, "attnbench: no layer \"%s\" there (attnctl list shows the layers)\n", args.layer.c_str());
  }
  return kExitUnreachable;
}

absl::Status ProbeEcho(const Client& client) {
  auto stub = attnserve::bench::EchoService::NewStub(client.channel());
  grpc::ClientContext context;
  client.PrepareContext(&context, kProbeTimeoutMs);
  attnserve::bench::EchoMessage request, response;
  return FromGrpcStatus(stub->Echo(&context, request, &response));
}

// `connections` clients of `options`; with more than one, each opens a connection of its own.
absl::StatusOr<std::vector<std::unique_ptr<Client>>> CreateClients(Client::Options options, int64_t connections) {
  options.own_connection = connections > 1;
  std::vector<std::unique_ptr<Client>> clients;
  for (int64_t i = 0; i < connections; ++i) {
    ATTN_ASSIGN_OR_RETURN(auto client, Client::Create(options));
    clients.push_back(std::move(client));
  }
  return clients;
}

std::vector<const Client*> RawPointers(const std::vector<std::unique_ptr<Client>>& clients) {
  std::vector<const Client*> out;
  for (const auto& c : clients) out.push_back(c.get());
  return out;
}

// The client options the flags ask for (the token from the environment or --token-file).
absl::StatusOr<Client::Options> ClientOptions(const BenchArgs& args) {
  Client::Options options;
  options.target = args.target;
  options.use_tls = args.tls;
  options.tls_root_certs_path = args.tls_root_certs;
  options.tls_cert_path = args.tls_cert;
  options.tls_key_path = args.tls_key;
  ATTN_ASSIGN_OR_RETURN(options.token, Client::TokenFromEnvironmentOrFile(args.token_file, std::getenv));
  options.traceparent = args.traceparent;
  options.default_timeout_ms = args.timeout_ms;
  return options;
}

// The requests for `layer` as the flags shape them.
absl::StatusOr<std::unique_ptr<InferRequestSource>> MakeSource(const BenchArgs& args,
                                                               const attnserve::v1::Layer& layer) {
  InferRequestSource::Options r;
  r.layer = args.layer;
  r.embed_dim = layer.config().embed_dim();
  r.kdim = layer.config().kdim() > 0 ? layer.config().kdim() : r.embed_dim;
  r.vdim = layer.config().vdim() > 0 ? layer.config().vdim() : r.embed_dim;
  r.batch = args.batch;
  r.seq_len = args.seq;
  r.seq_dist = args.seq_dist;
  r.kv_seq_len = args.kv_seq;
  r.is_causal = args.causal;
  r.input_dtype = args.input_dtype;
  r.seed = args.seed;
  return InferRequestSource::Create(r);
}

// Step `step`'s sender: sessions, echo, streams, KServe or unary Infer.
absl::StatusOr<std::unique_ptr<RequestSender>> MakeSender(const BenchArgs& args, const ClientLanes& lanes,
                                                          InferRequestSource* source, const StepReport& report,
                                                          size_t step) {
  if (args.sessions > 0) {
    auto made = SessionAppendSender::Create(
        &lanes.ForLane(0), {args.layer, args.sessions, args.context, args.prefill, args.seed,
                          absl::StrCat(getpid(), "-", step)});
    if (!made.ok()) return absl::Status(made.status().code(), absl::StrCat("sessions: ", made.status().message()));
    return std::unique_ptr<RequestSender>(std::move(*made));
  }
  if (args.echo) return std::make_unique<EchoSender>(lanes, args.payload_bytes, args.timeout_ms);
  if (args.stream) {
    // Streams carry no per-request deadline: the whole stream ends at the latest a timeout after the step.
    const absl::Duration limit = args.warmup + args.duration +
                                 (args.timeout_ms > 0 ? absl::Milliseconds(args.timeout_ms) : absl::Hours(24));
    return std::make_unique<StreamInferSender>(lanes, source, report.open_loop ? args.streams : report.concurrency,
                                               absl::ToChronoTime(absl::Now() + limit));
  }
  if (args.kserve) return std::make_unique<KServeInferSender>(lanes, source, args.timeout_ms);
  return std::make_unique<UnaryInferSender>(lanes, source, args.timeout_ms);
}

// Runs one step with `sender` (closed or open loop, the progress line meanwhile) and fills report's results.
absl::Status RunStep(const BenchArgs& args, std::unique_ptr<RequestSender> sender, StepReport* report) {
  StepRecorder recorder;
  absl::StatusOr<LoopResult> result;
  {
    const std::string label = report->open_loop ? absl::StrFormat("rate=%g", report->target_rate)
                                                : absl::StrCat("c=", report->concurrency);
    std::unique_ptr<ProgressLine> progress;
    if (!args.quiet && args.duration > absl::Seconds(2)) {
      progress = std::make_unique<ProgressLine>(&recorder, label, args.warmup, args.duration);
    }
    if (report->open_loop) {
      result = RunOpenLoop(sender.get(), RealBenchClock(), {report->target_rate, args.warmup, args.duration},
                           &recorder);
    } else {
      result = RunClosedLoop(sender.get(), RealBenchClock(), {report->concurrency, args.warmup, args.duration},
                             &recorder);
    }
  }
  if (const auto* sessions = dynamic_cast<const SessionAppendSender*>(sender.get())) {
    report->prefills = sessions->prefills_done();
    report->prefill_seconds_mean = sessions->prefill_seconds_mean();
  }
  sender.reset();  // streams end here, before the next step starts
  if (!result.ok()) return result.status();
  report->elapsed_seconds = result->elapsed_seconds;
  report->stats = recorder.Snapshot();
  return absl::OkStatus();
}

int Fail(const absl::Status& status, int exit_code) {
  std::fprintf(stderr, "attnbench: %s\n", std::string(status.message()).c_str());
  return exit_code;
}

void PrintReports(BenchArgs::Format format, const std::vector<StepReport>& reports) {
  switch (format) {
    case BenchArgs::Format::kTable: std::fputs(FormatTable(reports).c_str(), stdout); break;
    case BenchArgs::Format::kJson: std::fputs(FormatJson(reports).c_str(), stdout); break;
    case BenchArgs::Format::kCsv: std::fputs(FormatCsv(reports).c_str(), stdout); break;
  }
}

int Run(int argc, char** argv) {
  auto args = ParseBenchArgs(std::vector<std::string>(argv + 1, argv + argc));
  if (!args.ok()) {
    std::fprintf(stderr, "attnbench: %s\n(see attnbench --help)\n", std::string(args.status().message()).c_str());
    return kExitUsage;
  }
  if (args->help) {
    std::fputs(BenchUsage().c_str(), stdout);
    return 0;
  }
  auto options = ClientOptions(*args);
  if (!options.ok()) return Fail(options.status(), kExitUnreachable);
  auto clients = CreateClients(*options, args->connections);
  if (!clients.ok()) return Fail(clients.status(), kExitUsage);
  const ClientLanes lanes(RawPointers(*clients));
  std::unique_ptr<InferRequestSource> source;
  if (args->echo) {
    if (absl::Status s = ProbeEcho(lanes.ForLane(0)); !s.ok()) return ProbeFailed(*args, s);
  } else {
    auto layer = lanes.ForLane(0).GetLayer(args->layer);
    if (!layer.ok()) return ProbeFailed(*args, layer.status());
    auto created = MakeSource(*args, *layer);
    if (!created.ok()) return Fail(created.status(), kExitUsage);
    source = std::move(*created);
  }
  const size_t steps = args->open_loop() ? args->rates.size() : args->concurrency.size();
  std::vector<StepReport> reports;
  for (size_t i = 0; i < steps; ++i) {
    StepReport& report = reports.emplace_back();
    report.workload = Workload(*args);
    report.open_loop = args->open_loop();
    if (report.open_loop) {
      report.target_rate = args->rates[i];
    } else {
      report.concurrency = args->concurrency[i];
    }
    auto sender = MakeSender(*args, lanes, source.get(), report, i);
    if (!sender.ok()) return Fail(sender.status(), kExitUnreachable);
    if (absl::Status s = RunStep(*args, std::move(*sender), &report); !s.ok()) return Fail(s, kExitUsage);
  }
  PrintReports(args->format, reports);
  return 0;
}

}  // namespace
}  // namespace attnserve

// Leaves without running static destructors: calls cut off at the end of the last step may still be finishing
// on gRPC's callback threads, and libgrpc's statics torn down under them crashed the tool at exit (SIGSEGV in
// grpc_completion_queue_next after main returned, with the report already printed).
int main(int argc, char** argv) {
  // The load generator's own cost is taken from the server it measures on a shared machine (BENCHMARKS.md):
  // - glibc's default 128 KiB trim threshold gave every freed answer buffer back to the system and faulted
  //   it in again for the next one (page faults and zeroing were a tenth of attnbench's time);
  mallopt(M_MMAP_THRESHOLD, 4 << 20);
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
  // - abseil's deadlock detector (on in Debian's build) bookkeeps every Mutex and Notification made.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  const int code = attnserve::Run(argc, argv);
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(code);
}
