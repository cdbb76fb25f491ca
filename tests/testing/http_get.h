// A minimal HTTP/1.0 client for integration tests: enough to scrape /metrics and query Prometheus' API.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace attnserve::testing {

// GET http://host:port/path over a plain socket (HTTP/1.0, Connection: close) and returns the body.
// `host` is an IPv4/IPv6 literal or a name (resolved with getaddrinfo); `path` starts with '/' and is sent
// as given (the caller escapes it). Errors: Unavailable when the connection fails, DeadlineExceeded when
// connecting or the whole exchange takes longer than `timeout`, Internal for a malformed response, and
// FailedPrecondition "HTTP <code> <reason>: <body>" for any status other than 200.
absl::StatusOr<std::string> HttpGet(const std::string& host, int port, const std::string& path,
                                    absl::Duration timeout);
inline absl::StatusOr<std::string> HttpGet(const std::string& host, int port, const std::string& path) {
  return HttpGet(host, port, path, absl::Seconds(10));
}

}  // namespace attnserve::testing
