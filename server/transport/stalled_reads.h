// Tells the connections whose bytes gRPC has stopped reading. gRPC 1.51 parses a header value sent in
// CONTINUATION frames again from its start as each frame arrives (CVE-2023-33953, fixed in 1.53.2): a client
// declaring one 64 MiB value and sending it 16 KiB at a time keeps a core busy for minutes per connection
// (measured: one connection, one core; two, both) while its bytes wait in the kernel. Every other client's bytes
// are read as they come: gRPC applies HTTP/2 flow control to DATA, not by leaving bytes unread, and requests it
// reads are delivered as messages.
//
// A connection is stalled when, for `stall_duration`, the kernel held at least `min_unread_bytes` of it unread
// at every check but lone ones (a slow parse still reads now and then; two checks in a row that find it read
// clear it), and none of its bytes reached a service as a message in that time (delivered_bytes.h).
// What it misses: a client that sends each frame only once the last was read keeps the queue short (it burns
// less, but is not caught). What it could catch wrongly: an upload that gRPC reads slower than it arrives, with
// no message complete, for the whole duration (a process starved of CPU for seconds).
//
// Policy apart from threads and time: Check() is given each check's connections, what each delivered and the
// time. Thread-safety: not thread-safe; ConnectionCap calls it from its one thread.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/time/time.h"
#include "server/transport/connection_table.h"

namespace attnserve {

class StalledReads {
 public:
  struct Options {
    // Unread bytes (the kernel's receive queue) a connection must hold at each check. > 0.
    int64_t min_unread_bytes = int64_t{16} << 10;
    // How long it must stay so, with nothing delivered. > 0.
    absl::Duration stall_duration = absl::Seconds(3);
  };
  explicit StalledReads(const Options& options) : options_(options) {}

  // One check: `connections` as listed now, `delivered_bytes[i]` what connection i delivered as messages so
  // far. Returns the indices of those stalled for stall_duration (each once: it starts over after).
  std::vector<size_t> Check(const std::vector<TcpConnection>& connections,
                            const std::vector<int64_t>& delivered_bytes, absl::Time now);

 private:
  struct Stall {
    absl::Time since;
    int64_t delivered = 0;
    int misses = 0;  // checks in a row that found it read down
  };
  const Options options_;
  absl::flat_hash_map<uint64_t, Stall> stalls_;  // by socket inode; connections gone are dropped each check
};

}  // namespace attnserve
