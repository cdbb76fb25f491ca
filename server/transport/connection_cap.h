// A bound on the connections to the gRPC port, which gRPC 1.51 does not have (no
// GRPC_ARG_MAX_ALLOWED_INCOMING_CONNECTIONS before 1.55): every `interval` the connections are counted
// (connection_table.h) and those beyond `max_connections` are shut down: first those with the fewest bytes
// delivered as messages (delivered_bytes.h), then those that sent least (idle connections holding a descriptor,
// before clients sending requests), then roughly the newest (sockets' inode numbers grow with their creation,
// in per-CPU batches). Idle ones are also closed by gRPC after
// max_connection_idle_ms; this acts within an interval, and keeps the descriptors below the file limit so that
// gRPC's accept loop does not meet EMFILE (the listener probe covers a burst faster than the interval).
// The same listing also shuts down connections whose bytes gRPC has stopped reading (stalled_reads.h), when
// `stalled` is set.
//
// Policy apart from threads: CheckOnce() does one check, drivable from a test with fake connections.
//
// Thread-safety: Create starts the checking thread (unless `start_thread` is false); the destructor stops it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "server/transport/connection_table.h"
#include "server/transport/delivered_bytes.h"
#include "server/transport/stalled_reads.h"

namespace attnserve {

// Which of `connections` to shut down so that at most `max_connections` remain: indices, fewest
// `delivered_bytes` (one per connection) first, then least received, then the highest inode.
std::vector<size_t> ConnectionsOverCap(const std::vector<TcpConnection>& connections,
                                       const std::vector<int64_t>& delivered_bytes, int64_t max_connections);

class ConnectionCap {
 public:
  struct Options {
    int64_t max_connections = 0;  // required, > 0
    // How often the connections are counted.
    absl::Duration interval = absl::Seconds(1);
    // What each connection had delivered as messages; null: ranked by bytes received alone. Not owned; must
    // outlive the cap. With `stalled` it is required, held as a reader (recording) and pruned at each check.
    DeliveredBytes* delivered = nullptr;
    std::vector<int> local_ports;  // the gRPC listening ports; at least one
    // Called after each check that shut connections down, with how many (from the checking thread).
    std::function<void(int64_t shed, int64_t found)> on_shed;
    // When set, stalled connections (stalled_reads.h) are shut down too, each reported to on_stalled (a
    // connection shut over the cap in the same check is not shut again).
    std::optional<StalledReads::Options> stalled;
    std::function<void(const TcpConnection&)> on_stalled;
    // The process's own unless set (tests set them).
    std::function<absl::StatusOr<std::vector<TcpConnection>>()> list_connections;
    std::function<absl::Status(const TcpConnection&)> shut_down;
    std::function<absl::Time()> now;  // default: a monotonic clock, so that a clock step stalls no one
    bool start_thread = true;
  };
  // InvalidArgument for max_connections or interval <= 0, no port, or a stalled rule with a value <= 0 or
  // without a delivered table.
  static absl::StatusOr<std::unique_ptr<ConnectionCap>> Create(Options options);
  ~ConnectionCap();
  ConnectionCap(const ConnectionCap&) = delete;
  ConnectionCap& operator=(const ConnectionCap&) = delete;

  // One check: the number of connections shut down, over the cap or stalled (0 when they could not be listed).
  int64_t CheckOnce() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  explicit ConnectionCap(Options options);
  void Run();
  int64_t ShutDownStalled(const std::vector<TcpConnection>& connections, const std::vector<int64_t>& delivered,
                          const std::vector<size_t>& shut_over_cap) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  absl::Mutex mu_;  // serializes CheckOnce
  std::optional<StalledReads> stalled_ ABSL_GUARDED_BY(mu_);
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace attnserve
