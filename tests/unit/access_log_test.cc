// The access log (server/observability/access_log.h): one parseable line per record, client strings bounded
// and escaped, and a writer that falls behind costs dropped lines, never a blocked request.
#include "server/observability/access_log.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/synchronization/notification.h"
#include "absl/strings/str_split.h"

namespace attnserve {
namespace {

AccessRecord SampleRecord(const std::string& id) {
  AccessRecord r;
  r.time = absl::FromUnixMicros(1764734706789012);
  r.rpc = "Infer";
  r.layer = "small";
  r.version = 3;
  r.id = id;
  r.code = absl::StatusCode::kResourceExhausted;
  r.request_bytes = 4132;
  r.answer_bytes = 0;
  r.total_us = 812;
  r.queue_us = 140;
  r.compute_us = 610;
  r.batch = 3;
  r.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
  r.span_id = "00f067aa0ba902b7";
  return r;
}

TEST(AccessLogTest, FormatsOneJsonObjectPerLine) {
  EXPECT_EQ(AccessLog::FormatLine(SampleRecord("req-7")),
            "{\"time\":\"2025-12-03T04:05:06.789012Z\",\"rpc\":\"Infer\",\"layer\":\"small\",\"version\":3,"
            "\"id\":\"req-7\",\"code\":\"RESOURCE_EXHAUSTED\",\"request_bytes\":4132,\"answer_bytes\":0,"
            "\"total_us\":812,\"queue_us\":140,\"compute_us\":610,\"batch\":3,"
            "\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\",\"span_id\":\"00f067aa0ba902b7\"}\n");
}

TEST(AccessLogTest, BoundsAndEscapesClientStrings) {
  const std::string line = AccessLog::FormatLine(SampleRecord("a\"b\\c\nd" + std::string(100000, 'x')));
  EXPECT_LT(line.size(), 1000u);
  EXPECT_EQ(line.find('\n'), line.size() - 1) << "a newline inside the line";
  EXPECT_NE(line.find("\"id\":\"a\\\"b\\\\x5cc\\\\x0ad"), std::string::npos) << line;
}

TEST(AccessLogTest, WritesEveryRecordToTheFile) {
  const std::string path = ::testing::TempDir() + "/access_log_test.jsonl";
  std::remove(path.c_str());
  {
    AccessLog::Options options;
    options.path = path;
    auto log = AccessLog::Create(options);
    ASSERT_TRUE(log.ok()) << log.status();
    for (int i = 0; i < 1000; ++i) (*log)->Record(SampleRecord("r" + std::to_string(i)));
  }  // the destructor writes what is queued
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  std::vector<std::string> lines = absl::StrSplit(text.str(), '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 1000u);
  EXPECT_NE(lines[999].find("\"id\":\"r999\""), std::string::npos);
}

TEST(AccessLogTest, DropsInsteadOfBlockingWhenTheWriterIsStuck) {
  absl::Notification entered, release;
  std::atomic<int> lines_written{0};
  AccessLog::Options options;
  options.path = "test";
  options.max_pending_lines = 8;
  options.write_for_test = [&](absl::string_view lines) {
    if (!entered.HasBeenNotified()) entered.Notify();
    release.WaitForNotification();
    lines_written += static_cast<int>(std::count(lines.begin(), lines.end(), '\n'));
  };
  auto log = AccessLog::Create(options);
  ASSERT_TRUE(log.ok());
  (*log)->Record(SampleRecord("first"));
  entered.WaitForNotification();  // the writer holds "first" and is stuck writing it
  for (int i = 0; i < 100; ++i) (*log)->Record(SampleRecord("r"));  // returns at once: 8 queue, 92 drop
  EXPECT_EQ((*log)->dropped(), 92);
  release.Notify();
  log->reset();
  EXPECT_EQ(lines_written.load(), 9);
}

TEST(AccessLogTest, RefusesBadOptions) {
  AccessLog::Options options;
  EXPECT_EQ(AccessLog::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.path = "/nonexistent-dir/access.log";
  EXPECT_EQ(AccessLog::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.path = "-";
  options.max_pending_lines = 0;
  EXPECT_EQ(AccessLog::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace attnserve
