// attnserve_core_bench: the engine's in-process speed, in GFLOP/s (counter GFLOPS), for the shapes of
// BENCHMARKS.md, beside a large oneDNN sgemm measured in the same run as the machine's practical peak.
// FLOPs counted as in AttentionFlops(): QKV and output projections plus QK^T and PV.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <dnnl.hpp>
#include <omp.h>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "common/half_float.h"
#include "common/status_macros.h"
#include "core/decoder_attention.h"
#include "core/flash_attention.h"
#include "core/multihead_attention.h"
#include "core/onednn_ops.h"

namespace attnserve {
namespace {

std::vector<float> Random(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

// Times Forward of a [B, L, E] self-attention query (need_weights=false, what torch_mha.py times) on a layer
// built with `options`; GFLOPS counts `flops` per call. `padded_keys` > 0: a bool key_padding_mask hides each
// sequence's last padded_keys keys (a batch of prompts padded to one length).
void TimeSelfAttention(benchmark::State& state, const MultiheadAttention::Options& options, bool causal,
                       double flops, int64_t padded_keys = 0) {
  const int64_t b = state.range(0), l = state.range(1), e = options.config.embed_dim;
  auto layer = MultiheadAttention::Create(options, RandomMhaWeights(options.config, 1));
  if (!layer.ok()) {
    state.SkipWithError(layer.status().ToString().c_str());
    return;
  }
  const std::vector<float> query = Random(b * l * e, 2);
  AttentionInputs in;
  in.query = TensorView::F32(query.data(), {b, l, e});
  in.is_causal = causal;
  std::vector<uint8_t> padding(static_cast<size_t>(b * l), 0);
  for (int64_t i = 0; i < b; ++i) std::fill_n(padding.begin() + i * l + (l - padded_keys), padded_keys, 1);
  if (padded_keys > 0) in.key_padding_mask = TensorView::Bool(padding.data(), {b, l});
  for (auto _ : state) {
    auto out = (*layer)->Forward(in);
    if (!out.ok()) state.SkipWithError(out.status().ToString().c_str());
    benchmark::DoNotOptimize(out);
  }
  if ((*layer)->compute() != options.compute) state.SkipWithError("this CPU has no bf16 matmul");
  state.counters["GFLOPS"] = benchmark::Counter(flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

// Args: B, L, E, H. Computing in `compute`.
void RunSelfAttention(benchmark::State& state, ComputeType compute) {
  const int64_t b = state.range(0), l = state.range(1);
  MultiheadAttention::Options options;
  options.config = {state.range(2), state.range(3), 0, 0, true};
  options.compute = compute;
  TimeSelfAttention(state, options, false, static_cast<double>(AttentionFlops(options.config, b, l, l)));
}

void BM_SelfAttention(benchmark::State& state) { RunSelfAttention(state, ComputeType::kFloat32); }
void BM_SelfAttentionBf16(benchmark::State& state) { RunSelfAttention(state, ComputeType::kBFloat16); }

// Long sequences. Args: B, L, E, H, causal (0/1), flash (0: Options::flash_min_keys = 0, the blocked path),
// padded (1: a key_padding_mask hides the last eighth of the keys).
// Causal GFLOP/s count the useful FLOPs: the projections and the L (L + 1) / 2 pairs a causal mask keeps; padded
// ones count every pair (the padded keys are computed, then masked).
void BM_LongAttention(benchmark::State& state) {
  const int64_t b = state.range(0), l = state.range(1), e = state.range(2);
  const bool causal = state.range(4) != 0;
  MultiheadAttention::Options options;
  options.config = {e, state.range(3), 0, 0, true};
  if (state.range(5) == 0) options.flash_min_keys = 0;
  const double all_pairs = static_cast<double>(l) * static_cast<double>(l);
  const double pairs = causal ? 0.5 * static_cast<double>(l) * static_cast<double>(l + 1) : all_pairs;
  const double flops = static_cast<double>(AttentionFlops(options.config, b, l, l)) - 4.0 * b * (all_pairs - pairs) * e;
  TimeSelfAttention(state, options, causal, flops, state.range(6) != 0 ? l / 8 : 0);
}

// A bf16 layer's FlashAttention operands for `args`: bf16 copies of its projections and its bf16 matmuls, with whole
// blocks on brgemm kernels where it has them (as MultiheadAttention builds them, at FlashBlockForCpu(kBFloat16)).
struct FlashBf16Operands {
  std::vector<uint16_t> qkv16;
  std::unique_ptr<HeadMatmulOp> scores_op, context_op;
  std::unique_ptr<Bf16BlockMatmul> block_scores, block_context;

  absl::Status Attach(const std::vector<float>& qkv, FlashAttentionArgs& args) {
    for (float x : qkv) qkv16.push_back(FloatToBFloat16(x));
    const int64_t dh = args.head_dim, e = args.heads * dh, l = args.q_len;
    std::tie(args.query_rows, args.key_cols) = FlashBlockForCpu(ComputeType::kBFloat16);
    ATTN_ASSIGN_OR_RETURN(scores_op, HeadMatmulOp::Create(HeadMatmulOp::Kind::kScores, dh, ComputeType::kBFloat16));
    ATTN_ASSIGN_OR_RETURN(context_op,
                          HeadMatmulOp::Create(HeadMatmulOp::Kind::kContextAdd, dh, ComputeType::kBFloat16));
    auto scores = Bf16BlockMatmul::Create(args.query_rows, args.key_cols, dh, true, false);
    auto context = Bf16BlockMatmul::Create(args.query_rows, dh, args.key_cols, false, true);
    if (scores.ok() && context.ok()) {
      block_scores = *std::move(scores);
      block_context = *std::move(context);
    }
    args.bf16 = {qkv16.data(), qkv16.data() + e, qkv16.data() + 2 * e, 3 * e, l * 3 * e, l * 3 * e,
                 scores_op.get(), context_op.get(), block_scores.get(), block_context.get()};
    return absl::OkStatus();
  }
};

// FlashAttention alone, on projections laid out as a self-attention layer's ([L, 3E] rows) on all threads:
// the attention part of BM_LongAttention without its projections. GFLOPS counts QK^T and PV (4 L^2 E, the
// pairs a causal mask keeps when causal). Args: L, E, H, causal (0/1), strips (0: blocks on sgemm, or for bf16 on
// the layer's bf16 matmuls and brgemm blocks), bf16 (1: a BFLOAT16 layer's operands, FlashBf16Operands).
void BM_FlashAttention(benchmark::State& state) {
  const int64_t l = state.range(0), e = state.range(1), h = state.range(2);
  const bool causal = state.range(3) != 0;
  const std::vector<float> qkv = Random(l * 3 * e, 5);
  std::vector<float> out(l * e);
  FlashAttentionArgs args;
  args.batch = 1;
  args.heads = h;
  args.q_len = args.kv_len = l;
  args.head_dim = e / h;
  args.causal = causal;
  args.q = {qkv.data(), 3 * e, l * 3 * e};
  args.k = {qkv.data() + e, 3 * e, l * 3 * e};
  args.v = {qkv.data() + 2 * e, 3 * e, l * 3 * e};
  args.out = out.data();
  args.out_ld = e;
  args.out_seq_stride = l * e;
  args.strips = state.range(4) != 0;
  std::tie(args.query_rows, args.key_cols) = FlashBlockForCpu();
  FlashBf16Operands bf16;
  if (state.range(5) != 0) {
    const absl::Status attached = bf16.Attach(qkv, args);
    if (!attached.ok()) return state.SkipWithError(attached.ToString().c_str());
  }
  for (auto _ : state) {
    const absl::Status status = FlashAttention(args, omp_get_max_threads(), [] { return absl::OkStatus(); });
    if (!status.ok()) state.SkipWithError(status.ToString().c_str());
    benchmark::DoNotOptimize(out.data());
  }
  const double pairs = causal ? 0.5 * static_cast<double>(l) * static_cast<double>(l + 1) : 1.0 * l * l;
  state.counters["GFLOPS"] = benchmark::Counter(4.0 * pairs * e / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(FlashOnStrips(args) ? "strips" : "matmuls");
}

// Times ForwardBatch over separate [1, len, E] self-attention requests, one per entry of `lengths`, on a layer
// computing in `compute`, their queries in `input`: f32, or the bf16 / f16 values a client may send.
void RunRequestBatch(benchmark::State& state, int64_t e, int64_t h, const std::vector<int64_t>& lengths,
                     ComputeType compute = ComputeType::kFloat32, DType input = DType::kFloat32,
                     int max_threads = 0) {
  MultiheadAttention::Options options;
  options.config = {e, h, 0, 0, true};
  options.compute = compute;
  auto layer = MultiheadAttention::Create(options, RandomMhaWeights(options.config, 1));
  std::vector<std::vector<float>> queries;
  std::vector<std::vector<uint16_t>> queries16;
  std::vector<AttentionInputs> inputs(lengths.size());
  std::vector<const AttentionInputs*> batch;
  double flops = 0;
  for (size_t i = 0; i < lengths.size(); ++i) {
    queries.push_back(Random(lengths[i] * e, 10 + i));
    inputs[i].query = TensorView::F32(queries.back().data(), {1, lengths[i], e});
    if (input != DType::kFloat32) {
      std::vector<uint16_t>& bits = queries16.emplace_back();
      for (float v : queries.back()) bits.push_back(input == DType::kBFloat16 ? FloatToBFloat16(v) : FloatToHalf(v));
      inputs[i].query = {input, {1, lengths[i], e}, bits.data()};
    }
    batch.push_back(&inputs[i]);
    flops += static_cast<double>(AttentionFlops(options.config, 1, lengths[i], lengths[i]));
  }
  for (auto _ : state) {
    auto out = (*layer)->ForwardBatch(batch, max_threads);
    benchmark::DoNotOptimize(out);
  }
  // With several threads each counts its own iterations and the rate is over the run's wall time: averaging
  // the threads' counters gives all of them together.
  state.counters["GFLOPS"] = benchmark::Counter(
      flops / 1e9, benchmark::Counter::Flags(benchmark::Counter::kIsIterationInvariantRate |
                                             (state.threads() > 1 ? benchmark::Counter::kAvgThreads : 0)));
}

// A ragged batch: B single sequences with lengths uniform in [L/2, 3L/2]. Args: B, L, E, H.
void BM_RaggedBatch(benchmark::State& state) {
  const int64_t b = state.range(0), l = state.range(1);
  std::mt19937_64 rng(5);
  std::vector<int64_t> lengths(b);
  for (int64_t& len : lengths) len = std::uniform_int_distribution<int64_t>(l / 2, l + l / 2)(rng);
  RunRequestBatch(state, state.range(2), state.range(3), lengths);
}

// A batch as the server forms it from equal requests: R requests of [1, L, E]. Args: R, L, E, H.
// bench/serving_bench.py compares the server's achieved rate with this.
void BM_ServerBatch(benchmark::State& state) {
  RunRequestBatch(state, state.range(2), state.range(3), std::vector<int64_t>(state.range(0), state.range(1)));
}

// The same batches computed as a server with one worker per CPU runs them: one batch per CPU at once, each on
// one thread (GFLOPS: all of them together). Args: R, L, E, H.
void BM_ServerBatchPerWorker(benchmark::State& state) {
  RunRequestBatch(state, state.range(2), state.range(3), std::vector<int64_t>(state.range(0), state.range(1)),
                  ComputeType::kFloat32, DType::kFloat32, /*max_threads=*/1);
}

// The same on a layer of compute type C (0 f32, 1 bf16) with inputs of type In (0 f32, 1 bf16, 2 f16), as a
// client sending 16-bit tensors gives them. Args: R, L, E, H, C, In.
void BM_ServerBatchInputs(benchmark::State& state) {
  const DType inputs[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  RunRequestBatch(state, state.range(2), state.range(3), std::vector<int64_t>(state.range(0), state.range(1)),
                  state.range(4) != 0 ? ComputeType::kBFloat16 : ComputeType::kFloat32, inputs[state.range(5)]);
}

// oneDNN's sgemm on a large square problem: what the machine's f32 matmul reaches.
void BM_PeakSgemm(benchmark::State& state) {
  const int64_t n = state.range(0);
  const std::vector<float> a = Random(n * n, 3), b = Random(n * n, 4);
  std::vector<float> c(n * n);
  for (auto _ : state) {
    dnnl::sgemm('N', 'N', n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    benchmark::DoNotOptimize(c.data());
  }
  state.counters["GFLOPS"] =
      benchmark::Counter(2.0 * n * n * n / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

// oneDNN's bf16 matmul (bf16 inputs, f32 output, the layout it prefers for B) on the same problem: the
// machine's bf16 peak, and with BM_PeakSgemm the bf16-over-f32 speedup a BF16 layer is measured against.
void BM_PeakBf16Matmul(benchmark::State& state) {
  using dt = dnnl::memory::data_type;
  const int64_t n = state.range(0);
  try {
    const dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream stream(eng);
    const dnnl::memory::desc a_md({n, n}, dt::bf16, dnnl::memory::format_tag::ab);
    const dnnl::memory::desc b_md({n, n}, dt::bf16, dnnl::memory::format_tag::any);
    const dnnl::memory::desc c_md({n, n}, dt::f32, dnnl::memory::format_tag::ab);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), eng);
    const dnnl::matmul prim(pd);
    dnnl::memory a(a_md, eng), b(pd.weights_desc(), eng), c(c_md, eng);
    for (dnnl::memory* m : {&a, &b}) std::fill_n(static_cast<uint16_t*>(m->get_data_handle()), n * n, 0x3F80);
    for (auto _ : state) {
      prim.execute(stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
      stream.wait();
    }
    state.SetLabel(pd.impl_info_str());
  } catch (const dnnl::error& e) {
    state.SkipWithError(e.what());
    return;
  }
  state.counters["GFLOPS"] =
      benchmark::Counter(2.0 * n * n * n / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

// One bf16 projection (LinearOp, as layers run it: f32 rows in, converted, f32 out) of M rows, k x n weights with a
// bias: where bf16 has brgemm kernels, ops of at most 4 MiB of weights run in fixed-size pieces, larger ones of k <=
// 1024 in column panels, the rest on oneDNN's runtime-M gemm (the label lists the kernels). Args: M, k, n.
void BM_LinearOpBf16(benchmark::State& state) {
  const int64_t m = state.range(0), k = state.range(1), n = state.range(2);
  auto op = LinearOp::Create(k, n, Random(n * k, 1), Random(n, 2), ComputeType::kBFloat16);
  if (!op.ok()) {
    state.SkipWithError(op.status().ToString().c_str());
    return;
  }
  const std::vector<float> x = Random(m * k, 3);
  std::vector<float> y(static_cast<size_t>(m * n));
  for (auto _ : state) {
    const absl::Status status = (*op)->Execute(x.data(), m, k, y.data(), n);
    if (!status.ok()) {
      state.SkipWithError(status.ToString().c_str());
      return;
    }
    benchmark::DoNotOptimize(y.data());
  }
  std::string impls;
  for (const std::string& impl : (*op)->Impls()) impls += (impls.empty() ? "" : ",") + impl;
  state.SetLabel(impls);
  state.counters["GFLOPS"] = benchmark::Counter(2.0 * m * k * n / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

// Sessions' appends: `sessions` appends of T tokens each over a cache of `context` tokens, as one batch
// (ForwardAppends): decode steps (T = 1) or prefill chunks. Args: sessions, context, E, H, T. Counters: KV
// bytes read per second (every cached key and value once per append), tokens/s. Each iteration truncates the
// caches back, so the context stays put.
// `n` appends of `t` tokens each over caches of `context` tokens, as one batch of `layer`'s ForwardAppends.
// read_GBps adds the weights (`weight_bytes`), read once per batch: what bounds a decode step.
void RunDecodeAppends(benchmark::State& state, const AppendEngine& layer, int64_t n, int64_t context, int64_t t,
                      int64_t weight_bytes) {
  const int64_t e = layer.embed_dim(), width = layer.cache_width();
  auto pool = KvCachePool::Create({int64_t{8} << 30, 16});
  std::vector<KvSequence> caches;
  const std::vector<float> prefix = Random(context * e, 3), token = Random(t * e, 4);
  std::vector<CachedAppend> appends(n);
  std::vector<const CachedAppend*> batch;
  caches.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    caches.emplace_back(pool->get(), width);
    CachedAppend fill{prefix.data(), context, &caches.back()};
    const CachedAppend* one[] = {&fill};
    (void)layer.ForwardAppends(one);
    appends[i] = {token.data(), t, &caches.back()};
    batch.push_back(&appends[i]);
  }
  for (auto _ : state) {
    auto out = layer.ForwardAppends(batch);
    benchmark::DoNotOptimize(out);
    state.PauseTiming();
    for (KvSequence& c : caches) c.Truncate(context);
    state.ResumeTiming();
  }
  const double kv_bytes = 2.0 * static_cast<double>(n * (context + t) * width) * sizeof(float);
  state.counters["KV_GBps"] = benchmark::Counter(kv_bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["read_GBps"] = benchmark::Counter((kv_bytes + static_cast<double>(weight_bytes)) / 1e9,
                                                   benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(n * t), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_DecodeAppends(benchmark::State& state) {
  MultiheadAttention::Options options;
  options.config = {state.range(2), state.range(3), 0, 0, true};
  auto layer = MultiheadAttention::Create(options, RandomMhaWeights(options.config, 1));
  RunDecodeAppends(state, **layer, state.range(0), state.range(1), state.range(4),
                   4 * 4 * state.range(2) * state.range(2));
}

// Decoder sessions' appends (no window): Args sessions, context, E, H, Hkv, D, T; KV_GBps counts the Hkv * D
// wide keys and values each append reads.
void BM_DecoderAppends(benchmark::State& state) {
  DecoderAttention::Options options;
  DecoderConfig& c = options.config;
  c.embed_dim = state.range(2);
  c.num_heads = state.range(3);
  c.num_kv_heads = state.range(4);
  c.head_dim = state.range(5);
  c.rope.rotary_dim = c.head_dim;
  auto layer = DecoderAttention::Create(options, RandomDecoderWeights(c, 1));
  const int64_t weight_bytes = 4 * c.embed_dim * (2 * c.q_width() + 2 * c.kv_width());
  RunDecodeAppends(state, **layer, state.range(0), state.range(1), state.range(6), weight_bytes);
}

// The shapes of BENCHMARKS.md, for the f32 and BF16 variants alike.
void EngineShapes(benchmark::internal::Benchmark* b) {
  b->Args({1, 128, 512, 8})
      ->Args({8, 512, 1024, 16})
      ->Args({1, 2048, 1024, 16})
      ->Args({32, 64, 512, 8})
      ->Args({64, 16, 256, 4})
      ->ArgNames({"B", "L", "E", "H"})
      ->UseRealTime()
      ->MinTime(0.5)
      ->Unit(benchmark::kMillisecond);
}

void DecoderShapes(benchmark::internal::Benchmark* b) {
  b->Args({1, 2048, 4096, 32, 8, 128, 0})
      ->Args({8, 512, 2048, 16, 4, 128, 0})
      ->Args({1, 4096, 4096, 32, 8, 128, 1024})
      ->ArgNames({"B", "L", "E", "H", "Hkv", "D", "W"})
      ->UseRealTime()
      ->MinTime(2.0)
      ->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_DecoderAppends)
    ->Args({1, 4096, 4096, 32, 8, 128, 1})
    ->Args({16, 4096, 4096, 32, 8, 128, 1})
    ->Args({1, 4096, 4096, 32, 8, 128, 128})
    ->ArgNames({"sessions", "context", "E", "H", "Hkv", "D", "T"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DecodeAppends)
    ->Args({32, 1024, 1024, 16, 1})
    ->Args({1, 1024, 1024, 16, 1})
    ->Args({1, 8192, 1024, 16, 128})  // prefill chunks late in an 8192-token prompt
    ->Args({1, 8192, 1024, 16, 27})
    ->Args({1, 0, 1024, 16, 128})  // the first chunk of a prompt
    ->ArgNames({"sessions", "context", "E", "H", "T"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
// Times Forward of `in` ([b, l] tokens) on a decoder layer built with `options` (random weights); GFLOP/s of
// DecoderFlops.
void TimeDecoderForward(benchmark::State& state, const DecoderAttention::Options& options, const DecoderInputs& in,
                        int64_t b, int64_t l) {
  auto layer = DecoderAttention::Create(options, RandomDecoderWeights(options.config, 1));
  if (!layer.ok()) {
    state.SkipWithError(layer.status().ToString().c_str());
    return;
  }
  for (auto _ : state) {
    auto out = (*layer)->Forward(in);
    if (!out.ok()) state.SkipWithError(out.status().ToString().c_str());
    benchmark::DoNotOptimize(out);
  }
  const double flops = static_cast<double>(DecoderFlops(options.config, b, l));
  state.counters["GFLOPS"] = benchmark::Counter(flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

// Args: B, L, E, H, Hkv, D, W (sliding window, 0 = none). Causal self-attention, positions from 0; GFLOP/s
// of the useful FLOPs (DecoderFlops: the causal window's pairs only), as bench/torch_decoder.py counts them.
// flash_min_keys: the layer's (-1: the default).
void RunDecoderAttention(benchmark::State& state, ComputeType compute, int64_t flash_min_keys = -1) {
  DecoderAttention::Options options;
  options.compute = compute;
  if (flash_min_keys >= 0) options.flash_min_keys = flash_min_keys;
  DecoderConfig& c = options.config;
  const int64_t b = state.range(0), l = state.range(1);
  c.embed_dim = state.range(2);
  c.num_heads = state.range(3);
  c.num_kv_heads = state.range(4);
  c.head_dim = state.range(5);
  c.sliding_window = state.range(6);
  c.rope.rotary_dim = c.head_dim;
  const std::vector<float> query = Random(b * l * c.embed_dim, 2);
  DecoderInputs in;
  in.query = TensorView::F32(query.data(), {b, l, c.embed_dim});
  TimeDecoderForward(state, options, in, b, l);
}

void BM_DecoderAttention(benchmark::State& state) { RunDecoderAttention(state, ComputeType::kFloat32); }
void BM_DecoderAttentionBf16(benchmark::State& state) { RunDecoderAttention(state, ComputeType::kBFloat16); }
// The decoder shapes, and shorter ones about the default flash_min_keys (Args as BM_DecoderAttention, then flash,
// bf16), on the blocked path (flash:0) and on FlashAttention (flash:1).
void BM_DecoderFlash(benchmark::State& state) {
  RunDecoderAttention(state, state.range(8) ? ComputeType::kBFloat16 : ComputeType::kFloat32, state.range(7));
}

// A batch of B prompts of up to L tokens left-padded to L, as batched generation pads them (sequence i starts with
// L * i / B padding tokens: 0, 1/4, 1/2, 3/4 of them at B=4), on a decoder layer of E=2048, 16 heads over 4 kv
// heads of 128, soft capped at 50 (cap:1, as Gemma 2) or not, on FlashAttention (flash:1) or the blocked path.
// GFLOP/s counts the whole padded batch's causal FLOPs, so that skipped key blocks show as a higher rate.
void BM_DecoderPadded(benchmark::State& state) {
  DecoderAttention::Options options;
  options.flash_min_keys = state.range(3) ? 256 : 0;
  DecoderConfig& c = options.config;
  const int64_t b = state.range(0), l = state.range(1);
  c.embed_dim = 2048;
  c.num_heads = 16;
  c.num_kv_heads = 4;
  c.head_dim = 128;
  c.rope.rotary_dim = c.head_dim;
  if (state.range(2)) c.attn_logit_softcapping = 50;
  const std::vector<float> query = Random(b * l * c.embed_dim, 2);
  std::vector<uint8_t> padding(static_cast<size_t>(b * l), 0);
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t k = 0; k < l * i / b; ++k) padding[i * l + k] = 1;
  }
  DecoderInputs in;
  in.query = TensorView::F32(query.data(), {b, l, c.embed_dim});
  in.key_padding_mask = TensorView::Bool(padding.data(), {b, l});
  TimeDecoderForward(state, options, in, b, l);
}

BENCHMARK(BM_DecoderPadded)
    ->ArgsProduct({{4}, {2048}, {0, 1}, {0, 1}})
    ->ArgNames({"B", "L", "cap", "flash"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// Args: R requests of [1, L, E] on a decoder layer (H, Hkv, D), as one ragged batch (ForwardBatch, batched 1)
// or one call each (batched 0), as the server ran them before the decoder had a batch.
void BM_DecoderBatch(benchmark::State& state) {
  DecoderAttention::Options options;
  DecoderConfig& c = options.config;
  const int64_t r = state.range(0), l = state.range(1);
  c.embed_dim = state.range(2);
  c.num_heads = state.range(3);
  c.num_kv_heads = state.range(4);
  c.head_dim = state.range(5);
  c.rope.rotary_dim = c.head_dim;
  auto layer = DecoderAttention::Create(options, RandomDecoderWeights(c, 1));
  const std::vector<float> query = Random(r * l * c.embed_dim, 2);
  std::vector<DecoderInputs> inputs(r);
  std::vector<ParsedDecoder> parsed;
  for (int64_t i = 0; i < r; ++i) {
    inputs[i].query = TensorView::F32(query.data() + i * l * c.embed_dim, {1, l, c.embed_dim});
    parsed.push_back(*(*layer)->Validate(inputs[i]));
  }
  std::vector<const ParsedDecoder*> batch;
  for (const ParsedDecoder& p : parsed) batch.push_back(&p);
  for (auto _ : state) {
    if (state.range(6)) {
      benchmark::DoNotOptimize((*layer)->ForwardBatch(batch, 0));
    } else {
      for (const ParsedDecoder* p : batch) benchmark::DoNotOptimize((*layer)->ForwardParsed(*p, 0));
    }
  }
  const double flops = static_cast<double>(r * DecoderFlops(c, 1, l));
  state.counters["GFLOPS"] = benchmark::Counter(flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["requests_per_s"] =
      benchmark::Counter(static_cast<double>(r), benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK(BM_DecoderBatch)
    ->ArgsProduct({{32}, {16}, {2048}, {16}, {4}, {128}, {0, 1}})
    ->ArgsProduct({{8}, {128}, {2048}, {16}, {4}, {128}, {0, 1}})
    ->ArgNames({"R", "L", "E", "H", "Hkv", "D", "batched"})
    ->UseRealTime()
    ->MinTime(1.0)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DecoderFlash)
    ->ArgsProduct({{1}, {2048}, {4096}, {32}, {8}, {128}, {0}, {0, 1}, {0, 1}})
    ->ArgsProduct({{1}, {4096}, {4096}, {32}, {8}, {128}, {1024}, {0, 1}, {0, 1}})
    ->ArgsProduct({{8}, {512}, {2048}, {16}, {4}, {128}, {0}, {0, 1}, {0, 1}})
    ->ArgsProduct({{4}, {256}, {2048}, {16}, {4}, {128}, {0}, {0, 1}, {0, 1}})
    ->ArgsProduct({{8}, {128}, {2048}, {16}, {4}, {128}, {0}, {0, 1}, {0, 1}})
    ->ArgNames({"B", "L", "E", "H", "Hkv", "D", "W", "flash", "bf16"})
    ->UseRealTime()
    ->MinTime(2.0)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DecoderAttention)->Apply(DecoderShapes);
BENCHMARK(BM_DecoderAttentionBf16)->Apply(DecoderShapes);
BENCHMARK(BM_PeakSgemm)->Arg(2048)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_PeakBf16Matmul)->Arg(2048)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LinearOpBf16)
    ->ArgsProduct({{16, 64, 128, 1024, 4096}, {512}, {1536}})  // E=512's fused Q/K/V: on brgemm kernels
    ->ArgsProduct({{1, 16, 128, 1024}, {1024}, {3072}})        // E=1024's: 6 MiB, in column panels
    ->ArgsProduct({{1, 16, 128, 2048}, {4096}, {6144}})        // a decoder's (E=4096, GQA): 48 MiB
    ->UseRealTime();
BENCHMARK(BM_SelfAttention)->Apply(EngineShapes);
BENCHMARK(BM_SelfAttentionBf16)->Apply(EngineShapes);
BENCHMARK(BM_LongAttention)
    ->ArgsProduct({{1}, {2048}, {1024}, {16}, {0, 1}, {0, 1}, {0}})
    ->Args({1, 2048, 1024, 16, 0, 0, 1})
    ->Args({1, 2048, 1024, 16, 0, 1, 1})
    ->Args({1, 8192, 1024, 16, 1, 0, 0})
    ->Args({1, 8192, 1024, 16, 1, 1, 0})
    ->ArgNames({"B", "L", "E", "H", "causal", "flash", "padded"})
    ->UseRealTime()
    ->MinTime(1.0)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_FlashAttention)
    ->ArgsProduct({{2048}, {1024}, {16}, {0, 1}, {0, 1}, {0, 1}})
    ->ArgsProduct({{8192}, {1024}, {16}, {1}, {0, 1}, {0, 1}})
    ->ArgNames({"L", "E", "H", "causal", "strips", "bf16"})
    ->UseRealTime()
    ->MinTime(1.0)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ServerBatch)
    ->ArgsProduct({{1, 2, 4, 8, 16, 32, 64}, {128}, {768}, {12}})
    ->Args({1, 16, 256, 4})
    ->ArgsProduct({{1, 8, 16, 32, 64}, {32}, {512}, {8}})  // the serving bench's batching and PyTorch steps
    ->ArgNames({"R", "L", "E", "H"})
    ->UseRealTime()
    ->MinTime(0.3)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_ServerBatchPerWorker)
    ->ArgsProduct({{8, 16, 32}, {32}, {512}, {8}})
    ->ArgsProduct({{1, 2, 4, 8, 16, 32}, {128}, {768}, {12}})
    ->ArgNames({"R", "L", "E", "H"})
    ->ThreadPerCpu()
    ->UseRealTime()
    ->MinTime(0.3)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_ServerBatchInputs)
    ->ArgsProduct({{64}, {32}, {512}, {8}, {0, 1}, {0, 1, 2}})
    ->ArgsProduct({{8}, {128}, {768}, {12}, {0, 1}, {0, 1, 2}})
    ->ArgNames({"R", "L", "E", "H", "C", "In"})
    ->UseRealTime()
    ->MinTime(0.3)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_RaggedBatch)
    ->Args({32, 64, 512, 8})
    ->Args({64, 16, 256, 4})
    ->ArgNames({"B", "L", "E", "H"})
    ->UseRealTime()
    ->MinTime(0.5)
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace attnserve

BENCHMARK_MAIN();
