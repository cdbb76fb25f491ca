// Chunked prefill: a long append of a self-attention session computed as chunks, each its own trip through
// the layer's queue (admit, queue, batch, engine), so that decode steps of other sessions queued meanwhile run
// between two chunks: a decode step waits behind at most the chunk that is running, never behind a whole
// 8192-token prompt (vLLM's chunked prefill, on the layer's ordinary queue).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "server/batching/clock.h"
#include "server/runtime/inference_call.h"

namespace attnserve {

// Sets the scheduler's view of a session call from its SessionWork: parsed.batch 1, q_len T, kv_len the
// context after it, and its FLOPs (projections and attention), for the batch's cost, metrics and statistics.
void SizeAppend(const AppendEngine& engine, InferenceCall* call);

// Tokens of the next chunk of an append at `context` tokens already cached: as many as cost no more FLOPs
// (projections and attention over the context) than `chunk_tokens` tokens of a fresh session, so a chunk
// holds the GEMM cores for about the same time at any context (128 tokens at the start of a prompt, 27 at
// 8192 tokens with E=1024), and never fewer than `min_tokens` (or chunk_tokens when that is less).
int64_t PrefillChunkTokens(const AppendEngine& engine, int64_t chunk_tokens, int64_t context, int64_t min_tokens);
// The same for a MultiheadAttention layer of width `embed_dim`.
int64_t PrefillChunkTokens(int64_t embed_dim, int64_t chunk_tokens, int64_t context, int64_t min_tokens);

// `call` is an admitted append (SessionWork set, blocks reserved, `finish` answers the client and ends the
// lane's turn) longer than one chunk (PrefillChunkTokens). Its first chunks go through `submit` as internal
// calls, each sized by PrefillChunkTokens at the context it starts at; its last chunk is `call` itself, whose answer
// then holds every chunk's rows (and weights, padded to the final context). A chunk's error answers `call` with it.
// With a `memory` budget (may be null), the chunks' answers and their merge are reserved first
// (ChunkedAnswerHeldBytes; past the budget, `call` is answered RESOURCE_EXHAUSTED before any chunk runs) and
// handed to `call` with its answer: each chunk's own cost is reserved as it is admitted, like any call's.
void SubmitInChunks(std::unique_ptr<InferenceCall> call, int64_t chunk_tokens, const Clock& clock, MemoryBudget* memory,
                    const std::function<void(std::unique_ptr<InferenceCall>)>& submit);

}  // namespace attnserve
