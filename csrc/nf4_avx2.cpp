// AVX2 + FMA NF4 matmul kernels (function multiversioning: every function here carries
// __attribute__((target(...))), the rest of the extension stays at the baseline -march, and nf4_matmul.cpp calls
// these only when the CPU reports avx2, fma and f16c).
//
// A small GEMM of its own rather than BLAS for 16-bit inputs (a bf16 BLAS is far slower on CPUs without native
// bf16; this takes them without a 16-bit GEMM) and for fp32 with few rows; fp32 with many rows goes to MKL on
// tiles dequantized by dequant_tile_avx2 (nf4_matmul.cpp, avx2_uses_blas), which reaches 2-3x this loop's speed.
// Per work item (a band of W's rows or columns times a block of at most kMB rows of a):
//   forward     out[i, j] = sum_c a[i, c] W[j, c]: kFwdJT rows of W x kFwdKC columns are dequantized to fp32
//               (rows contiguous), kFwdMR rows of a converted to fp32 beside them, and kFwdMR x kFwdNR dot
//               products accumulate in 8-wide registers (summed horizontally once per chunk);
//   grad_input  out[i, c] = sum_j a[i, j] W[j, c]: kGradJC rows x kGradCT columns of W, and kGradMR x 16 outputs
//               accumulate as broadcast-a times W-row FMAs (no horizontal sums).
// Partial sums over the reduction chunks stay in an fp32 block of the workspace; the output is written once.
#include "nf4_weight.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace ladder_nf4 {
namespace {

#define LADDER_AVX2 __attribute__((target("avx2,fma,f16c")))

constexpr int64_t kMB = 64;  // rows of a per work item: the W panel is dequantized once per kMB rows
constexpr int64_t kFwdMR = 4, kFwdNR = 3, kFwdJT = 96, kFwdKC = 256;
constexpr int64_t kGradMR = 6, kGradCT = 128, kGradJC = 256;
constexpr int64_t kFusedMaxRows = 4;  // rows of a the fused forward takes (avx2_fused_rows)
constexpr int64_t kPrefetchRows = 8;  // a band of W jumps k/2 bytes per row: fetch this many rows ahead

inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// fp32 -> the nearest T (round to nearest even, like c10's conversions), back in fp32.
template <typename T>
LADDER_AVX2 inline __m256 round_to(__m256 v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    return _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return v;
  }
}

template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// The 8 values of 4 packed bytes, in element order (byte b's high nibble, then its low one), looked up in the
// 16-entry table held as two registers (entries 0-7, 8-15): vpermps takes the low 3 bits of each index, and
// bit 3, shifted into the sign, picks the register.
LADDER_AVX2 inline __m256 lookup8(__m256 lo, __m256 hi, uint32_t four_bytes) {
  const __m256i v = _mm256_set1_epi32(static_cast<int>(four_bytes));
  const __m256i index = _mm256_srlv_epi32(v, _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24));
  const __m256i select = _mm256_sllv_epi32(v, _mm256_setr_epi32(24, 28, 16, 20, 8, 12, 0, 4));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, index), _mm256_permutevar8x32_ps(hi, index),
                          _mm256_castsi256_ps(select));
}

// W[row0 : row0+rows, col0 : col0+cols] -> dst (fp32, rows `ld` apart), each value code * absmax rounded to T.
// The table times the block's absmax is the same fp32 product as each element's, so scaling the table once per
// block and looking values up gives the reference's values exactly.
template <typename T>
LADDER_AVX2 void dequant_panel(const Nf4Weight& w, int64_t row0, int64_t rows, int64_t col0, int64_t cols, float* dst,
                               int64_t ld) {
  const __m256 table_lo = _mm256_loadu_ps(w.code), table_hi = _mm256_loadu_ps(w.code + 8);
  const int64_t k = w.k;
  for (int64_t r = 0; r < rows; ++r) {
    if (cols < k && r + kPrefetchRows < rows) {
      const uint8_t* ahead = w.packed + (((row0 + r + kPrefetchRows) * k + col0) >> 1);
      for (int64_t b = 0; b < (cols + 1) / 2 + 1; b += 64) __builtin_prefetch(ahead + b);
    }
    float* out_row = dst + r * ld;
    for (int64_t start = (row0 + r) * k + col0, end = start + cols, j = 0; start < end;) {
      const int64_t block = start / w.blocksize;
      const int64_t len = std::min(end, (block + 1) * w.blocksize) - start;
      const float s = w.scale(block);
      const __m256 scale = _mm256_set1_ps(s);
      const __m256 lo = round_to<T>(_mm256_mul_ps(table_lo, scale)), hi = round_to<T>(_mm256_mul_ps(table_hi, scale));
      float* out = out_row + j;
      const uint8_t* src = w.packed + (start >> 1);
      int64_t done = 0;
      if (start & 1) {  // the run begins on a low nibble
        out[0] = round_to<T>(w.code[*src & 0xF] * s);
        ++src, done = 1;
      }
      for (; done + 8 <= len; done += 8, src += 4) {
        uint32_t four;
        std::memcpy(&four, src, 4);
        _mm256_storeu_ps(out + done, lookup8(lo, hi, four));
      }
      for (; done < len; ++done) {
        const int64_t i = start + done;
        const uint8_t byte = w.packed[i >> 1];
        out[done] = round_to<T>(w.code[(i & 1) ? (byte & 0xF) : (byte >> 4)] * s);
      }
      start += len, j += len;
    }
  }
}

// dst[0:len] = a's elements src[0], src[stride], ... in fp32; dst[len:padded] = 0.
template <typename T>
LADDER_AVX2 void load_f32(const T* src, int64_t stride, int64_t len, float* dst, int64_t padded) {
  int64_t c = 0;
  if (stride == 1) {
    for (; c + 8 <= len; c += 8) {
      __m256 v;
      if constexpr (std::is_same_v<T, float>) {
        v = _mm256_loadu_ps(src + c);
      } else {
        const __m128i half_words = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c));
        if constexpr (std::is_same_v<T, c10::Half>) {
          v = _mm256_cvtph_ps(half_words);
        } else {  // bf16 is the top half of an fp32
          v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half_words), 16));
        }
      }
      _mm256_storeu_ps(dst + c, v);
    }
  }
  for (; c < len; ++c) dst[c] = static_cast<float>(src[c * stride]);
  for (; c < padded; ++c) dst[c] = 0.0f;
}

LADDER_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// acc[i * ld_acc + r] (+)= dot(x row i, w row r) over kc8 (a multiple of 8) columns, i < MR, r < kFwdNR.
template <int MR>
LADDER_AVX2 void dot_block(const float* x, const float* w, int64_t kc8, float* acc, int64_t ld_acc, bool first) {
  constexpr int NR = kFwdNR;
  __m256 sum[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) sum[i][r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < kc8; c += 8) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm256_loadu_ps(w + r * kFwdKC + c);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * kFwdKC + c);
      for (int r = 0; r < NR; ++r) sum[i][r] = _mm256_fmadd_ps(xv, wv[r], sum[i][r]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) {
      const float s = hsum(sum[i][r]);
      acc[i * ld_acc + r] = first ? s : acc[i * ld_acc + r] + s;
    }
}

// acc[i * ld_acc + 0:16] (+)= sum_j g[i * kGradJC + j] * w[j * ld_w + 0:16], i < MR, j < jc.
template <int MR>
LADDER_AVX2 void outer_block(const float* g, const float* w, int64_t ld_w, int64_t jc, float* acc, int64_t ld_acc,
                             bool first) {
  __m256 sum[MR][2];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < 2; ++v)
      sum[i][v] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + i * ld_acc + 8 * v);
  for (int64_t j = 0; j < jc; ++j) {
    const __m256 w0 = _mm256_loadu_ps(w + j * ld_w), w1 = _mm256_loadu_ps(w + j * ld_w + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 b = _mm256_broadcast_ss(g + i * kGradJC + j);
      sum[i][0] = _mm256_fmadd_ps(b, w0, sum[i][0]);
      sum[i][1] = _mm256_fmadd_ps(b, w1, sum[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < 2; ++v) _mm256_storeu_ps(acc + i * ld_acc + 8 * v, sum[i][v]);
}

template <typename T>
void write_out(const float* acc, int64_t ld_acc, int64_t rows, int64_t cols, T* out, int64_t ld_out) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[i * ld_out + j] = static_cast<T>(acc[i * ld_acc + j]);
}

// Workspace of one forward worker: the W panel, kFwdMR rows of a, the fp32 partial sums.
constexpr int64_t kFwdPanel = kFwdJT * kFwdKC, kFwdRows = kFwdMR * kFwdKC, kFwdAcc = kMB * kFwdJT;
constexpr int64_t kGradPanel = kGradJC * kGradCT, kGradRows = kGradMR * kGradJC, kGradAcc = kMB * kGradCT;

template <typename T>
LADDER_AVX2 void forward_item(const Nf4Weight& w, const T* a, int64_t m, int64_t a_s0, int64_t a_s1, T* out,
                              float* ws, int64_t j_tile, int64_t m_block) {
  float *panel = ws, *rows = ws + kFwdPanel, *acc = rows + kFwdRows;
  const int64_t j0 = j_tile * kFwdJT, jt = std::min(kFwdJT, w.n - j0);
  const int64_t m0 = m_block * kMB, mb = std::min(kMB, m - m0);
  for (int64_t c0 = 0; c0 < w.k; c0 += kFwdKC) {
    const int64_t kc = std::min(kFwdKC, w.k - c0), kc8 = round_up(kc, 8);
    dequant_panel<T>(w, j0, jt, c0, kc, panel, kFwdKC);
    for (int64_t r = 0; r < round_up(jt, kFwdNR); ++r)  // the reduction's padding (and unused rows) must be finite
      std::fill(panel + r * kFwdKC + (r < jt ? kc : 0), panel + r * kFwdKC + kc8, 0.0f);
    for (int64_t i0 = 0; i0 < mb; i0 += kFwdMR) {
      const int64_t mr = std::min(kFwdMR, mb - i0);
      for (int64_t i = 0; i < mr; ++i) load_f32(a + (m0 + i0 + i) * a_s0 + c0 * a_s1, a_s1, kc, rows + i * kFwdKC, kc8);
      for (int64_t jb = 0; jb < jt; jb += kFwdNR) {
        const float* wb = panel + jb * kFwdKC;
        float* ab = acc + i0 * kFwdJT + jb;
        switch (mr) {
          case 1: dot_block<1>(rows, wb, kc8, ab, kFwdJT, c0 == 0); break;
          case 2: dot_block<2>(rows, wb, kc8, ab, kFwdJT, c0 == 0); break;
          case 3: dot_block<3>(rows, wb, kc8, ab, kFwdJT, c0 == 0); break;
          default: dot_block<4>(rows, wb, kc8, ab, kFwdJT, c0 == 0); break;
        }
      }
    }
  }
  write_out(acc, kFwdJT, mb, jt, out + m0 * w.n + j0, w.n);
}

template <typename T>
LADDER_AVX2 void grad_input_item(const Nf4Weight& w, const T* a, int64_t m, int64_t a_s0, int64_t a_s1, T* out,
                                 float* ws, int64_t c_tile, int64_t m_block) {
  float *panel = ws, *rows = ws + kGradPanel, *acc = rows + kGradRows;
  const int64_t c0 = c_tile * kGradCT, ct = std::min(kGradCT, w.k - c0), ct16 = round_up(ct, 16);
  const int64_t m0 = m_block * kMB, mb = std::min(kMB, m - m0);
  for (int64_t j0 = 0; j0 < w.n; j0 += kGradJC) {
    const int64_t jc = std::min(kGradJC, w.n - j0);
    dequant_panel<T>(w, j0, jc, c0, ct, panel, kGradCT);
    for (int64_t j = 0; j < jc; ++j) std::fill(panel + j * kGradCT + ct, panel + j * kGradCT + ct16, 0.0f);
    for (int64_t i0 = 0; i0 < mb; i0 += kGradMR) {
      const int64_t mr = std::min(kGradMR, mb - i0);
      for (int64_t i = 0; i < mr; ++i) load_f32(a + (m0 + i0 + i) * a_s0 + j0 * a_s1, a_s1, jc, rows + i * kGradJC, jc);
      for (int64_t cb = 0; cb < ct16; cb += 16) {
        float* ab = acc + i0 * kGradCT + cb;
        const float* wb = panel + cb;
        switch (mr) {
          case 1: outer_block<1>(rows, wb, kGradCT, jc, ab, kGradCT, j0 == 0); break;
          case 2: outer_block<2>(rows, wb, kGradCT, jc, ab, kGradCT, j0 == 0); break;
          case 3: outer_block<3>(rows, wb, kGradCT, jc, ab, kGradCT, j0 == 0); break;
          case 4: outer_block<4>(rows, wb, kGradCT, jc, ab, kGradCT, j0 == 0); break;
          case 5: outer_block<5>(rows, wb, kGradCT, jc, ab, kGradCT, j0 == 0); break;
          default: outer_block<6>(rows, wb, kGradCT, jc, ab, kGradCT, j0 == 0); break;
        }
      }
    }
  }
  write_out(acc, kGradCT, mb, ct, out + m0 * w.k + c0, w.k);
}

// Decode-sized forward (avx2_fused_rows): out[i, j] = sum over W's blocks b of absmax_b * sum_{c in b} a[i, c] code[q_jc],
// W's codes looked up straight into registers and consumed at once, so W is streamed as 4-bit bytes and nothing
// is written between lookup and FMA (the panel path's store and reload of a dequantized W made M = 1 as slow as a
// dense bf16 GEMV). The absmax is applied once per block, so the 16-entry table is the same for the whole call and
// vpshufb looks up 32 values at once, one byte plane of the fp32 code per shuffle (vpermps, which the panel path
// needs for a per-block scaled table, is the slow part there). The price: for fp32 and fp16 W's values are not
// rounded to T first (the fp32 products are, if anything, closer to the exact ones).
// 16 packed bytes hold 32 values; the high nibbles (even columns) go to the low 128-bit lane, the low nibbles (odd
// columns) to the high one, and the unpacks keep lanes apart, so x is stored beforehand in the order the four 8-wide
// vectors come out (x_split, see split_index). Needs k and the blocksize to be multiples of 32, so every block run
// of a row starts a 32-column group.
// For bf16 inputs the table is the code rounded to bf16 and only its two high byte planes are looked up (2 shuffles
// and 2 unpacks per 32 values instead of 4 and 8: the shuffle port is the bottleneck), so W's values carry one bf16
// rounding, as on the other paths, but of the code rather than of code * absmax.
constexpr int64_t kFusedGroup = 32;

template <typename T>
constexpr bool kTwoPlanes = std::is_same_v<T, c10::BFloat16>;

// Where column c of x goes in x_split. Byte p of a 16-byte group holds columns 2p (lane 0) and 2p + 1 (lane 1);
// element t of lane L of vector v sits at 8v + 4L + t. Four planes: vector v holds bytes 4v..4v+3 in order; two
// planes: bytes 8 * (v / 2) + 2t + v % 2 (the shift and the mask split even and odd 16-bit elements).
template <typename T>
inline int64_t split_index(int64_t c) {
  const int64_t g = c % kFusedGroup, lane = g % 2, p = g / 2;
  const int64_t v = kTwoPlanes<T> ? 2 * (p / 8) + p % 2 : p / 4, t = kTwoPlanes<T> ? (p % 8) / 2 : p % 4;
  return c - g + 8 * v + 4 * lane + t;
}

template <typename T, int MR>
LADDER_AVX2 void fused_rows(const Nf4Weight& w, const float* x_split, int64_t j0, int64_t j1, float* out_f32) {
  alignas(16) uint8_t planes[4][16];  // byte b of code[v] (rounded to bf16 for two planes) at planes[b][v]
  for (int v = 0; v < 16; ++v) {
    const float value = kTwoPlanes<T> ? round_to<T>(w.code[v]) : w.code[v];
    uint8_t bytes[4];
    std::memcpy(bytes, &value, 4);
    for (int b = 0; b < 4; ++b) planes[b][v] = bytes[b];
  }
  __m256i plane[4];
  for (int b = 0; b < 4; ++b) plane[b] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(planes[b])));
  const __m128i low_nibble = _mm_set1_epi8(0xF);
  const __m256i high_half = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t k = w.k;
  for (int64_t j = j0; j < j1; ++j) {
    __m256 total[MR];
    for (int i = 0; i < MR; ++i) total[i] = _mm256_setzero_ps();
    // the block index advances by one per run: one division per row, not per block (it showed in the profile)
    for (int64_t start = j * k, end = start + k, block = start / w.blocksize; start < end; ++block) {
      const int64_t len = std::min(end, (block + 1) * w.blocksize) - start;
      // one accumulator per vector where registers allow: chains of dependent FMAs (4 cycles each) held M = 1 back
      constexpr int kAcc = MR <= 2 ? 4 : 2;
      __m256 acc[MR][kAcc];
      for (int i = 0; i < MR; ++i) {
        for (int a = 0; a < kAcc; ++a) acc[i][a] = _mm256_setzero_ps();
      }
      const uint8_t* src = w.packed + (start >> 1);
      const float* xc = x_split + (start - j * k);
      for (int64_t done = 0; done < len; done += kFusedGroup, src += 16, xc += kFusedGroup) {
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
        const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), low_nibble), low = _mm_and_si128(packed, low_nibble);
        const __m256i index = _mm256_inserti128_si256(_mm256_castsi128_si256(high), low, 1);
        __m256 v0, v1, v2, v3;
        if constexpr (kTwoPlanes<T>) {
          const __m256i b2 = _mm256_shuffle_epi8(plane[2], index), b3 = _mm256_shuffle_epi8(plane[3], index);
          const __m256i first = _mm256_unpacklo_epi8(b2, b3), second = _mm256_unpackhi_epi8(b2, b3);
          v0 = _mm256_castsi256_ps(_mm256_slli_epi32(first, 16));
          v1 = _mm256_castsi256_ps(_mm256_and_si256(first, high_half));
          v2 = _mm256_castsi256_ps(_mm256_slli_epi32(second, 16));
          v3 = _mm256_castsi256_ps(_mm256_and_si256(second, high_half));
        } else {
          const __m256i b0 = _mm256_shuffle_epi8(plane[0], index), b1 = _mm256_shuffle_epi8(plane[1], index);
          const __m256i b2 = _mm256_shuffle_epi8(plane[2], index), b3 = _mm256_shuffle_epi8(plane[3], index);
          const __m256i h01 = _mm256_unpacklo_epi8(b0, b1), h23 = _mm256_unpacklo_epi8(b2, b3);
          const __m256i l01 = _mm256_unpackhi_epi8(b0, b1), l23 = _mm256_unpackhi_epi8(b2, b3);
          v0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
          v1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
          v2 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
          v3 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
        }
        for (int i = 0; i < MR; ++i) {
          const float* xi = xc + i * k;
          acc[i][0] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(xi), acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(xi + 8), acc[i][1]);
          acc[i][2 % kAcc] = _mm256_fmadd_ps(v2, _mm256_loadu_ps(xi + 16), acc[i][2 % kAcc]);
          acc[i][3 % kAcc] = _mm256_fmadd_ps(v3, _mm256_loadu_ps(xi + 24), acc[i][3 % kAcc]);
        }
      }
      const __m256 scale = _mm256_set1_ps(w.scale(block));
      for (int i = 0; i < MR; ++i) {
        __m256 sum = _mm256_add_ps(acc[i][0], acc[i][1]);
        if constexpr (kAcc == 4) sum = _mm256_add_ps(sum, _mm256_add_ps(acc[i][2], acc[i][3]));
        total[i] = _mm256_fmadd_ps(sum, scale, total[i]);
      }
      start += len;
    }
    for (int i = 0; i < MR; ++i) out_f32[i * w.n + j] = hsum(total[i]);
  }
}

int64_t n_tiles(const Nf4Weight& w, bool grad_input) {
  return grad_input ? (w.k + kGradCT - 1) / kGradCT : (w.n + kFwdJT - 1) / kFwdJT;
}

// Work items (tile, row block) taken in turn from a shared counter, so a thread slowed down by a busy machine
// leaves its share to the others.
template <typename T, bool kGrad>
void run_items(const Nf4Weight& w, const T* a, int64_t m, int64_t a_s0, int64_t a_s1, T* out, float* workspace,
               const Avx2Plan& plan) {
  const int64_t tiles = n_tiles(w, kGrad), m_blocks = (m + kMB - 1) / kMB, items = tiles * m_blocks;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, plan.workers, 1, [&](int64_t begin, int64_t) {
    float* ws = workspace + begin * plan.floats_per_worker;
    for (int64_t t; (t = next.fetch_add(1)) < items;) {
      if constexpr (kGrad) {
        grad_input_item<T>(w, a, m, a_s0, a_s1, out, ws, t % tiles, t / tiles);
      } else {
        forward_item<T>(w, a, m, a_s0, a_s1, out, ws, t % tiles, t / tiles);
      }
    }
  });
}

}  // namespace

bool cpu_has_avx2() {
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has;
}

Avx2Plan avx2_plan(const Nf4Weight& w, int64_t m, bool grad_input, int64_t threads) {
  const int64_t per_worker = grad_input ? kGradPanel + kGradRows + kGradAcc : kFwdPanel + kFwdRows + kFwdAcc;
  const int64_t items = n_tiles(w, grad_input) * ((m + kMB - 1) / kMB);
  // Scratch stays within 1/64 of a fp32 copy of W (at least one worker): fewer workers on a small weight.
  const int64_t budget_workers = std::max<int64_t>(1, w.n * w.k / 16 / (per_worker * 4));
  return {std::max<int64_t>(1, std::min({threads, items, budget_workers})), per_worker};
}

template <typename T>
void nf4_forward_avx2(const Nf4Weight& w, const T* a, int64_t m, int64_t a_s0, int64_t a_s1, T* out, float* workspace,
                      const Avx2Plan& plan) {
  run_items<T, false>(w, a, m, a_s0, a_s1, out, workspace, plan);
}

template <typename T>
void nf4_grad_input_avx2(const Nf4Weight& w, const T* a, int64_t m, int64_t a_s0, int64_t a_s1, T* out,
                         float* workspace, const Avx2Plan& plan) {
  run_items<T, true>(w, a, m, a_s0, a_s1, out, workspace, plan);
}

bool avx2_fused_rows(const Nf4Weight& w, int64_t m) {
  return m <= kFusedMaxRows && w.k % kFusedGroup == 0 && w.blocksize % kFusedGroup == 0;
}

template <typename T>
void nf4_forward_rows_avx2(const Nf4Weight& w, const T* a, int64_t m, int64_t a_s0, int64_t a_s1, T* out,
                           float* workspace) {
  for (int64_t i = 0; i < m; ++i) {  // x in fused_rows' order
    for (int64_t c = 0; c < w.k; ++c) workspace[i * w.k + split_index<T>(c)] = static_cast<float>(a[i * a_s0 + c * a_s1]);
  }
  float* out_f32 = std::is_same_v<T, float> ? reinterpret_cast<float*>(out) : workspace + m * w.k;
  // grain: enough rows of W per task that a task streams a few hundred KiB of it
  at::parallel_for(0, w.n, std::max<int64_t>(1, (512 << 10) / w.k), [&](int64_t j0, int64_t j1) {
    switch (m) {
      case 1: fused_rows<T, 1>(w, workspace, j0, j1, out_f32); break;
      case 2: fused_rows<T, 2>(w, workspace, j0, j1, out_f32); break;
      case 3: fused_rows<T, 3>(w, workspace, j0, j1, out_f32); break;
      default: fused_rows<T, 4>(w, workspace, j0, j1, out_f32); break;
    }
  });
  if constexpr (!std::is_same_v<T, float>) write_out(out_f32, w.n, m, w.n, out, w.n);
}

void dequant_tile_avx2(const Nf4Weight& w, int64_t row0, int64_t rows, int64_t col0, int64_t cols, float* dst) {
  dequant_panel<float>(w, row0, rows, col0, cols, dst, cols);
}

#define LADDER_INSTANTIATE(T)                                                                                   \
  template void nf4_forward_avx2<T>(const Nf4Weight&, const T*, int64_t, int64_t, int64_t, T*, float*,          \
                                    const Avx2Plan&);                                                           \
  template void nf4_grad_input_avx2<T>(const Nf4Weight&, const T*, int64_t, int64_t, int64_t, T*, float*,       \
                                       const Avx2Plan&);                                                        \
  template void nf4_forward_rows_avx2<T>(const Nf4Weight&, const T*, int64_t, int64_t, int64_t, T*, float*);
LADDER_INSTANTIATE(float)
LADDER_INSTANTIATE(c10::BFloat16)
LADDER_INSTANTIATE(c10::Half)
#undef LADDER_INSTANTIATE

}  // namespace ladder_nf4

#else  // not x86-64: no AVX2 kernels; nf4_matmul.cpp never calls them

namespace ladder_nf4 {
bool cpu_has_avx2() { return false; }
bool avx2_fused_rows(const Nf4Weight&, int64_t) { return false; }
template <typename T>
void nf4_forward_rows_avx2(const Nf4Weight&, const T*, int64_t, int64_t, int64_t, T*, float*) {}
template void nf4_forward_rows_avx2<float>(const Nf4Weight&, const float*, int64_t, int64_t, int64_t, float*, float*);
template void nf4_forward_rows_avx2<c10::BFloat16>(const Nf4Weight&, const c10::BFloat16*, int64_t, int64_t, int64_t,
                                                   c10::BFloat16*, float*);
template void nf4_forward_rows_avx2<c10::Half>(const Nf4Weight&, const c10::Half*, int64_t, int64_t, int64_t,
                                               c10::Half*, float*);
void dequant_tile_avx2(const Nf4Weight&, int64_t, int64_t, int64_t, int64_t, float*) {}
Avx2Plan avx2_plan(const Nf4Weight&, int64_t, bool, int64_t) { return {1, 0}; }
template <typename T>
void nf4_forward_avx2(const Nf4Weight&, const T*, int64_t, int64_t, int64_t, T*, float*, const Avx2Plan&) {}
template <typename T>
void nf4_grad_input_avx2(const Nf4Weight&, const T*, int64_t, int64_t, int64_t, T*, float*, const Avx2Plan&) {}
template void nf4_forward_avx2<float>(const Nf4Weight&, const float*, int64_t, int64_t, int64_t, float*, float*,
                                      const Avx2Plan&);
template void nf4_forward_avx2<c10::BFloat16>(const Nf4Weight&, const c10::BFloat16*, int64_t, int64_t, int64_t,
                                              c10::BFloat16*, float*, const Avx2Plan&);
template void nf4_forward_avx2<c10::Half>(const Nf4Weight&, const c10::Half*, int64_t, int64_t, int64_t, c10::Half*,
                                          float*, const Avx2Plan&);
template void nf4_grad_input_avx2<float>(const Nf4Weight&, const float*, int64_t, int64_t, int64_t, float*, float*,
                                         const Avx2Plan&);
template void nf4_grad_input_avx2<c10::BFloat16>(const Nf4Weight&, const c10::BFloat16*, int64_t, int64_t, int64_t,
                                                 c10::BFloat16*, float*, const Avx2Plan&);
template void nf4_grad_input_avx2<c10::Half>(const Nf4Weight&, const c10::Half*, int64_t, int64_t, int64_t,
                                             c10::Half*, float*, const Avx2Plan&);
}  // namespace ladder_nf4

#endif
