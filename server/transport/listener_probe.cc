#include "server/transport/listener_probe.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/thread_name.h"
#include "server/transport/accept_state.h"

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
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
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

int LocalPort(int fd) {
  sockaddr_storage address{};
  socklen_t len = sizeof(address);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&address), &len) != 0) return -1;
  return ntohs(address.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&address)->sin6_port
                                             : reinterpret_cast<sockaddr_in*>(&address)->sin_port);
}

// One probe connection: connected, the first bytes sent, kept open until answered or accepted.
class ProbeConnection {
 public:
  enum class Seen { kAnswered, kAccepted, kNotAccepted };

  static absl::StatusOr<std::unique_ptr<ProbeConnection>> Open(const std::string& host, int port, bool tls,
                                                               absl::Duration timeout) {
    absl::StatusOr<int> connected = Connect(host, port, timeout);
    if (!connected.ok()) return connected.status();
    std::unique_ptr<ProbeConnection> c(new ProbeConnection(*connected, port));
    const std::string first_bytes = tls ? ClientHello() : std::string(kHttp2Preface, kHttp2PrefaceBytes);
    if (send(c->fd_.get(), first_bytes.data(), first_bytes.size(), MSG_NOSIGNAL) < 0) {
      return absl::UnavailableError(absl::StrCat("send: ", std::strerror(errno)));
    }
    return c;
  }

  // Waits up to `timeout` for an answer, a close or a reset; without one, asks the kernel whether the
  // server's end was accepted. Unreadable tables count as not accepted (the accept deadline still applies).
  Seen Check(absl::Duration timeout) {
    if (WaitFor(fd_.get(), POLLIN, timeout) > 0) return Seen::kAnswered;
    return ServerSideAcceptState(server_port_, client_port_) == AcceptState::kAccepted ? Seen::kAccepted
                                                                                      : Seen::kNotAccepted;
  }

  absl::Time opened() const { return opened_; }

 private:
  ProbeConnection(int fd, int server_port)
      : fd_(fd), server_port_(server_port), client_port_(LocalPort(fd)), opened_(absl::Now()) {}

  const Fd fd_;
  const int server_port_;
  const int client_port_;
  const absl::Time opened_;
};

}  // namespace

absl::Status ListenerProbe::ProbeOnce(const std::string& host, int port, bool tls, absl::Duration timeout) {
  absl::StatusOr<std::unique_ptr<ProbeConnection>> c = ProbeConnection::Open(host, port, tls, timeout);
  if (!c.ok()) return c.status();
  if ((*c)->Check(timeout) != ProbeConnection::Seen::kNotAccepted) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat("connected to port ", port, " but neither answered nor accepted within ",
                                             absl::FormatDuration(timeout), ": connections are not accepted"));
}

absl::StatusOr<std::unique_ptr<ListenerProbe>> ListenerProbe::Create(const Options& options) {
  if (options.port <= 0 || options.port > 65535) return absl::InvalidArgumentError("ListenerProbe: bad port");
  if (options.interval <= absl::ZeroDuration() || options.timeout <= absl::ZeroDuration() ||
      options.accept_deadline <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("ListenerProbe: interval, timeout and accept_deadline must be positive");
  }
  if (!options.on_failure || options.failures_to_report < 1) {
    return absl::InvalidArgumentError("ListenerProbe: on_failure and failures_to_report >= 1 are required");
  }
  std::unique_ptr<ListenerProbe> probe(new ListenerProbe(options));
  probe->thread_ = std::thread([p = probe.get()] {
    NameThisThread("attn-listener");
    p->Run();
  });
  return probe;
}

ListenerProbe::~ListenerProbe() {
  stop_.Notify();
  if (thread_.joinable()) thread_.join();
}

void ListenerProbe::Run() {
  int connect_failures = 0;
  std::unique_ptr<ProbeConnection> pending;  // made earlier, neither answered nor accepted yet
  while (!stop_.WaitForNotificationWithTimeout(options_.interval)) {
    if (pending == nullptr) {
      absl::StatusOr<std::unique_ptr<ProbeConnection>> c =
          ProbeConnection::Open(options_.host, options_.port, options_.tls, options_.timeout);
      if (!c.ok() && ++connect_failures >= options_.failures_to_report) {
        return options_.on_failure(
            absl::StrCat(connect_failures, " connects in a row failed, the last: ", c.status().message()));
      }
      if (!c.ok()) continue;
      connect_failures = 0;
      pending = *std::move(c);
    }
    if (pending->Check(options_.timeout) != ProbeConnection::Seen::kNotAccepted) {
      pending.reset();
    } else if (absl::Now() - pending->opened() >= options_.accept_deadline) {
      const absl::Duration waited = absl::Trunc(absl::Now() - pending->opened(), absl::Milliseconds(100));
      return options_.on_failure(
          absl::StrCat("a connection made ", absl::FormatDuration(waited), " ago is neither answered nor accepted"));
    }
  }
}

}  // namespace attnserve
