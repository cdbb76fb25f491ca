// Tensor's allocation (core/tensor.h): small and large tensors (the large ones advised onto huge pages) hold
// exactly their shape's elements, all zero, also where the allocator hands back memory a freed tensor wrote.
#include "core/tensor.h"

#include <algorithm>
#include <vector>

#include "gtest/gtest.h"

namespace attnserve {
namespace {

bool AllZero(const Tensor& t) {
  return std::all_of(t.values.begin(), t.values.end(), [](float x) { return x == 0.0f; });
}

TEST(TensorTest, ShapedTensorsAreZerosOfTheirShape) {
  for (const Shape& shape : {Shape{3, 5}, Shape{1, 2048, 1024}, Shape{2, 4096, 1024}, Shape{0, 7}}) {
    {
      Tensor used(shape);
      std::fill(used.values.begin(), used.values.end(), 1.5f);  // freed below: the next may reuse its memory
    }
    const Tensor t(shape);
    EXPECT_EQ(t.shape, shape);
    EXPECT_EQ(static_cast<int64_t>(t.values.size()), NumElements(shape));
    EXPECT_TRUE(AllZero(t));
    EXPECT_TRUE(AllZero(Tensor::Zeros(shape)));
  }
}

}  // namespace
}  // namespace attnserve
