// What the fixed-size bf16 paths' kernels report here, for tests that check the kernel behind an op.
#pragma once

#include "core/onednn_ops.h"

namespace attnserve::testing {

// The impl_info prefix of oneDNN's bf16 brgemm kernel of the best ISA here: AMX's where oneDNN runs AMX (an
// AVX512_BF16 fallback there would be a regression), else AVX512_BF16's.
inline const char* ExpectedBf16Brgemm() {
  return OnednnUsesAmx() ? "brg:avx512_core_amx" : "brg:avx512_core_bf16";
}

}  // namespace attnserve::testing
