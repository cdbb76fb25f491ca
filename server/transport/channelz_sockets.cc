#include "server/transport/channelz_sockets.h"

#include <grpc/grpc.h>
#include <grpc/support/alloc.h>

#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>

#include <memory>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"
#include "server/transport/peer_address.h"

namespace attnserve {
namespace {

using google::protobuf::Struct;
using google::protobuf::Value;

// channelz's JSON answer, parsed; the string it returns is gRPC's to free.
absl::StatusOr<Struct> Parse(char* json, const char* what) {
  if (json == nullptr) return absl::InternalError(absl::StrCat("channelz: no answer to ", what));
  const std::unique_ptr<char, void (*)(void*)> owned(json, gpr_free);
  Struct parsed;
  if (!google::protobuf::util::JsonStringToMessage(json, &parsed).ok()) {
    return absl::InternalError(absl::StrCat("channelz: the answer to ", what, " is not JSON"));
  }
  return parsed;
}

const Value* Field(const Struct& s, const char* name) {
  const auto it = s.fields().find(name);
  return it == s.fields().end() ? nullptr : &it->second;
}

// channelz renders int64 values as JSON strings (proto3's mapping); absent means 0.
int64_t Int64Field(const Struct& s, const char* name) {
  const Value* v = Field(s, name);
  int64_t out = 0;
  if (v == nullptr) return 0;
  if (v->has_string_value() && absl::SimpleAtoi(v->string_value(), &out)) return out;
  if (v->has_number_value()) return static_cast<int64_t>(v->number_value());
  return 0;
}

const Struct* StructField(const Struct& s, const char* name) {
  const Value* v = Field(s, name);
  return v != nullptr && v->has_struct_value() ? &v->struct_value() : nullptr;
}

// The ids in a list of refs ("server" / "socketRef" entries), and whether it is the last page.
std::vector<int64_t> RefIds(const Struct& page, const char* list, const char* ref, const char* id, bool* end) {
  std::vector<int64_t> ids;
  const Value* v = Field(page, "end");  // present (true) only on the last page
  *end = v != nullptr && v->has_bool_value() && v->bool_value();
  const Value* entries = Field(page, list);
  if (entries == nullptr || !entries->has_list_value()) return ids;
  for (const Value& entry : entries->list_value().values()) {
    if (!entry.has_struct_value()) continue;
    const Struct* r = ref != nullptr ? StructField(entry.struct_value(), ref) : &entry.struct_value();
    if (r != nullptr) ids.push_back(Int64Field(*r, id));
  }
  return ids;
}

// The string value that follows `key` (which ends with its opening quote); "" if absent. channelz's values
// here (URIs and decimal counts) hold no escaped quote.
absl::string_view StringAfter(absl::string_view json, absl::string_view key) {
  const size_t at = json.find(key);
  if (at == absl::string_view::npos) return {};
  const absl::string_view rest = json.substr(at + key.size());
  return rest.substr(0, rest.find('"'));
}

// A count that follows `key`; absent (channelz leaves zero counts out) or unreadable: 0.
int64_t Int64After(absl::string_view json, absl::string_view key) {
  int64_t out = 0;
  return absl::SimpleAtoi(StringAfter(json, key), &out) ? out : 0;
}

// Every gRPC server of the process: their ids, and the calls they have started (`calls_started`, if not null).
absl::StatusOr<std::vector<int64_t>> ServerIds(int64_t* calls_started) {
  std::vector<int64_t> ids;
  if (calls_started != nullptr) *calls_started = 0;
  bool end = false;
  while (!end) {
    const intptr_t start = ids.empty() ? 0 : static_cast<intptr_t>(ids.back() + 1);
    ATTN_ASSIGN_OR_RETURN(const Struct page, Parse(grpc_channelz_get_servers(start), "get_servers"));
    const std::vector<int64_t> page_ids = RefIds(page, "server", "ref", "serverId", &end);
    if (page_ids.empty()) break;
    ids.insert(ids.end(), page_ids.begin(), page_ids.end());
    const Value* servers = Field(page, "server");
    for (const Value& server : servers->list_value().values()) {
      const Struct* data = server.has_struct_value() ? StructField(server.struct_value(), "data") : nullptr;
      if (data != nullptr && calls_started != nullptr) *calls_started += Int64Field(*data, "callsStarted");
    }
  }
  return ids;
}

absl::StatusOr<std::vector<int64_t>> SocketIds(int64_t server_id) {
  std::vector<int64_t> ids;
  bool end = false;
  while (!end) {
    const intptr_t start = ids.empty() ? 0 : static_cast<intptr_t>(ids.back() + 1);
    ATTN_ASSIGN_OR_RETURN(const Struct page,
                          Parse(grpc_channelz_get_server_sockets(static_cast<intptr_t>(server_id), start, 0),
                                "get_server_sockets"));
    const std::vector<int64_t> page_ids = RefIds(page, "socketRef", nullptr, "socketId", &end);
    if (page_ids.empty()) break;
    ids.insert(ids.end(), page_ids.begin(), page_ids.end());
  }
  return ids;
}

}  // namespace

absl::StatusOr<SocketStreams> ParseChannelzSocket(absl::string_view json) {
  // Read by scanning rather than through a JSON parser: the guard reads every socket several times a second
  // (protobuf's JSON parser took 43 us a socket). gRPC renders its JSON compactly, objects' keys sorted.
  const size_t socket = json.find("{\"socket\":{");
  const size_t ref = json.find("\"ref\":{", socket);
  if (socket == absl::string_view::npos || ref == absl::string_view::npos) {
    return absl::InternalError("channelz: a socket's answer has no socket.ref");
  }
  SocketStreams out;
  // The ref's name is the transport's and the peer's URI: "chttp2 ipv4:127.0.0.1:5000".
  absl::string_view name = StringAfter(json.substr(ref), "\"name\":\"");
  if (const size_t space = name.rfind(' '); space != absl::string_view::npos) name.remove_prefix(space + 1);
  out.peer_key = PeerKeyFromGrpcPeer(name);
  out.socket_id = Int64After(json.substr(ref), "\"socketId\":\"");
  const size_t data = json.find("\"data\":{", socket);
  if (data != absl::string_view::npos) {
    const absl::string_view fields = json.substr(data, json.find('}', data) - data);
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
