#include "server/startup/logging.h"

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "server/observability/trace_context.h"

namespace attnserve {
namespace {

// %* in the pattern: the message as a JSON string body (quotes, backslashes and control bytes escaped),
// so a message cannot break the one-object-per-line format.
class JsonEscapedMessage final : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&, spdlog::memory_buf_t& dest) override {
    static const char kHex[] = "0123456789abcdef";
    for (char c : msg.payload) {
      switch (c) {
        case '"': dest.append(std::string_view("\\\"")); break;
        case '\\': dest.append(std::string_view("\\\\")); break;
        case '\n': dest.append(std::string_view("\\n")); break;
        case '\t': dest.append(std::string_view("\\t")); break;
        default:
          if (static_cast<unsigned char>(c) < 0x20) {
            const char esc[] = {'\\', 'u', '0', '0', kHex[(c >> 4) & 0xf], kHex[c & 0xf]};
            dest.append(esc, esc + sizeof(esc));
          } else {
            dest.push_back(c);
          }
      }
    }
  }
  std::unique_ptr<custom_flag_formatter> clone() const override { return std::make_unique<JsonEscapedMessage>(); }
};

// %& in the pattern: the ids of the request the line is about (ScopedLogTrace), as JSON members before "msg"
// or as text after the message; nothing for lines about no request.
class TraceIds final : public spdlog::custom_flag_formatter {
 public:
  explicit TraceIds(bool json) : json_(json) {}
  void format(const spdlog::details::log_msg&, const std::tm&, spdlog::memory_buf_t& dest) override {
    const TraceContext* trace = ScopedLogTrace::Current();
    if (trace == nullptr) return;
    const std::string ids =
        json_ ? absl::StrCat("\"trace_id\":\"", trace->trace_id, "\",\"span_id\":\"", trace->span_id, "\",")
              : absl::StrCat(" trace_id=", trace->trace_id, " span_id=", trace->span_id);
    dest.append(ids.data(), ids.data() + ids.size());
  }
  std::unique_ptr<custom_flag_formatter> clone() const override { return std::make_unique<TraceIds>(json_); }

 private:
  const bool json_;
};

}  // namespace

void ConfigureLogging(const std::string& level, const std::string& format) {
  auto logger = spdlog::stderr_logger_mt("attnserve");
  if (format == "json") {
    auto formatter = std::make_unique<spdlog::pattern_formatter>(spdlog::pattern_time_type::utc);
    formatter->add_flag<JsonEscapedMessage>('*').add_flag<TraceIds>('&', true).set_pattern(
        R"({"time":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l","thread":%t,%&"msg":"%*"})");
    logger->set_formatter(std::move(formatter));
  } else {
    auto formatter = std::make_unique<spdlog::pattern_formatter>();
    formatter->add_flag<TraceIds>('&', false).set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ [%t] %v%&");
    logger->set_formatter(std::move(formatter));
  }
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::from_str(level));
  spdlog::flush_on(spdlog::level::info);
}

}  // namespace attnserve
