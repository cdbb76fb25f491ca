#include "core/safetensors.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/half_float.h"
#include "gtest/gtest.h"
#include "tests/testing/safetensors_writer.h"

namespace attnserve {
namespace {

using ::attnserve::testing::FloatTensor;
using ::attnserve::testing::SerializeSafetensors;
using ::attnserve::testing::TensorToWrite;

constexpr char kSource[] = "corrupt.safetensors";

float BitsToFloat(uint32_t bits) { return __builtin_bit_cast(float, bits); }
uint32_t FloatToBits(float value) { return __builtin_bit_cast(uint32_t, value); }

bool IsHalfNaN(uint16_t bits) { return (bits & 0x7C00) == 0x7C00 && (bits & 0x3FF) != 0; }
bool IsBFloat16NaN(uint16_t bits) { return (bits & 0x7F80) == 0x7F80 && (bits & 0x7F) != 0; }

// Random non-zero values in [-4, -1/64] u [1/64, 4], so a reader that returns zeros cannot pass.
std::vector<float> RandomFloats(size_t count, std::mt19937* rng) {
  std::uniform_real_distribution<float> magnitude(1.0f / 64, 4.0f);
  std::bernoulli_distribution negative(0.5);
  std::vector<float> values(count);
  for (float& v : values) v = negative(*rng) ? -magnitude(*rng) : magnitude(*rng);
  return values;
}

template <typename T>
std::vector<uint8_t> RawBytes(const std::vector<T>& values) {
  std::vector<uint8_t> bytes(values.size() * sizeof(T));
  std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

// [u64 length][header][data], built by hand so tests control every byte.
std::string RawFile(const std::string& header, const std::string& data = "") {
  std::string file(8, '\0');
  const uint64_t length = header.size();
  std::memcpy(file.data(), &length, sizeof(length));
  return file + header + data;
}

std::string WithHeaderLength(std::string file, uint64_t length) {
  std::memcpy(file.data(), &length, sizeof(length));
  return file;
}

// Expects Parse(bytes) to fail with InvalidArgument whose message names the source and every fragment.
::testing::AssertionResult FailsWith(const std::string& bytes, const std::vector<std::string>& fragments) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Parse(bytes, kSource);
  if (file.ok()) return ::testing::AssertionFailure() << "parsed successfully";
  const absl::Status& status = file.status();
  if (status.code() != absl::StatusCode::kInvalidArgument) {
    return ::testing::AssertionFailure() << "wrong code: " << status;
  }
  const std::string message(status.message());
  if (message.find(kSource) == std::string::npos) {
    return ::testing::AssertionFailure() << "message lacks the source: " << message;
  }
  for (const std::string& fragment : fragments) {
    if (message.find(fragment) == std::string::npos) {
      return ::testing::AssertionFailure() << "message lacks \"" << fragment << "\": " << message;
    }
  }
  return ::testing::AssertionSuccess() << message;
}

// The tensor's values, or a test failure (and nothing) when reading fails.
std::vector<float> Floats(const SafetensorsFile& file, std::string_view name) {
  absl::StatusOr<std::vector<float>> values = file.ReadFloat32(name);
  if (!values.ok()) {
    ADD_FAILURE() << values.status();
    return {};
  }
  return *std::move(values);
}

std::vector<uint8_t> Bools(const SafetensorsFile& file, std::string_view name) {
  absl::StatusOr<std::vector<uint8_t>> values = file.ReadBool(name);
  if (!values.ok()) {
    ADD_FAILURE() << values.status();
    return {};
  }
  return *std::move(values);
}

std::string TempPath(const std::string& name) {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  return absl::StrCat(::testing::TempDir(), "safetensors_test_", info->name(), "_", name);
}

// ---------------------------------------------------------------------------------------------------------
// Half / bfloat16 conversions.

TEST(HalfFloatTest, KnownValues) {
  EXPECT_EQ(HalfToFloat(0x3C00), 1.0f);
  EXPECT_EQ(FloatToHalf(1.0f), 0x3C00);
  EXPECT_EQ(HalfToFloat(0xC100), -2.5f);
  EXPECT_EQ(FloatToHalf(-2.5f), 0xC100);
  EXPECT_EQ(HalfToFloat(0x7BFF), 65504.0f);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7BFF);
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(HalfToFloat(0x03FF), std::ldexp(1023.0f, -24));  // largest subnormal
  EXPECT_EQ(HalfToFloat(0x0400), std::ldexp(1.0f, -14));     // smallest normal
  EXPECT_EQ(HalfToFloat(0x7C00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(HalfToFloat(0xFC00), -std::numeric_limits<float>::infinity());
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(FloatToHalf(-std::numeric_limits<float>::infinity()), 0xFC00);
  EXPECT_EQ(FloatToBits(HalfToFloat(0x8000)), 0x80000000u);  // -0 keeps its sign
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7E00)));
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7C01)));  // signalling NaN with a one-bit payload
  EXPECT_TRUE(IsHalfNaN(FloatToHalf(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(IsHalfNaN(FloatToHalf(BitsToFloat(0x7F800001u))));  // payload only in bits dropped by truncation
}

TEST(HalfFloatTest, RoundingOverflowAndUnderflow) {
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3C00);      // tie -> even (1.0)
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);  // tie -> even (up)
  EXPECT_EQ(FloatToHalf(65519.0f), 0x7BFF);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7C00);  // tie between 65504 (odd) and 2^16 -> inf
  EXPECT_EQ(FloatToHalf(1e10f), 0x7C00);
  EXPECT_EQ(FloatToHalf(-1e10f), 0xFC00);
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::max()), 0x7C00);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25)), 0x0000);  // tie between 0 and 2^-24 -> 0
  EXPECT_EQ(FloatToHalf(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  EXPECT_EQ(FloatToHalf(3 * std::ldexp(1.0f, -25)), 0x0002);  // tie between 1 and 2 ulps -> 2
  EXPECT_EQ(FloatToHalf(std::ldexp(1023.5f, -24)), 0x0400);   // largest subnormal rounds up into normals
  EXPECT_EQ(FloatToHalf(1e-30f), 0x0000);
  EXPECT_EQ(FloatToHalf(-1e-30f), 0x8000);
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::denorm_min()), 0x0000);
}

TEST(HalfFloatTest, ExhaustiveRoundTrip) {
  for (uint32_t b = 0; b <= 0xFFFF; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    const float value = HalfToFloat(bits);
    if (IsHalfNaN(bits)) {
      ASSERT_TRUE(std::isnan(value)) << std::hex << b;
      ASSERT_TRUE(IsHalfNaN(FloatToHalf(value))) << std::hex << b;
      continue;
    }
    ASSERT_EQ(HalfToFloat(FloatToHalf(value)), value) << std::hex << b;
    ASSERT_EQ(FloatToHalf(value), bits) << std::hex << b;  // bit-exact, including -0
  }
}

// For every pair of adjacent non-negative halves: the midpoint goes to the even one, and the floats just
// either side of it go to the nearer one. Covers subnormals, normals and the overflow to inf.
TEST(HalfFloatTest, ExhaustiveTiesToEven) {
  for (uint16_t lo = 0; lo < 0x7C00; ++lo) {
    const uint16_t hi = static_cast<uint16_t>(lo + 1);
    // Past 65504 the next step would be 2^16, which does not exist and is where inf takes over.
    const float hi_value = hi == 0x7C00 ? 65536.0f : HalfToFloat(hi);
    const float mid = (HalfToFloat(lo) + hi_value) / 2;  // exact: 12 significant bits
    ASSERT_EQ(FloatToHalf(mid), (lo % 2 == 0) ? lo : hi) << std::hex << lo;
    ASSERT_EQ(FloatToHalf(std::nextafter(mid, 0.0f)), lo) << std::hex << lo;
    ASSERT_EQ(FloatToHalf(std::nextafter(mid, 1e6f)), hi) << std::hex << lo;
    ASSERT_EQ(FloatToHalf(-mid), static_cast<uint16_t>(FloatToHalf(mid) | 0x8000)) << std::hex << lo;
  }
}

TEST(BFloat16Test, KnownValuesAndRounding) {
  EXPECT_EQ(BFloat16ToFloat(0x3F80), 1.0f);
  EXPECT_EQ(FloatToBFloat16(1.0f), 0x3F80);
  EXPECT_EQ(BFloat16ToFloat(0xC020), -2.5f);
  EXPECT_EQ(FloatToBFloat16(-2.5f), 0xC020);
  EXPECT_EQ(FloatToBFloat16(1.0f + std::ldexp(1.0f, -8)), 0x3F80);      // tie -> even
  EXPECT_EQ(FloatToBFloat16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);  // tie -> even (up)
  EXPECT_EQ(FloatToBFloat16(std::numeric_limits<float>::max()), 0x7F80);  // rounds to inf
  EXPECT_EQ(FloatToBFloat16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(FloatToBFloat16(-std::numeric_limits<float>::infinity()), 0xFF80);
  EXPECT_TRUE(IsBFloat16NaN(FloatToBFloat16(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(IsBFloat16NaN(FloatToBFloat16(BitsToFloat(0x7F800001u))));  // truncation would give inf
  EXPECT_TRUE(IsBFloat16NaN(FloatToBFloat16(BitsToFloat(0xFFFFFFFFu))));  // rounding must not carry out
}

TEST(BFloat16Test, ExhaustiveRoundTrip) {
  for (uint32_t b = 0; b <= 0xFFFF; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    const float value = BFloat16ToFloat(bits);
    if (IsBFloat16NaN(bits)) {
      ASSERT_TRUE(std::isnan(value)) << std::hex << b;
      ASSERT_TRUE(IsBFloat16NaN(FloatToBFloat16(value))) << std::hex << b;
      continue;
    }
    ASSERT_EQ(FloatToBFloat16(value), bits) << std::hex << b;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Reading well-formed files.

TEST(SafetensorsDtypeSizeTest, SpecNames) {
  EXPECT_EQ(SafetensorsDtypeSize("BOOL"), 1u);
  EXPECT_EQ(SafetensorsDtypeSize("F8_E5M2"), 1u);
  EXPECT_EQ(SafetensorsDtypeSize("BF16"), 2u);
  EXPECT_EQ(SafetensorsDtypeSize("F32"), 4u);
  EXPECT_EQ(SafetensorsDtypeSize("I64"), 8u);
  EXPECT_EQ(SafetensorsDtypeSize("F64"), 8u);
  EXPECT_EQ(SafetensorsDtypeSize("f32"), 0u);
  EXPECT_EQ(SafetensorsDtypeSize(""), 0u);
}

TEST(SafetensorsTest, RoundTripAllDtypesThroughAFile) {
  std::mt19937 rng(1234);
  const std::vector<float> f32 = RandomFloats(15, &rng);
  const std::vector<float> f16 = RandomFloats(8, &rng);
  const std::vector<float> bf16 = RandomFloats(6, &rng);
  const std::vector<float> f64_as_float = RandomFloats(5, &rng);
  std::vector<double> f64;
  for (float v : f64_as_float) f64.push_back(static_cast<double>(v) + 1e-12);  // not exactly a float
  std::vector<uint8_t> u8(10);
  for (uint8_t& v : u8) v = static_cast<uint8_t>(rng() % 256);
  u8[0] = 0;  // make sure both outcomes occur
  u8[1] = 200;
  const std::vector<uint8_t> bools = {1, 0, 1, 1, 0, 1};

  std::map<std::string, TensorToWrite> tensors;
  tensors["a.f32"] = FloatTensor(f32, {3, 5});
  tensors["b.f16"] = FloatTensor(f16, {4, 2}, "F16");
  tensors["c.bf16"] = FloatTensor(bf16, {2, 3}, "BF16");
  tensors["d.f64"] = TensorToWrite{"F64", {5}, RawBytes(f64)};
  tensors["e.bool"] = TensorToWrite{"BOOL", {2, 3}, bools};
  tensors["f.u8"] = TensorToWrite{"U8", {10}, u8};
  tensors["g.empty"] = TensorToWrite{"F32", {0, 4}, {}};
  tensors["h.scalar"] = FloatTensor({f32[0]}, {});
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "round trip"}};
  const std::string path = TempPath("model.safetensors");
  ASSERT_TRUE(testing::WriteFile(path, SerializeSafetensors(tensors, metadata)).ok());

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> opened = SafetensorsFile::Open(path);
  ASSERT_TRUE(opened.ok()) << opened.status();
  const SafetensorsFile& file = **opened;
  EXPECT_EQ(file.source(), path);
  EXPECT_EQ(file.metadata(), metadata);
  EXPECT_EQ(file.Names(), (std::vector<std::string>{"a.f32", "b.f16", "c.bf16", "d.f64", "e.bool", "f.u8",
                                                     "g.empty", "h.scalar"}));

  const SafetensorsEntry* a = file.Find("a.f32");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->name, "a.f32");
  EXPECT_EQ(a->dtype, "F32");
  EXPECT_EQ(a->shape, (std::vector<int64_t>{3, 5}));
  EXPECT_EQ(a->num_elements(), 15);
  EXPECT_EQ(a->num_bytes, 60u);
  EXPECT_EQ(Floats(file, "a.f32"), f32);

  std::vector<float> expected_f16, expected_bf16, expected_f64;
  for (float v : f16) expected_f16.push_back(HalfToFloat(FloatToHalf(v)));
  for (float v : bf16) expected_bf16.push_back(BFloat16ToFloat(FloatToBFloat16(v)));
  for (double v : f64) expected_f64.push_back(static_cast<float>(v));
  EXPECT_EQ(Floats(file, "b.f16"), expected_f16);
  EXPECT_EQ(Floats(file, "c.bf16"), expected_bf16);
  EXPECT_EQ(Floats(file, "d.f64"), expected_f64);
  EXPECT_EQ(Bools(file, "e.bool"), bools);
  std::vector<uint8_t> expected_u8;
  for (uint8_t v : u8) expected_u8.push_back(v != 0 ? 1 : 0);
  EXPECT_EQ(Bools(file, "f.u8"), expected_u8);

  const SafetensorsEntry* empty = file.Find("g.empty");
  ASSERT_NE(empty, nullptr);
  EXPECT_EQ(empty->num_elements(), 0);
  EXPECT_EQ(empty->num_bytes, 0u);
  EXPECT_TRUE(Floats(file, "g.empty").empty());
  EXPECT_EQ(file.Find("h.scalar")->num_elements(), 1);
  EXPECT_EQ(Floats(file, "h.scalar"), std::vector<float>{f32[0]});
}

TEST(SafetensorsTest, ReadsUnalignedData) {
  std::mt19937 rng(99);
  const std::vector<float> f32 = RandomFloats(7, &rng);
  const std::vector<float> f16 = RandomFloats(3, &rng);
  const std::vector<double> f64 = {1.5, -3.25, 1e300};  // 1e300 overflows f32
  std::vector<uint16_t> f16_bits;
  for (float v : f16) f16_bits.push_back(FloatToHalf(v));
  std::string data;
  for (const std::vector<uint8_t>& part : {RawBytes(f32), RawBytes(f16_bits), RawBytes(f64)}) {
    data.append(part.begin(), part.end());
  }
  std::string header =
      R"({"x":{"dtype":"F32","shape":[7],"data_offsets":[0,28]},)"
      R"("y":{"dtype":"F16","shape":[3],"data_offsets":[28,34]},)"
      R"("z":{"dtype":"F64","shape":[3],"data_offsets":[34,58]}})";
  while ((8 + header.size()) % 8 != 3) header += ' ';  // the data starts at an odd offset
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Parse(RawFile(header, data));
  ASSERT_TRUE(file.ok()) << file.status();

  const SafetensorsEntry* x = (*file)->Find("x");
  ASSERT_NE(x, nullptr);
  EXPECT_NE(reinterpret_cast<uintptr_t>(x->data) % alignof(float), 0u);
  EXPECT_EQ(Floats(**file, "x"), f32);
  std::vector<float> expected_f16;
  for (uint16_t bits : f16_bits) expected_f16.push_back(HalfToFloat(bits));
  EXPECT_EQ(Floats(**file, "y"), expected_f16);
  EXPECT_EQ(Floats(**file, "z"),
            (std::vector<float>{1.5f, -3.25f, std::numeric_limits<float>::infinity()}));
}

TEST(SafetensorsTest, EmptyHeaderAndOnlyMetadataAreValid) {
  EXPECT_TRUE(SafetensorsFile::Parse(RawFile("{}")).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Parse(RawFile(R"({"__metadata__":{"k":"v"}}   )"));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->Names().empty());
  EXPECT_EQ((*file)->metadata().at("k"), "v");
}

TEST(SafetensorsTest, FindAbsentAndWrongDtypeReads) {
  std::mt19937 rng(7);
  std::map<std::string, TensorToWrite> tensors;
  tensors["mask"] = TensorToWrite{"BOOL", {3}, {1, 0, 1}};
  tensors["weight"] = FloatTensor(RandomFloats(4, &rng), {2, 2});
  tensors["ids"] = TensorToWrite{"I32", {1}, {1, 2, 3, 4}};
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Parse(SerializeSafetensors(tensors), "model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();

  EXPECT_EQ((*file)->Find("absent"), nullptr);
  EXPECT_EQ((*file)->Find(""), nullptr);
  const absl::Status absent = (*file)->ReadFloat32("absent").status();
  EXPECT_EQ(absent.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(absent.message().find("'absent'"), std::string::npos) << absent;

  for (const absl::Status& status : {(*file)->ReadFloat32("mask").status(), (*file)->ReadBool("weight").status(),
                                     (*file)->ReadFloat32("ids").status()}) {
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_NE(status.message().find("model.safetensors"), std::string::npos) << status;
  }
  const absl::Status wrong = (*file)->ReadFloat32("mask").status();
  EXPECT_NE(wrong.message().find("'mask'"), std::string::npos) << wrong;
  EXPECT_NE(wrong.message().find("BOOL"), std::string::npos) << wrong;
}

TEST(SafetensorsTest, OpenMissingFileIsNotFound) {
  const std::string path = TempPath("does_not_exist.safetensors");
  const absl::Status status = SafetensorsFile::Open(path).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound) << status;
  EXPECT_NE(status.message().find(path), std::string::npos) << status;
}

TEST(SafetensorsTest, OpenCorruptFileNamesThePath) {
  const std::string path = TempPath("bad.safetensors");
  ASSERT_TRUE(testing::WriteFile(path, "1234567").ok());
  const absl::Status status = SafetensorsFile::Open(path).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_NE(status.message().find(path), std::string::npos) << status;
}

// ---------------------------------------------------------------------------------------------------------
// Corrupted files: each must give InvalidArgument naming what is wrong.

// Two F32 tensors, "a" [2] and "b" [3], as a valid file.
std::string ValidTwoTensorFile() {
  std::mt19937 rng(5);
  std::map<std::string, TensorToWrite> tensors;
  tensors["a"] = FloatTensor(RandomFloats(2, &rng), {2});
  tensors["b"] = FloatTensor(RandomFloats(3, &rng), {3});
  return SerializeSafetensors(tensors, {{"format", "pt"}});
}

uint64_t HeaderLength(const std::string& file) {
  uint64_t length;
  std::memcpy(&length, file.data(), sizeof(length));
  return length;
}

TEST(SafetensorsCorruptTest, TooShortForTheLengthPrefix) {
  EXPECT_TRUE(FailsWith("", {"0 bytes", "8-byte"}));
  EXPECT_TRUE(FailsWith("1234567", {"7 bytes", "8-byte"}));
}

TEST(SafetensorsCorruptTest, Truncated) {
  const std::string valid = ValidTwoTensorFile();
  ASSERT_TRUE(SafetensorsFile::Parse(valid).ok());
  // Cut in the data region: the last tensor ("b", name order) now runs past the end.
  EXPECT_TRUE(FailsWith(valid.substr(0, valid.size() - 3), {"'b'", "past the end"}));
  // Cut in the header.
  const uint64_t n = HeaderLength(valid);
  EXPECT_TRUE(FailsWith(valid.substr(0, 8 + n / 2), {absl::StrCat("header length ", n), "exceeds"}));
}

TEST(SafetensorsCorruptTest, HeaderLengthBeyondTheFile) {
  const std::string valid = ValidTwoTensorFile();
  EXPECT_TRUE(FailsWith(WithHeaderLength(valid, valid.size()), {absl::StrCat("header length ", valid.size())}));
  EXPECT_TRUE(FailsWith(WithHeaderLength(valid, uint64_t{1} << 63), {"header length 9223372036854775808"}));
  EXPECT_TRUE(FailsWith(WithHeaderLength(valid, ~uint64_t{0}), {"header length 18446744073709551615"}));
}

TEST(SafetensorsCorruptTest, HeaderLengthAboveTheLimit) {
  const std::string big = RawFile("{}" + std::string(100'000'001 - 2, ' '));
  EXPECT_TRUE(FailsWith(big, {"header length 100000001", "limit"}));
}

TEST(SafetensorsCorruptTest, HeaderNotAJsonObject) {
  EXPECT_TRUE(FailsWith(RawFile("{this is not json}"), {"not valid JSON"}));
  EXPECT_TRUE(FailsWith(RawFile("[1, 2, 3]"), {"JSON object", "'['"}));
  EXPECT_TRUE(FailsWith(RawFile(""), {"JSON object", "empty"}));
  EXPECT_TRUE(FailsWith(RawFile(" {}"), {"JSON object"}));
  EXPECT_TRUE(FailsWith(RawFile("{} {}"), {"not valid JSON"}));
  EXPECT_TRUE(FailsWith(RawFile("{\"\xff\xfe\":1}"), {"not valid JSON"}));  // not UTF-8
  EXPECT_TRUE(FailsWith(RawFile(std::string("{}\0", 3)), {"not valid JSON"}));
}

struct BadHeaderCase {
  const char* label;
  std::string header;
  std::string data;
  std::vector<std::string> fragments;
};

TEST(SafetensorsCorruptTest, BadEntries) {
  const std::string d16(16, '\x5a');
  const std::vector<BadHeaderCase> cases = {
      {"unknown dtype", R"({"w":{"dtype":"F17","shape":[4],"data_offsets":[0,16]}})", d16, {"'w'", "F17"}},
      {"negative dim", R"({"w":{"dtype":"F32","shape":[-1,4],"data_offsets":[0,16]}})", d16, {"'w'", "-1"}},
      {"byte count", R"({"out_proj.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})",
       d16.substr(0, 12),
       {"tensor 'out_proj.weight': data_offsets span 12 bytes, expected 16 (shape [2, 2] x F32)"}},
      {"begin > end", R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", d16, {"'w'", "begin 8"}},
      {"missing dtype", R"({"w":{"shape":[4],"data_offsets":[0,16]}})", d16, {"'w'", "dtype"}},
      {"missing shape", R"({"w":{"dtype":"F32","data_offsets":[0,16]}})", d16, {"'w'", "shape"}},
      {"missing offsets", R"({"w":{"dtype":"F32","shape":[4]}})", d16, {"'w'", "data_offsets"}},
      {"dtype not string", R"({"w":{"dtype":4,"shape":[4],"data_offsets":[0,16]}})", d16, {"'w'", "dtype"}},
      {"shape not array", R"({"w":{"dtype":"F32","shape":4,"data_offsets":[0,16]}})", d16, {"'w'", "shape"}},
      {"float dim", R"({"w":{"dtype":"F32","shape":[4.0],"data_offsets":[0,16]}})", d16, {"'w'", "shape"}},
      {"dim > int64", R"({"w":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,16]}})", d16,
       {"'w'", "9223372036854775808"}},
      {"numel overflow",
       R"({"w":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,16]}})", d16,
       {"'w'", "int64"}},
      {"byte count overflow", R"({"w":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,16]}})",
       d16, {"'w'", "overflow"}},
      {"three offsets", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16,16]}})", d16,
       {"'w'", "data_offsets"}},
      {"negative offset", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[-16,0]}})", d16,
       {"'w'", "data_offsets"}},
      {"entry not object", R"({"w":[1,2]})", d16, {"'w'", "object"}},
      {"duplicate name",
       R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
       R"("w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
       d16, {"duplicate", "'w'"}},
      {"metadata value not string", R"({"__metadata__":{"format":"pt","k":3}})", "", {"__metadata__", "'k'"}},
      {"metadata not object", R"({"__metadata__":["a"]})", "", {"__metadata__"}},
  };
  for (const BadHeaderCase& c : cases) {
    EXPECT_TRUE(FailsWith(RawFile(c.header, c.data), c.fragments)) << c.label;
  }
}

TEST(SafetensorsCorruptTest, LayoutMustTileTheBuffer) {
  const std::string d24(24, '\x33');
  const std::vector<BadHeaderCase> cases = {
      {"overlap",
       R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
       R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
       d24, {"overlap", "'a'", "'b'"}},
      {"gap",
       R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
       d24.substr(0, 20), {"gap of 4 bytes", "'a'", "'b'"}},
      {"gap before first", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", d24.substr(0, 12),
       {"gap of 4 bytes", "before the first tensor 'a'"}},
      {"trailing bytes", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", d24.substr(0, 12),
       {"4 trailing bytes", "'a'"}},
      {"trailing bytes, no tensors", R"({})", d24.substr(0, 5), {"5 trailing bytes"}},
      {"past the end",
       R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
       d24.substr(0, 12), {"'b'", "past the end"}},
      {"huge offsets", R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551614,18446744073709551615]}})",
       d24, {"'a'"}},
      {"empty tensor inside another",
       R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
       R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
       d24.substr(0, 16), {"overlap", "'a'", "'e'"}},
  };
  for (const BadHeaderCase& c : cases) {
    EXPECT_TRUE(FailsWith(RawFile(c.header, c.data), c.fragments)) << c.label;
  }
}

TEST(SafetensorsTest, ZeroElementTensorsMayShareAnOffset) {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},)"
      R"("b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
      R"("c":{"dtype":"BOOL","shape":[3,0],"data_offsets":[4,4]}})";
  const float value = 0.75f;
  std::string data(4, '\0');
  std::memcpy(data.data(), &value, sizeof(value));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Parse(RawFile(header, data));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(Floats(**file, "b"), std::vector<float>{0.75f});
  EXPECT_TRUE(Bools(**file, "c").empty());
}

// Random bit flips and truncations of a valid file must never crash (run under ASan/UBSan too).
TEST(SafetensorsFuzzTest, MutationsNeverCrash) {
  std::mt19937 rng(20240601);
  std::map<std::string, TensorToWrite> tensors;
  tensors["bf"] = FloatTensor(RandomFloats(3, &rng), {3}, "BF16");
  tensors["f16"] = FloatTensor(RandomFloats(2, &rng), {1, 2}, "F16");
  tensors["mask"] = TensorToWrite{"BOOL", {2}, {1, 0}};
  tensors["w"] = FloatTensor(RandomFloats(4, &rng), {2, 2});
  const std::string valid = SerializeSafetensors(tensors, {{"k", "v"}});
  ASSERT_TRUE(SafetensorsFile::Parse(valid).ok());

  int ok_count = 0;
  for (int iteration = 0; iteration < 2000; ++iteration) {
    std::string bytes = valid;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int i = 0; i < flips; ++i) {
      // Half the flips hit the length prefix or the first header bytes, where structure lives.
      const size_t limit = (rng() % 2 == 0) ? std::min<size_t>(bytes.size(), 24) : bytes.size();
      bytes[rng() % limit] ^= static_cast<char>(1u << (rng() % 8));
    }
    if (rng() % 3 == 0) bytes.resize(rng() % (bytes.size() + 1));

    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Parse(bytes, "fuzz");
    if (!file.ok()) {
      ASSERT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
      continue;
    }
    ++ok_count;
    for (const std::string& name : (*file)->Names()) {  // reading what was accepted must be safe too
      const SafetensorsEntry* entry = (*file)->Find(name);
      ASSERT_NE(entry, nullptr);
      (void)(*file)->ReadFloat32(name);
      (void)(*file)->ReadBool(name);
    }
  }
  // Most mutations flip a data or padding byte and leave the file valid; both paths must be exercised.
  EXPECT_GT(ok_count, 0);
  EXPECT_LT(ok_count, 2000);
}

}  // namespace
}  // namespace attnserve
