"""The side network's blocks against a plain float64 reference (separate q/k/v, RoPE by rotate-half, explicit
causal softmax attention, GQA by repeating kv heads), forward and gradients, on odd shapes; decoding through the
side KV cache against the full forward; the compute-dtype rule."""

import math

import pytest
import torch
import torch.nn.functional as F

from ladder_kernels.defaults import CPU_BF16_ENV
from ladder_kernels.nn.side import SideBlock, SideKVCache, SideNetwork, SideShape, side_compute_dtype


def _shape(heads=6, kv=2, activation="silu", qkv_bias=True):
    return SideShape(
        hidden_size=40,
        width=20,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=6,
        intermediate_size=34,
        rms_norm_eps=1e-6,
        rope_theta=500.0,
        qkv_bias=qkv_bias,
        activation=activation,
    )


def _randomise(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 and p.numel() == 20 else 0.0))
        for name, buffer in module.named_buffers():
            if name.endswith("inv_freq"):  # per-head frequencies, as a pruned init leaves them
                buffer.copy_(torch.rand(buffer.shape, generator=gen) * 0.9 + 0.05)
    return module


def reference_block(block: SideBlock, s, position_ids, p=None):
    """float64, no cache, causal; p: float64 copies of block's parameters by name (made here when None)."""
    p = p if p is not None else {k: v.detach().double() for k, v in block.named_parameters()}
    attn = block.attn
    h, kv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim

    def norm(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def rope(x, inv_freq):  # x [B, heads, T, hd], inv_freq [heads, hd/2]
        freqs = position_ids[:, None, :, None].double() * inv_freq.double()[None, :, None, :]
        emb = torch.cat((freqs, freqs), -1)
        rotated = torch.cat((-x[..., hd // 2 :], x[..., : hd // 2]), -1)
        return x * emb.cos() + rotated * emb.sin()

    b, t, _ = s.shape
    x = norm(s, p["attn_norm.weight"])
    q = (x @ p["attn.q_proj.weight"].T + p["attn.q_proj.bias"]).view(b, t, h, hd).transpose(1, 2)
    k = (x @ p["attn.k_proj.weight"].T + p["attn.k_proj.bias"]).view(b, t, kv, hd).transpose(1, 2)
    v = (x @ p["attn.v_proj.weight"].T + p["attn.v_proj.bias"]).view(b, t, kv, hd).transpose(1, 2)
    q = rope(q, attn.inv_freq.repeat_interleave(h // kv, 0))
    k = rope(k, attn.inv_freq).repeat_interleave(h // kv, 1)
    v = v.repeat_interleave(h // kv, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h * hd) @ p["attn.o_proj.weight"].T
    s = s + out
    x = norm(s, p["mlp_norm.weight"])
    act = F.silu(x @ p["mlp.gate_proj.weight"].T)
    return s + (act * (x @ p["mlp.up_proj.weight"].T)) @ p["mlp.down_proj.weight"].T


def _rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("heads, kv", [(6, 2), (3, 3)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("native_bf16", ["0", "1"])
def test_block_matches_the_float64_reference_forward_and_backward(monkeypatch, heads, kv, dtype, tol, native_bf16):
    monkeypatch.setenv(CPU_BF16_ENV, native_bf16)  # "1": 16-bit stays 16-bit; "0": the side computes in fp32
    block = _randomise(SideBlock(_shape(heads, kv), dropout=0.3).eval(), seed=heads)
    gen = torch.Generator().manual_seed(7)
    s = torch.randn(3, 7, 20, generator=gen)
    positions = torch.arange(3, 10)[None].expand(3, -1)
    want = reference_block(block, s.double(), positions)
    x = s.to(side_compute_dtype(dtype, s.device), copy=True).requires_grad_()
    got = block(x, positions, None, None, 0)
    assert got.dtype == x.dtype
    assert _rel(got, want) < tol
    # gradients: of the input and of every weight, against float64 autograd through the reference
    grad_out = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    (got.double() * grad_out).sum().backward()
    p64 = {k: v.detach().double().requires_grad_() for k, v in block.named_parameters()}
    x64 = s.double().requires_grad_()
    (reference_block(block, x64, positions, p64) * grad_out).sum().backward()
    assert _rel(x.grad, x64.grad) < tol
    for name, param in block.named_parameters():
        assert param.grad is not None and _rel(param.grad, p64[name].grad) < tol, name


def test_dropout_only_in_training():
    block = _randomise(SideBlock(_shape(), dropout=0.5), seed=1)
    s, positions = torch.randn(2, 5, 20), torch.arange(5)[None]
    with torch.no_grad():
        block.eval()
        a, b = block(s, positions, None, None, 0), block(s, positions, None, None, 0)
        block.train()
        c = block(s, positions, None, None, 0)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def _network(free_blocks=1):
    net = SideNetwork(
        _shape(),
        -1,
        [0, 2],
        free_blocks,
        gate="vector",
        gate_temperature=1.0,
        gate_init=0.5,
        output_mix="vector",
        dropout=0.1,
        init_std=0.1,
        ladder_storage="bf16",
        backend=None,
    )
    return _randomise(net, seed=3).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_token_by_token_through_the_cache_equals_the_full_forward(dtype):
    net = _network()
    gen = torch.Generator().manual_seed(11)
    s0 = torch.randn(2, 9, 20, generator=gen).to(dtype)
    zs = [torch.randn(2, 9, 20, generator=gen).to(dtype) for _ in range(2)]
    positions = torch.arange(9)[None].expand(2, -1)
    with torch.no_grad():
        full = net(s0, zs, positions)
        cache, steps = SideKVCache(len(net.blocks)), []
        steps.append(net(s0[:, :4], [z[:, :4] for z in zs], positions[:, :4], None, cache))
        for t in range(4, 9):
            steps.append(net(s0[:, t : t + 1], [z[:, t : t + 1] for z in zs], positions[:, t : t + 1], None, cache))
    assert cache.get_seq_length() == 9
    assert _rel(torch.cat(steps, 1), full.double()) < 1e-5  # the side computes in fp32 here for both dtypes


def test_compute_dtype_rule(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert side_compute_dtype(torch.bfloat16, cpu) == side_compute_dtype(torch.float16, cpu) == torch.float32
    assert side_compute_dtype(torch.float32, cpu) == torch.float32
    assert side_compute_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert side_compute_dtype(torch.bfloat16, cpu) == torch.bfloat16
