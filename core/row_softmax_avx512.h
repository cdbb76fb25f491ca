// RowSoftmaxToBf16 (core/row_softmax.h) for rows of at most kMaxRegisterSoftmaxCols keys, on AVX-512: each row
// stays in registers from its load to its bf16 store. The general kernel goes through memory three times per
// row (max, exponentials stored, normalisation) and spent 100 cycles on a 64-key row against 65 here; such rows
// are what ShortAttention's requests are made of.
#pragma once

#include <cstdint>

namespace attnserve {

constexpr int64_t kMaxRegisterSoftmaxCols = 256;  // 16 registers of 16 floats

// Whether the CPU has what RowSoftmaxToBf16InRegisters needs (AVX-512 F) and ATTNSERVE_MAX_KERNEL_ISA allows it.
bool RegisterSoftmaxAvailable();

// As RowSoftmaxToBf16, for 1 <= cols <= kMaxRegisterSoftmaxCols, where RegisterSoftmaxAvailable(). `data` is only
// read. Exponentials of x - max below -87 are 0, as in the general kernel.
void RowSoftmaxToBf16InRegisters(const float* data, int64_t rows, int64_t cols, int64_t ld, const uint8_t* dead,
                                 uint16_t* out, int64_t ld_out);

}  // namespace attnserve
