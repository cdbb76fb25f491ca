// The server's memory budget: every admitted request reserves what it may cost (its request message, the
// engine's workspace for it, its answer, encoded) until its answer has been written, and admission past
// the budget is refused at once (RESOURCE_EXHAUSTED), so no traffic mix can take the process past
// baseline + budget, whatever the queues hold.
//
// Thread-safety: every method may be called from any thread at once; a Reservation is released by whichever
// thread destroys it.
#pragma once

#include "core/decoder_attention.h"
#include "core/multihead_attention.h"

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "attnserve/v1/config.pb.h"
#include "core/attention_inputs.h"
#include "core/mha_config.h"

namespace attnserve {

class MemoryBudget {
 public:
  // Holds `bytes` of the budget until destroyed (or moved from and the target destroyed).
  class Reservation {
   public:
    Reservation() = default;
    Reservation(Reservation&& other) noexcept : budget_(other.budget_), bytes_(other.bytes_) {
      other.budget_ = nullptr;
    }
    Reservation& operator=(Reservation&& other) noexcept;
    Reservation(const Reservation&) = delete;
    Reservation& operator=(const Reservation&) = delete;
    ~Reservation() { Release(); }
    int64_t bytes() const { return budget_ ? bytes_ : 0; }
    void Release();
    // Holds `other`'s bytes too (both of the same budget), released together; `other` is left empty.
    void Absorb(Reservation&& other);

   private:
    friend class MemoryBudget;
    Reservation(MemoryBudget* budget, int64_t bytes) : budget_(budget), bytes_(bytes) {}
    MemoryBudget* budget_ = nullptr;
    int64_t bytes_ = 0;
  };

  // `budget_bytes` > 0. The budget must outlive every Reservation. `on_change` (may be empty) hears the
  // reserved bytes after every change (a gauge), from any thread.
  explicit MemoryBudget(int64_t budget_bytes, std::function<void(int64_t reserved_bytes)> on_change = nullptr)
      : budget_bytes_(budget_bytes), on_change_(std::move(on_change)) {}

  // RESOURCE_EXHAUSTED "memory budget: the request needs N bytes, M of B are reserved" when it does not fit.
  absl::StatusOr<Reservation> Reserve(int64_t bytes);

  int64_t budget_bytes() const { return budget_bytes_; }
  int64_t reserved_bytes() const { return reserved_.load(std::memory_order_relaxed); }

 private:
  void Changed(int64_t reserved) const {
    if (on_change_) on_change_(reserved);
  }

  const int64_t budget_bytes_;
  const std::function<void(int64_t)> on_change_;
  std::atomic<int64_t> reserved_{0};
};

// How a call's answer is written: its element type on the wire, and whether a FLOAT32 answer's values go on the
// wire from the engine's tensors (`in_place`) or are copied into the response message.
struct AnswerWire {
  DType dtype = DType::kFloat32;
  bool in_place = false;
};

// What an answer of `answer_bytes` (the engine's FLOAT32 tensors) holds until it has been written: those
// tensors, and their encoded copy in the response unless they are sent in place (a 16-bit type's copy is half
// their size). A protocol that copies frees the tensors once encoded, and the response once serialized, so no
// more than two of the tensors, the copy and the serialized bytes are held at once.
int64_t AnswerHeldBytes(int64_t answer_bytes, AnswerWire wire);

// What one validated request may cost while the server holds it, in bytes: its request message as received
// (`request_bytes`), the engine's workspace for it alone (gathered inputs, projections, and
// `engine_scratch_bytes`: one scores block, MultiheadAttention::ScoresBlockBytes, plus a bf16 layer's copies,
// Bf16ScratchBytes) and its answer as written (AnswerHeldBytes).
int64_t RequestCostBytes(const ParsedAttention& parsed, const MhaConfig& config, int64_t engine_scratch_bytes,
                         int64_t request_bytes, AnswerWire answer_wire);

// The same for a session's append (the cache blocks it reserved are the KV pool's, not counted here): its
// request, the batch's inputs, projections [T, 3E] and output projection [T, E], its scores block
// (MultiheadAttention::AppendScoresBytes over the cache after it) and its answer as written.
int64_t AppendCostBytes(const CachedAppend& append, const AppendEngine& engine, int64_t request_bytes,
                        AnswerWire answer_wire);

// The FLOAT32 attention weights of an append of `tokens` over `context` keys: [T, S] averaged, else [H, T, S].
int64_t AppendWeightsBytes(const AppendEngine& engine, int64_t tokens, int64_t context, bool averaged);

// The FLOAT32 answer of a session's append, computed from its cache's tokens before it: output [T, E] and,
// when asked, the weights over the context after it (AppendWeightsBytes).
int64_t AppendAnswerBytes(const CachedAppend& append, const AppendEngine& engine);

// What an append computed in chunks (SubmitInChunks) holds beyond its last chunk's cost, from its first chunk
// until its answer has been written: the earlier chunks' answers (at most the whole answer), then their merge,
// the whole answer, as written.
int64_t ChunkedAnswerHeldBytes(const CachedAppend& append, const AppendEngine& engine, AnswerWire answer_wire);

// The same for a DECODER_ATTENTION layer's request: its request, the decoder's workspace
// (DecoderAttention::WorkspaceBytes: projections and a scores block per thread) and its answer as written.
int64_t DecoderCostBytes(const ParsedDecoder& parsed, const DecoderAttention& decoder, int64_t request_bytes,
                         AnswerWire answer_wire);

// The memory the process may use: the cgroup v2 memory.max, else cgroup v1's memory.limit_in_bytes, else the
// machine's physical memory. `source` (may be null) says which it was.
int64_t ProcessMemoryLimitBytes(std::string* source);

// The default budget: half of ProcessMemoryLimitBytes.
int64_t DefaultMemoryBudgetBytes(std::string* source);

// What building a layer of `layer` (defaults applied) holds at its peak: the weights as loaded and the engine's
// copies of them while it builds (8 E^2 floats for self-attention), or the mapped pages of the tensors
// read beside the weights taken from them, whichever is more. The weights file is mapped, not read, so its
// size (`weights_file_bytes`) does not count: a layer of a multi-GiB checkpoint costs its own tensors.
int64_t LayerBuildBytes(const attnserve::v1::LayerConfig& layer, int64_t weights_file_bytes);

// RESOURCE_EXHAUSTED naming the layer and every number when building it could take the process past
// `limit_bytes`, counting what it holds (`resident_bytes`) and what admitted requests may hold
// (`request_budget_bytes`, counted up to half the limit): a layer too large is refused before anything is
// allocated, never an OOM kill.
absl::Status CheckLayerFits(const attnserve::v1::LayerConfig& layer, int64_t weights_file_bytes,
                            int64_t limit_bytes, int64_t resident_bytes, int64_t request_budget_bytes);

// The budget from a cgroup limit file's first line ("max" or a number); 0 for no limit or unparsable.
int64_t MemoryLimitFromCgroup(const std::string& line);

}  // namespace attnserve
