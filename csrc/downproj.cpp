// Ladder down-projection for ladder::downproj (ladder_kernels/ops/downproj.py): z = h @ W^T + b in h's dtype,
// keeping h for dW as a bf16 copy or as per-row int8 codes + fp32 scales (or nothing: "none"), and the backward
// dW = g^T @ h, db = sum_rows g, reading the kept h block by block.
//
// Forward: parallel over blocks of rows; each block's GEMM (ATen/BLAS) and the quantization (or bf16 copy)
// of the same rows run back to back, so h is read while cache-hot. Backward: parallel over column blocks
// of dW; each thread dequantizes [rows x cols] tiles of the kept h into an fp32 scratch tile and
// accumulates g_rows^T @ tile into its own columns of dW (no write races, no full fp32 copy of h).
// int8 codes follow the rule in ops/downproj.py exactly (fp32: inv = 127 / absmax, round half away).
// ATen and the op registry only: torch/extension.h (autograd, nn, pybind) triples the build time.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

namespace {

constexpr int64_t kRowBlock = 64;   // forward rows per GEMM / backward rows per dequantized tile
constexpr int64_t kColBlock = 256;  // backward dW columns per task
constexpr float kAbsmaxFloor = 1e-30f;  // ROW_ABSMAX_FLOOR in ladder_kernels/kernels/contracts.py (checked by tests)

template <typename scalar_t>
void quantize_rows(const scalar_t* h, int64_t rows, int64_t cols, int8_t* codes, float* scales) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = h + r * cols;
    float absmax = 0.f;
    for (int64_t c = 0; c < cols; ++c) absmax = std::max(absmax, std::abs(static_cast<float>(row[c])));
    const bool nonzero = absmax >= kAbsmaxFloor;
    const float inv = nonzero ? 127.f / absmax : 0.f;
    scales[r] = nonzero ? absmax / 127.f : 0.f;
    int8_t* out = codes + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      const float x = static_cast<float>(row[c]) * inv;
      const float q = x >= 0.f ? std::floor(x + 0.5f) : -std::floor(0.5f - x);
      out[c] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, q)));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> downproj(const at::Tensor& h, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias, c10::string_view storage) {
  TORCH_CHECK(h.dim() == 2 && weight.dim() == 2 && h.size(1) == weight.size(1),
              "downproj: h must be [M, D] and weight [d, D], got ", h.sizes(), " and ", weight.sizes());
  TORCH_CHECK(storage == "bf16" || storage == "int8" || storage == "none",
              "downproj: storage must be 'bf16', 'int8' or 'none', got '", storage, "'");
  const bool int8 = storage == "int8";
  const auto dtype = h.scalar_type();
  // A 16-bit h is kept itself (saves_input_itself in ladder_kernels/kernels/contracts.py); "none": no gradient needs h.
  const bool writes_bf16_copy = storage == "bf16" && dtype != at::kBFloat16 && dtype != at::kHalf;
  const int64_t rows = h.size(0), cols = h.size(1), out_cols = weight.size(0);

  const at::Tensor h_c = h.detach().contiguous();
  const at::Tensor w_t = weight.detach().to(dtype).t();  // computed in h's dtype, as W.to(h.dtype) would be
  std::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->detach().to(dtype);
  at::Tensor z = at::empty({rows, out_cols}, h.options());
  at::Tensor saved = int8               ? at::empty({rows, cols}, h.options().dtype(at::kChar))
                    : writes_bf16_copy ? at::empty({rows, cols}, h.options().dtype(at::kBFloat16))
                                       : at::empty({0}, h.options());
  at::Tensor scale = at::empty({int8 ? rows : 0}, h.options().dtype(at::kFloat));

  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;  // OpenMP workers do not inherit the caller's below-autograd dispatch state
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      const at::Tensor h_rows = h_c.narrow(0, r0, n);
      at::Tensor z_rows = z.narrow(0, r0, n);
      if (bias_c.has_value()) {
        at::addmm_out(z_rows, *bias_c, h_rows, w_t);
      } else {
        at::mm_out(z_rows, h_rows, w_t);
      }
      if (int8) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "downproj_quantize", [&] {
          quantize_rows<scalar_t>(h_rows.data_ptr<scalar_t>(), n, cols, saved.data_ptr<int8_t>() + r0 * cols,
                                  scale.data_ptr<float>() + r0);
        });
      } else if (writes_bf16_copy) {
        saved.narrow(0, r0, n).copy_(h_rows);
      }
    }
  });
  return {z, saved, scale};
}

// tile[i, j] = h[r0 + i, c0 + j] as fp32 (int8 codes times their row's scale), tile row stride kColBlock.
template <typename scalar_t>
void load_tile(const scalar_t* h, int64_t stride0, int64_t stride1, const float* scales, int64_t r0, int64_t n,
               int64_t c0, int64_t nc, float* tile) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* row = h + (r0 + i) * stride0 + c0 * stride1;
    const float s = scales != nullptr ? scales[r0 + i] : 1.f;
    float* out = tile + i * kColBlock;
    for (int64_t j = 0; j < nc; ++j) out[j] = static_cast<float>(row[j * stride1]) * s;
  }
}

std::tuple<at::Tensor, at::Tensor> downproj_backward(const at::Tensor& grad_z, const at::Tensor& h_saved,
                                                     const at::Tensor& h_scale, at::ScalarType weight_dtype,
                                                     std::optional<at::ScalarType> bias_dtype) {
  TORCH_CHECK(grad_z.dim() == 2 && h_saved.dim() == 2 && grad_z.size(0) == h_saved.size(0),
              "downproj_backward: grad_z must be [M, d] and h_saved [M, D], got ", grad_z.sizes(), " and ", h_saved.sizes());
  const bool int8 = h_saved.scalar_type() == at::kChar;
  TORCH_CHECK(!int8 || (h_scale.dim() == 1 && h_scale.size(0) == h_saved.size(0) && h_scale.scalar_type() == at::kFloat),
              "downproj_backward: int8 h_saved needs fp32 h_scale [", h_saved.size(0), "], got ", h_scale.sizes());
  const int64_t rows = grad_z.size(0), out_cols = grad_z.size(1), cols = h_saved.size(1);
  const at::Tensor g = grad_z.to(at::kFloat).contiguous();
  const at::Tensor scale = int8 ? h_scale.contiguous() : h_scale;
  at::Tensor grad_w = at::empty({out_cols, cols}, grad_z.options().dtype(at::kFloat));

  const int64_t col_blocks = (cols + kColBlock - 1) / kColBlock;
  at::parallel_for(0, col_blocks, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;  // OpenMP workers do not inherit the caller's below-autograd dispatch state
    at::Tensor tile = at::empty({kRowBlock, kColBlock}, g.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kColBlock, nc = std::min(kColBlock, cols - c0);
      at::Tensor acc = grad_w.narrow(1, c0, nc);
      acc.zero_();
      for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
        const int64_t n = std::min(kRowBlock, rows - r0);
        AT_DISPATCH_ALL_TYPES_AND2(at::kBFloat16, at::kHalf, h_saved.scalar_type(), "downproj_backward_tile", [&] {
          load_tile<scalar_t>(h_saved.data_ptr<scalar_t>(), h_saved.stride(0), h_saved.stride(1),
                              int8 ? scale.data_ptr<float>() : nullptr, r0, n, c0, nc, tile.data_ptr<float>());
        });
        acc.addmm_(g.narrow(0, r0, n).t(), tile.narrow(0, 0, n).narrow(1, 0, nc));
      }
    }
  });
  at::Tensor grad_b = bias_dtype.has_value() ? g.sum(0).to(*bias_dtype) : at::empty({0}, g.options());
  return {grad_w.to(weight_dtype), grad_b};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ladder_cpu, m) {
  m.def("downproj(Tensor h2d, Tensor weight, Tensor? bias, str storage) -> (Tensor, Tensor, Tensor)");
  m.def("downproj_backward(Tensor g2d, Tensor h_saved, Tensor h_scale, ScalarType weight_dtype, ScalarType? bias_dtype) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ladder_cpu, CPU, m) {
  m.impl("downproj", &downproj);
  m.impl("downproj_backward", &downproj_backward);
}
