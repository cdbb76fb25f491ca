#include "core/flash_attention.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <new>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/bf16_rows.h"
#include "core/flash_strips_avx512.h"
#include "core/flash_strips_bf16.h"
#include "core/onednn_ops.h"
#include "core/row_softmax.h"
#include "core/simd_loops.h"

namespace attnserve {
namespace {

// One thread's block state: scores [rows, key_cols], context [rows, Dh], running max and sum per row; and the
// keys and values of the (call, sequence, head) it works on, copied dense: [S, Dh] each (f32, or bf16 for the
// block matmuls on brgemm kernels, with the query block [rows, Dh] and its probabilities [rows, key_cols]).
struct FlashScratch {
  std::vector<float> scores, acc, row_max, row_sum;
  std::vector<float> head_k, head_v;
  std::vector<uint16_t> head_k16, head_v16, q16, probs16;
  int64_t call = -1, b = -1, h = -1;
};

FlashScratch& ThreadFlashScratch() {
  thread_local FlashScratch scratch;
  return scratch;
}

template <typename T>
int64_t CapacityBytes(const std::vector<T>& buf) {
  return static_cast<int64_t>(buf.capacity() * sizeof(T));
}

}  // namespace

int64_t FlashScratchHeldBytes() {
  const FlashScratch& s = ThreadFlashScratch();
  int64_t bytes = 0;
  for (const std::vector<float>* buf : {&s.scores, &s.acc, &s.row_max, &s.row_sum, &s.head_k, &s.head_v}) {
    bytes += CapacityBytes(*buf);
  }
  for (const std::vector<uint16_t>* buf : {&s.head_k16, &s.head_v16, &s.q16, &s.probs16}) bytes += CapacityBytes(*buf);
  return bytes;
}

void ReleaseFlashScratch(size_t keep_bytes) {
  if (FlashScratchHeldBytes() > static_cast<int64_t>(keep_bytes)) ThreadFlashScratch() = FlashScratch();
}

namespace {

// At least n elements; grown to exactly n (reserve first: resize alone may double the capacity, and a causal
// call's first block, the last rows, is often the shorter one), so that FlashScratchBytes bounds what is held.
template <typename T>
T* Sized(std::vector<T>& buf, int64_t n) {
  if (buf.size() < static_cast<size_t>(n)) {
    buf.reserve(static_cast<size_t>(n));
    buf.resize(static_cast<size_t>(n));
  }
  return buf.data();
}

// Elements AlignedSized holds beyond n: up to a 64-byte boundary.
template <typename T>
constexpr int64_t kAlignPad = 64 / sizeof(T) - 1;

// As Sized, the first element on a 64-byte boundary (a cache line; whole AVX-512 registers): n + kAlignPad held.
template <typename T>
T* AlignedSized(std::vector<T>& buf, int64_t n) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(Sized(buf, n + kAlignPad<T>));
  return reinterpret_cast<T*>((at + 63) & ~uintptr_t{63});
}

// Rows [0, rows) of head h of sequence b (at src + b * seq_stride + row * ld + h * dh) into dense [rows, dh].
template <typename T>
void CopyHeadRows(const T* src, int64_t seq_stride, int64_t ld, int64_t b, int64_t h, int64_t rows, int64_t dh,
                  T* dst) {
  const T* first = src + b * seq_stride + h * dh;
  for (int64_t j = 0; j < rows; ++j) std::copy_n(first + j * ld, dh, dst + j * dh);
}

// Whether this thread's dense head copies are of (call, b, h) already; MarkHead records them once filled (not
// before: a fill that throws leaves no stale mark).
bool SameHead(const FlashScratch& s, int64_t call, int64_t b, int64_t h) {
  return s.call == call && s.b == b && s.h == h;
}

void MarkHead(FlashScratch& s, int64_t call, int64_t b, int64_t h) {
  s.call = call;
  s.b = b;
  s.h = h;
}

// The key and value head query head h reads: h itself, or its group's under grouped-query attention.
int64_t KvHead(const FlashAttentionArgs& a, int64_t h) { return a.kv_heads > 0 ? h / (a.heads / a.kv_heads) : h; }

// Row `row` of head h of sequence b of `op`.
const float* Row(const FlashOperand& op, int64_t b, int64_t h, int64_t row, int64_t head_dim) {
  return op.data + b * op.seq_stride + row * op.ld + h * head_dim;
}

// The first key query row `row` sees: under a sliding window row - window + 1, else 0.
int64_t FirstKey(const FlashAttentionArgs& a, int64_t row) {
  return a.window > 0 ? std::max<int64_t>(0, row - a.window + 1) : 0;
}

// Under a sliding window, -inf over the keys of scores [rows, cols] (keys from k0, row stride ld) that query rows
// [row, row + rows) no longer see; the rest of a block that some of them see.
void MaskBeforeWindow(const FlashAttentionArgs& a, int64_t row, int64_t rows, int64_t k0, int64_t cols, float* scores,
                      int64_t ld) {
  if (a.window <= 0) return;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = std::clamp<int64_t>(FirstKey(a, row + r) - k0, 0, cols);
    std::fill_n(scores + r * ld, n, -std::numeric_limits<float>::infinity());
  }
}

enum class KeyBlock { kOpen, kMixed, kMasked };

// What a key block's bias does: nothing (all 0), mask every key (all -inf), or something to add.
KeyBlock ClassifyKeyBlock(const float* bias, int64_t n) {
  if (bias == nullptr) return KeyBlock::kOpen;
  bool all_zero = true, all_masked = true;
  for (int64_t j = 0; j < n; ++j) {
    all_zero &= bias[j] == 0.0f;
    all_masked &= bias[j] == -std::numeric_limits<float>::infinity();
  }
  return all_zero ? KeyBlock::kOpen : all_masked ? KeyBlock::kMasked : KeyBlock::kMixed;
}

void AddKeyBias(const float* bias, int64_t rows, int64_t cols, float* scores, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * ld;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) row[j] += bias[j];
  }
}

// The keys and values of head h of sequence b, rows [0, S), as dense [S, Dh] operands: in the projections
// their rows are 3E floats apart, so every block's sgemm would pack its operand from as many pages as rows.
// Copied once per (call, sequence, head) by each thread that takes one of its query blocks.
void DenseHeadKv(const FlashAttentionArgs& a, int64_t call, int64_t b, int64_t h, FlashScratch& s,
                 FlashOperand* k, FlashOperand* v) {
  const int64_t dh = a.head_dim, n = a.kv_len * dh;
  h = KvHead(a, h);
  if (!SameHead(s, call, b, h)) {
    CopyHeadRows(a.k.data, a.k.seq_stride, a.k.ld, b, h, a.kv_len, dh, Sized(s.head_k, n));
    CopyHeadRows(a.v.data, a.v.seq_stride, a.v.ld, b, h, a.kv_len, dh, Sized(s.head_v, n));
    MarkHead(s, call, b, h);
  }
  *k = {s.head_k.data(), dh, n};
  *v = {s.head_v.data(), dh, n};
}

// The same in bf16 for the block matmuls on brgemm kernels (which take only dense operands).
void DenseHeadKvBf16(const FlashAttentionArgs& a, int64_t call, int64_t b, int64_t h, FlashScratch& s) {
  const FlashBf16& w = a.bf16;
  const int64_t dh = a.head_dim, n = a.kv_len * dh;
  h = KvHead(a, h);
  if (!SameHead(s, call, b, h)) {
    CopyHeadRows(w.k, w.kv_seq_stride, w.ld, b, h, a.kv_len, dh, Sized(s.head_k16, n));
    CopyHeadRows(w.v, w.kv_seq_stride, w.ld, b, h, a.kv_len, dh, Sized(s.head_v16, n));
    MarkHead(s, call, b, h);
  }
}

// The two matmuls of a key block: scores [lb, kb] = Q rows [l0, l0 + lb) . K rows [k0, k0 + kb)^T, and
// acc [lb, Dh] += probabilities [lb, kb] . V rows [k0, k0 + kb); in f32 (sgemm on the dense head copies) or,
// for a bf16 layer, with its bf16 primitives on its bf16 rows, whole blocks on brgemm kernels where it has those.
struct BlockMatmuls {
  const FlashAttentionArgs& a;
  int64_t b, h;
  FlashOperand head_k, head_v;  // f32 only
  // bf16 with block matmuls: the dense copies of the head's keys and values and, for a whole query block, of
  // its rows (null otherwise; the block is at query row q_l0); probs16 holds a block's probabilities.
  const uint16_t *k16 = nullptr, *v16 = nullptr, *q16 = nullptr;
  uint16_t* probs16 = nullptr;
  int64_t q_l0 = 0;

  // Whether [lb, kb] is a whole block of a whole query block, which the block matmuls take.
  bool OnWholeBlocks(int64_t lb, int64_t kb) const {
    return q16 != nullptr && lb == a.query_rows && kb == a.key_cols;
  }

  absl::Status Scores(int64_t l0, int64_t lb, int64_t k0, int64_t kb, float* scores) const {
    const int64_t dh = a.head_dim;
    if (OnWholeBlocks(lb, kb)) return a.bf16.block_scores->Execute(q16 + (l0 - q_l0) * dh, k16 + k0 * dh, scores);
    if (a.bf16.scores_op == nullptr) {
      return Sgemm(true, lb, kb, dh, Row(a.q, b, h, l0, dh), a.q.ld, Row(head_k, 0, 0, k0, dh), head_k.ld, 0.0f,
                   scores, kb);
    }
    const FlashBf16& w = a.bf16;
    const View4 q{const_cast<uint16_t*>(w.q + b * w.q_seq_stride + l0 * w.ld + h * dh), {1, 1, lb, dh},
                  {0, 0, w.ld, 1}, true};
    const View4 kt{const_cast<uint16_t*>(w.k + b * w.kv_seq_stride + k0 * w.ld + KvHead(a, h) * dh),
                   {1, 1, dh, kb},
                   {0, 0, 1, w.ld},
                   true};
    return w.scores_op->Execute(q, kt, View4{scores, {1, 1, lb, kb}, {0, 0, kb, 1}});
  }

  absl::Status AddContext(int64_t lb, int64_t k0, int64_t kb, float* probs, float* acc) const {
    const int64_t dh = a.head_dim;
    if (OnWholeBlocks(lb, kb)) {
      FloatRowsToBf16(probs, lb, kb, kb, probs16, kb);
      return a.bf16.block_context->Execute(probs16, v16 + k0 * dh, acc);
    }
    if (a.bf16.scores_op == nullptr) {
      return Sgemm(false, lb, dh, kb, probs, kb, Row(head_v, 0, 0, k0, dh), head_v.ld, 1.0f, acc, dh);
    }
    const FlashBf16& w = a.bf16;
    const View4 v{const_cast<uint16_t*>(w.v + b * w.kv_seq_stride + k0 * w.ld + KvHead(a, h) * dh),
                  {1, 1, kb, dh},
                  {0, 0, w.ld, 1},
                  true};
    return w.context_add_op->Execute(View4{probs, {1, 1, lb, kb}, {0, 0, kb, 1}}, v,
                                     View4{acc, {1, 1, lb, dh}, {0, 0, dh, 1}});
  }
};

// A whole query block (lb == query_rows) that meets a whole key block: the dense bf16 copies for the block
// matmuls on brgemm kernels (its query rows, the head's keys and values) and their probabilities' buffer, in mm.
void SetUpWholeBlocks(const FlashAttentionArgs& a, int64_t call, int64_t b, int64_t h, int64_t l0, FlashScratch& s,
                      BlockMatmuls* mm) {
  const FlashBf16& w = a.bf16;
  const int64_t dh = a.head_dim, lb = a.query_rows;
  DenseHeadKvBf16(a, call, b, h, s);
  uint16_t* q16 = Sized(s.q16, lb * dh);
  CopyHeadRows(w.q + l0 * w.ld, w.q_seq_stride, w.ld, b, h, lb, dh, q16);
  mm->k16 = s.head_k16.data();
  mm->v16 = s.head_v16.data();
  mm->q16 = q16;
  mm->probs16 = Sized(s.probs16, lb * a.key_cols);
  mm->q_l0 = l0;
}

// A head's operands on the strip kernels: f32 keys as panels (PackKeyPanels) and values dense [S, Dh]; or, for a
// bf16 layer, its bf16 keys as pair panels (PackKeyPairPanels), values as key pairs (PackValuePairs) and a strip's
// bf16 probabilities. Packed once per (call, sequence, head) by each thread that takes one of its query blocks.
struct StripHead {
  const FlashAttentionArgs& a;
  int64_t b, h;
  const float *panels = nullptr, *values = nullptr;
  const uint16_t *panels16 = nullptr, *pairs16 = nullptr;
  uint16_t* probs16 = nullptr;
  int64_t ld_probs16 = 0;

  // scores [rb, cols] (row stride ld) = query rows [row, row + rb) . keys [k0, k0 + cols)^T.
  void Scores(int64_t row, int64_t rb, int64_t k0, int64_t cols, float* scores, int64_t ld) const {
    const int64_t dh = a.head_dim;
    if (panels16 == nullptr) return StripScores(Row(a.q, b, h, row, dh), a.q.ld, rb, panels, k0, cols, dh, scores, ld);
    const FlashBf16& w = a.bf16;
    StripScoresBf16(w.q + b * w.q_seq_stride + row * w.ld + h * dh, w.ld, rb, panels16, k0, cols, dh, scores, ld);
  }

  // The online softmax step of scores [rb, cols] (row stride ld; row r sees its first open0 + r keys) on rows
  // [r0, r0 + rb) of the block state (their max, sum and context): its probabilities over the scores, or for a
  // bf16 layer rounded into probs16, where AddContext reads them.
  void Softmax(float* scores, int64_t rb, int64_t cols, int64_t ld, int64_t open0, float* row_max, float* row_sum,
               float* acc) const {
    const int64_t dh = a.head_dim;
    if (panels16 == nullptr) return StripOnlineSoftmax(scores, rb, cols, ld, open0, row_max, row_sum, acc, dh, dh);
    StripOnlineSoftmaxBf16(scores, rb, cols, ld, open0, row_max, row_sum, acc, dh, dh, probs16, ld_probs16);
  }

  // acc [rb, Dh] += the last Softmax's probabilities [rb, cols] . values [k0, k0 + cols): f32 `probs` (row stride
  // ld), the scores Softmax wrote over; for a bf16 layer probs16, and `probs` is not read.
  void AddContext(const float* probs, int64_t ld, int64_t rb, int64_t k0, int64_t cols, float* acc) const {
    const int64_t dh = a.head_dim;
    if (panels16 == nullptr) return StripAddContext(probs, ld, rb, values + k0 * dh, cols, dh, acc, dh);
    StripAddContextBf16(probs16, ld_probs16, rb, pairs16, k0, cols, dh, acc, dh);
  }
};

// The f32 strip operands of head->(b, h) in this thread's scratch: keys as panels, values dense (packed when `fill`).
void PackHeadF32(FlashScratch& s, bool fill, StripHead* head) {
  const FlashAttentionArgs& a = head->a;
  const int64_t dh = a.head_dim;
  float* k = AlignedSized(s.head_k, PackedKeyFloats(a.kv_len, dh));
  float* v = AlignedSized(s.head_v, a.kv_len * dh);
  if (fill) {
    const int64_t kvh = KvHead(a, head->h);
    PackKeyPanels(Row(a.k, head->b, kvh, 0, dh), a.kv_len, a.k.ld, dh, k);
    CopyHeadRows(a.v.data, a.v.seq_stride, a.v.ld, head->b, kvh, a.kv_len, dh, v);
  }
  head->panels = k;
  head->values = v;
}

// The bf16 strip operands of head->(b, h): keys as pair panels, values as key pairs (packed when `fill`), and a
// strip's bf16 probabilities [kFlashStripRows, strip_keys].
void PackHeadBf16(FlashScratch& s, bool fill, int64_t strip_keys, StripHead* head) {
  const FlashAttentionArgs& a = head->a;
  const FlashBf16& w = a.bf16;
  const int64_t dh = a.head_dim, head_offset = head->b * w.kv_seq_stride + KvHead(a, head->h) * dh;
  uint16_t* k = AlignedSized(s.head_k16, PackedKeyPairElems(a.kv_len, dh));
  uint16_t* v = AlignedSized(s.head_v16, PackedValuePairElems(a.kv_len, dh));
  if (fill) {
    PackKeyPairPanels(w.k + head_offset, a.kv_len, w.ld, dh, k);
    PackValuePairs(w.v + head_offset, a.kv_len, w.ld, dh, v);
  }
  head->panels16 = k;
  head->pairs16 = v;
  head->probs16 = AlignedSized(s.probs16, kFlashStripRows * strip_keys);
  head->ld_probs16 = strip_keys;
}

// Head h of sequence b's strip operands in this thread's scratch, packed unless they are already.
StripHead PackedHead(const FlashAttentionArgs& a, int64_t call, int64_t b, int64_t h, int64_t strip_keys,
                     FlashScratch& s) {
  StripHead head{a, b, h};
  const int64_t kvh = KvHead(a, h);  // query heads of one group share its packed keys and values
  const bool fill = !SameHead(s, call, b, kvh);
  if (a.bf16.scores_op == nullptr) {
    PackHeadF32(s, fill, &head);
  } else {
    PackHeadBf16(s, fill, strip_keys, &head);
  }
  if (fill) MarkHead(s, call, b, kvh);
  return head;
}

// One query block's running state: its scores block, context accumulator and per-row max and sum.
struct QueryBlockState {
  float *scores, *acc, *row_max, *row_sum;
};

// Rows [r0, r0 + rb) of the query block at l0 against keys [k0, k0 + kb): scores, masks, the online softmax
// step, the context added. `bias` is the key block's key padding (null: none), `kind` its classification.
absl::Status KeyBlockStep(const FlashAttentionArgs& a, const BlockMatmuls& mm, int64_t l0, int64_t r0, int64_t rb,
                          int64_t k0, int64_t kb, const float* bias, KeyBlock kind, const QueryBlockState& st) {
  const int64_t dh = a.head_dim, row = l0 + r0;
  ATTN_RETURN_IF_ERROR(mm.Scores(row, rb, k0, kb, st.scores));
  if (a.add_mask) a.add_mask(mm.b, mm.h, row, rb, k0, kb, st.scores, kb);
  if (kind == KeyBlock::kMixed) AddKeyBias(bias, rb, kb, st.scores, kb);
  MaskBeforeWindow(a, row, rb, k0, kb, st.scores, kb);
  // Causal: row r (query row + r) sees keys up to row + r, the first row + r - k0 + 1 of this block.
  OnlineSoftmaxBlock(st.scores, rb, kb, kb, a.causal ? row - k0 + 1 : kb, st.row_max + r0, st.row_sum + r0,
                     st.acc + r0 * dh, dh, dh);
  return mm.AddContext(rb, k0, kb, st.scores, st.acc + r0 * dh);
}

// A causal key block that some of the query block's rows see only in part (the diagonal) is taken in row
// chunks of a quarter of the block, each over the keys its last row sees: a whole block computes twice the
// pairs the mask keeps there (6% more than all kept pairs at L=8192 with 512 x 512 blocks, 25% at L=2048);
// in quarters, 25% more on the diagonal.
int64_t DiagonalChunkRows(const FlashAttentionArgs& a) { return std::max<int64_t>(1, a.query_rows / 4); }

// Zeroed context, running max -inf and sum 0 for lb rows, in buffers of the scratch; `scores` as given.
QueryBlockState StartQueryBlock(FlashScratch& s, int64_t lb, int64_t dh, float* scores) {
  const QueryBlockState st{scores, AlignedSized(s.acc, lb * dh), Sized(s.row_max, lb), Sized(s.row_sum, lb)};
  std::fill_n(st.acc, lb * dh, 0.0f);
  std::fill_n(st.row_max, lb, -std::numeric_limits<float>::infinity());
  std::fill_n(st.row_sum, lb, 0.0f);
  return st;
}

// The query block's context rows, each its accumulated context / sum (zero where no key was open).
void WriteContext(const FlashAttentionArgs& a, int64_t b, int64_t h, int64_t l0, int64_t lb,
                  const QueryBlockState& st) {
  const int64_t dh = a.head_dim;
  for (int64_t r = 0; r < lb; ++r) {
    float* out = a.out + b * a.out_seq_stride + (l0 + r) * a.out_ld + h * dh;
    const float inv = st.row_sum[r] > 0.0f ? 1.0f / st.row_sum[r] : 0.0f;
    for (int64_t d = 0; d < dh; ++d) out[d] = st.acc[r * dh + d] * inv;
  }
}

// The key blocks a query block at l0 of lb rows meets: keys [0, key_end).
int64_t KeyEnd(const FlashAttentionArgs& a, int64_t l0, int64_t lb) {
  return a.causal ? std::min(a.kv_len, l0 + lb) : a.kv_len;
}

// A query block of one (sequence, head): every key block up to the causal limit, then context / sum.
absl::Status AttendQueryBlock(const FlashAttentionArgs& a, int64_t call, int64_t b, int64_t h, int64_t l0) {
  const int64_t dh = a.head_dim, lb = std::min(a.query_rows, a.q_len - l0);
  FlashScratch& s = ThreadFlashScratch();
  const QueryBlockState st = StartQueryBlock(s, lb, dh, Sized(s.scores, lb * std::min(a.key_cols, a.kv_len)));
  BlockMatmuls mm{a, b, h, {}, {}};
  if (a.bf16.scores_op == nullptr) DenseHeadKv(a, call, b, h, s, &mm.head_k, &mm.head_v);
  const int64_t key_end = KeyEnd(a, l0, lb);
  if (a.bf16.block_scores != nullptr && lb == a.query_rows && key_end >= a.key_cols) {
    SetUpWholeBlocks(a, call, b, h, l0, s, &mm);
  }
  const int64_t chunk = DiagonalChunkRows(a);
  for (int64_t k0 = FirstKey(a, l0); k0 < key_end; k0 += a.key_cols) {
    const int64_t kb = std::min(a.key_cols, key_end - k0);
    const float* bias = a.key_bias != nullptr ? a.key_bias + b * a.kv_len + k0 : nullptr;
    const KeyBlock kind = ClassifyKeyBlock(bias, kb);
    if (kind == KeyBlock::kMasked) continue;  // adds nothing to any row's sum or context
    if (!a.causal || k0 + kb <= l0 + 1 || lb <= chunk) {
      ATTN_RETURN_IF_ERROR(KeyBlockStep(a, mm, l0, 0, lb, k0, kb, bias, kind, st));
      continue;
    }
    for (int64_t r0 = 0; r0 < lb; r0 += chunk) {
      const int64_t rb = std::min(chunk, lb - r0), seen = std::min(kb, l0 + r0 + rb - k0);
      if (seen <= 0) continue;  // rows before the block's first key
      ATTN_RETURN_IF_ERROR(KeyBlockStep(a, mm, l0, r0, rb, k0, seen, bias, kind, st));
    }
  }
  WriteContext(a, b, h, l0, lb, st);
  return absl::OkStatus();
}

// The strip path's key chunk: key_cols rounded up to whole key panels.
int64_t StripKeyChunk(const FlashAttentionArgs& a) {
  return (std::min(a.key_cols, a.kv_len) + kKeyPanelKeys - 1) / kKeyPanelKeys * kKeyPanelKeys;
}

// AttendQueryBlock on the strip kernels: per key chunk, each strip of kFlashStripRows query rows takes its
// scores, masks, online softmax step and context while its scores stay in the L1 cache. A causal strip stops
// at the last key its last row sees.
absl::Status AttendQueryBlockInStrips(const FlashAttentionArgs& a, int64_t call, int64_t b, int64_t h, int64_t l0) {
  const int64_t dh = a.head_dim, lb = std::min(a.query_rows, a.q_len - l0), kc = StripKeyChunk(a);
  FlashScratch& s = ThreadFlashScratch();
  const QueryBlockState st = StartQueryBlock(s, lb, dh, AlignedSized(s.scores, kFlashStripRows * kc));
  const StripHead head = PackedHead(a, call, b, h, kc, s);
  const int64_t key_end = KeyEnd(a, l0, lb);
  auto panel_start = [](int64_t key) { return key / kKeyPanelKeys * kKeyPanelKeys; };
  for (int64_t k0 = panel_start(FirstKey(a, l0)); k0 < key_end; k0 += kc) {
    const int64_t kb = std::min(kc, key_end - k0);
    const float* bias = a.key_bias != nullptr ? a.key_bias + b * a.kv_len + k0 : nullptr;
    const KeyBlock kind = ClassifyKeyBlock(bias, kb);
    if (kind == KeyBlock::kMasked) continue;  // adds nothing to any row's sum or context
    for (int64_t r0 = 0; r0 < lb; r0 += kFlashStripRows) {
      const int64_t rb = std::min(kFlashStripRows, lb - r0), row = l0 + r0;
      // Keys [ks, end): from the panel of the strip's first row's first key to its last row's last.
      const int64_t ks = std::max(k0, panel_start(FirstKey(a, row)));
      const int64_t seen = (a.causal ? std::min(k0 + kb, row + rb) : k0 + kb) - ks;
      if (seen <= 0) continue;  // rows before the chunk's first key, or whose window starts after its last
      head.Scores(row, rb, ks, seen, st.scores, kc);
      if (a.add_mask) a.add_mask(b, h, row, rb, ks, seen, st.scores, kc);
      if (kind == KeyBlock::kMixed) AddKeyBias(bias + (ks - k0), rb, seen, st.scores, kc);
      MaskBeforeWindow(a, row, rb, ks, seen, st.scores, kc);
      head.Softmax(st.scores, rb, seen, kc, a.causal ? row - ks + 1 : seen, st.row_max + r0, st.row_sum + r0,
                   st.acc + r0 * dh);
      head.AddContext(st.scores, kc, rb, ks, seen, st.acc + r0 * dh);
    }
  }
  WriteContext(a, b, h, l0, lb, st);
  return absl::OkStatus();
}

// The block matmuls, when set, must be of the blocks' sizes: they read and write whole blocks.
absl::Status CheckBlockMatmuls(const FlashAttentionArgs& a) {
  const Bf16BlockMatmul *scores = a.bf16.block_scores, *context = a.bf16.block_context;
  if (scores == nullptr) return absl::OkStatus();
  const int64_t rows = a.query_rows, keys = a.key_cols, dh = a.head_dim;
  if (scores->m() != rows || scores->n() != keys || scores->k() != dh || context->m() != rows ||
      context->n() != dh || context->k() != keys || scores->batch() != 1 || context->batch() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bf16 block matmuls must be [", rows, ", ", keys, "] x ", dh, " and [", rows, ", ", dh, "] x ", keys,
        " (query_rows, key_cols, head_dim), one product each; got [", scores->m(), ", ", scores->n(), "] x ",
        scores->k(), " and [", context->m(), ", ", context->n(), "] x ", context->k(), ", batches ", scores->batch(),
        " and ", context->batch()));
  }
  return absl::OkStatus();
}

// Work items a thread takes at a time: a whole head's query blocks where the (sequence, head) pairs share out evenly
// (at least 4 per thread, and a multiple of the threads or at least 16 per thread: at most 1/16 of a thread's work
// left over), so that each head's keys and values are packed or copied by one thread only (on the strip kernels
// about as much as an eighth of a head's blocks at L = 2048); else one block, the finest balance.
int64_t ItemsPerChunk(const FlashAttentionArgs& a, int threads, int64_t query_blocks) {
  const int64_t heads = a.batch * a.heads;
  const bool even = heads >= 4 * threads && (heads % threads == 0 || heads >= 16 * threads);
  return even ? std::max<int64_t>(1, query_blocks) : 1;
}

}  // namespace

std::pair<int64_t, int64_t> FlashBlockForCpu(ComputeType compute) {
  static const std::pair<int64_t, int64_t> block =
      OnednnUsesAvx512() ? std::pair<int64_t, int64_t>{512, 512} : std::pair<int64_t, int64_t>{128, 256};
  if (compute == ComputeType::kBFloat16 && OnednnHasBf16Brgemm()) return {256, 256};
  return block;
}

absl::StatusOr<FlashBlockMatmuls> CreateFlashBlockMatmuls(int64_t query_rows, int64_t key_cols, int64_t head_dim) {
  absl::StatusOr<std::unique_ptr<Bf16BlockMatmul>> scores =
      Bf16BlockMatmul::Create(query_rows, key_cols, head_dim, true, false);
  absl::StatusOr<std::unique_ptr<Bf16BlockMatmul>> context =
      Bf16BlockMatmul::Create(query_rows, head_dim, key_cols, false, true);
  for (const auto* op : {&scores, &context}) {  // Unimplemented: no brgemm kernel, the blocks stay on HeadMatmulOp
    if (!op->ok() && !absl::IsUnimplemented(op->status())) return op->status();
  }
  FlashBlockMatmuls ops;
  if (scores.ok() && context.ok()) {
    ops.scores = *std::move(scores);
    ops.context = *std::move(context);
  }
  return ops;
}

bool FlashBf16OnStrips(int64_t head_dim) { return FlashBf16StripsAvailable(head_dim) && !OnednnUsesAmx(); }

bool FlashOnStrips(const FlashAttentionArgs& a) {
  if (!a.strips) return false;
  return a.bf16.scores_op == nullptr ? FlashStripsAvailable(a.head_dim) : FlashBf16OnStrips(a.head_dim);
}

int64_t FlashScratchBytes(const FlashAttentionArgs& a) {
  if (FlashOnStrips(a)) {  // a strip's scores, the block's context and row state, the packed keys and the values
    const int64_t rows = std::min(a.query_rows, a.q_len), kc = StripKeyChunk(a), dh = a.head_dim;
    const int64_t floats = kFlashStripRows * kc + rows * dh + 2 * rows + 2 * kAlignPad<float>;
    if (a.bf16.scores_op == nullptr) {
      const int64_t head = PackedKeyFloats(a.kv_len, dh) + a.kv_len * dh + 2 * kAlignPad<float>;
      return static_cast<int64_t>(sizeof(float)) * (floats + head);
    }
    const int64_t head16 = PackedKeyPairElems(a.kv_len, dh) + PackedValuePairElems(a.kv_len, dh) +
                           kFlashStripRows * kc + 3 * kAlignPad<uint16_t>;  // with a strip's bf16 probabilities
    return static_cast<int64_t>(sizeof(float)) * floats + static_cast<int64_t>(sizeof(uint16_t)) * head16;
  }
  const int64_t rows = std::min(a.query_rows, a.q_len), cols = std::min(a.key_cols, a.kv_len);
  const int64_t block = static_cast<int64_t>(sizeof(float)) * (rows * (cols + a.head_dim + 2) + 15);  // acc aligned
  // f32: the dense head keys and values; bf16: the primitive's bf16 copy of a block's probabilities, and with
  // block matmuls the dense bf16 head keys and values and query block.
  if (a.bf16.scores_op == nullptr) return block + static_cast<int64_t>(sizeof(float)) * 2 * a.kv_len * a.head_dim;
  const int64_t bf16 = static_cast<int64_t>(sizeof(uint16_t)) * rows * cols;
  if (a.bf16.block_scores == nullptr) return block + bf16;
  return block + 2 * bf16 + static_cast<int64_t>(sizeof(uint16_t)) * (2 * a.kv_len + rows) * a.head_dim;
}

absl::Status FlashAttention(const FlashAttentionArgs& a, int threads, absl::FunctionRef<absl::Status()> should_stop) {
  if ((a.bf16.scores_op == nullptr) != (a.bf16.context_add_op == nullptr) ||
      (a.bf16.block_scores == nullptr) != (a.bf16.block_context == nullptr) ||
      (a.bf16.block_scores != nullptr && a.bf16.scores_op == nullptr)) {
    return absl::InvalidArgumentError(
        "bf16.scores_op and bf16.context_add_op: set both or neither; block_scores and block_context likewise, "
        "and only with the first two");
  }
  ATTN_RETURN_IF_ERROR(CheckBlockMatmuls(a));
  if (a.kv_heads < 0 || (a.kv_heads > 0 && a.heads % a.kv_heads != 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_heads must be 0 or divide heads (", a.heads, "), got ", a.kv_heads));
  }
  if (a.window < 0 || (a.window > 0 && !a.causal)) {
    return absl::InvalidArgumentError(
        absl::StrCat("window must be 0, or > 0 with causal; got ", a.window, a.causal ? " (causal)" : " (not causal)"));
  }
  const int64_t query_blocks = (a.q_len + a.query_rows - 1) / a.query_rows;
  const int64_t items = a.batch * a.heads * query_blocks;
  std::vector<absl::Status> statuses(static_cast<size_t>(items));
  std::atomic<bool> failed{false};
  static std::atomic<int64_t> calls{0};
  const int64_t call = calls.fetch_add(1, std::memory_order_relaxed);
  const bool strips = FlashOnStrips(a);
  auto run = [&](int64_t item) {
    if (failed.load(std::memory_order_relaxed)) return;
    // A head's query blocks one after another: its K and V (2 x L x Dh floats) stay in the L3 cache for the
    // threads taking them, where taking every head's block in turn streams all heads' K and V from memory.
    // Causal: the later blocks cost more, so they go first and the last items taken are short.
    const int64_t sequence_head = item / query_blocks, block = item % query_blocks;
    const int64_t qb = a.causal ? query_blocks - 1 - block : block;
    const int64_t b = sequence_head / a.heads, h = sequence_head % a.heads;
    absl::Status status = should_stop();
    try {  // nothing may leave the parallel region: a thread's block buffers grow with the request's keys
      if (status.ok()) {
        status = strips ? AttendQueryBlockInStrips(a, call, b, h, qb * a.query_rows)
                        : AttendQueryBlock(a, call, b, h, qb * a.query_rows);
      }
    } catch (const std::bad_alloc&) {
      status = absl::ResourceExhaustedError("flash attention: out of memory for a thread's blocks");
    }
    if (!status.ok()) {
      statuses[static_cast<size_t>(item)] = std::move(status);
      failed.store(true, std::memory_order_relaxed);
    }
  };
  if (threads <= 1 || items == 1) {
    // No parallel construct at all: inside one, every oneDNN call would start a nested team.
    for (int64_t i = 0; i < items; ++i) run(i);
  } else {
    const int64_t chunk = ItemsPerChunk(a, threads, query_blocks);
#pragma omp parallel for schedule(dynamic, chunk) num_threads(threads)
    for (int64_t i = 0; i < items; ++i) run(i);
  }
  for (absl::Status& status : statuses) {
    if (!status.ok()) return status;
  }
  return absl::OkStatus();
}

}  // namespace attnserve
