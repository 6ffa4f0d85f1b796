// Causal self-attention with small heads, for the side network on CPU: ladder::causal_attention
// (ladder_kernels/ops/causal_attention.py). Per query head h and row i, with kv head h / group (grouped-query):
//   s_ij = scale * q_i . k_j (j <= i), p_ij = exp(s_ij - lse_i), out_i = sum_j p_ij v_j, lse_i = logsumexp_j s_ij;
// backward (dO given, D_i = dO_i . out_i): ds_ij = p_ij (dO_i . v_j - D_i), dq_i = scale sum_j ds_ij k_j,
//   dk_j = scale sum_i ds_ij q_i, dv_j = sum_i p_ij dO_i.
// Torch's CPU flash attention tiles for large head dims; at the side's 8 heads of head_dim 8 over 1024 tokens
// its forward and backward took 7 and 22 ms. Here k and v are transposed to [head_dim, T] (padded to 8), so a
// row runs over its keys 8 at a time with one vector op per head dim, and nothing of size T x T is stored.
// The forward is parallel over (batch, q head), the backward over (batch, kv head): dk and dv of a kv head are
// then summed by one thread, over its group's q heads, with no atomics.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "outputs.h"
#include "vec_math.h"

namespace {

constexpr int64_t kLanes = 8;

int64_t padded(int64_t t) { return (t + kLanes - 1) / kLanes * kLanes; }

// x [B, heads, T, hd] (any strides) -> fp32 [B, heads, hd, padded(T)], zero past T.
at::Tensor transposed_padded(const at::Tensor& x) {
  const int64_t T = x.size(2);
  at::Tensor out = at::zeros({x.size(0), x.size(1), x.size(3), padded(T)}, x.options().dtype(at::kFloat));
  out.narrow(3, 0, T).copy_(x.transpose(2, 3));
  return out;
}

// What a row needs: q_i (scaled by `scale`), the head's transposed keys and values, n = i + 1 visible keys,
// and scratch rows of tp floats (kRowsAtOnce of each).
struct Row {
  const float* q;  // [hd], already times scale
  const float* kt;  // [hd, tp]
  const float* vt;  // [hd, tp]
  int64_t hd, tp, n;
  float* p;  // scratch
  float* ds;  // scratch (backward)
};

// ---- portable rows -----------------------------------------------------------------------------------
float forward_row_scalar(const Row& r, float* out) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < r.n; ++j) {
    float s = 0.f;
    for (int64_t d = 0; d < r.hd; ++d) s += r.q[d] * r.kt[d * r.tp + j];
    r.p[j] = s;
    m = std::max(m, s);
  }
  double sum = 0.0;
  for (int64_t j = 0; j < r.n; ++j) sum += (r.p[j] = std::exp(r.p[j] - m));
  for (int64_t d = 0; d < r.hd; ++d) {
    float acc = 0.f;
    for (int64_t j = 0; j < r.n; ++j) acc += r.p[j] * r.vt[d * r.tp + j];
    out[d] = static_cast<float>(acc / sum);
  }
  return m + static_cast<float>(std::log(sum));
}

// dq = scale * sum_j ds_j k_j; dkt[d, j] += ds_j * q_d (q already scaled); dvt[d, j] += p_j dO_d.
void backward_row_scalar(const Row& r, const float* dout, float delta, float lse, float scale, float* dq,
                         float* dkt, float* dvt) {
  for (int64_t j = 0; j < r.n; ++j) {
    float s = 0.f, dp = 0.f;
    for (int64_t d = 0; d < r.hd; ++d) {
      s += r.q[d] * r.kt[d * r.tp + j];
      dp += dout[d] * r.vt[d * r.tp + j];
    }
    r.p[j] = std::exp(s - lse);
    r.ds[j] = r.p[j] * (dp - delta);
  }
  for (int64_t d = 0; d < r.hd; ++d) {
    float acc = 0.f;
    for (int64_t j = 0; j < r.n; ++j) {
      acc += r.ds[j] * r.kt[d * r.tp + j];
      dkt[d * r.tp + j] += r.ds[j] * r.q[d];
      dvt[d * r.tp + j] += r.p[j] * dout[d];
    }
    dq[d] = acc * scale;
  }
}

// ---- AVX2 rows: the same, 8 keys a time, R consecutive rows at once so that each load of k, v, dk, dv serves R
// rows (one row at a time was bound by those loads: 2.4x the time at head_dim 16 for twice the work). Row r of
// the R has q + r hd, n + r keys and scratch p + r tp, ds + r tp; lanes past its n get p = ds = 0 (their k, v are
// padding or later keys).
#ifdef LADDER_VEC_X86
LADDER_AVX2 inline __m256 lanes_below(int64_t count) {  // lane l all-ones where l < count (none if count <= 0)
  return _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

template <int R>
LADDER_AVX2 void forward_rows_avx2(const Row& r, float* out, float* lse) {
  const int64_t np = padded(r.n + R - 1);
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m8[R], sum8[R];
  float sum[R];
  for (int i = 0; i < R; ++i) m8[i] = ninf, sum8[i] = _mm256_setzero_ps();
  for (int64_t j = 0; j < np; j += kLanes) {
    __m256 s[R];
    for (int i = 0; i < R; ++i) s[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < r.hd; ++d) {
      const __m256 kd = _mm256_loadu_ps(r.kt + d * r.tp + j);
      for (int i = 0; i < R; ++i) s[i] = _mm256_fmadd_ps(_mm256_set1_ps(r.q[i * r.hd + d]), kd, s[i]);
    }
    for (int i = 0; i < R; ++i) {
      if (j + kLanes > r.n + i) s[i] = _mm256_blendv_ps(ninf, s[i], lanes_below(r.n + i - j));
      _mm256_storeu_ps(r.p + i * r.tp + j, s[i]);
      m8[i] = _mm256_max_ps(m8[i], s[i]);
    }
  }
  for (int i = 0; i < R; ++i) {
    const __m256 m = _mm256_set1_ps(ladder_vec::horizontal_max(m8[i]));
    float* p = r.p + i * r.tp;
    for (int64_t j = 0; j < np; j += kLanes) {
      __m256 e = ladder_vec::exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + j), m));
      if (j + kLanes > r.n + i) e = _mm256_and_ps(e, lanes_below(r.n + i - j));
      _mm256_storeu_ps(p + j, e);
      sum8[i] = _mm256_add_ps(sum8[i], e);
    }
    sum[i] = ladder_vec::horizontal_sum(sum8[i]);
    lse[i] = _mm256_cvtss_f32(m) + std::log(sum[i]);
  }
  for (int64_t d = 0; d < r.hd; ++d) {
    __m256 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < np; j += kLanes) {
      const __m256 vd = _mm256_loadu_ps(r.vt + d * r.tp + j);
      for (int i = 0; i < R; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(r.p + i * r.tp + j), vd, acc[i]);
    }
    for (int i = 0; i < R; ++i) out[i * r.hd + d] = ladder_vec::horizontal_sum(acc[i]) / sum[i];
  }
}

template <int R>
LADDER_AVX2 void backward_rows_avx2(const Row& r, const float* dout, const float* delta, const float* lse, float scale,
                                    float* dq, float* dkt, float* dvt) {
  const int64_t np = padded(r.n + R - 1);
  for (int64_t j = 0; j < np; j += kLanes) {
    __m256 s[R], dp[R];
    for (int i = 0; i < R; ++i) s[i] = dp[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < r.hd; ++d) {
      const __m256 kd = _mm256_loadu_ps(r.kt + d * r.tp + j), vd = _mm256_loadu_ps(r.vt + d * r.tp + j);
      for (int i = 0; i < R; ++i) {
        s[i] = _mm256_fmadd_ps(_mm256_set1_ps(r.q[i * r.hd + d]), kd, s[i]);
        dp[i] = _mm256_fmadd_ps(_mm256_set1_ps(dout[i * r.hd + d]), vd, dp[i]);
      }
    }
    for (int i = 0; i < R; ++i) {
      __m256 p = ladder_vec::exp_nonpositive(_mm256_sub_ps(s[i], _mm256_set1_ps(lse[i])));
      if (j + kLanes > r.n + i) p = _mm256_and_ps(p, lanes_below(r.n + i - j));
      _mm256_storeu_ps(r.p + i * r.tp + j, p);
      _mm256_storeu_ps(r.ds + i * r.tp + j, _mm256_mul_ps(p, _mm256_sub_ps(dp[i], _mm256_set1_ps(delta[i]))));
    }
  }
  for (int64_t d = 0; d < r.hd; ++d) {
    __m256 qd[R], dod[R], acc[R];
    for (int i = 0; i < R; ++i) {
      qd[i] = _mm256_set1_ps(r.q[i * r.hd + d]);
      dod[i] = _mm256_set1_ps(dout[i * r.hd + d]);
      acc[i] = _mm256_setzero_ps();
    }
    const float* kt = r.kt + d * r.tp;
    float* dk = dkt + d * r.tp;
    float* dv = dvt + d * r.tp;
    for (int64_t j = 0; j < np; j += kLanes) {
      const __m256 kd = _mm256_loadu_ps(kt + j);
      __m256 dk8 = _mm256_loadu_ps(dk + j), dv8 = _mm256_loadu_ps(dv + j);
      for (int i = 0; i < R; ++i) {
        const __m256 ds = _mm256_loadu_ps(r.ds + i * r.tp + j);
        acc[i] = _mm256_fmadd_ps(ds, kd, acc[i]);
        dk8 = _mm256_fmadd_ps(ds, qd[i], dk8);
        dv8 = _mm256_fmadd_ps(_mm256_loadu_ps(r.p + i * r.tp + j), dod[i], dv8);
      }
      _mm256_storeu_ps(dk + j, dk8);
      _mm256_storeu_ps(dv + j, dv8);
    }
    for (int i = 0; i < R; ++i) dq[i * r.hd + d] = ladder_vec::horizontal_sum(acc[i]) * scale;
  }
}
#endif

constexpr int kRowsAtOnce = 4;  // 4 rows: 2 x 4 accumulators + broadcasts fit AVX2's 16 registers

// `count` consecutive rows from `r` (row i: q + i hd, n + i keys), writing out + i hd and lse[i].
void forward_rows([[maybe_unused]] bool avx2, Row r, int64_t count, float* out, float* lse) {
  for (int64_t i = 0; i < count;) {
    int64_t step = 1;
#ifdef LADDER_VEC_X86
    if (avx2) {
      step = i + kRowsAtOnce <= count ? kRowsAtOnce : 1;
      if (step == kRowsAtOnce) forward_rows_avx2<kRowsAtOnce>(r, out, lse);
      else forward_rows_avx2<1>(r, out, lse);
    } else
#endif
      *lse = forward_row_scalar(r, out);
    i += step, r.q += step * r.hd, r.n += step, out += step * r.hd, lse += step;
  }
}

// The same for the backward: dq + i hd written, dkt and dvt summed into.
void backward_rows([[maybe_unused]] bool avx2, Row r, int64_t count, const float* dout, const float* delta, const float* lse,
                   float scale, float* dq, float* dkt, float* dvt) {
  for (int64_t i = 0; i < count;) {
    int64_t step = 1;
#ifdef LADDER_VEC_X86
    if (avx2) {
      step = i + kRowsAtOnce <= count ? kRowsAtOnce : 1;
      if (step == kRowsAtOnce) backward_rows_avx2<kRowsAtOnce>(r, dout, delta, lse, scale, dq, dkt, dvt);
      else backward_rows_avx2<1>(r, dout, delta, lse, scale, dq, dkt, dvt);
    } else
#endif
      backward_row_scalar(r, dout, *delta, *lse, scale, dq, dkt, dvt);
    i += step, r.q += step * r.hd, r.n += step, dout += step * r.hd, delta += step, lse += step, dq += step * r.hd;
  }
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be [B, heads, T, head_dim], got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat, op,
              ": q, k, v must be float32");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3) &&
                  k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              op, ": k and v must be [B, kv_heads, T, head_dim] with heads a multiple of kv_heads, got q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes());
}

std::tuple<at::Tensor, at::Tensor> causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    double scale) {
  check_qkv(q, k, v, "causal_attention");
  const int64_t B = q.size(0), H = q.size(1), KV = k.size(1), T = q.size(2), hd = q.size(3), tp = padded(T);
  const at::Tensor qs = (q * scale).contiguous(), kt = transposed_padded(k), vt = transposed_padded(v);
  at::Tensor out = ladder_out::poisoned_if_asked(at::empty({B, H, T, hd}, q.options()));
  at::Tensor lse = ladder_out::poisoned_if_asked(at::empty({B, H, T}, q.options()));
  const float *qp = qs.data_ptr<float>(), *ktp = kt.data_ptr<float>(), *vtp = vt.data_ptr<float>();
  float *outp = out.data_ptr<float>(), *lsep = lse.data_ptr<float>();
  const bool avx2 = ladder_vec::use_avx2();
  at::parallel_for(0, B * H, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> p(kRowsAtOnce * tp);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t kv_unit = (u / H) * KV + (u % H) / (H / KV);
      const Row r{qp + u * T * hd, ktp + kv_unit * hd * tp, vtp + kv_unit * hd * tp, hd, tp, 1, p.data(), nullptr};
      forward_rows(avx2, r, T, outp + u * T * hd, lsep + u * T);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(const at::Tensor& grad_out,
                                                                         const at::Tensor& q, const at::Tensor& k,
                                                                         const at::Tensor& v, const at::Tensor& out,
                                                                         const at::Tensor& lse, double scale) {
  check_qkv(q, k, v, "causal_attention_backward");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && grad_out.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat,
              "causal_attention_backward: grad_out and out must be float32 of q's shape ", q.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.sizes() == q.sizes().slice(0, 3) && lse.scalar_type() == at::kFloat,
              "causal_attention_backward: lse must be float32 [B, heads, T], got ", lse.sizes());
  const int64_t B = q.size(0), H = q.size(1), KV = k.size(1), T = q.size(2), hd = q.size(3), tp = padded(T);
  const int64_t group = H / KV;
  const at::Tensor qs = (q * scale).contiguous(), kt = transposed_padded(k), vt = transposed_padded(v);
  const at::Tensor dout = grad_out.contiguous(), lse_c = lse.contiguous();
  const at::Tensor delta = (dout * out).sum(-1).contiguous();  // D_i = dO_i . out_i
  at::Tensor dq = ladder_out::poisoned_if_asked(at::empty({B, H, T, hd}, q.options()));
  at::Tensor dkt = at::zeros({B, KV, hd, tp}, q.options()), dvt = at::zeros({B, KV, hd, tp}, q.options());
  const float *qp = qs.data_ptr<float>(), *ktp = kt.data_ptr<float>(), *vtp = vt.data_ptr<float>();
  const float *dop = dout.data_ptr<float>(), *lsep = lse_c.data_ptr<float>(), *deltap = delta.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dktp = dkt.data_ptr<float>(), *dvtp = dvt.data_ptr<float>();
  const bool avx2 = ladder_vec::use_avx2();
  at::parallel_for(0, B * KV, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> p(kRowsAtOnce * tp), ds(kRowsAtOnce * tp);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t kv_off = u * hd * tp;
      for (int64_t h = (u % KV) * group; h < (u % KV + 1) * group; ++h) {
        const int64_t row = ((u / KV) * H + h) * T;  // the head's first row
        const Row r{qp + row * hd, ktp + kv_off, vtp + kv_off, hd, tp, 1, p.data(), ds.data()};
        backward_rows(avx2, r, T, dop + row * hd, deltap + row, lsep + row, static_cast<float>(scale),
                      dqp + row * hd, dktp + kv_off, dvtp + kv_off);
      }
    }
  });
  // dk was summed against the scaled q: dk = scale * sum_i ds_ij q_i already.
  return {dq, dkt.narrow(3, 0, T).transpose(2, 3).contiguous(), dvt.narrow(3, 0, T).transpose(2, 3).contiguous()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ladder_cpu, m) {
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def(
      "causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ladder_cpu, CPU, m) {
  m.impl("causal_attention", &causal_attention);
  m.impl("causal_attention_backward", &causal_attention_backward);
}
