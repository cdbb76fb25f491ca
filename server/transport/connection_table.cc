#include "server/transport/connection_table.h"

#include <dirent.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "server/transport/peer_address.h"

namespace attnserve {
namespace {

// The kernel's TCP states (include/net/tcp_states.h), which linux/tcp.h does not name.
constexpr uint8_t kTcpEstablished = 1;
constexpr uint8_t kTcpCloseWait = 8;

int LocalPort(const sockaddr_storage& address) {
  if (address.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in&>(address).sin_port);
  if (address.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6&>(address).sin6_port);
  return 0;
}

// The connection on `fd`, if it is a connected TCP socket on one of `local_ports`.
bool ReadConnection(int fd, const std::vector<int>& local_ports, TcpConnection* out) {
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) return false;
  int type = 0, listening = 0;
  socklen_t len = sizeof(type);
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM) return false;
  len = sizeof(listening);
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || listening) return false;
  sockaddr_storage local = {}, peer = {};
  socklen_t local_len = sizeof(local), peer_len = sizeof(peer);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_len) != 0) return false;
  if (std::find(local_ports.begin(), local_ports.end(), LocalPort(local)) == local_ports.end()) return false;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_len) != 0) return false;
  tcp_info info = {};
  len = sizeof(info);
  if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0) return false;
  // After our shutdown the socket is in FIN_WAIT until gRPC closes it: no longer a connection to count.
  if (info.tcpi_state != kTcpEstablished && info.tcpi_state != kTcpCloseWait) return false;
  out->fd = fd;
  out->inode = st.st_ino;
  out->peer_key = PeerKeyFromSockaddr(peer);
  out->received_bytes = static_cast<int64_t>(info.tcpi_bytes_received);
  int unread = 0;
  out->unread_bytes = ioctl(fd, FIONREAD, &unread) == 0 ? unread : 0;
  return !out->peer_key.empty();
}

}  // namespace

absl::StatusOr<std::vector<TcpConnection>> ListTcpConnections(const std::vector<int>& local_ports) {
  std::vector<TcpConnection> connections;
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return absl::UnavailableError(absl::StrCat("/proc/self/fd: ", std::strerror(errno)));
  const int own_fd = dirfd(dir);
  while (dirent* entry = readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(entry->d_name, &end, 10);
    if (end == entry->d_name || *end != '\0' || fd == own_fd) continue;
    TcpConnection connection;
    if (ReadConnection(static_cast<int>(fd), local_ports, &connection)) connections.push_back(connection);
  }
  closedir(dir);
  return connections;
}

absl::Status ShutDownTcpConnection(const TcpConnection& connection) {
  TcpConnection now;
  sockaddr_storage local = {};
  socklen_t local_len = sizeof(local);
  if (getsockname(connection.fd, reinterpret_cast<sockaddr*>(&local), &local_len) != 0 ||
      !ReadConnection(connection.fd, {LocalPort(local)}, &now) || now.inode != connection.inode ||
      now.peer_key != connection.peer_key) {
    return absl::NotFoundError(absl::StrCat("connection from ", connection.peer_key, " is gone"));
  }
  if (shutdown(connection.fd, SHUT_RDWR) != 0) {
    return absl::InternalError(absl::StrCat("shutdown of the connection from ", connection.peer_key, ": ",
                                            std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace attnserve
