// Fuzzes the config loader: the first byte picks the format (low bit 0: protobuf text, 1: JSON), the rest is
// the file, read by LoadServerConfigFile (which only takes a path: the bytes go to a temporary .pbtxt or
// .json first), then ApplyDefaultsAndValidate. Any status is fine; a crash, a sanitizer report or a huge
// allocation is a bug, and so is a config that validates but one of whose layers does not validate alone
// (ApplyLayerDefaultsAndValidate, the path of a layer loaded at run time) or, for a small layer with seeded
// weights, cannot be built (LoadLayer). Weights are never read from a path the input names.
// ATTNSERVE_FUZZ_VERBOSE=1 prints each input's status (to check what the seeds reach).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/status/status.h"
#include "attnserve/v1/config.pb.h"
#include "server/runtime/layer_registry.h"
#include "server/startup/layer_options.h"
#include "server/startup/server_config.h"
#include "tests/fuzz/scratch_file.h"

namespace attnserve {
namespace {

// Layers up to this size are built after validation (seeded weights, oneDNN primitives: about a millisecond).
constexpr int64_t kMaxBuiltDim = 64;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "config_fuzz: %s\n", what.c_str());
  std::abort();
}

const fuzz::ScratchFile& ScratchFor(bool json) {
  static const fuzz::ScratchFile text("config.pbtxt");
  static const fuzz::ScratchFile json_file("config.json");
  return json ? json_file : text;
}

bool SmallSeededLayer(const v1::LayerConfig& layer) {
  return layer.weights_path().empty() && layer.embed_dim() <= kMaxBuiltDim && layer.kdim() <= kMaxBuiltDim &&
         layer.vdim() <= kMaxBuiltDim;
}

// What the server does with each layer of a validated config.
void CheckValidatedLayers(const v1::ServerConfig& config) {
  for (const v1::LayerConfig& layer : config.layers()) {
    v1::LayerConfig alone = layer;
    const absl::Status status = ApplyLayerDefaultsAndValidate(&alone);
    if (!status.ok()) Die("a layer of a valid config does not validate alone: " + status.ToString());
    (void)ToEngineOptions(layer);
    (void)ToBatchingOptions(layer.batching());
    if (!SmallSeededLayer(layer)) continue;
    auto built = LoadLayer(layer);
    if (!built.ok()) Die("a valid layer cannot be built: " + built.status().ToString());
  }
}

}  // namespace
}  // namespace attnserve

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const bool json = (data[0] & 1) != 0;
  const attnserve::fuzz::ScratchFile& scratch = attnserve::ScratchFor(json);
  if (!scratch.Write(data + 1, size - 1)) return 0;
  const bool verbose = std::getenv("ATTNSERVE_FUZZ_VERBOSE") != nullptr;
  auto config = attnserve::LoadServerConfigFile(scratch.path());
  if (verbose) std::fprintf(stderr, "  load: %s\n", config.status().ToString().c_str());
  if (!config.ok()) return 0;
  const absl::Status status = attnserve::ApplyDefaultsAndValidate(&*config);
  if (verbose) std::fprintf(stderr, "  validate: %s\n", status.ToString().c_str());
  if (!status.ok()) return 0;
  attnserve::CheckValidatedLayers(*config);
  return 0;
}
