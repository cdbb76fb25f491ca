// The process's own accepted TCP connections on given local ports, as the kernel counts them: found through
// /proc/self/fd, measured with TCP_INFO (bytes received), and shut down by descriptor. For the memory guard,
// which must act on connections that gRPC 1.51's public API does not show.
//
// Thread-safety: free functions; they only read the process's descriptors, except ShutDownTcpConnection.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace attnserve {

struct TcpConnection {
  int fd = -1;
  uint64_t inode = 0;        // the socket's, to tell a reused descriptor apart
  std::string peer_key;      // peer_address.h
  int64_t received_bytes = 0;  // payload bytes the kernel received on it (tcpi_bytes_received)
  int64_t unread_bytes = 0;    // of those, the ones the process has not read yet (its receive queue)
};

// Established TCP connections of this process whose local port is one of `local_ports` (not listening
// sockets, nor ones already shut down and waiting for their owner to close them). UNAVAILABLE when the
// process's descriptors cannot be read (at EMFILE opening /proc/self/fd fails): never an empty list then.
absl::StatusOr<std::vector<TcpConnection>> ListTcpConnections(const std::vector<int>& local_ports);

// Shuts `connection` down in both directions, if its descriptor still holds that socket (same inode and
// peer): its owner (gRPC) then sees the connection fail and closes it, freeing what it buffered. The
// descriptor is not closed here (it is not ours). NOT_FOUND when the descriptor changed meanwhile.
absl::Status ShutDownTcpConnection(const TcpConnection& connection);

}  // namespace attnserve
