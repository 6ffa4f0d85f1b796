// AVX2 helpers shared by the CPU kernels that exponentiate: csrc/cross_entropy.cpp, csrc/causal_attention.cpp.
// x86-64 only (LADDER_VEC_X86); callers keep a portable loop beside each use and pick with use_avx2(), once a call.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define LADDER_VEC_X86 1
#define LADDER_AVX2 __attribute__((target("avx2,fma")))

namespace ladder_vec {

inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// exp(x) for x <= 0 (a value minus a max or a logsumexp; a few ulp above 0 is fine), Cephes' expf:
// x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-7 polynomial, 2^n from the exponent bits; within 2 ulp of
// std::exp. x below -87.3 gives 2^-126 (not 0 or a denormal): callers that need exact zeros mask them.
LADDER_AVX2 inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

LADDER_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

LADDER_AVX2 inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

}  // namespace ladder_vec
#endif

namespace ladder_vec {
// Whether the AVX2 loops run: the CPU has AVX2 and FMA and LADDER_KERNELS_CPU_ISA (defaults.CPU_ISA_ENV) does not
// say "scalar", which tests set to run the portable loops too. getenv costs ~0.1 us: read it once a call.
inline bool use_avx2() {
#ifdef LADDER_VEC_X86
  const char* isa = std::getenv("LADDER_KERNELS_CPU_ISA");
  return cpu_has_avx2_fma() && !(isa != nullptr && std::strcmp(isa, "scalar") == 0);
#else
  return false;
#endif
}
}  // namespace ladder_vec
