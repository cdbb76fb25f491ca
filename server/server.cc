#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/server_builder_option.h>
#include <grpcpp/impl/server_builder_plugin.h>
#include <malloc.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "common/log_string.h"
#include "common/process_memory.h"
#include "common/status_macros.h"
#include "common/thread_name.h"
#include "common/version.h"
#include "core/bf16_rows.h"
#include "core/team_scratch.h"
#include "server/api/attention_service.h"
#include "server/api/authorizer.h"
#include "server/api/grpc_logging.h"
#include "server/api/kserve_service.h"
#include "server/api/served_rpc.h"
#include "server/api/session_service.h"
#include "server/api/transport_credentials.h"
#include "server/observability/access_log.h"
#include "server/runtime/background_priority.h"
#include "server/runtime/batch_executor.h"
#include "server/runtime/cpu_shares.h"
#include "server/runtime/dispatcher.h"
#include "server/runtime/heap_trim_policy.h"
#include "server/runtime/layer_catalog.h"
#include "server/runtime/layer_warmup.h"
#include "server/runtime/live_layer_bytes.h"
#include "server/runtime/load_heap_pad.h"
#include "server/runtime/memory_budget.h"
#include "server/security/credential_store.h"
#include "server/startup/cpu_budget.h"
#include "server/startup/layer_options.h"
#include "server/startup/restart_fields.h"
#include "server/startup/server_config.h"
#include "server/startup/transport_config.h"
#include "server/transport/connection_cap.h"
#include "server/transport/listener_probe.h"
#include "server/transport/memory_guard.h"
#include "server/transport/reset_flood_guard.h"

namespace attnserve {
namespace {

constexpr char kServiceName[] = "attnserve.v1.AttentionService";
// Requests carry whole [B, L, E] tensors: gRPC's 4 MiB default would refuse a single [1, 2048, 768] query.
constexpr int kMaxMessageBytes = 64 << 20;
// Connections are recycled every few minutes so clients balancing over a headless Service (gRPC
// round_robin) also reach replicas added since they connected; in-flight calls get the grace to end.
constexpr int kMaxConnectionAgeMs = 5 * 60 * 1000;
constexpr int kMaxConnectionAgeGraceMs = 30 * 1000;

// The scheduler reports its queue depths and running batches straight to the metrics.
class MetricsObserver final : public SchedulerObserver {
 public:
  explicit MetricsObserver(ServerMetrics* metrics) : metrics_(metrics) {}
  void QueueDepthChanged(const std::string& queue, size_t depth) override {
    metrics_->SetQueueDepth(queue, static_cast<double>(depth));
  }
  void InflightBatchesChanged(int64_t batches) override { metrics_->SetInflightBatches(batches); }

 private:
  ServerMetrics* metrics_;
};

// The services of ours on the gRPC port (gRPC's health and reflection services beside them).
constexpr const char* kServedServices[] = {"attnserve.v1.AttentionService", "inference.GRPCInferenceService",
                                           "attnserve.v1.SessionService"};

// The only interceptor: reflection behind tokens, which has no handler of ours. Installed only then (tokens
// and reflection on): gRPC 1.51 does per-stream work for every stream once any interceptor factory is
// installed (api/served_rpc.h says why the handlers count calls and start traces themselves).
std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> Interceptors(
    const Authorizer* authorizer, bool reflection) {
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  if (authorizer->enabled() && reflection) {
    interceptors.push_back(std::make_unique<ReflectionGuardFactory>(authorizer));
  }
  return interceptors;
}

// A connection the transport's defences shut down: one line each, at most 10 a second with a count of those
// dropped, so that a client opening connection after connection cannot flood the log (they are all counted in
// the metrics).
void WarnConnectionShut(const std::string& line) {
  static LogRateLimiter* const limiter = new LogRateLimiter(/*lines_per_second=*/10);
  int64_t dropped = 0;
  if (!limiter->Allow(absl::Now(), &dropped)) return;
  spdlog::warn("{}{}", line, dropped > 0 ? absl::StrCat(" (", dropped, " similar lines dropped)") : "");
}

// Removes gRPC's reflection plugin from a builder. Debian's libgrpc++_reflection registers it for every
// server of the process when the library loads, so not calling InitProtoReflectionServerBuilderPlugin is not
// enough to serve without reflection.
class WithoutReflection final : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments* /*args*/) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->erase(std::remove_if(plugins->begin(), plugins->end(),
                                  [](const auto& plugin) { return plugin->name() == "proto_server_reflection"; }),
                   plugins->end());
  }
};

}  // namespace

// Declared in the order they are built; destroyed in reverse, so gRPC stops before the services and the
// scheduler (which runs what is still queued) before the executor.
struct Server::Parts {
  std::unique_ptr<CredentialStore> metrics_users;  // before metrics: the exposer's threads ask it
  std::unique_ptr<CredentialStore> tokens;
  std::unique_ptr<Authorizer> authorizer;
  std::unique_ptr<LayerRegistry> registry;
  std::unique_ptr<LoadHeapPad> load_heap_pad;
  std::unique_ptr<ServerMetrics> metrics;
  std::unique_ptr<CallCounts> call_counts;  // in metrics' registry; outlives the gRPC servers that count
  std::unique_ptr<AccessLog> access_log;  // may be null; outlives the dispatcher, which writes to it
  std::unique_ptr<MetricsObserver> observer;
  std::unique_ptr<MemoryBudget> memory;
  std::unique_ptr<CpuShares> cpu_shares;  // the workers' batches and memory projections divide the CPUs
  std::unique_ptr<BatchExecutor> executor;
  std::unique_ptr<BatchExecutor> express_executor;  // the express lane's: one thread per request
  std::unique_ptr<CallScheduler> scheduler;
  std::unique_ptr<Dispatcher> dispatcher;
  std::unique_ptr<KvCachePool> kv_pool;   // outlives the sessions, whose caches it holds
  std::unique_ptr<SessionStore> sessions;
  std::unique_ptr<LayerCatalog> catalog;
  std::unique_ptr<AttentionServiceImpl> service;
  std::unique_ptr<SessionServiceImpl> session_service;
  std::unique_ptr<KServeServiceImpl> kserve;  // its control thread may still load: before the catalog goes
  std::unique_ptr<grpc::Server> grpc_server;
  // Every other method: UNIMPLEMENTED, counted; one for each port (gRPC registers a generic service with one
  // server only). On the health-only port it is also the one service of ours, without which gRPC builds no
  // server (it adds its health service beside it).
  std::unique_ptr<UnknownMethodService> unknown_methods;
  std::unique_ptr<UnknownMethodService> health_unknown_methods;
  // The plaintext health-only listener (health_address).
  std::unique_ptr<grpc::Server> health_server;
  int health_port = 0;
  std::unique_ptr<ListenerProbe> listener_probe;  // first to stop
  std::unique_ptr<MemoryGuard> memory_guard;
  std::unique_ptr<ConnectionCap> connection_cap;
  std::unique_ptr<ResetFloodGuard> reset_flood_guard;
  int grpc_port = 0;
  bool drained = false;
  std::atomic<bool> loads_abandoned{false};  // set by Drain: a load running stops at its next step
  // Gives freed heap memory back to the system as the RSS grows and while idle (StartTrimmer).
  std::unique_ptr<HeapTrimPolicy> heap_trim;
  absl::Notification stop_trimming;
  std::thread trimmer;
};

Server::Server(const attnserve::v1::ServerConfig& config, const ServerOptions& options)
    : config_(config),
      options_(options),
      // A batch alone uses every CPU; batches at once divide them (runtime/cpu_shares.h).
      threads_per_batch_(options.cpus > 0 ? options.cpus : AvailableCpus()),
      worker_threads_(WorkerThreadsFor(config.worker_threads(), threads_per_batch_, kMaxAutoWorkerThreads)),
      parts_(std::make_unique<Parts>()) {}

Server::~Server() {
  if (parts_->grpc_server != nullptr && !parts_->drained) Drain(absl::InfiniteFuture()).IgnoreError();
  StopTrimmer();
  // A load still running on the KServe control thread uses the whole server (layers_mu_ too): it finishes
  // while all of it is alive.
  if (parts_->kserve != nullptr) parts_->kserve->StopControlThread();
  if (parts_->session_service != nullptr) parts_->session_service->StopOpener();
}

absl::StatusOr<std::unique_ptr<Server>> Server::Create(const attnserve::v1::ServerConfig& config,
                                                       const ServerOptions& options) {
  if (options.clock == nullptr) return absl::InvalidArgumentError("ServerOptions.clock must not be null");
  std::unique_ptr<Server> server(new Server(config, options));
  ATTN_RETURN_IF_ERROR(server->Build());
  return server;
}

absl::Status Server::Build() {
  Parts& p = *parts_;
  ATTN_RETURN_IF_ERROR(BuildCredentialStores());
  ATTN_ASSIGN_OR_RETURN(p.registry, LayerRegistry::Create(config_));
  ATTN_RETURN_IF_ERROR(WarmUpConfiguredLayers());
  LoadHeapPad::Options pad;
  pad.pad_bytes = options_.load_heap_pad_bytes;
  pad.hold = options_.load_heap_pad_hold;
  pad.clock = options_.clock;
  ATTN_ASSIGN_OR_RETURN(p.load_heap_pad, LoadHeapPad::Create(std::move(pad)));
  std::vector<std::string> names;
  for (const auto& l : config_.layers()) names.push_back(l.name());
  p.metrics = std::make_unique<ServerMetrics>(names);
  p.call_counts = std::make_unique<CallCounts>(
      *p.metrics->registry(), ServedMethodPaths({std::begin(kServedServices), std::end(kServedServices)}));
  p.unknown_methods = std::make_unique<UnknownMethodService>(p.call_counts.get());
  p.health_unknown_methods = std::make_unique<UnknownMethodService>(p.call_counts.get());
  for (const auto& layer : p.registry->Layers()) p.metrics->SetLayerVersion(layer->config.name(), layer->version);
  p.observer = std::make_unique<MetricsObserver>(p.metrics.get());
  ATTN_RETURN_IF_ERROR(BuildMemoryBudget());
  ATTN_ASSIGN_OR_RETURN(p.cpu_shares, CpuShares::Create({threads_per_batch_}));
  BatchExecutor::Options executor{p.metrics.get(), options_.clock, threads_per_batch_, p.cpu_shares.get(),
                                  &CallScheduler::ThisWorkerLooksForWorkSoon};
  ATTN_ASSIGN_OR_RETURN(p.executor, BatchExecutor::Create(executor));
  ATTN_ASSIGN_OR_RETURN(p.express_executor, BatchExecutor::Create({p.metrics.get(), options_.clock, 1}));
  CallScheduler::Options scheduler_options;
  scheduler_options.worker_threads = worker_threads_;
  scheduler_options.clock = options_.clock;
  scheduler_options.idle_spin_us = options_.idle_spin_us;
  scheduler_options.observer = p.observer.get();
  scheduler_options.on_idle = [] {  // a burst's scratch goes back when it ends, on the largest team it ran
    ReleaseTeamScratch(std::max(1, CpuShares::TakeLargestTeamOnThisThread()));
  };
  scheduler_options.idle_release_delay_us = 200'000;
  scheduler_options.long_item_cost = options_.long_request_flops;
  scheduler_options.cost = [](const std::unique_ptr<InferenceCall>& call) {
    return static_cast<double>(call->parsed.flops);
  };
  const auto run_on = [](const BatchExecutor* executor) {
    return [executor](const std::string& layer, auto batch) { executor->Run(layer, std::move(batch)); };
  };
  ATTN_ASSIGN_OR_RETURN(p.scheduler, CallScheduler::Create(scheduler_options, run_on(p.executor.get()),
                                                           run_on(p.express_executor.get())));
  for (const auto& l : config_.layers()) {
    ATTN_RETURN_IF_ERROR(p.scheduler->AddQueue(l.name(), ToBatchingOptions(l.batching())));
    p.metrics->SetQueueCapacity(l.name(), l.batching().max_queue_size());
  }
  if (!options_.access_log_path.empty()) {
    AccessLog::Options access_log;
    access_log.path = options_.access_log_path;
    ATTN_ASSIGN_OR_RETURN(p.access_log, AccessLog::Create(access_log));
  }
  ATTN_ASSIGN_OR_RETURN(p.dispatcher, Dispatcher::Create({p.registry.get(), p.scheduler.get(), p.metrics.get(),
                                                          p.memory.get(), p.access_log.get(), options_.clock}));
  p.service = std::make_unique<AttentionServiceImpl>(p.registry.get(), p.dispatcher.get(), options_.clock,
                                                     config_.max_inflight_per_stream(), p.authorizer.get(),
                                                     p.call_counts.get());
  ATTN_RETURN_IF_ERROR(BuildSessions());
  return BuildKServe();
}

absl::Status Server::BuildSessions() {
  Parts& p = *parts_;
  const attnserve::v1::SessionsConfig& c = config_.sessions();
  std::string source = "sessions.kv_cache_bytes";
  int64_t pool_bytes = c.kv_cache_bytes();
  if (pool_bytes == 0) {
    pool_bytes = ProcessMemoryLimitBytes(&source) / 4;
    source = "a quarter of " + source;
  }
  ATTN_ASSIGN_OR_RETURN(p.kv_pool,
                        KvCachePool::Create({pool_bytes, c.kv_block_tokens() > 0 ? c.kv_block_tokens() : 16}));
  SessionStore::Options store;
  store.pool = p.kv_pool.get();
  store.registry = p.registry.get();
  store.clock = options_.clock;
  store.metrics = p.metrics.get();
  store.memory = p.memory.get();
  store.shares = p.cpu_shares.get();
  store.submit = [dispatcher = p.dispatcher.get()](std::unique_ptr<InferenceCall> call) {
    dispatcher->Submit(std::move(call));
  };
  store.instrument = [dispatcher = p.dispatcher.get()](InferenceCall& call) { dispatcher->Instrument(call); };
  if (c.idle_timeout_ms() > 0) store.default_idle_timeout_ms = c.idle_timeout_ms();
  if (c.max_sessions() > 0) store.max_sessions = c.max_sessions();
  if (c.max_queued_appends() > 0) store.max_queued_appends = c.max_queued_appends();
  if (c.prefill_chunk_tokens() > 0) store.prefill_chunk_tokens = c.prefill_chunk_tokens();
  ATTN_ASSIGN_OR_RETURN(p.sessions, SessionStore::Create(store));
  p.session_service = std::make_unique<SessionServiceImpl>(
      p.sessions.get(), options_.clock, config_.max_inflight_per_stream(), p.authorizer.get(), p.call_counts.get(),
      c.max_opens_waiting() > 0 ? c.max_opens_waiting() : SessionServiceImpl::kMaxOpensWaiting);
  spdlog::info("sessions: KV cache pool of {} bytes ({}), blocks of {} tokens", pool_bytes, source,
               p.kv_pool->block_tokens());
  return absl::OkStatus();
}

absl::Status Server::BuildKServe() {
  Parts& p = *parts_;
  LayerCatalog::Options catalog;
  catalog.configured.assign(config_.layers().begin(), config_.layers().end());
  catalog.registry = p.registry.get();
  catalog.load = [this](const attnserve::v1::LayerConfig& layer) { return LoadLayer(layer); };
  catalog.unload = [this](const std::string& name) { return UnloadLayer(name); };
  ATTN_ASSIGN_OR_RETURN(p.catalog, LayerCatalog::Create(std::move(catalog)));
  KServeServiceImpl::Options kserve;
  kserve.registry = p.registry.get();
  kserve.dispatcher = p.dispatcher.get();
  kserve.clock = options_.clock;
  kserve.authorizer = p.authorizer.get();
  kserve.catalog = p.catalog.get();
  kserve.statistics = &p.metrics->statistics();
  kserve.max_inflight_per_stream = config_.max_inflight_per_stream();
  kserve.model_control_without_tokens = config_.security().enable_model_control();
  kserve.calls = p.call_counts.get();
  ATTN_ASSIGN_OR_RETURN(p.kserve, KServeServiceImpl::Create(kserve));
  return absl::OkStatus();
}

absl::Status Server::BuildCredentialStores() {
  Parts& p = *parts_;
  const auto& security = config_.security();
  if (!security.auth_token_file().empty()) {
    ATTN_ASSIGN_OR_RETURN(p.tokens, CredentialStore::Create({security.auth_token_file(), CredentialFileKind::kTokens,
                                                             options_.credential_reload_interval}));
  }
  if (!security.metrics_auth_file().empty()) {
    ATTN_ASSIGN_OR_RETURN(p.metrics_users,
                          CredentialStore::Create({security.metrics_auth_file(), CredentialFileKind::kBasicAuth,
                                                   options_.credential_reload_interval}));
  }
  p.authorizer = std::make_unique<Authorizer>(p.tokens.get());
  return absl::OkStatus();
}

namespace {

// Every connection costs a descriptor: with the usual soft limit of 1024 a flood of idle connections
// exhausts them long before the hard limit, and gRPC 1.51's accept loop does not recover from EMFILE.
void RaiseFileLimit() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur >= limit.rlim_max) return;
  const rlim_t before = limit.rlim_cur;
  limit.rlim_cur = limit.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &limit) == 0) {
    spdlog::info("file descriptor limit raised from {} to {}", static_cast<uint64_t>(before),
                 static_cast<uint64_t>(limit.rlim_max));
  }
}

}  // namespace

absl::Status Server::Start() {
  Parts& p = *parts_;
  RaiseFileLimit();
  RouteGrpcLogsToSpdlog();
  ServerMetrics::BasicAuthCheck metrics_auth;
  if (p.metrics_users != nullptr) {
    metrics_auth = [users = p.metrics_users.get()](const std::string& user, const std::string& password) {
      return users->ScopesOf(user, password) != kScopeNone;
    };
  }
  ATTN_RETURN_IF_ERROR(p.metrics->Serve(config_.metrics_address(), std::move(metrics_auth)));
  ATTN_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                        BuildServerCredentials(config_.security()));
  grpc::EnableDefaultHealthCheckService(true);
  const bool reflection = options_.enable_reflection && !config_.security().disable_reflection();
  if (reflection) grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (!reflection) builder.SetOption(std::make_unique<WithoutReflection>());
  builder.AddListeningPort(config_.grpc_address(), credentials, &p.grpc_port);
  ConfigureTransport(&builder);
  const std::pair<const char*, grpc::Service*> services[] = {{kServedServices[0], p.service.get()},
                                                             {kServedServices[1], p.kserve.get()},
                                                             {kServedServices[2], p.session_service.get()}};
  for (const auto& [name, service] : services) {
    // Each base is composed by hand (raw methods beside callback ones): a method left synchronous would be
    // served by gRPC's sync thread pool, outside the server's admission.
    if (service->has_synchronous_methods()) return absl::InternalError(absl::StrCat(name, " has a synchronous method"));
    builder.RegisterService(service);
  }
  builder.RegisterCallbackGenericService(p.unknown_methods.get());
  builder.experimental().SetInterceptorCreators(Interceptors(p.authorizer.get(), reflection));
  p.grpc_server = builder.BuildAndStart();
  if (p.grpc_server == nullptr || p.grpc_port == 0) {
    p.grpc_server.reset();
    return absl::UnavailableError(absl::StrCat("grpc_address ", config_.grpc_address(), ": cannot listen"));
  }
  ATTN_RETURN_IF_ERROR(StartHealthServer());
  SetServing();
  LogLayers();
  StartTrimmer();
  ATTN_RETURN_IF_ERROR(StartListenerProbe());
  ATTN_RETURN_IF_ERROR(StartMemoryGuard());
  ATTN_RETURN_IF_ERROR(StartConnectionCap());
  ATTN_RETURN_IF_ERROR(StartResetFloodGuard());
  spdlog::info("attnserve {} ready: grpc_port={} metrics_port={} grpc_address={} metrics_address={} workers={} "
               "omp_threads_per_batch={} tls={} mtls={} tokens={} metrics_auth={} reflection={} health_port={}",
               kAttnserveVersion, p.grpc_port, p.metrics->port(), config_.grpc_address(),
               config_.metrics_address(), worker_threads_, threads_per_batch_,
               !config_.security().tls_cert_file().empty(), !config_.security().tls_client_ca_file().empty(),
               p.tokens != nullptr, p.metrics_users != nullptr, reflection, p.health_port);
  return absl::OkStatus();
}

absl::Status Server::StartHealthServer() {
  Parts& p = *parts_;
  if (config_.health_address().empty()) return absl::OkStatus();
  grpc::ServerBuilder builder;
  builder.SetOption(std::make_unique<WithoutReflection>());
  builder.RegisterCallbackGenericService(p.health_unknown_methods.get());
  builder.AddListeningPort(config_.health_address(), grpc::InsecureServerCredentials(), &p.health_port);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, 4);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS,
                             static_cast<int>(config_.transport().max_connection_idle_ms()));
  builder.SetMaxReceiveMessageSize(4096);
  p.health_server = builder.BuildAndStart();
  if (p.health_server == nullptr || p.health_port == 0) {
    p.health_server.reset();
    return absl::UnavailableError(absl::StrCat("health_address ", config_.health_address(), ": cannot listen"));
  }
  return absl::OkStatus();
}

void Server::SetServing() {
  for (grpc::Server* server : {parts_->grpc_server.get(), parts_->health_server.get()}) {
    if (server == nullptr) continue;
    server->GetHealthCheckService()->SetServingStatus("", true);
    server->GetHealthCheckService()->SetServingStatus(kServiceName, true);
  }
}

void Server::ConfigureTransport(grpc::ServerBuilder* builder) const {
  const auto& t = config_.transport();
  builder->SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder->SetMaxSendMessageSize(kMaxMessageBytes);
  builder->AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, kMaxConnectionAgeMs);
  builder->AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, kMaxConnectionAgeGraceMs);
  builder->AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, t.max_concurrent_streams());
  builder->AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS, static_cast<int>(t.max_connection_idle_ms()));
  builder->AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                              static_cast<int>(t.keepalive_min_ping_interval_ms()));
  builder->AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, t.max_ping_strikes());
  builder->AddChannelArgument(GRPC_ARG_MAX_METADATA_SIZE, static_cast<int>(t.max_metadata_bytes()));
  // Identity only: gRPC 1.51 inflates a compressed message whole before checking its size (a 1 MiB gzip
  // bomb costs 1 GiB); a compressed request is refused (UNIMPLEMENTED) before it is inflated. Float tensors
  // hardly compress anyway.
  builder->AddChannelArgument(GRPC_COMPRESSION_CHANNEL_ENABLED_ALGORITHMS_BITSET, 1 << GRPC_COMPRESS_NONE);
  grpc::ResourceQuota quota("attnserve");
  const int64_t grpc_memory = GrpcMemoryBytes(t, parts_->memory->budget_bytes());
  quota.Resize(static_cast<size_t>(grpc_memory));
  quota.SetMaxThreads(t.grpc_max_threads());
  builder->SetResourceQuota(quota);
  spdlog::info("transport: max_concurrent_streams={} max_connection_idle_ms={} keepalive_min_ping_interval_ms={} "
               "max_ping_strikes={} grpc_memory_bytes={} grpc_max_threads={} max_metadata_bytes={}",
               t.max_concurrent_streams(), t.max_connection_idle_ms(), t.keepalive_min_ping_interval_ms(),
               t.max_ping_strikes(), grpc_memory, t.grpc_max_threads(), t.max_metadata_bytes());
}

absl::Status Server::StartListenerProbe() {
  const auto& t = config_.transport();
  if (t.listener_check_interval_ms() <= 0) return absl::OkStatus();
  ListenerProbe::Options probe;
  const size_t colon = config_.grpc_address().rfind(':');
  probe.host = config_.grpc_address().substr(0, colon);
  probe.port = parts_->grpc_port;
  probe.tls = !config_.security().tls_cert_file().empty();
  probe.interval = absl::Milliseconds(t.listener_check_interval_ms());
  // A rapid-reset flood of 5 s starves gRPC 1.51's accept for ~20 s (measured); a dead accept loop never
  // accepts again.
  probe.accept_deadline = 12 * probe.interval;
  probe.on_failure = [this](const std::string& why) {
    spdlog::critical("the gRPC port {} no longer accepts connections ({}): NOT_SERVING from now on",
                     parts_->grpc_port, why);
    StopAccepting();
    if (options_.on_listener_failure) options_.on_listener_failure(why);
  };
  ATTN_ASSIGN_OR_RETURN(parts_->listener_probe, ListenerProbe::Create(probe));
  return absl::OkStatus();
}

absl::Status Server::StartMemoryGuard() {
  Parts& p = *parts_;
  const auto& t = config_.transport();
  if (t.memory_guard_interval_ms() <= 0) return absl::OkStatus();
  MemoryGuard::Options guard;
  // What the server may hold beyond what it holds once serving (weights, warm primitives): admitted requests,
  // gRPC's buffers (its quota, and as much again for the quota's lag), the sessions' KV cache (its pages are
  // touched as sessions grow).
  const int64_t headroom = t.memory_guard_headroom_bytes() > 0
                               ? t.memory_guard_headroom_bytes()
                               : p.memory->budget_bytes() + 2 * GrpcMemoryBytes(t, p.memory->budget_bytes()) +
                                     p.kv_pool->capacity_bytes();
  const int64_t rss_bytes = ResidentSetBytes();
  if (rss_bytes < 0) {
    spdlog::warn("memory guard: off, /proc/self/statm is unreadable (the limit is the RSS once serving plus {} MiB)",
                 headroom >> 20);
    return absl::OkStatus();
  }
  guard.rss_limit_bytes = rss_bytes + headroom;
  guard.loaded_layer_bytes = LiveLayerWeightBytes;  // layers loaded or freed later move the limit
  // The budget, the KV pool and gRPC's quota, each derived from the memory limit, may add up past it: the guard
  // must act before the kernel's OOM killer does.
  std::string process_limit;
  guard.rss_cap_bytes = MemoryGuardCapBytes(ProcessMemoryLimitBytes(&process_limit));
  // More than one largest message: a client uploading one is never shed.
  guard.min_undelivered_bytes = kMaxMessageBytes + (int64_t{16} << 20);
  guard.interval = absl::Milliseconds(t.memory_guard_interval_ms());
  guard.local_ports = {p.grpc_port};
  if (p.health_port != 0) guard.local_ports.push_back(p.health_port);  // gRPC 1.51 too, without a quota
  guard.delivered = &DeliveredBytes::Process();
  guard.on_shed = [metrics = p.metrics.get()](const ShedConnection& shed) {
    metrics->ConnectionShed();
    WarnConnectionShut(
        fmt::format("memory guard: RSS {} MiB, over its limit of {} MiB; shut down the connection "
                    "from {}, which sent {} MiB of which {} MiB arrived as messages",
                    shed.rss_bytes >> 20, shed.rss_limit_bytes >> 20, shed.peer_key, shed.received_bytes >> 20,
                    shed.delivered_bytes >> 20));
  };
  ATTN_ASSIGN_OR_RETURN(p.memory_guard, MemoryGuard::Create(std::move(guard)));
  spdlog::info(
      "memory guard: RSS limit {} MiB (the RSS once serving, {} MiB, plus {} MiB; at most {} MiB, "
      "below the {}), checked every {} ms",
      p.memory_guard->rss_limit_bytes() >> 20, rss_bytes >> 20, headroom >> 20,
      MemoryGuardCapBytes(ProcessMemoryLimitBytes(nullptr)) >> 20, process_limit, t.memory_guard_interval_ms());
  return absl::OkStatus();
}

absl::Status Server::StartResetFloodGuard() {
  Parts& p = *parts_;
  const auto& t = config_.transport();
  if (t.reset_flood_check_interval_ms() <= 0) return absl::OkStatus();
  ResetFloodGuard::Options guard;
  guard.interval = absl::Milliseconds(t.reset_flood_check_interval_ms());
  guard.min_streams = t.reset_flood_min_streams();
  guard.local_ports = {p.grpc_port};
  if (p.health_port != 0) guard.local_ports.push_back(p.health_port);
  guard.on_shed = [metrics = p.metrics.get()](const SocketStreams& s) {
    metrics->ResetFloodStopped();
    WarnConnectionShut(
        fmt::format("reset flood: shut down the connection from {}, which opened {} streams of "
                    "which the server finished {}",
                    s.peer_key, s.streams_started, s.streams_succeeded));
  };
  ATTN_ASSIGN_OR_RETURN(p.reset_flood_guard, ResetFloodGuard::Create(std::move(guard)));
  spdlog::info("reset flood guard: a connection that opens {} streams, more than half of them reset before the "
               "server finished them, is shut down; checked every {} ms", t.reset_flood_min_streams(),
               t.reset_flood_check_interval_ms());
  return absl::OkStatus();
}

absl::Status Server::StartConnectionCap() {
  Parts& p = *parts_;
  rlimit files{};
  getrlimit(RLIMIT_NOFILE, &files);
  const int64_t file_limit =
      files.rlim_cur == RLIM_INFINITY ? int64_t{1} << 30 : static_cast<int64_t>(files.rlim_cur);
  ConnectionCap::Options cap;
  cap.max_connections = MaxConnections(config_.transport(), file_limit);
  if (cap.max_connections < 0) return absl::OkStatus();
  cap.local_ports = {p.grpc_port};
  if (p.health_port != 0) cap.local_ports.push_back(p.health_port);
  cap.delivered = &DeliveredBytes::Process();
  cap.on_shed = [metrics = p.metrics.get(), max = cap.max_connections](int64_t shed, int64_t found) {
    metrics->ConnectionsCapped(shed);
    WarnConnectionShut(
        fmt::format("connection cap: {} connections to the gRPC port, at most {}: shut down {}, the "
                    "least busy",
                    found, max, shed));
  };
  if (config_.transport().stalled_read_timeout_ms() > 0) {
    cap.stalled = StalledReads::Options{};
    cap.stalled->stall_duration = absl::Milliseconds(config_.transport().stalled_read_timeout_ms());
    cap.on_stalled = [metrics = p.metrics.get(), timeout = cap.stalled->stall_duration](const TcpConnection& c) {
      metrics->ConnectionStalled();
      WarnConnectionShut(
          fmt::format("connection from {}: {} bytes unread by gRPC for {} with nothing delivered as "
                      "a message (a header sent in endless CONTINUATION frames?); shut down",
                      c.peer_key, c.unread_bytes, absl::FormatDuration(timeout)));
    };
  }
  spdlog::info("connection cap: at most {} connections to the gRPC port (file limit {}); stalled reads: {}",
               cap.max_connections, file_limit,
               cap.stalled.has_value()
                   ? absl::StrCat("a connection with 16 KiB unread and nothing delivered for ",
                                  absl::FormatDuration(cap.stalled->stall_duration), " is shut down")
                   : std::string("off"));
  ATTN_ASSIGN_OR_RETURN(p.connection_cap, ConnectionCap::Create(std::move(cap)));
  return absl::OkStatus();
}

absl::Status Server::BuildMemoryBudget() {
  Parts& p = *parts_;
  std::string source = "memory_budget_bytes";
  const int64_t budget =
      config_.memory_budget_bytes() > 0 ? config_.memory_budget_bytes() : DefaultMemoryBudgetBytes(&source);
  ServerMetrics* metrics = p.metrics.get();
  p.memory = std::make_unique<MemoryBudget>(budget,
                                            [metrics](int64_t reserved) { metrics->SetMemoryReserved(reserved); });
  metrics->SetMemoryBudget(budget);
  HeapTrimPolicy::Options trim;
  trim.growth_trim_bytes = HeapGrowthTrimBytes(budget);
  ATTN_ASSIGN_OR_RETURN(p.heap_trim, HeapTrimPolicy::Create(trim));
  spdlog::info("memory budget: {} bytes ({}); heaps trimmed on {} bytes of RSS growth and once a second idle",
               budget, source, trim.growth_trim_bytes);
  return absl::OkStatus();
}

void Server::StartTrimmer() {
  // Every 50 ms the policy looks at the RSS (heap_trim_policy.h: growth from a flood's allocator churn is
  // trimmed before it adds up); once a second, idle sessions are evicted and a layer load's heap pad released.
  Parts& p = *parts_;
  p.trimmer = std::thread([&p] {
    NameThisThread("attn-trim");
    absl::Time last_housekeeping = absl::Now();
    while (!p.stop_trimming.WaitForNotificationWithTimeout(absl::Milliseconds(50))) {
      absl::Time now = absl::Now();
      if (now - last_housekeeping >= absl::Seconds(1)) {
        last_housekeeping = now;
        p.sessions->EvictIdle("idle_timeout");  // sessions idle past their timeout, pool full or not
        if (p.load_heap_pad->ReleaseIfIdle()) {  // which trimmed the heaps
          p.heap_trim->Trimmed(now, ResidentSetBytes());
          continue;
        }
      }
      const HeapTrimPolicy::Trim trim = p.heap_trim->Check(now, ResidentSetBytes(), p.memory->reserved_bytes() > 0,
                                                           p.load_heap_pad->raised());
      if (trim == HeapTrimPolicy::Trim::kNone) continue;
      malloc_trim(0);
      p.heap_trim->Trimmed(absl::Now(), ResidentSetBytes());
      p.metrics->HeapTrimmed(HeapTrimName(trim));
    }
  });
}

void Server::StopTrimmer() {
  Parts& p = *parts_;
  if (!p.trimmer.joinable()) return;
  p.stop_trimming.Notify();
  p.trimmer.join();
}

namespace {

// The layer's compute type as configured and in effect, and its oneDNN implementations after warm-up; a
// warning when BFLOAT16 is asked for on a CPU that computes it in f32 or emulates it.
void LogCompute(const ServedLayer& layer) {
  const std::string& name = layer.config.name();
  const bool decoder = layer.decoder != nullptr;
  const ComputeType in_effect = decoder ? layer.decoder->compute() : layer.engine->compute();
  const std::vector<std::string> impls =
      decoder ? layer.decoder->ImplementationsUsed() : layer.engine->ImplementationsUsed();
  const Bf16Support bf16 = OnednnBf16Support();
  spdlog::info("layer {}: compute_dtype={} implementations={} bf16_matmul={} bf16_conversion={}", name,
               ComputeTypeName(in_effect), absl::StrJoin(impls, ","), Bf16SupportName(bf16),
               Bf16ConversionKernel());
  if (layer.config.compute_dtype() != attnserve::v1::LayerConfig::BFLOAT16) return;
  if (in_effect != ComputeType::kBFloat16) {
    spdlog::warn("layer {}: compute_dtype BFLOAT16 asked for, but oneDNN has no bf16 matmul on this CPU ({}): "
                 "computing in FLOAT32", name, Bf16SupportName(bf16));
  } else if (bf16 == Bf16Support::kEmulated) {
    spdlog::warn("layer {}: compute_dtype BFLOAT16 runs emulated on this CPU (AVX-512 without AVX512_BF16): "
                 "correct, but it may be slower than FLOAT32", name);
  }
}

}  // namespace

void Server::LogLayers() const {
  std::vector<std::string> names;
  for (const auto& layer : parts_->registry->Layers()) {
    const auto& c = layer->config;
    names.push_back(c.name());
    spdlog::info("layer {}: version={} embed_dim={} num_heads={} kdim={} vdim={} bias={} weights={} "
                 "max_batch_size={} max_queue_delay_us={} max_queue_size={} max_batch_tokens={} "
                 "max_sequence_length={}",
                 c.name(), layer->version, c.embed_dim(), c.num_heads(), c.kdim(), c.vdim(), c.bias(),
                 c.weights_path().empty() ? absl::StrCat("seed:", c.seed()) : c.weights_path(),
                 c.batching().max_batch_size(), c.batching().max_queue_delay_us(), c.batching().max_queue_size(),
                 c.batching().max_batch_tokens(), c.max_sequence_length());
    LogCompute(*layer);
  }
  spdlog::info("layers={}", absl::StrJoin(names, ","));
}

void Server::StopAccepting() {
  parts_->dispatcher->StartShutdown();  // new requests: UNAVAILABLE
  for (grpc::Server* server : {parts_->grpc_server.get(), parts_->health_server.get()}) {
    if (server != nullptr) server->GetHealthCheckService()->Shutdown();  // NOT_SERVING for every service, at once
  }
}

absl::Status Server::Drain(absl::Time deadline) {
  Parts& p = *parts_;
  if (p.grpc_server == nullptr || p.drained) return absl::OkStatus();
  p.drained = true;
  const absl::Time start = absl::Now();
  p.listener_probe.reset();  // a draining port may stop answering; that is no failure
  StopAccepting();
  // Layer changes and session opens still waiting are refused (UNAVAILABLE); a running load stops at its next
  // step, a running open at its next block.
  p.loads_abandoned = true;
  p.kserve->StopControlThread();
  p.session_service->StopOpener();
  // Answer everything accepted: the scheduler runs all queued batches, then stops its workers. On a
  // thread of its own, so that a deadline running out leaves it behind rather than blocking here.
  auto drained = std::make_shared<absl::Notification>();
  std::thread([scheduler = p.scheduler.get(), drained] {
    NameThisThread("attn-drain");
    scheduler->Shutdown();
    drained->Notify();
  }).detach();
  const bool in_time = drained->WaitForNotificationWithDeadline(deadline);
  if (in_time) absl::SleepFor(std::min(start + options_.unavailable_linger, deadline) - absl::Now());
  // Waits for in-flight RPCs (their answers are being written) until the deadline, then cancels the rest.
  p.grpc_server->Shutdown(absl::ToChronoTime(deadline));
  if (p.health_server != nullptr) p.health_server->Shutdown(absl::ToChronoTime(deadline));
  p.connection_cap.reset();  // the ports accept no more: nothing left to bound
  p.memory_guard.reset();
  p.reset_flood_guard.reset();
  StopTrimmer();
  if (!in_time) return absl::DeadlineExceededError("batches were still running at the drain deadline");
  p.grpc_server->Wait();
  spdlog::info("stopped after {}", absl::FormatDuration(absl::Now() - start));
  return absl::OkStatus();
}

Server::Ports Server::ports() const {
  return Ports{parts_->grpc_port, parts_->metrics->port(), parts_->health_port};
}

absl::Status Server::LoadLayer(const attnserve::v1::LayerConfig& layer) {
  attnserve::v1::LayerConfig config = layer;
  ATTN_RETURN_IF_ERROR(ApplyLayerDefaultsAndValidate(&config));
  // Refused before anything is allocated: a layer too large for the process must not get it OOM-killed.
  const int64_t request_budget = parts_->memory != nullptr ? parts_->memory->budget_bytes() : 0;
  std::error_code no_file;
  const int64_t file_bytes = config.weights_path().empty()
                                 ? 0
                                 : static_cast<int64_t>(std::filesystem::file_size(config.weights_path(), no_file));
  ATTN_RETURN_IF_ERROR(CheckLayerFits(config, no_file ? 0 : file_bytes, ProcessMemoryLimitBytes(nullptr),
                                      std::max<int64_t>(0, ResidentSetBytes()), request_budget));
  // Built and warmed up at the lowest CPU priority, in pages earlier builds freed: the workers serving requests
  // come first.
  const std::unique_ptr<LoadHeapPad::Scope> in_kept_pages = parts_->load_heap_pad->LoadStarting();
  std::unique_ptr<ServedLayer> loaded;
  const absl::Time load_start = absl::Now();
  ATTN_RETURN_IF_ERROR(RunAtBackgroundPriority([&]() -> absl::Status {
    ATTN_ASSIGN_OR_RETURN(loaded, attnserve::LoadLayer(config));
    return WarmUpUnlessDraining(*loaded);
  }));
  const absl::Duration load_time = absl::Now() - load_start;
  Parts& p = *parts_;
  absl::MutexLock lock(&layers_mu_);
  ATTN_RETURN_IF_ERROR(LoadMayGoOn(config.name()));  // the scheduler may be shutting down
  const BatchingOptions batching = ToBatchingOptions(config.batching());
  if (p.registry->Find(config.name()) != nullptr) {
    ATTN_RETURN_IF_ERROR(p.scheduler->UpdateQueue(config.name(), batching));
  } else {
    // The queue first: a request that finds the layer must find its queue.
    p.metrics->AddLayer(config.name());
    ATTN_RETURN_IF_ERROR(p.scheduler->AddQueue(config.name(), batching));
  }
  p.metrics->SetQueueCapacity(config.name(), batching.max_queue_size);
  const int64_t version = p.registry->Publish(std::move(loaded));
  p.metrics->SetLayerVersion(config.name(), version);
  spdlog::info("layer {}: version {} loaded (built and warmed up in {})", config.name(), version,
               absl::FormatDuration(load_time));
  LogCompute(*p.registry->Find(config.name(), version));
  LogMemoryGuardLimit();
  return absl::OkStatus();
}

absl::Status Server::WarmUpConfiguredLayers() const {
  // As a loaded layer is: its first requests must not pay for oneDNN's JIT, and its start-up log line names the
  // implementations it runs.
  for (const auto& layer : parts_->registry->Layers()) {
    if (absl::Status warm = WarmUpUnlessDraining(*layer); !warm.ok()) {
      return absl::Status(warm.code(), absl::StrCat("layer '", layer->config.name(), "': warm-up: ", warm.message()));
    }
  }
  return absl::OkStatus();
}

absl::Status Server::WarmUpUnlessDraining(const ServedLayer& loaded) const {
  // Each team size a batch's share of the CPUs can have: the workers' and the session opener's shares.
  for (int team : CpuShares::TeamSizes(threads_per_batch_, worker_threads_ + 1)) {
    ATTN_RETURN_IF_ERROR(LoadMayGoOn(loaded.config.name()));
    ATTN_RETURN_IF_ERROR(WarmUpLayer(loaded, team));
  }
  return absl::OkStatus();
}

absl::Status Server::LoadMayGoOn(const std::string& layer) const {
  if (!parts_->loads_abandoned) return absl::OkStatus();
  return absl::UnavailableError(
      absl::StrCat("the server is shutting down: the load of layer \"", layer, "\" was abandoned"));
}

absl::Status Server::UnloadLayer(const std::string& name) {
  Parts& p = *parts_;
  // Its weights may sit in the heaps (built while the pad was up): the pad's release trims them, soon after
  // the last request holding them is answered, whether or not requests keep the server busy.
  const std::unique_ptr<LoadHeapPad::Scope> until_trimmed = p.load_heap_pad->LoadStarting();
  absl::MutexLock lock(&layers_mu_);
  ATTN_RETURN_IF_ERROR(p.registry->Remove(name));
  // Requests that found the layer before Remove are in its queue or about to be refused by it (NOT_FOUND).
  ATTN_RETURN_IF_ERROR(p.scheduler->RemoveQueue(name));
  p.metrics->SetLayerVersion(name, 0);
  spdlog::info("layer {}: unloaded", name);
  LogMemoryGuardLimit();  // lowered already unless a request still holds the layer
  return absl::OkStatus();
}

void Server::LogMemoryGuardLimit() const {
  if (parts_->memory_guard == nullptr) return;
  spdlog::info("memory guard: RSS limit {} MiB (layers hold {} MiB)", parts_->memory_guard->rss_limit_bytes() >> 20,
               LiveLayerWeightBytes() >> 20);
}

absl::Status Server::ReloadConfig(const absl::StatusOr<attnserve::v1::ServerConfig>& config, bool reload_all) {
  Parts& p = *parts_;
  absl::Status status = config.status();
  if (status.ok()) {
    const std::vector<std::string> fixed = FieldsNeedingRestart(config_, *config, worker_threads_, threads_per_batch_);
    if (!fixed.empty()) {
      spdlog::warn("config reload: {} changed, which takes a restart (only the layers change while serving)",
                   absl::StrJoin(fixed, ", "));
    }
    status = p.catalog->Reconcile({config->layers().begin(), config->layers().end()}, reload_all);
  }
  p.metrics->ConfigReloaded(status.ok());
  if (status.ok()) {
    spdlog::info("config reload: {} layers as the file says", config->layers_size());
  } else {
    spdlog::error("config reload failed: {}", std::string(status.message()));
  }
  return status;
}

const LayerRegistry& Server::registry() const { return *parts_->registry; }
ServerMetrics& Server::metrics() { return *parts_->metrics; }

}  // namespace attnserve
