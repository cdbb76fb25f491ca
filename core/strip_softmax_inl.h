// The online softmax step of a strip (OnlineSoftmaxBlock's contract, core/row_softmax.h) on AVX-512, shared by
// the f32 strip path, which writes the probabilities back over the scores, and the bf16 one, which writes them
// rounded to bf16 straight to the context's operand (one pass over the strip fewer).
//
// Compiled into each kernel file with that file's target: define ATTN_STRIP_SOFTMAX_INLINE (ATTN_AVX512_INLINE,
// ATTN_AVX512_BF16_INLINE) and include this once, at namespace scope outside any namespace. GCC inlines a callee
// only into a caller of its target or wider, so the step must have the target of the store it inlines (bf16's
// vcvtneps2bf16); its definitions have internal linkage, one copy per target.
#if __INCLUDE_LEVEL__ != 1
#error "include core/strip_softmax_inl.h only from a kernel's .cc file: its definitions are internal, one per target"
#endif
#ifndef ATTN_STRIP_SOFTMAX_INLINE
#error "define ATTN_STRIP_SOFTMAX_INLINE to the including kernels' target before including this file"
#endif

#include <algorithm>
#include <cstdint>
#include <limits>

#include "core/avx512_target.h"
#include "core/exp_avx512.h"
#include "core/row_softmax.h"
#include "core/strip_tiles.h"

namespace attnserve {
namespace {
namespace strip_softmax {

// The largest of row's first `open` floats (>= 1), NaN skipped (vmaxps returns its second operand then).
ATTN_STRIP_SOFTMAX_INLINE float OpenMax(const float* row, int64_t open) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 max = neg_inf;
  int64_t j = 0;
  for (; j + 16 <= open; j += 16) max = _mm512_max_ps(_mm512_loadu_ps(row + j), max);
  if (j < open) max = _mm512_max_ps(_mm512_mask_loadu_ps(neg_inf, FirstLanes(open - j), row + j), max);
  return _mm512_reduce_max_ps(max);
}

// exp(x - max) of row's first `open` floats x (by Store::Exp, the accuracy the store keeps), and zeros after them
// up to `width`, handed to store(j, e, lanes) 16 at a time (the last call's lanes: those below `width`); returns
// the sum of the exponentials. Lanes past `open` read -inf, whose exp is 0. store may write over the floats it is
// given (each is read before).
template <class Store>
ATTN_STRIP_SOFTMAX_INLINE float ExpOpen(const float* row, int64_t open, int64_t width, float max, Store store) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), m = _mm512_set1_ps(max);
  __m512 sum = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= open; j += 16) {
    const __m512 e = Store::Exp(_mm512_sub_ps(_mm512_loadu_ps(row + j), m));
    store(j, e, __mmask16{0xFFFF});
    sum = _mm512_add_ps(sum, e);
  }
  if (j < open) {
    const __m512 e = Store::Exp(_mm512_sub_ps(_mm512_mask_loadu_ps(neg_inf, FirstLanes(open - j), row + j), m));
    store(j, e, FirstLanes(std::min<int64_t>(16, width - j)));
    sum = _mm512_add_ps(sum, e);
    j += 16;
  }
  for (; j < width; j += 16) store(j, _mm512_setzero_ps(), FirstLanes(std::min<int64_t>(16, width - j)));
  return _mm512_reduce_add_ps(sum);
}

// The step over `rows` rows of scores [rows, cols] (row stride ld; row r sees its first open0 + r keys):
// out.Row(r) gives row r's store for ExpOpen over `width` >= cols lanes. A row that sees nothing open (all -inf)
// gets zeros and leaves its max, sum and context as they were. (Stores are structs, not lambdas: a lambda's body
// would not take its caller's target attribute.)
template <class Out>
ATTN_STRIP_SOFTMAX_INLINE void Step(const float* scores, int64_t rows, int64_t cols, int64_t width, int64_t ld,
                                    int64_t open0, float* row_max, float* row_sum, float* acc, int64_t acc_cols,
                                    int64_t ld_acc, const Out& out) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = scores + r * ld;
    const int64_t open = std::clamp<int64_t>(open0 + r, 0, cols);
    const float m = open == 0 ? kNegInf : std::max(row_max[r], OpenMax(row, open));
    if (m == kNegInf) {
      ExpOpen(row, 0, width, 0.0f, out.Row(r));
      continue;
    }
    FoldBlockIntoRow(m, ExpOpen(row, open, width, m, out.Row(r)), row_max + r, row_sum + r, acc + r * ld_acc, acc_cols);
  }
}

}  // namespace strip_softmax
}  // namespace
}  // namespace attnserve

#undef ATTN_STRIP_SOFTMAX_INLINE
