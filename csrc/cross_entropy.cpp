// Row-wise cross-entropy for ladder::fused_linear_cross_entropy (ladder_kernels/ops/cross_entropy.py):
// per-row loss = logsumexp(c) - c[label], c = softcap * tanh(logits / softcap) (or logits), and, when a
// gradient is wanted, d loss / d logits = softmax(c) - onehot (times 1 - tanh^2) written over the logits.
// Parallel over rows; each thread keeps one fp32 row of exponentials so exp runs once per element. On AVX2 CPUs
// the conversions, max, exponentials and their sum run 8 lanes at a time: 1023 x 32000 bf16 logits with the
// gradient took 83 ms with a scalar std::exp per element (as long as the lm-head matmul itself), 15 ms now.
// ATen and the op registry only: torch/extension.h (autograd, nn, pybind) triples the build time.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace {

#ifdef LADDER_VEC_X86
using ladder_vec::exp_nonpositive;

// c[v] = exp(c[v] - max_c) in place; returns their sum, accumulated in double as the scalar loop does.
LADDER_AVX2 double exp_and_sum_avx2(float* c, int64_t vocab, float max_c) {
  const __m256 shift = _mm256_set1_ps(max_c);
  __m256d acc_low = _mm256_setzero_pd(), acc_high = _mm256_setzero_pd();
  int64_t v = 0;
  for (; v + 8 <= vocab; v += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(c + v), shift));
    _mm256_storeu_ps(c + v, e);
    acc_low = _mm256_add_pd(acc_low, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    acc_high = _mm256_add_pd(acc_high, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(acc_low, acc_high));
  double sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; v < vocab; ++v) {
    c[v] = std::exp(c[v] - max_c);
    sum += c[v];
  }
  return sum;
}

// The max of c[0 : vocab].
LADDER_AVX2 float max_avx2(const float* c, int64_t vocab) {
  __m256 m8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t v = 0;
  for (; v + 8 <= vocab; v += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(c + v));
  float m = ladder_vec::horizontal_max(m8);
  for (; v < vocab; ++v) m = std::max(m, c[v]);
  return m;
}

// The same loops as the portable ones below, compiled for AVX2 (GCC vectorizes the conversions there).
template <typename T>
LADDER_AVX2 void to_float_avx2(const T* x, float* c, int64_t vocab) {
  for (int64_t v = 0; v < vocab; ++v) c[v] = static_cast<float>(x[v]);
}

template <typename T>
LADDER_AVX2 void scaled_to_avx2(const float* c, float scale, T* x, int64_t vocab) {
  for (int64_t v = 0; v < vocab; ++v) x[v] = static_cast<T>(c[v] * scale);
}
#endif

// c = x in fp32; returns max(c).
template <typename T>
float to_float_and_max([[maybe_unused]] bool avx2, const T* x, float* c, int64_t vocab) {
#ifdef LADDER_VEC_X86
  if (avx2) {
    to_float_avx2(x, c, vocab);
    return max_avx2(c, vocab);
  }
#endif
  float max_c = -std::numeric_limits<float>::infinity();
  for (int64_t v = 0; v < vocab; ++v) {
    c[v] = static_cast<float>(x[v]);
    max_c = std::max(max_c, c[v]);
  }
  return max_c;
}

// x = T(c * scale).
template <typename T>
void scaled_to([[maybe_unused]] bool avx2, const float* c, float scale, T* x, int64_t vocab) {
#ifdef LADDER_VEC_X86
  if (avx2) return scaled_to_avx2(c, scale, x, vocab);
#endif
  for (int64_t v = 0; v < vocab; ++v) x[v] = static_cast<T>(c[v] * scale);
}

// c[v] = exp(c[v] - max_c) in place; returns their sum.
double exp_and_sum([[maybe_unused]] bool avx2, float* c, int64_t vocab, float max_c) {
#ifdef LADDER_VEC_X86
  if (avx2) return exp_and_sum_avx2(c, vocab, max_c);
#endif
  double sum = 0.0;  // a V-long sum: double keeps it exact to fp32
  for (int64_t v = 0; v < vocab; ++v) {
    c[v] = std::exp(c[v] - max_c);
    sum += c[v];
  }
  return sum;
}

template <typename scalar_t>
void ce_rows_kernel(scalar_t* logits, const int64_t* labels, float* losses, int64_t rows, int64_t vocab,
                    int64_t row_stride, int64_t ignore_index, float softcap, bool compute_grad) {
  const bool capped = softcap > 0.f;
  const bool avx2 = ladder_vec::use_avx2();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row_buf(vocab);  // capped logits, then their exponentials
    float* c = row_buf.data();
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* x = logits + r * row_stride;
      const int64_t label = labels[r];
      if (label == ignore_index) {
        losses[r] = 0.f;
        if (compute_grad) std::fill(x, x + vocab, scalar_t(0));
        continue;
      }
      float max_c = -std::numeric_limits<float>::infinity();
      if (capped) {
        for (int64_t v = 0; v < vocab; ++v) {
          c[v] = softcap * std::tanh(static_cast<float>(x[v]) / softcap);
          max_c = std::max(max_c, c[v]);
        }
      } else {
        max_c = to_float_and_max(avx2, x, c, vocab);
      }
      const float c_label = c[label];
      const double sum = exp_and_sum(avx2, c, vocab, max_c);
      losses[r] = static_cast<float>(max_c + std::log(sum) - c_label);
      if (!compute_grad) continue;
      const float inv_sum = static_cast<float>(1.0 / sum);
      if (!capped) {  // softmax - onehot: the label's entry once more, after the rest
        scaled_to(avx2, c, inv_sum, x, vocab);
        x[label] = static_cast<scalar_t>(c[label] * inv_sum - 1.f);
        continue;
      }
      for (int64_t v = 0; v < vocab; ++v) {
        float g = c[v] * inv_sum - (v == label ? 1.f : 0.f);
        if (capped) {
          const float t = std::tanh(static_cast<float>(x[v]) / softcap);
          g *= 1.f - t * t;
        }
        x[v] = static_cast<scalar_t>(g);
      }
    }
  });
}

at::Tensor cross_entropy_rows_(at::Tensor logits, const at::Tensor& labels, int64_t ignore_index, double softcap,
                               bool compute_grad) {
  TORCH_CHECK(logits.dim() == 2, "cross_entropy_rows_: logits must be 2-D [n, V], got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1, "cross_entropy_rows_: logits rows must be contiguous, got strides ", logits.strides());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.scalar_type() == at::kLong,
              "cross_entropy_rows_: labels must be int64 [", logits.size(0), "], got ", labels.scalar_type(), " ", labels.sizes());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const at::Tensor labels_c = labels.contiguous();
  const int64_t* lab = labels_c.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(lab[r] == ignore_index || (lab[r] >= 0 && lab[r] < vocab), "cross_entropy_rows_: label ", lab[r],
                " out of range [0, ", vocab, ") in row ", r);
  at::Tensor losses = at::empty({rows}, logits.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_rows_", [&] {
    ce_rows_kernel<scalar_t>(logits.data_ptr<scalar_t>(), lab, losses.data_ptr<float>(), rows, vocab, logits.stride(0),
                             ignore_index, static_cast<float>(softcap), compute_grad);
  });
  return losses;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ladder_cpu, m) {
  m.def("cross_entropy_rows_(Tensor(a!) logits, Tensor labels, int ignore_index, float softcap, bool compute_grad) -> Tensor");
}

TORCH_LIBRARY_IMPL(ladder_cpu, CPU, m) { m.impl("cross_entropy_rows_", &cross_entropy_rows_); }
