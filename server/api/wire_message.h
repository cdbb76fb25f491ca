// Protobuf messages to and from gRPC's bytes, for the methods this server parses itself (marked raw): gRPC
// 1.51's callback API answers a unary request it cannot parse UNIMPLEMENTED, which tells a client the method
// does not exist, and ends a stream whose message it cannot parse with OK, the request silently dropped.
// Parsed here, bytes that do not parse as the message get INVALID_ARGUMENT naming it and their size. (Bytes
// that parse, e.g. into unknown fields, are the message: validation names what is missing.)
#pragma once

#include <string>

#include <google/protobuf/message_lite.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/proto_utils.h>
#include <grpcpp/support/proto_buffer_reader.h>

namespace attnserve {

// Parses `wire` into `message` and empties `wire` (its bytes are not held twice). INVALID_ARGUMENT when there
// are no bytes at all (a unary call closed without a message, which gRPC hands over as an empty buffer) or
// they do not parse as a `message`.
inline grpc::Status ParseWire(grpc::ByteBuffer* wire, google::protobuf::MessageLite* message) {
  if (!wire->Valid()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "request: expected one " + message->GetTypeName() + " message, got none");
  }
  const size_t wire_bytes = wire->Length();
  bool parsed = false;
  {
    grpc::ProtoBufferReader reader(wire);
    parsed = reader.status().ok() && message->ParseFromZeroCopyStream(&reader);
  }
  wire->Clear();
  if (parsed) return grpc::Status::OK;
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "request: expected an " + message->GetTypeName() +
                                                              " message, got " + std::to_string(wire_bytes) +
                                                              " bytes that do not parse as one");
}

// Serializes `message` into `wire` (replacing what it held).
inline grpc::Status SerializeWire(const google::protobuf::MessageLite& message, grpc::ByteBuffer* wire) {
  grpc::ByteBuffer bytes;
  bool own_buffer = false;
  grpc::Status serialized =
      grpc::SerializationTraits<google::protobuf::MessageLite>::Serialize(message, &bytes, &own_buffer);
  if (!serialized.ok()) {
    return grpc::Status(grpc::StatusCode::INTERNAL,
                        "response: the " + message.GetTypeName() + " of " + std::to_string(message.ByteSizeLong()) +
                            " bytes could not be serialized: " + serialized.error_message());
  }
  wire->Swap(&bytes);
  return grpc::Status::OK;
}

}  // namespace attnserve
