// A DECODER_ATTENTION layer served by a whole in-process server: loaded from a three-layer checkpoint under
// its prefix, its answers through attnserve.v1 Infer and KServe ModelInfer equal to PyTorch's golden answers
// (tests/golden/decoder_cases.json), positions by offset and by position_ids, sessions appending to it equal to
// the whole sequence's answer, and the inputs it does not take refused naming the field.
#include <grpcpp/grpcpp.h>

#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "attnserve/v1/session.grpc.pb.h"
#include "core/safetensors.h"
#include "gtest/gtest.h"
#include "inference/grpc_service.grpc.pb.h"
#include "tests/testing/naive_mha.h"
#include "tests/testing/server_harness.h"

namespace attnserve::testing {
namespace {

[[maybe_unused]] ::testing::Environment* const kQuietLogs = ::testing::AddGlobalTestEnvironment(new QuietServerLogs);

// dec_gqa: E=32, H=8 of D=8 over Hkv=2; dec_position_ids: E=32, H=4, Hkv=2, D=8, B=3 with position_ids.
constexpr char kConfig[] = R"pb(
  layers {
    name: "gqa" embed_dim: 32 num_heads: 8 kind: DECODER_ATTENTION
    decoder { num_kv_heads: 2 head_dim: 8 }
    weights_path: "tests/golden/dec_gqa.weights.safetensors" weights_prefix: "model.layers.1.self_attn."
  }
  layers {
    name: "positions" embed_dim: 32 num_heads: 4 kind: DECODER_ATTENTION decoder { num_kv_heads: 2 }
    weights_path: "tests/golden/dec_position_ids.weights.safetensors" weights_prefix: "model.layers.1.self_attn."
  }
  layers {
    name: "llama3" embed_dim: 32 num_heads: 2 kind: DECODER_ATTENTION
    decoder {
      num_kv_heads: 1 head_dim: 32
      rope {
        theta: 500000
        scaling { type: LLAMA3 factor: 8 low_freq_factor: 1 high_freq_factor: 4 original_max_position_embeddings: 256 }
      }
    }
    weights_path: "tests/golden/dec_llama3_scaling.weights.safetensors" weights_prefix: "model.layers.1.self_attn."
  }
  layers {
    name: "window" embed_dim: 32 num_heads: 4 kind: DECODER_ATTENTION decoder { num_kv_heads: 2 sliding_window: 4 }
    weights_path: "tests/golden/dec_window.weights.safetensors" weights_prefix: "model.layers.1.self_attn."
  }
  layers { name: "mha" embed_dim: 32 num_heads: 4 seed: 3 }
  sessions { kv_block_tokens: 2 }
)pb";

struct Golden {
  std::unique_ptr<SafetensorsFile> io;
  std::vector<float> Floats(const std::string& name) const { return *io->ReadFloat32(name); }
  const std::vector<int64_t>& Shape(const std::string& name) const { return io->Find(name)->shape; }
  std::string Raw(const std::string& name) const {
    const SafetensorsEntry* e = io->Find(name);
    return std::string(reinterpret_cast<const char*>(e->data), e->num_bytes);
  }
};

Golden LoadGolden(const std::string& name) {
  auto io = SafetensorsFile::Open("tests/golden/" + name + ".io.safetensors");
  EXPECT_TRUE(io.ok()) << io.status();
  return Golden{std::move(*io)};
}

v1::InferRequest QueryRequest(const std::string& layer, const Golden& g) {
  v1::InferRequest r;
  r.set_layer(layer);
  for (int64_t d : g.Shape("query")) r.mutable_query()->add_shape(d);
  r.mutable_query()->set_dtype(v1::FLOAT32);
  r.mutable_query()->set_raw_data(g.Raw("query"));
  return r;
}

std::vector<float> FromRaw(const std::string& raw) {
  std::vector<float> out(raw.size() / 4);
  std::memcpy(out.data(), raw.data(), out.size() * 4);
  return out;
}

class DecoderServingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto server = StartInProcessServer(kConfig);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
  }
  grpc::Status Infer(const v1::InferRequest& r, v1::InferResponse* out) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(absl::Seconds(30)));
    return server_->stub->Infer(&ctx, r, out);
  }
  std::unique_ptr<TestServer> server_;
};

TEST_F(DecoderServingTest, InferMatchesPyTorchWithWeightsPerHead) {
  const Golden g = LoadGolden("dec_gqa");
  v1::InferRequest r = QueryRequest("gqa", g);
  r.set_need_weights(true);
  r.set_average_attn_weights(false);
  v1::InferResponse out;
  ASSERT_TRUE(Infer(r, &out).ok());
  EXPECT_LE(MaxAbsDiff(FromRaw(out.output().raw_data()), g.Floats("output")), 1e-4);
  EXPECT_EQ(std::vector<int64_t>(out.attn_weights().shape().begin(), out.attn_weights().shape().end()),
            g.Shape("attn_weights"));
  EXPECT_LE(MaxAbsDiff(FromRaw(out.attn_weights().raw_data()), g.Floats("attn_weights")), 1e-5);
}

TEST_F(DecoderServingTest, PositionsByIdsAndByOffset) {
  const Golden ids = LoadGolden("dec_position_ids");
  v1::InferRequest r = QueryRequest("positions", ids);
  const SafetensorsEntry* pos = ids.io->Find("position_ids");
  std::vector<int64_t> values(static_cast<size_t>(pos->num_elements()));
  std::memcpy(values.data(), pos->data, pos->num_bytes);
  for (int64_t p : values) r.add_position_ids(p);
  v1::InferResponse out;
  ASSERT_TRUE(Infer(r, &out).ok());
  EXPECT_LE(MaxAbsDiff(FromRaw(out.output().raw_data()), ids.Floats("output")), 1e-4);
  r.mutable_position_ids()->RemoveLast();
  const grpc::Status short_ids = Infer(r, &out);
  EXPECT_EQ(short_ids.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(short_ids.error_message(), "position_ids: holds 26 values, expected one per query token (27)");

  const Golden offset = LoadGolden("dec_llama3_scaling");  // positions from 700
  v1::InferRequest o = QueryRequest("llama3", offset);
  o.set_position_offset(700);
  ASSERT_TRUE(Infer(o, &out).ok());
  EXPECT_LE(MaxAbsDiff(FromRaw(out.output().raw_data()), offset.Floats("output")), 1e-4);
  // RoPE is relative: shifting every position of a sequence leaves its attention as it was (up to the
  // float32 angles). Positions that are not a shift change it.
  o.set_position_offset(0);
  ASSERT_TRUE(Infer(o, &out).ok());
  EXPECT_LE(MaxAbsDiff(FromRaw(out.output().raw_data()), offset.Floats("output")), 1e-4);
  const int64_t len = offset.Shape("query")[1];
  for (int64_t b = 0; b < offset.Shape("query")[0]; ++b) {
    for (int64_t i = 0; i < len; ++i) o.add_position_ids(700 + 3 * i);
  }
  ASSERT_TRUE(Infer(o, &out).ok());
  EXPECT_GT(MaxAbsDiff(FromRaw(out.output().raw_data()), offset.Floats("output")), 1e-3);
}

TEST_F(DecoderServingTest, InputsTheLayerDoesNotTakeAreRefused) {
  const Golden g = LoadGolden("dec_gqa");
  v1::InferRequest r = QueryRequest("gqa", g);
  *r.mutable_key() = r.query();
  *r.mutable_value() = r.query();
  v1::InferResponse out;
  grpc::Status s = Infer(r, &out);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(),
            "key: layer 'gqa' is DECODER_ATTENTION (causal self-attention; its only mask is key_padding_mask)");
  r = QueryRequest("gqa", g);
  r.set_position_offset(-2);
  s = Infer(r, &out);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message().rfind("position_offset: must be in [0, ", 0), 0u) << s.error_message();
  // A multi-head attention layer has no rotary positions.
  r = QueryRequest("mha", g);
  r.set_position_offset(5);
  s = Infer(r, &out);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(),
            "position_offset: only DECODER_ATTENTION layers take rotary positions; this layer is MULTIHEAD_ATTENTION");
  // Decoder sessions are self-attention: a memory is refused naming it.
  auto sessions = v1::SessionService::NewStub(server_->channel);
  v1::CreateSessionRequest create;
  create.set_session_id("s1");
  create.add_layers("gqa");
  v1::Tensor memory = r.query();
  memory.clear_shape();
  memory.add_shape(18);
  memory.add_shape(32);
  (*create.mutable_memory())["gqa"] = memory;
  v1::Session session;
  grpc::ClientContext ctx;
  s = sessions->CreateSession(&ctx, create, &session);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << Str(s);
  EXPECT_EQ(s.error_message(), "memory[gqa]: a DECODER_ATTENTION layer has no cross-attention sessions");
}

// Sequence `b` of a golden [B, L, E] tensor, rows [from, from + n), as an [n, E] FLOAT32 tensor.
v1::Tensor SequenceRows(const Golden& g, const std::string& name, int64_t b, int64_t from, int64_t n) {
  const std::vector<int64_t>& shape = g.Shape(name);
  const std::vector<float> all = g.Floats(name);
  v1::Tensor t;
  t.add_shape(n);
  t.add_shape(shape[2]);
  t.set_dtype(v1::FLOAT32);
  const float* first = all.data() + (b * shape[1] + from) * shape[2];
  t.set_raw_data(std::string(reinterpret_cast<const char*>(first), static_cast<size_t>(n * shape[2]) * 4));
  return t;
}

// A session on a sliding-window GQA layer, fed a golden sequence in appends of 3, 1, 5 and 4 tokens (across
// the window of 4): each append's output equals PyTorch's rows of the whole sequence's causal forward, and the
// cache holds Hkv * D floats per token, only for the window's blocks.
TEST_F(DecoderServingTest, SessionAppendsEqualTheWholeSequenceAcrossTheWindow) {
  const Golden g = LoadGolden("dec_window");  // E=32, H=4 over Hkv=2 of D=8, window 4, L=13
  auto sessions = v1::SessionService::NewStub(server_->channel);
  for (int64_t b = 0; b < 2; ++b) {
    const std::string id = absl::StrCat("w", b);
    v1::CreateSessionRequest create;
    create.set_session_id(id);
    create.add_layers("window");
    v1::Session session;
    {
      grpc::ClientContext ctx;
      ASSERT_TRUE(sessions->CreateSession(&ctx, create, &session).ok());
    }
    int64_t done = 0;
    for (int64_t n : {3, 1, 5, 4}) {
      v1::AppendRequest append;
      append.set_session_id(id);
      append.set_layer("window");
      *append.mutable_query() = SequenceRows(g, "query", b, done, n);
      v1::AppendResponse out;
      grpc::ClientContext ctx;
      const grpc::Status s = sessions->Append(&ctx, append, &out);
      ASSERT_TRUE(s.ok()) << Str(s);
      done += n;
      EXPECT_EQ(out.position(), done);
      const v1::Tensor want = SequenceRows(g, "output", b, done - n, n);
      EXPECT_LE(MaxAbsDiff(FromRaw(out.output().raw_data()), FromRaw(want.raw_data())), 1e-4)
          << "sequence " << b << " rows " << done - n << ".." << done;
    }
    v1::GetSessionRequest get;
    get.set_session_id(id);
    grpc::ClientContext ctx;
    ASSERT_TRUE(sessions->GetSession(&ctx, get, &session).ok());
    EXPECT_EQ(session.tokens(), 13);
    // Blocks of 2 tokens of 2 * 16 floats (Hkv * D; an MHA cache of these heads would be 32 wide): the window's
    // keys for token 13 (10..12) and one block more (8..9), in blocks 4, 5 and 6; the first 8 tokens' are freed.
    EXPECT_EQ(session.bytes(), 3 * 2 * 2 * 16 * 4);
  }
  // A truncate keeping the keys its next token needs works; one below the freed keys is refused, saying how far
  // it may go.
  auto truncate = [&](int64_t tokens, v1::Session* session) {
    v1::TruncateSessionRequest request;
    request.set_session_id("w0");
    request.set_tokens(tokens);
    grpc::ClientContext ctx;
    return sessions->TruncateSession(&ctx, request, session);
  };
  v1::Session session;
  grpc::Status s = truncate(5, &session);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Str(s);
  EXPECT_EQ(s.error_message(),
            "tokens: layer 'window' has freed the keys before token 8 (they left its sliding window of 4): truncate "
            "to at least 11 tokens, got 5");
  s = truncate(11, &session);
  ASSERT_TRUE(s.ok()) << Str(s);
  EXPECT_EQ(session.tokens(), 11);
  // The rejected tokens' replacement: the output equals the whole sequence's rows again.
  v1::AppendRequest append;
  append.set_session_id("w0");
  append.set_layer("window");
  *append.mutable_query() = SequenceRows(g, "query", 0, 11, 2);
  v1::AppendResponse out;
  grpc::ClientContext ctx;
  s = sessions->Append(&ctx, append, &out);
  ASSERT_TRUE(s.ok()) << Str(s);
  EXPECT_LE(MaxAbsDiff(FromRaw(out.output().raw_data()), FromRaw(SequenceRows(g, "output", 0, 11, 2).raw_data())),
            1e-4);
}

TEST_F(DecoderServingTest, KServeModelInferWithPositionIdsAndMetadata) {
  auto kserve = inference::GRPCInferenceService::NewStub(server_->channel);
  const Golden g = LoadGolden("dec_position_ids");
  inference::ModelInferRequest r;
  r.set_model_name("positions");
  auto* q = r.add_inputs();
  q->set_name("query");
  q->set_datatype("FP32");
  for (int64_t d : g.Shape("query")) q->add_shape(d);
  r.add_raw_input_contents(g.Raw("query"));
  auto* p = r.add_inputs();
  p->set_name("position_ids");
  p->set_datatype("INT64");
  for (int64_t d : g.Shape("position_ids")) p->add_shape(d);
  r.add_raw_input_contents(g.Raw("position_ids"));
  inference::ModelInferResponse out;
  {
    grpc::ClientContext ctx;
    const grpc::Status s = kserve->ModelInfer(&ctx, r, &out);
    ASSERT_TRUE(s.ok()) << Str(s);
  }
  ASSERT_EQ(out.raw_output_contents_size(), 1);
  EXPECT_LE(MaxAbsDiff(FromRaw(out.raw_output_contents(0)), g.Floats("output")), 1e-4);

  inference::ModelMetadataRequest mr;
  mr.set_name("positions");
  inference::ModelMetadataResponse meta;
  grpc::ClientContext ctx;
  ASSERT_TRUE(kserve->ModelMetadata(&ctx, mr, &meta).ok());
  std::vector<std::string> inputs;
  for (const auto& t : meta.inputs()) inputs.push_back(t.name() + ":" + t.datatype());
  EXPECT_EQ(inputs, (std::vector<std::string>{"query:FP32", "key_padding_mask:BOOL", "position_ids:INT64"}));
}

}  // namespace
}  // namespace attnserve::testing
