// Row-wise cross-entropy for ladder::fused_linear_cross_entropy (ladder_kernels/ops/cross_entropy.py):
// per-row loss = logsumexp(c) - c[label], c = softcap * tanh(logits / softcap) (or logits), and, when a
// gradient is wanted, d loss / d logits = softmax(c) - onehot (times 1 - tanh^2) written over the logits.
// Parallel over rows; each thread keeps one fp32 row of exponentials so exp runs once per element.
// ATen and the op registry only: torch/extension.h (autograd, nn, pybind) triples the build time.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename scalar_t>
void ce_rows_kernel(scalar_t* logits, const int64_t* labels, float* losses, int64_t rows, int64_t vocab,
                    int64_t row_stride, int64_t ignore_index, float softcap, bool compute_grad) {
  const bool capped = softcap > 0.f;
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
      for (int64_t v = 0; v < vocab; ++v) {
        float cv = static_cast<float>(x[v]);
        if (capped) cv = softcap * std::tanh(cv / softcap);
        c[v] = cv;
        max_c = std::max(max_c, cv);
      }
      const float c_label = c[label];
      double sum = 0.0;  // a V-long sum: double keeps it exact to fp32
      for (int64_t v = 0; v < vocab; ++v) {
        c[v] = std::exp(c[v] - max_c);
        sum += c[v];
      }
      losses[r] = static_cast<float>(max_c + std::log(sum) - c_label);
      if (!compute_grad) continue;
      const float inv_sum = static_cast<float>(1.0 / sum);
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
