// The connection cap: which connections it shuts down beyond max_connections (those that sent least, the
// newest among equals; never one sending requests while idle ones exceed the cap), driven with fake
// connections, and once against real loopback connections.
#include "server/transport/connection_cap.h"
#include "tests/testing/loopback_socket.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <vector>

namespace attnserve {
namespace {

TcpConnection Conn(uint64_t inode, int64_t received) {
  return TcpConnection{static_cast<int>(inode), inode, "10.0.0.1:" + std::to_string(inode), received};
}

TEST(ConnectionsOverCap, NoneWithinTheCap) {
  EXPECT_TRUE(ConnectionsOverCap({Conn(1, 0), Conn(2, 0)}, {0, 0}, 2).empty());
  EXPECT_TRUE(ConnectionsOverCap({}, {}, 1).empty());
}

TEST(ConnectionsOverCap, TheIdleOnesFirstTheNewestAmongEquals) {
  const std::vector<TcpConnection> connections = {Conn(10, 5000000), Conn(11, 24), Conn(12, 24), Conn(13, 900),
                                                  Conn(14, 24)};
  // Two over: the idle ones (24 bytes: a preface), newest first (14, 12), not the busy clients.
  const std::vector<int64_t> none(connections.size(), 0);
  const std::vector<size_t> over = ConnectionsOverCap(connections, none, 3);
  ASSERT_EQ(over.size(), 2u);
  EXPECT_EQ(connections[over[0]].inode, 14u);
  EXPECT_EQ(connections[over[1]].inode, 12u);
  // Four over: every idle one, then the one that sent least of the rest.
  const std::vector<size_t> four = ConnectionsOverCap(connections, none, 1);
  ASSERT_EQ(four.size(), 4u);
  EXPECT_EQ(connections[four[3]].inode, 13u);
}

TEST(ConnectionsOverCap, ConnectionsThatDeliveredMessagesLast) {
  // An attacker's connections sending frames (SETTINGS, PINGs) outnumber a client's bytes; the client's were
  // requests.
  const std::vector<TcpConnection> connections = {Conn(1, 4000), Conn(2, 9000), Conn(3, 9000), Conn(4, 9000)};
  const std::vector<size_t> over = ConnectionsOverCap(connections, {3500, 0, 0, 0}, 1);
  ASSERT_EQ(over.size(), 3u);
  for (size_t i : over) EXPECT_NE(connections[i].inode, 1u);
}

TEST(ConnectionCap, ShutsDownTheExcessEachCheck) {
  std::vector<TcpConnection> connections;
  for (uint64_t i = 1; i <= 8; ++i) connections.push_back(Conn(i, static_cast<int64_t>(100 * i)));
  std::vector<uint64_t> shut;
  int64_t reported = -1, found = -1;
  ConnectionCap::Options o;
  o.max_connections = 5;
  o.local_ports = {50051};
  o.start_thread = false;
  o.list_connections = [&]() -> absl::StatusOr<std::vector<TcpConnection>> { return connections; };
  o.shut_down = [&](const TcpConnection& c) {
    shut.push_back(c.inode);
    return c.inode == 2 ? absl::NotFoundError("gone meanwhile") : absl::OkStatus();
  };
  o.on_shed = [&](int64_t n, int64_t total) {
    reported = n;
    found = total;
  };
  auto cap = ConnectionCap::Create(o);
  ASSERT_TRUE(cap.ok()) << cap.status();
  EXPECT_EQ((*cap)->CheckOnce(), 2);  // 1, 2 and 3 asked; 2 was gone already
  EXPECT_EQ(shut, (std::vector<uint64_t>{1, 2, 3}));
  EXPECT_EQ(reported, 2);
  EXPECT_EQ(found, 8);
  connections.resize(5);
  shut.clear();
  EXPECT_EQ((*cap)->CheckOnce(), 0);
  EXPECT_TRUE(shut.empty());
}

TEST(ConnectionCap, NothingShutWhenTheConnectionsCannotBeListed) {
  int shut = 0;
  ConnectionCap::Options o;
  o.max_connections = 1;
  o.local_ports = {50051};
  o.start_thread = false;
  o.list_connections = []() -> absl::StatusOr<std::vector<TcpConnection>> {
    return absl::UnavailableError("/proc/self/fd: Too many open files");
  };
  o.shut_down = [&](const TcpConnection&) {
    ++shut;
    return absl::OkStatus();
  };
  auto cap = ConnectionCap::Create(o);
  ASSERT_TRUE(cap.ok());
  EXPECT_EQ((*cap)->CheckOnce(), 0);
  EXPECT_EQ(shut, 0);
}

TEST(ConnectionCap, RefusesBadOptions) {
  ConnectionCap::Options o;
  o.local_ports = {1};
  o.start_thread = false;
  EXPECT_EQ(ConnectionCap::Create(o).status().code(), absl::StatusCode::kInvalidArgument);  // no max
  o.max_connections = 1;
  o.interval = absl::ZeroDuration();
  EXPECT_EQ(ConnectionCap::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.interval = absl::Seconds(1);
  o.local_ports.clear();
  EXPECT_EQ(ConnectionCap::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
}

// Six clients on a real listener of this process, three of which sent bytes: with a cap of 4, two of the
// silent ones are shut down (their clients read the end), the rest stay open.
TEST(ConnectionCap, OnRealConnections) {
  testing::LoopbackListener listener;
  std::vector<int> clients;
  for (int i = 0; i < 6; ++i) {
    clients.push_back(listener.Connect().client);
    if (i % 2 == 0) {
      ASSERT_EQ(send(clients.back(), "request", 7, 0), 7);  // 0, 2, 4 send
    }
  }
  usleep(50 * 1000);
  ConnectionCap::Options o;
  o.max_connections = 4;
  o.local_ports = {listener.port()};
  o.start_thread = false;
  auto cap = ConnectionCap::Create(o);
  ASSERT_TRUE(cap.ok());
  EXPECT_EQ((*cap)->CheckOnce(), 2);
  std::vector<bool> ended;
  for (int c : clients) {
    char byte;
    ended.push_back(recv(c, &byte, 1, MSG_DONTWAIT) == 0);
  }
  // Two of the silent ones (1, 3, 5) are shut (which two: roughly the newest; inode numbers come in per-CPU
  // batches), none of those that sent.
  EXPECT_EQ(ended[1] + ended[3] + ended[5], 2);
  EXPECT_FALSE(ended[0] || ended[2] || ended[4]);
}

}  // namespace
}  // namespace attnserve
