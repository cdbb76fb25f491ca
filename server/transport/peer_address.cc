#include "server/transport/peer_address.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cstring>

#include "absl/strings/strip.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace attnserve {
namespace {

std::string PercentDecoded(absl::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    uint32_t byte = 0;
    if (text[i] == '%' && i + 2 < text.size() && absl::SimpleHexAtoi(text.substr(i + 1, 2), &byte)) {
      out.push_back(static_cast<char>(byte));
      i += 2;
    } else {
      out.push_back(text[i]);
    }
  }
  return out;
}

}  // namespace

std::string PeerKeyFromGrpcPeer(absl::string_view grpc_peer) {
  if (absl::ConsumePrefix(&grpc_peer, "ipv4:")) return std::string(grpc_peer);
  if (absl::ConsumePrefix(&grpc_peer, "ipv6:")) {
    std::string key = PercentDecoded(grpc_peer);
    // A link-local address carries its zone ("[fe80::1%2]:5000"); the socket's address, as printed, does not.
    const size_t zone = key.find('%'), bracket = key.find(']');
    if (zone != std::string::npos && bracket != std::string::npos && zone < bracket) key.erase(zone, bracket - zone);
    return key;
  }
  return "";
}

std::string PeerKeyFromSockaddr(const sockaddr_storage& address) {
  char host[INET6_ADDRSTRLEN] = {};
  if (address.ss_family == AF_INET) {
    const auto& v4 = reinterpret_cast<const sockaddr_in&>(address);
    inet_ntop(AF_INET, &v4.sin_addr, host, sizeof(host));
    return absl::StrCat(host, ":", ntohs(v4.sin_port));
  }
  if (address.ss_family != AF_INET6) return "";
  const auto& v6 = reinterpret_cast<const sockaddr_in6&>(address);
  if (IN6_IS_ADDR_V4MAPPED(&v6.sin6_addr)) {
    in_addr v4;
    std::memcpy(&v4, v6.sin6_addr.s6_addr + 12, sizeof(v4));
    inet_ntop(AF_INET, &v4, host, sizeof(host));
    return absl::StrCat(host, ":", ntohs(v6.sin6_port));
  }
  inet_ntop(AF_INET6, &v6.sin6_addr, host, sizeof(host));
  return absl::StrCat("[", host, "]:", ntohs(v6.sin6_port));
}

}  // namespace attnserve
