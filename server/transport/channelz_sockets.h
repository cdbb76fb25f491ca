// What gRPC's own channelz counts for each connection of this process's gRPC servers: the HTTP/2 streams the
// client opened and those the server finished (sent its trailers on). gRPC 1.51's public C++ API shows
// neither, and they are what tells a rapid-reset client (CVE-2023-44487: streams opened and reset before the
// server answers) from every other (a call the server answers, refused or not, is finished).
//
// Read through gRPC core's channelz C API (JSON), which is on by default (grpc.enable_channelz).
//
// Thread-safety: a free function; gRPC's channelz registry is locked inside.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace attnserve {

struct SocketStreams {
  std::string peer_key;            // peer_address.h; "" for a peer without a port (a unix socket)
  int64_t streams_started = 0;     // HTTP/2 streams the client opened
  int64_t streams_succeeded = 0;   // of those, the ones the server finished (counted once gRPC frees them)
  int64_t socket_id = 0;           // channelz's, never reused in the process
};

// Every connection accepted by a gRPC server of this process that has not been closed yet (a server whose
// connections cannot be listed is skipped). INTERNAL when channelz's list of servers cannot be read.
absl::StatusOr<std::vector<SocketStreams>> ListServerSockets();

// The calls (streams) every gRPC server of the process has started, all connections together: one cheap read,
// to know when reading each connection is worth it.
absl::StatusOr<int64_t> ServerCallsStarted();

// The fields of one channelz socket, from its JSON (grpc_channelz_get_socket's answer). For tests.
absl::StatusOr<SocketStreams> ParseChannelzSocket(absl::string_view json);

}  // namespace attnserve
