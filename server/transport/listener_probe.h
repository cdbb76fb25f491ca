// Checks that the server's own listening port still accepts connections, from the outside: a loopback
// connection that must be accepted. The kernel completes TCP handshakes into the listen backlog whether or
// not the process accepts them, so connecting is not enough: the probe sends the protocol's first bytes
// (the HTTP/2 preface, or a TLS ClientHello) and waits for an answer or a close; when none comes, it looks
// in the kernel's tables whether the process accepted the connection (accept_state.h).
//
// Why: an accept loop that hit EMFILE once may never accept again (the RPC library in Debian 12 gives up;
// CVE-2023-4785), while the process looks alive. A busy server (a flood keeping its threads occupied) may
// also leave a probe unanswered for seconds; that is no reason to restart it. So the probe reports, by
// calling `on_failure` once with the reason and stopping, only when
//   - `failures_to_report` connects in a row fail (refused, or the backlog is full), or
//   - one probe connection stays neither answered nor accepted for `accept_deadline`: it is kept open across
//     checks, and any answer or accept on it clears the suspicion.
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
    // Failed connects in a row that make a failure.
    int failures_to_report = 3;
    // How long one connection may wait, unanswered, in the listen backlog before the listener counts as dead.
    absl::Duration accept_deadline = absl::Seconds(30);
    std::function<void(const std::string& why)> on_failure;
  };
  // InvalidArgument for a port outside [1, 65535], a non-positive interval, timeout or accept_deadline, or
  // no on_failure.
  static absl::StatusOr<std::unique_ptr<ListenerProbe>> Create(const Options& options);
  ~ListenerProbe();
  ListenerProbe(const ListenerProbe&) = delete;
  ListenerProbe& operator=(const ListenerProbe&) = delete;

  // One probe: OK when the listener answered or closed a new connection within `timeout`, or accepted it
  // (busy, not dead); UNAVAILABLE saying what failed (connect refused, not accepted) otherwise.
  static absl::Status ProbeOnce(const std::string& host, int port, bool tls, absl::Duration timeout);

 private:
  explicit ListenerProbe(const Options& options) : options_(options) {}
  void Run();

  const Options options_;
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace attnserve
