#include "server/api/spliced_wire.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <google/protobuf/wire_format_lite.h>

#include <climits>
#include <memory>
#include <string>
#include <utility>

#include "server/api/wire_message.h"

namespace attnserve {
namespace {

using google::protobuf::internal::WireFormatLite;

void DeleteTensor(void* tensor) { delete static_cast<Tensor*>(tensor); }

}  // namespace

grpc::Status SplicedWire::AppendMessage(const google::protobuf::MessageLite& message) {
  grpc::ByteBuffer bytes;
  if (grpc::Status serialized = SerializeWire(message, &bytes); !serialized.ok()) return serialized;
  std::vector<grpc::Slice> pieces;
  if (bytes.Valid() && !bytes.Dump(&pieces).ok()) {
    return grpc::Status(grpc::StatusCode::INTERNAL, "response: the serialized message could not be read back");
  }
  for (grpc::Slice& piece : pieces) {
    bytes_ += piece.size();
    slices_.push_back(std::move(piece));
  }
  return grpc::Status::OK;
}

void SplicedWire::AppendFieldHead(int field, size_t field_bytes) {
  std::string head;
  {
    google::protobuf::io::StringOutputStream stream(&head);
    google::protobuf::io::CodedOutputStream out(&stream);
    out.WriteTag(WireFormatLite::MakeTag(field, WireFormatLite::WIRETYPE_LENGTH_DELIMITED));
    out.WriteVarint64(field_bytes);
  }
  bytes_ += head.size();
  slices_.emplace_back(head);
}

void SplicedWire::AppendValues(int field, Tensor values) {
  const size_t value_bytes = values.values.size() * sizeof(float);
  AppendFieldHead(field, value_bytes);
  if (value_bytes == 0) return;
  slices_.reserve(slices_.size() + 1);  // nothing below allocates once the slice owns the tensor
  auto owner = std::make_unique<Tensor>(std::move(values));
  grpc::Slice slice(owner->values.data(), value_bytes, DeleteTensor, owner.get());
  owner.release();  // the slice's now: freed by DeleteTensor
  slices_.push_back(std::move(slice));
  bytes_ += value_bytes;
}

void SplicedWire::AppendField(int field, SplicedWire nested) {
  AppendFieldHead(field, nested.bytes_);
  slices_.reserve(slices_.size() + nested.slices_.size());
  for (grpc::Slice& slice : nested.slices_) slices_.push_back(std::move(slice));
  bytes_ += nested.bytes_;
}

grpc::Status SplicedWire::Finish(const std::string& type_name, grpc::ByteBuffer* wire) {
  if (bytes_ > static_cast<size_t>(INT_MAX)) {
    return grpc::Status(grpc::StatusCode::INTERNAL, "response: the " + type_name + " of " + std::to_string(bytes_) +
                                                        " bytes could not be serialized: over 2 GiB");
  }
  grpc::ByteBuffer bytes(slices_.data(), slices_.size());
  slices_.clear();
  bytes_ = 0;
  wire->Swap(&bytes);
  return grpc::Status::OK;
}

}  // namespace attnserve
