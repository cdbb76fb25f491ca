// attnserve_echo_server: attnserve.bench.EchoService on gRPC's callback API, built from the same gRPC
// library as attnserve. `attnbench --echo` against it measures what a call costs with no attention work:
// the floor under attnserve's latency and above its throughput.
//
//   attnserve_echo_server [--address HOST:PORT]   (default 0.0.0.0:50061; port 0 picks a free port)
//
// Logs "ready: port=N" on stderr once serving; stops on SIGTERM or SIGINT.
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "bench/echo.grpc.pb.h"

namespace {

constexpr char kUsage[] =
    "Usage: attnserve_echo_server [--address HOST:PORT]\n"
    "\n"
    "Serves attnserve.bench.EchoService/Echo (answers each message with itself), for measuring the\n"
    "gRPC serving floor with `attnbench --echo --target HOST:PORT`.\n"
    "\n"
    "  --address HOST:PORT  listen address (default 0.0.0.0:50061); port 0 picks a free port, logged as\n"
    "                       \"ready: port=N\" on stderr\n"
    "  --help               this text\n";

// The same limit as attnserve, so payloads of attention-sized requests can be echoed.
constexpr int kMaxMessageBytes = 64 << 20;

class EchoServiceImpl final : public attnserve::bench::EchoService::CallbackService {
  grpc::ServerUnaryReactor* Echo(grpc::CallbackServerContext* context, const attnserve::bench::EchoMessage* request,
                                 attnserve::bench::EchoMessage* response) override {
    *response = *request;
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
};

int Run(int argc, char** argv) {
  // Taken by sigwait below; blocked before gRPC starts its threads so they all inherit the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  std::string address = "0.0.0.0:50061";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (arg == "--address" && i + 1 < argc) {
      address = argv[++i];
    } else if (arg.rfind("--address=", 0) == 0) {
      address = arg.substr(std::strlen("--address="));
    } else {
      std::fprintf(stderr, "attnserve_echo_server: unexpected argument \"%s\"\n\n%s", arg.c_str(), kUsage);
      return 1;
    }
  }

  EchoServiceImpl service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::fprintf(stderr, "attnserve_echo_server: cannot listen on %s\n", address.c_str());
    return 2;
  }
  std::fprintf(stderr, "ready: port=%d address=%s\n", port, address.c_str());
  std::fflush(stderr);

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  server->Wait();
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return Run(argc, argv); }
