// Between the API's Tensor message and the engine's tensors. Decoding makes views into the message (no
// copy), so the message must outlive the view.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "attnserve/v1/attention.pb.h"
#include "core/tensor.h"

namespace attnserve {

// The element count of `shape`: every dimension positive and the product far from overflow (2^40);
// InvalidArgument naming `field` and the shape otherwise.
absl::StatusOr<int64_t> CheckTensorShape(const Shape& shape, const std::string& field);

// The enum's name, or its number when the client sent a value the proto does not define.
std::string DataTypeName(attnserve::v1::DataType dtype);

// Which dtypes a field accepts. kActivation: FLOAT32, or BFLOAT16 / FLOAT16 in raw_data (the view then has
// that dtype: the engines convert it as they gather a batch's rows, a session append's included).
enum class AcceptedDTypes { kFloat32, kFloat32OrBool, kActivation };

// An absent field (no shape, no values) gives an absent view. Otherwise the values must come in exactly one
// of raw_data, float_data, bool_data, agree with dtype, and their count with the shape. InvalidArgument
// names `field`, e.g. "query: raw_data holds 100 bytes, expected 128 (shape [2, 4, 4] x FLOAT32)".
absl::StatusOr<TensorView> DecodeTensor(const attnserve::v1::Tensor& tensor, const std::string& field,
                                        AcceptedDTypes accepted);

// shape and raw_data, little-endian: f32 with dtype FLOAT32 (the default), or each value rounded to nearest
// even as BFLOAT16 or FLOAT16 (`dtype` kBFloat16 / kFloat16).
void EncodeTensor(const Tensor& tensor, attnserve::v1::Tensor* out, DType dtype = DType::kFloat32);
// EncodeTensor without raw_data: the shape and dtype.
void EncodeTensorHead(const Tensor& tensor, attnserve::v1::Tensor* out, DType dtype);
// The tensor's values as raw little-endian bytes of `dtype` (kFloat32, kBFloat16 rounded to nearest even, or
// kFloat16) into *raw: what both protocols put on the wire.
void EncodeRawValues(const Tensor& tensor, DType dtype, std::string* raw);

}  // namespace attnserve
