// The memory guard and what it reads: which connection it sheds (the one holding the most bytes that never
// arrived as messages, never one whose bytes did), when (RSS over the limit, not while cooling down), the
// peer keys it matches (gRPC's peer URIs against the sockets' addresses, checked against a real gRPC server),
// and the kernel's view of real loopback connections (bytes received, shutdown).
#include "server/transport/memory_guard.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "common/process_memory.h"
#include "server/transport/connection_table.h"
#include "server/transport/delivered_bytes.h"
#include "server/transport/peer_address.h"
#include "tests/testing/loopback_socket.h"

namespace attnserve {
namespace {

using ::testing::Contains;

constexpr int64_t kMiB = int64_t{1} << 20;

TEST(PeerKey, FromGrpcPeerUris) {
  EXPECT_EQ(PeerKeyFromGrpcPeer("ipv4:127.0.0.1:5000"), "127.0.0.1:5000");
  EXPECT_EQ(PeerKeyFromGrpcPeer("ipv6:%5B::1%5D:5000"), "[::1]:5000");
  EXPECT_EQ(PeerKeyFromGrpcPeer("ipv6:[fe80::1]:65535"), "[fe80::1]:65535");
  EXPECT_EQ(PeerKeyFromGrpcPeer("ipv6:%5Bfe80::1%252%5D:5000"), "[fe80::1]:5000");  // its zone dropped
  EXPECT_EQ(PeerKeyFromGrpcPeer("unix:/tmp/socket"), "");
  EXPECT_EQ(PeerKeyFromGrpcPeer(""), "");
}

TEST(PeerKey, FromSocketAddresses) {
  sockaddr_storage v4 = {};
  auto& in4 = reinterpret_cast<sockaddr_in&>(v4);
  in4.sin_family = AF_INET;
  in4.sin_port = htons(5000);
  inet_pton(AF_INET, "10.1.2.3", &in4.sin_addr);
  EXPECT_EQ(PeerKeyFromSockaddr(v4), "10.1.2.3:5000");
  sockaddr_storage v6 = {};
  auto& in6 = reinterpret_cast<sockaddr_in6&>(v6);
  in6.sin6_family = AF_INET6;
  in6.sin6_port = htons(443);
  inet_pton(AF_INET6, "::1", &in6.sin6_addr);
  EXPECT_EQ(PeerKeyFromSockaddr(v6), "[::1]:443");
  inet_pton(AF_INET6, "::ffff:10.1.2.3", &in6.sin6_addr);  // a v4 client of a dual-stack listener
  EXPECT_EQ(PeerKeyFromSockaddr(v6), "10.1.2.3:443");
  sockaddr_storage unix_address = {};
  unix_address.ss_family = AF_UNIX;
  EXPECT_EQ(PeerKeyFromSockaddr(unix_address), "");
}

TEST(ConnectionToShed, TheOneHoldingMostUndeliveredBytes) {
  const std::vector<ConnectionLoad> loads = {
      {200 * kMiB, 190 * kMiB},  // requests: delivered
      {100 * kMiB, 0},           // one message in progress, never delivered
      {300 * kMiB, 0},           // the most undelivered
      {40 * kMiB, 0},            // below the minimum
  };
  EXPECT_EQ(ConnectionToShed(loads, 64 * kMiB), 2u);
}

TEST(ConnectionToShed, NoneWhenBytesArriveAsMessages) {
  // A busy client that has sent 10 GiB of requests: its framing alone passes the minimum, yet it is less than
  // half of what it sent.
  EXPECT_EQ(ConnectionToShed({{10240 * kMiB, 10000 * kMiB}}, 64 * kMiB), std::nullopt);
  EXPECT_EQ(ConnectionToShed({{63 * kMiB, 0}}, 64 * kMiB), std::nullopt);
  EXPECT_EQ(ConnectionToShed({}, 64 * kMiB), std::nullopt);
  // More undelivered than delivered, past the minimum: shed.
  EXPECT_EQ(ConnectionToShed({{300 * kMiB, 100 * kMiB}}, 64 * kMiB), 0u);
}

TEST(DeliveredBytes, RecordsByPeerKeyAndPrunesConnectionsGone) {
  DeliveredBytes delivered;
  delivered.Record("ipv4:127.0.0.1:4000", 100);
  delivered.Record("ipv4:127.0.0.1:4000", 50);
  delivered.Record("ipv6:%5B::1%5D:4001", 7);
  delivered.Record("unix:/x", 9);  // no key: not recorded
  EXPECT_EQ(delivered.Of("127.0.0.1:4000"), 150);
  EXPECT_EQ(delivered.Of("[::1]:4001"), 7);
  EXPECT_EQ(delivered.size(), 2u);
  const uint64_t round = delivered.BeginPrune();
  delivered.Record("ipv4:127.0.0.1:4002", 1);  // a connection accepted while the live ones were listed
  delivered.Prune(round, {"127.0.0.1:4000"});
  EXPECT_EQ(delivered.Of("127.0.0.1:4000"), 150);
  EXPECT_EQ(delivered.Of("[::1]:4001"), 0);  // gone
  EXPECT_EQ(delivered.Of("127.0.0.1:4002"), 1);
  EXPECT_EQ(delivered.size(), 2u);
  // Held by two readers (the memory guard and the connection cap): one gone, it still records.
  delivered.AddReader();
  delivered.AddReader();
  delivered.RemoveReader();
  delivered.Record("ipv4:127.0.0.1:4003", 5);
  EXPECT_EQ(delivered.Of("127.0.0.1:4003"), 5);
  // The last reader gone (nothing would prune it): emptied, and nothing more is recorded.
  delivered.RemoveReader();
  EXPECT_EQ(delivered.size(), 0u);
  delivered.Record("ipv4:127.0.0.1:4003", 5);
  EXPECT_EQ(delivered.size(), 0u);
}

// A guard driven by hand: fake RSS, connections, shutdown and clock.
class GuardTest : public ::testing::Test {
 protected:
  std::unique_ptr<MemoryGuard> MakeGuard() {
    MemoryGuard::Options o;
    o.rss_limit_bytes = 512 * kMiB;
    o.min_undelivered_bytes = 80 * kMiB;
    o.cooldown = absl::Milliseconds(500);
    o.local_ports = {50051};
    o.delivered = &delivered_;
    o.start_thread = false;
    o.rss_bytes = [this] { return rss_; };
    o.list_connections = [this]() -> absl::StatusOr<std::vector<TcpConnection>> {
      if (fail_listing_) return absl::UnavailableError("/proc/self/fd: Too many open files");
      ++listings_;
      return connections_;
    };
    o.shut_down = [this](const TcpConnection& c) {
      shut_.push_back(c.peer_key);
      return absl::OkStatus();
    };
    o.now = [this] { return now_; };
    o.on_shed = [this](const ShedConnection& s) { sheds_.push_back(s); };
    o.loaded_layer_bytes = loaded_layer_bytes_;
    o.rss_cap_bytes = rss_cap_bytes_;
    auto guard = MemoryGuard::Create(std::move(o));
    EXPECT_TRUE(guard.ok()) << guard.status();
    return std::move(*guard);
  }

  DeliveredBytes delivered_;
  int64_t rss_ = 100 * kMiB;
  std::vector<TcpConnection> connections_ = {{10, 1, "127.0.0.1:1000", 500 * kMiB},
                                             {11, 2, "127.0.0.1:1001", 900 * kMiB}};
  absl::Time now_ = absl::FromUnixSeconds(1000);
  int listings_ = 0;
  bool fail_listing_ = false;
  std::vector<std::string> shut_;
  std::vector<ShedConnection> sheds_;
  std::function<int64_t()> loaded_layer_bytes_;  // unset: the limit stays put
  int64_t rss_cap_bytes_ = 0;                    // 0: no cap
};

TEST_F(GuardTest, UnderTheLimitNothingIsShed) {
  auto guard = MakeGuard();
  EXPECT_EQ(guard->CheckOnce(), MemoryGuard::Outcome::kUnderLimit);
  EXPECT_EQ(listings_, 1);  // the first check prunes the table
  now_ += absl::Seconds(1);
  EXPECT_EQ(guard->CheckOnce(), MemoryGuard::Outcome::kUnderLimit);
  EXPECT_EQ(listings_, 1);  // the next prune is 5 s later
  EXPECT_TRUE(shut_.empty());
}

TEST_F(GuardTest, OverTheLimitShedsTheConnectionHoldingMostThenCoolsDown) {
  delivered_.Record("ipv4:127.0.0.1:1001", 880 * kMiB);  // the bigger sender's bytes were messages
  auto guard = MakeGuard();
  rss_ = 600 * kMiB;
  EXPECT_EQ(guard->CheckOnce(), MemoryGuard::Outcome::kShed);
  ASSERT_EQ(shut_.size(), 1u);
  EXPECT_EQ(shut_[0], "127.0.0.1:1000");
  ASSERT_EQ(sheds_.size(), 1u);
  EXPECT_EQ(sheds_[0].received_bytes, 500 * kMiB);
  EXPECT_EQ(sheds_[0].delivered_bytes, 0);
  EXPECT_EQ(sheds_[0].rss_bytes, 600 * kMiB);
  EXPECT_EQ(sheds_[0].rss_limit_bytes, 512 * kMiB);
  // Cooling down: gRPC needs time to free what that connection held.
  now_ += absl::Milliseconds(100);
  EXPECT_EQ(guard->CheckOnce(), MemoryGuard::Outcome::kCoolingDown);
  // Still over after the cooldown, and the shed connection gone: the other one delivered its bytes.
  connections_.erase(connections_.begin());
  now_ += absl::Milliseconds(500);
  EXPECT_EQ(guard->CheckOnce(), MemoryGuard::Outcome::kNoneQualifies);
  EXPECT_EQ(shut_.size(), 1u);
}

TEST_F(GuardTest, AConnectionGoneBeforeItsShutdownIsNoShed) {
  rss_ = 600 * kMiB;
  // A shutdown that finds the descriptor changed since the listing.
  MemoryGuard::Options gone;
  gone.rss_limit_bytes = 512 * kMiB;
  gone.local_ports = {50051};
  gone.delivered = &delivered_;
  gone.start_thread = false;
  gone.rss_bytes = [this] { return rss_; };
  gone.list_connections = [this]() -> absl::StatusOr<std::vector<TcpConnection>> { return connections_; };
  gone.shut_down = [](const TcpConnection&) { return absl::NotFoundError("gone"); };
  auto guard_gone = MemoryGuard::Create(std::move(gone));
  ASSERT_TRUE(guard_gone.ok());
  EXPECT_EQ((*guard_gone)->CheckOnce(), MemoryGuard::Outcome::kNoneQualifies);
}

TEST_F(GuardTest, NothingIsDoneWhatCannotBeRead) {
  delivered_.Record("ipv4:127.0.0.1:1001", 880 * kMiB);
  auto guard = MakeGuard();
  rss_ = -1;  // /proc/self/statm unreadable
  EXPECT_EQ(guard->CheckOnce(), MemoryGuard::Outcome::kUnreadable);
  EXPECT_EQ(listings_, 0);
  // Over the limit, and the descriptors cannot be listed (EMFILE): no shed, and the table is not pruned as if
  // every connection were gone.
  rss_ = 600 * kMiB;
  fail_listing_ = true;
  EXPECT_EQ(guard->CheckOnce(), MemoryGuard::Outcome::kUnreadable);
  EXPECT_TRUE(shut_.empty());
  EXPECT_EQ(delivered_.Of("127.0.0.1:1001"), 880 * kMiB);
}

TEST_F(GuardTest, NoneQualifyingBacksOffBeforeListingAgain) {
  delivered_.Record("ipv4:127.0.0.1:1000", 500 * kMiB);
  delivered_.Record("ipv4:127.0.0.1:1001", 900 * kMiB);
  auto guard = MakeGuard();
  rss_ = 600 * kMiB;
  EXPECT_EQ(guard->CheckOnce(), MemoryGuard::Outcome::kNoneQualifies);
  const int listed = listings_;
  now_ += absl::Milliseconds(50);
  EXPECT_EQ(guard->CheckOnce(), MemoryGuard::Outcome::kCoolingDown);
  EXPECT_EQ(listings_, listed);
  now_ += absl::Milliseconds(500);
  EXPECT_EQ(guard->CheckOnce(), MemoryGuard::Outcome::kNoneQualifies);
  EXPECT_EQ(listings_, listed + 1);
}

TEST_F(GuardTest, TheLimitMovesWithTheLayersLoadedAndFreed) {
  int64_t layer_bytes = 300 * kMiB;  // the layers loaded at start: already in the RSS the limit was set from
  loaded_layer_bytes_ = [&] { return layer_bytes; };
  auto guard = MakeGuard();
  EXPECT_EQ(guard->rss_limit_bytes(), 512 * kMiB);
  layer_bytes += 200 * kMiB;  // a layer loaded while serving
  rss_ = 650 * kMiB;          // its weights, not a flood
  EXPECT_EQ(guard->rss_limit_bytes(), 712 * kMiB);
  EXPECT_EQ(guard->CheckOnce(), MemoryGuard::Outcome::kUnderLimit);
  EXPECT_TRUE(shut_.empty());
  rss_ = 800 * kMiB;  // past the moved limit: a flood after all
  EXPECT_EQ(guard->CheckOnce(), MemoryGuard::Outcome::kShed);
  ASSERT_EQ(sheds_.size(), 1u);
  EXPECT_EQ(sheds_[0].rss_limit_bytes, 712 * kMiB);
  layer_bytes -= 350 * kMiB;  // that layer and one from start unloaded: what they held is not flood room
  EXPECT_EQ(guard->rss_limit_bytes(), 362 * kMiB);
  rss_ = 400 * kMiB;
  now_ += absl::Seconds(1);
  EXPECT_NE(guard->CheckOnce(), MemoryGuard::Outcome::kUnderLimit);
}

// The cap (the cgroup's limit less a margin) bounds the limit however layers move it: a layer loaded while
// serving does not lift the guard's limit past where the kernel would OOM-kill the process first.
TEST_F(GuardTest, TheLimitNeverRisesAboveTheCap) {
  int64_t layer_bytes = 300 * kMiB;
  loaded_layer_bytes_ = [&] { return layer_bytes; };
  rss_cap_bytes_ = 600 * kMiB;
  auto guard = MakeGuard();
  EXPECT_EQ(guard->rss_limit_bytes(), 512 * kMiB);
  layer_bytes += 200 * kMiB;
  EXPECT_EQ(guard->rss_limit_bytes(), 600 * kMiB);  // 712 uncapped
  rss_ = 650 * kMiB;
  EXPECT_EQ(guard->CheckOnce(), MemoryGuard::Outcome::kShed);
  ASSERT_EQ(sheds_.size(), 1u);
  EXPECT_EQ(sheds_[0].rss_limit_bytes, 600 * kMiB);
}

TEST(MemoryGuardCapBytes, AnEighthBelowTheProcessLimitAtLeast64MiBAtMostHalf) {
  EXPECT_EQ(MemoryGuardCapBytes(2048 * kMiB), 1792 * kMiB);  // the Kubernetes Deployment's 2Gi
  EXPECT_EQ(MemoryGuardCapBytes(256 * kMiB), 192 * kMiB);
  EXPECT_EQ(MemoryGuardCapBytes(100 * kMiB), 50 * kMiB);
}

TEST(MemoryGuardCreate, RefusesBadOptions) {
  DeliveredBytes delivered;
  MemoryGuard::Options good;
  good.rss_limit_bytes = 1;
  good.local_ports = {1};
  good.delivered = &delivered;
  good.start_thread = false;
  EXPECT_TRUE(MemoryGuard::Create(good).ok());
  MemoryGuard::Options o = good;
  o.rss_limit_bytes = 0;
  EXPECT_EQ(MemoryGuard::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = good;
  o.local_ports.clear();
  EXPECT_EQ(MemoryGuard::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = good;
  o.delivered = nullptr;
  EXPECT_EQ(MemoryGuard::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = good;
  o.interval = absl::ZeroDuration();
  EXPECT_EQ(MemoryGuard::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
}

// A loopback listener of this process and one client connected to it.
struct LoopbackPair {
  LoopbackPair() : connection(listener.Connect()), port(listener.port()) {
    sockaddr_storage client_address = {};
    socklen_t len = sizeof(client_address);
    getsockname(connection.client, reinterpret_cast<sockaddr*>(&client_address), &len);
    client_key = PeerKeyFromSockaddr(client_address);
    client = connection.client;
    server = connection.accepted;
  }
  testing::LoopbackListener listener;
  testing::LoopbackListener::Pair connection;
  int port = 0, client = -1, server = -1;
  std::string client_key;
};

TEST(ConnectionTable, SeesAcceptedConnectionsAndTheirBytes) {
  LoopbackPair pair;
  std::vector<char> bytes(3 << 20);
  std::mt19937 rng(7);
  for (char& b : bytes) b = static_cast<char>(rng());
  size_t sent = 0, read = 0;
  std::vector<char> sink(bytes.size());
  while (read < bytes.size()) {  // the server end reads as it goes, so the client never blocks
    const ssize_t n = send(pair.client, bytes.data() + sent, bytes.size() - sent, MSG_DONTWAIT);
    if (n > 0) sent += static_cast<size_t>(n);
    const ssize_t got = recv(pair.server, sink.data(), sink.size(), MSG_DONTWAIT);
    if (got > 0) read += static_cast<size_t>(got);
  }
  std::vector<TcpConnection> found = *ListTcpConnections({pair.port});
  ASSERT_EQ(found.size(), 1u);  // the accepted end only: not the listener, not the client's end
  EXPECT_EQ(found[0].fd, pair.server);
  EXPECT_EQ(found[0].peer_key, pair.client_key);
  EXPECT_GE(found[0].received_bytes, int64_t{3} << 20);
  EXPECT_TRUE(ListTcpConnections({pair.port + 1})->empty() || pair.port == 65535);

  ASSERT_TRUE(ShutDownTcpConnection(found[0]).ok());
  char byte;
  EXPECT_EQ(recv(pair.client, &byte, 1, 0), 0);  // the client sees the end of the stream
  // Shut down but not yet closed by its owner: no longer counted.
  EXPECT_TRUE(ListTcpConnections({pair.port})->empty());
}

TEST(ConnectionTable, ARecycledDescriptorIsNotShutDown) {
  LoopbackPair pair;
  std::vector<TcpConnection> found = *ListTcpConnections({pair.port});
  ASSERT_EQ(found.size(), 1u);
  TcpConnection stale = found[0];
  stale.inode += 1;  // as if the descriptor now held another socket
  EXPECT_EQ(ShutDownTcpConnection(stale).code(), absl::StatusCode::kNotFound);
  stale = found[0];
  stale.peer_key = "127.0.0.1:1";
  EXPECT_EQ(ShutDownTcpConnection(stale).code(), absl::StatusCode::kNotFound);
  char byte;
  EXPECT_EQ(recv(pair.client, &byte, 1, MSG_DONTWAIT), -1);  // still open: nothing to read, no end
  EXPECT_GT(ResidentSetBytes(), 0);
}

// Records the peer of every call and answers UNIMPLEMENTED.
class PeerRecorder : public grpc::CallbackGenericService {
 public:
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    {
      absl::MutexLock lock(&mu_);
      peers_.push_back(ctx->peer());
    }
    class Refuse : public grpc::ServerGenericBidiReactor {
     public:
      Refuse() { Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "")); }
      void OnDone() override { delete this; }
    };
    return new Refuse;
  }
  std::vector<std::string> peers() {
    absl::MutexLock lock(&mu_);
    return peers_;
  }

 private:
  absl::Mutex mu_;
  std::vector<std::string> peers_;
};

// What a gRPC service sees as its peer must key the same connection the guard finds among the sockets, for
// each way a client reaches the server: IPv4, IPv6, and IPv4 to a dual-stack listener.
TEST(PeerKey, GrpcPeersMatchTheSocketsTheGuardFinds) {
  struct Case {
    const char* listen;
    const char* connect;
  };
  for (const Case& c : {Case{"127.0.0.1:0", "127.0.0.1"}, Case{"[::1]:0", "[::1]"}, Case{"[::]:0", "127.0.0.1"}}) {
    SCOPED_TRACE(c.listen);
    PeerRecorder recorder;
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort(c.listen, grpc::InsecureServerCredentials(), &port);
    builder.RegisterCallbackGenericService(&recorder);
    std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
    if (server == nullptr || port == 0) {
      ASSERT_NE(std::string(c.connect), "127.0.0.1") << "IPv4 loopback must be there";
      std::cout << c.listen << ": cannot listen here (no IPv6); that case not run\n";
      continue;
    }
    auto channel = grpc::CreateChannel(std::string(c.connect) + ":" + std::to_string(port),
                                       grpc::InsecureChannelCredentials());
    auto stub = attnserve::v1::AttentionService::NewStub(channel);
    grpc::ClientContext ctx;
    attnserve::v1::ListLayersRequest request;
    attnserve::v1::ListLayersResponse response;
    EXPECT_EQ(stub->ListLayers(&ctx, request, &response).error_code(), grpc::StatusCode::UNIMPLEMENTED);
    const std::vector<std::string> peers = recorder.peers();
    ASSERT_EQ(peers.size(), 1u);
    std::vector<std::string> keys;
    const absl::StatusOr<std::vector<TcpConnection>> connections = ListTcpConnections({port});
    ASSERT_TRUE(connections.ok()) << connections.status();
    for (const TcpConnection& connection : *connections) keys.push_back(connection.peer_key);
    EXPECT_THAT(keys, Contains(PeerKeyFromGrpcPeer(peers[0]))) << "gRPC's peer: " << peers[0];
    server->Shutdown();
  }
}

}  // namespace
}  // namespace attnserve
