// End-to-end tests of what only the attnserve binary does: draining on SIGTERM and exiting, its flags and
// exit codes, and /metrics scraped by a real Prometheus. Each test starts its own process on ephemeral
// loopback ports (tests/testing/server_harness.h). The server's API itself is tested in-process, in
// tests/unit/attention_service_test.cc.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/version.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/http_get.h"
#include "tests/testing/safetensors_writer.h"
#include "tests/testing/server_harness.h"
#include "tests/testing/subprocess.h"

#ifndef ATTNSERVE_BINARY
#error "ATTNSERVE_BINARY must name the attnserve executable (set by tests/CMakeLists.txt)"
#endif
#ifndef ATTNSERVE_PROMETHEUS
#define ATTNSERVE_PROMETHEUS ""
#endif

namespace attnserve::testing {
namespace {

using ::testing::HasSubstr;

// Prints the logs of the processes a failed test started.
class ServerTest : public ::testing::Test {
 protected:
  // Starts attnserve (StartServerProcess) owned by the fixture; fails the test on error.
  TestServer* Start(const std::string& name, const std::string& config_pbtxt = "",
                    const std::vector<std::string>& extra_args = {}) {
    const std::string unique = absl::StrCat(name, "_", ++started_);
    absl::StatusOr<std::unique_ptr<TestServer>> server =
        StartServerProcess(ATTNSERVE_BINARY, unique, config_pbtxt, extra_args);
    if (!server.ok()) {
      ADD_FAILURE() << "cannot start attnserve: " << server.status();
      return nullptr;
    }
    logs_.push_back((*server)->process.get());
    servers_.push_back(std::move(*server));
    return servers_.back().get();
  }
  // Takes another process into the fixture: its log is printed on failure, and it is killed at the end of
  // the test at the latest.
  Subprocess* Own(std::unique_ptr<Subprocess> process) {
    logs_.push_back(process.get());
    others_.push_back(std::move(process));
    return others_.back().get();
  }

  void TearDown() override {
    if (HasFailure()) {
      for (const Subprocess* p : logs_) {
        std::fprintf(stderr, "---- log of pid %d (%s) ----\n%s\n", p->pid(), p->log_path().c_str(),
                     p->LogTail(6000).c_str());
      }
    }
    others_.clear();  // SIGKILLs whatever still runs
    servers_.clear();
    logs_.clear();
  }

  std::vector<std::unique_ptr<TestServer>> servers_;
  std::vector<std::unique_ptr<Subprocess>> others_;
  std::vector<const Subprocess*> logs_;
  int started_ = 0;
};

#define START_OR_RETURN(var, ...)       \
  TestServer* var = Start(__VA_ARGS__); \
  ASSERT_NE(var, nullptr)

// ---------------------------------------------------------------------------------------------------
// a. SIGTERM under load: every call answered OK (and right) or UNAVAILABLE, health goes NOT_SERVING,
// exit code 0.

// Polls health after SIGTERM until the outcome: "NOT_SERVING" or "UNAVAILABLE" (the server is gone), or what
// is wrong. SERVING is fine until the server logged the signal, not after.
std::string HealthAfterSigterm(TestServer& server, absl::Time signal_time, int* checks) {
  const std::shared_ptr<grpc::Channel> channel = MakeChannel(server.grpc_port);
  while (absl::Now() - signal_time < absl::Seconds(15)) {
    const bool logged = server.process->ReadLog().find("received SIGTERM") != std::string::npos;
    const std::string status = HealthStatus(channel, "", absl::Seconds(5));
    ++*checks;
    if (status.rfind("DEADLINE_EXCEEDED", 0) == 0) continue;  // 16 clients and the drain share 2 cores: ask again
    if (status == "NOT_SERVING") return status;
    if (status.rfind("UNAVAILABLE:", 0) == 0) return "UNAVAILABLE";
    if (status != "SERVING") return absl::StrCat("unexpected ", status);
    if (logged) return "SERVING after 'received SIGTERM' was logged";
  }
  return "timeout";
}

TEST_F(ServerTest, SigtermUnderLoadDrains) {
  const absl::Duration grace = absl::Seconds(30);
  START_OR_RETURN(server, "sigterm", "", {"--shutdown-grace", absl::FormatDuration(grace)});
  constexpr int kClients = 16;
  std::mt19937_64 rng(51);
  std::vector<v1::InferRequest> requests;
  std::vector<AttentionOutputs> wants;
  for (int i = 0; i < 4; ++i) {
    HostRequest r = SelfAttention(rng, "base", 768, 1, 64);
    requests.push_back(r.ToProto());
    wants.push_back(Expected(Base(), r));
  }
  // Far more requests per client than run before the signal: each client ends on a refusal.
  ClientsUntilRefused clients(server->stub.get(), &requests, &wants, kClients, /*per_client=*/1000);
  ASSERT_TRUE(clients.AwaitAnswers(32, absl::Seconds(30)))
      << "only " << clients.ok() << " answers before the signal; " << clients.failures().Summary();

  const absl::Time signal_time = absl::Now();
  const int ok_before_signal = clients.ok();
  ASSERT_TRUE(server->process->Signal(SIGTERM).ok());
  int checks = 0;
  const std::string health = HealthAfterSigterm(*server, signal_time, &checks);
  std::printf("health after SIGTERM: %s (after %d checks, %s)\n", health.c_str(), checks,
              absl::FormatDuration(absl::Now() - signal_time).c_str());
  EXPECT_TRUE(health == "NOT_SERVING" || health == "UNAVAILABLE") << health;

  absl::StatusOr<int> exit_code = server->process->WaitForExit(grace + absl::Seconds(10));
  const absl::Duration stop_time = absl::Now() - signal_time;
  clients.Join();  // they stop by themselves on their first UNAVAILABLE (at the latest once the server is gone)
  ASSERT_TRUE(exit_code.ok()) << exit_code.status();
  EXPECT_EQ(*exit_code, 0);
  EXPECT_LT(stop_time, grace) << "took longer than the grace";
  EXPECT_EQ(clients.failures().count(), 0) << clients.failures().Summary();
  EXPECT_EQ(clients.unavailable(), kClients)
      << "every client ends on UNAVAILABLE (" << clients.cancelled() << " CANCELLED)";
  EXPECT_THAT(server->process->ReadLog(), HasSubstr("stopped after"));
  std::printf("SIGTERM: %d OK (%d after the signal), %d UNAVAILABLE; exit %d after %s\n", clients.ok(),
              clients.ok() - ok_before_signal, clients.unavailable(), *exit_code,
              absl::FormatDuration(stop_time).c_str());
}

// ---------------------------------------------------------------------------------------------------
// b. Flags and configuration errors: exit codes, and which stream says what.

enum class Stream { kStdout, kStderr };

struct Finished {
  int exit_code = -1;
  std::string output;  // the kept stream
};

// Runs attnserve with `args` to its exit, keeping only `keep` (Subprocess logs both streams to one file, so
// the other one goes to /dev/null through a shell).
absl::StatusOr<Finished> RunAttnserve(const std::string& name, const std::vector<std::string>& args, Stream keep) {
  std::vector<std::string> argv = {
      "/bin/sh", "-c", keep == Stream::kStdout ? R"(exec "$@" 2>/dev/null)" : R"(exec "$@" 2>&1 >/dev/null)", "sh",
      ATTNSERVE_BINARY};
  argv.insert(argv.end(), args.begin(), args.end());
  absl::StatusOr<std::unique_ptr<Subprocess>> process = Subprocess::Start(argv, TempPath(name + ".log"));
  if (!process.ok()) return process.status();
  absl::StatusOr<int> exit_code = (*process)->WaitForExit(absl::Seconds(60));
  if (!exit_code.ok()) return exit_code.status();
  return Finished{*exit_code, (*process)->ReadLog()};
}

TEST_F(ServerTest, VersionAndHelpExit0) {
  absl::StatusOr<Finished> version = RunAttnserve("version", {"--version"}, Stream::kStdout);
  ASSERT_TRUE(version.ok()) << version.status();
  EXPECT_EQ(version->exit_code, 0);
  EXPECT_EQ(version->output, absl::StrCat("attnserve ", kAttnserveVersion, "\n"));

  absl::StatusOr<Finished> help = RunAttnserve("help", {"--help"}, Stream::kStdout);
  ASSERT_TRUE(help.ok()) << help.status();
  EXPECT_EQ(help->exit_code, 0);
  EXPECT_THAT(help->output, HasSubstr("--grpc-address"));
}

TEST_F(ServerTest, UnknownFlagExits2) {
  absl::StatusOr<Finished> err = RunAttnserve("unknown_flag_err", {"--no-such-flag"}, Stream::kStderr);
  ASSERT_TRUE(err.ok()) << err.status();
  EXPECT_EQ(err->exit_code, 2);
  EXPECT_THAT(err->output, HasSubstr("--no-such-flag"));
  absl::StatusOr<Finished> out = RunAttnserve("unknown_flag_out", {"--no-such-flag"}, Stream::kStdout);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->exit_code, 2);
  EXPECT_EQ(out->output, "") << "the error belongs on stderr";
}

TEST_F(ServerTest, BadConfigFieldExits2NamingIt) {
  const std::string config = TempPath("bad_field.pbtxt");
  const std::string pbtxt = R"pb(
    layers { name: "fine" embed_dim: 64 num_heads: 2 }
    layers { name: "odd" embed_dim: 64 num_heads: 5 }
  )pb";
  ASSERT_TRUE(WriteFile(config, pbtxt).ok());
  absl::StatusOr<Finished> run = RunAttnserve("bad_field", {"--config", config}, Stream::kStderr);
  ASSERT_TRUE(run.ok()) << run.status();
  EXPECT_EQ(run->exit_code, 2);
  EXPECT_THAT(run->output, HasSubstr("layers[1].num_heads")) << "the error names the field's path";
  EXPECT_THAT(run->output, HasSubstr(config)) << "and the file";
}

// ---------------------------------------------------------------------------------------------------
// c. A real Prometheus scrapes /metrics.

// Starts Prometheus scraping 127.0.0.1:`target_port` every second, its web API on `web_port`, its config,
// data and log under `dir`; returns once it is ready.
absl::StatusOr<std::unique_ptr<Subprocess>> StartPrometheus(const std::string& binary, const std::string& dir,
                                                            int target_port, int web_port) {
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir + "/data");
  const std::string config_path = dir + "/prometheus.yml";
  const std::string config = absl::StrCat(
      "global:\n"
      "  scrape_interval: 1s\n"
      "  evaluation_interval: 1s\n"
      "scrape_configs:\n"
      "  - job_name: attnserve\n"
      "    scrape_interval: 1s\n"
      "    scrape_timeout: 1s\n"
      "    static_configs:\n"
      "      - targets: ['127.0.0.1:",
      target_port, "']\n");
  const absl::Status written = WriteFile(config_path, config);
  if (!written.ok()) return written;
  absl::StatusOr<std::unique_ptr<Subprocess>> prometheus =
      Subprocess::Start({binary, "--config.file=" + config_path, "--storage.tsdb.path=" + dir + "/data",
                         absl::StrCat("--web.listen-address=127.0.0.1:", web_port), "--log.level=info"},
                        dir + "/prometheus.log");
  if (!prometheus.ok()) return prometheus.status();
  absl::StatusOr<std::string> ready = absl::UnavailableError("not asked yet");
  WaitFor(
      [&] {
        ready = HttpGet("127.0.0.1", web_port, "/-/ready", absl::Seconds(2));
        return ready.ok() || !(*prometheus)->Running();
      },
      absl::Seconds(30), absl::Milliseconds(100));
  if (!ready.ok()) return absl::UnavailableError(absl::StrCat("prometheus not ready: ", ready.status().ToString()));
  return prometheus;
}

// Whether a Prometheus query answer for attnserve_requests_total holds the sample {layer, code="OK"} = count.
bool HasOkSample(const std::string& body, const std::string& layer, int count) {
  nlohmann::json json = nlohmann::json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || json.value("status", "") != "success") return false;
  for (const auto& series : json["data"]["result"]) {
    if (series["metric"].value("layer", "") == layer && series["metric"].value("code", "") == "OK" &&
        series["value"][1] == std::to_string(count)) {
      return true;
    }
  }
  return false;
}

TEST_F(ServerTest, PrometheusScrapes) {
  const std::string prometheus = ATTNSERVE_PROMETHEUS;
  ASSERT_FALSE(prometheus.empty()) << "the prometheus binary was not found when configuring (find_program)";
  ASSERT_EQ(access(prometheus.c_str(), X_OK), 0) << prometheus << " is not executable";
  START_OR_RETURN(server, "prometheus");
  const int web_port = FreePort();
  ASSERT_GT(web_port, 0);
  absl::StatusOr<std::unique_ptr<Subprocess>> started =
      StartPrometheus(prometheus, TempPath("prometheus"), server->metrics_port, web_port);
  ASSERT_TRUE(started.ok()) << started.status();
  Subprocess* prometheus_process = Own(std::move(*started));

  std::mt19937_64 rng(61);
  constexpr int kRequests = 5;
  for (int i = 0; i < kRequests; ++i) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(absl::Seconds(30)));
    v1::InferResponse response;
    const grpc::Status status = server->stub->Infer(&ctx, SelfAttention(rng, "small", 256, 1, 8).ToProto(), &response);
    ASSERT_TRUE(status.ok()) << Str(status);
  }

  // Polls the query API until the series shows and its small/OK sample counts our requests.
  std::string body;
  bool found = false;
  const bool counted = WaitFor(
      [&] {
        absl::StatusOr<std::string> r =
            HttpGet("127.0.0.1", web_port, "/api/v1/query?query=attnserve_requests_total", absl::Seconds(5));
        body = r.ok() ? *r : r.status().ToString();
        found |= r.ok() && body.find("\"attnserve_requests_total\"") != std::string::npos;
        return found && HasOkSample(body, "small", kRequests);
      },
      absl::Seconds(45), absl::Milliseconds(250));
  std::printf("prometheus /api/v1/query?query=attnserve_requests_total:\n%s\n", body.c_str());
  EXPECT_TRUE(found) << "the query never returned attnserve_requests_total: " << body;
  EXPECT_TRUE(counted) << "no sample {layer=\"small\",code=\"OK\"} = " << kRequests << ": " << body;

  ASSERT_TRUE(prometheus_process->Signal(SIGTERM).ok());
  absl::StatusOr<int> exit_code = prometheus_process->WaitForExit(absl::Seconds(20));
  EXPECT_TRUE(exit_code.ok()) << exit_code.status();
}

}  // namespace
}  // namespace attnserve::testing
