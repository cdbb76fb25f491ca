#include "core/decoder_kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/row_softmax.h"
#include "core/tensor.h"

namespace attnserve::decoder_internal {
namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
}  // namespace

BlockScratch& ThreadBlockScratch() {
  thread_local BlockScratch scratch;
  return scratch;
}

float* ProjectionBuffer::Get(size_t n) {
  if (n > capacity) {
    UnadviseHugePages(data.get(), capacity * sizeof(float));
    data.reset();  // the old one first: never both at once
    data.reset(new float[n]);
    AdviseHugePages(data.get(), n * sizeof(float));
    capacity = n;
  }
  return data.get();
}

void ProjectionBuffer::Trim(size_t keep_bytes) {
  if (capacity * sizeof(float) > keep_bytes) {
    UnadviseHugePages(data.get(), capacity * sizeof(float));
    data.reset();
    capacity = 0;
  }
}

ProjectionBuffer& ThreadProjectionBuffer() {
  thread_local ProjectionBuffer buffer;
  return buffer;
}

View4 Matrix(const float* data, int64_t rows, int64_t cols, int64_t ld) {
  View4 v;
  v.data = const_cast<float*>(data);  // NOLINT: the op reads A and B only
  const int64_t whole = rows * ld;
  v.dims[0] = v.dims[1] = 1;
  v.dims[2] = rows;
  v.dims[3] = cols;
  v.strides[0] = v.strides[1] = whole;
  v.strides[2] = ld;
  v.strides[3] = 1;
  return v;
}

View4 KeysTransposed(const float* data, int64_t head_dim, int64_t keys, int64_t ld) {
  View4 v = Matrix(data, head_dim, keys, 1);
  v.strides[0] = v.strides[1] = keys * ld;
  v.strides[2] = 1;
  v.strides[3] = ld;
  return v;
}

void StackGroupQueries(const float* rows_src, int64_t ld, int64_t rows, int64_t g, int64_t r, int64_t d,
                       float scale, float* dst) {
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t i = 0; i < rows; ++i) {
      const float* src = rows_src + i * ld + (g * r + j) * d;
      float* out = dst + (j * rows + i) * d;
      for (int64_t e = 0; e < d; ++e) out[e] = src[e] * scale;
    }
  }
}

void UnstackGroupContext(const float* ctx, int64_t rows, int64_t g, int64_t r, int64_t d, float* rows_dst,
                         int64_t ld) {
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t i = 0; i < rows; ++i) {
      std::memcpy(rows_dst + i * ld + (g * r + j) * d, ctx + (j * rows + i) * d, d * sizeof(float));
    }
  }
}

void SoftmaxGroupRows(const RowBounds& rb, int64_t m, const float* pad, float* scores) {
  for (int64_t s = 0; s < m; ++s) {
    float* row = scores + s * rb.keys;
    const int64_t l = rb.l0 + s % rb.rows;
    const int64_t lo = (rb.window > 0 ? std::max(rb.k0, l - rb.window + 1) : rb.k0) - rb.k0;
    const int64_t hi = l + 1 - rb.k0;
    bool seen = !rb.padded;
    if (rb.softcap > 0 && hi > lo) SoftCapRows(row + lo, 1, hi - lo, rb.keys, rb.softcap);
    if (rb.padded) {
      for (int64_t k = lo; k < hi; ++k) {
        row[k] += pad[k];
        seen = seen || row[k] != kNegInf;  // NaN counts as seen: it stays in its own request's output
      }
    }
    std::fill(row, row + lo, 0.0f);
    std::fill(row + hi, row + rb.keys, 0.0f);
    if (seen) {
      RowSoftmax(row + lo, 1, hi - lo, rb.keys);
    } else {
      std::fill(row + lo, row + hi, 0.0f);
    }
  }
}

void AddGroupWeights(const WeightsSink& sink, int64_t g, int64_t r, int64_t rows, int64_t keys, const float* probs) {
  for (int64_t j = 0; j < r; ++j) {
    const int64_t h = g * r + j;
    for (int64_t i = 0; i < rows; ++i) {
      const float* src = probs + (j * rows + i) * keys;
      float* dst = sink.data + (sink.averaged ? 0 : h * sink.head_stride) + i * sink.row_stride;
      if (sink.averaged) {
        for (int64_t k = 0; k < keys; ++k) dst[k] += src[k] * sink.share;
      } else {
        std::memcpy(dst, src, keys * sizeof(float));
      }
    }
  }
}

}  // namespace attnserve::decoder_internal
