// attnserve: serves the configured attention layers over gRPC, with dynamic batching, health, reflection
// and Prometheus metrics (server/server.h). See README.md for flags and behaviour on SIGTERM.
#include <malloc.h>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/synchronization/mutex.h"
#include "server/runtime/load_heap_pad.h"
#include "server/server.h"
#include "server/startup/config_watcher.h"
#include "server/startup/logging.h"
#include "server/startup/server_flags.h"

namespace {
// The gRPC port stopped accepting connections (see ServerOptions::on_listener_failure).
constexpr int kExitListenerFailed = 3;

// Reloads the layers whenever the config file changes (or on SIGHUP, through Trigger); null without a file.
absl::StatusOr<std::unique_ptr<attnserve::ConfigWatcher>> WatchConfigFile(const attnserve::ServerFlags& flags,
                                                                          attnserve::Server* server) {
  if (flags.config_path.empty()) return nullptr;
  attnserve::ConfigWatcher::Options options;
  options.path = flags.config_path;
  options.on_change = [&flags, server](const std::string& /*content*/, bool triggered) {
    // SIGHUP reloads every layer: the weights files may have changed under an unchanged config.
    server->ReloadConfig(attnserve::BuildServerConfig(flags), /*reload_all=*/triggered).IgnoreError();  // logged
  };
  return attnserve::ConfigWatcher::Create(options);
}

// SIGTERM/SIGINT (drain) and SIGHUP (reload the config) are taken by sigwait (WaitForStop): blocked before
// any thread starts, so every thread inherits the mask.
sigset_t BlockServerSignals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  return signals;
}

// Waits for SIGTERM or SIGINT (returned), reloading the config on each SIGHUP meanwhile.
int WaitForStop(const sigset_t& signals, attnserve::ConfigWatcher* watcher, const std::string& config_path) {
  int signal_number = 0;
  while (sigwait(&signals, &signal_number) == 0 && signal_number == SIGHUP) {
    if (watcher == nullptr) {
      spdlog::warn("SIGHUP: no config file to reload (the embedded default is served)");
    } else {
      spdlog::info("SIGHUP: reloading {}", config_path);
      watcher->Trigger();
    }
  }
  return signal_number;
}

// Abseil's deadlock detector (on in Debian's build) bookkeeps every Mutex a request touches: about 1% of the
// served cycles (BENCHMARKS.md). The test binaries keep it.
void SkipMutexDeadlockDetection() { absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore); }

// Process-wide settings made first thing, before any thread or allocation of the server: malloc thresholds,
// the deadlock detector.
void SetProcessDefaults() {
  // Buffers of a MiB and more are mapped and unmapped on their own, so that the memory of a flood of large
  // requests, and a replaced layer's weights, go back to the system once freed (glibc's adaptive threshold
  // rises to the largest block freed, up to 32 MiB, and with it the trim threshold, and keeps such blocks in
  // the heap). Set first thing: set only once the configured layers were built, as it was, 20 reloads of a
  // 9 MiB layer still grew RSS from 42 to 95 MiB; set first, 42 to 58 (BENCHMARKS.md, issue #10).
  mallopt(M_MMAP_THRESHOLD, attnserve::kServerMmapThresholdBytes);  // raised while layers load: runtime/load_heap_pad.h
  // Fixing the mmap threshold also fixes the trim threshold at its 128 KiB default: every free that left that
  // much at the top of a thread's heap gave it back (madvise), and the next allocation faulted it in again.
  // oneDNN allocates and frees inside its parallel matmuls, so a session's prefill chunk (dozens of matmuls)
  // spent more time in madvise, page faults and the TLB shootdowns they cost than in the matmuls. The heaps
  // keep up to 4 MiB at their top instead (what they churn is below the 1 MiB mmap threshold; at most 8
  // arenas per core hold it); the trimmer's malloc_trim still returns it once idle.
  mallopt(M_TRIM_THRESHOLD, 4 << 20);
  SkipMutexDeadlockDetection();
}

}  // namespace

int main(int argc, char** argv) {
  using namespace attnserve;
  const sigset_t signals = BlockServerSignals();
  SetProcessDefaults();

  auto flags = ParseServerFlags(argc, argv, [](const char* name) { return std::getenv(name); });
  if (!flags.ok()) {
    std::fprintf(stderr, "attnserve: %s\n\n%s", std::string(flags.status().message()).c_str(), ServerUsage().c_str());
    return 2;
  }
  if (flags->help || flags->version) {
    std::fputs(flags->help ? ServerUsage().c_str() : (std::string("attnserve ") + kAttnserveVersion + "\n").c_str(),
               stdout);
    return 0;
  }
  ConfigureLogging(flags->log_level, flags->log_format);
  auto config = BuildServerConfig(*flags);
  if (!config.ok()) {
    spdlog::critical("invalid configuration: {}", std::string(config.status().message()));
    return 2;
  }
  // A port that stopped accepting is woken up like a SIGTERM, and the exit status then says why.
  static std::atomic<bool> listener_failed{false};
  ServerOptions options;
  options.access_log_path = flags->access_log;
  options.on_listener_failure = [](const std::string&) {
    listener_failed = true;
    kill(getpid(), SIGTERM);
  };
  auto server = Server::Create(*config, options);
  if (!server.ok()) {
    spdlog::critical("cannot load layers: {}", std::string(server.status().message()));
    return 2;
  }
  if (absl::Status s = (*server)->Start(); !s.ok()) {
    spdlog::critical("{}", std::string(s.message()));
    return 2;
  }
  auto watcher = WatchConfigFile(*flags, server->get());
  if (!watcher.ok()) {
    spdlog::critical("cannot watch the config file: {}", std::string(watcher.status().message()));
    return 2;
  }
  const int signal_number = WaitForStop(signals, watcher->get(), flags->config_path);
  (*server)->StopAccepting();  // logged after, so whoever sees the line also sees NOT_SERVING
  watcher->reset();            // a reload under way finishes; none starts while draining
  spdlog::info("{}: draining (grace {})",
               listener_failed ? "listener failed" : signal_number == SIGTERM ? "received SIGTERM" : "received SIGINT",
               absl::FormatDuration(flags->shutdown_grace));
  if (absl::Status s = (*server)->Drain(absl::Now() + flags->shutdown_grace); !s.ok()) {
    spdlog::error("shutdown grace of {} ran out before every queued request was answered",
                  absl::FormatDuration(flags->shutdown_grace));
    std::_Exit(1);  // batches still run on the workers: leave without destroying the server under them
  }
  if (listener_failed) {
    spdlog::critical("exiting with status {} after the listener failed, to be restarted", kExitListenerFailed);
    return kExitListenerFailed;
  }
  return 0;
}
