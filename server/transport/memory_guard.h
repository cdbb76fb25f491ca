// Holds the process's resident memory under a limit when gRPC's own bound gives way. gRPC 1.51 buffers a
// message whole whatever its length prefix says (up to 4 GiB) and stops it only through its resource quota,
// whose reclamation runs the benign reclaimers first: the sender's socket posts a new one on every read, so
// on a busy machine the stream is reset late or never (a CI run buffered 1 GiB of one message). Envoy's
// overload manager is the model: past a memory threshold, act on the connection holding the most.
//
// Every `interval` the guard reads the RSS. Above its limit (`rss_limit_bytes`, moved by what the layers loaded
// since have added or freed: `loaded_layer_bytes`) it lists the connections on the gRPC
// ports and shuts down (connection_table.h) the one holding the most bytes the kernel received but the
// services were never delivered as messages (delivered_bytes.h), if those are at least
// `min_undelivered_bytes` and at least half of all it sent: a client whose bytes arrive as messages, however
// many, is rarely the one: only while RSS is over the limit, and only if it has more than `min_undelivered_bytes`
// of messages in progress at once (several of the largest uploads in parallel). Then it waits `cooldown` for
// gRPC to free what that connection held; when no connection qualifies it also waits `cooldown` before
// listing again (listing costs a few syscalls per descriptor). It does nothing while the process's
// descriptors or RSS cannot be read (at EMFILE).
//
// Policy apart from threads: CheckOnce() does one check and can be driven from a test with fakes for the
// RSS, the connections, the shutdown and the clock.
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
#include "absl/types/span.h"
#include "server/transport/connection_table.h"
#include "server/transport/delivered_bytes.h"

namespace attnserve {

// What one connection sent, and how much of it reached the services as messages.
struct ConnectionLoad {
  int64_t received_bytes = 0;
  int64_t delivered_bytes = 0;
};

// The index of the connection to shed: the one with the most undelivered bytes (received - delivered), if
// they are at least `min_undelivered_bytes` and at least half of what it received. nullopt when none is.
std::optional<size_t> ConnectionToShed(absl::Span<const ConnectionLoad> loads, int64_t min_undelivered_bytes);

// Options::rss_cap_bytes for a process the kernel lets hold `process_limit_bytes` (its cgroup's limit, else
// physical memory): an eighth of it (at least 64 MiB, at most half of it) is left for the guard to act in, at
// its interval, before the OOM killer would.
int64_t MemoryGuardCapBytes(int64_t process_limit_bytes);

// A connection the guard shut down, for the log and metrics.
struct ShedConnection {
  std::string peer_key;
  int64_t received_bytes = 0;
  int64_t delivered_bytes = 0;
  int64_t rss_bytes = 0;
  int64_t rss_limit_bytes = 0;
};

class MemoryGuard {
 public:
  struct Options {
    // Resident bytes above which the guard acts, as the process holds its layers when the guard is created.
    // Required, > 0.
    int64_t rss_limit_bytes = 0;
    // The bytes the process's layers hold now (live_layer_bytes.h). The limit moves with it: a layer loaded
    // after Create raises it by its bytes, one freed lowers it. Unset: the limit stays where it was created.
    std::function<int64_t()> loaded_layer_bytes;
    // The limit never rises above this, however layers move it: the memory the kernel lets the process hold
    // (its cgroup's limit) less a margin, so that the guard acts before the OOM killer does. 0: no cap.
    int64_t rss_cap_bytes = 0;
    // Undelivered bytes a connection must hold to be shed. > 0.
    int64_t min_undelivered_bytes = int64_t{32} << 20;
    // How often the RSS is read.
    absl::Duration interval = absl::Milliseconds(50);
    // After a shed, or a listing that found no connection to shed, how long before listing again.
    absl::Duration cooldown = absl::Milliseconds(500);
    // How often the delivered-bytes table is pruned of connections gone.
    absl::Duration prune_interval = absl::Seconds(5);
    // The gRPC listening ports whose connections are watched. At least one.
    std::vector<int> local_ports;
    // Required; not owned, must outlive the guard. Held as a reader (recording) while the guard lives.
    DeliveredBytes* delivered = nullptr;
    // Called after each shed (from the guard's thread).
    std::function<void(const ShedConnection&)> on_shed;
    // The process's own unless set (tests set them).
    std::function<int64_t()> rss_bytes;
    std::function<absl::StatusOr<std::vector<TcpConnection>>()> list_connections;
    std::function<absl::Status(const TcpConnection&)> shut_down;
    std::function<absl::Time()> now;
    bool start_thread = true;
  };
  // InvalidArgument for a non-positive limit, minimum, interval or prune interval, a negative cooldown, no
  // port, or no delivered table.
  static absl::StatusOr<std::unique_ptr<MemoryGuard>> Create(Options options);
  ~MemoryGuard();
  MemoryGuard(const MemoryGuard&) = delete;
  MemoryGuard& operator=(const MemoryGuard&) = delete;

  enum class Outcome { kUnderLimit, kCoolingDown, kNoneQualifies, kShed, kUnreadable };
  // One check (the thread's body). Serialized with itself.
  Outcome CheckOnce();
  // The limit now: rss_limit_bytes moved by the layer bytes loaded or freed since Create.
  int64_t rss_limit_bytes() const;

 private:
  explicit MemoryGuard(Options options)
      : options_(std::move(options)),
        layer_bytes_at_create_(options_.loaded_layer_bytes ? options_.loaded_layer_bytes() : 0) {}
  absl::StatusOr<std::vector<TcpConnection>> ListAndPrune() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Run();

  const Options options_;
  const int64_t layer_bytes_at_create_;
  absl::Mutex mu_;
  absl::Time cooling_until_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  absl::Time next_prune_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace attnserve
