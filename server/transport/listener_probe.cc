#include "server/transport/listener_probe.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"

namespace attnserve {
namespace {

// The HTTP/2 client preface and an empty SETTINGS frame: what a client sends first.
constexpr char kHttp2Preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
constexpr size_t kHttp2PrefaceBytes = sizeof(kHttp2Preface) - 1;

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

std::string LoopbackFor(const std::string& host) {
  if (host.empty() || host == "0.0.0.0") return "127.0.0.1";
  if (host == "[::]" || host == "::") return "::1";
  if (host.size() > 2 && host.front() == '[') return host.substr(1, host.size() - 2);
  return host;
}

int WaitFor(int fd, short events, absl::Duration timeout) {
  pollfd p{fd, events, 0};
  return poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout)));
}

absl::StatusOr<int> Connect(const std::string& host, int port, absl::Duration timeout) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(LoopbackFor(host).c_str(), std::to_string(port).c_str(), &hints, &found) != 0 || !found) {
    return absl::UnavailableError(absl::StrCat("cannot resolve ", host));
  }
  const int fd = socket(found->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  const int rc = fd < 0 ? -1 : connect(fd, found->ai_addr, found->ai_addrlen);
  freeaddrinfo(found);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("socket: ", std::strerror(errno)));
  if (rc != 0 && errno != EINPROGRESS) {
    const int err = errno;
    close(fd);
    return absl::UnavailableError(absl::StrCat("connect: ", std::strerror(err)));
  }
  int err = 0;
  socklen_t len = sizeof(err);
  if (WaitFor(fd, POLLOUT, timeout) <= 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("connect: ", err != 0 ? std::strerror(err) : "timed out"));
  }
  return fd;
}

// The bytes of a TLS ClientHello, made by OpenSSL into a memory buffer (no certificate is checked: the
// probe hangs up at the first answer).
std::string ClientHello() {
  std::string hello;
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  if (ctx == nullptr) return hello;
  SSL* ssl = SSL_new(ctx);
  BIO* in = BIO_new(BIO_s_mem());
  BIO* out = BIO_new(BIO_s_mem());
  SSL_set_bio(ssl, in, out);  // owned by ssl from here
  SSL_set_connect_state(ssl);
  SSL_do_handshake(ssl);  // writes the ClientHello, then wants to read
  char* data = nullptr;
  const long n = BIO_get_mem_data(out, &data);
  if (n > 0) hello.assign(data, static_cast<size_t>(n));
  SSL_free(ssl);
  SSL_CTX_free(ctx);
  return hello;
}

}  // namespace

absl::Status ListenerProbe::ProbeOnce(const std::string& host, int port, bool tls, absl::Duration timeout) {
  absl::StatusOr<int> connected = Connect(host, port, timeout);
  if (!connected.ok()) return connected.status();
  const Fd fd(*connected);
  const std::string first_bytes = tls ? ClientHello() : std::string(kHttp2Preface, kHttp2PrefaceBytes);
  if (send(fd.get(), first_bytes.data(), first_bytes.size(), MSG_NOSIGNAL) < 0) {
    return absl::UnavailableError(absl::StrCat("send: ", std::strerror(errno)));
  }
  if (WaitFor(fd.get(), POLLIN, timeout) <= 0) {
    return absl::UnavailableError(absl::StrCat("connected to port ", port, " but no answer within ",
                                               absl::FormatDuration(timeout), ": connections are not accepted"));
  }
  return absl::OkStatus();  // an answer, a close or a reset: the listener accepted
}

absl::StatusOr<std::unique_ptr<ListenerProbe>> ListenerProbe::Create(const Options& options) {
  if (options.port <= 0 || options.port > 65535) return absl::InvalidArgumentError("ListenerProbe: bad port");
  if (options.interval <= absl::ZeroDuration() || options.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("ListenerProbe: interval and timeout must be positive");
  }
  if (!options.on_failure || options.failures_to_report < 1) {
    return absl::InvalidArgumentError("ListenerProbe: on_failure and failures_to_report >= 1 are required");
  }
  std::unique_ptr<ListenerProbe> probe(new ListenerProbe(options));
  probe->thread_ = std::thread([p = probe.get()] { p->Run(); });
  return probe;
}

ListenerProbe::~ListenerProbe() {
  stop_.Notify();
  if (thread_.joinable()) thread_.join();
}

void ListenerProbe::Run() {
  int failures = 0;
  while (!stop_.WaitForNotificationWithTimeout(options_.interval)) {
    const absl::Status status = ProbeOnce(options_.host, options_.port, options_.tls, options_.timeout);
    failures = status.ok() ? 0 : failures + 1;
    if (failures >= options_.failures_to_report) {
      options_.on_failure(absl::StrCat(failures, " probes in a row failed, the last: ", status.message()));
      return;
    }
  }
}

}  // namespace attnserve
