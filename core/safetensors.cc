#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <filesystem>
#include <optional>
#include <set>
#include <system_error>
#include <tuple>
#include <utility>

#include "absl/memory/memory.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/half_float.h"
#include "common/status_macros.h"
#include "core/tensor.h"
#include "nlohmann/json.hpp"

// The files are little-endian and are decoded with memcpy straight into host integers/floats.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors reader assumes a little-endian host");

namespace attnserve {
namespace {

using Json = nlohmann::json;

constexpr size_t kLengthPrefixBytes = 8;
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr char kMetadataKey[] = "__metadata__";

// A tensor's byte range in the data buffer, kept while validating the layout.
struct ByteRange {
  uint64_t begin = 0;
  uint64_t end = 0;
  SafetensorsEntry* entry = nullptr;  // a node of entries_ (stable address)
  const std::string& name() const { return entry->name; }
};

// Debian's abseil is built with its own absl::string_view (ABSL_OPTION_USE_STD_STRING_VIEW 0), so
// std::string_view must be converted before reaching StrCat.
absl::string_view ToAbsl(std::string_view text) { return absl::string_view(text.data(), text.size()); }

absl::Status Invalid(const std::string& source, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": ", message));
}

absl::Status InvalidTensor(const std::string& source, absl::string_view tensor, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": tensor '", tensor, "': ", message));
}

std::string Quoted(std::string_view name) { return absl::StrCat("'", ToAbsl(name), "'"); }

// A JSON value for an error message, cut short: a hostile header may hold megabytes in one value.
std::string Snippet(const Json& value) {
  constexpr size_t kMaxChars = 80;
  std::string text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (text.size() > kMaxChars) text = absl::StrCat(text.substr(0, kMaxChars), "...");
  return text;
}

uint64_t ReadLittleEndianU64(std::string_view bytes) {
  uint64_t value;
  std::memcpy(&value, bytes.data(), sizeof(value));
  return value;
}

// Checks the length prefix and returns the header's bytes.
absl::StatusOr<std::string_view> SplitHeader(std::string_view bytes, const std::string& source) {
  if (bytes.size() < kLengthPrefixBytes) {
    return Invalid(source, absl::StrCat("file is ", bytes.size(),
                                        " bytes, shorter than the 8-byte header length prefix"));
  }
  const uint64_t header_length = ReadLittleEndianU64(bytes);
  const uint64_t available = bytes.size() - kLengthPrefixBytes;
  if (header_length > available) {
    return Invalid(source, absl::StrCat("header length ", header_length, " exceeds the ", available,
                                        " bytes after the 8-byte prefix (file is ", bytes.size(),
                                        " bytes; truncated or corrupt)"));
  }
  if (header_length > kMaxHeaderBytes) {
    return Invalid(source, absl::StrCat("header length ", header_length, " exceeds the limit of ",
                                        kMaxHeaderBytes, " bytes"));
  }
  return bytes.substr(kLengthPrefixBytes, header_length);
}

// Parses the header as a JSON object. Duplicate top-level keys are rejected: nlohmann keeps only the last
// one, which would silently drop a tensor.
absl::StatusOr<Json> ParseHeaderJson(std::string_view header, const std::string& source) {
  if (header.empty() || header.front() != '{') {
    const std::string got = header.empty() ? "an empty header" : Quoted(header.substr(0, 1));
    return Invalid(source, absl::StrCat("header must be a JSON object starting with '{', got ", got));
  }
  // nlohmann's lexer treats a NUL byte as end of input, which would silently ignore the rest of the header.
  // NUL is never valid JSON (inside strings it must be escaped), so reject it here.
  if (const size_t nul = header.find('\0'); nul != std::string_view::npos) {
    return Invalid(source, absl::StrCat("header is not valid JSON: NUL byte at header offset ", nul));
  }
  std::string duplicate;
  bool has_duplicate = false;
  std::set<std::string> keys;
  auto on_event = [&](int depth, Json::parse_event_t event, Json& parsed) {
    if (event == Json::parse_event_t::key && depth == 1 && parsed.is_string() &&
        !keys.insert(parsed.get_ref<const std::string&>()).second && !has_duplicate) {
      has_duplicate = true;
      duplicate = parsed.get_ref<const std::string&>();
    }
    return true;
  };
  Json json;
  try {
    json = Json::parse(header.begin(), header.end(), on_event);
  } catch (const Json::exception& e) {  // parse errors (syntax, invalid UTF-8) must not escape
    return Invalid(source, absl::StrCat("header is not valid JSON: ", e.what()));
  }
  if (!json.is_object()) {
    return Invalid(source, absl::StrCat("header must be a JSON object, got ", json.type_name()));
  }
  if (has_duplicate) return Invalid(source, absl::StrCat("duplicate header key ", Quoted(duplicate)));
  return json;
}

absl::StatusOr<std::map<std::string, std::string>> ParseMetadata(const Json& value, const std::string& source) {
  std::map<std::string, std::string> metadata;
  if (value.is_null()) return metadata;  // the reference implementation accepts null (Option<HashMap>)
  if (!value.is_object()) {
    return Invalid(source, absl::StrCat("__metadata__ must be a map of string to string, got ",
                                        value.type_name()));
  }
  for (const auto& [key, item] : value.items()) {
    if (!item.is_string()) {
      return Invalid(source, absl::StrCat("__metadata__ key ", Quoted(key), ": value must be a string, got ",
                                          item.type_name()));
    }
    metadata.emplace(key, item.get<std::string>());
  }
  return metadata;
}

// A non-negative JSON integer as u64, or nullopt for anything else (floats, negatives, strings...).
std::optional<uint64_t> AsUnsigned(const Json& value) {
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  if (value.is_number_integer() && value.get<int64_t>() >= 0) return static_cast<uint64_t>(value.get<int64_t>());
  return std::nullopt;
}

absl::StatusOr<std::vector<int64_t>> ParseShape(const Json& value, const std::string& source,
                                                const std::string& name) {
  if (!value.is_array()) {
    return InvalidTensor(source, name, absl::StrCat("shape must be an array, got ", value.type_name()));
  }
  std::vector<int64_t> shape;
  for (size_t i = 0; i < value.size(); ++i) {
    const Json& dim = value[i];
    if (dim.is_number_integer() && !dim.is_number_unsigned() && dim.get<int64_t>() < 0) {
      return InvalidTensor(source, name, absl::StrCat("shape dim ", i, " is negative (", dim.get<int64_t>(),
                                                      "), expected >= 0"));
    }
    const std::optional<uint64_t> size = AsUnsigned(dim);
    if (!size.has_value()) {
      return InvalidTensor(source, name, absl::StrCat("shape dim ", i, " must be a non-negative integer, got ",
                                                      Snippet(dim)));
    }
    if (*size > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return InvalidTensor(source, name, absl::StrCat("shape dim ", i, " is ", *size, ", larger than int64"));
    }
    shape.push_back(static_cast<int64_t>(*size));
  }
  return shape;
}

// numel(shape) * dtype_size, or an error when either product overflows.
absl::StatusOr<uint64_t> ExpectedByteCount(const std::vector<int64_t>& shape, size_t dtype_size,
                                           const std::string& source, const std::string& name) {
  int64_t numel = 1;
  for (int64_t dim : shape) {
    if (__builtin_mul_overflow(numel, dim, &numel)) {
      return InvalidTensor(source, name,
                           absl::StrCat("shape ", ShapeToString(shape), " has more elements than fit in int64"));
    }
  }
  uint64_t num_bytes;
  if (__builtin_mul_overflow(static_cast<uint64_t>(numel), static_cast<uint64_t>(dtype_size), &num_bytes)) {
    return InvalidTensor(source, name, absl::StrCat("shape ", ShapeToString(shape), " x ", dtype_size,
                                                    "-byte elements overflows a 64-bit byte count"));
  }
  return num_bytes;
}

absl::StatusOr<ByteRange> ParseOffsets(const Json& value, const std::string& source, const std::string& name) {
  if (!value.is_array() || value.size() != 2) {
    return InvalidTensor(source, name, absl::StrCat("data_offsets must be [begin, end], got ", Snippet(value)));
  }
  const std::optional<uint64_t> begin = AsUnsigned(value[0]);
  const std::optional<uint64_t> end = AsUnsigned(value[1]);
  if (!begin.has_value() || !end.has_value()) {
    return InvalidTensor(source, name, absl::StrCat("data_offsets must be two non-negative integers, got ",
                                                    Snippet(value)));
  }
  if (*begin > *end) {
    return InvalidTensor(source, name, absl::StrCat("data_offsets begin ", *begin, " is after end ", *end));
  }
  return ByteRange{*begin, *end, nullptr};
}

const Json* FindField(const Json& object, const char* key) {
  auto it = object.find(key);
  return it == object.end() ? nullptr : &*it;
}

// Validates one header entry (everything except its position among the others). `entry.data` is left null
// until the layout is known to fit in the buffer.
absl::StatusOr<SafetensorsEntry> ParseEntry(const std::string& name, const Json& value, const std::string& source,
                                            ByteRange* range) {
  if (!value.is_object()) {
    return InvalidTensor(source, name, absl::StrCat("entry must be an object, got ", value.type_name()));
  }
  const Json* dtype = FindField(value, "dtype");
  const Json* shape_json = FindField(value, "shape");
  const Json* offsets = FindField(value, "data_offsets");
  if (dtype == nullptr) return InvalidTensor(source, name, "missing \"dtype\"");
  if (shape_json == nullptr) return InvalidTensor(source, name, "missing \"shape\"");
  if (offsets == nullptr) return InvalidTensor(source, name, "missing \"data_offsets\"");
  if (!dtype->is_string()) {
    return InvalidTensor(source, name, absl::StrCat("dtype must be a string, got ", dtype->type_name()));
  }
  SafetensorsEntry entry;
  entry.name = name;
  entry.dtype = dtype->get<std::string>();
  const size_t dtype_size = SafetensorsDtypeSize(entry.dtype);
  if (dtype_size == 0) return InvalidTensor(source, name, absl::StrCat("unknown dtype \"", entry.dtype, "\""));
  ATTN_ASSIGN_OR_RETURN(entry.shape, ParseShape(*shape_json, source, name));
  ATTN_ASSIGN_OR_RETURN(const uint64_t expected_bytes, ExpectedByteCount(entry.shape, dtype_size, source, name));
  ATTN_ASSIGN_OR_RETURN(*range, ParseOffsets(*offsets, source, name));
  const uint64_t span = range->end - range->begin;
  if (span != expected_bytes) {
    return InvalidTensor(source, name, absl::StrCat("data_offsets span ", span, " bytes, expected ",
                                                    expected_bytes, " (shape ", ShapeToString(entry.shape),
                                                    " x ", entry.dtype, ")"));
  }
  entry.num_bytes = static_cast<size_t>(span);
  return entry;
}

// The ranges, sorted (in place), must cover [0, buffer_size) exactly once.
absl::Status CheckTiling(std::vector<ByteRange>* ranges_ptr, uint64_t buffer_size, const std::string& source) {
  std::vector<ByteRange>& ranges = *ranges_ptr;
  std::sort(ranges.begin(), ranges.end(), [](const ByteRange& a, const ByteRange& b) {
    return std::tie(a.begin, a.end, a.name()) < std::tie(b.begin, b.end, b.name());
  });
  uint64_t expected_begin = 0;
  const ByteRange* previous = nullptr;
  for (const ByteRange& range : ranges) {
    if (range.begin > expected_begin) {
      const std::string where =
          previous == nullptr
              ? absl::StrCat("before the first tensor ", Quoted(range.name()), " [", range.begin, ", ",
                             range.end, ")")
              : absl::StrCat("between tensors ", Quoted(previous->name()), " [", previous->begin, ", ",
                             previous->end, ") and ", Quoted(range.name()), " [", range.begin, ", ", range.end,
                             ")");
      return Invalid(source, absl::StrCat("gap of ", range.begin - expected_begin, " bytes in the data buffer ",
                                          where));
    }
    if (range.begin < expected_begin) {  // only reachable with a previous tensor
      return Invalid(source, absl::StrCat("tensors ", Quoted(previous->name()), " [", previous->begin, ", ",
                                          previous->end, ") and ", Quoted(range.name()), " [", range.begin, ", ",
                                          range.end, ") overlap"));
    }
    if (range.end > buffer_size) {
      return InvalidTensor(source, range.name(),
                           absl::StrCat("data_offsets [", range.begin, ", ", range.end,
                                        ") extend past the end of the ", buffer_size,
                                        "-byte data buffer (file truncated?)"));
    }
    expected_begin = range.end;
    previous = &range;
  }
  if (expected_begin < buffer_size) {
    const std::string after = previous == nullptr ? std::string("with no tensors")
                                                  : absl::StrCat("after the last tensor ", Quoted(previous->name()));
    return Invalid(source, absl::StrCat(buffer_size - expected_begin, " trailing bytes in the data buffer ", after,
                                        " (data buffer is ", buffer_size, " bytes, tensors cover ",
                                        expected_begin, ")"));
  }
  return absl::OkStatus();
}

std::string DtypeError(const SafetensorsEntry& entry, const std::string& source, absl::string_view supported) {
  return absl::StrCat(source, ": tensor ", Quoted(entry.name), " has dtype ", entry.dtype, "; expected one of ",
                      supported);
}

// Decodes `count` little-endian elements of type T from possibly unaligned memory, each converted to Out.
template <typename T, typename Out = float, typename Convert>
std::vector<Out> ConvertEach(const uint8_t* data, size_t count, Convert convert) {
  std::vector<Out> out(count);
  for (size_t i = 0; i < count; ++i) {
    T raw;
    std::memcpy(&raw, data + i * sizeof(T), sizeof(T));
    out[i] = convert(raw);
  }
  return out;
}

}  // namespace

size_t SafetensorsDtypeSize(std::string_view dtype) {
  static constexpr std::pair<std::string_view, size_t> kSizes[] = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"I16", 2}, {"U16", 2},
      {"F16", 2},  {"BF16", 2}, {"I32", 4}, {"U32", 4},     {"F32", 4},     {"F64", 8}, {"I64", 8},
      {"U64", 8},
  };
  for (const auto& [name, size] : kSizes) {
    if (name == dtype) return size;
  }
  return 0;
}

int64_t SafetensorsEntry::num_elements() const { return NumElements(shape); }

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(path, error);
  if (status.type() == std::filesystem::file_type::not_found) {
    return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  }
  if (error) return absl::InvalidArgumentError(absl::StrCat(path, ": cannot stat: ", error.message()));
  if (status.type() != std::filesystem::file_type::regular) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::InvalidArgumentError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  struct stat st {};
  const bool sized = ::fstat(fd, &st) == 0;
  const size_t size = sized ? static_cast<size_t>(st.st_size) : 0;
  // Mapped, not read: a layer's tensors are read from the pages they occupy, so loading one layer of a
  // multi-GiB checkpoint touches that layer's bytes and the header, not the rest of the file.
  void* map = sized && size > 0 ? ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0) : nullptr;
  const int map_errno = errno;
  ::close(fd);
  if (!sized) return absl::InvalidArgumentError(absl::StrCat(path, ": cannot determine file size"));
  if (map == MAP_FAILED) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot map ", size, " bytes: ", std::strerror(map_errno)));
  }
  auto file = absl::WrapUnique(new SafetensorsFile());
  file->source_ = path;
  file->map_ = map;
  file->map_bytes_ = size;
  if (map != nullptr) ::madvise(map, size, MADV_RANDOM);  // no read-ahead past the tensors asked for
  const std::string_view all(static_cast<const char*>(map), map == nullptr ? 0 : size);
  ATTN_RETURN_IF_ERROR(file->Index(all));
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Parse(std::string bytes,
                                                                         const std::string& source) {
  // The bytes move into the object first: entries point into bytes_, which must not move afterwards.
  auto file = absl::WrapUnique(new SafetensorsFile());
  file->source_ = source;
  file->bytes_ = std::move(bytes);
  ATTN_RETURN_IF_ERROR(file->Index(file->bytes_));
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_bytes_);
}

absl::Status SafetensorsFile::Index(std::string_view all) {
  const std::string& source = source_;
  ATTN_ASSIGN_OR_RETURN(const std::string_view header, SplitHeader(all, source));
  ATTN_ASSIGN_OR_RETURN(const Json json, ParseHeaderJson(header, source));
  const size_t data_start = kLengthPrefixBytes + header.size();
  const uint64_t buffer_size = all.size() - data_start;

  std::vector<ByteRange> ranges;
  for (const auto& [name, value] : json.items()) {
    if (name == kMetadataKey) {
      ATTN_ASSIGN_OR_RETURN(metadata_, ParseMetadata(value, source));
      continue;
    }
    ByteRange range;
    ATTN_ASSIGN_OR_RETURN(SafetensorsEntry entry, ParseEntry(name, value, source, &range));
    // JSON object keys are unique (duplicates were rejected), so this always inserts.
    range.entry = &entries_.emplace(name, std::move(entry)).first->second;
    ranges.push_back(range);
  }
  ATTN_RETURN_IF_ERROR(CheckTiling(&ranges, buffer_size, source));

  // Only now is every range known to lie inside the buffer.
  const auto* data = reinterpret_cast<const uint8_t*>(all.data()) + data_start;
  for (const ByteRange& range : ranges) range.entry->data = data + range.begin;
  return absl::OkStatus();
}

const SafetensorsEntry* SafetensorsFile::Find(std::string_view name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

std::vector<std::string> SafetensorsFile::Names() const {
  std::vector<std::string> names;
  names.reserve(entries_.size());
  for (const auto& [name, entry] : entries_) names.push_back(name);
  return names;
}

absl::StatusOr<const SafetensorsEntry*> SafetensorsFile::FindFloating(std::string_view name) const {
  const SafetensorsEntry* entry = Find(name);
  if (entry == nullptr) return absl::NotFoundError(absl::StrCat(source_, ": tensor ", Quoted(name), " not found"));
  for (const char* dtype : {"F32", "F16", "BF16", "F64"}) {
    if (entry->dtype == dtype) return entry;
  }
  return absl::InvalidArgumentError(DtypeError(*entry, source_, "F32, F16, BF16, F64"));
}

absl::StatusOr<std::vector<float>> SafetensorsFile::ReadFloat32(std::string_view name) const {
  ATTN_ASSIGN_OR_RETURN(const SafetensorsEntry* entry, FindFloating(name));
  const size_t count = entry->num_bytes / SafetensorsDtypeSize(entry->dtype);
  AdvisePages(*entry, MADV_SEQUENTIAL);  // read ahead within this tensor (the file is MADV_RANDOM)
  std::vector<float> out;
  if (entry->dtype == "F32") {
    out = ConvertEach<float>(entry->data, count, [](float v) { return v; });
  } else if (entry->dtype == "F16") {
    out = ConvertEach<uint16_t>(entry->data, count, HalfToFloat);
  } else if (entry->dtype == "BF16") {
    out = ConvertEach<uint16_t>(entry->data, count, BFloat16ToFloat);
  } else {
    // Out-of-range doubles become +-inf (IEEE conversion).
    out = ConvertEach<double>(entry->data, count, [](double v) { return static_cast<float>(v); });
  }
  // Unmodified pages of a private file mapping: dropped, read again from the file if touched again.
  AdvisePages(*entry, MADV_DONTNEED);
  AdvisePages(*entry, MADV_RANDOM);
  return out;
}

absl::StatusOr<std::vector<uint16_t>> SafetensorsFile::ReadBFloat16(std::string_view name) const {
  ATTN_ASSIGN_OR_RETURN(const SafetensorsEntry* entry, FindFloating(name));
  const size_t count = entry->num_bytes / SafetensorsDtypeSize(entry->dtype);
  AdvisePages(*entry, MADV_SEQUENTIAL);
  std::vector<uint16_t> out;
  if (entry->dtype == "BF16") {
    out.resize(count);
    std::memcpy(out.data(), entry->data, count * sizeof(uint16_t));  // little-endian, as ConvertEach
  } else if (entry->dtype == "F32") {
    out = ConvertEach<float, uint16_t>(entry->data, count, FloatToBFloat16);
  } else if (entry->dtype == "F16") {
    out =
        ConvertEach<uint16_t, uint16_t>(entry->data, count, [](uint16_t v) { return FloatToBFloat16(HalfToFloat(v)); });
  } else {
    out = ConvertEach<double, uint16_t>(entry->data, count,
                                        [](double v) { return FloatToBFloat16(static_cast<float>(v)); });
  }
  AdvisePages(*entry, MADV_DONTNEED);
  AdvisePages(*entry, MADV_RANDOM);
  return out;
}

void SafetensorsFile::AdvisePages(const SafetensorsEntry& entry, int advice) const {
  if (map_ == nullptr) return;
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(entry.data), end = begin + entry.num_bytes;
  const uintptr_t first = (begin + page - 1) / page * page, last = end / page * page;
  if (first < last) ::madvise(reinterpret_cast<void*>(first), last - first, advice);
}

absl::StatusOr<std::vector<uint8_t>> SafetensorsFile::ReadBool(std::string_view name) const {
  const SafetensorsEntry* entry = Find(name);
  if (entry == nullptr) return absl::NotFoundError(absl::StrCat(source_, ": tensor ", Quoted(name), " not found"));
  if (entry->dtype != "BOOL" && entry->dtype != "U8") {
    return absl::InvalidArgumentError(DtypeError(*entry, source_, "BOOL, U8"));
  }
  std::vector<uint8_t> out(entry->num_bytes);
  for (size_t i = 0; i < out.size(); ++i) out[i] = entry->data[i] != 0 ? 1 : 0;
  return out;
}

}  // namespace attnserve
