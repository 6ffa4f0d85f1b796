"""The side network: family-agnostic decoder blocks at width d = D / r, fed by ladders from the backbone.

Wiring (one `SideNetwork`, whatever the backbone family):
    s_0 = downproj_0(h_branch)                       h_branch: the embeddings (plain Ladder) or the output of
                                                     backbone layer L-δ-1 (xLadder, 0-based)
    s_k = block_k(gate_k(s_{k-1}, downproj_k(h_{ladder_sources[k-1]})))   k = 1..n: the ladder-fed blocks
    s_k = block_k(s_{k-1})                           for the δ free blocks that follow (xLadder)
    (in code: blocks[k-1], gates[k-1], ladders[k-1]; downproj_0 is branch_proj)
    out = a ⊙ h_final + up_proj(norm(s))             (`mix`; output_mix "vector"/"scalar";
                                                     "side_only": up_proj(norm(s)))

Side parameters are float32 master weights, cast to the compute dtype where used (bf16 compute works; on a CPU
without native bf16 the side stream runs in fp32, see side_compute_dtype). Blocks: RMSNorm, RoPE attention through
scaled_dot_product_attention with the side's own KV cache (causal calls over a whole sequence on CPU go through
ops.causal_attention, made for these small heads), a gated MLP (SwiGLU, or the backbone's gate activation,
e.g. Gemma's tanh-GELU). q, k, v (and the MLP's gate and up) are one matmul each: a generated token runs every
block at M=1, where the cost is the number of ops, not their FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from ladder_kernels.backends import cpu_has_native_bf16, resolve_backend
from ladder_kernels.nn.backbone import BackboneSpec
from ladder_kernels.nn.config import LadderConfig
from ladder_kernels.ops.causal_attention import causal_attention
from ladder_kernels.ops.downproj import downproj

BRANCH = "branch"  # SideNetwork.project's source for the branch point (the others are ladder numbers)


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear with float32 master weights cast to the activations' dtype."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def side_compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the side stream computes in for activations of `dtype` on `device`: theirs, except 16-bit on a
    CPU without native bf16, where it is fp32. There 16-bit matmuls are emulated: a [1, 72] x [72, 192] linear
    takes 27 us in bf16 against 7 us in fp32 (measured, 2 AVX2 cores), and the side's fp32 master weights need
    no cast. The side's activations are D/r wide, so the fp32 copy costs little memory."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_native_bf16():
        return torch.float32
    return dtype


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    return F.dropout(x, p, training=True) if training and p > 0 else x  # no call at all in eval (decode)


@dataclass(frozen=True)
class SideShape:
    """Sizes of the side network, resolved from the backbone's config and the LadderConfig."""

    hidden_size: int  # D, the backbone's width
    width: int  # d = D // r
    num_heads: int
    num_kv_heads: int
    head_dim: int  # even (rotary pairs)
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    activation: str = "silu"  # the gated MLP's activation, a transformers ACT2FN name (the backbone's)


class SideRMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).to(x.dtype)  # fp32 statistics


class SideKVCache:
    """The side network's KV cache: post-RoPE keys and values per block, [B, kv_heads, T, head_dim]."""

    def __init__(self, num_blocks: int):
        self.keys: list[Optional[Tensor]] = [None] * num_blocks
        self.values: list[Optional[Tensor]] = [None] * num_blocks

    def get_seq_length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, index: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[index] is not None:
            k = torch.cat((self.keys[index], k), dim=2)
            v = torch.cat((self.values[index], v), dim=2)
        self.keys[index], self.values[index] = k, v
        return k, v


# ops.causal_attention against SDPA's CPU flash, forward + backward over 1024 tokens: 0.34x the time at head_dim 8,
# 0.87x at 16, 1.17x at 32 (bench/results/side_attention_cpu.md), so it takes the small heads only.
CPU_CAUSAL_ATTENTION_MAX_HEAD_DIM = 16


def _has_cpu_causal_attention(device: torch.device, head_dim: int) -> bool:
    return (
        device.type == "cpu"
        and head_dim <= CPU_CAUSAL_ATTENTION_MAX_HEAD_DIM
        and resolve_backend(device, None, "side attention", "causal_attention") == "cpu"
    )


class SideAttention(nn.Module):
    """Multi-head (grouped-query) attention with RoPE. inv_freq is per kv head: a pruned init keeps each head's
    own rotary pairs, so each head keeps the frequencies those pairs had in the backbone."""

    def __init__(self, shape: SideShape):
        super().__init__()
        h, kv, hd, d = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.width
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.q_proj = nn.Linear(d, h * hd, bias=shape.qkv_bias)
        self.k_proj = nn.Linear(d, kv * hd, bias=shape.qkv_bias)
        self.v_proj = nn.Linear(d, kv * hd, bias=shape.qkv_bias)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv_freq.expand(kv, -1).clone())  # [kv_heads, hd/2], saved

    def _rope(self, qk: Tensor, position_ids: Tensor) -> Tensor:
        """RoPE on q's and k's heads at once: qk [B, heads + kv_heads, T, hd] (q's heads first), computed in fp32
        and returned in qk's dtype. Query head j rotates with kv head j // group's frequencies."""
        kv, half = self.num_kv_heads, self.head_dim // 2
        group = self.num_heads // kv
        inv_freq = torch.cat((self.inv_freq[:, None].expand(kv, group, half).reshape(-1, half), self.inv_freq))
        freqs = position_ids[:, None, :, None].float() * inv_freq[None, :, None, :]  # [B, heads + kv, T, hd/2]
        cos, sin = freqs.cos(), freqs.sin()
        xf = qk.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(qk.dtype)

    def forward(
        self, x: Tensor, position_ids: Tensor, mask: Optional[Tensor], cache: Optional[SideKVCache], index: int
    ) -> Tensor:
        b, t, _ = x.shape
        h, kv = self.num_heads, self.num_kv_heads
        weight = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        bias = None if self.q_proj.bias is None else torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias))
        qkv = _linear(x, weight, bias).view(b, t, h + 2 * kv, self.head_dim).transpose(1, 2)
        qk = self._rope(qkv[:, : h + kv], position_ids)
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kv :]
        if cache is not None:
            k, v = cache.update(index, k, v)
        if mask is None and t > 1 and k.shape[2] == t and _has_cpu_causal_attention(q.device, self.head_dim):
            out = causal_attention(q, k, v)  # fp32 inside
            return _linear(out.transpose(1, 2).reshape(b, t, -1), self.o_proj.weight)
        dtype = q.dtype
        if q.device.type == "cpu" and dtype != torch.float32:
            # CPU flash attention is several times slower in 16-bit than in fp32 (measured, torch 2.13); the
            # side's q, k, v are small (width D/r), so upcasting them costs little.
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, enable_gqa=h != kv
        ).to(dtype)
        return _linear(out.transpose(1, 2).reshape(b, t, -1), self.o_proj.weight)


class SideMLP(nn.Module):
    def __init__(self, shape: SideShape):
        super().__init__()
        d, i = shape.width, shape.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        self.act = ACT2FN[shape.activation]

    def forward(self, x: Tensor) -> Tensor:
        gate, up = _linear(x, torch.cat((self.gate_proj.weight, self.up_proj.weight))).chunk(2, dim=-1)
        return _linear(self.act(gate) * up, self.down_proj.weight)


class SideBlock(nn.Module):
    """Pre-norm decoder block at the side width."""

    def __init__(self, shape: SideShape, dropout: float):
        super().__init__()
        self.attn_norm = SideRMSNorm(shape.width, shape.rms_norm_eps)
        self.attn = SideAttention(shape)
        self.mlp_norm = SideRMSNorm(shape.width, shape.rms_norm_eps)
        self.mlp = SideMLP(shape)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, s: Tensor, position_ids: Tensor, mask: Optional[Tensor], cache: Optional[SideKVCache], index: int
    ) -> Tensor:
        p, training = self.dropout.p, self.training
        s = s + _dropout(self.attn(self.attn_norm(s), position_ids, mask, cache, index), p, training)
        return s + _dropout(self.mlp(self.mlp_norm(s)), p, training)


class LadderGate(nn.Module):
    """s = μ·s + (1-μ)·z with μ = sigmoid(α/T) ("scalar": one α; "vector": one per channel); "none": s + z."""

    def __init__(self, mode: str, width: int, temperature: float, init: float):
        super().__init__()
        self.mode, self.temperature = mode, temperature
        if mode == "none":
            self.alpha = None
        else:
            # "scalar": shape [1], not 0-dim: FSDP2's fully_shard cannot shard a 0-dim parameter
            self.alpha = nn.Parameter(torch.full((1,) if mode == "scalar" else (width,), float(init)))

    def mu(self) -> Tensor:
        return torch.sigmoid(self.alpha / self.temperature)

    def forward(self, s: Tensor, z: Tensor) -> Tensor:
        if self.alpha is None:
            return s + z
        return torch.lerp(z, s, self.mu().to(s.dtype))  # z + μ (s - z) = μ s + (1 - μ) z


class SideNetwork(nn.Module):
    """Ladders (down-projections), gates, side blocks and the output mix; see the module docstring.

    branch_source: -1 for the embeddings (the input of backbone layer 0), else the backbone layer whose output
    starts the side stream. ladder_sources: the backbone layers (0-based) feeding the ladder blocks, in order.
    num_free_blocks: xLadder's blocks without a ladder, after the ladder blocks.
    """

    def __init__(
        self,
        shape: SideShape,
        branch_source: int,
        ladder_sources: list[int],
        num_free_blocks: int,
        *,
        gate: str,
        gate_temperature: float,
        gate_init: float,
        output_mix: str,
        dropout: float,
        init_std: float,
        ladder_storage: str,
        backend: Optional[str],
        checkpointing: bool = False,
        ladder_norm: str = "none",
    ):
        super().__init__()
        self.shape, self.checkpointing = shape, checkpointing
        self.branch_source, self.ladder_sources, self.num_free_blocks = (
            branch_source,
            list(ladder_sources),
            num_free_blocks,
        )
        self.ladder_storage, self.backend, self.output_mix = ladder_storage, backend, output_mix
        self.ladder_norm = ladder_norm
        d, D = shape.width, shape.hidden_size
        # branch_proj starts the side stream from the branch point; ladders[k] feeds block k.
        self.branch_proj = nn.Parameter(torch.empty(d, D))
        self.ladders = nn.ParameterList([nn.Parameter(torch.empty(d, D)) for _ in ladder_sources])
        self.gates = nn.ModuleList([LadderGate(gate, d, gate_temperature, gate_init) for _ in ladder_sources])
        self.blocks = nn.ModuleList([SideBlock(shape, dropout) for _ in range(len(ladder_sources) + num_free_blocks)])
        self.norm = SideRMSNorm(d, shape.rms_norm_eps)
        self.up_proj = nn.Linear(d, D, bias=False)
        self.mix_weight = (
            None if output_mix == "side_only" else nn.Parameter(torch.ones((1,) if output_mix == "scalar" else (D,)))
        )  # [1]: see LadderGate
        self.init_random_(init_std)

    # --- structure -------------------------------------------------------------------------------------
    def connection_map(self) -> list[Optional[int]]:
        """For each side block, the backbone layer (0-based) whose output it takes through its ladder; None for
        xLadder's free blocks."""
        return self.ladder_sources + [None] * self.num_free_blocks

    @torch.no_grad()
    def init_random_(self, std: float) -> None:
        """Normal(0, std) projections, unit norms; ladders scaled to keep h's magnitude; up_proj at 0 when the
        output mixes in the backbone (so step 0 is the backbone), random otherwise."""
        for projection in self.projections():
            nn.init.normal_(projection, std=1.0 / math.sqrt(self.shape.hidden_size))
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, SideRMSNorm):
                module.weight.fill_(1.0)
        self.norm.weight.fill_(1.0)
        if self.mix_weight is None:
            nn.init.normal_(self.up_proj.weight, std=std)
        else:
            self.up_proj.weight.zero_()

    # --- forward ---------------------------------------------------------------------------------------
    def projections(self) -> list[nn.Parameter]:
        """Every down-projection from the backbone: branch_proj, then the ladders."""
        return [self.branch_proj, *self.ladders]

    def project(self, source, h: Tensor) -> Tensor:
        """z = W h (ladder_norm 'rms': W h / rms(h)) for source BRANCH (branch_proj) or ladder k (ladders[k]): h
        [..., D] (from the no-grad backbone) -> [..., d]; keeps h for dW in the configured storage."""
        weight = self.branch_proj if source == BRANCH else self.ladders[source]
        z = downproj(h, weight, storage=self.ladder_storage, backend=self.backend)
        if self.ladder_norm == "rms":
            # W (h / r) = (W h) / r: scaling z keeps h itself as the saved input (no normalised copy, the int8
            # path unchanged), and autograd scales dW's rows the same way. h is a constant here (no grad).
            inv_rms = torch.rsqrt(h.detach().float().pow(2).mean(-1, keepdim=True) + self.shape.rms_norm_eps)
            z = z * inv_rms.to(z.dtype)
        return z

    def _gated_block(
        self,
        k: int,
        s: Tensor,
        z: Optional[Tensor],
        position_ids: Tensor,
        mask: Optional[Tensor],
        cache: Optional[SideKVCache] = None,
    ) -> Tensor:
        if z is not None:
            s = self.gates[k](s, z)
        return self.blocks[k](s, position_ids, mask, cache, k)

    def forward(
        self,
        s0: Tensor,
        ladder_inputs: list[Tensor],
        position_ids: Tensor,
        mask: Optional[Tensor] = None,
        cache: Optional[SideKVCache] = None,
    ) -> Tensor:
        """The side stream: s0 = project(BRANCH, h_branch), ladder_inputs[k] = project(k, h) -> s [B, T, d].

        mask: bool [B, 1, T, T_past + T] (True = attend), or None for plain causal attention without a cache.
        """
        if len(ladder_inputs) != len(self.ladder_sources):
            raise ValueError(
                f"SideNetwork: expected {len(self.ladder_sources)} ladder inputs, got {len(ladder_inputs)}"
            )
        recompute = self.checkpointing and cache is None and torch.is_grad_enabled()
        dtype = side_compute_dtype(s0.dtype, s0.device)
        s = s0.to(dtype)
        for k in range(len(self.blocks)):
            z = ladder_inputs[k].to(dtype) if k < len(ladder_inputs) else None
            if recompute:
                s = checkpoint(self._gated_block, k, s, z, position_ids, mask, use_reentrant=False)
            else:
                s = self._gated_block(k, s, z, position_ids, mask, cache)
        return s

    def mix(self, s: Tensor, h_final: Tensor) -> Tensor:
        """The hidden state the frozen lm_head reads: a ⊙ h_final + up_proj(norm(s)) (up_proj(norm(s)) for
        side_only), in h_final's dtype. Any leading shape: callers pass only the rows they need."""
        side_out = _linear(self.norm(s), self.up_proj.weight).to(h_final.dtype)
        if self.mix_weight is None:
            return side_out
        return h_final * self.mix_weight.to(h_final.dtype) + side_out


def attention_mask_for(
    key_padding: Optional[Tensor], query_len: int, past_len: int, device: torch.device
) -> Optional[Tensor]:
    """Bool [B, 1, Tq, past+Tq] mask (True = attend): causal, padded keys masked. Each query may always see
    itself, so rows of padded queries stay finite (they are ignored anyway). None when no mask is needed:
    no padding and either no past (plain causal) or a single query (it sees everything)."""
    if key_padding is None and (past_len == 0 or query_len == 1):
        return None
    total = past_len + query_len
    q_pos = torch.arange(past_len, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if key_padding is not None:
        if key_padding.shape[-1] != total:
            raise ValueError(
                f"attention_mask covers {key_padding.shape[-1]} positions, expected {total} (past {past_len} + new "
                f"{query_len})"
            )
        mask = mask & key_padding.bool()[:, None, None, :]
    return mask | (k_pos == q_pos)[None, None]


# --- shape and wiring from the backbone and the LadderConfig -----------------------------------------------
def side_shape(spec: BackboneSpec, config: LadderConfig) -> SideShape:
    D, r = spec.hidden_size, config.reduction_factor
    width = D // r
    if width < 1:
        raise ValueError(f"LadderConfig.reduction_factor {r} is larger than the backbone's hidden_size {D}")
    side_heads = config.side_num_heads or spec.num_heads
    side_kv = config.side_num_kv_heads or (spec.num_kv_heads if config.side_num_heads is None else side_heads)
    if side_heads % side_kv:
        raise ValueError(
            f"side attention: num_kv_heads {side_kv} must divide num_heads {side_heads} (set side_num_kv_heads)"
        )
    if spec.activation not in ACT2FN:
        raise ValueError(
            f"side network: the backbone's activation {spec.activation!r} is not a transformers activation name"
        )
    return SideShape(
        hidden_size=D,
        width=width,
        num_heads=side_heads,
        num_kv_heads=side_kv,
        head_dim=config.side_head_dim or max(2, (spec.head_dim // r) // 2 * 2),
        intermediate_size=config.side_intermediate_size or max(1, spec.intermediate_size // r),
        rms_norm_eps=spec.rms_norm_eps,
        rope_theta=spec.rope_theta,
        qkv_bias=spec.qkv_bias,
        activation=spec.activation,
    )


def side_wiring(num_layers: int, config: LadderConfig) -> tuple[int, list[int], int]:
    """(branch_source, ladder_sources, num_free_blocks); see SideNetwork."""
    delta = config.xladder_depth
    if delta:
        if delta > num_layers:
            raise ValueError(f"LadderConfig.xladder_depth {delta} exceeds the backbone's {num_layers} layers")
        return num_layers - delta - 1, list(range(num_layers - delta, num_layers)), delta
    layers = config.ladder_layers if config.ladder_layers is not None else list(range(num_layers))
    if layers[-1] >= num_layers:
        raise ValueError(
            f"LadderConfig.ladder_layers {layers} names layers beyond the backbone's {num_layers} (0-based)"
        )
    return -1, list(layers), 0


def side_network(spec: BackboneSpec, config: LadderConfig) -> SideNetwork:
    """The SideNetwork `config` builds over the backbone `spec` describes (randomly initialised; on the current
    default device, so under torch.device("meta") it only counts parameters)."""
    branch, sources, free = side_wiring(spec.num_layers, config)
    return SideNetwork(
        side_shape(spec, config),
        branch,
        sources,
        free,
        gate=config.gate,
        gate_temperature=config.gate_temperature,
        gate_init=config.gate_init,
        output_mix=config.output_mix,
        dropout=config.dropout,
        init_std=config.init_std,
        ladder_storage=config.ladder_storage,
        ladder_norm=config.ladder_norm,
        backend=config.backend,
        checkpointing=config.side_checkpointing,
    )
