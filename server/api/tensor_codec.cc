#include "server/api/tensor_codec.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/bf16_rows.h"
#include "common/half_float.h"

namespace attnserve {

using attnserve::v1::DataType;

absl::StatusOr<int64_t> CheckTensorShape(const Shape& shape, const std::string& field) {
  int64_t count = 1;
  for (int64_t d : shape) {
    if (d <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": every dimension must be positive, got shape ", ShapeToString(shape)));
    }
    if (d > (int64_t{1} << 40) || count > (int64_t{1} << 40) / d) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": shape ", ShapeToString(shape), " is too large"));
    }
    count *= d;
  }
  return count;
}

std::string DataTypeName(DataType dtype) {
  const std::string& name = v1::DataType_Name(dtype);
  return name.empty() ? absl::StrCat(static_cast<int>(dtype)) : name;
}

namespace {

const char* AcceptedNames(AcceptedDTypes accepted) {
  switch (accepted) {
    case AcceptedDTypes::kFloat32:
      return "FLOAT32";
    case AcceptedDTypes::kFloat32OrBool:
      return "FLOAT32 or BOOL";
    case AcceptedDTypes::kActivation:
      break;
  }
  return "FLOAT32, BFLOAT16 or FLOAT16";
}

bool Accepts(AcceptedDTypes accepted, DataType dtype) {
  if (dtype == v1::FLOAT32) return true;
  if (dtype == v1::BOOL) return accepted == AcceptedDTypes::kFloat32OrBool;
  return (dtype == v1::BFLOAT16 || dtype == v1::FLOAT16) && accepted == AcceptedDTypes::kActivation;
}

// The dtype (unspecified: taken from the typed values), checked against what the field accepts.
absl::StatusOr<DataType> CheckDType(const attnserve::v1::Tensor& t, const std::string& field, AcceptedDTypes accepted) {
  const bool has_float = t.float_data_size() > 0, has_bool = t.bool_data_size() > 0;
  DataType dtype = t.dtype();
  if (dtype == v1::DATA_TYPE_UNSPECIFIED) {
    if (has_float) dtype = v1::FLOAT32;
    if (has_bool) dtype = v1::BOOL;
  }
  if (!Accepts(accepted, dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": dtype must be ", AcceptedNames(accepted), ", got ", DataTypeName(dtype)));
  }
  const bool half = dtype == v1::BFLOAT16 || dtype == v1::FLOAT16;
  if ((has_float && dtype != v1::FLOAT32) || (has_bool && dtype != v1::BOOL)) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": dtype is ", v1::DataType_Name(dtype),
                                                   " but values are in ", has_float ? "float_data" : "bool_data",
                                                   half ? " (16-bit values come in raw_data)" : ""));
  }
  return dtype;
}

DType EngineDType(DataType dtype) {
  switch (dtype) {
    case v1::BOOL:
      return DType::kBool;
    case v1::BFLOAT16:
      return DType::kBFloat16;
    case v1::FLOAT16:
      return DType::kFloat16;
    default:
      return DType::kFloat32;
  }
}

// The values, whose count must match the shape's.
absl::StatusOr<TensorView> ViewValues(const attnserve::v1::Tensor& t, const std::string& field, Shape shape,
                                      int64_t count, DataType dtype) {
  const DType engine_dtype = EngineDType(dtype);
  if (!t.raw_data().empty()) {
    const int64_t expected = count * static_cast<int64_t>(DTypeSize(engine_dtype));
    if (static_cast<int64_t>(t.raw_data().size()) != expected) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": raw_data holds ", t.raw_data().size(),
                                                     " bytes, expected ", expected, " (shape ", ShapeToString(shape),
                                                     " x ", v1::DataType_Name(dtype), ")"));
    }
    return TensorView{engine_dtype, std::move(shape), t.raw_data().data()};
  }
  const bool has_float = t.float_data_size() > 0;
  const int64_t got = has_float ? t.float_data_size() : t.bool_data_size();
  if (got != count) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": ", has_float ? "float_data" : "bool_data", " holds ", got,
                                                   " values, expected ", count, " (shape ", ShapeToString(shape),
                                                   ")"));
  }
  static_assert(sizeof(bool) == 1, "bool_data is viewed as one byte per element");
  const void* data = has_float ? static_cast<const void*>(t.float_data().data())
                               : static_cast<const void*>(t.bool_data().data());
  return TensorView{engine_dtype, std::move(shape), data};
}

}  // namespace

absl::StatusOr<TensorView> DecodeTensor(const attnserve::v1::Tensor& t, const std::string& field,
                                        AcceptedDTypes accepted) {
  const bool has_raw = !t.raw_data().empty();
  const bool has_float = t.float_data_size() > 0;
  const bool has_bool = t.bool_data_size() > 0;
  if (t.shape_size() == 0 && !has_raw && !has_float && !has_bool) return TensorView{};
  if (has_raw + has_float + has_bool > 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": values must come in exactly one of raw_data, float_data, bool_data; got ",
        has_raw ? "raw_data " : "", has_float ? "float_data " : "", has_bool ? "bool_data" : ""));
  }
  if (t.shape_size() == 0) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": has values but no shape"));
  }
  Shape shape(t.shape().begin(), t.shape().end());
  ATTN_ASSIGN_OR_RETURN(const int64_t count, CheckTensorShape(shape, field));
  ATTN_ASSIGN_OR_RETURN(const DataType dtype, CheckDType(t, field, accepted));
  return ViewValues(t, field, std::move(shape), count, dtype);
}

void EncodeRawValues(const Tensor& tensor, DType dtype, std::string* raw) {
  const size_t n = tensor.values.size();
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) {
    raw->assign(reinterpret_cast<const char*>(tensor.values.data()), n * sizeof(float));
    return;
  }
  raw->resize(n * sizeof(uint16_t));
  uint16_t* bits = reinterpret_cast<uint16_t*>(raw->data());  // std::string storage is suitably aligned
  if (dtype == DType::kBFloat16) {
    FloatRowsToBf16(tensor.values.data(), 1, static_cast<int64_t>(n), static_cast<int64_t>(n), bits, 0);
  } else {
    for (size_t i = 0; i < n; ++i) bits[i] = FloatToHalf(tensor.values[i]);
  }
}

void EncodeTensorHead(const Tensor& tensor, attnserve::v1::Tensor* out, DType dtype) {
  out->clear_shape();
  for (int64_t d : tensor.shape) out->add_shape(d);
  out->set_dtype(dtype == DType::kBFloat16 ? v1::BFLOAT16 : dtype == DType::kFloat16 ? v1::FLOAT16 : v1::FLOAT32);
}

void EncodeTensor(const Tensor& tensor, attnserve::v1::Tensor* out, DType dtype) {
  EncodeTensorHead(tensor, out, dtype);
  EncodeRawValues(tensor, dtype, out->mutable_raw_data());
}

}  // namespace attnserve
