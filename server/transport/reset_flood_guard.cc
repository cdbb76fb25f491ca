#include "server/transport/reset_flood_guard.h"

#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"

namespace attnserve {

bool IsResetFlood(const SocketStreams& socket, int64_t min_streams) {
  return socket.streams_started >= min_streams && 2 * socket.messages_received < socket.streams_started;
}

absl::StatusOr<std::unique_ptr<ResetFloodGuard>> ResetFloodGuard::Create(Options options) {
  if (options.interval <= absl::ZeroDuration() || options.min_streams <= 0) {
    return absl::InvalidArgumentError("reset flood guard: interval and min_streams must be > 0");
  }
  if (options.local_ports.empty()) return absl::InvalidArgumentError("reset flood guard: no port to watch");
  if (!options.calls_started) options.calls_started = ServerCallsStarted;
  if (!options.list_sockets) options.list_sockets = ListServerSockets;
  if (!options.list_connections) {
    options.list_connections = [ports = options.local_ports] { return ListTcpConnections(ports); };
  }
  if (!options.shut_down) options.shut_down = ShutDownTcpConnection;
  const bool start_thread = options.start_thread;
  std::unique_ptr<ResetFloodGuard> guard(new ResetFloodGuard(std::move(options)));
  if (start_thread) guard->thread_ = std::thread([g = guard.get()] { g->Run(); });
  return guard;
}

ResetFloodGuard::~ResetFloodGuard() {
  stop_.Notify();
  if (thread_.joinable()) thread_.join();
}

void ResetFloodGuard::Run() {
  while (!stop_.WaitForNotificationWithTimeout(options_.interval)) CheckOnce();
}

int ResetFloodGuard::CheckOnce() {
  absl::MutexLock lock(&mu_);
  const absl::StatusOr<int64_t> calls = options_.calls_started();
  if (!calls.ok() || *calls - calls_at_last_read_ < options_.min_streams) return 0;  // none can have crossed it
  calls_at_last_read_ = *calls;
  const absl::StatusOr<std::vector<SocketStreams>> sockets = options_.list_sockets();
  if (!sockets.ok()) return 0;
  absl::flat_hash_map<std::string, const SocketStreams*> flooding;  // by peer key
  for (const SocketStreams& s : *sockets) {
    if (!s.peer_key.empty() && IsResetFlood(s, options_.min_streams)) flooding[s.peer_key] = &s;
  }
  if (flooding.empty()) return 0;  // the common case: no listing of descriptors
  const absl::StatusOr<std::vector<TcpConnection>> connections = options_.list_connections();
  if (!connections.ok()) return 0;
  int shed = 0;
  for (const TcpConnection& c : *connections) {
    const auto it = flooding.find(c.peer_key);
    if (it == flooding.end() || !options_.shut_down(c).ok()) continue;
    ++shed;
    if (options_.on_shed) options_.on_shed(*it->second);
  }
  return shed;
}

}  // namespace attnserve
