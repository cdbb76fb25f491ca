// The listener probe: it must tell a port whose process accepts (and answers) from one whose process no
// longer accepts, although the kernel completes the TCP handshake for both, and a busy process (accepting
// late, answering late) from a dead accept loop.
#include "server/transport/listener_probe.h"
#include "server/transport/accept_state.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"

namespace attnserve {
namespace {

// What a test listener does with connections: never accept them (a dead accept loop), accept and answer
// by closing, or accept and hold them without a word (a server too busy to answer).
enum class Behaviour { kNeverAccept, kAnswer, kAcceptSilently };

// A loopback listener that starts accepting `accept_after` after it is made.
class TestListener {
 public:
  explicit TestListener(Behaviour behaviour, absl::Duration accept_after = absl::ZeroDuration()) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    EXPECT_EQ(listen(fd_, 16), 0);
    socklen_t len = sizeof(addr);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    if (behaviour != Behaviour::kNeverAccept) {
      thread_ = std::thread([this, behaviour, accept_after] { Serve(behaviour, accept_after); });
    }
  }
  ~TestListener() {
    stop_ = true;
    shutdown(fd_, SHUT_RDWR);
    if (thread_.joinable()) thread_.join();
    for (int c : held_) close(c);
    close(fd_);
  }
  int port() const { return port_; }
  int fd() const { return fd_; }

 private:
  void Serve(Behaviour behaviour, absl::Duration accept_after) {
    absl::SleepFor(accept_after);
    while (true) {
      const int c = accept(fd_, nullptr, nullptr);
      if (c < 0 || stop_) {
        if (c >= 0) close(c);
        return;
      }
      if (behaviour == Behaviour::kAcceptSilently) {
        held_.push_back(c);
        continue;
      }
      char buf[512];
      (void)!recv(c, buf, sizeof(buf), 0);
      close(c);  // a close is an answer
    }
  }

  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::vector<int> held_;  // only the serving thread touches it until it is joined
  std::thread thread_;
};

ListenerProbe::Options FastOptions(int port, std::function<void(const std::string&)> on_failure) {
  ListenerProbe::Options options;
  options.host = "127.0.0.1";
  options.port = port;
  options.interval = absl::Milliseconds(10);
  options.timeout = absl::Milliseconds(50);
  options.accept_deadline = absl::Milliseconds(400);
  options.failures_to_report = 3;
  options.on_failure = std::move(on_failure);
  return options;
}

TEST(AcceptStateTest, ReadsTheRowOfOneConnection) {
  // Port 0x1F90 = 8080 serving, client ports 0xA000 (queued, inode 0) and 0xA001 (accepted).
  const std::string table =
      "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
      "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000001 00:00000000 00000000  1000        0 5551 1\n"
      "   1: 0100007F:1F90 0100007F:A000 01 00000000:00000018 00:00000000 00000000  1000        0 0 1\n"
      "   2: 0100007F:1F90 0100007F:A001 01 00000000:00000000 00:00000000 00000000  1000        0 5553 1\n"
      "   3: 0100007F:A000 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 5554 1\n"
      "   4: 0100007F:1F90 0100007F:A003 06 00000000:00000000 03:00000F5D 00000000     0        0 0 3\n"
      "   5: 0100007F:1F90 0100007F:A004 08 00000000:00000000 00:00000000 00000000  1000        0 0 1\n";
  EXPECT_EQ(AcceptStateInTable(table, 8080, 0xA000), AcceptState::kWaiting);
  EXPECT_EQ(AcceptStateInTable(table, 8080, 0xA001), AcceptState::kAccepted);
  EXPECT_EQ(AcceptStateInTable(table, 8080, 0xA002), AcceptState::kUnknown);
  EXPECT_EQ(AcceptStateInTable(table, 8080, 0xA003), AcceptState::kAccepted);  // TIME_WAIT: closed by the server
  EXPECT_EQ(AcceptStateInTable(table, 8080, 0xA004), AcceptState::kWaiting);   // CLOSE_WAIT, never accepted
  EXPECT_EQ(AcceptStateInTable("garbage\n0: x y\n", 8080, 0xA000), AcceptState::kUnknown);
}

TEST(AcceptStateTest, TellsAQueuedConnectionFromAnAcceptedOne) {
  TestListener listener(Behaviour::kNeverAccept);
  const int client = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(listener.port());
  ASSERT_EQ(connect(client, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t len = sizeof(addr);
  getsockname(client, reinterpret_cast<sockaddr*>(&addr), &len);
  const int client_port = ntohs(addr.sin_port);
  EXPECT_EQ(ServerSideAcceptState(listener.port(), client_port), AcceptState::kWaiting);
  const int accepted = accept(listener.fd(), nullptr, nullptr);
  ASSERT_GE(accepted, 0);
  EXPECT_EQ(ServerSideAcceptState(listener.port(), client_port), AcceptState::kAccepted);
  close(accepted);
  close(client);
}

TEST(ListenerProbeTest, AcceptingListenerPassesInBothProtocols) {
  TestListener listener(Behaviour::kAnswer);
  EXPECT_TRUE(ListenerProbe::ProbeOnce("0.0.0.0", listener.port(), false, absl::Seconds(2)).ok());
  EXPECT_TRUE(ListenerProbe::ProbeOnce("127.0.0.1", listener.port(), true, absl::Seconds(2)).ok());
}

TEST(ListenerProbeTest, ListenerThatNeverAcceptsFailsAlthoughTcpConnects) {
  TestListener listener(Behaviour::kNeverAccept);
  const absl::Status status = ListenerProbe::ProbeOnce("127.0.0.1", listener.port(), false, absl::Milliseconds(300));
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(status.message().find("connections are not accepted"), absl::string_view::npos) << status;
}

TEST(ListenerProbeTest, ClosedPortFails) {
  int port = 0;
  {
    TestListener listener(Behaviour::kNeverAccept);
    port = listener.port();
  }
  EXPECT_EQ(ListenerProbe::ProbeOnce("127.0.0.1", port, false, absl::Milliseconds(300)).code(),
            absl::StatusCode::kUnavailable);
}

TEST(ListenerProbeTest, AcceptedButSilentListenerIsBusyNotDead) {
  TestListener listener(Behaviour::kAcceptSilently);
  EXPECT_TRUE(ListenerProbe::ProbeOnce("127.0.0.1", listener.port(), false, absl::Milliseconds(300)).ok());
}

TEST(ListenerProbeTest, ReportsOnceWhenAConnectionIsNeverAccepted) {
  TestListener listener(Behaviour::kNeverAccept);
  std::atomic<int> reports{0};
  absl::Notification reported;
  auto probe = ListenerProbe::Create(FastOptions(listener.port(), [&](const std::string& why) {
    EXPECT_NE(why.find("neither answered nor accepted"), std::string::npos) << why;
    if (++reports == 1) reported.Notify();
  }));
  ASSERT_TRUE(probe.ok()) << probe.status();
  const absl::Time start = absl::Now();
  EXPECT_TRUE(reported.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(400));  // not before the accept deadline
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_EQ(reports.load(), 1);
}

TEST(ListenerProbeTest, ReportsRefusedConnectsInARow) {
  int port = 0;
  {
    TestListener listener(Behaviour::kNeverAccept);
    port = listener.port();
  }
  absl::Notification reported;
  auto probe = ListenerProbe::Create(FastOptions(port, [&](const std::string& why) {
    EXPECT_NE(why.find("3 connects in a row failed"), std::string::npos) << why;
    reported.Notify();
  }));
  ASSERT_TRUE(probe.ok()) << probe.status();
  EXPECT_TRUE(reported.WaitForNotificationWithTimeout(absl::Seconds(10)));
}

// A flood keeps the server's threads busy: connections wait in the backlog for a while, then are accepted,
// and answers come late or not at all. That is no reason to restart it.
TEST(ListenerProbeTest, BusyListenerThatAcceptsLateIsNeverReported) {
  TestListener listener(Behaviour::kAcceptSilently, absl::Milliseconds(250));
  ListenerProbe::Options options =
      FastOptions(listener.port(), [](const std::string& why) { ADD_FAILURE() << "reported: " << why; });
  // Accepted at 250 ms, well inside the deadline even when the listener's thread starts late (TSan, a busy
  // machine); a probe that missed the accept would report at 1.5 s, within the test's 2.5 s.
  options.accept_deadline = absl::Milliseconds(1500);
  auto probe = ListenerProbe::Create(options);
  ASSERT_TRUE(probe.ok()) << probe.status();
  absl::SleepFor(absl::Milliseconds(2500));
}

TEST(ListenerProbeTest, HealthyListenerIsNeverReported) {
  TestListener listener(Behaviour::kAnswer);
  auto probe = ListenerProbe::Create(
      FastOptions(listener.port(), [](const std::string& why) { ADD_FAILURE() << "reported: " << why; }));
  ASSERT_TRUE(probe.ok()) << probe.status();
  absl::SleepFor(absl::Milliseconds(300));
}

TEST(ListenerProbeTest, CreateRefusesBadOptions) {
  ListenerProbe::Options options;
  options.port = 0;
  options.on_failure = [](const std::string&) {};
  EXPECT_EQ(ListenerProbe::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.port = 1;
  options.on_failure = nullptr;
  EXPECT_EQ(ListenerProbe::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.on_failure = [](const std::string&) {};
  options.accept_deadline = absl::ZeroDuration();
  EXPECT_EQ(ListenerProbe::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace attnserve
