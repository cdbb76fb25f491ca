// Stops rapid-reset floods (CVE-2023-44487), which gRPC 1.51 does not: a client that opens HTTP/2 streams and
// resets them at once makes gRPC create and queue a call for each faster than it retires them (4-7 GiB and
// 20-40 s without answering anyone, measured), and never reaches a handler of ours. Envoy's premature-reset
// rule is the model: a connection whose client opened at least `min_streams` streams, more than half of which
// the server never finished (a call it answers, refused or not, is finished: its trailers sent; a stream the
// client resets first is not), is shut down (connection_table.h). Its client may reconnect, and is shut down
// again once it has opened `min_streams` more. A client that reconnects before each `min_streams` escapes it.
//
// Every `interval` the guard reads how many calls the servers have started, all connections together (gRPC's
// channelz, channelz_sockets.h). Only once `min_streams` more have started since it last did does it read
// each connection's counts (8 us a connection), and only when one floods does it list the process's sockets
// to find its descriptor. So a server with few calls pays almost nothing, and one with many reads each
// connection at most every interval, and spends at most a tenth of a core on it (with many connections the
// reads are spaced out).
//
// Policy apart from threads: CheckOnce() does one check and can be driven from a test with fakes for the
// counts, the connections and the shutdown.
//
// Thread-safety: Create starts the checking thread (unless `start_thread` is false); the destructor stops it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "server/transport/channelz_sockets.h"
#include "server/transport/connection_table.h"

namespace attnserve {

// Whether a connection's counts are a reset flood: at least `min_streams` streams opened, and more than half
// of them never finished by the server.
bool IsResetFlood(const SocketStreams& socket, int64_t min_streams);

class ResetFloodGuard {
 public:
  struct Options {
    // How often the counts are read. > 0.
    absl::Duration interval = absl::Milliseconds(100);
    // Streams a connection must have opened before it can be judged. > 0.
    int64_t min_streams = 1000;
    // The gRPC listening ports whose connections may be shut down. At least one.
    std::vector<int> local_ports;
    // Called for each connection shut down (from the guard's thread), with its counts.
    std::function<void(const SocketStreams&)> on_shed;
    // The process's own unless set (tests set them).
    std::function<absl::StatusOr<int64_t>()> calls_started;
    std::function<absl::StatusOr<std::vector<SocketStreams>>()> list_sockets;
    std::function<absl::StatusOr<std::vector<TcpConnection>>()> list_connections;
    std::function<absl::Status(const TcpConnection&)> shut_down;
    std::function<absl::Time()> now;
    bool start_thread = true;
  };
  // InvalidArgument for a non-positive interval or minimum, or no port.
  static absl::StatusOr<std::unique_ptr<ResetFloodGuard>> Create(Options options);
  ~ResetFloodGuard();
  ResetFloodGuard(const ResetFloodGuard&) = delete;
  ResetFloodGuard& operator=(const ResetFloodGuard&) = delete;

  // One check (the thread's body): the number of connections shut down. Serialized with itself.
  int CheckOnce() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  explicit ResetFloodGuard(Options options) : options_(std::move(options)) {}
  void Run();

  const Options options_;
  absl::Mutex mu_;  // serializes CheckOnce
  int64_t calls_at_last_read_ ABSL_GUARDED_BY(mu_) = 0;  // calls_started when the connections were last read
  absl::Time next_read_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();  // reads spaced to a tenth of a core
  absl::flat_hash_set<int64_t> shut_ids_ ABSL_GUARDED_BY(mu_);  // channelz ids of sockets shut, still listed
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace attnserve
