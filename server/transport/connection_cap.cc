#include "server/transport/connection_cap.h"

#include <algorithm>
#include <chrono>
#include <numeric>
#include <string>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "common/thread_name.h"

namespace attnserve {

std::vector<size_t> ConnectionsOverCap(const std::vector<TcpConnection>& connections,
                                       const std::vector<int64_t>& delivered_bytes, int64_t max_connections) {
  const int64_t excess = static_cast<int64_t>(connections.size()) - max_connections;
  if (excess <= 0) return {};
  std::vector<size_t> order(connections.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (delivered_bytes[a] != delivered_bytes[b]) return delivered_bytes[a] < delivered_bytes[b];
    const TcpConnection& x = connections[a];
    const TcpConnection& y = connections[b];
    if (x.received_bytes != y.received_bytes) return x.received_bytes < y.received_bytes;
    return x.inode > y.inode;
  });
  order.resize(static_cast<size_t>(excess));
  return order;
}

absl::StatusOr<std::unique_ptr<ConnectionCap>> ConnectionCap::Create(Options options) {
  if (options.max_connections <= 0) return absl::InvalidArgumentError("connection cap: max_connections must be > 0");
  if (options.interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("connection cap: interval must be > 0");
  }
  if (options.local_ports.empty()) return absl::InvalidArgumentError("connection cap: no port to watch");
  if (!options.list_connections) {
    options.list_connections = [ports = options.local_ports] { return ListTcpConnections(ports); };
  }
  if (!options.shut_down) options.shut_down = ShutDownTcpConnection;
  if (!options.now) {
    options.now = [] {
      return absl::UnixEpoch() + absl::FromChrono(std::chrono::steady_clock::now().time_since_epoch());
    };
  }
  if (options.stalled.has_value() &&
      (options.stalled->min_unread_bytes <= 0 || options.stalled->stall_duration <= absl::ZeroDuration() ||
       options.delivered == nullptr)) {
    return absl::InvalidArgumentError(
        "connection cap: the stalled rule needs min_unread_bytes and stall_duration > 0 and a delivered table");
  }
  const bool start_thread = options.start_thread;
  std::unique_ptr<ConnectionCap> cap(new ConnectionCap(std::move(options)));
  if (start_thread) cap->thread_ = std::thread([c = cap.get()] {
    NameThisThread("attn-conncap");
    c->Run();
  });
  return cap;
}

ConnectionCap::ConnectionCap(Options options) : options_(std::move(options)) {
  if (!options_.stalled.has_value()) return;
  absl::MutexLock lock(&mu_);
  stalled_.emplace(*options_.stalled);
  options_.delivered->AddReader();
}

ConnectionCap::~ConnectionCap() {
  stop_.Notify();
  if (thread_.joinable()) thread_.join();
  if (options_.stalled.has_value()) options_.delivered->RemoveReader();
}

void ConnectionCap::Run() {
  while (!stop_.WaitForNotificationWithTimeout(options_.interval)) CheckOnce();
}

int64_t ConnectionCap::CheckOnce() {
  absl::MutexLock lock(&mu_);
  // The stalled rule holds the delivered table, so it prunes it too (as the memory guard does).
  const uint64_t round = stalled_.has_value() ? options_.delivered->BeginPrune() : 0;
  const absl::StatusOr<std::vector<TcpConnection>> connections = options_.list_connections();
  if (!connections.ok()) return 0;
  std::vector<int64_t> delivered;
  delivered.reserve(connections->size());
  absl::flat_hash_set<std::string> live;
  for (const TcpConnection& c : *connections) {
    delivered.push_back(options_.delivered == nullptr ? 0 : options_.delivered->Of(c.peer_key));
    if (stalled_.has_value()) live.insert(c.peer_key);
  }
  if (stalled_.has_value()) options_.delivered->Prune(round, live);
  int64_t shed = 0;
  const std::vector<size_t> over_cap = ConnectionsOverCap(*connections, delivered, options_.max_connections);
  for (size_t i : over_cap) {
    if (options_.shut_down((*connections)[i]).ok()) ++shed;
  }
  if (shed > 0 && options_.on_shed) options_.on_shed(shed, static_cast<int64_t>(connections->size()));
  return shed + ShutDownStalled(*connections, delivered, over_cap);
}

int64_t ConnectionCap::ShutDownStalled(const std::vector<TcpConnection>& connections,
                                       const std::vector<int64_t>& delivered,
                                       const std::vector<size_t>& shut_over_cap) {
  if (!stalled_.has_value()) return 0;
  int64_t shed = 0;
  for (size_t i : stalled_->Check(connections, delivered, options_.now())) {
    if (std::find(shut_over_cap.begin(), shut_over_cap.end(), i) != shut_over_cap.end()) continue;
    if (!options_.shut_down(connections[i]).ok()) continue;  // gone meanwhile
    ++shed;
    if (options_.on_stalled) options_.on_stalled(connections[i]);
  }
  return shed;
}

}  // namespace attnserve
