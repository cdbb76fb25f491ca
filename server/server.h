// One attnserve server: the layer registry, the per-layer batcher and its workers, the executor, the
// metrics endpoint and the gRPC server with its services, built from a validated ServerConfig.
//
//   auto server = Server::Create(config, {});   // loads every layer; nothing listens yet
//   server->Start();                             // gRPC and /metrics listen (port 0: see ports())
//   ...
//   server->Drain(absl::Now() + absl::Seconds(30));
//
// Layers can be loaded, replaced and unloaded while the server runs (LoadLayer / UnloadLayer): requests
// admitted to a version finish on it, and a version's memory is freed when its last request is answered.
//
// Thread-safety: Start and Drain are called once each, from one thread; LoadLayer, UnloadLayer, ports() and
// the accessors from any thread once Start returned.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "attnserve/v1/config.pb.h"
#include "server/batching/clock.h"
#include "server/observability/metrics.h"
#include "server/runtime/layer_registry.h"

namespace grpc {
class ServerBuilder;
}  // namespace grpc

namespace attnserve {

struct ServerOptions {
  // The time source of the batcher and the request timings; not owned, must outlive the server.
  const Clock* clock = RealClock();
  // CPUs the server may use; 0 = AvailableCpus() (affinity mask capped by the cgroup quota). A batch computing
  // alone uses them all; batches computing at once divide them: cpus / running, at least 1 thread each
  // (runtime/cpu_shares.h).
  int32_t cpus = 0;
  // An idle worker polls its queues this long before sleeping (takes a thread wake-up off a lone request's
  // latency; costs at most this much of one core after each batch).
  int64_t idle_spin_us = 200;
  // After Drain begins, new calls are answered UNAVAILABLE for at least this long before gRPC's own
  // shutdown, which fails late calls with CANCELLED instead (grpc/grpc#41785).
  absl::Duration unavailable_linger = absl::Seconds(1);
  // Serve the gRPC reflection service (grpcurl-style tools without the .proto files), unless the config's
  // security.disable_reflection says otherwise.
  bool enable_reflection = true;
  // Fair share for short requests: while every worker computes and one of them a request of at least this
  // many FLOPs (about 15 ms of the machine), requests below it run one by one on an express worker (one
  // OpenMP thread), so that they do not wait seconds behind another layer's long request. 0 = no express lane.
  double long_request_flops = 2e9;
  // How often the token and /metrics auth files are checked for changes.
  absl::Duration credential_reload_interval = absl::Seconds(1);
  // Called once, from the listener probe's thread, when the gRPC port no longer accepts connections
  // (transport.listener_check_interval_ms); the server has already turned NOT_SERVING and refuses new
  // calls. main() drains and exits non-zero so that its supervisor restarts it; it must not call Drain
  // itself (Drain stops the probe's thread). Empty: only logged.
  std::function<void(const std::string& why)> on_listener_failure;
  // The access log (observability/access_log.h): "-" for stdout, or a file appended to. Empty: none.
  std::string access_log_path;
  // While layers load (the repository RPCs, config reloads), heaps keep this much freed memory at their top for
  // the next build instead of returning it, until `load_heap_pad_hold` after the last load
  // (runtime/load_heap_pad.h: what it saves the layers being served); 0 = off.
  int64_t load_heap_pad_bytes = int64_t{64} << 20;
  absl::Duration load_heap_pad_hold = absl::Seconds(5);
};

class Server {
 public:
  // Loads every layer of `config` (which must have passed ApplyDefaultsAndValidate) and builds the
  // components; InvalidArgument / the loader's error naming the layer otherwise. Nothing listens yet.
  static absl::StatusOr<std::unique_ptr<Server>> Create(const attnserve::v1::ServerConfig& config,
                                                        const ServerOptions& options);
  // Drains with no deadline if Drain was not called.
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Starts /metrics and gRPC on the config's addresses (port 0 picks a free port) and turns health
  // SERVING. UNAVAILABLE naming the address when one cannot be listened on.
  absl::Status Start();

  // Health NOT_SERVING for every service and new calls UNAVAILABLE, at once (the first step of Drain, for
  // callers that log in between). Idempotent.
  void StopAccepting();

  // Stops taking requests (StopAccepting), answers every accepted request, then shuts gRPC down. OK when all
  // of it finished before `deadline`; DEADLINE_EXCEEDED when batches were still running then (the server must
  // then not be destroyed: the caller exits).
  absl::Status Drain(absl::Time deadline);

  struct Ports {
    int grpc = 0;
    int metrics = 0;
    int health = 0;  // 0 without health_address
  };
  // The bound ports once Start returned OK.
  Ports ports() const;
  // The config served, with defaults applied (layers as created; LoadLayer/UnloadLayer do not change it).
  const attnserve::v1::ServerConfig& config() const { return config_; }
  // OpenMP threads a batch computing alone uses (the CPUs); batches computing at once divide them.
  int threads_per_batch() const { return threads_per_batch_; }
  // Workers computing batches: the config's worker_threads, or for 0 one per CPU (up to kMaxAutoWorkerThreads).
  int worker_threads() const { return worker_threads_; }

  // Loads `layer` (validated like a config entry) and warms it up (layer_warmup.h) off the request path, then
  // publishes it: a new name gets
  // its queue, metrics and traffic; an existing one gets a new version (its batching options apply to the
  // next batch), requests already admitted finish on the old one. A failed load changes nothing. Once Drain has
  // begun, a load stops at its next step (built, each warm-up, publishing): UNAVAILABLE, nothing published.
  absl::Status LoadLayer(const attnserve::v1::LayerConfig& layer);
  // Stops routing requests to `name` (NOT_FOUND from now on), runs what its queue holds, and returns once
  // its last batch is done. NOT_FOUND for an unknown layer.
  absl::Status UnloadLayer(const std::string& name);

  // Makes the served layers those of `config` (the config file read again, flags applied, validated; an
  // error when it did not read or validate, which changes nothing): new layers load, changed ones reload
  // (all when `reload_all`), removed ones unload after their queues drain. Fields other than the layers need
  // a restart (logged). Counted in attnserve_config_reload_total{result}. Call from one thread at a time.
  absl::Status ReloadConfig(const absl::StatusOr<attnserve::v1::ServerConfig>& config, bool reload_all);

  const LayerRegistry& registry() const;
  ServerMetrics& metrics();

 private:
  struct Parts;
  Server(const attnserve::v1::ServerConfig& config, const ServerOptions& options);
  absl::Status Build();
  absl::Status BuildKServe();
  // The KV cache pool, the session store and SessionService (config sessions).
  absl::Status BuildSessions();
  absl::Status BuildMemoryBudget();
  absl::Status BuildCredentialStores();
  void ConfigureTransport(grpc::ServerBuilder* builder) const;
  absl::Status StartListenerProbe();
  absl::Status StartMemoryGuard();
  // Logs the memory guard's limit as the layers loaded now have moved it (after a load or unload).
  void LogMemoryGuardLimit() const;
  absl::Status StartConnectionCap();
  absl::Status StartResetFloodGuard();
  absl::Status StartHealthServer();
  void SetServing();
  void StartTrimmer();
  void StopTrimmer();
  void LogLayers() const;
  // The layers of the config, built by the registry, warmed up before the server starts.
  absl::Status WarmUpConfiguredLayers() const;
  // The built layer warmed up for every team size a batch's share can have; UNAVAILABLE once draining.
  absl::Status WarmUpUnlessDraining(const ServedLayer& loaded) const;
  // UNAVAILABLE naming `layer` once Drain has begun: a load must not hold the drain nor publish after it.
  absl::Status LoadMayGoOn(const std::string& layer) const;

  const attnserve::v1::ServerConfig config_;
  const ServerOptions options_;
  const int threads_per_batch_;
  const int worker_threads_;
  std::unique_ptr<Parts> parts_;
  absl::Mutex layers_mu_;  // serialises LoadLayer / UnloadLayer (each is a registry + scheduler change)
};

}  // namespace attnserve
