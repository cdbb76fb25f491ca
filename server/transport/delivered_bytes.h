// Bytes each client connection has had delivered to the services as whole messages, by peer key
// (peer_address.h). What a connection sent beyond that is still in the transport's buffers (a message in
// progress) or was framing: the memory guard compares the two.
//
// Entries live while their connection does: Prune drops those of connections gone, so a client that opens
// connection after connection cannot grow the table. One server per process (as main runs it): a second
// one's guard would prune the first one's connections too, which then look undelivered to it (tests that
// start several servers never go over the guard's limit).
//
// Thread-safety: all methods may be called from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace attnserve {

class DeliveredBytes {
 public:
  // The process's: the services record into it, the memory guard reads it (connections are the process's).
  static DeliveredBytes& Process();

  // A message of `bytes` delivered from `grpc_peer` (gRPC's peer URI). Peers without a key (unix sockets)
  // are not recorded, nor anything while no reader holds the table (nothing would prune it).
  void Record(absl::string_view grpc_peer, int64_t bytes);
  // Readers (the memory guard; the connection cap when it shuts down stalled connections) hold the table on
  // for their lifetimes, and each prunes it. A table records from construction; the process's only once a
  // reader is added. Removing the last reader empties it and stops recording.
  void AddReader() ABSL_LOCKS_EXCLUDED(mu_);
  void RemoveReader() ABSL_LOCKS_EXCLUDED(mu_);
  // What `peer_key`'s connection had delivered (0 when never recorded).
  int64_t Of(const std::string& peer_key) const;

  // Pruning in two steps around listing the live connections: BeginPrune's round, then Prune with the keys
  // found. Entries recorded after BeginPrune survive, so a connection accepted while listing is kept.
  uint64_t BeginPrune();
  void Prune(uint64_t round, const absl::flat_hash_set<std::string>& live_peer_keys);
  size_t size() const;

 private:
  struct Entry {
    int64_t bytes = 0;
    uint64_t round = 0;  // the pruning round of its last record
  };
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Entry> entries_ ABSL_GUARDED_BY(mu_);
  uint64_t round_ ABSL_GUARDED_BY(mu_) = 0;
  int readers_ ABSL_GUARDED_BY(mu_) = 0;
  std::atomic<bool> enabled_{true};
};

}  // namespace attnserve
