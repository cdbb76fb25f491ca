#include "server/api/tensor_codec.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

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

namespace {

// The dtype (unspecified: taken from the typed values), checked against what the field accepts.
absl::StatusOr<DataType> CheckDType(const attnserve::v1::Tensor& t, const std::string& field, AcceptedDTypes accepted) {
  const bool has_float = t.float_data_size() > 0, has_bool = t.bool_data_size() > 0;
  DataType dtype = t.dtype();
  if (dtype == v1::DATA_TYPE_UNSPECIFIED) {
    if (has_float) dtype = v1::FLOAT32;
    if (has_bool) dtype = v1::BOOL;
  }
  if (dtype != v1::FLOAT32 && dtype != v1::BOOL) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": dtype must be ", accepted == AcceptedDTypes::kFloat32 ? "FLOAT32" : "FLOAT32 or BOOL", ", got ",
        v1::DataType_Name(dtype).empty() ? absl::StrCat(static_cast<int>(dtype)) : v1::DataType_Name(dtype)));
  }
  if (dtype == v1::BOOL && accepted == AcceptedDTypes::kFloat32) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": dtype must be FLOAT32, got BOOL"));
  }
  if ((has_float && dtype != v1::FLOAT32) || (has_bool && dtype != v1::BOOL)) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": dtype is ", v1::DataType_Name(dtype),
                                                   " but values are in ", has_float ? "float_data" : "bool_data"));
  }
  return dtype;
}

// The values, whose count must match the shape's.
absl::StatusOr<TensorView> ViewValues(const attnserve::v1::Tensor& t, const std::string& field, Shape shape,
                                      int64_t count, DataType dtype) {
  const DType engine_dtype = dtype == v1::FLOAT32 ? DType::kFloat32 : DType::kBool;
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

void EncodeTensor(const Tensor& tensor, attnserve::v1::Tensor* out) {
  out->clear_shape();
  for (int64_t d : tensor.shape) out->add_shape(d);
  out->set_dtype(v1::FLOAT32);
  out->mutable_raw_data()->assign(reinterpret_cast<const char*>(tensor.values.data()),
                                  tensor.values.size() * sizeof(float));
}

}  // namespace attnserve
