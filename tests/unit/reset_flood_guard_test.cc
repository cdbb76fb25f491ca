// The reset-flood guard and what it reads: which connections it judges a flood (many streams, most never
// finished by the server), gRPC's channelz counts as parsed, and against a real gRPC server: a client's calls,
// refused without their message being read, counted as finished on its own socket, and a raw HTTP/2 client
// resetting every stream it opens shut down while that client is left alone.
#include "server/transport/reset_flood_guard.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "server/transport/peer_address.h"

namespace attnserve {
namespace {

using ::testing::ElementsAre;

TEST(IsResetFlood, ManyStreamsMostNeverFinished) {
  EXPECT_TRUE(IsResetFlood({"a:1", 1000, 0}, 1000));
  EXPECT_TRUE(IsResetFlood({"a:1", 5000, 2499}, 1000));
  EXPECT_FALSE(IsResetFlood({"a:1", 5000, 2500}, 1000));      // half finished
  EXPECT_FALSE(IsResetFlood({"a:1", 999, 0}, 1000));          // too few to judge
  EXPECT_FALSE(IsResetFlood({"a:1", 100000, 99900}, 1000));   // a busy client, 100 calls in flight
}

TEST(ParseChannelzSocket, ReadsPeerAndCounts) {
  // As gRPC 1.51's grpc_channelz_get_socket renders it (int64 values as strings).
  const char* json = R"({"socket":{"ref":{"socketId":"12","name":"chttp2 ipv4:127.0.0.1:41234"},
      "data":{"lastRemoteStreamCreatedTimestamp":"2026-12-04T23:00:00Z","messagesReceived":"3",
              "streamsFailed":"4990","streamsStarted":"5000","streamsSucceeded":"7"},
      "remote":{"tcpipAddress":{"port":41234,"ipAddress":"fwAAAQ=="}}}})";
  const absl::StatusOr<SocketStreams> s = ParseChannelzSocket(json);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->peer_key, "127.0.0.1:41234");
  EXPECT_EQ(s->streams_started, 5000);
  EXPECT_EQ(s->streams_succeeded, 7);
  EXPECT_EQ(s->socket_id, 12);

  const absl::StatusOr<SocketStreams> fresh =  // no data yet: channelz leaves zero counts out
      ParseChannelzSocket(R"({"socket":{"ref":{"socketId":"3","name":"chttp2 ipv6:%5B::1%5D:5000"},"data":{}}})");
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(fresh->peer_key, "[::1]:5000");
  EXPECT_EQ(fresh->streams_started, 0);
  EXPECT_FALSE(ParseChannelzSocket("not json").ok());
  EXPECT_FALSE(ParseChannelzSocket(R"({"socket":{}})").ok());
}

TEST(ResetFloodGuardCreate, RefusesBadOptions) {
  ResetFloodGuard::Options o;
  o.start_thread = false;
  EXPECT_FALSE(ResetFloodGuard::Create(o).ok());  // no port
  o.local_ports = {1};
  o.min_streams = 0;
  EXPECT_FALSE(ResetFloodGuard::Create(o).ok());
  o.min_streams = 1;
  o.interval = absl::ZeroDuration();
  EXPECT_FALSE(ResetFloodGuard::Create(o).ok());
  o.interval = absl::Milliseconds(1);
  EXPECT_TRUE(ResetFloodGuard::Create(o).ok());
}

// The guard with fakes: what it lists, whom it shuts down.
struct Fakes {
  int64_t calls = 0;
  std::vector<SocketStreams> sockets;
  absl::Status sockets_status;
  int socket_reads = 0;
  std::vector<TcpConnection> connections;
  int listings = 0;
  std::vector<std::string> shut;
  std::vector<std::string> reported;

  std::unique_ptr<ResetFloodGuard> Guard(int64_t min_streams) {
    ResetFloodGuard::Options o;
    o.min_streams = min_streams;
    o.local_ports = {50051};
    o.start_thread = false;
    o.calls_started = [this]() -> absl::StatusOr<int64_t> { return calls; };
    o.list_sockets = [this]() -> absl::StatusOr<std::vector<SocketStreams>> {
      ++socket_reads;
      if (!sockets_status.ok()) return sockets_status;
      return sockets;
    };
    o.list_connections = [this]() -> absl::StatusOr<std::vector<TcpConnection>> {
      ++listings;
      return connections;
    };
    o.shut_down = [this](const TcpConnection& c) {
      shut.push_back(c.peer_key);
      return absl::OkStatus();
    };
    o.on_shed = [this](const SocketStreams& s) { reported.push_back(s.peer_key); };
    o.now = [] { return absl::UnixEpoch(); };  // reads take no time: never spaced out
    return *ResetFloodGuard::Create(std::move(o));
  }
};

TEST(ResetFloodGuard, ShutsDownOnlyTheFloodingConnections) {
  Fakes f;
  f.sockets = {{"10.0.0.1:1000", 200000, 0, 1}, {"10.0.0.2:2000", 200000, 200000, 2}, {"10.0.0.3:3000", 10, 0, 3},
               {"10.0.0.4:4000", 3000, 1, 4}};
  f.connections = {{7, 1, "10.0.0.2:2000", 1}, {8, 2, "10.0.0.1:1000", 1}, {9, 3, "10.0.0.3:3000", 1},
                   {10, 4, "10.0.0.4:4000", 1}};
  f.calls = 403010;
  auto guard = f.Guard(1000);
  EXPECT_EQ(guard->CheckOnce(), 2);
  EXPECT_THAT(f.shut, ElementsAre("10.0.0.1:1000", "10.0.0.4:4000"));
  EXPECT_EQ(f.reported, f.shut);
}

TEST(ResetFloodGuard, ListsNoDescriptorsWhenNoneFloods) {
  Fakes f;
  f.sockets = {{"10.0.0.2:2000", 200000, 200000, 2}, {"10.0.0.3:3000", 999, 0, 3}};
  f.calls = 200999;
  auto guard = f.Guard(1000);
  EXPECT_EQ(guard->CheckOnce(), 0);
  EXPECT_EQ(f.socket_reads, 1);
  EXPECT_EQ(f.listings, 0);
  f.sockets_status = absl::InternalError("channelz unreadable");
  f.calls += 1000;
  EXPECT_EQ(guard->CheckOnce(), 0);
  EXPECT_EQ(f.socket_reads, 2);
  EXPECT_EQ(f.listings, 0);
  EXPECT_TRUE(f.shut.empty());
}

TEST(ResetFloodGuard, ReadsConnectionsOnlyOnceEnoughCallsStarted) {
  Fakes f;
  f.sockets = {{"10.0.0.1:1000", 1500, 0, 1}};
  f.connections = {{7, 1, "10.0.0.1:1000", 1}};
  f.calls = 999;  // fewer than min_streams since the start: no connection can have opened that many
  auto guard = f.Guard(1000);
  EXPECT_EQ(guard->CheckOnce(), 0);
  EXPECT_EQ(f.socket_reads, 0);
  f.calls = 1500;
  EXPECT_EQ(guard->CheckOnce(), 1);
  EXPECT_EQ(f.socket_reads, 1);
  f.calls = 2400;  // 900 more since that read
  EXPECT_EQ(guard->CheckOnce(), 0);
  EXPECT_EQ(f.socket_reads, 1);
}

TEST(ResetFloodGuard, AFailedReadKeepsTheGateOpen) {
  Fakes f;
  f.sockets = {{"10.0.0.1:1000", 1500, 0, 1}};
  f.connections = {{7, 1, "10.0.0.1:1000", 1}};
  f.calls = 1500;
  f.sockets_status = absl::InternalError("channelz unreadable");
  auto guard = f.Guard(1000);
  EXPECT_EQ(guard->CheckOnce(), 0);
  f.sockets_status = absl::OkStatus();  // no new call since: read again all the same
  EXPECT_EQ(guard->CheckOnce(), 1);
  f.calls = 10;  // a server went away with its counts: the gate follows the total down
  EXPECT_EQ(guard->CheckOnce(), 0);
  f.calls = 1010;
  f.sockets = {{"10.0.0.1:1001", 1000, 0, 2}};
  f.connections = {{8, 2, "10.0.0.1:1001", 1}};
  EXPECT_EQ(guard->CheckOnce(), 1);
}

TEST(ResetFloodGuard, SlowReadsAreSpacedToATenthOfACore) {
  Fakes f;
  f.sockets = {{"10.0.0.2:2000", 200000, 200000, 2}};
  f.calls = 200000;
  absl::Time now = absl::UnixEpoch();
  ResetFloodGuard::Options o;  // a clock that each read moves by 20 ms
  o.min_streams = 1000;
  o.local_ports = {1};
  o.start_thread = false;
  o.calls_started = [&f]() -> absl::StatusOr<int64_t> { return f.calls += 1000; };
  o.list_sockets = [&]() -> absl::StatusOr<std::vector<SocketStreams>> {
    now += absl::Milliseconds(20);
    ++f.socket_reads;
    return f.sockets;
  };
  o.now = [&] { return now; };
  auto paced = *ResetFloodGuard::Create(std::move(o));
  EXPECT_EQ(paced->CheckOnce(), 0);
  EXPECT_EQ(f.socket_reads, 1);
  now += absl::Milliseconds(170);  // 190 ms after that read began: not yet
  EXPECT_EQ(paced->CheckOnce(), 0);
  EXPECT_EQ(f.socket_reads, 1);
  now += absl::Milliseconds(10);  // 200 ms: ten times the read
  EXPECT_EQ(paced->CheckOnce(), 0);
  EXPECT_EQ(f.socket_reads, 2);
}

TEST(ResetFloodGuard, ASocketShutDownIsNotJudgedAgainWhileGrpcDrainsIt) {
  Fakes f;
  f.sockets = {{"10.0.0.1:1000", 1500, 0, 1}};
  f.connections = {{7, 1, "10.0.0.1:1000", 1}};
  f.calls = 1500;
  auto guard = f.Guard(1000);
  EXPECT_EQ(guard->CheckOnce(), 1);
  f.calls = 3000;  // channelz still lists it; a new connection happens to have the same address
  f.connections = {{9, 5, "10.0.0.1:1000", 1}};
  EXPECT_EQ(guard->CheckOnce(), 0);
  EXPECT_THAT(f.shut, ElementsAre("10.0.0.1:1000"));
}

TEST(ResetFloodGuard, AFloodGoneFromTheSocketsIsNotShutDown) {
  Fakes f;  // channelz still shows it, the kernel no longer does (closed meanwhile)
  f.sockets = {{"10.0.0.1:1000", 200000, 0, 1}};
  f.calls = 200000;
  f.connections = {{7, 1, "10.0.0.9:9000", 1}};
  auto guard = f.Guard(1000);
  EXPECT_EQ(guard->CheckOnce(), 0);
  EXPECT_TRUE(f.shut.empty());
}

// The guard's own thread and a caller checking at once (for TSan): each flood shut down by one of them.
TEST(ResetFloodGuard, ItsThreadAndACallerCheckInTurn) {
  std::atomic<int64_t> calls{0};
  std::atomic<int> shut{0};
  ResetFloodGuard::Options o;
  o.interval = absl::Microseconds(100);
  o.min_streams = 10;
  o.local_ports = {50051};
  o.calls_started = [&]() -> absl::StatusOr<int64_t> { return calls.fetch_add(10) + 10; };
  std::atomic<int64_t> socket_ids{0};  // a new connection each time: the last one was shut down
  o.list_sockets = [&]() -> absl::StatusOr<std::vector<SocketStreams>> {
    return std::vector<SocketStreams>{{"10.0.0.1:1000", 20, 0, socket_ids.fetch_add(1)}};
  };
  o.list_connections = []() -> absl::StatusOr<std::vector<TcpConnection>> {
    return std::vector<TcpConnection>{{7, 1, "10.0.0.1:1000", 1}};
  };
  o.shut_down = [&](const TcpConnection&) {
    shut.fetch_add(1);
    return absl::OkStatus();
  };
  auto guard = ResetFloodGuard::Create(std::move(o));
  ASSERT_TRUE(guard.ok()) << guard.status();
  int by_caller = 0;
  for (int i = 0; i < 200; ++i) by_caller += (*guard)->CheckOnce();
  guard->reset();  // stops the thread
  EXPECT_GE(shut.load(), by_caller);
  EXPECT_GT(by_caller, 0);
}

// Answers every call UNIMPLEMENTED at once, without reading its message (as the server refuses a call without
// a token, or an unknown method): the calls of the well-behaved client.
class Refuse : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* /*ctx*/) override {
    class Reactor : public grpc::ServerGenericBidiReactor {
     public:
      Reactor() { Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "")); }
      void OnDone() override { delete this; }
    };
    return new Reactor;
  }
};

// A gRPC server on 127.0.0.1 with only `service`; its port in `*port`. Null if it cannot listen.
std::unique_ptr<grpc::Server> StartOnLoopback(grpc::CallbackGenericService* service, int* port) {
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), port);
  builder.RegisterCallbackGenericService(service);
  return builder.BuildAndStart();
}

// HPACK "literal header field without indexing, new name", both strings short and not Huffman-coded.
void AppendHeader(std::string* block, const std::string& name, const std::string& value) {
  block->push_back('\x00');
  block->push_back(static_cast<char>(name.size()));
  block->append(name);
  block->push_back(static_cast<char>(value.size()));
  block->append(value);
}

std::string Frame(uint8_t type, uint8_t flags, uint32_t stream, const std::string& payload) {
  std::string f;
  const uint32_t n = static_cast<uint32_t>(payload.size());
  f.push_back(static_cast<char>(n >> 16));
  f.push_back(static_cast<char>(n >> 8));
  f.push_back(static_cast<char>(n));
  f.push_back(static_cast<char>(type));
  f.push_back(static_cast<char>(flags));
  for (int shift = 24; shift >= 0; shift -= 8) f.push_back(static_cast<char>((stream >> shift) & 0xff));
  return f + payload;
}

// A raw HTTP/2 client opening `streams` gRPC calls and resetting each at once; returns its descriptor.
int RapidReset(int port, int streams) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return -1;
  std::string block;
  AppendHeader(&block, ":method", "POST");
  AppendHeader(&block, ":scheme", "http");
  AppendHeader(&block, ":path", "/test.Service/Method");
  AppendHeader(&block, ":authority", "localhost");
  AppendHeader(&block, "content-type", "application/grpc");
  AppendHeader(&block, "te", "trailers");
  std::string out = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + Frame(0x4, 0, 0, "");  // preface, empty SETTINGS
  const std::string cancel("\x00\x00\x00\x08", 4);                            // RST_STREAM CANCEL
  for (int i = 0; i < streams; ++i) {
    const uint32_t id = 1 + 2 * static_cast<uint32_t>(i);
    out += Frame(0x1, 0x4, id, block) + Frame(0x3, 0, id, cancel);  // HEADERS END_HEADERS, RST_STREAM
  }
  for (size_t sent = 0; sent < out.size();) {
    const ssize_t n = send(fd, out.data() + sent, out.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;
    sent += static_cast<size_t>(n);
  }
  return fd;
}

// Whether the server ended the connection: a read that sees its end (or a reset) within `timeout`.
bool EndedByServer(int fd, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  char buffer[4096];
  while (absl::Now() < deadline) {
    const ssize_t n = recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) return true;
    if (n < 0) absl::SleepFor(absl::Milliseconds(10));
  }
  return false;
}

TEST(ResetFloodGuard, ShutsDownARawRapidResetBesideARealClient) {
  Refuse service;
  int port = 0;
  std::unique_ptr<grpc::Server> server = StartOnLoopback(&service, &port);
  ASSERT_NE(server, nullptr);

  // The real client: 20 calls on one connection, each refused.
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());
  auto stub = attnserve::v1::AttentionService::NewStub(channel);
  for (int i = 0; i < 20; ++i) {
    grpc::ClientContext ctx;
    attnserve::v1::ListLayersRequest request;
    attnserve::v1::ListLayersResponse response;
    ASSERT_EQ(stub->ListLayers(&ctx, request, &response).error_code(), grpc::StatusCode::UNIMPLEMENTED);
  }
  const int flood = RapidReset(port, 3000);
  ASSERT_GE(flood, 0);

  // channelz counts both, each on its own socket (the flood's once gRPC has read all of it).
  SocketStreams real, flooding;
  for (int wait_ms = 0; wait_ms < 10000 && flooding.streams_started < 3000; wait_ms += 10) {
    const absl::StatusOr<std::vector<SocketStreams>> sockets = ListServerSockets();
    ASSERT_TRUE(sockets.ok()) << sockets.status();
    for (const SocketStreams& s : *sockets) (s.streams_succeeded > 0 ? real : flooding) = s;
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(real.streams_started, 20);
  EXPECT_EQ(real.streams_succeeded, 20);
  EXPECT_EQ(flooding.streams_started, 3000);
  EXPECT_EQ(flooding.streams_succeeded, 0);
  const absl::StatusOr<std::vector<TcpConnection>> connections = ListTcpConnections({port});
  ASSERT_TRUE(connections.ok()) << connections.status();
  std::vector<std::string> keys;
  for (const TcpConnection& c : *connections) keys.push_back(c.peer_key);
  EXPECT_THAT(keys, ::testing::UnorderedElementsAre(real.peer_key, flooding.peer_key));

  ResetFloodGuard::Options o;
  o.local_ports = {port};
  o.start_thread = false;
  std::vector<std::string> reported;
  o.on_shed = [&](const SocketStreams& s) { reported.push_back(s.peer_key); };
  auto guard = ResetFloodGuard::Create(std::move(o));
  ASSERT_TRUE(guard.ok()) << guard.status();
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ((*guard)->CheckOnce(), 1);
  std::cout << "one check with 2 connections: "
            << std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count()
            << " us\n";
  EXPECT_THAT(reported, ElementsAre(flooding.peer_key));
  EXPECT_TRUE(EndedByServer(flood, absl::Seconds(10)));
  close(flood);

  grpc::ClientContext ctx;  // the real client goes on, on its connection
  attnserve::v1::ListLayersRequest request;
  attnserve::v1::ListLayersResponse response;
  EXPECT_EQ(stub->ListLayers(&ctx, request, &response).error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_EQ((*guard)->CheckOnce(), 0);
  server->Shutdown();
}

// What a check costs when no connection floods (the common case: channelz only), printed for
// BENCHMARKS.md.
TEST(ResetFloodGuard, CostOfACheckWith100Connections) {
  Refuse service;
  int port = 0;
  std::unique_ptr<grpc::Server> server = StartOnLoopback(&service, &port);
  ASSERT_NE(server, nullptr);
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (int i = 0; i < 100; ++i) {
    grpc::ChannelArguments args;
    args.SetInt("attnserve.test.channel", i);  // distinct arguments: a connection of its own
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    channels.push_back(grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(port),
                                                 grpc::InsecureChannelCredentials(), args));
    grpc::ClientContext ctx;
    attnserve::v1::ListLayersRequest request;
    attnserve::v1::ListLayersResponse response;
    ASSERT_EQ(attnserve::v1::AttentionService::NewStub(channels.back())->ListLayers(&ctx, request, &response)
                  .error_code(),
              grpc::StatusCode::UNIMPLEMENTED);
  }
  ResetFloodGuard::Options o;
  o.local_ports = {port};
  o.start_thread = false;
  auto guard = ResetFloodGuard::Create(std::move(o));
  ASSERT_TRUE(guard.ok()) << guard.status();
  const absl::StatusOr<std::vector<SocketStreams>> sockets = ListServerSockets();
  ASSERT_TRUE(sockets.ok()) << sockets.status();
  EXPECT_GE(sockets->size(), 100u);
  auto time_us = [](const std::function<void()>& f) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < 10; ++i) f();
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() / 10;
  };
  const double gate_us = time_us([&] { EXPECT_EQ((*guard)->CheckOnce(), 0); });  // 100 calls: not enough to read
  const double read_us = time_us([&] { EXPECT_TRUE(ListServerSockets().ok()); });
  std::cout << "with " << sockets->size() << " connections: a check that reads only the servers' call count "
            << gate_us << " us; reading every connection " << read_us << " us ("
            << read_us / static_cast<double>(sockets->size()) << " us a connection)\n";
  server->Shutdown();
}

}  // namespace
}  // namespace attnserve
