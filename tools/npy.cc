#include "tools/npy.h"

#include <cctype>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

// .npy data is copied as it is: only little-endian hosts read and write '<f4' that way.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "npy.cc assumes a little-endian host");

namespace attnserve {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicSize = 6;
constexpr size_t kHeaderAlignment = 64;  // NumPy pads the header so the data starts 64-byte aligned

// The header is a Python dict literal, e.g. {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }.
// This parser takes just the value kinds such a header has: strings, True/False and tuples of integers.
class HeaderParser {
 public:
  explicit HeaderParser(absl::string_view text) : text_(text) {}

  absl::Status Parse(std::string* descr, bool* fortran_order, std::vector<int64_t>* shape) {
    bool has_descr = false, has_order = false, has_shape = false;
    ATTN_RETURN_IF_ERROR(Expect('{'));
    while (true) {
      SkipSpace();
      if (Peek() == '}') break;
      std::string key;
      ATTN_RETURN_IF_ERROR(ReadString(&key));
      ATTN_RETURN_IF_ERROR(Expect(':'));
      if (key == "descr") {
        ATTN_RETURN_IF_ERROR(ReadString(descr));
        has_descr = true;
      } else if (key == "fortran_order") {
        ATTN_RETURN_IF_ERROR(ReadBool(fortran_order));
        has_order = true;
      } else if (key == "shape") {
        ATTN_RETURN_IF_ERROR(ReadShape(shape));
        has_shape = true;
      } else {
        return Error(absl::StrCat("unexpected key '", key, "'"));
      }
      SkipSpace();
      if (Peek() == ',') ++pos_;
    }
    ATTN_RETURN_IF_ERROR(Expect('}'));
    SkipSpace();
    if (pos_ != text_.size()) return Error("text after the closing '}'");
    if (!has_descr || !has_order || !has_shape) return Error("needs the keys 'descr', 'fortran_order' and 'shape'");
    return absl::OkStatus();
  }

 private:
  char Peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }
  void SkipSpace() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }
  absl::Status Error(absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat("malformed .npy header (", what, "): ", text_));
  }
  absl::Status Expect(char c) {
    SkipSpace();
    if (Peek() != c) return Error(absl::StrCat("expected '", std::string(1, c), "' at offset ", pos_));
    ++pos_;
    return absl::OkStatus();
  }
  absl::Status ReadString(std::string* out) {
    SkipSpace();
    const char quote = Peek();
    if (quote != '\'' && quote != '"') return Error(absl::StrCat("expected a string at offset ", pos_));
    const size_t end = text_.find(quote, pos_ + 1);
    if (end == absl::string_view::npos) return Error("unterminated string");
    *out = std::string(text_.substr(pos_ + 1, end - pos_ - 1));
    pos_ = end + 1;
    return absl::OkStatus();
  }
  absl::Status ReadBool(bool* out) {
    SkipSpace();
    for (const auto& [word, value] : {std::pair<absl::string_view, bool>{"True", true}, {"False", false}}) {
      if (text_.substr(pos_, word.size()) == word) {
        pos_ += word.size();
        *out = value;
        return absl::OkStatus();
      }
    }
    return Error(absl::StrCat("expected True or False at offset ", pos_));
  }
  absl::Status ReadShape(std::vector<int64_t>* shape) {
    shape->clear();
    ATTN_RETURN_IF_ERROR(Expect('('));
    while (true) {
      SkipSpace();
      if (Peek() == ')') break;
      if (!std::isdigit(static_cast<unsigned char>(Peek()))) {
        return Error(absl::StrCat("expected a dimension at offset ", pos_));
      }
      int64_t d = 0;
      while (std::isdigit(static_cast<unsigned char>(Peek()))) {
        if (d > (int64_t{1} << 50)) return Error("dimension too large");
        d = d * 10 + (text_[pos_++] - '0');
      }
      shape->push_back(d);
      SkipSpace();
      if (Peek() == ',') {
        ++pos_;
      } else if (Peek() != ')') {
        return Error(absl::StrCat("expected ',' or ')' at offset ", pos_));
      }
    }
    ++pos_;
    return absl::OkStatus();
  }

  absl::string_view text_;
  size_t pos_ = 0;
};

uint32_t ReadLittleEndian(absl::string_view bytes, size_t offset, size_t width) {
  uint32_t v = 0;
  for (size_t i = 0; i < width; ++i) v |= uint32_t{static_cast<unsigned char>(bytes[offset + i])} << (8 * i);
  return v;
}

std::string ShapeTuple(absl::Span<const int64_t> shape) {
  if (shape.size() == 1) return absl::StrCat("(", shape[0], ",)");
  return absl::StrCat("(", absl::StrJoin(shape, ", "), ")");
}

absl::StatusOr<std::string> Encode(absl::string_view descr, const void* data, size_t count, size_t item_size,
                                   absl::Span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return absl::InvalidArgumentError(absl::StrCat(".npy: negative dimension in shape ", ShapeTuple(shape)));
    n *= d;
  }
  if (static_cast<size_t>(n) != count) {
    return absl::InvalidArgumentError(
        absl::StrCat(".npy: ", count, " values given for shape ", ShapeTuple(shape), " (", n, ")"));
  }
  std::string header =
      absl::StrCat("{'descr': '", descr, "', 'fortran_order': False, 'shape': ", ShapeTuple(shape), ", }");
  const bool v2 = header.size() + 1 + kMagicSize + 4 > 65535;
  const size_t prefix = kMagicSize + 2 + (v2 ? 4 : 2);
  const size_t total = prefix + header.size() + 1;
  header.append((kHeaderAlignment - total % kHeaderAlignment) % kHeaderAlignment, ' ');
  header.push_back('\n');

  std::string out(kMagic, kMagicSize);
  out.push_back(static_cast<char>(v2 ? 2 : 1));
  out.push_back('\0');
  const uint32_t len = static_cast<uint32_t>(header.size());
  for (size_t i = 0; i < (v2 ? 4u : 2u); ++i) out.push_back(static_cast<char>((len >> (8 * i)) & 0xff));
  out += header;
  out.append(static_cast<const char*>(data), count * item_size);
  return out;
}

// The array's dtype from the header's descr; returns its item size.
absl::StatusOr<size_t> SetElementType(const std::string& descr, NpyArray* array) {
  if (descr == "<f4") {
    array->dtype = NpyArray::DType::kFloat32;
    return 4;
  }
  if (descr == "|b1") {
    array->dtype = NpyArray::DType::kBool;
    return 1;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      ".npy dtype '", descr,
      "' is not supported: use little-endian float32 ('<f4') or bool ('|b1'), e.g. arr.astype('<f4')"));
}

// The element count of `shape`, which must fill data_bytes exactly; overflow-safe (stops once the count
// exceeds what the data can hold).
absl::StatusOr<size_t> ElementCount(const std::vector<int64_t>& shape, size_t data_bytes, size_t item_size,
                                    const std::string& descr) {
  const size_t max_count = data_bytes / item_size;
  size_t count = 1;
  bool too_many = false;
  for (int64_t d : shape) {
    if (d == 0) count = 0;
  }
  for (int64_t d : shape) {
    if (count == 0 || too_many) break;
    if (static_cast<size_t>(d) > max_count / count) too_many = true;
    count *= static_cast<size_t>(d);
  }
  if (too_many || count * item_size != data_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(".npy data holds ", data_bytes, " bytes, not what shape ",
                                                   ShapeTuple(shape), " of '", descr, "' needs"));
  }
  return count;
}

}  // namespace

absl::StatusOr<NpyArray> ParseNpy(absl::string_view bytes) {
  if (bytes.size() < kMagicSize + 4 || bytes.substr(0, kMagicSize) != absl::string_view(kMagic, kMagicSize)) {
    return absl::InvalidArgumentError("not a .npy file (no \\x93NUMPY magic); save arrays with numpy.save");
  }
  const int major = static_cast<unsigned char>(bytes[6]);
  const int minor = static_cast<unsigned char>(bytes[7]);
  if ((major != 1 && major != 2) || minor != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(".npy format version ", major, ".", minor, " is not supported (1.0 and 2.0 are)"));
  }
  const size_t len_width = major == 1 ? 2 : 4;
  if (bytes.size() < kMagicSize + 2 + len_width) return absl::InvalidArgumentError("truncated .npy header");
  const size_t header_len = ReadLittleEndian(bytes, kMagicSize + 2, len_width);
  const size_t data_offset = kMagicSize + 2 + len_width + header_len;
  if (bytes.size() < data_offset) {
    return absl::InvalidArgumentError(
        absl::StrCat("truncated .npy header: ", header_len, " bytes announced, ", bytes.size(), " in the file"));
  }

  std::string descr;
  bool fortran_order = false;
  NpyArray array;
  HeaderParser parser(bytes.substr(kMagicSize + 2 + len_width, header_len));
  ATTN_RETURN_IF_ERROR(parser.Parse(&descr, &fortran_order, &array.shape));
  ATTN_ASSIGN_OR_RETURN(const size_t item_size, SetElementType(descr, &array));
  if (fortran_order) {
    return absl::InvalidArgumentError(
        ".npy array is in Fortran order: save np.ascontiguousarray(arr) for C (row-major) order");
  }

  const absl::string_view data = bytes.substr(data_offset);
  ATTN_ASSIGN_OR_RETURN(const size_t count, ElementCount(array.shape, data.size(), item_size, descr));
  if (array.dtype == NpyArray::DType::kFloat32) {
    array.floats.resize(count);
    if (count > 0) std::memcpy(array.floats.data(), data.data(), data.size());  // (no null pointers to memcpy)
  } else {
    array.bools.resize(count);
    for (size_t i = 0; i < count; ++i) array.bools[i] = data[i] != 0 ? 1 : 0;
  }
  return array;
}

absl::StatusOr<NpyArray> ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream contents;
  contents << in.rdbuf();
  auto array = ParseNpy(contents.str());
  if (!array.ok()) return absl::Status(array.status().code(), absl::StrCat(path, ": ", array.status().message()));
  return array;
}

absl::StatusOr<std::string> EncodeNpyFloat32(absl::Span<const float> values, absl::Span<const int64_t> shape) {
  return Encode("<f4", values.data(), values.size(), sizeof(float), shape);
}

absl::StatusOr<std::string> EncodeNpyBool(absl::Span<const uint8_t> values, absl::Span<const int64_t> shape) {
  std::vector<uint8_t> normalised(values.begin(), values.end());
  for (uint8_t& v : normalised) v = v != 0 ? 1 : 0;
  return Encode("|b1", normalised.data(), normalised.size(), 1, shape);
}

absl::Status WriteNpyFloat32(const std::string& path, absl::Span<const float> values,
                             absl::Span<const int64_t> shape) {
  auto bytes = EncodeNpyFloat32(values, shape);
  if (!bytes.ok()) return absl::Status(bytes.status().code(), absl::StrCat(path, ": ", bytes.status().message()));
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes->data(), static_cast<std::streamsize>(bytes->size()));
  out.close();
  if (!out) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot write"));
  return absl::OkStatus();
}

}  // namespace attnserve
