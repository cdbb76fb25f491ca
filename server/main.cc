// attnserve: serves the configured attention layers over gRPC, with dynamic batching, health, reflection
// and Prometheus metrics. See README.md for flags and behaviour on SIGTERM.
#include <omp.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <future>
#include <iostream>
#include <thread>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/attention_service.h"
#include "server/batch_executor.h"
#include "server/cpu_budget.h"
#include "server/layer_registry.h"
#include "server/logging.h"
#include "server/metrics.h"
#include "server/server_config.h"
#include "server/server_flags.h"

namespace attnserve {
namespace {

constexpr char kServiceName[] = "attnserve.v1.AttentionService";
// Requests carry whole [B, L, E] tensors: gRPC's 4 MiB default would refuse a single [1, 2048, 768] query.
constexpr int kMaxMessageBytes = 64 << 20;
constexpr int kMaxConnectionAgeMs = 5 * 60 * 1000;
constexpr int kMaxConnectionAgeGraceMs = 30 * 1000;
// After SIGTERM, new calls are answered UNAVAILABLE by the service for at least this long (overlapping the
// drain, capped by the grace) before grpc::Server::Shutdown: gRPC fails calls that arrive once Shutdown has
// begun with CANCELLED, their handler never running (grpc/grpc#41785), so clients would otherwise see
// CANCELLED instead of UNAVAILABLE when their next request races the listener's close.
constexpr absl::Duration kUnavailableLinger = absl::Seconds(1);

BatchingOptions ToBatchingOptions(const attnserve::v1::BatchingConfig& b) {
  BatchingOptions o;
  o.max_batch_size = b.max_batch_size();
  o.max_queue_delay_us = b.max_queue_delay_us();
  o.max_queue_size = b.max_queue_size();
  o.max_batch_tokens = b.max_batch_tokens();
  return o;
}

int Run(int argc, char** argv) {
  // SIGTERM/SIGINT are taken by sigwait in this thread: blocked here, before any thread starts, so every
  // thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto flags = ParseServerFlags(argc, argv, [](const char* name) { return std::getenv(name); });
  if (!flags.ok()) {
    std::fprintf(stderr, "attnserve: %s\n\n%s", std::string(flags.status().message()).c_str(), ServerUsage().c_str());
    return 2;
  }
  if (flags->help) {
    std::fputs(ServerUsage().c_str(), stdout);
    return 0;
  }
  if (flags->version) {
    std::printf("attnserve %s\n", kAttnserveVersion);
    return 0;
  }
  ConfigureLogging(flags->log_level, flags->log_format);

  auto config = BuildServerConfig(*flags);
  if (!config.ok()) {
    spdlog::critical("invalid configuration: {}", std::string(config.status().message()));
    return 2;
  }

  // Threads: each worker computes a whole batch with oneDNN, which parallelises it over OpenMP threads.
  // Workers x OpenMP threads per worker = cores, so the two never oversubscribe the machine.
  const int cores = AvailableCpus();  // affinity mask and cgroup quota, as a container sees them
  const int workers = config->worker_threads();
  const int omp_threads = std::max(1, cores / workers);

  auto registry = LayerRegistry::Create(*config);
  if (!registry.ok()) {
    spdlog::critical("cannot load layers: {}", std::string(registry.status().message()));
    return 2;
  }
  std::vector<std::string> names;
  for (const auto& l : config->layers()) names.push_back(l.name());
  ServerMetrics metrics(names);
  if (absl::Status s = metrics.Serve(config->metrics_address()); !s.ok()) {
    spdlog::critical("{}", std::string(s.message()));
    return 2;
  }

  BatchExecutor executor(&metrics, RealClock());
  CallScheduler::Options scheduler_options;
  scheduler_options.worker_threads = workers;
  // An idle worker polls 200 us before sleeping: a request arriving meanwhile skips a thread wake-up
  // (tens of microseconds here); the cost is at most 200 us of one core after each batch.
  scheduler_options.idle_spin_us = 200;
  CallScheduler* queues = nullptr;  // set before the first batch can be queued
  auto scheduler = CallScheduler::Create(
      scheduler_options, [&](const std::string& layer, std::vector<CallScheduler::Entry> batch) {
        omp_set_num_threads(omp_threads);  // per worker thread; cheap to repeat
        metrics.SetQueueDepth(layer, static_cast<double>(queues->QueueDepth(layer)));
        executor.Run(layer, std::move(batch));
      });
  if (!scheduler.ok()) {
    spdlog::critical("{}", std::string(scheduler.status().message()));
    return 2;
  }
  queues = scheduler->get();
  for (const auto& l : config->layers()) {
    if (absl::Status s = (*scheduler)->AddQueue(l.name(), ToBatchingOptions(l.batching())); !s.ok()) {
      spdlog::critical("layer {}: {}", l.name(), std::string(s.message()));
      return 2;
    }
  }

  AttentionServiceImpl service(registry->get(), scheduler->get(), &metrics, RealClock());
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int grpc_port = 0;
  builder.AddListeningPort(config->grpc_address(), grpc::InsecureServerCredentials(), &grpc_port);
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  // Connections are recycled every few minutes so clients balancing over a headless Service (gRPC
  // round_robin) also reach replicas added since they connected; in-flight calls get the grace to end.
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, kMaxConnectionAgeMs);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, kMaxConnectionAgeGraceMs);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || grpc_port == 0) {
    spdlog::critical("grpc_address {}: cannot listen", config->grpc_address());
    return 2;
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus("", true);
  health->SetServingStatus(kServiceName, true);

  for (const ServedLayer* layer : (*registry)->layers()) {
    const auto& c = layer->config;
    spdlog::info("layer {}: embed_dim={} num_heads={} kdim={} vdim={} bias={} weights={} max_batch_size={} "
                 "max_queue_delay_us={} max_queue_size={} max_batch_tokens={} max_sequence_length={}",
                 c.name(), c.embed_dim(), c.num_heads(), c.kdim(), c.vdim(), c.bias(),
                 c.weights_path().empty() ? absl::StrCat("seed:", c.seed()) : c.weights_path(),
                 c.batching().max_batch_size(), c.batching().max_queue_delay_us(), c.batching().max_queue_size(),
                 c.batching().max_batch_tokens(), c.max_sequence_length());
  }
  spdlog::info("attnserve {} ready: grpc_port={} metrics_port={} grpc_address={} metrics_address={} workers={} "
               "omp_threads_per_worker={} layers={}",
               kAttnserveVersion, grpc_port, metrics.port(), config->grpc_address(), config->metrics_address(),
               workers, omp_threads, absl::StrJoin(names, ","));

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  const absl::Time stop_start = absl::Now();
  const absl::Time stop_deadline = stop_start + flags->shutdown_grace;
  health->Shutdown();         // NOT_SERVING for every service, at once
  service.StartShutdown();    // new requests: UNAVAILABLE
  // Logged once both hold, so whoever sees this line also sees NOT_SERVING and UNAVAILABLE.
  spdlog::info("received {}: draining (grace {})", signal_number == SIGTERM ? "SIGTERM" : "SIGINT",
               absl::FormatDuration(flags->shutdown_grace));
  // Answer everything accepted: the scheduler runs all queued batches, then stops its workers.
  auto drained = std::async(std::launch::async, [&] { (*scheduler)->Shutdown(); });
  const bool in_time =
      drained.wait_for(absl::ToChronoNanoseconds(stop_deadline - absl::Now())) == std::future_status::ready;
  if (in_time) absl::SleepFor(std::min(stop_start + kUnavailableLinger, stop_deadline) - absl::Now());
  // Waits for in-flight RPCs (their answers are being written) until the deadline, then cancels the rest.
  server->Shutdown(absl::ToChronoTime(stop_deadline));
  if (!in_time) {
    spdlog::error("shutdown grace of {} ran out before every queued request was answered",
                  absl::FormatDuration(flags->shutdown_grace));
    std::_Exit(1);
  }
  server->Wait();
  spdlog::info("stopped after {}", absl::FormatDuration(absl::Now() - stop_start));
  return 0;
}

}  // namespace
}  // namespace attnserve

int main(int argc, char** argv) { return attnserve::Run(argc, argv); }
