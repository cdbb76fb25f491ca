// gRPC's own log lines (handshake failures, unparsable metadata, accept errors) through the server's logger:
// in its format (text or JSON), bounded in length, and rate-limited, since a client can make gRPC log a line
// per call (e.g. a malformed grpc-timeout header), which would otherwise flood stderr.
#pragma once

namespace attnserve {

// Routes gRPC's log function to spdlog, at most 20 lines a second with a count of those dropped. Process-
// wide and idempotent; call before the first gRPC server starts.
void RouteGrpcLogsToSpdlog();

}  // namespace attnserve
