#include "server/api/grpc_logging.h"

#include <grpc/support/log.h>
#include <spdlog/spdlog.h>

#include "absl/time/clock.h"
#include "common/log_string.h"

namespace attnserve {
namespace {

constexpr int64_t kGrpcLinesPerSecond = 20;

void LogGrpcLine(gpr_log_func_args* args) {
  static auto* limiter = new LogRateLimiter(kGrpcLinesPerSecond);
  int64_t dropped = 0;
  if (!limiter->Allow(absl::Now(), &dropped)) return;
  const spdlog::level::level_enum level = args->severity == GPR_LOG_SEVERITY_ERROR  ? spdlog::level::err
                                          : args->severity == GPR_LOG_SEVERITY_INFO ? spdlog::level::info
                                                                                    : spdlog::level::debug;
  spdlog::log(level, "grpc {}:{}: {}{}", args->file == nullptr ? "?" : args->file, args->line,
              BoundedForLog(args->message == nullptr ? "" : args->message),
              dropped > 0 ? fmt::format(" ({} more gRPC lines dropped)", dropped) : "");
}

}  // namespace

void RouteGrpcLogsToSpdlog() { gpr_set_log_function(&LogGrpcLine); }

}  // namespace attnserve
