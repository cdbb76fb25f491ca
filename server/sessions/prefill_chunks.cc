#include "server/sessions/prefill_chunks.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "common/status_macros.h"

namespace attnserve {
namespace {

struct ChunkedAppend {
  // The earlier chunks' answers and then their merge (ChunkedAnswerHeldBytes), handed to the client's call
  // with the merged answer; empty without a budget. Released last.
  MemoryBudget::Reservation held;
  std::unique_ptr<InferenceCall> call;  // the client's, until its last chunk is submitted
  InferenceCall* client_call = nullptr;
  CachedAppend whole;  // the whole append (its query's rows, of any dtype)
  int64_t tokens = 0, chunk = 0, done = 0;
  int64_t context = 0;  // tokens cached before the append
  std::vector<AttentionOutputs> parts;
  int64_t parts_compute_us = 0;  // the earlier chunks' batches' engine time
  const Clock* clock = nullptr;
  std::function<void(std::unique_ptr<InferenceCall>)> submit;
};

// Rows [begin, begin + n) of `part`'s weights ([n, s] or [H, n, s]) into `all` ([T, S] or [H, T, S]).
void CopyWeights(const Tensor& part, int64_t begin, Tensor* all) {
  const bool per_head = part.shape.size() == 3;
  const int64_t heads = per_head ? part.shape[0] : 1, n = part.shape[per_head ? 1 : 0];
  const int64_t s = part.shape.back(), t = all->shape[per_head ? 1 : 0], total = all->shape.back();
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(all->values.data() + (h * t + begin + i) * total, part.values.data() + (h * n + i) * s,
                  static_cast<size_t>(s) * sizeof(float));
    }
  }
}

// The client's answer: every chunk's rows in order; weights over the final context (zero past a chunk's).
// Each part is freed once copied.
void MergeParts(ChunkedAppend& c, AttentionOutputs* last) {
  std::vector<AttentionOutputs> parts = std::move(c.parts);
  parts.push_back(std::move(*last));
  const int64_t e = parts.back().output.shape[1];
  AttentionOutputs merged;
  merged.output = Tensor({c.tokens, e});
  const Tensor& last_w = parts.back().attn_weights;
  if (!last_w.shape.empty()) {
    Shape shape = last_w.shape;
    shape[shape.size() - 2] = c.tokens;
    merged.attn_weights = Tensor(shape);  // zeros
  }
  int64_t row = 0;
  for (AttentionOutputs& p : parts) {
    std::memcpy(merged.output.values.data() + row * e, p.output.values.data(), p.output.values.size() * sizeof(float));
    if (!merged.attn_weights.shape.empty()) CopyWeights(p.attn_weights, row, &merged.attn_weights);
    row += p.output.shape[0];
    p = AttentionOutputs();
  }
  *last = std::move(merged);
}

void SubmitNext(std::shared_ptr<ChunkedAppend> c);

// An internal call for rows [c->done, c->done + n): admitted and queued like any call, answered to `c`.
std::unique_ptr<InferenceCall> ChunkCall(const std::shared_ptr<ChunkedAppend>& c, int64_t n) {
  const InferenceCall& whole = *c->client_call;
  auto call = std::make_unique<InferenceCall>();
  call->internal = true;
  call->layer_name = whole.layer_name;
  call->id = whole.id;
  call->arrival = c->clock->Now();
  call->deadline = whole.deadline;
  call->is_cancelled = whole.is_cancelled;
  call->layer = whole.layer;
  call->session = std::make_unique<InferenceCall::SessionWork>(*whole.session);
  call->session->append.query = c->whole.query_row(c->done, whole.layer->appender().embed_dim());
  call->session->append.tokens = n;
  call->answer_values_in_place = true;  // kept as computed, a part of the client's answer
  SizeAppend(whole.layer->appender(), call.get());
  call->finish = [c, self = call.get(), n](const absl::Status& status) {
    if (!status.ok()) {
      c->client_call->finish(status);  // the client's call was not submitted: its finish answers it
      return;
    }
    c->parts.push_back(std::move(self->outputs));
    c->parts_compute_us += self->timing.compute_us;
    c->done += n;
    SubmitNext(c);
  };
  return call;
}

void SubmitNext(std::shared_ptr<ChunkedAppend> c) {
  const AppendEngine& engine = c->client_call->layer->appender();
  const int64_t min_tokens = c->client_call->session->append.cache->block_tokens();
  const int64_t n =
      std::min(PrefillChunkTokens(engine, c->chunk, c->context + c->done, min_tokens), c->tokens - c->done);
  if (c->done + n < c->tokens) {
    c->submit(ChunkCall(c, n));
    return;
  }
  InferenceCall& last = *c->client_call;
  last.session->append.query = c->whole.query_row(c->done, engine.embed_dim());
  last.session->append.tokens = n;
  SizeAppend(engine, &last);
  last.finish = [c, answer = std::move(last.finish)](const absl::Status& status) {
    if (status.ok()) {
      // The client's timing covers every chunk: the earlier chunks' compute was queue time of its last chunk.
      CallTiming& timing = c->client_call->timing;
      timing.compute_us += c->parts_compute_us;
      timing.queue_us = std::max<int64_t>(0, timing.queue_us - c->parts_compute_us);
      MergeParts(*c, &c->client_call->outputs);
      c->client_call->memory.Absorb(std::move(c->held));  // held with the answer until it has been written
    }
    answer(status);
  };
  c->submit(std::move(c->call));
}

// The largest n <= chunk_tokens whose append at `context` costs no more than chunk_tokens at 0, at least
// min(min_tokens, chunk_tokens).
int64_t LargestChunkWithin(int64_t chunk_tokens, int64_t context, int64_t min_tokens,
                           absl::FunctionRef<int64_t(int64_t tokens, int64_t context_after)> flops) {
  const int64_t budget = flops(chunk_tokens, chunk_tokens);
  // The cost grows with n: the largest n within the budget, by bisection.
  int64_t lo = 0, hi = chunk_tokens;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (flops(mid, context + mid) <= budget) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return std::clamp(lo, std::min(min_tokens, chunk_tokens), chunk_tokens);
}

// Reserves before any chunk runs: the chunks' answers and their merge (c.held), and the client's request unless
// it holds it already (it waited for its turn), which is read until its last chunk runs: into the call, whose
// last chunk's cost counts it.
absl::Status ReserveChunked(MemoryBudget& memory, InferenceCall& call, ChunkedAppend& c) {
  const AnswerWire wire{call.output_dtype, call.answer_values_in_place};
  ATTN_ASSIGN_OR_RETURN(c.held,
                        memory.Reserve(ChunkedAnswerHeldBytes(call.session->append, call.layer->appender(), wire)));
  ATTN_ASSIGN_OR_RETURN(MemoryBudget::Reservation request,
                        memory.Reserve(std::max<int64_t>(0, call.request_bytes - call.memory.bytes())));
  call.memory.Absorb(std::move(request));
  return absl::OkStatus();
}

}  // namespace

void SizeAppend(const AppendEngine& engine, InferenceCall* call) {
  const CachedAppend& a = call->session->append;
  const int64_t context = a.cache->tokens() + (a.cross_attention ? 0 : a.tokens);
  call->parsed.batch = 1;
  call->parsed.q_len = a.tokens;
  call->parsed.kv_len = context;
  call->parsed.flops = engine.AppendFlops(a.tokens, context, a.cross_attention);
}

int64_t PrefillChunkTokens(int64_t embed_dim, int64_t chunk_tokens, int64_t context, int64_t min_tokens) {
  return LargestChunkWithin(chunk_tokens, context, min_tokens, [&](int64_t tokens, int64_t context_after) {
    return CachedAppendFlops(embed_dim, tokens, context_after, false);
  });
}

int64_t PrefillChunkTokens(const AppendEngine& engine, int64_t chunk_tokens, int64_t context, int64_t min_tokens) {
  return LargestChunkWithin(chunk_tokens, context, min_tokens, [&](int64_t tokens, int64_t context_after) {
    return engine.AppendFlops(tokens, context_after, false);
  });
}

void SubmitInChunks(std::unique_ptr<InferenceCall> call, int64_t chunk_tokens, const Clock& clock, MemoryBudget* memory,
                    const std::function<void(std::unique_ptr<InferenceCall>)>& submit) {
  auto c = std::make_shared<ChunkedAppend>();
  if (memory != nullptr) {
    if (absl::Status reserved = ReserveChunked(*memory, *call, *c); !reserved.ok()) {
      call->finish(reserved);
      return;
    }
  }
  c->client_call = call.get();
  c->whole = call->session->append;
  c->tokens = call->session->append.tokens;
  c->context = call->session->append.cache->tokens();
  c->chunk = chunk_tokens;
  c->clock = &clock;
  c->submit = submit;
  c->call = std::move(call);
  SubmitNext(std::move(c));
}

}  // namespace attnserve
