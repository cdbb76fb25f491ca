// The listener probe: it must tell a port whose process accepts (and answers) from one whose process no
// longer accepts, although the kernel completes the TCP handshake for both.
#include "server/transport/listener_probe.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <thread>

#include "absl/synchronization/notification.h"

namespace attnserve {
namespace {

// A loopback listener; `accept_and_answer` false: it never accepts, as a dead accept loop.
class TestListener {
 public:
  explicit TestListener(bool accept_and_answer) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    EXPECT_EQ(listen(fd_, 16), 0);
    socklen_t len = sizeof(addr);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    if (accept_and_answer) {
      thread_ = std::thread([this] {
        while (true) {
          const int c = accept(fd_, nullptr, nullptr);
          if (c < 0 || stop_) {
            if (c >= 0) close(c);
            return;
          }
          char buf[512];
          (void)!recv(c, buf, sizeof(buf), 0);
          close(c);  // a close is an answer
        }
      });
    }
  }
  ~TestListener() {
    stop_ = true;
    shutdown(fd_, SHUT_RDWR);
    if (thread_.joinable()) thread_.join();
    close(fd_);
  }
  int port() const { return port_; }

 private:
  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

TEST(ListenerProbeTest, AcceptingListenerPassesInBothProtocols) {
  TestListener listener(true);
  EXPECT_TRUE(ListenerProbe::ProbeOnce("0.0.0.0", listener.port(), false, absl::Seconds(2)).ok());
  EXPECT_TRUE(ListenerProbe::ProbeOnce("127.0.0.1", listener.port(), true, absl::Seconds(2)).ok());
}

TEST(ListenerProbeTest, ListenerThatNeverAcceptsFailsAlthoughTcpConnects) {
  TestListener listener(false);
  const absl::Status status = ListenerProbe::ProbeOnce("127.0.0.1", listener.port(), false, absl::Milliseconds(300));
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(status.message().find("connections are not accepted"), absl::string_view::npos) << status;
}

TEST(ListenerProbeTest, ClosedPortFails) {
  int port = 0;
  {
    TestListener listener(false);
    port = listener.port();
  }
  EXPECT_EQ(ListenerProbe::ProbeOnce("127.0.0.1", port, false, absl::Milliseconds(300)).code(),
            absl::StatusCode::kUnavailable);
}

TEST(ListenerProbeTest, ReportsOnceAfterConsecutiveFailures) {
  TestListener listener(false);
  std::atomic<int> reports{0};
  absl::Notification reported;
  ListenerProbe::Options options;
  options.host = "127.0.0.1";
  options.port = listener.port();
  options.interval = absl::Milliseconds(10);
  options.timeout = absl::Milliseconds(50);
  options.failures_to_report = 3;
  options.on_failure = [&](const std::string& why) {
    EXPECT_NE(why.find("3 probes in a row failed"), std::string::npos) << why;
    if (++reports == 1) reported.Notify();
  };
  auto probe = ListenerProbe::Create(options);
  ASSERT_TRUE(probe.ok()) << probe.status();
  EXPECT_TRUE(reported.WaitForNotificationWithTimeout(absl::Seconds(10)));
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_EQ(reports.load(), 1);
}

TEST(ListenerProbeTest, HealthyListenerIsNeverReported) {
  TestListener listener(true);
  ListenerProbe::Options options;
  options.host = "127.0.0.1";
  options.port = listener.port();
  options.interval = absl::Milliseconds(10);
  options.on_failure = [](const std::string& why) { ADD_FAILURE() << "reported: " << why; };
  auto probe = ListenerProbe::Create(options);
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
}

}  // namespace
}  // namespace attnserve
