#include "server/transport/accept_state.h"

#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"

namespace attnserve {
namespace {

// Row fields: sl, local "ADDR:PORT", remote "ADDR:PORT", st, tx:rx, tr:when, retrnsmt, uid, timeout, inode.
constexpr size_t kLocal = 1;
constexpr size_t kRemote = 2;
constexpr size_t kState = 3;
constexpr size_t kInode = 9;

// The states a connection can be in while it waits in the backlog: the process cannot have closed it.
// (SYN_RECV, ESTABLISHED, CLOSE_WAIT.) Other states without a socket file were accepted and then closed.
bool MayBeQueued(absl::string_view state) { return state == "03" || state == "01" || state == "08"; }

int PortOf(absl::string_view address) {
  const size_t colon = address.rfind(':');
  int port = -1;
  if (colon == absl::string_view::npos || !absl::SimpleHexAtoi(address.substr(colon + 1), &port)) return -1;
  return port;
}

}  // namespace

AcceptState AcceptStateInTable(absl::string_view proc_net_tcp, int server_port, int client_port) {
  AcceptState found = AcceptState::kUnknown;
  for (absl::string_view line : absl::StrSplit(proc_net_tcp, '\n', absl::SkipEmpty())) {
    const std::vector<absl::string_view> fields = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (fields.size() <= kInode) continue;
    if (PortOf(fields[kLocal]) != server_port || PortOf(fields[kRemote]) != client_port) continue;
    if (!MayBeQueued(fields[kState])) {
      found = AcceptState::kAccepted;  // closed by the server (a TIME_WAIT row may outlive the pair's reuse)
      continue;
    }
    return fields[kInode] == "0" ? AcceptState::kWaiting : AcceptState::kAccepted;
  }
  return found;
}

AcceptState ServerSideAcceptState(int server_port, int client_port) {
  // Both tables: a dual-stack listener's connections are in tcp6, and a stale closed row with the same ports
  // in tcp must not hide a queued one there.
  AcceptState found = AcceptState::kUnknown;
  for (const char* path : {"/proc/self/net/tcp", "/proc/self/net/tcp6"}) {
    std::ifstream in(path);
    const std::string table((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const AcceptState state = AcceptStateInTable(table, server_port, client_port);
    if (state == AcceptState::kWaiting) return state;
    if (state == AcceptState::kAccepted) found = state;
  }
  return found;
}

}  // namespace attnserve
