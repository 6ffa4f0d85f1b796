// The NF4 weight as the CPU kernels read it (csrc/nf4_matmul.cpp, csrc/nf4_avx2.cpp), and the AVX2 kernels'
// entry points. Only plain C++ types here: the AVX2 file includes no torch headers beyond c10's 16-bit types.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace ladder_nf4 {

// bitsandbytes' flat-block layout: element i of W's row-major flattening [n, k] sits in byte i >> 1 (high nibble
// when i is even) and is scaled by the absmax of block i / blocksize; blocks may straddle rows. The absmax is
// either fp32 per block, or double-quantized as stored: a uint8 code per block, decoded on the fly from the
// 256-entry nested_code table, one fp32 scale per 256 blocks and the offset (a 1 KiB table: cache-resident).
struct Nf4Weight {
  const uint8_t* packed;
  const float* absmax;          // fp32 per block; nullptr when double-quantized
  const uint8_t* absmax_codes;  // double-quantized: uint8 code per block
  const float* nested_absmax;   // double-quantized: fp32 per 256 blocks
  const float* nested_code;     // double-quantized: 256 fp32 values
  float offset;                 // double-quantized: added after the nested product
  const float* code;            // the 16-entry NF4 table
  int64_t n, k, blocksize;

  // One fp32 product, then one fp32 sum, as bitsandbytes' dequantize_blockwise + offset and the torch reference
  // round it (the extension is built with -ffp-contract=off, so no FMA fuses the two).
  inline float scale(int64_t block) const {
    if (absmax != nullptr) return absmax[block];
    return nested_code[absmax_codes[block]] * nested_absmax[block >> 8] + offset;
  }
};

// Whether this CPU runs the AVX2 kernels (avx2, fma and f16c), asked of the CPU once.
bool cpu_has_avx2();

// W[row0 : row0+rows, col0 : col0+cols] -> dst, row-major [rows, cols] fp32 (the tile nf4_matmul.cpp hands to
// BLAS), with the AVX2 table lookups of the kernels below.
void dequant_tile_avx2(const Nf4Weight& w, int64_t row0, int64_t rows, int64_t col0, int64_t cols, float* dst);

// AVX2 + FMA kernels (nf4_avx2.cpp), for T in float, c10::BFloat16, c10::Half. a is [m, reduce] with element
// (i, j) at a[i * a_s0 + j * a_s1]; out is a contiguous [m, out_cols] array every element of which is written.
//   forward:     out [m, n] = a [m, k] @ W^T
//   grad_input:  out [m, k] = a [m, n] @ W
// W's values are rounded to T (what a 16-bit weight holds) and the products accumulate in fp32 (one rounding
// to T at the end). Scratch: `avx2_plan` says how many workers run and how many floats each needs; the caller
// allocates workers * floats_per_worker floats as `workspace` (on its own thread, where memory is tracked).
struct Avx2Plan {
  int64_t workers, floats_per_worker;
};
Avx2Plan avx2_plan(const Nf4Weight& w, int64_t m, bool grad_input, int64_t threads);
template <typename T>
void nf4_forward_avx2(const Nf4Weight& w, const T* a, int64_t m, int64_t a_s0, int64_t a_s1, T* out, float* workspace,
                      const Avx2Plan& plan);
template <typename T>
void nf4_grad_input_avx2(const Nf4Weight& w, const T* a, int64_t m, int64_t a_s0, int64_t a_s1, T* out,
                         float* workspace, const Avx2Plan& plan);

// Decode-sized forward (few rows of a: m <= 4, k and blocksize multiples of 32): W's codes are looked up into
// registers and consumed at once, never written out; the absmax is applied per block to the fp32 partial sums, so
// unlike the kernels above W's values are not rounded to T. Whether a call fits, and the kernel; workspace holds
// m * (k + n) floats (a reordered to fp32, and the fp32 sums for 16-bit T).
bool avx2_fused_rows(const Nf4Weight& w, int64_t m);
template <typename T>
void nf4_forward_rows_avx2(const Nf4Weight& w, const T* a, int64_t m, int64_t a_s0, int64_t a_s1, T* out,
                           float* workspace);

}  // namespace ladder_nf4
