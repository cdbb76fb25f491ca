// attnserve: serves the configured attention layers over gRPC, with dynamic batching, health, reflection
// and Prometheus metrics (server/server.h). See README.md for flags and behaviour on SIGTERM.
#include <signal.h>
#include <spdlog/spdlog.h>

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "server/server.h"
#include "server/startup/logging.h"
#include "server/startup/server_flags.h"

namespace {
// The gRPC port stopped accepting connections (see ServerOptions::on_listener_failure).
constexpr int kExitListenerFailed = 3;
}  // namespace

int main(int argc, char** argv) {
  using namespace attnserve;
  // SIGTERM/SIGINT are taken by sigwait below: blocked before any thread starts, so every thread inherits
  // the mask.
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
  int signal_number = 0;
  sigwait(&signals, &signal_number);
  (*server)->StopAccepting();  // logged after, so whoever sees the line also sees NOT_SERVING
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
