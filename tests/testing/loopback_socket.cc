#include "tests/testing/loopback_socket.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

namespace attnserve::testing {

LoopbackListener::LoopbackListener() {
  fd_ = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  listen(fd_, 16);
  socklen_t len = sizeof(addr);
  getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = ntohs(addr.sin_port);
}

LoopbackListener::~LoopbackListener() {
  for (int fd : owned_) close(fd);
  close(fd_);
}

LoopbackListener::Pair LoopbackListener::Connect() {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port_));
  Pair pair;
  pair.client = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(pair.client, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    pair.accepted = accept(fd_, nullptr, nullptr);
  }
  owned_.push_back(pair.client);
  if (pair.accepted >= 0) owned_.push_back(pair.accepted);
  return pair;
}

}  // namespace attnserve::testing
