#include "server/transport/reset_flood_guard.h"

#include <algorithm>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "common/thread_name.h"

namespace attnserve {

bool IsResetFlood(const SocketStreams& socket, int64_t min_streams) {
  return socket.streams_started >= min_streams && 2 * socket.streams_succeeded < socket.streams_started;
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
  if (!options.now) options.now = [] { return absl::Now(); };
  const bool start_thread = options.start_thread;
  std::unique_ptr<ResetFloodGuard> guard(new ResetFloodGuard(std::move(options)));
  if (start_thread) guard->thread_ = std::thread([g = guard.get()] {
    NameThisThread("attn-resetguard");
    g->Run();
  });
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
  if (!calls.ok() || options_.now() < next_read_) return 0;
  calls_at_last_read_ = std::min(calls_at_last_read_, *calls);  // a server's counts went with it
  if (*calls - calls_at_last_read_ < options_.min_streams) return 0;  // no connection can have crossed it
  const absl::Time read_start = options_.now();
  const absl::StatusOr<std::vector<SocketStreams>> sockets = options_.list_sockets();
  next_read_ = read_start + 10 * (options_.now() - read_start);
  if (!sockets.ok()) return 0;  // the gate stays open: read again next time
  absl::flat_hash_map<std::string, const SocketStreams*> flooding;  // by peer key
  absl::flat_hash_set<int64_t> listed;
  for (const SocketStreams& s : *sockets) {
    listed.insert(s.socket_id);
    if (s.peer_key.empty() || shut_ids_.contains(s.socket_id)) continue;  // shut, gRPC still draining it
    if (IsResetFlood(s, options_.min_streams)) flooding[s.peer_key] = &s;
  }
  absl::erase_if(shut_ids_, [&](int64_t id) { return !listed.contains(id); });
  if (flooding.empty()) {
    calls_at_last_read_ = *calls;
    return 0;  // the common case: no listing of descriptors
  }
  const absl::StatusOr<std::vector<TcpConnection>> connections = options_.list_connections();
  if (!connections.ok()) return 0;
  calls_at_last_read_ = *calls;
  int shed = 0;
  for (const TcpConnection& c : *connections) {
    const auto it = flooding.find(c.peer_key);
    if (it == flooding.end() || !options_.shut_down(c).ok()) continue;
    ++shed;
    shut_ids_.insert(it->second->socket_id);
    if (options_.on_shed) options_.on_shed(*it->second);
  }
  return shed;
}

}  // namespace attnserve
