// W3C traceparent parsing and the server's spans (server/observability/trace_context.h).
#include "server/observability/trace_context.h"

#include <gtest/gtest.h>

#include <set>
#include <string>

namespace attnserve {
namespace {

constexpr char kTrace[] = "4bf92f3577b34da6a3ce929d0e0e4736";
constexpr char kSpan[] = "00f067aa0ba902b7";

std::string Header(const std::string& version, const std::string& trace, const std::string& span,
                   const std::string& flags) {
  return version + "-" + trace + "-" + span + "-" + flags;
}

TEST(ParseTraceparentTest, ReadsTheFields) {
  const auto parsed = ParseTraceparent(Header("00", kTrace, kSpan, "01"));
  ASSERT_TRUE(parsed.has_value());
  EXPECT_EQ(parsed->trace_id, kTrace);
  EXPECT_EQ(parsed->parent_id, kSpan);
  EXPECT_EQ(parsed->flags, 1);
  EXPECT_EQ(ParseTraceparent("  " + Header("00", kTrace, kSpan, "ff") + " ")->flags, 255);
}

TEST(ParseTraceparentTest, ReadsALaterVersionByItsPrefix) {
  EXPECT_TRUE(ParseTraceparent(Header("01", kTrace, kSpan, "01") + "-more").has_value());
  EXPECT_TRUE(ParseTraceparent(Header("cc", kTrace, kSpan, "00")).has_value());
  EXPECT_FALSE(ParseTraceparent(Header("01", kTrace, kSpan, "01") + "x").has_value());
}

TEST(ParseTraceparentTest, RefusesMalformedValues) {
  const std::string upper_trace = "4BF92F3577B34DA6A3CE929D0E0E4736";
  for (const std::string& bad : {
           std::string(),
           Header("00", kTrace, kSpan, "01") + "-tail",  // version 00 is exactly 55 characters
           Header("ff", kTrace, kSpan, "01"),
           Header("0g", kTrace, kSpan, "01"),
           Header("00", upper_trace, kSpan, "01"),
           Header("00", std::string(32, '0'), kSpan, "01"),
           Header("00", kTrace, std::string(16, '0'), "01"),
           Header("00", kTrace, kSpan, "0x"),
           Header("00", std::string(kTrace).substr(1), kSpan + std::string("0"), "01"),
           std::string("00_") + kTrace + "_" + kSpan + "_01",
           std::string(55, '-'),
           std::string(4096, 'a'),
       }) {
    EXPECT_FALSE(ParseTraceparent(bad).has_value()) << bad;
  }
}

TEST(StartServerSpanTest, ContinuesTheClientsTrace) {
  const TraceContext trace = StartServerSpan(Header("00", kTrace, kSpan, "01"), "vendor=1,other=2");
  EXPECT_EQ(trace.trace_id, kTrace);
  EXPECT_EQ(trace.parent_span_id, kSpan);
  EXPECT_NE(trace.span_id, kSpan);
  EXPECT_EQ(trace.flags, 1);
  EXPECT_EQ(trace.tracestate, "vendor=1,other=2");
  const auto returned = ParseTraceparent(trace.ServerTraceparent());
  ASSERT_TRUE(returned.has_value()) << trace.ServerTraceparent();
  EXPECT_EQ(returned->trace_id, kTrace);
  EXPECT_EQ(returned->parent_id, trace.span_id);
  EXPECT_EQ(returned->flags, 1);
}

TEST(StartServerSpanTest, StartsAFreshTraceForMalformedInput) {
  std::set<std::string> traces;
  std::set<std::string> spans;
  for (int i = 0; i < 200; ++i) {
    const TraceContext trace = StartServerSpan(i % 2 ? "garbage" : "", "k=v");
    ASSERT_TRUE(ParseTraceparent(trace.ServerTraceparent()).has_value()) << trace.ServerTraceparent();
    EXPECT_TRUE(trace.parent_span_id.empty());
    EXPECT_TRUE(trace.tracestate.empty()) << "tracestate kept without a valid traceparent";
    EXPECT_EQ(trace.flags, 0);
    traces.insert(trace.trace_id);
    spans.insert(trace.span_id);
  }
  EXPECT_EQ(traces.size(), 200u);
  EXPECT_EQ(spans.size(), 200u);
}

TEST(StartServerSpanTest, DropsTracestateThatIsTooLongOrNotPrintable) {
  const std::string parent = Header("00", kTrace, kSpan, "00");
  EXPECT_TRUE(StartServerSpan(parent, std::string(TraceContext::kMaxTracestateBytes + 1, 'a')).tracestate.empty());
  EXPECT_TRUE(StartServerSpan(parent, "a=b\ncontent-length: 0").tracestate.empty());
  EXPECT_EQ(StartServerSpan(parent, std::string(TraceContext::kMaxTracestateBytes, 'a')).tracestate.size(),
            TraceContext::kMaxTracestateBytes);
}

TEST(ScopedLogTraceTest, NestsAndRestores) {
  EXPECT_EQ(ScopedLogTrace::Current(), nullptr);
  const TraceContext outer = StartServerSpan("", "");
  const TraceContext inner = StartServerSpan("", "");
  {
    ScopedLogTrace a(outer);
    EXPECT_EQ(ScopedLogTrace::Current(), &outer);
    {
      ScopedLogTrace b(inner);
      EXPECT_EQ(ScopedLogTrace::Current(), &inner);
      ScopedLogTrace none((TraceContext()));
      EXPECT_EQ(ScopedLogTrace::Current(), nullptr);
    }
    EXPECT_EQ(ScopedLogTrace::Current(), &outer);
  }
  EXPECT_EQ(ScopedLogTrace::Current(), nullptr);
}

}  // namespace
}  // namespace attnserve
