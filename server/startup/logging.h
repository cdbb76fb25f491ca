// spdlog set-up: level and format (text for people, json for log pipelines: one object per line).
#pragma once

#include <string>

namespace attnserve {

// `level`: trace|debug|info|warn|error|off; `format`: text|json (both already validated by the flags).
void ConfigureLogging(const std::string& level, const std::string& format);

}  // namespace attnserve
