// Tensor's allocation (core/tensor.h): tensors hold exactly their shape's elements, all zero; a large one's
// pages are advised huge while it lives (the mapping's VmFlags in /proc/self/smaps show `hg`), and the advice is
// taken back (`nh`) before its values are freed or replaced.
#include "core/tensor.h"

#include <malloc.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>

#include "gtest/gtest.h"

namespace attnserve {
namespace {

constexpr uintptr_t kHugePage = uintptr_t{2} << 20;

bool AllZero(const Tensor& t) {
  return std::all_of(t.values.begin(), t.values.end(), [](float x) { return x == 0.0f; });
}

// The VmFlags of the mapping that holds `address` ("" when none does).
std::string VmFlagsAt(uintptr_t address) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    uintptr_t begin = 0, end = 0;
    char dash = 0;
    std::istringstream header(line);
    if (header >> std::hex >> begin >> dash >> end && dash == '-') {
      inside = begin <= address && address < end;
    } else if (inside && line.rfind("VmFlags:", 0) == 0) {
      return line + " ";
    }
  }
  return "";
}

bool KernelHasHugePages() { return std::ifstream("/sys/kernel/mm/transparent_hugepage/enabled").good(); }

uintptr_t FirstHugePage(const Tensor& t) {
  return (reinterpret_cast<uintptr_t>(t.values.data()) + kHugePage - 1) / kHugePage * kHugePage;
}

bool Advised(uintptr_t address) { return VmFlagsAt(address).find(" hg ") != std::string::npos; }
bool Unadvised(uintptr_t address) { return VmFlagsAt(address).find(" nh ") != std::string::npos; }

TEST(TensorTest, ShapedTensorsAreZerosOfTheirShape) {
  for (const Shape& shape : {Shape{3, 5}, Shape{1, 2048, 1024}, Shape{2, 4096, 1024}, Shape{0, 7}}) {
    const Tensor t(shape);
    EXPECT_EQ(t.shape, shape);
    EXPECT_EQ(static_cast<int64_t>(t.values.size()), NumElements(shape));
    EXPECT_TRUE(AllZero(t));
    EXPECT_TRUE(AllZero(Tensor::Zeros(shape)));
  }
}

TEST(TensorTest, ALargeTensorIsAdvisedOntoHugePages) {
  if (!KernelHasHugePages()) GTEST_SKIP() << "no transparent huge pages in this kernel";
  Tensor t({2, 4096, 1024});  // 32 MiB
  const uintptr_t first = FirstHugePage(t);
  EXPECT_TRUE(Advised(first)) << VmFlagsAt(first);
  const Tensor moved(std::move(t));  // the values move, and their advice stays (the moved-from one has none)
  EXPECT_EQ(moved.values.size(), size_t{8} << 20);
  EXPECT_TRUE(Advised(first)) << VmFlagsAt(first);
}

// With large blocks from malloc's heap and its top never trimmed, a freed or replaced tensor's pages stay mapped:
// the advice must be gone from them (nh), or khugepaged could fill them in 2 MiB at a time for the heap's next
// blocks.
TEST(TensorTest, FreedOrReplacedValuesKeepNoAdviceOnHeapMemory) {
  if (!KernelHasHugePages()) GTEST_SKIP() << "no transparent huge pages in this kernel";
  if (mallopt(M_MMAP_THRESHOLD, 32 << 20) == 0 || mallopt(M_TRIM_THRESHOLD, 1 << 30) == 0) {
    GTEST_SKIP() << "this allocator takes no mallopt (a sanitizer's)";
  }
  uintptr_t freed = 0, replaced = 0;
  {
    const Tensor t({4, 1024, 1024});  // 16 MiB, from the heap
    freed = FirstHugePage(t);
    EXPECT_TRUE(Advised(freed)) << VmFlagsAt(freed);
  }
  EXPECT_FALSE(Advised(freed)) << VmFlagsAt(freed);
  EXPECT_TRUE(Unadvised(freed)) << VmFlagsAt(freed);
  Tensor kept({4, 1024, 1024});
  replaced = FirstHugePage(kept);
  EXPECT_TRUE(Advised(replaced)) << VmFlagsAt(replaced);
  kept = Tensor({3, 5});
  EXPECT_TRUE(Unadvised(replaced)) << VmFlagsAt(replaced);
  mallopt(M_MMAP_THRESHOLD, 128 << 10);  // glibc's defaults
  mallopt(M_TRIM_THRESHOLD, 128 << 10);
}

TEST(TensorTest, AdviceIsTakenBackFromTheSameRange) {
  if (!KernelHasHugePages()) GTEST_SKIP() << "no transparent huge pages in this kernel";
  const size_t bytes = 8 * kHugePage;
  void* map = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(map, MAP_FAILED);
  const uintptr_t inside = (reinterpret_cast<uintptr_t>(map) + kHugePage - 1) / kHugePage * kHugePage + kHugePage;
  AdviseHugePages(map, bytes);
  EXPECT_NE(VmFlagsAt(inside).find(" hg "), std::string::npos) << VmFlagsAt(inside);
  UnadviseHugePages(map, bytes);
  EXPECT_EQ(VmFlagsAt(inside).find(" hg "), std::string::npos) << VmFlagsAt(inside);
  EXPECT_NE(VmFlagsAt(inside).find(" nh "), std::string::npos) << VmFlagsAt(inside);
  ::munmap(map, bytes);
}

}  // namespace
}  // namespace attnserve
