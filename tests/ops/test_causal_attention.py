"""causal_attention: the C++ kernel (its AVX2 and portable loops) and the torch reference against float64 math,
forward and gradients, on odd and ragged lengths, grouped-query heads and several head dims, outputs poisoned
first; the public entry's dtypes and errors; SDPA agreement; the side network takes it on CPU."""

import math

import pytest
import torch
import torch.nn.functional as F

from ladder_kernels.defaults import POISON_OUTPUTS_ENV
from ladder_kernels.ops.causal_attention import causal_attention
from tests.helpers import forced_isa, rel_err, require_backend

BACKENDS = ["torch", "cpu"]
# (B, heads, kv_heads, T, head_dim): T below, at and across the 8-key vectors, GQA, head dims not a multiple of 8
SHAPES = [(1, 1, 1, 1, 8), (2, 4, 2, 13, 8), (1, 3, 1, 37, 5), (2, 2, 1, 9, 16), (1, 8, 8, 130, 8), (1, 6, 3, 64, 12)]


def float64_attention(q, k, v):
    """Causal GQA attention in float64 by the definition (no logsumexp trick, no shared code with the op)."""
    H, KV, T = q.shape[1], k.shape[1], q.shape[2]
    k, v = (t.double().repeat_interleave(H // KV, dim=1) for t in (k, v))
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    w = torch.where(visible, torch.exp(s - s.amax(-1, keepdim=True)), 0.0)
    return (w / w.sum(-1, keepdim=True)) @ v


def inputs(B, H, KV, T, hd, dtype=torch.float32, spread=1.0):
    make = lambda heads: (torch.randn(B, heads, T, hd) * spread).to(dtype).requires_grad_()  # noqa: E731
    return make(H), make(KV), make(KV)


@pytest.mark.parametrize("isa", ["auto", "scalar"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_float64(backend, shape, isa, monkeypatch):
    require_backend(backend)
    monkeypatch.setenv(POISON_OUTPUTS_ENV, "1")
    q, k, v = inputs(*shape, spread=2.0)  # scores of several units: a peaked softmax, not a uniform one
    grad_out = torch.randn(q.shape)
    with forced_isa(isa):
        out = causal_attention(q, k, v, backend=backend)
        out.backward(grad_out)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = float64_attention(qd, kd, vd)
    ref.backward(grad_out.double())
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-5
    for name, got, want in (("q", q.grad, qd.grad), ("k", k.grad, kd.grad), ("v", v.grad, vd.grad)):
        assert rel_err(got, want) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_compute_in_fp32_and_return_their_dtype(dtype):
    require_backend("cpu")
    q, k, v = inputs(1, 4, 2, 21, 8, dtype)
    out = causal_attention(q, k, v)
    out.float().pow(2).sum().backward()
    ref = float64_attention(q.detach(), k.detach(), v.detach())
    assert out.dtype == dtype and q.grad.dtype == dtype and k.grad.dtype == dtype
    assert rel_err(out, ref) < {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


def test_matches_sdpa_on_non_contiguous_views():
    """The side's q, k, v are transposed views of one qkv matmul, not contiguous tensors."""
    require_backend("cpu")
    qkv = torch.randn(2, 50, 4 + 2 * 2, 8).transpose(1, 2)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(causal_attention(q, k, v), want) < 1e-5


def test_side_attention_takes_the_cpu_kernel_over_a_sequence(monkeypatch):
    """SideAttention on CPU calls the op for a causal sequence without a mask (training, prefill) and SDPA
    otherwise, with the same result either way."""
    require_backend("cpu")
    from ladder_kernels.nn import side

    calls = []
    real = side.causal_attention
    monkeypatch.setattr(side, "causal_attention", lambda *a: calls.append(1) or real(*a))
    shape = side.SideShape(
        hidden_size=128,
        width=32,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        qkv_bias=False,
    )
    attn = side.SideAttention(shape)
    x = torch.randn(2, 19, 32)
    pos = torch.arange(19)[None].expand(2, -1)
    got = attn(x, pos, None, None, 0)
    assert calls == [1]
    mask = torch.ones(19, 19, dtype=torch.bool).tril()[None, None]
    want = attn(x, pos, mask, None, 0)  # an explicit mask goes to SDPA
    assert calls == [1] and rel_err(got, want) < 1e-5


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(1, 2, 5, 8), torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8)), "multiple of kv_heads"),
        ((torch.randn(1, 2, 5, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)), r"\[1, kv_heads, 5, 8\]"),
        ((torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)), "q must be 4-D"),
        ((torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8).double(), torch.randn(1, 1, 5, 8)), "one float dtype"),
    ],
)
def test_bad_inputs_name_the_argument(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        causal_attention(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """Schemas, fake shapes and autograd registration of both ops agree with what the kernels do."""
    require_backend(backend)
    q, k, v = (t.detach().requires_grad_() for t in inputs(1, 4, 2, 11, 8))
    torch.library.opcheck(torch.ops.ladder.causal_attention.default, (q, k, v, 0.35, backend))
    out, lse = torch.ops.ladder.causal_attention(q, k, v, 0.35, backend)
    grad = torch.randn(q.shape)
    torch.library.opcheck(
        torch.ops.ladder.causal_attention_backward.default,
        (grad, q.detach(), k.detach(), v.detach(), out.detach(), lse, 0.35, backend),
    )
