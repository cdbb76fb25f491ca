// Checks that the server's own listening port still accepts connections, from the outside: a loopback
// connection that must get an answer. The kernel completes TCP handshakes into the listen backlog whether or
// not the process accepts them, so connecting is not enough: the probe sends the protocol's first bytes
// (the HTTP/2 preface, or a TLS ClientHello) and waits for any answer or a close, then hangs up.
//
// Why: an accept loop that hit EMFILE once may never accept again (the RPC library in Debian 12 gives up;
// CVE-2023-4785), while the process looks alive. After `failures_to_report` failed probes in a row the
// probe calls `on_failure` once, with the reason, and stops.
//
// Thread-safety: Create starts the probing thread; the destructor stops it.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

namespace attnserve {

class ListenerProbe {
 public:
  struct Options {
    // Where to connect: the listen address's host ("0.0.0.0", "[::]" and "" mean the loopback) and port.
    std::string host;
    int port = 0;
    bool tls = false;
    absl::Duration interval = absl::Seconds(5);
    // How long a probe waits for the connection and for an answer.
    absl::Duration timeout = absl::Seconds(2);
    int failures_to_report = 3;
    std::function<void(const std::string& why)> on_failure;
  };
  // InvalidArgument for a port outside [1, 65535], a non-positive interval or timeout, or no on_failure.
  static absl::StatusOr<std::unique_ptr<ListenerProbe>> Create(const Options& options);
  ~ListenerProbe();
  ListenerProbe(const ListenerProbe&) = delete;
  ListenerProbe& operator=(const ListenerProbe&) = delete;

  // One probe: OK when the listener accepted a connection and answered or closed it within `timeout`;
  // UNAVAILABLE saying what failed (connect refused, no answer) otherwise.
  static absl::Status ProbeOnce(const std::string& host, int port, bool tls, absl::Duration timeout);

 private:
  explicit ListenerProbe(const Options& options) : options_(options) {}
  void Run();

  const Options options_;
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace attnserve
