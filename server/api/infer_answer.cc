#include "server/api/infer_answer.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <google/protobuf/wire_format_lite.h>

#include <climits>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "server/api/wire_message.h"

namespace attnserve {
namespace {

using google::protobuf::internal::WireFormatLite;

constexpr int kOutputField = attnserve::v1::InferResponse::kOutputFieldNumber;
constexpr int kRawDataField = attnserve::v1::Tensor::kRawDataFieldNumber;

// The bytes of field `output` up to its raw_data's first value: the field's tag and length, the tensor's other
// fields (`head`), raw_data's tag and length.
std::string OutputFieldPrefix(const attnserve::v1::Tensor& head, size_t data_bytes) {
  const size_t head_bytes = head.ByteSizeLong();
  const uint32_t raw_tag = WireFormatLite::MakeTag(kRawDataField, WireFormatLite::WIRETYPE_LENGTH_DELIMITED);
  const size_t tensor_bytes = head_bytes + google::protobuf::io::CodedOutputStream::VarintSize32(raw_tag) +
                              google::protobuf::io::CodedOutputStream::VarintSize64(data_bytes) + data_bytes;
  std::string prefix;
  {
    google::protobuf::io::StringOutputStream stream(&prefix);
    google::protobuf::io::CodedOutputStream out(&stream);
    out.WriteTag(WireFormatLite::MakeTag(kOutputField, WireFormatLite::WIRETYPE_LENGTH_DELIMITED));
    out.WriteVarint64(tensor_bytes);
    head.SerializeWithCachedSizes(&out);
    out.WriteTag(raw_tag);
    out.WriteVarint64(data_bytes);
  }
  return prefix;
}

void DeleteTensor(void* tensor) { delete static_cast<Tensor*>(tensor); }

// SerializeWire of an answer with output values: the prefix, the values' slice, then the rest of the message
// (id, attn_weights, timing) serialized straight into gRPC's slices.
grpc::Status SpliceOutput(InferAnswer& answer, grpc::ByteBuffer* wire) {
  const size_t data_bytes = answer.output.values.size() * sizeof(float);
  attnserve::v1::Tensor head;
  head.Swap(answer.message.mutable_output());
  answer.message.clear_output();
  head.clear_raw_data();
  std::vector<grpc::Slice> slices;
  slices.emplace_back(OutputFieldPrefix(head, data_bytes));
  grpc::ByteBuffer rest;
  if (const grpc::Status serialized = SerializeWire(answer.message, &rest); !serialized.ok()) return serialized;
  const size_t total_bytes = slices[0].size() + data_bytes + rest.Length();
  if (total_bytes > static_cast<size_t>(INT_MAX)) {
    return grpc::Status(grpc::StatusCode::INTERNAL, "response: the " + answer.message.GetTypeName() + " of " +
                                                        std::to_string(total_bytes) +
                                                        " bytes could not be serialized: over 2 GiB");
  }
  std::vector<grpc::Slice> rest_slices;
  if (rest.Valid() && !rest.Dump(&rest_slices).ok()) {
    return grpc::Status(grpc::StatusCode::INTERNAL, "response: the serialized message could not be read back");
  }
  slices.reserve(2 + rest_slices.size());  // nothing below allocates once the slice owns the tensor
  auto owner = std::make_unique<Tensor>(std::move(answer.output));
  grpc::Slice values(owner->values.data(), data_bytes, DeleteTensor, owner.get());
  owner.release();  // the slice's now: freed by DeleteTensor
  slices.push_back(std::move(values));
  slices.insert(slices.end(), rest_slices.begin(), rest_slices.end());
  grpc::ByteBuffer bytes(slices.data(), slices.size());
  wire->Swap(&bytes);
  return grpc::Status::OK;
}

}  // namespace

grpc::Status SerializeWire(InferAnswer& answer, grpc::ByteBuffer* wire) {
  if (answer.output.values.empty()) return SerializeWire(answer.message, wire);
  try {
    return SpliceOutput(answer, wire);
  } catch (const std::bad_alloc&) {  // on a worker's OpenMP thread, where an escaping exception ends the process
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "out of memory while serializing the answer");
  }
}

}  // namespace attnserve
