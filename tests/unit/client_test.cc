// The client side without a server: .npy files, the health wire format, attnbench's histogram, arguments,
// request generation, report, and its closed and open loops on a fake clock (no sleeps, exact numbers).
#include "client/client.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "client/health_wire.h"
#include "common/half_float.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tools/attnbench_args.h"
#include "tools/attnbench_histogram.h"
#include "tools/attnbench_report.h"
#include "tools/attnbench_requests.h"
#include "tools/attnbench_runner.h"
#include "tools/attnbench_senders.h"
#include "tools/attnbench_stats.h"
#include "tools/npy.h"
#include "tools/tensor_summary.h"

namespace attnserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// ---------------------------------------------------------------------------------------------------
// .npy

// What numpy 1.24's np.save writes for np.arange(6, dtype='<f4').reshape(2, 3): a 1.0 header padded to 128
// bytes (it leaves room for the shape to grow), then the data.
std::string NumpyArange6() {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  header.append(118 - header.size() - 1, ' ');
  header.push_back('\n');
  std::string out("\x93NUMPY\x01\x00\x76\x00", 10);
  out += header;
  for (int i = 0; i < 6; ++i) {
    const float v = static_cast<float>(i);
    out.append(reinterpret_cast<const char*>(&v), 4);
  }
  return out;
}

TEST(NpyTest, ReadsWhatNumpyWrites) {
  auto a = ParseNpy(NumpyArange6());
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->dtype, NpyArray::DType::kFloat32);
  EXPECT_THAT(a->shape, ElementsAre(2, 3));
  EXPECT_THAT(a->floats, ElementsAre(0, 1, 2, 3, 4, 5));
}

TEST(NpyTest, Float32RoundTripKeepsShapeAndValues) {
  for (const std::vector<int64_t>& shape : std::vector<std::vector<int64_t>>{{2, 3, 4}, {5}, {}, {0, 7}}) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> values(static_cast<size_t>(n));
    for (size_t i = 0; i < values.size(); ++i) values[i] = 0.5f * static_cast<float>(i) - 3.25f;
    auto bytes = EncodeNpyFloat32(values, shape);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    // NumPy's layout: the data starts on a 64-byte boundary, the header ends with a newline.
    const size_t header_end = 10 + static_cast<uint8_t>((*bytes)[8]) + (static_cast<uint8_t>((*bytes)[9]) << 8);
    EXPECT_EQ(header_end % 64, 0u);
    EXPECT_EQ((*bytes)[header_end - 1], '\n');
    auto back = ParseNpy(*bytes);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->shape, shape);
    EXPECT_EQ(back->floats, values);
  }
}

TEST(NpyTest, BoolRoundTripNormalisesToZeroAndOne) {
  const std::vector<uint8_t> values = {0, 1, 7, 0, 255, 1};
  auto bytes = EncodeNpyBool(values, std::vector<int64_t>{2, 3});
  ASSERT_TRUE(bytes.ok());
  EXPECT_THAT(*bytes, HasSubstr("'descr': '|b1'"));
  auto back = ParseNpy(*bytes);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->dtype, NpyArray::DType::kBool);
  EXPECT_THAT(back->bools, ElementsAre(0, 1, 1, 0, 1, 1));
}

TEST(NpyTest, ReadsVersion2Headers) {
  std::string v1 = NumpyArange6();
  // Same header with a 4-byte length: version 2.0 (what NumPy writes past 64 KiB of header).
  std::string v2("\x93NUMPY\x02\x00", 8);
  const uint32_t len = 118;
  v2.append(reinterpret_cast<const char*>(&len), 4);
  v2 += v1.substr(10);
  auto a = ParseNpy(v2);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_THAT(a->floats, ElementsAre(0, 1, 2, 3, 4, 5));
}

TEST(NpyTest, FileRoundTripAndMissingFile) {
  const std::string path = ::testing::TempDir() + "/client_test_roundtrip.npy";
  const std::vector<float> values = {1, 2, 3, 4};
  ASSERT_TRUE(WriteNpyFloat32(path, values, std::vector<int64_t>{2, 2}).ok());
  auto a = ReadNpy(path);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->floats, values);
  auto missing = ReadNpy(path + ".nope");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr(".nope"));
}

// Replaces the header text of NumpyArange6 (keeping its length) to make bad files.
std::string WithHeader(std::string dict) {
  std::string file = NumpyArange6();
  dict.append(117 - dict.size(), ' ');
  file.replace(10, 117, dict);
  return file;
}

TEST(NpyTest, RefusesWhatItDoesNotSupportWithAClearMessage) {
  struct Case {
    std::string bytes;
    std::string message;
  };
  std::string v3 = NumpyArange6();
  v3[6] = 3;
  const std::vector<Case> cases = {
      {"not numpy at all", "not a .npy file"},
      {v3, "version 3.0 is not supported"},
      {WithHeader("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }"), "dtype '<f8' is not supported"},
      {WithHeader("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }"), "dtype '>f4' is not supported"},
      {WithHeader("{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }"), "astype"},
      {WithHeader("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }"), "Fortran order"},
      {WithHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 4), }"), "data holds 24 bytes"},
      {WithHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3) }"), ""},  // no trailing comma: fine
      {WithHeader("{'descr': '<f4', 'fortran_order': False}"), "needs the keys"},
      {WithHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }"), "malformed .npy header"},
      {WithHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4), }"), "malformed"},
      {WithHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (1048576, 1048576), }"), "data holds"},
      {NumpyArange6().substr(0, 50), "truncated .npy header"},
      {NumpyArange6().substr(0, 140), "data holds 12 bytes"},
      {NumpyArange6() + "xx", "data holds 26 bytes"},
  };
  for (const Case& c : cases) {
    auto a = ParseNpy(c.bytes);
    if (c.message.empty()) {
      EXPECT_TRUE(a.ok()) << a.status();
      continue;
    }
    ASSERT_FALSE(a.ok()) << "accepted: " << c.message;
    EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(a.status().message(), HasSubstr(c.message));
  }
  EXPECT_FALSE(EncodeNpyFloat32(std::vector<float>(5), std::vector<int64_t>{2, 3}).ok());
}

// ---------------------------------------------------------------------------------------------------
// Small pieces: health wire format, value summary.

TEST(HealthWireTest, EncodesAndDecodes) {
  EXPECT_EQ(EncodeHealthCheckRequest(""), "");
  EXPECT_EQ(EncodeHealthCheckRequest("abc"), std::string("\x0a\x03" "abc", 5));
  EXPECT_EQ(*DecodeHealthCheckResponse(std::string("\x08\x01", 2)), 1);
  EXPECT_EQ(*DecodeHealthCheckResponse(""), 0);
  // An unknown field (7, string) before the status is skipped.
  EXPECT_EQ(*DecodeHealthCheckResponse(std::string("\x3a\x01x\x08\x02", 5)), 2);
  EXPECT_FALSE(DecodeHealthCheckResponse(std::string("\x08", 1)).ok());
  EXPECT_FALSE(DecodeHealthCheckResponse(std::string("\x0a\x09x", 3)).ok());
}

TEST(ValueSummaryTest, FiniteStatisticsAndNonFiniteCounts) {
  const std::vector<float> v = {1, 2, 3, 4, NAN, INFINITY};
  const ValueSummary s = SummarizeValues(v);
  EXPECT_EQ(s.count, 6);
  EXPECT_EQ(s.nan_count, 1);
  EXPECT_EQ(s.inf_count, 1);
  EXPECT_DOUBLE_EQ(s.mean, 2.5);
  EXPECT_DOUBLE_EQ(s.std, std::sqrt(1.25));
  EXPECT_EQ(s.min, 1);
  EXPECT_EQ(s.max, 4);
}

// ---------------------------------------------------------------------------------------------------
// Histogram and percentiles.

TEST(LatencyHistogramTest, BucketsTileTheRangeWithBoundedWidth) {
  int previous = -1;
  for (int64_t v : {int64_t{0}, int64_t{1}, int64_t{255}, int64_t{256}, int64_t{257}, int64_t{511}, int64_t{512},
                    int64_t{1000}, int64_t{123456789}, int64_t{1} << 40, INT64_MAX}) {
    const int i = LatencyHistogram::BucketIndex(v);
    EXPECT_GE(i, previous) << v;  // monotone (256 and 257 share a bucket)
    previous = i;
    EXPECT_LE(LatencyHistogram::BucketLowest(i), v) << v;
    EXPECT_GE(LatencyHistogram::BucketHighest(i), v) << v;
    // Exact below 256; otherwise at most 1/128 of the value wide.
    const double width = static_cast<double>(LatencyHistogram::BucketHighest(i) - LatencyHistogram::BucketLowest(i));
    EXPECT_LE(width, v < 256 ? 0.0 : static_cast<double>(v) / 128.0) << v;
  }
  // Consecutive buckets meet with neither gap nor overlap.
  for (int i = 0; i < 2000; ++i) {
    EXPECT_EQ(LatencyHistogram::BucketHighest(i) + 1, LatencyHistogram::BucketLowest(i + 1)) << i;
  }
}

TEST(LatencyHistogramTest, PercentilesOfKnownDistributions) {
  LatencyHistogram h;
  EXPECT_EQ(h.Percentile(50), 0);
  for (int64_t v = 1; v <= 100; ++v) h.Record(v);  // exact range
  EXPECT_EQ(h.Percentile(50), 50);
  EXPECT_EQ(h.Percentile(90), 90);
  EXPECT_EQ(h.Percentile(99), 99);
  EXPECT_EQ(h.Percentile(99.9), 100);
  EXPECT_EQ(h.Percentile(0), 1);
  EXPECT_EQ(h.Percentile(100), 100);
  EXPECT_DOUBLE_EQ(h.mean(), 50.5);

  LatencyHistogram big;  // 1..100000 us in ns: within 1/128 (upper bound of the bucket)
  for (int64_t v = 1; v <= 100000; ++v) big.Record(v * 1000);
  for (double p : {50.0, 90.0, 99.0, 99.9}) {
    const double exact = p / 100.0 * 100000 * 1000;
    EXPECT_GE(static_cast<double>(big.Percentile(p)), exact) << p;
    EXPECT_LE(static_cast<double>(big.Percentile(p)), exact * (1 + 1.0 / 128)) << p;
  }
  EXPECT_EQ(big.min(), 1000);
  EXPECT_EQ(big.max(), 100000 * 1000);
  EXPECT_EQ(big.Percentile(100), 100000 * 1000);
}

TEST(LatencyHistogramTest, MergeEqualsRecordingEverything) {
  LatencyHistogram a, b, all;
  for (int64_t v = 0; v < 5000; ++v) {
    const int64_t x = (v * 7919) % 100003;
    (v % 3 == 0 ? a : b).Record(x);
    all.Record(x);
  }
  a.Merge(b);
  EXPECT_EQ(a.count(), all.count());
  EXPECT_EQ(a.min(), all.min());
  EXPECT_EQ(a.max(), all.max());
  EXPECT_DOUBLE_EQ(a.mean(), all.mean());
  for (double p : {1.0, 50.0, 99.0, 99.9}) EXPECT_EQ(a.Percentile(p), all.Percentile(p));
}

// ---------------------------------------------------------------------------------------------------
// attnbench arguments and requests.

absl::StatusOr<BenchArgs> Parse(const std::string& line) {
  std::vector<std::string> args = absl::StrSplit(line, ' ', absl::SkipEmpty());
  return ParseBenchArgs(args);
}

TEST(BenchArgsTest, DefaultsAndLists) {
  auto a = Parse("");
  ASSERT_TRUE(a.ok());
  EXPECT_THAT(a->concurrency, ElementsAre(1));
  EXPECT_FALSE(a->open_loop());
  EXPECT_EQ(a->duration, absl::Seconds(10));

  a = Parse("--concurrency 1,4,16,64 --duration=2s --warmup 500ms --target ipv4:127.0.0.1:1,127.0.0.1:2 --json");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_THAT(a->concurrency, ElementsAre(1, 4, 16, 64));
  EXPECT_EQ(a->duration, absl::Seconds(2));
  EXPECT_EQ(a->warmup, absl::Milliseconds(500));
  EXPECT_EQ(a->target, "ipv4:127.0.0.1:1,127.0.0.1:2");
  EXPECT_EQ(a->format, BenchArgs::Format::kJson);

  a = Parse("--rate 100,250.5 --stream --csv --batch 2 --kv-seq 64 --causal");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(a->open_loop());
  EXPECT_THAT(a->rates, ElementsAre(100, 250.5));
  EXPECT_TRUE(a->stream);
  EXPECT_EQ(a->format, BenchArgs::Format::kCsv);
  EXPECT_EQ(a->kv_seq, 64);

  a = Parse("--echo --payload-bytes 4096");
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE(a->echo);
  EXPECT_EQ(a->payload_bytes, 4096);
  EXPECT_EQ(a->connections, 1);

  a = Parse("--connections 16 --concurrency 64");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->connections, 16);
}

TEST(BenchArgsTest, SeqDist) {
  auto a = Parse("--seq-dist uniform:16:512");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(a->seq_dist.drawn);
  EXPECT_EQ(a->seq_dist.min, 16);
  EXPECT_EQ(a->seq_dist.max, 512);
  EXPECT_TRUE(Parse("--seq-dist uniform:7:7").ok());
  for (const char* bad : {"uniform:0:5", "uniform:9:5", "normal:1:2", "uniform:1", "uniform:a:b", "uniform:1:2:3"}) {
    auto r = Parse(std::string("--seq-dist ") + bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_THAT(r.status().message(), HasSubstr("uniform:MIN:MAX")) << bad;
  }
}

TEST(BenchArgsTest, RefusesContradictionsAndBadValues) {
  for (const char* bad :
       {"--seq 4 --seq-dist uniform:1:2", "--concurrency 4 --rate 10", "--json --csv", "--echo --stream",
        "--concurrency 0", "--concurrency 1,,4", "--concurrency 1,x", "--rate 0", "--rate -5", "--duration 0",
        "--duration forever", "--batch 0", "--nope", "positional", "--tls-root-certs ca.pem", "--connections 0",
        "--connections 257", "--sessions 2 --connections 2"}) {
    auto r = Parse(bad);
    EXPECT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_TRUE(Parse("--help")->help);
}

TEST(InferRequestSourceTest, FixedAndDrawnShapes) {
  InferRequestSource::Options o;
  o.layer = "small";
  o.embed_dim = 8;
  o.batch = 2;
  o.seq_len = 5;
  auto fixed = InferRequestSource::Create(o);
  ASSERT_TRUE(fixed.ok()) << fixed.status();
  auto r = (*fixed)->Get(0);
  EXPECT_EQ(r.get(), (*fixed)->Get(1).get());  // shared, not rebuilt
  EXPECT_THAT(r->query().shape(), ElementsAre(2, 5, 8));
  EXPECT_EQ(r->query().raw_data().size(), 2u * 5 * 8 * 4);
  EXPECT_FALSE(r->has_key());

  o.seq_dist = *ParseSeqDist("uniform:3:6");
  o.kv_seq_len = 4;
  o.kdim = 3;
  o.vdim = 2;
  auto drawn = InferRequestSource::Create(o);
  ASSERT_TRUE(drawn.ok()) << drawn.status();
  std::vector<int> seen(7, 0);
  for (uint64_t seq = 0; seq < 400; ++seq) {
    const int64_t l = (*drawn)->SeqLenFor(seq);
    ASSERT_GE(l, 3);
    ASSERT_LE(l, 6);
    ++seen[l];
    EXPECT_EQ(l, (*drawn)->SeqLenFor(seq));  // deterministic
  }
  for (int l = 3; l <= 6; ++l) EXPECT_GT(seen[l], 50) << "L=" << l;  // roughly uniform over 400 draws
  auto req = (*drawn)->Get(17);
  EXPECT_THAT(req->query().shape(), ElementsAre(2, (*drawn)->SeqLenFor(17), 8));
  EXPECT_THAT(req->key().shape(), ElementsAre(2, 4, 3));
  EXPECT_THAT(req->value().shape(), ElementsAre(2, 4, 2));

  o.embed_dim = 0;
  EXPECT_FALSE(InferRequestSource::Create(o).ok());
}

TEST(InferRequestSourceTest, SixteenBitInputsRoundEachValue) {
  InferRequestSource::Options o;
  o.layer = "small";
  o.embed_dim = 8;
  o.seq_len = 3;
  o.kv_seq_len = 2;
  o.kdim = o.vdim = 8;
  const auto f32 = (*InferRequestSource::Create(o))->Get(0);
  for (const char* dtype : {"BF16", "FP16"}) {
    o.input_dtype = dtype;
    auto source = InferRequestSource::Create(o);
    ASSERT_TRUE(source.ok()) << source.status();
    const auto r = (*source)->Get(0);
    const bool bf16 = std::string(dtype) == "BF16";
    for (const auto* t : {&r->query(), &r->key(), &r->value()}) {
      EXPECT_EQ(t->dtype(), bf16 ? attnserve::v1::BFLOAT16 : attnserve::v1::FLOAT16) << dtype;
    }
    ASSERT_EQ(r->query().raw_data().size(), 3u * 8 * 2);
    for (int i = 0; i < 24; ++i) {
      float want;
      uint16_t got;
      std::memcpy(&want, f32->query().raw_data().data() + 4 * i, 4);
      std::memcpy(&got, r->query().raw_data().data() + 2 * i, 2);
      EXPECT_EQ(got, bf16 ? FloatToBFloat16(want) : FloatToHalf(want)) << dtype << " element " << i;
    }
  }
  o.input_dtype = "FP64";
  EXPECT_FALSE(InferRequestSource::Create(o).ok());
  EXPECT_EQ(Parse("--input-dtype BF16")->input_dtype, "BF16");
  EXPECT_FALSE(Parse("--input-dtype bf16").ok());
}

// ---------------------------------------------------------------------------------------------------
// The loops, on a fake clock.

class FakeBenchClock final : public BenchClock {
 public:
  BenchTime Now() const override {
    absl::MutexLock lock(&mu_);
    return now_;
  }
  void SleepUntil(BenchTime t) override {
    absl::MutexLock lock(&mu_);
    now_ = std::max(now_, t);
  }
  void Advance(std::chrono::nanoseconds d) {
    absl::MutexLock lock(&mu_);
    now_ += d;
  }

 private:
  mutable absl::Mutex mu_;
  BenchTime now_ = BenchTime() + std::chrono::hours(1);
};

// A server that stalls from request `stall_seq` for `stall`. Either the send itself blocks that long (as a
// stalled connection would), or the sends go on while the answers are held until the stall ends.
class StallingSender final : public RequestSender {
 public:
  enum class Mode { kSendBlocks, kAnswersHeld };
  StallingSender(FakeBenchClock* clock, Mode mode, uint64_t stall_seq, std::chrono::milliseconds stall)
      : clock_(clock), mode_(mode), stall_seq_(stall_seq), stall_(stall) {}
  void Send(uint64_t seq, uint64_t, std::function<void(const Outcome&)> done) override {
    if (mode_ == Mode::kSendBlocks) {
      if (seq == stall_seq_) clock_->Advance(stall_);
      done(Outcome{});
      return;
    }
    if (seq == stall_seq_) stall_end_ = clock_->Now() + stall_;
    if (seq >= stall_seq_ && clock_->Now() < stall_end_) {
      held_.push_back(std::move(done));
      return;
    }
    for (auto& held : held_) held(Outcome{});  // the stall is over: the held answers arrive now
    held_.clear();
    done(Outcome{});
  }

 private:
  FakeBenchClock* clock_;
  Mode mode_;
  uint64_t stall_seq_;
  std::chrono::milliseconds stall_;
  BenchTime stall_end_;
  std::vector<std::function<void(const Outcome&)>> held_;
};

class OpenLoopStallTest : public ::testing::TestWithParam<StallingSender::Mode> {};

TEST_P(OpenLoopStallTest, LatencyCountsFromTheIntendedSendTimeSoAStallShows) {
  // 100 requests/s for 1 s; from request 50 (intended at 500 ms) the server stalls until 800 ms. Requests
  // 50-79 (intended at 500..790 ms) are answered at 800 ms: latency 300..10 ms. Timing from the actual
  // send would hide this when the send blocks (it would see 300 ms once and then zeros).
  FakeBenchClock clock;
  StallingSender sender(&clock, GetParam(), 50, std::chrono::milliseconds(300));
  StepRecorder recorder;
  auto result = RunOpenLoop(&sender, &clock, {100, absl::ZeroDuration(), absl::Seconds(1)}, &recorder);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->sent, 100);
  EXPECT_DOUBLE_EQ(result->elapsed_seconds, 1.0);
  const StepStats s = recorder.Snapshot();
  EXPECT_EQ(s.ok, 100);
  EXPECT_EQ(s.latency_ns.max(), 300'000'000);
  // 10 + 20 + ... + 300 ms over 100 requests.
  EXPECT_DOUBLE_EQ(s.latency_ns.mean(), 46.5e6);
  EXPECT_EQ(s.latency_ns.Percentile(70), 0);  // 70 requests were not delayed
  EXPECT_NEAR(static_cast<double>(s.latency_ns.Percentile(71)), 10e6, 10e6 / 128);
  EXPECT_NEAR(static_cast<double>(s.latency_ns.Percentile(99)), 290e6, 290e6 / 128);
}

INSTANTIATE_TEST_SUITE_P(BothKindsOfStall, OpenLoopStallTest,
                         ::testing::Values(StallingSender::Mode::kSendBlocks, StallingSender::Mode::kAnswersHeld));

TEST(OpenLoopTest, WarmupIsSentButNotRecorded) {
  FakeBenchClock clock;
  StallingSender sender(&clock, StallingSender::Mode::kSendBlocks, ~0ull, std::chrono::milliseconds(0));
  StepRecorder recorder;
  auto result = RunOpenLoop(&sender, &clock, {100, absl::Milliseconds(500), absl::Milliseconds(500)}, &recorder);
  ASSERT_TRUE(result.ok());
  EXPECT_EQ(result->sent, 100);
  EXPECT_EQ(recorder.Snapshot().ok, 50);
  EXPECT_FALSE(RunOpenLoop(&sender, &clock, {0, absl::ZeroDuration(), absl::Seconds(1)}, &recorder).ok());
}

// Takes 1 ms of fake time per request; fails every third one with UNAVAILABLE.
// `never_blocks`: the closed loop chains the requests through the answers instead of a thread per worker.
class SteppingSender final : public RequestSender {
 public:
  SteppingSender(FakeBenchClock* clock, bool never_blocks) : clock_(clock), never_blocks_(never_blocks) {}
  bool SendNeverBlocks() const override { return never_blocks_; }
  void Send(uint64_t seq, uint64_t, std::function<void(const Outcome&)> done) override {
    clock_->Advance(std::chrono::milliseconds(1));
    Outcome o;
    if (seq % 3 == 2) o.code = 14;
    done(o);
  }

 private:
  FakeBenchClock* clock_;
  const bool never_blocks_;
};

class ClosedLoopTest : public ::testing::TestWithParam<bool> {};  // the sender never blocks: chained workers

TEST_P(ClosedLoopTest, OneWorkerMeasuresEachRequestAndCountsErrorsByCode) {
  FakeBenchClock clock;
  SteppingSender sender(&clock, GetParam());
  StepRecorder recorder;
  auto result = RunClosedLoop(&sender, &clock, {1, absl::Milliseconds(99), absl::Seconds(1)}, &recorder);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->sent, 1099);  // 99 in the warmup, 1000 measured
  EXPECT_DOUBLE_EQ(result->elapsed_seconds, 1.0);
  const StepStats s = recorder.Snapshot();
  EXPECT_EQ(s.requests(), 1000);
  EXPECT_EQ(s.errors.at("UNAVAILABLE"), s.requests() - s.ok);
  EXPECT_NEAR(static_cast<double>(s.ok), 1000 * 2.0 / 3, 2);
  EXPECT_EQ(s.latency_ns.Percentile(50), 1'000'000);
  EXPECT_EQ(s.latency_ns.max(), 1'000'000);
}

// Answers from a thread of its own, one request per millisecond of real time, tracking how many requests
// are in flight.
class AsyncSender final : public RequestSender {
 public:
  explicit AsyncSender(bool never_blocks) : never_blocks_(never_blocks), thread_([this] { Loop(); }) {}
  bool SendNeverBlocks() const override { return never_blocks_; }
  ~AsyncSender() override {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
    }
    thread_.join();
  }
  void Send(uint64_t, uint64_t, std::function<void(const Outcome&)> done) override {
    absl::MutexLock lock(&mu_);
    queue_.push_back(std::move(done));
    max_in_flight_ = std::max(max_in_flight_, ++in_flight_);
  }
  int max_in_flight() {
    absl::MutexLock lock(&mu_);
    return max_in_flight_;
  }

 private:
  void Loop() {
    while (true) {
      std::function<void(const Outcome&)> done;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(+[](AsyncSender* s) { return s->stop_ || !s->queue_.empty(); }, this));
        if (queue_.empty()) return;
        done = std::move(queue_.front());
        queue_.pop_front();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      {
        absl::MutexLock lock(&mu_);
        --in_flight_;  // before the answer: its worker sends the next request at once
      }
      done(Outcome{});
    }
  }

  absl::Mutex mu_;
  std::deque<std::function<void(const Outcome&)>> queue_;  // waiting to be answered, oldest first
  int in_flight_ = 0;                                     // sent and not yet answered
  int max_in_flight_ = 0;
  bool stop_ = false;
  const bool never_blocks_;
  std::thread thread_;
};

TEST_P(ClosedLoopTest, EachWorkerKeepsOneRequestInFlight) {
  AsyncSender sender(GetParam());
  StepRecorder recorder;
  auto result = RunClosedLoop(&sender, RealBenchClock(), {4, absl::ZeroDuration(), absl::Milliseconds(200)}, &recorder);
  ASSERT_TRUE(result.ok());
  EXPECT_GT(recorder.Snapshot().ok, 4);
  EXPECT_LE(sender.max_in_flight(), 4);
  EXPECT_GE(sender.max_in_flight(), 2);
  EXPECT_GE(result->elapsed_seconds, 0.2);
  EXPECT_FALSE(RunClosedLoop(&sender, RealBenchClock(), {0, absl::ZeroDuration(), absl::Seconds(1)}, &recorder).ok());
}

INSTANTIATE_TEST_SUITE_P(ThreadsAndChains, ClosedLoopTest, ::testing::Bool());

// ---------------------------------------------------------------------------------------------------
// Report.

// An answer's bytes cut into `pieces` slices at random points, as gRPC receives them.
grpc::ByteBuffer SlicedWire(const std::string& bytes, int pieces, std::mt19937* rng) {
  std::vector<size_t> cuts = {0, bytes.size()};
  for (int i = 1; i < pieces; ++i) cuts.push_back((*rng)() % (bytes.size() + 1));
  std::sort(cuts.begin(), cuts.end());
  std::vector<grpc::Slice> slices;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) slices.emplace_back(bytes.substr(cuts[i], cuts[i + 1] - cuts[i]));
  return grpc::ByteBuffer(slices.data(), slices.size());
}

TEST(AttnbenchWireTest, ReadsTheTimingAndSkipsTheTensors) {
  std::mt19937 rng(21);
  for (int round = 0; round < 20; ++round) {
    // The tensors first, then id and timing, as the server sends an answer (infer_answer.h); concatenated
    // messages parse as one.
    attnserve::v1::InferResponse tensors, rest;
    const size_t values = 1 + rng() % 20000;
    tensors.mutable_output()->add_shape(static_cast<int64_t>(values));
    std::string raw(values * 4, '\0');
    for (char& c : raw) c = static_cast<char>(rng());
    tensors.mutable_output()->set_raw_data(raw);
    if (round % 2 == 1) tensors.mutable_attn_weights()->set_raw_data(raw.substr(0, raw.size() / 3));
    rest.set_id("r" + std::to_string(round));
    rest.mutable_timing()->set_queue_us(1 + rng() % 1000000);
    rest.mutable_timing()->set_compute_us(1 + rng() % 1000000);
    rest.mutable_timing()->set_batch_size(1 + rng() % 64);
    const std::string bytes = tensors.SerializeAsString() + rest.SerializeAsString();
    grpc::ByteBuffer wire = SlicedWire(bytes, 1 + round % 4, &rng);
    const Outcome o = FromWire(grpc::Status::OK, &wire);
    EXPECT_EQ(o.code, 0);
    ASSERT_TRUE(o.has_timing);
    EXPECT_EQ(o.queue_us, rest.timing().queue_us());
    EXPECT_EQ(o.compute_us, rest.timing().compute_us());
    EXPECT_EQ(o.batch_size, rest.timing().batch_size());

    // Cut short inside the output: not an answer.
    grpc::ByteBuffer truncated = SlicedWire(bytes.substr(0, 2 + rng() % (raw.size() - 1)), 2, &rng);
    EXPECT_EQ(FromWire(grpc::Status::OK, &truncated).code, static_cast<int>(grpc::StatusCode::INTERNAL));
  }
}

TEST(AttnbenchWireTest, ErrorsComeFromTheStatusOrTheAnswer) {
  std::mt19937 rng(23);
  attnserve::v1::InferResponse failed;
  failed.set_id("f");
  failed.mutable_error()->set_code(static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  failed.mutable_error()->set_message("query: bad");
  grpc::ByteBuffer wire = SlicedWire(failed.SerializeAsString(), 2, &rng);
  const Outcome o = FromWire(grpc::Status::OK, &wire);
  EXPECT_EQ(o.code, static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_FALSE(o.has_timing);

  grpc::ByteBuffer none;
  EXPECT_EQ(FromWire(grpc::Status(grpc::StatusCode::UNAVAILABLE, "down"), &none).code,
            static_cast<int>(grpc::StatusCode::UNAVAILABLE));
  EXPECT_EQ(FromWire(grpc::Status::OK, &none).code, static_cast<int>(grpc::StatusCode::INTERNAL));  // no bytes
  grpc::ByteBuffer garbage = SlicedWire(std::string("\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 11), 1, &rng);
  EXPECT_EQ(FromWire(grpc::Status::OK, &garbage).code, static_cast<int>(grpc::StatusCode::INTERNAL));
}

TEST(ReportTest, JsonCsvAndTableCarryTheSameNumbers) {
  StepReport step;
  step.workload = "small B=1 L=8 unary";
  step.concurrency = 4;
  step.elapsed_seconds = 2.0;
  StepRecorder recorder;
  for (int i = 1; i <= 100; ++i) {
    Outcome o;
    o.has_timing = true;
    o.queue_us = 10;
    o.compute_us = 100;
    o.batch_size = 2;
    recorder.Record(int64_t{i} * 1'000'000, o);
  }
  Outcome unavailable;
  unavailable.code = 14;
  unavailable.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
  recorder.Record(5, unavailable);
  Outcome deadline;
  deadline.code = 4;
  recorder.Record(5, deadline);
  step.stats = recorder.Snapshot();

  const nlohmann::json j = nlohmann::json::parse(FormatJson({step}));
  ASSERT_TRUE(j.is_array());
  ASSERT_EQ(j.size(), 1u);
  EXPECT_EQ(j[0]["mode"], "closed");
  EXPECT_EQ(j[0]["concurrency"], 4);
  EXPECT_EQ(j[0]["requests"], 102);
  EXPECT_EQ(j[0]["errors"], 2);
  EXPECT_EQ(j[0]["errors_by_code"]["UNAVAILABLE"], 1);
  EXPECT_EQ(j[0]["errors_by_code"]["DEADLINE_EXCEEDED"], 1);
  EXPECT_EQ(j[0]["first_error_trace_ids"]["UNAVAILABLE"], "4bf92f3577b34da6a3ce929d0e0e4736");
  EXPECT_FALSE(j[0]["first_error_trace_ids"].contains("DEADLINE_EXCEEDED"));
  EXPECT_DOUBLE_EQ(j[0]["requests_per_second"].get<double>(), 51.0);
  EXPECT_NEAR(j[0]["latency_ms"]["p50"].get<double>(), 50.0, 50.0 / 128);
  EXPECT_NEAR(j[0]["latency_ms"]["p99"].get<double>(), 99.0, 99.0 / 128);
  EXPECT_DOUBLE_EQ(j[0]["latency_ms"]["max"].get<double>(), 100.0);
  EXPECT_DOUBLE_EQ(j[0]["server"]["queue_us"]["p50"].get<double>(), 10.0);
  EXPECT_DOUBLE_EQ(j[0]["server"]["batch_size"]["mean"].get<double>(), 2.0);

  const std::vector<std::string> lines = absl::StrSplit(FormatCsv({step}), '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 2u);
  const std::vector<std::string> header = absl::StrSplit(lines[0], ',');
  const std::vector<std::string> row = absl::StrSplit(lines[1], ',');
  EXPECT_EQ(header.size(), row.size());
  EXPECT_THAT(lines[1], HasSubstr("DEADLINE_EXCEEDED:1;UNAVAILABLE:1"));

  const std::string table = FormatTable({step});
  EXPECT_THAT(table, HasSubstr("c=4"));
  EXPECT_THAT(table, HasSubstr("errors at c=4: DEADLINE_EXCEEDED 1, UNAVAILABLE 1"));
  EXPECT_THAT(table, HasSubstr("first UNAVAILABLE: trace_id 4bf92f3577b34da6a3ce929d0e0e4736"));
}

// ---------------------------------------------------------------------------------------------------
// Client: option validation and request encoding (no server needed).

TEST(ClientTest, CreateValidatesOptions) {
  Client::Options o;
  EXPECT_EQ(Client::Create(o).status().code(), absl::StatusCode::kInvalidArgument);  // no target
  o.target = "ipv4:127.0.0.1:1,127.0.0.1:2";
  EXPECT_TRUE(Client::Create(o).ok());
  o.load_balancing = "random";
  EXPECT_FALSE(Client::Create(o).ok());
  o.load_balancing = "pick_first";
  o.default_timeout_ms = -1;
  EXPECT_FALSE(Client::Create(o).ok());
  o.default_timeout_ms = 0;
  o.max_message_bytes = 0;
  EXPECT_FALSE(Client::Create(o).ok());
  o.max_message_bytes = 1 << 20;
  o.tls_root_certs_path = "/nonexistent.pem";
  EXPECT_EQ(Client::Create(o).status().code(), absl::StatusCode::kInvalidArgument);  // without use_tls
  o.use_tls = true;
  EXPECT_EQ(Client::Create(o).status().code(), absl::StatusCode::kNotFound);
  o.use_tls = false;
  o.tls_root_certs_path.clear();
  o.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  EXPECT_TRUE(Client::Create(o).ok());
  for (const char* bad : {"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                          "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                          "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                          "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "trace-me"}) {
    o.traceparent = bad;
    const absl::Status s = Client::Create(o).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(s.message()), HasSubstr("traceparent: expected")) << bad;
  }
}

TEST(ClientTest, MakeInferRequestEncodesEveryInput) {
  const std::vector<float> q(2 * 3 * 4, 1.0f), k(2 * 5 * 4, 2.0f), v(2 * 5 * 4, 3.0f);
  const std::vector<uint8_t> kpm(2 * 5, 1);
  Client::InferOptions o;
  o.key = {k, {2, 5, 4}};
  o.value = {v, {2, 5, 4}};
  o.key_padding_mask = Client::MaskInput::Bool(kpm, {2, 5});
  o.need_weights = true;
  o.average_attn_weights = false;
  o.id = "x";
  auto r = Client::MakeInferRequest("small", q, {2, 3, 4}, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->layer(), "small");
  EXPECT_EQ(r->query().raw_data().size(), q.size() * 4);
  EXPECT_EQ(r->key().dtype(), attnserve::v1::FLOAT32);
  EXPECT_EQ(r->key_padding_mask().dtype(), attnserve::v1::BOOL);
  EXPECT_EQ(r->key_padding_mask().raw_data().size(), 10u);
  EXPECT_FALSE(r->has_attn_mask());
  EXPECT_TRUE(r->has_average_attn_weights());
  EXPECT_FALSE(r->average_attn_weights());

  auto bad = Client::MakeInferRequest("small", q, {2, 3, 5}, {});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("query: 24 values given for shape [2, 3, 5]"));
}

TEST(ClientTest, ReadInferResponseDecodesAndReportsStreamErrors) {
  attnserve::v1::InferResponse response;
  const std::vector<float> out = {1, 2, 3, 4, 5, 6};
  response.mutable_output()->add_shape(2);
  response.mutable_output()->add_shape(3);
  response.mutable_output()->set_raw_data(reinterpret_cast<const char*>(out.data()), out.size() * 4);
  response.mutable_timing()->set_queue_us(7);
  response.mutable_timing()->set_batch_size(3);
  auto r = Client::ReadInferResponse(response);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->output.values, out);
  EXPECT_THAT(r->output.shape, ElementsAre(2, 3));
  EXPECT_EQ(r->timing.queue_us, 7);
  EXPECT_EQ(r->timing.batch_size, 3);
  EXPECT_TRUE(r->attn_weights.values.empty());

  response.mutable_output()->add_shape(2);  // 12 expected, 6 sent
  EXPECT_EQ(Client::ReadInferResponse(response).status().code(), absl::StatusCode::kInternal);
  response.mutable_error()->set_code(3);
  response.mutable_error()->set_message("query: bad");
  auto e = Client::ReadInferResponse(response);
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(e.status().message(), "query: bad");
}

}  // namespace
}  // namespace attnserve
