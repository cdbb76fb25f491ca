// The key a client's TCP connection is known by on both sides of the memory guard: its address as
// "1.2.3.4:5678" or "[::1]:5678" (an IPv4-mapped IPv6 address as IPv4), made from gRPC's peer URI (what a
// service sees) or from the socket itself (what the guard sees).
#pragma once

#include <string>

#include <sys/socket.h>

#include "absl/strings/string_view.h"

namespace attnserve {

// From gRPC's peer URI: "ipv4:127.0.0.1:5000", "ipv6:%5B::1%5D:5000" (1.51 percent-encodes the brackets)
// or "ipv6:[::1]:5000"; a link-local address without its zone. "" for any other scheme (unix sockets carry no
// port to match).
std::string PeerKeyFromGrpcPeer(absl::string_view grpc_peer);

// From a socket's peer address (getpeername). "" for families other than AF_INET and AF_INET6.
std::string PeerKeyFromSockaddr(const sockaddr_storage& address);

}  // namespace attnserve
