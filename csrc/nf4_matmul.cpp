// NF4 matmul on CPU without materializing the dequantized weight.
//
//   nf4_matmul(x [M,K], W [N,K] as NF4)      -> x @ W^T (+ bias)  [M,N]
//   nf4_matmul_grad_input(g [M,N], W [N,K])  -> g @ W             [M,K]
//
// W is stored in bitsandbytes' flat-block layout (csrc/nf4_weight.h), its absmax either fp32 per block or
// double-quantized as stored (uint8 codes, fp32 per 256 blocks, offset, 256-entry table), decoded per block
// inside the kernels: nothing of the weight's size is allocated per call.
//
// Which code runs is chosen per call (`active_isa`): the CPU's best of avx512 / avx2 / scalar, or what the
// environment variable LADDER_KERNELS_CPU_ISA names (for tests: every path against the same reference).
//   avx2     16-bit x, or fp32 x with few rows: csrc/nf4_avx2.cpp, a register-blocked GEMM of its own on in-cache
//            dequantized panels of W; fp32 x with many rows (avx2_uses_blas): the tiled product below.
//            A forward pass with at most 4 rows of x (decoding; K and blocksize multiples of 32) takes
//            avx2_fused_rows instead: W's codes are looked up into registers, no panel is written.
//   avx512 and scalar: one tiled product, out[:, p0:p1] (+)= a[:, r0:r1] @ tile, where each thread dequantizes a
//            tile of W (forward: W[p0:p1, r0:r1] read transposed; grad_input: W[r0:r1, p0:p1]) into its own
//            small buffer and multiplies it with BLAS (at::mm_out / addmm_) straight into its disjoint column
//            slice of the output; avx512 dequantizes with 16-wide table lookups, and a forward pass with only a
//            few rows of x (decoding) skips the tiles: fused_rows_avx512 dequantizes in registers.
// Extra memory: the tiles, 1/64 of a fp32 copy of W over all threads but at least 192 KiB a thread (kMinTileBytes),
// allocated on the calling thread; BLAS adds its own per-call workspace, as it does for a dense product.
// ATen and the op registry only: torch/extension.h (autograd, nn, pybind) triples the build time.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "nf4_weight.h"
#include "outputs.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LADDER_NF4_X86 1
#endif

using ladder_nf4::Nf4Weight;

namespace {

// Bytes per dequantized tile (per thread: one per-core L2 here; less on a small weight, see tile_bytes), and the reduction length of an fp32 tile.
// Every BLAS call repacks its slice of the activations, so the tile's output width is what amortizes that;
// cutting the reduction into chunks lets tiles be wide and still small. Measured on one core at M=512,
// N=4096, K=11008 fp32: full-reduction tiles of 2-8 MiB (47-190 wide) cost 1.4-1.7x the dense matmul,
// 512-long chunks 1.0x. 16-bit outputs take the whole reduction in one call: accumulating chunks into them
// would round to 16 bits at every chunk.
constexpr int64_t kTileBytes = 2 << 20;
// ... and at least this many (192 KiB: 96 columns of a 512-long fp32 chunk), whatever the weight's size: on a
// small weight (SmolLM2's 576 x 1536) 1/64 of it made 16-wide tiles, where BLAS ran at half the dense speed.
// So scratch is threads x 192 KiB up to a weight of 6.3 M entries at 2 threads (2048 x 2048: 384 KiB, 1/43 of
// its fp32 copy), and 1/64 of it above.
constexpr int64_t kMinTileBytes = 192 << 10;
constexpr int64_t kReduceChunk = 512;
// Narrower tiles make BLAS inefficient; a small weight is still split (down to 16) so every thread gets one.
constexpr int64_t kMinTile = 64;
constexpr int64_t kTilesPerThread = 4;  // tiles per thread, taken in turn (see nf4_gemm)
// Reading a column band of W jumps k/2 bytes from row to row, which the hardware prefetchers do not follow:
// fetching the row this many rows ahead halved the backward pass's dequantization time (4096x4096).
constexpr int64_t kPrefetchRows = 8;
// At most this many rows of x take the fused decode path (fused_rows_avx512) in the forward pass: W is then
// read as 4-bit bytes only, instead of being written to and re-read from a tile. Above it, BLAS's reuse of
// each weight across the rows of x wins (one core, K=N=4096: fp32 fused is 2.5x faster than dense at M=8,
// 1.4x at 16; bf16 matches AMX-backed dense at M=1 but is 1.6x slower at M=8).
constexpr int64_t kFusedMaxRows = 8;
// fp32 with at least this many rows of x goes from the AVX2 kernels to BLAS on AVX2-dequantized tiles (nf4_gemm):
// measured on this 2-core AMD CPU at 2048 rows, K, N in {576, 1536} (SmolLM2), the register-blocked kernel ran
// at 40-50 GFLOPS, MKL at 90-140, so tiles + BLAS are 2-3x faster there and the kernel still wins at 32 rows.
// 16-bit inputs stay on the AVX2 kernels (a 16-bit BLAS is far slower on CPUs without native bf16).
constexpr int64_t kAvx2BlasMinRows = 64;
template <typename T>
constexpr bool avx2_uses_blas(int64_t rows) { return std::is_same_v<T, float> && rows >= kAvx2BlasMinRows; }
template <typename T>
constexpr int64_t fused_max_rows() { return std::is_same_v<T, float> ? kFusedMaxRows : 4; }

// --- which code runs ----------------------------------------------------------------------------------------
enum class Isa { kScalar, kAvx2, kAvx512 };
constexpr const char* kIsaEnv = "LADDER_KERNELS_CPU_ISA";  // defaults.CPU_ISA_ENV

const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "scalar";
}

bool cpu_supports(Isa isa);

// The CPU's best, or what LADDER_KERNELS_CPU_ISA names ("auto", "avx512", "avx2", "scalar"); read on every call so
// that tests can switch paths in one process. Asking for what the CPU cannot run is an error, not a fallback.
Isa active_isa() {
  const char* env = std::getenv(kIsaEnv);
  const std::string want = env ? env : "auto";
  if (want.empty() || want == "auto") {
    return cpu_supports(Isa::kAvx512) ? Isa::kAvx512 : cpu_supports(Isa::kAvx2) ? Isa::kAvx2 : Isa::kScalar;
  }
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (want == isa_name(isa)) {
      TORCH_CHECK(cpu_supports(isa), kIsaEnv, "=", want, ": this CPU cannot run the ", want,
                  " kernels (unset it, or use auto)");
      return isa;
    }
  }
  TORCH_CHECK(false, kIsaEnv, " must be one of auto, avx512, avx2, scalar, got '", want, "'");
  return Isa::kScalar;  // not reached
}

// --- dequantization of a tile W[row0 : row0+rows, col0 : col0+cols] into a dense row-major buffer ------------
// Each row of the tile is a contiguous run of the flat weight, cut further where quantization blocks end.

template <typename T>
inline void dequant_run_scalar(const uint8_t* packed, const float* code, float scale, int64_t start, int64_t len, T* dst) {
  for (int64_t j = 0; j < len; ++j) {
    const int64_t i = start + j;
    const uint8_t byte = packed[i >> 1];
    const int nibble = (i & 1) ? (byte & 0xF) : (byte >> 4);
    dst[j] = static_cast<T>(code[nibble] * scale);  // c10's float -> bf16/fp16 conversions round to nearest even
  }
}

template <typename T>
void dequant_tile_scalar(const Nf4Weight& w, int64_t row0, int64_t rows, int64_t col0, int64_t cols, T* dst) {
  for (int64_t r = 0; r < rows; ++r, dst += cols) {
    for (int64_t start = (row0 + r) * w.k + col0, end = start + cols, j = 0; start < end;) {
      const int64_t block = start / w.blocksize;
      const int64_t run = std::min(end, (block + 1) * w.blocksize) - start;
      dequant_run_scalar(w.packed, w.code, w.scale(block), start, run, dst + j);
      start += run, j += run;
    }
  }
}

#ifdef LADDER_NF4_X86
#define LADDER_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// fp32 -> 16-bit lanes, rounding to nearest even like c10's conversions (weights are finite: no NaN case).
template <typename T>
LADDER_AVX512 inline __m256i to_16bit(__m512 v);

template <>
LADDER_AVX512 inline __m256i to_16bit<c10::Half>(__m512 v) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

template <>
LADDER_AVX512 inline __m256i to_16bit<c10::BFloat16>(__m512 v) {
  __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
}

// fp32 values rounded to T and widened back to fp32.
template <typename T>
LADDER_AVX512 inline __m512 round_to_16bit(__m512 v) {
  if constexpr (std::is_same_v<T, c10::Half>) return _mm512_cvtph_ps(to_16bit<T>(v));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_16bit<T>(v)), 16));  // bf16: top half of fp32
}

inline __mmask32 first_lanes(int64_t count) { return static_cast<__mmask32>((uint64_t{1} << count) - 1); }

// The 16-entry code table, multiplied by the block's absmax (the same fp32 products as code * absmax, rounded
// once to T), fits one register, so looking up 16 or 32 values is one permute. 16 packed bytes hold 32
// values; ragged ends use masked loads and stores (a masked-off byte is never read, so `packed` is never
// overrun).
template <typename T>
LADDER_AVX512 void dequant_tile_avx512(const Nf4Weight& w, int64_t row0, int64_t rows, int64_t col0, int64_t cols, T* dst) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  const uint8_t* packed = w.packed;
  const int64_t k = w.k;
  const __m512 table = _mm512_loadu_ps(w.code);
  // fp32: even (high-nibble) and odd elements are looked up separately, then interleaved
  const __m512i interleave_first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i interleave_second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  const __m512i low_nibble = _mm512_set1_epi32(0xF);
  for (int64_t r = 0; r < rows; ++r, dst += cols) {
    if (cols < k && r + kPrefetchRows < rows) {  // a column band: each row starts far from the last one
      const uint8_t* ahead = packed + (((row0 + r + kPrefetchRows) * k + col0) >> 1);
      for (int64_t b = 0; b < (cols + 1) / 2 + 1; b += 64) __builtin_prefetch(ahead + b);
    }
    for (int64_t start = (row0 + r) * k + col0, end = start + cols, j = 0; start < end;) {
      const int64_t block = start / w.blocksize;
      const int64_t len = std::min(end, (block + 1) * w.blocksize) - start;
      const float scale = w.scale(block);
      const __m512 scaled = _mm512_mul_ps(table, _mm512_set1_ps(scale));
      __m512i scaled_16bit;  // 16-bit types: the table rounded to T, in the low 16 words
      if constexpr (!kFloat) scaled_16bit = _mm512_castsi256_si512(to_16bit<T>(scaled));
      T* out = dst + j;
      const uint8_t* src = packed + (start >> 1);
      int64_t done = 0;
      if (start & 1) {  // the run begins on a low nibble
        out[0] = static_cast<T>(w.code[*src & 0xF] * scale);
        ++src, done = 1;
      }
      while (done < len) {
        const int64_t count = std::min<int64_t>(len - done, 32);
        const __mmask16 byte_mask = static_cast<__mmask16>((1u << ((count + 1) / 2)) - 1);
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(byte_mask, src));
        const __m512i high = _mm512_srli_epi32(bytes, 4), low = _mm512_and_si512(bytes, low_nibble);
        if constexpr (kFloat) {
          const __m512 even = _mm512_permutexvar_ps(high, scaled), odd = _mm512_permutexvar_ps(low, scaled);
          const __mmask32 mask = first_lanes(count);
          _mm512_mask_storeu_ps(out + done, static_cast<__mmask16>(mask), _mm512_permutex2var_ps(even, interleave_first, odd));
          _mm512_mask_storeu_ps(out + done + 16, static_cast<__mmask16>(mask >> 16), _mm512_permutex2var_ps(even, interleave_second, odd));
        } else {
          // word 2i = high nibble of byte i (element 2i), word 2i+1 = its low nibble: 32 indices in order
          const __m512i index = _mm512_or_si512(high, _mm512_slli_epi32(low, 16));
          _mm512_mask_storeu_epi16(out + done, first_lanes(count), _mm512_permutexvar_epi16(index, scaled_16bit));
        }
        done += count, src += 16;
      }
      start += len, j += len;
    }
  }
}

// Decode-sized forward (M <= fused_max_rows<T>()): out[m, j] = sum_c x[m, c] * W[j, c] with each 32-value chunk of
// W dequantized in registers and consumed at once, so W is streamed as 4-bit bytes and never written out.
// x_f32 is x in fp32 [rows, k]; for 16-bit T the table is rounded to T first (the weight a 16-bit matmul
// would see), products accumulate in fp32 and out_f32 receives the fp32 sums.
template <typename T>
LADDER_AVX512 void fused_rows_avx512(const Nf4Weight& w, const float* x_f32, int64_t rows, int64_t j0, int64_t j1,
                                     float* out_f32) {
  const __m512 table = _mm512_loadu_ps(w.code);
  const __m512i interleave_first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i interleave_second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  const __m512i low_nibble = _mm512_set1_epi32(0xF);
  const int64_t k = w.k;
  for (int64_t j = j0; j < j1; ++j) {
    __m512 acc[kFusedMaxRows];
    float tail[kFusedMaxRows] = {};
    for (int64_t m = 0; m < rows; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t start = j * k, end = start + k; start < end;) {
      const int64_t block = start / w.blocksize;
      const int64_t len = std::min(end, (block + 1) * w.blocksize) - start;
      __m512 scaled = _mm512_mul_ps(table, _mm512_set1_ps(w.scale(block)));
      if constexpr (!std::is_same_v<T, float>) scaled = round_to_16bit<T>(scaled);
      const uint8_t* src = w.packed + (start >> 1);
      int64_t c = start - j * k;  // column of the run's first element
      int64_t done = 0;
      if (start & 1) {  // the run begins on a low nibble
        float v;
        _mm_store_ss(&v, _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set1_epi32(*src & 0xF), scaled)));
        for (int64_t m = 0; m < rows; ++m) tail[m] += v * x_f32[m * k + c];
        ++src, done = 1;
      }
      while (done < len) {
        const int64_t count = std::min<int64_t>(len - done, 32);
        const __mmask16 byte_mask = static_cast<__mmask16>((1u << ((count + 1) / 2)) - 1);
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(byte_mask, src));
        const __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), scaled);
        const __m512 odd = _mm512_permutexvar_ps(_mm512_and_si512(bytes, low_nibble), scaled);
        const __m512 first = _mm512_permutex2var_ps(even, interleave_first, odd);
        const __m512 second = _mm512_permutex2var_ps(even, interleave_second, odd);
        const __mmask32 mask = first_lanes(count);
        const float* xc = x_f32 + c + done;
        for (int64_t m = 0; m < rows; ++m) {  // masked-off lanes of x load as 0
          acc[m] = _mm512_fmadd_ps(first, _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask), xc + m * k), acc[m]);
          acc[m] = _mm512_fmadd_ps(second, _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask >> 16), xc + m * k + 16), acc[m]);
        }
        done += count, src += 16;
      }
      start += len;
    }
    for (int64_t m = 0; m < rows; ++m) out_f32[m * w.n + j] = _mm512_reduce_add_ps(acc[m]) + tail[m];
  }
}

#endif

bool cpu_supports(Isa isa) {
#ifdef LADDER_NF4_X86
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  if (isa == Isa::kAvx512) return avx512;
  if (isa == Isa::kAvx2) return ladder_nf4::cpu_has_avx2();
#else
  if (isa != Isa::kScalar) return false;
#endif
  return true;
}

// W[row0 : row0+rows, col0 : col0+cols] -> dst, row-major [rows, cols], in T.
template <typename T>
void dequant_tile(Isa isa, const Nf4Weight& w, int64_t row0, int64_t rows, int64_t col0, int64_t cols, T* dst) {
#ifdef LADDER_NF4_X86
  if (isa == Isa::kAvx512) return dequant_tile_avx512(w, row0, rows, col0, cols, dst);
  if constexpr (std::is_same_v<T, float>) {
    if (isa == Isa::kAvx2) return ladder_nf4::dequant_tile_avx2(w, row0, rows, col0, cols, dst);
  }
#endif
  dequant_tile_scalar(w, row0, rows, col0, cols, dst);
}

// Contiguous, and NaN first when tests ask (outputs.h).
at::Tensor new_output(int64_t rows, int64_t cols, const at::Tensor& like) {
  return ladder_out::poisoned_if_asked(
      at::empty({rows, cols}, like.options().memory_format(at::MemoryFormat::Contiguous)));
}

// --- argument checks ------------------------------------------------------------------------------------

// The weight's tensors, as the op takes them: absmax is fp32, or uint8 codes with the three nested statistics.
struct WeightArgs {
  const at::Tensor& packed;
  const at::Tensor& absmax;
  const at::Tensor& code;
  const c10::optional<at::Tensor>& nested_absmax;
  const c10::optional<at::Tensor>& nested_code;
  const c10::optional<at::Tensor>& offset;
};

void check_fp32(const at::Tensor& t, int64_t numel, const char* op, const char* name, const char* expected) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.numel() == numel, op, ": ", name, " must hold ", expected, " = ", numel, " values, got ", t.numel());
}

Nf4Weight check_weight(const WeightArgs& a, int64_t n, int64_t k, int64_t blocksize, const char* op) {
  TORCH_CHECK(n > 0 && k > 0, op, ": n and k (the weight's shape) must be positive, got n=", n, " k=", k);
  TORCH_CHECK(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
  TORCH_CHECK(a.packed.device().is_cpu() && a.absmax.device().is_cpu(), op, ": packed and absmax must be CPU tensors");
  TORCH_CHECK(a.packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", a.packed.scalar_type());
  TORCH_CHECK(a.packed.is_contiguous(), op, ": packed must be contiguous");
  TORCH_CHECK(a.packed.numel() == (n * k + 1) / 2, op, ": packed must hold (n*k+1)/2 = ", (n * k + 1) / 2,
              " bytes for n=", n, " k=", k, ", got ", a.packed.numel());
  check_fp32(a.code, 16, op, "code", "the NF4 table's");
  const int64_t n_blocks = (n * k + blocksize - 1) / blocksize;
  const int given = a.nested_absmax.has_value() + a.nested_code.has_value() + a.offset.has_value();
  TORCH_CHECK(given == 0 || given == 3, op, ": nested_absmax, nested_code and offset come together (double "
              "quantization) or not at all, got ", given, " of them");
  TORCH_CHECK(a.absmax.is_contiguous(), op, ": absmax must be contiguous");
  TORCH_CHECK(a.absmax.numel() == n_blocks, op, ": absmax must hold ceil(n*k/blocksize) = ", n_blocks,
              " values, got ", a.absmax.numel());
  Nf4Weight w{a.packed.data_ptr<uint8_t>(), nullptr, nullptr, nullptr, nullptr, 0.0f, a.code.data_ptr<float>(),
              n, k, blocksize};
  if (given == 0) {
    TORCH_CHECK(a.absmax.scalar_type() == at::kFloat, op, ": absmax must be float32 without nested statistics "
                "(double-quantized uint8 codes need nested_absmax, nested_code and offset), got ",
                a.absmax.scalar_type());
    w.absmax = a.absmax.data_ptr<float>();
    return w;
  }
  TORCH_CHECK(a.absmax.scalar_type() == at::kByte, op, ": absmax must be uint8 codes with nested statistics, got ",
              a.absmax.scalar_type());
  check_fp32(*a.nested_absmax, (n_blocks + 255) / 256, op, "nested_absmax", "ceil(n_blocks/256)");
  check_fp32(*a.nested_code, 256, op, "nested_code", "the dynamic map's");
  check_fp32(*a.offset, 1, op, "offset", "one");
  w.absmax_codes = a.absmax.data_ptr<uint8_t>();
  w.nested_absmax = a.nested_absmax->data_ptr<float>();
  w.nested_code = a.nested_code->data_ptr<float>();
  w.offset = a.offset->data_ptr<float>()[0];
  return w;
}

void check_activation(const at::Tensor& x, int64_t cols, const char* op, const char* name, const char* dim_name) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": ", name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) == cols, op, ": ", name, ".size(1) must equal ", dim_name, "=", cols, ", got ", x.size(1));
}

// BLAS reads a matrix with unit stride along one dim; anything else (e.g. a slice with both strides > 1)
// would be copied by at::mm on every tile, so copy it once here instead.
at::Tensor blas_compatible(const at::Tensor& x) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const bool row_major = x.stride(1) == 1 && x.stride(0) >= std::max<int64_t>(cols, 1);
  const bool col_major = x.stride(0) == 1 && x.stride(1) >= std::max<int64_t>(rows, 1);
  return (row_major || col_major) ? x : x.contiguous();
}

// out = a @ W^T (transpose_w: forward, P = n, R = k) or a @ W (grad_input, P = k, R = n), out [M, P] given.
template <typename T>
void nf4_gemm(Isa isa, const at::Tensor& a, const Nf4Weight& w, bool transpose_w, at::Tensor& out) {
  const int64_t out_cols = out.size(1), reduce = a.size(1);
  const int64_t chunk = std::is_same_v<T, float> ? std::min(reduce, kReduceChunk) : reduce;
  const int64_t threads = at::get_num_threads();
  // Tiles of at most 1/64 of a fp32 copy of W over all threads (and kTileBytes each); wide enough to fill that;
  // narrow enough for kTilesPerThread tiles per thread, which the threads take in turn, so that one thread
  // slowed down (a busy machine) leaves its share to the others.
  const int64_t tile_bytes = std::min(kTileBytes, std::max<int64_t>(w.n * w.k / 16 / threads, kMinTileBytes));
  const int64_t fill = tile_bytes / (chunk * static_cast<int64_t>(sizeof(T)));
  int64_t width = std::max<int64_t>(fill < kMinTile ? 16 : kMinTile, fill);  // below kMinTile only on a small W
  width = std::min({width, std::max<int64_t>((out_cols + kTilesPerThread * threads - 1) / (kTilesPerThread * threads), 16), out_cols});
  const int64_t n_tiles = (out_cols + width - 1) / width;
  const int64_t workers = std::min(threads, n_tiles);
  const at::Tensor buffers = at::empty({workers, width * chunk}, a.options());  // on this thread: tracked
  std::atomic<int64_t> next_tile{0};

  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t) {
    // Worker threads do not inherit the caller's dispatch state: without this, BLAS calls on inputs that
    // require grad (the op runs inside autograd's forward) would go through autograd and refuse out=.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor buffer = buffers[begin];
    T* buf = buffer.data_ptr<T>();
    for (int64_t t; (t = next_tile.fetch_add(1)) < n_tiles;) {
      const int64_t p0 = t * width, cols = std::min(width, out_cols - p0);
      at::Tensor out_slice = out.narrow(1, p0, cols);  // strided columns of out: BLAS writes them in place
      for (int64_t r0 = 0; r0 < reduce; r0 += chunk) {
        const int64_t len = std::min(chunk, reduce - r0);
        at::Tensor tile;
        if (transpose_w) {  // W[p0:p0+cols, r0:r0+len], used as its transpose
          dequant_tile(isa, w, p0, cols, r0, len, buf);
          tile = buffer.narrow(0, 0, cols * len).view({cols, len}).t();
        } else {  // W[r0:r0+len, p0:p0+cols]
          dequant_tile(isa, w, r0, len, p0, cols, buf);
          tile = buffer.narrow(0, 0, len * cols).view({len, cols});
        }
        const at::Tensor a_chunk = a.narrow(1, r0, len);
        if (r0 == 0) {
          at::mm_out(out_slice, a_chunk, tile);
        } else {
          out_slice.addmm_(a_chunk, tile);
        }
      }
    }
  });
}

// out = a @ W^T or a @ W through the AVX2 kernels (nf4_avx2.cpp), scratch allocated here.
template <typename T>
void nf4_avx2(const at::Tensor& a, const Nf4Weight& w, bool grad_input, at::Tensor& out) {
  if (!grad_input && ladder_nf4::avx2_fused_rows(w, a.size(0))) {
    const at::Tensor workspace = at::empty({a.size(0) * (w.k + w.n)}, a.options().dtype(at::kFloat));
    return ladder_nf4::nf4_forward_rows_avx2<T>(w, a.data_ptr<T>(), a.size(0), a.stride(0), a.stride(1),
                                                out.data_ptr<T>(), workspace.data_ptr<float>());
  }
  const ladder_nf4::Avx2Plan plan = ladder_nf4::avx2_plan(w, a.size(0), grad_input, at::get_num_threads());
  const at::Tensor workspace = at::empty({plan.workers * plan.floats_per_worker}, a.options().dtype(at::kFloat));
  const T* a_ptr = a.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  float* ws = workspace.data_ptr<float>();
  if (grad_input) {
    ladder_nf4::nf4_grad_input_avx2<T>(w, a_ptr, a.size(0), a.stride(0), a.stride(1), out_ptr, ws, plan);
  } else {
    ladder_nf4::nf4_forward_avx2<T>(w, a_ptr, a.size(0), a.stride(0), a.stride(1), out_ptr, ws, plan);
  }
}

}  // namespace

at::Tensor nf4_matmul_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& code, const c10::optional<at::Tensor>& nested_absmax,
                          const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                          int64_t n, int64_t k, int64_t blocksize, const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "ladder_cpu::nf4_matmul";
  const Nf4Weight w = check_weight({packed, absmax, code, nested_absmax, nested_code, offset}, n, k, blocksize, op);
  check_activation(x, k, op, "x", "k");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == n, op,
                ": bias must be a 1-D CPU tensor of size n=", n, ", got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype ", x.scalar_type(),
                ", got ", bias->scalar_type());
  }
  const Isa isa = active_isa();
  at::Tensor out = new_output(x.size(0), n, x);
  if (x.size(0) == 0) return out;
  AT_DISPATCH_V2(x.scalar_type(), "nf4_matmul_cpu", AT_WRAP([&] {
    if (isa == Isa::kAvx2 && !avx2_uses_blas<scalar_t>(x.size(0))) {
      return nf4_avx2<scalar_t>(x, w, /*grad_input=*/false, out);
    }
#ifdef LADDER_NF4_X86
    // AVX2's fused decode kernel on AVX-512 CPUs too: its vpshufb lookups beat the AVX-512 kernel's vpermps
    // ones (measured on a 2-core AVX-512 AMD EPYC, bf16 M=1: 0.29 vs 0.67 ms at 2048x2048, 2.1 vs 4.6 at 4096x11008)
    if (isa == Isa::kAvx512 && ladder_nf4::avx2_fused_rows(w, x.size(0))) {
      return nf4_avx2<scalar_t>(x, w, /*grad_input=*/false, out);
    }
    if (isa == Isa::kAvx512 && x.size(0) <= fused_max_rows<scalar_t>()) {
      const at::Tensor x_f32 = x.to(at::kFloat).contiguous();
      at::Tensor out_f32 = std::is_same_v<scalar_t, float> ? out : at::empty({x.size(0), n}, x_f32.options());
      // grain: enough rows per task that a task streams a few hundred KiB of W
      at::parallel_for(0, n, std::max<int64_t>(1, (256 << 10) / k), [&](int64_t j0, int64_t j1) {
        fused_rows_avx512<scalar_t>(w, x_f32.data_ptr<float>(), x.size(0), j0, j1, out_f32.data_ptr<float>());
      });
      if (!std::is_same_v<scalar_t, float>) out.copy_(out_f32);
      return;
    }
#endif
    nf4_gemm<scalar_t>(isa, blas_compatible(x), w, /*transpose_w=*/true, out);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  if (bias.has_value()) out.add_(*bias);  // rounds like the reference: product in x's dtype, then + bias
  return out;
}

at::Tensor nf4_matmul_grad_input_cpu(const at::Tensor& g, const at::Tensor& packed, const at::Tensor& absmax,
                                     const at::Tensor& code, const c10::optional<at::Tensor>& nested_absmax,
                                     const c10::optional<at::Tensor>& nested_code,
                                     const c10::optional<at::Tensor>& offset, int64_t n, int64_t k,
                                     int64_t blocksize) {
  constexpr const char* op = "ladder_cpu::nf4_matmul_grad_input";
  const Nf4Weight w = check_weight({packed, absmax, code, nested_absmax, nested_code, offset}, n, k, blocksize, op);
  check_activation(g, n, op, "g", "n");
  const Isa isa = active_isa();
  at::Tensor out = new_output(g.size(0), k, g);
  if (g.size(0) == 0) return out;
  AT_DISPATCH_V2(g.scalar_type(), "nf4_matmul_grad_input_cpu", AT_WRAP([&] {
    if (isa == Isa::kAvx2 && !avx2_uses_blas<scalar_t>(g.size(0))) {
      return nf4_avx2<scalar_t>(g, w, /*grad_input=*/true, out);
    }
    nf4_gemm<scalar_t>(isa, blas_compatible(g), w, /*transpose_w=*/false, out);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return out;
}

// The kernels a call takes now (LADDER_KERNELS_CPU_ISA honoured), for backend_info(); raises when the variable
// names something this CPU cannot run.
std::string nf4_cpu_isa() { return isa_name(active_isa()); }

TORCH_LIBRARY_FRAGMENT(ladder_cpu, m) {
  m.def("nf4_matmul(Tensor x2d, Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, "
        "Tensor? nested_code, Tensor? offset, int n, int k, int blocksize, Tensor? bias) -> Tensor");
  m.def("nf4_matmul_grad_input(Tensor g2d, Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, "
        "Tensor? nested_code, Tensor? offset, int n, int k, int blocksize) -> Tensor");
}

TORCH_LIBRARY_IMPL(ladder_cpu, CPU, m) {
  m.impl("nf4_matmul", &nf4_matmul_cpu);
  m.impl("nf4_matmul_grad_input", &nf4_matmul_grad_input_cpu);
}
