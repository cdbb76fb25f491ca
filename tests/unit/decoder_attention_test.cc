// The decoder attention layer (GQA, RoPE, window, soft cap) against the float64 naive reference over random
// configurations; its validation errors; its weights loaded from a checkpoint under a prefix.
#include "core/decoder_attention.h"

#include <atomic>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>

#include "common/half_float.h"
#include "core/flash_attention.h"
#include "core/omp_threads.h"
#include "core/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_decoder.h"
#include "tests/testing/safetensors_writer.h"

namespace attnserve {
namespace {

using testing::MaxAbsDiff;
using testing::RandomValues;

int64_t Pick(std::mt19937_64& rng, int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

DecoderConfig RandomConfig(std::mt19937_64& rng) {
  DecoderConfig c;
  c.num_kv_heads = Pick(rng, 1, 3);
  c.num_heads = c.num_kv_heads * std::vector<int64_t>{1, 2, 4}[Pick(rng, 0, 2)];
  c.head_dim = 2 * Pick(rng, 1, 8);
  c.embed_dim = Pick(rng, 0, 1) ? c.num_heads * c.head_dim : Pick(rng, 1, 40);  // D != E / H too
  c.qkv_bias = Pick(rng, 0, 1);
  c.o_bias = Pick(rng, 0, 1);
  c.rope.rotary_dim = Pick(rng, 0, 2) ? c.head_dim : 2 * Pick(rng, 1, c.head_dim / 2);
  c.rope.interleaved = Pick(rng, 0, 1);
  c.rope.theta = Pick(rng, 0, 1) ? 10000 : 500000;
  const int64_t scaling = Pick(rng, 0, 2);
  c.rope.scaling = static_cast<RopeOptions::Scaling>(scaling);
  c.rope.factor = scaling == 0 ? 1 : 2 + Pick(rng, 0, 6);
  c.rope.original_max_position_embeddings = 64 * Pick(rng, 1, 16);
  c.sliding_window = Pick(rng, 0, 1) ? Pick(rng, 1, 12) : 0;
  c.attn_logit_softcapping = Pick(rng, 0, 2) == 0 ? 0.5 + Pick(rng, 0, 30) : 0;
  c.scaling = Pick(rng, 0, 3) == 0 ? 0.05 * Pick(rng, 1, 10) : 0;
  return c;
}

DecoderWeights RandomWeights(const DecoderConfig& c, std::mt19937_64& rng) {
  const int64_t e = c.embed_dim, q = c.q_width(), kv = c.kv_width();
  const float s = 1.0f / std::sqrt(static_cast<float>(e));
  DecoderWeights w;
  w.q_proj_weight = RandomValues(rng, q * e, s);
  w.k_proj_weight = RandomValues(rng, kv * e, s);
  w.v_proj_weight = RandomValues(rng, kv * e, s);
  w.o_proj_weight = RandomValues(rng, e * q, 1.0f / std::sqrt(static_cast<float>(q)));
  if (c.qkv_bias) {
    w.q_proj_bias = RandomValues(rng, q, 0.1f);
    w.k_proj_bias = RandomValues(rng, kv, 0.1f);
    w.v_proj_bias = RandomValues(rng, kv, 0.1f);
  }
  if (c.o_bias) w.o_proj_bias = RandomValues(rng, e, 0.1f);
  return w;
}

// A request's data, owned; `inputs` points into it.
struct Request {
  std::vector<float> query, float_mask;
  std::vector<uint8_t> bool_mask;
  std::vector<int64_t> positions;
  DecoderInputs inputs;
};

void DrawRequest(std::mt19937_64& rng, const DecoderConfig& c, Request* r, int64_t max_len = 24) {
  const bool unbatched = Pick(rng, 0, 5) == 0;
  const int64_t b = unbatched ? 1 : Pick(rng, 1, 3), l = Pick(rng, 1, max_len);
  r->query = RandomValues(rng, b * l * c.embed_dim);
  r->inputs.query = TensorView::F32(r->query.data(), unbatched ? Shape{l, c.embed_dim} : Shape{b, l, c.embed_dim});
  const Shape tokens = unbatched ? Shape{l} : Shape{b, l};
  switch (Pick(rng, 0, 2)) {
    case 1:
      for (int64_t i = 0; i < b * l; ++i) r->bool_mask.push_back(Pick(rng, 0, 3) == 0);
      r->inputs.key_padding_mask = TensorView::Bool(r->bool_mask.data(), tokens);
      break;
    case 2:
      r->float_mask = RandomValues(rng, b * l);
      r->float_mask[Pick(rng, 0, b * l - 1)] = -std::numeric_limits<float>::infinity();
      r->inputs.key_padding_mask = TensorView::F32(r->float_mask.data(), tokens);
      break;
  }
  if (Pick(rng, 0, 2) == 0) {
    for (int64_t i = 0; i < b * l; ++i) r->positions.push_back(Pick(rng, 0, 3000));
    r->inputs.position_ids = TensorView::I64(r->positions.data(), tokens);
  } else {
    r->inputs.position_offset = Pick(rng, 0, 1) ? 0 : Pick(rng, 0, 2000);
  }
  r->inputs.need_weights = Pick(rng, 0, 1);
  r->inputs.average_attn_weights = Pick(rng, 0, 1);
}

DecoderConfig Dims(int64_t e, int64_t h, int64_t hkv, int64_t d) {
  DecoderConfig c;
  c.embed_dim = e;
  c.num_heads = h;
  c.num_kv_heads = hkv;
  c.head_dim = d;
  c.rope.rotary_dim = d;
  return c;
}

TEST(DecoderAttentionTest, MatchesNaiveReferenceOver200RandomConfigurations) {
  std::mt19937_64 rng(20261202);
  for (int trial = 0; trial < 200; ++trial) {
    DecoderAttention::Options options;
    options.config = RandomConfig(rng);
    // Small blocks in some trials: many query blocks, window bounds crossing them.
    options.scores_block_bytes = Pick(rng, 0, 1) ? 4 * Pick(rng, 1, 200) : int64_t{2} << 20;
    options.min_block_rows = Pick(rng, 1, 8);
    options.single_thread_below_flops = Pick(rng, 0, 1) ? 0 : int64_t{64} << 20;
    const DecoderWeights weights = RandomWeights(options.config, rng);
    Request req;
    DrawRequest(rng, options.config, &req);
    SCOPED_TRACE(::testing::Message() << "trial " << trial << ": " << options.config.DebugString() << " query "
                                    << ShapeToString(req.inputs.query.shape));
    auto layer = DecoderAttention::Create(options, weights);
    ASSERT_TRUE(layer.ok()) << layer.status();
    auto out = (*layer)->Forward(req.inputs, static_cast<int>(Pick(rng, 1, 2)));
    ASSERT_TRUE(out.ok()) << out.status();
    const testing::NaiveOutputs ref = testing::NaiveDecoderAttention(options.config, weights, req.inputs);
    EXPECT_LT(MaxAbsDiff(out->output.values, ref.output), 1e-4);
    if (req.inputs.need_weights) {
      EXPECT_LT(MaxAbsDiff(out->attn_weights.values, ref.attn_weights), 1e-5);
    }
  }
}

// A ragged batch (requests of different B and L, masks, positions, weights) equals each request alone; a
// stopped request gets its stop, the others their answers.
TEST(DecoderAttentionTest, RaggedBatchEqualsEachRequestAloneAndStopsOnlyItsOwn) {
  std::mt19937_64 rng(20261204);
  for (int trial = 0; trial < 60; ++trial) {
    DecoderAttention::Options options;
    options.config = RandomConfig(rng);
    options.scores_block_bytes = Pick(rng, 0, 1) ? 4 * Pick(rng, 1, 200) : int64_t{2} << 20;
    options.min_block_rows = Pick(rng, 1, 8);
    options.single_thread_below_flops = Pick(rng, 0, 1) ? 0 : int64_t{64} << 20;
    auto layer = DecoderAttention::Create(options, RandomWeights(options.config, rng));
    ASSERT_TRUE(layer.ok()) << layer.status();
    std::vector<Request> requests(static_cast<size_t>(Pick(rng, 1, 5)));
    std::vector<ParsedDecoder> parsed;
    for (Request& r : requests) {
      DrawRequest(rng, options.config, &r);
      auto p = (*layer)->Validate(r.inputs);
      ASSERT_TRUE(p.ok()) << p.status();
      parsed.push_back(*p);
    }
    std::vector<const ParsedDecoder*> batch;
    for (const ParsedDecoder& p : parsed) batch.push_back(&p);
    const size_t stopped = Pick(rng, 0, 2) == 0 ? static_cast<size_t>(Pick(rng, 0, batch.size() - 1)) : batch.size();
    const StopFn stop = [&](size_t i) {
      return i == stopped ? absl::CancelledError("stopped") : absl::OkStatus();
    };
    SCOPED_TRACE(::testing::Message() << "trial " << trial << ": " << options.config.DebugString() << ", "
                                    << batch.size() << " requests, stopped " << stopped);
    auto got = (*layer)->ForwardBatch(batch, static_cast<int>(Pick(rng, 1, 2)), stop);
    ASSERT_EQ(got.size(), batch.size());
    for (size_t i = 0; i < batch.size(); ++i) {
      if (i == stopped) {
        EXPECT_EQ(got[i].status().code(), absl::StatusCode::kCancelled);
        continue;
      }
      ASSERT_TRUE(got[i].ok()) << got[i].status();
      auto alone = (*layer)->ForwardParsed(parsed[i], 1);
      ASSERT_TRUE(alone.ok());
      EXPECT_EQ(got[i]->output.shape, alone->output.shape);
      EXPECT_LT(MaxAbsDiff(got[i]->output.values, alone->output.values), 1e-5) << "request " << i;
      EXPECT_EQ(got[i]->attn_weights.shape, alone->attn_weights.shape);
      EXPECT_LT(MaxAbsDiff(got[i]->attn_weights.values, alone->attn_weights.values), 1e-6) << "request " << i;
    }
  }
}

TEST(DecoderAttentionTest, GroupedHeadsShareTheirKeyValueHead) {
  // H=8, Hkv=2: equal to the same layer with Hkv=8 whose K/V weights repeat each kv head 4 times.
  std::mt19937_64 rng(7);
  DecoderAttention::Options gqa;
  gqa.config = Dims(32, 8, 2, 4);
  const DecoderWeights w = RandomWeights(gqa.config, rng);
  DecoderAttention::Options mha = gqa;
  mha.config.num_kv_heads = 8;
  DecoderWeights repeated = w;
  repeated.k_proj_weight.clear();
  repeated.v_proj_weight.clear();
  const int64_t e = 32, d = 4;
  for (int64_t h = 0; h < 8; ++h) {
    const int64_t g = h / 4;
    repeated.k_proj_weight.insert(repeated.k_proj_weight.end(), w.k_proj_weight.begin() + g * d * e,
                                  w.k_proj_weight.begin() + (g + 1) * d * e);
    repeated.v_proj_weight.insert(repeated.v_proj_weight.end(), w.v_proj_weight.begin() + g * d * e,
                                  w.v_proj_weight.begin() + (g + 1) * d * e);
  }
  const std::vector<float> x = RandomValues(rng, 2 * 9 * e);
  DecoderInputs in;
  in.query = TensorView::F32(x.data(), {2, 9, e});
  auto a = (*DecoderAttention::Create(gqa, w))->Forward(in);
  auto b = (*DecoderAttention::Create(mha, repeated))->Forward(in);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_LT(MaxAbsDiff(a->output.values, b->output.values), 1e-5);
}

// A layer on FlashAttention from one token up (RandomConfig's: soft caps, windows up to max_len), with blocks of
// random sizes that cut the causal diagonal, the windows and the kv groups' heads unevenly.
DecoderAttention::Options FlashLayer(std::mt19937_64& rng, int64_t max_len) {
  DecoderAttention::Options o;
  o.config = RandomConfig(rng);
  if (o.config.sliding_window > 0) o.config.sliding_window = Pick(rng, 1, max_len);
  if (Pick(rng, 0, 3) == 0) {
    o.config.head_dim = std::vector<int64_t>{64, 96, 128}[Pick(rng, 0, 2)];
    o.config.rope.rotary_dim = o.config.head_dim;
  }
  o.flash_min_keys = 1;
  o.flash_query_rows = Pick(rng, 1, 20);
  o.flash_key_cols = Pick(rng, 1, 40);
  o.flash_strips = Pick(rng, 0, 3) != 0;
  o.single_thread_below_flops = Pick(rng, 0, 1) ? 0 : int64_t{64} << 20;
  return o;
}

// Requests on FlashAttention (GQA groups, RoPE, windows, soft caps, padding masks, positions, random blocks, strips
// or sgemm, 1 or 2 threads; up to 24 tokens, or 160 in a third of the trials, where windows start past whole key
// panels) against the float64 reference and the same layer's blocked path (flash_min_keys 0); bf16 layers against
// the f32 blocked path within bf16's rounding.
TEST(DecoderAttentionTest, FlashAttentionMatchesTheReferenceAndTheBlockedPath) {
  std::mt19937_64 rng(20261208);
  for (int trial = 0; trial < 120; ++trial) {
    const int64_t max_len = trial % 3 == 1 ? 160 : 24;  // with trial % 4 == 3 (bf16): long bf16 trials too
    DecoderAttention::Options options = FlashLayer(rng, max_len);
    const bool bf16 = trial % 4 == 3 && OnednnBf16Support() != Bf16Support::kUnavailable;
    if (bf16) options.compute = ComputeType::kBFloat16;
    const DecoderWeights weights = RandomWeights(options.config, rng);
    Request req;
    DrawRequest(rng, options.config, &req, max_len);
    req.inputs.need_weights = false;
    SCOPED_TRACE(::testing::Message() << "trial " << trial << ": " << options.config.DebugString() << " query "
                                      << ShapeToString(req.inputs.query.shape) << " blocks " << options.flash_query_rows
                                      << "x" << options.flash_key_cols << " strips " << options.flash_strips << " bf16 "
                                      << bf16);
    auto layer = DecoderAttention::Create(options, weights);
    ASSERT_TRUE(layer.ok()) << layer.status();
    auto out = (*layer)->Forward(req.inputs, static_cast<int>(Pick(rng, 1, 2)));
    ASSERT_TRUE(out.ok()) << out.status();
    DecoderAttention::Options blocked = options;
    blocked.flash_min_keys = 0;
    blocked.compute = ComputeType::kFloat32;
    auto blocked_out = (*DecoderAttention::Create(blocked, weights))->Forward(req.inputs, 1);
    ASSERT_TRUE(blocked_out.ok()) << blocked_out.status();
    if (bf16) {
      EXPECT_LT(MaxAbsDiff(out->output.values, blocked_out->output.values), 3e-2);  // NaN fails it
      continue;
    }
    const testing::NaiveOutputs ref = testing::NaiveDecoderAttention(options.config, weights, req.inputs);
    EXPECT_LT(MaxAbsDiff(out->output.values, ref.output), 1e-4);
    EXPECT_LT(MaxAbsDiff(out->output.values, blocked_out->output.values), 1e-5);
  }
}

// What a request holds while it is computed is what the memory budget reserves for it: on one thread, the scratch
// the calling thread holds after the call (projection buffer, block scratch, FlashAttention's) is within
// WorkspaceBytes, on FlashAttention and on the blocked path (weights asked, or flash off), f32 and bf16; and a
// second call on the scratch the first left adds no more than its own WorkspaceBytes.
TEST(DecoderAttentionTest, WhatACallHoldsIsWithinWorkspaceBytes) {
  std::mt19937_64 rng(20261207);
  const ScopedOmpThreads one(1);  // WorkspaceBytes counts per thread what this thread alone then holds
  for (int trial = 0; trial < 80; ++trial) {
    const int64_t max_len = trial % 2 == 0 ? 200 : 40;
    DecoderAttention::Options options = FlashLayer(rng, max_len);
    if (Pick(rng, 0, 2) == 0) options.flash_query_rows = options.flash_key_cols = 0;  // FlashBlockForCpu's
    if (trial % 3 == 2) options.flash_min_keys = 0;                                   // the blocked path
    options.scores_block_bytes = Pick(rng, 1, 64) << 10;                              // blocks cut unevenly
    if (trial % 4 == 3 && OnednnBf16Support() != Bf16Support::kUnavailable) options.compute = ComputeType::kBFloat16;
    const DecoderWeights weights = RandomWeights(options.config, rng);
    Request req;
    DrawRequest(rng, options.config, &req, max_len);
    SCOPED_TRACE(::testing::Message() << "trial " << trial << ": " << options.config.DebugString() << " query "
                                      << ShapeToString(req.inputs.query.shape) << " weights "
                                      << req.inputs.need_weights);
    auto layer = DecoderAttention::Create(options, weights);
    ASSERT_TRUE(layer.ok()) << layer.status();
    auto parsed = (*layer)->Validate(req.inputs);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    ReleaseDecoderScratch(0);
    ReleaseFlashScratch(0);
    ASSERT_EQ(DecoderScratchHeldBytes(), 0);
    ASSERT_TRUE((*layer)->Forward(req.inputs, 1).ok());
    EXPECT_GT(DecoderScratchHeldBytes(), 0);
    const int64_t held = DecoderScratchHeldBytes();
    EXPECT_LE(held, (*layer)->WorkspaceBytes(*parsed));
    // A second request on the warm scratch (what a worker keeps between batches): it adds no more than it counts.
    Request next;
    DrawRequest(rng, options.config, &next, max_len);
    auto next_parsed = (*layer)->Validate(next.inputs);
    ASSERT_TRUE(next_parsed.ok()) << next_parsed.status();
    ASSERT_TRUE((*layer)->Forward(next.inputs, 1).ok());
    EXPECT_LE(DecoderScratchHeldBytes() - held, (*layer)->WorkspaceBytes(*next_parsed));
  }
  ReleaseDecoderScratch(0);
  ReleaseFlashScratch(0);
}

// How many times a request's attention asks `stop`: once per (sequence, head, query block) on FlashAttention, once
// per (sequence, query block) of all heads on the blocked path.
int StopsAsked(const DecoderAttention& layer, const DecoderInputs& in) {
  auto parsed = layer.Validate(in);
  EXPECT_TRUE(parsed.ok()) << parsed.status();
  std::atomic<int> asked{0};
  const ParsedDecoder* batch[] = {&*parsed};
  const auto got = layer.ForwardBatch(batch, 1, [&](size_t) {
    asked.fetch_add(1);
    return absl::OkStatus();
  });
  EXPECT_TRUE(got[0].ok()) << got[0].status();
  return asked.load();
}

// Which requests take FlashAttention: at least flash_min_keys tokens and no weights asked (windows and soft caps
// included); the others keep the blocked path, which alone returns weights.
TEST(DecoderAttentionTest, LongRequestsWithoutWeightsTakeFlashAttention) {
  std::mt19937_64 rng(11);
  DecoderAttention::Options o;
  o.config = Dims(64, 4, 2, 16);
  o.flash_min_keys = 32;
  o.flash_query_rows = 8;
  o.scores_block_bytes = int64_t{1} << 30;  // the blocked path: one block per sequence
  o.single_thread_below_flops = 0;
  const DecoderWeights w = RandomWeights(o.config, rng);
  const std::vector<float> x = RandomValues(rng, 2 * 40 * 64);
  DecoderInputs in;
  in.query = TensorView::F32(x.data(), {2, 40, 64});
  const int flash = 2 * 4 * 5, blocked = 2;  // (sequence, head, 5 query blocks of 8); (sequence)
  auto stops = [&](const DecoderAttention::Options& options, const DecoderInputs& inputs) {
    auto layer = DecoderAttention::Create(options, w);
    EXPECT_TRUE(layer.ok()) << layer.status();
    return layer.ok() ? StopsAsked(**layer, inputs) : -1;
  };
  EXPECT_EQ(stops(o, in), flash);
  DecoderAttention::Options windowed = o;
  windowed.config.sliding_window = 7;
  EXPECT_EQ(stops(windowed, in), flash) << "a window shorter than the request";
  DecoderAttention::Options capped = o;
  capped.config.attn_logit_softcapping = 30;
  EXPECT_EQ(stops(capped, in), flash) << "soft-capped scores";
  DecoderAttention::Options longer = o;
  longer.flash_min_keys = 41;
  EXPECT_EQ(stops(longer, in), blocked) << "fewer tokens than flash_min_keys";
  longer.flash_min_keys = 0;
  EXPECT_EQ(stops(longer, in), blocked) << "flash_min_keys 0";
  DecoderInputs weights = in;
  weights.need_weights = true;
  EXPECT_EQ(stops(o, weights), blocked) << "weights asked";
  DecoderAttention::Options bad = o;
  bad.flash_key_cols = -1;
  EXPECT_EQ(DecoderAttention::Create(bad, w).status().code(), absl::StatusCode::kInvalidArgument);
}

// A stop on FlashAttention fails its own request of a ragged batch; the others (one on FlashAttention, one on the
// blocked path) are answered as when alone.
TEST(DecoderAttentionTest, StopOnFlashAttentionFailsOnlyItsRequest) {
  std::mt19937_64 rng(12);
  DecoderAttention::Options o;
  o.config = Dims(64, 4, 2, 16);
  o.flash_min_keys = 16;
  o.single_thread_below_flops = 0;
  auto layer = DecoderAttention::Create(o, RandomWeights(o.config, rng));
  ASSERT_TRUE(layer.ok()) << layer.status();
  std::vector<Request> requests(3);
  std::vector<ParsedDecoder> parsed;
  for (int64_t len : {40, 20, 8}) {  // flash, flash, blocked
    Request& r = requests[parsed.size()];
    r.query = RandomValues(rng, len * 64);
    r.inputs.query = TensorView::F32(r.query.data(), {1, len, 64});
    parsed.push_back(*(*layer)->Validate(r.inputs));
  }
  const ParsedDecoder* batch[] = {&parsed[0], &parsed[1], &parsed[2]};
  auto got = (*layer)->ForwardBatch(
      batch, 2, [](size_t i) { return i == 0 ? absl::DeadlineExceededError("deadline") : absl::OkStatus(); });
  EXPECT_EQ(got[0].status().code(), absl::StatusCode::kDeadlineExceeded);
  for (size_t i : {1, 2}) {
    ASSERT_TRUE(got[i].ok()) << got[i].status();
    auto alone = (*layer)->ForwardParsed(parsed[i], 1);
    ASSERT_TRUE(alone.ok());
    EXPECT_LT(MaxAbsDiff(got[i]->output.values, alone->output.values), 1e-5) << "request " << i;
  }
}

DecoderAttention::Options SmallLayer() {
  DecoderAttention::Options o;
  o.config = Dims(16, 4, 2, 4);
  return o;
}

std::string ErrorOf(const DecoderAttention& layer, const DecoderInputs& in) {
  auto parsed = layer.Validate(in);
  EXPECT_FALSE(parsed.ok());
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(parsed.status().message());
}

TEST(DecoderAttentionTest, RefusesBadRequestsNamingTheField) {
  std::mt19937_64 rng(3);
  DecoderAttention::Options o = SmallLayer();
  o.limits.max_sequence_length = 64;
  auto layer = *DecoderAttention::Create(o, RandomWeights(o.config, rng));
  const std::vector<float> x = RandomValues(rng, 2 * 5 * 16);
  DecoderInputs in;
  in.query = TensorView::F32(x.data(), {2, 5, 8});
  EXPECT_EQ(ErrorOf(*layer, in), "query: expected shape [B, L, 16] or [L, 16] (unbatched), got [2, 5, 8]");
  in.query = TensorView::F32(x.data(), {2, 5, 16});
  in.position_offset = -1;
  EXPECT_EQ(ErrorOf(*layer, in), "position_offset: must be in [0, 16777211] (positions below 2^24 for L=5), got -1");
  in.position_offset = 0;
  const std::vector<int64_t> ids = {0, 1, 2, 3, 4, 0, 1, 2, -7, 4};
  in.position_ids = TensorView::I64(ids.data(), {2, 4});
  EXPECT_EQ(ErrorOf(*layer, in), "position_ids: expected shape [2, 5] (B, L), got [2, 4]");
  in.position_ids = TensorView::I64(ids.data(), {2, 5});
  EXPECT_EQ(ErrorOf(*layer, in), "position_ids: values must be in [0, 16777216), got -7 at [1, 3]");
  in.position_ids = TensorView::F32(x.data(), {2, 5});
  EXPECT_EQ(ErrorOf(*layer, in), "position_ids: dtype must be INT64, got FLOAT32");
  in.position_ids = {};
  const std::vector<uint8_t> pad(10, 0);
  in.key_padding_mask = TensorView::Bool(pad.data(), {5});
  EXPECT_EQ(ErrorOf(*layer, in), "key_padding_mask: expected shape [2, 5] (B, L), got [5]");
  in.key_padding_mask = {};
  const std::vector<float> long_x = RandomValues(rng, 65 * 16);
  in.query = TensorView::F32(long_x.data(), {65, 16});
  EXPECT_EQ(ErrorOf(*layer, in), "query length L is 65, past the layer's max_sequence_length of 64");
}

TEST(DecoderAttentionTest, RefusesBadConfigsNamingTheField) {
  DecoderConfig c = SmallLayer().config;
  c.num_kv_heads = 3;
  EXPECT_EQ(c.Validate().message(), "decoder.num_kv_heads: must divide num_heads (4), got 3");
  c = SmallLayer().config;
  c.rope.rotary_dim = 6;
  EXPECT_EQ(c.Validate().message(), "decoder.rope.rotary_dim: must be <= head_dim (4), got 6");
  c.rope.rotary_dim = 3;
  EXPECT_EQ(c.Validate().message(), "decoder.rope.rotary_dim: must be even and > 0, got 3");
  c = SmallLayer().config;
  c.sliding_window = -1;
  EXPECT_EQ(c.Validate().message(), "decoder.sliding_window: must be >= 0 (0 = none), got -1");
  c = SmallLayer().config;
  for (double cap :
       {-1.0, 1e-7, 1e-40, 1e39, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
    c.attn_logit_softcapping = cap;
    EXPECT_THAT(std::string(c.Validate().message()),
                ::testing::StartsWith("decoder.attn_logit_softcapping: must be 0 (none) or in [1e-06, 1e+30], got"))
        << cap;
  }
  for (double cap : {0.0, 1e-6, 50.0, 1e30}) {
    c.attn_logit_softcapping = cap;
    EXPECT_TRUE(c.Validate().ok()) << cap;
  }
}

TEST(DecoderAttentionTest, AllPaddedPrefixGivesZeroAttentionNotNaN) {
  // Left padding: the first two tokens are padding; their rows see no key and get o_proj.bias alone.
  std::mt19937_64 rng(11);
  DecoderAttention::Options o = SmallLayer();
  o.config.o_bias = true;
  const DecoderWeights w = RandomWeights(o.config, rng);
  auto layer = *DecoderAttention::Create(o, w);
  const std::vector<float> x = RandomValues(rng, 6 * 16);
  const std::vector<uint8_t> pad = {1, 1, 0, 0, 0, 0};
  DecoderInputs in;
  in.query = TensorView::F32(x.data(), {6, 16});
  in.key_padding_mask = TensorView::Bool(pad.data(), {6});
  auto out = layer->Forward(in);
  ASSERT_TRUE(out.ok());
  for (int64_t l = 0; l < 2; ++l) {
    for (int64_t e = 0; e < 16; ++e) EXPECT_FLOAT_EQ(out->output.values[l * 16 + e], w.o_proj_bias[e]);
  }
  EXPECT_LT(MaxAbsDiff(out->output.values, testing::NaiveDecoderAttention(o.config, w, in).output), 1e-4);
}

TEST(DecoderAttentionTest, LoadsOneLayerOfManyUnderItsPrefixInBf16) {
  std::mt19937_64 rng(5);
  DecoderAttention::Options o = SmallLayer();
  o.config.qkv_bias = true;
  std::map<std::string, testing::TensorToWrite> tensors;
  std::vector<DecoderWeights> layers;
  for (int i = 0; i < 3; ++i) {
    layers.push_back(RandomWeights(o.config, rng));
    const DecoderWeights& w = layers.back();
    const std::string p = "model.layers." + std::to_string(i) + ".self_attn.";
    tensors[p + "q_proj.weight"] = testing::FloatTensor(w.q_proj_weight, {16, 16}, "BF16");
    tensors[p + "k_proj.weight"] = testing::FloatTensor(w.k_proj_weight, {8, 16}, "BF16");
    tensors[p + "v_proj.weight"] = testing::FloatTensor(w.v_proj_weight, {8, 16}, "BF16");
    tensors[p + "o_proj.weight"] = testing::FloatTensor(w.o_proj_weight, {16, 16}, "BF16");
    tensors[p + "q_proj.bias"] = testing::FloatTensor(w.q_proj_bias, {16}, "BF16");
    tensors[p + "k_proj.bias"] = testing::FloatTensor(w.k_proj_bias, {8}, "BF16");
    tensors[p + "v_proj.bias"] = testing::FloatTensor(w.v_proj_bias, {8}, "BF16");
    tensors[p + "rotary_emb.inv_freq"] = testing::FloatTensor({1.0f, 0.01f}, {2});
  }
  const std::string path = ::testing::TempDir() + "/decoder_layers.safetensors";
  ASSERT_TRUE(testing::WriteFile(path, testing::SerializeSafetensors(tensors)).ok());
  auto w = LoadDecoderWeights(path, "model.layers.1.self_attn.", o.config);
  ASSERT_TRUE(w.ok()) << w.status();
  // BF16 keeps 8 bits of mantissa: within 2^-8 relative of the f32 originals.
  for (size_t i = 0; i < w->q_proj_weight.size(); ++i) {
    EXPECT_NEAR(w->q_proj_weight[i], layers[1].q_proj_weight[i], std::abs(layers[1].q_proj_weight[i]) / 128);
  }
  EXPECT_EQ(w->k_proj_bias.size(), 8u);
  o.config.qkv_bias = false;
  auto refused = LoadDecoderWeights(path, "model.layers.1.self_attn.", o.config);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("'model.layers.1.self_attn.k_proj.bias' is not part of"),
            std::string::npos)
      << refused.status();
  o.config.qkv_bias = true;
  o.config.num_kv_heads = 4;
  auto misshaped = LoadDecoderWeights(path, "model.layers.1.self_attn.", o.config);
  ASSERT_FALSE(misshaped.ok());
  EXPECT_NE(misshaped.status().message().find("has shape [8, 16], expected [16, 16]"), std::string::npos)
      << misshaped.status();
  std::filesystem::remove(path);
}

// A bf16 layer reads its matrices straight into bf16, whatever the checkpoint's dtypes: the values are those a
// bf16 layer built from the f32 reading computes with, so both answer bit for bit alike.
TEST(DecoderAttentionTest, Bf16LayerReadsItsCheckpointStraightIntoBf16) {
  std::mt19937_64 rng(6);
  DecoderAttention::Options o = SmallLayer();
  o.config.qkv_bias = true;
  const DecoderWeights w = RandomWeights(o.config, rng);
  const std::string p = "model.layers.0.self_attn.";
  std::map<std::string, testing::TensorToWrite> tensors;
  tensors[p + "q_proj.weight"] = testing::FloatTensor(w.q_proj_weight, {16, 16}, "F32");
  tensors[p + "k_proj.weight"] = testing::FloatTensor(w.k_proj_weight, {8, 16}, "F16");
  tensors[p + "v_proj.weight"] = testing::FloatTensor(w.v_proj_weight, {8, 16}, "BF16");
  tensors[p + "o_proj.weight"] = testing::FloatTensor(w.o_proj_weight, {16, 16}, "BF16");
  tensors[p + "q_proj.bias"] = testing::FloatTensor(w.q_proj_bias, {16}, "BF16");
  tensors[p + "k_proj.bias"] = testing::FloatTensor(w.k_proj_bias, {8});
  tensors[p + "v_proj.bias"] = testing::FloatTensor(w.v_proj_bias, {8});
  const std::string path = ::testing::TempDir() + "/decoder_bf16_layer.safetensors";
  ASSERT_TRUE(testing::WriteFile(path, testing::SerializeSafetensors(tensors)).ok());
  auto f32 = LoadDecoderWeights(path, p, o.config);
  auto bf16 = LoadDecoderWeights(path, p, o.config, ComputeType::kBFloat16);
  ASSERT_TRUE(f32.ok() && bf16.ok()) << f32.status() << bf16.status();
  EXPECT_TRUE(bf16->q_proj_weight.empty() && bf16->o_proj_weight.empty());
  EXPECT_EQ(bf16->q_proj_bias, f32->q_proj_bias);
  std::vector<float> qkv = f32->q_proj_weight;
  qkv.insert(qkv.end(), f32->k_proj_weight.begin(), f32->k_proj_weight.end());
  qkv.insert(qkv.end(), f32->v_proj_weight.begin(), f32->v_proj_weight.end());
  ASSERT_EQ(bf16->qkv_proj_weight_bf16.size(), qkv.size());
  ASSERT_EQ(bf16->o_proj_weight_bf16.size(), f32->o_proj_weight.size());
  for (size_t i = 0; i < qkv.size(); ++i) ASSERT_EQ(bf16->qkv_proj_weight_bf16[i], FloatToBFloat16(qkv[i])) << i;
  for (size_t i = 0; i < f32->o_proj_weight.size(); ++i) {
    ASSERT_EQ(bf16->o_proj_weight_bf16[i], FloatToBFloat16(f32->o_proj_weight[i])) << i;
  }
  // The BF16 tensor's bits as stored: v's rows are the last 8 of the fused matrix.
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok());
  const SafetensorsEntry* v_entry = (*file)->Find(p + "v_proj.weight");
  ASSERT_NE(v_entry, nullptr);
  EXPECT_EQ(std::memcmp(v_entry->data, &bf16->qkv_proj_weight_bf16[24 * 16], 8 * 16 * 2), 0);

  const std::vector<float> x = RandomValues(rng, 2 * 5 * 16, 1.0f);
  DecoderInputs in;
  in.query = TensorView::F32(x.data(), {2, 5, 16});
  o.compute = ComputeType::kBFloat16;
  auto from_f32 = (*DecoderAttention::Create(o, *f32))->Forward(in);
  auto from_bf16 = (*DecoderAttention::Create(o, *bf16))->Forward(in);
  ASSERT_TRUE(from_f32.ok() && from_bf16.ok());
  if (OnednnBf16Support() != Bf16Support::kUnavailable) {
    EXPECT_EQ(from_f32->output.values, from_bf16->output.values);
  }
  // An f32 layer widens bf16 weights exactly: the same as f32 weights holding the rounded values.
  o.compute = ComputeType::kFloat32;
  DecoderWeights rounded = *f32;
  for (std::vector<float>* m : {&rounded.q_proj_weight, &rounded.k_proj_weight, &rounded.v_proj_weight,
                                &rounded.o_proj_weight}) {
    for (float& value : *m) value = BFloat16ToFloat(FloatToBFloat16(value));
  }
  auto widened = (*DecoderAttention::Create(o, *bf16))->Forward(in);
  auto want = (*DecoderAttention::Create(o, rounded))->Forward(in);
  ASSERT_TRUE(widened.ok() && want.ok());
  EXPECT_EQ(widened->output.values, want->output.values);
  EXPECT_LT(MaxAbsDiff(widened->output.values, from_bf16->output.values), 3e-2);

  o.config.num_kv_heads = 4;
  auto misshaped = LoadDecoderWeights(path, p, o.config, ComputeType::kBFloat16);
  ASSERT_FALSE(misshaped.ok());
  EXPECT_NE(misshaped.status().message().find(
                "'model.layers.0.self_attn.k_proj.weight' has shape [8, 16], expected [16, 16]"),
            std::string::npos)
      << misshaped.status();
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace attnserve
