// Whether the process listening on a loopback port has accept()ed one given connection, read from the
// kernel's socket tables (/proc/self/net/tcp and tcp6). A connection the kernel completed but the process
// has not accepted yet sits in the listen backlog with no socket file, so its table row has inode 0; an
// accepted one has the inode of its file, or, once the process closed it, a closing state.
//
// Why: a listener whose accept loop died and one whose threads are only busy both leave a new connection
// unanswered; only the first leaves it unaccepted for good.
#pragma once

#include "absl/strings/string_view.h"

namespace attnserve {

enum class AcceptState {
  kAccepted,  // the server's end has a socket file
  kWaiting,   // still in the listen backlog
  kUnknown,   // no row for it (closed, or the tables are unreadable)
};

// From one table's text: the rows whose local port is `server_port` and remote port `client_port`.
AcceptState AcceptStateInTable(absl::string_view proc_net_tcp, int server_port, int client_port);

// Looks in /proc/self/net/tcp, then tcp6.
AcceptState ServerSideAcceptState(int server_port, int client_port);

}  // namespace attnserve
