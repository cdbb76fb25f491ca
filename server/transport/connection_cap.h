// A bound on the connections to the gRPC port, which gRPC 1.51 does not have (no
// GRPC_ARG_MAX_ALLOWED_INCOMING_CONNECTIONS before 1.55): every `interval` the connections are counted
// (connection_table.h) and those beyond `max_connections` are shut down, the ones that have sent least first
// (idle connections holding a descriptor, not clients sending requests), the newest first among equals
// (sockets' inode numbers grow with their creation). Idle ones are also closed by gRPC after
// max_connection_idle_ms; this acts within an interval, and keeps the descriptors below the file limit so that
// gRPC's accept loop does not meet EMFILE (the listener probe covers a burst faster than the interval).
//
// Policy apart from threads: CheckOnce() does one check, drivable from a test with fake connections.
//
// Thread-safety: Create starts the checking thread (unless `start_thread` is false); the destructor stops it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "server/transport/connection_table.h"

namespace attnserve {

// Which of `connections` to shut down so that at most `max_connections` remain: indices, least received first,
// the newest (highest inode) first among equals.
std::vector<size_t> ConnectionsOverCap(const std::vector<TcpConnection>& connections, int64_t max_connections);

class ConnectionCap {
 public:
  struct Options {
    int64_t max_connections = 0;  // required, > 0
    absl::Duration interval = absl::Seconds(1);
    std::vector<int> local_ports;  // the gRPC listening ports; at least one
    // Called after each check that shut connections down, with how many (from the checking thread).
    std::function<void(int64_t shed, int64_t found)> on_shed;
    // The process's own unless set (tests set them).
    std::function<std::vector<TcpConnection>()> list_connections;
    std::function<absl::Status(const TcpConnection&)> shut_down;
    bool start_thread = true;
  };
  // InvalidArgument for max_connections or interval <= 0, or no port.
  static absl::StatusOr<std::unique_ptr<ConnectionCap>> Create(Options options);
  ~ConnectionCap();
  ConnectionCap(const ConnectionCap&) = delete;
  ConnectionCap& operator=(const ConnectionCap&) = delete;

  // One check: the number of connections shut down.
  int64_t CheckOnce();

 private:
  explicit ConnectionCap(Options options) : options_(std::move(options)) {}
  void Run();

  const Options options_;
  absl::Mutex mu_;  // serializes CheckOnce
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace attnserve
