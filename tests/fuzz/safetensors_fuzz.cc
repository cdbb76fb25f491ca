// Fuzzes the safetensors reader: bytes -> SafetensorsFile::Parse (the in-memory twin of Open); when they
// parse, every tensor is read as f32 and as bool, and the file is loaded as the weights of two small layers
// (LoadMhaWeights, which only takes a path: the bytes go to a temporary file first). Any status is fine; a
// crash, a sanitizer report, a huge allocation, or a read whose size differs from the entry's is a bug.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "core/mha_config.h"
#include "core/mha_weights.h"
#include "core/safetensors.h"
#include "tests/fuzz/scratch_file.h"

namespace attnserve {
namespace {

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "safetensors_fuzz: %s\n", what.c_str());
  std::abort();
}

const fuzz::ScratchFile& Scratch() {
  static const fuzz::ScratchFile scratch("input.safetensors");
  return scratch;
}

void ReadEveryTensor(const SafetensorsFile& file) {
  for (const std::string& name : file.Names()) {
    const SafetensorsEntry* entry = file.Find(name);
    if (entry == nullptr) Die("Names() lists '" + name + "' but Find does not find it");
    const int64_t elements = entry->num_elements();
    const size_t dtype_size = SafetensorsDtypeSize(entry->dtype);
    if (dtype_size == 0 || entry->num_bytes != static_cast<size_t>(elements) * dtype_size) {
      Die("entry '" + name + "': num_bytes does not match its shape and dtype");
    }
    auto floats = file.ReadFloat32(name);
    if (floats.ok() && floats->size() != static_cast<size_t>(elements)) Die("ReadFloat32 size of '" + name + "'");
    auto bools = file.ReadBool(name);
    if (bools.ok() && bools->size() != static_cast<size_t>(elements)) Die("ReadBool size of '" + name + "'");
  }
  for (const auto& [key, value] : file.metadata()) (void)(key.size() + value.size());
}

// The same bytes as the weights of a self-attention layer and of one with kdim/vdim != E and no bias.
void LoadAsWeights(const uint8_t* data, size_t size) {
  if (!Scratch().Write(data, size)) return;
  MhaConfig same{/*embed_dim=*/8, /*num_heads=*/2, /*kdim=*/0, /*vdim=*/0, /*bias=*/true};
  MhaConfig cross{/*embed_dim=*/8, /*num_heads=*/2, /*kdim=*/6, /*vdim=*/4, /*bias=*/false};
  for (const MhaConfig& config : {same, cross}) {
    auto weights = LoadMhaWeights(Scratch().path(), "", config);
    if (weights.ok() && !weights->CheckShapes(config).ok()) Die("LoadMhaWeights returned mis-shaped weights");
  }
}

}  // namespace
}  // namespace attnserve

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = attnserve::SafetensorsFile::Parse(std::string(reinterpret_cast<const char*>(data), size), "<fuzz>");
  if (!file.ok()) return 0;
  attnserve::ReadEveryTensor(**file);
  attnserve::LoadAsWeights(data, size);
  return 0;
}
