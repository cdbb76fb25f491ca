#include "tests/testing/http_get.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace attnserve::testing {
namespace {

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

int RemainingMs(absl::Time deadline) {
  const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
  return ms <= 0 ? 0 : static_cast<int>(std::min<int64_t>(ms, 1 << 30));
}

// Waits for `events` on fd until the deadline: OK, DeadlineExceeded, or the poll error.
absl::Status WaitFor(int fd, short events, absl::Time deadline, const std::string& what) {
  while (true) {
    pollfd p{fd, events, 0};
    const int r = poll(&p, 1, RemainingMs(deadline));
    if (r > 0) return absl::OkStatus();
    if (r == 0) return absl::DeadlineExceededError(absl::StrCat(what, ": timed out"));
    if (errno != EINTR) return absl::ErrnoToStatus(errno, what);
  }
}

// Connects a non-blocking socket to one address of host:port.
absl::StatusOr<int> Connect(const std::string& host, int port, absl::Time deadline) {
  addrinfo hints;
  std::memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* addrs = nullptr;
  const std::string port_str = absl::StrCat(port);
  if (int rc = getaddrinfo(host.c_str(), port_str.c_str(), &hints, &addrs); rc != 0) {
    return absl::UnavailableError(absl::StrCat("resolve ", host, ": ", gai_strerror(rc)));
  }
  std::string last_error = "no address";
  for (addrinfo* a = addrs; a != nullptr; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    int rc = connect(fd, a->ai_addr, a->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      absl::Status s = WaitFor(fd, POLLOUT, deadline, "connect");
      if (!s.ok()) {
        close(fd);
        freeaddrinfo(addrs);
        return s;
      }
      int err = 0;
      socklen_t len = sizeof(err);
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      rc = err == 0 ? 0 : -1;
      errno = err;
    }
    if (rc == 0) {
      freeaddrinfo(addrs);
      return fd;
    }
    last_error = std::strerror(errno);
    close(fd);
  }
  freeaddrinfo(addrs);
  return absl::UnavailableError(absl::StrCat("connect ", host, ":", port, ": ", last_error));
}

// Decodes a chunked body (in case a server answers HTTP/1.0 with one anyway).
absl::StatusOr<std::string> Dechunk(const std::string& body) {
  std::string out;
  size_t pos = 0;
  while (true) {
    const size_t eol = body.find("\r\n", pos);
    if (eol == std::string::npos) return absl::InternalError("truncated chunked body");
    std::string size_hex = body.substr(pos, eol - pos);
    if (size_t semi = size_hex.find(';'); semi != std::string::npos) size_hex.resize(semi);
    uint64_t size = 0;
    if (!absl::SimpleHexAtoi(absl::StripAsciiWhitespace(size_hex), &size)) {
      return absl::InternalError(absl::StrCat("bad chunk size '", size_hex, "'"));
    }
    pos = eol + 2;
    if (size == 0) return out;
    if (pos + size > body.size()) return absl::InternalError("truncated chunk");
    out.append(body, pos, size);
    pos += size + 2;
  }
}

}  // namespace

absl::StatusOr<std::string> HttpGet(const std::string& host, int port, const std::string& path,
                                    absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::StatusOr<int> connected = Connect(host, port, deadline);
  if (!connected.ok()) return connected.status();
  Fd fd(*connected);
  const std::string host_header = host.find(':') != std::string::npos ? absl::StrCat("[", host, "]") : host;
  const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: ", host_header, ":", port,
                                           "\r\nAccept: */*\r\nConnection: close\r\n\r\n");
  size_t sent = 0;
  while (sent < request.size()) {
    const ssize_t n = send(fd.get(), request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
    } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (absl::Status s = WaitFor(fd.get(), POLLOUT, deadline, "send"); !s.ok()) return s;
    } else {
      return absl::UnavailableError(absl::StrCat("send: ", std::strerror(errno)));
    }
  }
  std::string response;
  char buf[16384];
  while (true) {
    const ssize_t n = recv(fd.get(), buf, sizeof(buf), 0);
    if (n > 0) {
      response.append(buf, static_cast<size_t>(n));
    } else if (n == 0) {
      break;
    } else if (errno == EAGAIN || errno == EINTR) {
      if (absl::Status s = WaitFor(fd.get(), POLLIN, deadline, "recv"); !s.ok()) return s;
    } else {
      return absl::UnavailableError(absl::StrCat("recv: ", std::strerror(errno)));
    }
  }

  const size_t header_end = response.find("\r\n\r\n");
  if (header_end == std::string::npos) {
    return absl::InternalError(absl::StrCat("malformed HTTP response (no end of headers): ", response.substr(0, 200)));
  }
  const std::string headers = response.substr(0, header_end);
  std::string body = response.substr(header_end + 4);
  // Status line: HTTP/1.x CODE REASON
  const size_t line_end = headers.find("\r\n");
  const std::string status_line = headers.substr(0, line_end);
  const size_t sp1 = status_line.find(' ');
  if (status_line.rfind("HTTP/", 0) != 0 || sp1 == std::string::npos) {
    return absl::InternalError(absl::StrCat("malformed HTTP status line '", status_line, "'"));
  }
  const size_t sp2 = status_line.find(' ', sp1 + 1);
  int code = 0;
  if (!absl::SimpleAtoi(status_line.substr(sp1 + 1, sp2 == std::string::npos ? std::string::npos : sp2 - sp1 - 1),
                        &code)) {
    return absl::InternalError(absl::StrCat("malformed HTTP status line '", status_line, "'"));
  }
  if (absl::AsciiStrToLower(headers).find("\r\ntransfer-encoding: chunked") != std::string::npos) {
    absl::StatusOr<std::string> dechunked = Dechunk(body);
    if (!dechunked.ok()) return dechunked.status();
    body = std::move(*dechunked);
  }
  if (code != 200) {
    return absl::FailedPreconditionError(
        absl::StrCat("HTTP ", status_line.substr(sp1 + 1), ": ", body.substr(0, 2000)));
  }
  return body;
}

}  // namespace attnserve::testing
