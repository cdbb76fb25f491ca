// The connection cap: which connections it shuts down beyond max_connections (those that sent least, the
// newest among equals; never one sending requests while idle ones exceed the cap), and which it shuts down
// as stalled (bytes left unread, nothing delivered, for the stall duration), driven with fake connections and
// a fake clock, and against real loopback connections.
#include "server/transport/connection_cap.h"
#include "tests/testing/loopback_socket.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/time/time.h"

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

TcpConnection Unread(uint64_t inode, int64_t unread) {
  TcpConnection c = Conn(inode, 1 << 20);
  c.unread_bytes = unread;
  return c;
}

constexpr int64_t kKiB = 1024;

TEST(StalledReads, UnreadForTheStallDurationWithNothingDelivered) {
  StalledReads stalled({16 * kKiB, absl::Seconds(3)});
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  // 1: stays unread; 2: never over the minimum; 3: read between checks; 4: delivers messages meanwhile.
  const auto at = [&](int s, int64_t third, int64_t fourth_delivered) {
    return stalled.Check({Unread(1, 100 * kKiB), Unread(2, 16 * kKiB - 1), Unread(3, third), Unread(4, 64 * kKiB)},
                         {0, 0, 0, fourth_delivered}, t0 + absl::Seconds(s));
  };
  EXPECT_TRUE(at(0, 64 * kKiB, 0).empty());
  EXPECT_TRUE(at(1, 0, 10).empty());          // 3 read once (a lone miss); 4 delivered a message
  EXPECT_TRUE(at(2, 0, 20).empty());          // 3 read at two checks in a row: cleared; 4 starts over
  EXPECT_EQ(at(3, 64 * kKiB, 30), (std::vector<size_t>{0}));  // 1: 3 s unread, nothing delivered
  EXPECT_TRUE(at(4, 64 * kKiB, 30).empty());  // 1 starts over once reported; 3 unread since 3 s, 4 since 3 s
  EXPECT_TRUE(at(5, 0, 30).empty());          // a lone read of 3: its stall goes on
  EXPECT_EQ(at(6, 64 * kKiB, 30), (std::vector<size_t>{2, 3}));  // 3: unread since 3 s; 4: since its last message
}

TEST(StalledReads, AConnectionGoneIsForgotten) {
  StalledReads stalled({16 * kKiB, absl::Seconds(3)});
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  EXPECT_TRUE(stalled.Check({Unread(7, 64 * kKiB)}, {0}, t0).empty());
  EXPECT_TRUE(stalled.Check({}, {}, t0 + absl::Seconds(1)).empty());
  // A socket listed again (the same inode, as a reused one would be) starts over.
  EXPECT_TRUE(stalled.Check({Unread(7, 64 * kKiB)}, {0}, t0 + absl::Seconds(3)).empty());
  EXPECT_EQ(stalled.Check({Unread(7, 64 * kKiB)}, {0}, t0 + absl::Seconds(6)), (std::vector<size_t>{0}));
}

// A cap with the stalled rule (16 KiB, 3 s) over fixed fake connections, a fake clock and a fake shutdown
// that records what it was asked to shut (and leaves it listed).
struct StalledCap {
  StalledCap(std::vector<TcpConnection> listed, int64_t max_connections) : connections(std::move(listed)) {
    ConnectionCap::Options o;
    o.max_connections = max_connections;
    o.local_ports = {50051};
    o.start_thread = false;
    o.delivered = &delivered;
    o.stalled = StalledReads::Options{16 * kKiB, absl::Seconds(3)};
    o.now = [this] { return now; };
    o.list_connections = [this]() -> absl::StatusOr<std::vector<TcpConnection>> { return connections; };
    o.shut_down = [this](const TcpConnection& c) {
      shut.push_back(c.inode);
      return absl::OkStatus();
    };
    o.on_stalled = [this](const TcpConnection& c) { reported.push_back(c.inode); };
    auto created = ConnectionCap::Create(o);
    EXPECT_TRUE(created.ok()) << created.status();
    if (created.ok()) cap = std::move(*created);
  }

  const std::vector<TcpConnection> connections;
  absl::Time now = absl::FromUnixSeconds(1000);
  std::vector<uint64_t> shut, reported;
  DeliveredBytes delivered;
  std::unique_ptr<ConnectionCap> cap;
};

TEST(ConnectionCap, ShutsDownStalledConnectionsWhenAsked) {
  StalledCap c({Unread(1, 128 * kKiB), Unread(2, 0)}, 100);
  ASSERT_NE(c.cap, nullptr);
  for (int s = 0; s < 3; ++s, c.now += absl::Seconds(1)) EXPECT_EQ(c.cap->CheckOnce(), 0);
  EXPECT_EQ(c.cap->CheckOnce(), 1);
  EXPECT_EQ(c.shut, (std::vector<uint64_t>{1}));
  EXPECT_EQ(c.reported, (std::vector<uint64_t>{1}));
  // While it holds the table, the table records; gone, it stops (the process's table has no other reader).
  c.delivered.Record("ipv4:10.0.0.1:1", 10);
  EXPECT_EQ(c.delivered.Of("10.0.0.1:1"), 10);
  c.cap.reset();
  EXPECT_EQ(c.delivered.size(), 0u);
}

TEST(ConnectionCap, AStalledConnectionShutOverTheCapIsNotShutAgain) {
  // 9 sent as much as the others and is the newest: the cap sheds it at every check (a fake shutdown leaves it
  // listed); once it is stalled too, it is still asked to shut down once a check.
  StalledCap c({Unread(2, 0), Unread(3, 0), Unread(9, 128 * kKiB)}, 2);
  ASSERT_NE(c.cap, nullptr);
  for (int s = 0; s <= 3; ++s, c.now += absl::Seconds(1)) EXPECT_EQ(c.cap->CheckOnce(), 1);
  EXPECT_EQ(c.shut, (std::vector<uint64_t>{9, 9, 9, 9}));
  EXPECT_TRUE(c.reported.empty());
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
  o.stalled = StalledReads::Options{0, absl::Seconds(3)};
  EXPECT_EQ(ConnectionCap::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.stalled = StalledReads::Options{16 * kKiB, absl::ZeroDuration()};
  EXPECT_EQ(ConnectionCap::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.stalled = StalledReads::Options{16 * kKiB, absl::Seconds(3)};  // and no delivered table
  EXPECT_EQ(ConnectionCap::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.stalled.reset();
  o.local_ports.clear();
  EXPECT_EQ(ConnectionCap::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
}

// A client whose 256 KiB the server side never reads: the kernel's count of unread bytes (what fits its receive
// buffer), and the cap shutting
// the connection down once it stayed so (a fake clock), while a connection whose bytes were read stays.
TEST(ConnectionCap, OnARealConnectionLeftUnread) {
  testing::LoopbackListener listener;
  const testing::LoopbackListener::Pair unread = listener.Connect();
  const testing::LoopbackListener::Pair read = listener.Connect();
  const std::string bytes(256 * kKiB, 'x');
  ASSERT_EQ(send(unread.client, bytes.data(), bytes.size(), MSG_DONTWAIT), static_cast<ssize_t>(bytes.size()));
  ASSERT_EQ(send(read.client, bytes.data(), 1000, 0), 1000);
  usleep(50 * 1000);
  std::string sink(1000, '\0');
  ASSERT_EQ(recv(read.accepted, sink.data(), sink.size(), MSG_WAITALL), 1000);
  const absl::StatusOr<std::vector<TcpConnection>> listed = ListTcpConnections({listener.port()});
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->size(), 2u);
  for (const TcpConnection& c : *listed) {
    if (c.fd == unread.accepted) {  // as much as its receive buffer holds; the rest waits in the client's
      EXPECT_GE(c.unread_bytes, 64 * kKiB);
      EXPECT_LE(c.unread_bytes, static_cast<int64_t>(bytes.size()));
    } else {
      EXPECT_EQ(c.unread_bytes, 0);
    }
  }
  absl::Time now = absl::Now();
  DeliveredBytes delivered;
  ConnectionCap::Options o;
  o.max_connections = 100;
  o.local_ports = {listener.port()};
  o.start_thread = false;
  o.delivered = &delivered;
  o.stalled = StalledReads::Options{16 * kKiB, absl::Seconds(3)};
  o.now = [&] { return now; };
  auto cap = ConnectionCap::Create(o);
  ASSERT_TRUE(cap.ok());
  EXPECT_EQ((*cap)->CheckOnce(), 0);
  now += absl::Seconds(3);
  EXPECT_EQ((*cap)->CheckOnce(), 1);
  char byte;
  EXPECT_EQ(recv(unread.client, &byte, 1, MSG_DONTWAIT), 0);  // its client reads the end
  EXPECT_EQ(recv(read.client, &byte, 1, MSG_DONTWAIT), -1);   // still open, nothing to read
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
