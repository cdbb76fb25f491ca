#include "server/transport/channelz_sockets.h"

#include <grpc/grpc.h>
#include <grpc/support/alloc.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/transport/peer_address.h"

namespace attnserve {
namespace {

// channelz's JSON is read by scanning, not parsed: the guard reads every socket several times a second
// (protobuf's JSON parser took 43 us a socket), and protobuf's Map, inlined into a ThreadSanitizer build and
// filled by Debian's uninstrumented libprotobuf, crashed. gRPC renders its JSON compactly, objects' keys sorted,
// and the values read here (ids, counts, URIs) as strings holding no escaped quote.

// channelz's answer, owned; the string it returns is gRPC's to free.
absl::StatusOr<std::string> Answer(char* json, const char* what) {
  if (json == nullptr) return absl::InternalError(absl::StrCat("channelz: no answer to ", what));
  const std::unique_ptr<char, void (*)(void*)> owned(json, gpr_free);
  return std::string(json);
}

// The string value that follows `key` (which ends with its opening quote), from `from`; "" if absent.
absl::string_view StringAfter(absl::string_view json, absl::string_view key, size_t from = 0) {
  const size_t at = json.find(key, from);
  if (at == absl::string_view::npos) return {};
  const absl::string_view rest = json.substr(at + key.size());
  return rest.substr(0, rest.find('"'));
}

// A count that follows `key`; absent (channelz leaves zero counts out) or unreadable: 0.
int64_t Int64After(absl::string_view json, absl::string_view key) {
  int64_t out = 0;
  return absl::SimpleAtoi(StringAfter(json, key), &out) ? out : 0;
}

// Every value of `key` in `json`, as numbers ("serverId", "socketId" of a page of refs).
std::vector<int64_t> AllInt64s(absl::string_view json, absl::string_view key) {
  std::vector<int64_t> out;
  for (size_t at = json.find(key); at != absl::string_view::npos; at = json.find(key, at + key.size())) {
    int64_t value = 0;
    if (absl::SimpleAtoi(StringAfter(json, key, at), &value)) out.push_back(value);
  }
  return out;
}

// Every gRPC server of the process: their ids, and the calls they have started (`calls_started`, if not null).
// A page ends the list when it says "end":true (present on the last page only).
absl::StatusOr<std::vector<int64_t>> ServerIds(int64_t* calls_started) {
  std::vector<int64_t> ids;
  if (calls_started != nullptr) *calls_started = 0;
  for (bool end = false; !end;) {
    const intptr_t start = ids.empty() ? 0 : static_cast<intptr_t>(ids.back() + 1);
    ATTN_ASSIGN_OR_RETURN(const std::string page, Answer(grpc_channelz_get_servers(start), "get_servers"));
    const std::vector<int64_t> page_ids = AllInt64s(page, "\"serverId\":\"");
    if (calls_started != nullptr) {
      for (const int64_t calls : AllInt64s(page, "\"callsStarted\":\"")) *calls_started += calls;
    }
    end = page.find("\"end\":true") != std::string::npos;
    if (page_ids.empty()) break;
    ids.insert(ids.end(), page_ids.begin(), page_ids.end());
  }
  return ids;
}

absl::StatusOr<std::vector<int64_t>> SocketIds(int64_t server_id) {
  std::vector<int64_t> ids;
  for (bool end = false; !end;) {
    const intptr_t start = ids.empty() ? 0 : static_cast<intptr_t>(ids.back() + 1);
    ATTN_ASSIGN_OR_RETURN(const std::string page,
                          Answer(grpc_channelz_get_server_sockets(static_cast<intptr_t>(server_id), start, 0),
                                 "get_server_sockets"));
    const std::vector<int64_t> page_ids = AllInt64s(page, "\"socketId\":\"");
    end = page.find("\"end\":true") != std::string::npos;
    if (page_ids.empty()) break;
    ids.insert(ids.end(), page_ids.begin(), page_ids.end());
  }
  return ids;
}

}  // namespace

absl::StatusOr<SocketStreams> ParseChannelzSocket(absl::string_view json) {
  const size_t socket = json.find("{\"socket\":{");
  const size_t ref = socket == absl::string_view::npos ? socket : json.find("\"ref\":{", socket);
  if (ref == absl::string_view::npos) return absl::InternalError("channelz: a socket's answer has no socket.ref");
  SocketStreams out;
  // The ref's name is the transport's and the peer's URI: "chttp2 ipv4:127.0.0.1:5000".
  absl::string_view name = StringAfter(json, "\"name\":\"", ref);
  if (const size_t space = name.rfind(' '); space != absl::string_view::npos) name.remove_prefix(space + 1);
  out.peer_key = PeerKeyFromGrpcPeer(name);
  int64_t id = 0;
  if (absl::SimpleAtoi(StringAfter(json, "\"socketId\":\"", ref), &id)) out.socket_id = id;
  const size_t data = json.find("\"data\":{", socket);
  if (data != absl::string_view::npos) {
    const absl::string_view fields = json.substr(data, json.find('}', data) - data);  // counts: no nested object
    out.streams_started = Int64After(fields, "\"streamsStarted\":\"");
    out.streams_succeeded = Int64After(fields, "\"streamsSucceeded\":\"");
  }
  return out;
}

absl::StatusOr<int64_t> ServerCallsStarted() {
  int64_t calls = 0;
  ATTN_RETURN_IF_ERROR(ServerIds(&calls).status());
  return calls;
}

absl::StatusOr<std::vector<SocketStreams>> ListServerSockets() {
  std::vector<SocketStreams> sockets;
  ATTN_ASSIGN_OR_RETURN(const std::vector<int64_t> servers, ServerIds(nullptr));
  for (const int64_t server : servers) {
    const absl::StatusOr<std::vector<int64_t>> ids = SocketIds(server);
    if (!ids.ok()) continue;  // gone meanwhile: the others are still worth reading
    for (const int64_t id : *ids) {
      char* json = grpc_channelz_get_socket(static_cast<intptr_t>(id));
      if (json == nullptr) continue;  // closed since it was listed
      const std::unique_ptr<char, void (*)(void*)> owned(json, gpr_free);
      absl::StatusOr<SocketStreams> socket = ParseChannelzSocket(json);
      if (socket.ok()) sockets.push_back(std::move(*socket));
    }
  }
  return sockets;
}

}  // namespace attnserve
