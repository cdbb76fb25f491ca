#include "server/transport/memory_guard.h"

#include <algorithm>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "common/process_memory.h"
#include "common/thread_name.h"

namespace attnserve {

std::optional<size_t> ConnectionToShed(absl::Span<const ConnectionLoad> loads, int64_t min_undelivered_bytes) {
  std::optional<size_t> worst;
  int64_t worst_undelivered = 0;
  for (size_t i = 0; i < loads.size(); ++i) {
    const int64_t undelivered = loads[i].received_bytes - loads[i].delivered_bytes;
    // Messages delivered and framing: a client sending real requests keeps undelivered far below half.
    if (undelivered < min_undelivered_bytes || 2 * undelivered < loads[i].received_bytes) continue;
    if (!worst.has_value() || undelivered > worst_undelivered) {
      worst = i;
      worst_undelivered = undelivered;
    }
  }
  return worst;
}

absl::StatusOr<std::unique_ptr<MemoryGuard>> MemoryGuard::Create(Options options) {
  if (options.rss_limit_bytes <= 0) return absl::InvalidArgumentError("memory guard: rss_limit_bytes must be > 0");
  if (options.min_undelivered_bytes <= 0) {
    return absl::InvalidArgumentError("memory guard: min_undelivered_bytes must be > 0");
  }
  if (options.interval <= absl::ZeroDuration() || options.prune_interval <= absl::ZeroDuration() ||
      options.cooldown < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("memory guard: interval and prune_interval must be > 0, cooldown >= 0");
  }
  if (options.local_ports.empty()) return absl::InvalidArgumentError("memory guard: no port to watch");
  if (options.delivered == nullptr) return absl::InvalidArgumentError("memory guard: no delivered-bytes table");
  if (!options.rss_bytes) options.rss_bytes = ResidentSetBytes;
  if (!options.list_connections) {
    options.list_connections = [ports = options.local_ports] { return ListTcpConnections(ports); };
  }
  if (!options.shut_down) options.shut_down = ShutDownTcpConnection;
  if (!options.now) options.now = [] { return absl::Now(); };
  const bool start_thread = options.start_thread;
  options.delivered->AddReader();
  std::unique_ptr<MemoryGuard> guard(new MemoryGuard(std::move(options)));
  if (start_thread) guard->thread_ = std::thread([g = guard.get()] {
    NameThisThread("attn-memguard");
    g->Run();
  });
  return guard;
}

MemoryGuard::~MemoryGuard() {
  stop_.Notify();
  if (thread_.joinable()) thread_.join();
  options_.delivered->RemoveReader();
}

int64_t MemoryGuardCapBytes(int64_t process_limit_bytes) {
  const int64_t margin = std::min(process_limit_bytes / 2, std::max(process_limit_bytes / 8, int64_t{64} << 20));
  return process_limit_bytes - margin;
}

int64_t MemoryGuard::rss_limit_bytes() const {
  int64_t limit = options_.rss_limit_bytes;
  if (options_.loaded_layer_bytes) limit += options_.loaded_layer_bytes() - layer_bytes_at_create_;
  return options_.rss_cap_bytes > 0 ? std::min(limit, options_.rss_cap_bytes) : limit;
}

void MemoryGuard::Run() {
  while (!stop_.WaitForNotificationWithTimeout(options_.interval)) CheckOnce();
}

absl::StatusOr<std::vector<TcpConnection>> MemoryGuard::ListAndPrune() {
  const uint64_t round = options_.delivered->BeginPrune();
  absl::StatusOr<std::vector<TcpConnection>> connections = options_.list_connections();
  if (!connections.ok()) return connections;  // unread is not "none": the table stays as it is
  absl::flat_hash_set<std::string> live;
  for (const TcpConnection& c : *connections) live.insert(c.peer_key);
  options_.delivered->Prune(round, live);
  next_prune_ = options_.now() + options_.prune_interval;
  return connections;
}

MemoryGuard::Outcome MemoryGuard::CheckOnce() {
  absl::MutexLock lock(&mu_);
  const absl::Time now = options_.now();
  const int64_t rss = options_.rss_bytes();
  if (rss < 0) return Outcome::kUnreadable;
  const int64_t limit = rss_limit_bytes();
  if (rss <= limit) {
    if (now >= next_prune_) ListAndPrune().IgnoreError();
    return Outcome::kUnderLimit;
  }
  if (now < cooling_until_) return Outcome::kCoolingDown;
  cooling_until_ = now + options_.cooldown;
  const absl::StatusOr<std::vector<TcpConnection>> connections = ListAndPrune();
  if (!connections.ok()) return Outcome::kUnreadable;
  std::vector<ConnectionLoad> loads;
  loads.reserve(connections->size());
  for (const TcpConnection& c : *connections) loads.push_back({c.received_bytes, options_.delivered->Of(c.peer_key)});
  const std::optional<size_t> worst = ConnectionToShed(loads, options_.min_undelivered_bytes);
  if (!worst.has_value() || !options_.shut_down((*connections)[*worst]).ok()) return Outcome::kNoneQualifies;
  if (options_.on_shed) {
    options_.on_shed({(*connections)[*worst].peer_key, loads[*worst].received_bytes, loads[*worst].delivered_bytes,
                      rss, limit});
  }
  return Outcome::kShed;
}

}  // namespace attnserve
