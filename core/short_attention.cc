#include "core/short_attention.h"

#include <algorithm>
#include <cstring>
#include <new>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/bf16_rows.h"
#include "core/row_softmax.h"
#include "common/status_macros.h"

namespace attnserve {
namespace {

constexpr int64_t kPad = 16;  // brgemm's row blocks (an AMX tile's rows; 16 bf16 pairs of keys on both ISAs)
constexpr int64_t kBf16 = 2, kF32 = 4;

int64_t Padded(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

// One thread's buffers, grown to the largest shape it has run (at most ScratchBytes of max_len).
struct ShortBuffers {
  // Heads of the call's sequences one after another (nb * hb of them):
  std::vector<uint16_t> q, k, v, probs;  // [nb * hb, Lp, Dh], [nb * hb, Sp, Dh] twice, [nb * hb, Lp, Sp]
  std::vector<float> scores, context;    // [nb * hb, Lp, Sp], [nb * hb, Lp, Dh]

  template <typename T>
  static T* Grow(std::vector<T>& buf, int64_t n) {
    if (buf.size() < static_cast<size_t>(n)) buf.resize(static_cast<size_t>(n));
    return buf.data();
  }
};

ShortBuffers& ThreadBuffers() {
  thread_local ShortBuffers buffers;
  return buffers;
}

size_t HeldBytes(const ShortBuffers& b) {
  return (b.q.capacity() + b.k.capacity() + b.v.capacity() + b.probs.capacity()) * kBf16 +
         (b.scores.capacity() + b.context.capacity()) * kF32;
}

// Rows [rows, padded_rows) of each of the hb heads of dst [hb, padded_rows, Dh] to zero, when `zero_padding`
// (V: padded keys must add nothing, even where a thread's previous request left NaN there).
void ZeroPaddedRows(bool zero_padding, int64_t hb, int64_t dh, int64_t rows, int64_t padded_rows, uint16_t* dst) {
  for (int64_t hi = 0; zero_padding && hi < hb; ++hi) {
    std::fill(dst + (hi * padded_rows + rows) * dh, dst + (hi + 1) * padded_rows * dh, uint16_t{0});
  }
}

// Rows [0, rows) of heads [h0, h0 + hb) of one sequence's f32 projection into dense bf16 [hb, padded_rows, Dh],
// the padded rows as ZeroPaddedRows leaves them.
void CopyHeads(const FlashOperand& src, int64_t b, int64_t h0, int64_t hb, int64_t dh, int64_t rows,
               int64_t padded_rows, bool zero_padding, uint16_t* dst) {
  const float* seq = src.data + b * src.seq_stride;
  for (int64_t hi = 0; hi < hb; ++hi) {
    FloatRowsToBf16(seq + (h0 + hi) * dh, rows, dh, src.ld, dst + hi * padded_rows * dh, dh);
  }
  ZeroPaddedRows(zero_padding, hb, dh, rows, padded_rows, dst);
}

// Row i of heads [h0, h0 + hb): kHeadBytes (a head's row, a constant the compiler copies inline) or `bytes`.
template <size_t kHeadBytes>
void CopyHeadRows(const uint16_t* row, int64_t hb, int64_t dh, size_t bytes, uint16_t* dst, int64_t dst_head_stride) {
  for (int64_t hi = 0; hi < hb; ++hi) {
    std::memcpy(dst + hi * dst_head_stride, row + hi * dh, kHeadBytes > 0 ? kHeadBytes : bytes);
  }
}

// The same from bf16 projections, rows copied as they are, each row's heads in turn (the projection read in
// order). A memcpy call per head row cost more than its 128 bytes: the usual head sizes are copied inline.
void CopyHeads(const ShortAttention::Args::Bf16Operand& src, int64_t b, int64_t h0, int64_t hb, int64_t dh,
               int64_t rows, int64_t padded_rows, bool zero_padding, uint16_t* dst) {
  const uint16_t* seq = src.data + b * src.seq_stride + h0 * dh;
  const size_t bytes = static_cast<size_t>(dh) * sizeof(uint16_t);
  const int64_t head_stride = padded_rows * dh;
  for (int64_t i = 0; i < rows; ++i) {
    const uint16_t* row = seq + i * src.ld;
    switch (dh) {
      case 64: CopyHeadRows<128>(row, hb, dh, bytes, dst + i * dh, head_stride); break;
      case 128: CopyHeadRows<256>(row, hb, dh, bytes, dst + i * dh, head_stride); break;
      default: CopyHeadRows<0>(row, hb, dh, bytes, dst + i * dh, head_stride); break;
    }
  }
  ZeroPaddedRows(zero_padding, hb, dh, rows, padded_rows, dst);
}

// Q, K and V of sequences [b0, b0 + nb), heads [h0, h0 + hb) into the call's dense buffers, from the bf16
// projections when the call has them, else from the f32 ones.
void CopyOperands(const ShortAttention::Args& a, int64_t b0, int64_t nb, int64_t h0, int64_t hb, int64_t dh,
                  int64_t lp, int64_t sp, uint16_t* q16, uint16_t* k16, uint16_t* v16) {
  const int64_t l = a.q_len, s = a.kv_len;
  for (int64_t sb = 0; sb < nb; ++sb) {
    uint16_t *q = q16 + sb * hb * lp * dh, *k = k16 + sb * hb * sp * dh, *v = v16 + sb * hb * sp * dh;
    // Padded Q rows and K rows only make scores that are never read: left as they are.
    if (a.q16.data != nullptr) {
      CopyHeads(a.q16, b0 + sb, h0, hb, dh, l, lp, /*zero_padding=*/false, q);
      CopyHeads(a.k16, b0 + sb, h0, hb, dh, s, sp, /*zero_padding=*/false, k);
      CopyHeads(a.v16, b0 + sb, h0, hb, dh, s, sp, /*zero_padding=*/true, v);
    } else {
      CopyHeads(a.q, b0 + sb, h0, hb, dh, l, lp, /*zero_padding=*/false, q);
      CopyHeads(a.k, b0 + sb, h0, hb, dh, s, sp, /*zero_padding=*/false, k);
      CopyHeads(a.v, b0 + sb, h0, hb, dh, s, sp, /*zero_padding=*/true, v);
    }
  }
}

// Rows [0, L) of each head's context [hb, Lp, Dh] into the context rows of sequence b, in f32 or bf16.
void WriteContext(const ShortAttention::Args& a, int64_t b, int64_t h0, int64_t hb, int64_t dh, int64_t lp,
                  const float* context) {
  for (int64_t hi = 0; hi < hb; ++hi) {
    const float* head = context + hi * lp * dh;
    const int64_t offset = b * a.out_seq_stride + (h0 + hi) * dh;
    if (a.out16 != nullptr) {
      FloatRowsToBf16(head, a.q_len, dh, dh, a.out16 + offset, a.out_ld);
      continue;
    }
    for (int64_t i = 0; i < a.q_len; ++i) std::memcpy(a.out + offset + i * a.out_ld, head + i * dh, dh * sizeof(float));
  }
}

}  // namespace

void ReleaseShortAttentionBuffers(size_t keep_bytes) {
  ShortBuffers& buffers = ThreadBuffers();
  if (HeldBytes(buffers) > keep_bytes) buffers = ShortBuffers();
}

// The two matmuls of one (nb * hb, Lp, Sp); both null when oneDNN has no brgemm kernel for them (remembered, so that
// the shape's requests do not try again each time).
struct ShortAttention::Shape {
  std::unique_ptr<Bf16BlockMatmul> scores, context;
};

absl::StatusOr<std::unique_ptr<ShortAttention>> ShortAttention::Create(const Options& options) {
  if (options.head_dim <= 0 || options.max_len < 1 || options.shape_capacity < 1) {
    return absl::InvalidArgumentError(absl::StrCat("ShortAttention: head_dim (", options.head_dim, ") and max_len (",
                                                   options.max_len, ") must be >= 1, shape_capacity (",
                                                   options.shape_capacity, ") >= 1"));
  }
  if (!OnednnHasBf16Brgemm()) return absl::UnimplementedError("ShortAttention: no bf16 brgemm kernels here");
  if (options.head_dim % kPad != 0) {
    return absl::UnimplementedError(
        absl::StrCat("ShortAttention: head_dim ", options.head_dim, " is not a multiple of ", kPad));
  }
  // The ISA is not the kernel (oneDNN may have none for a bf16 shape): one small shape tells.
  absl::StatusOr<std::unique_ptr<Bf16BlockMatmul>> probe =
      Bf16BlockMatmul::Create(kPad, kPad, options.head_dim, /*transpose_b=*/true, false);
  if (!probe.ok()) return probe.status();
  return std::unique_ptr<ShortAttention>(new ShortAttention(options));
}

int64_t ShortAttention::SequenceBytes(int64_t hb, int64_t q_len, int64_t kv_len) const {
  const int64_t lp = Padded(q_len), sp = Padded(kv_len), dh = options_.head_dim;
  return hb * (kBf16 * (lp * dh + 2 * sp * dh + lp * sp) + kF32 * (lp * sp + lp * dh));
}

int64_t ShortAttention::SequencesPerCall(int64_t hb, int64_t q_len, int64_t kv_len, int64_t available) const {
  const int64_t per_sequence = SequenceBytes(hb, q_len, kv_len);
  int64_t nb = 1;
  while (2 * nb <= std::min(available, kMaxSequencesPerCall) && 2 * nb * per_sequence <= kCallBytes) nb *= 2;
  return nb;
}

int64_t ShortAttention::ScratchBytes(int64_t hb, int64_t q_len, int64_t kv_len) const {
  return SequencesPerCall(hb, q_len, kv_len, kMaxSequencesPerCall) * SequenceBytes(hb, q_len, kv_len);
}

size_t ShortAttention::cached_shapes() const { return shapes_.size(); }

std::vector<std::string> ShortAttention::Impls() const {
  absl::MutexLock lock(&impls_mu_);
  return impls_seen_;
}

absl::StatusOr<std::shared_ptr<const ShortAttention::Shape>> ShortAttention::GetShape(int64_t heads, int64_t lp,
                                                                                      int64_t sp) const {
  const int64_t dh = options_.head_dim;
  auto build = [&]() -> absl::StatusOr<std::shared_ptr<Shape>> {
    auto shape = std::make_shared<Shape>();
    if (deny_kernels_for_testing_.load(std::memory_order_relaxed)) return shape;
    absl::StatusOr<std::unique_ptr<Bf16BlockMatmul>> scores =
        Bf16BlockMatmul::Create(lp, sp, dh, /*transpose_b=*/true, false, heads);
    absl::StatusOr<std::unique_ptr<Bf16BlockMatmul>> context =
        Bf16BlockMatmul::Create(lp, dh, sp, /*transpose_b=*/false, false, heads);
    for (const auto* op : {&scores, &context}) {
      if (!op->ok() && !absl::IsUnimplemented(op->status())) return op->status();
    }
    if (scores.ok() && context.ok()) {
      shape->scores = *std::move(scores);
      shape->context = *std::move(context);
    }
    return shape;
  };
  auto record_impls = [&](const Shape& shape) {
    absl::MutexLock lock(&impls_mu_);
    for (const Bf16BlockMatmul* op : {shape.scores.get(), shape.context.get()}) {
      if (op == nullptr) continue;
      for (const std::string& impl : op->Impls()) {
        if (std::find(impls_seen_.begin(), impls_seen_.end(), impl) == impls_seen_.end()) impls_seen_.push_back(impl);
      }
    }
  };
  return shapes_.GetOrBuild(Key{heads, lp, sp}, build, record_impls);
}

absl::Status ShortAttention::Run(const Args& a, int64_t b0, int64_t nb, int64_t h0, int64_t hb,
                                 const MaskFn* mask) const {
  if (nb < 1 || nb > kMaxSequencesPerCall) {
    return absl::InvalidArgumentError(
        absl::StrCat("short attention: ", nb, " sequences in one call, expected 1 to ", kMaxSequencesPerCall));
  }
  const int64_t dh = options_.head_dim, l = a.q_len, s = a.kv_len;
  const int64_t lp = Padded(l), sp = Padded(s), heads = nb * hb;
  try {  // callers are inside a parallel region: std::bad_alloc from the shape cache or the buffers stays here
    ATTN_ASSIGN_OR_RETURN(std::shared_ptr<const Shape> shape, GetShape(heads, lp, sp));
    if (shape->scores == nullptr) {
      return absl::UnimplementedError(absl::StrCat("short attention: no brgemm kernel for ", heads, " heads of ", lp,
                                                   " x ", sp, " (padded lengths)"));
    }
    ShortBuffers& buf = ThreadBuffers();
    uint16_t* q16 = ShortBuffers::Grow(buf.q, heads * lp * dh);
    uint16_t* k16 = ShortBuffers::Grow(buf.k, heads * sp * dh);
    uint16_t* v16 = ShortBuffers::Grow(buf.v, heads * sp * dh);
    uint16_t* probs = ShortBuffers::Grow(buf.probs, heads * lp * sp);
    float* scores = ShortBuffers::Grow(buf.scores, heads * lp * sp);
    float* context = ShortBuffers::Grow(buf.context, heads * lp * dh);
    CopyOperands(a, b0, nb, h0, hb, dh, lp, sp, q16, k16, v16);
    ATTN_RETURN_IF_ERROR(shape->scores->Execute(q16, k16, scores));
    for (int64_t sb = 0; sb < nb; ++sb) {  // each sequence's masks, then its softmax: the dead rows are per call
      float* seq_scores = scores + sb * hb * lp * sp;
      const uint8_t* dead = mask == nullptr ? nullptr : (*mask)(b0 + sb, h0, hb, seq_scores, sp, lp);
      for (int64_t hi = 0; hi < hb; ++hi) {
        uint16_t* head_probs = probs + (sb * hb + hi) * lp * sp;
        RowSoftmaxToBf16(seq_scores + hi * lp * sp, l, s, sp, dead == nullptr ? nullptr : dead + hi * l, head_probs,
                         sp);
        for (int64_t i = 0; sp > s && i < l; ++i) std::fill_n(head_probs + i * sp + s, sp - s, uint16_t{0});
      }
    }
    ATTN_RETURN_IF_ERROR(shape->context->Execute(probs, v16, context));
    for (int64_t sb = 0; sb < nb; ++sb) WriteContext(a, b0 + sb, h0, hb, dh, lp, context + sb * hb * lp * dh);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat("short attention: out of memory for ",
                                                     nb * SequenceBytes(hb, l, s), " bytes of buffers"));
  }
  executions_.fetch_add(nb, std::memory_order_relaxed);
  return absl::OkStatus();
}

}  // namespace attnserve
