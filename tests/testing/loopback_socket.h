// Loopback TCP sockets for tests of code that reads the process's own connections: a listener on 127.0.0.1
// with a port the OS picked, and clients connected to it. Descriptors are closed by the destructor.
#pragma once

#include <vector>

namespace attnserve::testing {

class LoopbackListener {
 public:
  LoopbackListener();  // listening, backlog 16
  ~LoopbackListener();
  LoopbackListener(const LoopbackListener&) = delete;
  LoopbackListener& operator=(const LoopbackListener&) = delete;

  int port() const { return port_; }
  // A client connected to it and the listener's end of that connection, accepted: {client, accepted}.
  struct Pair {
    int client = -1;
    int accepted = -1;
  };
  Pair Connect();

 private:
  int fd_ = -1;
  int port_ = 0;
  std::vector<int> owned_;
};

}  // namespace attnserve::testing
