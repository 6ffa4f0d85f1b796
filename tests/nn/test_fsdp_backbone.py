"""Sharding the frozen NF4 backbone with FSDP2 (`fully_shard`), as bitsandbytes' quant_storage allows.

`make_backbone_shardable_` stores each NF4Linear's packed bytes as a frozen Parameter viewed as a float dtype
(FSDP2 shards Parameters, not buffers). One process: results are bit-identical to the uint8 buffers. Two
processes (CPU, gloo): each backbone decoder layer, each side block and the LadderModel root sharded; training on
a split global batch ends where one unsharded process ends, and each rank holds about half of the NF4 bytes.
"""

from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ladder_kernels.nn.config import LadderConfig
from ladder_kernels.nn.ladder import LadderModel
from ladder_kernels.nn.nf4_linear import NF4Linear, make_backbone_shardable_
from tests.helpers import rel_err, tiny_backbone
from tests.train.test_distributed import _train  # the same AdamW loop as the other 2-process tests

WORLD = 2
GLOBAL_BATCH, SEQ = 4, 10
# Odd-ish shapes: hidden 30 (3 heads of 10, 1 kv head), intermediate 45. Blocks of 64 straddle rows, and the
# packed byte counts (450, 150, 675) are not all multiples of 2 or 4, so bf16 and fp32 storage need padding.
ODD = dict(hidden_size=30, intermediate_size=45, num_heads=3, num_kv_heads=1)


def _model(side_seed: int = 0) -> LadderModel:
    torch.manual_seed(side_seed)
    config = LadderConfig(backbone_quant="nf4", side_init="random", init_std=0.05, backend="torch", reduction_factor=2)
    return LadderModel(tiny_backbone("llama", num_layers=2, seed=0, **ODD), config)


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randint(3, 96, (GLOBAL_BATCH, SEQ), generator=g)


def _nf4_layers(model: nn.Module) -> list[NF4Linear]:
    return [m for m in model.modules() if isinstance(m, NF4Linear)]


def _nf4_bytes(model: nn.Module) -> torch.Tensor:
    """All NF4 bytes of the backbone (uint8, unpadded, full even when sharded)."""
    out = []
    for m in _nf4_layers(model):
        p = m.packed.full_tensor() if hasattr(m.packed, "full_tensor") else m.packed
        out.append(p.detach().view(torch.uint8).reshape(-1)[: m.packed_nbytes])
    return torch.cat(out)


def _side_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


# --- one process ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage_dtype", [torch.bfloat16, torch.float32])
def test_shardable_backbone_is_exact(storage_dtype):
    ref, model = _model(), _model()
    original = _nf4_bytes(ref)
    assert make_backbone_shardable_(model, storage_dtype) == 14  # 7 per decoder layer; lm_head stays dense
    padded = 0
    for m in _nf4_layers(model):
        assert isinstance(m.packed, nn.Parameter) and m.packed.dtype == storage_dtype and not m.packed.requires_grad
        assert (
            m.packed.numel() * storage_dtype.itemsize
            == -(-m.packed_nbytes // storage_dtype.itemsize) * storage_dtype.itemsize
        )
        padded += m.packed.numel() * storage_dtype.itemsize != m.packed_nbytes
        assert m.absmax.dtype == torch.uint8 and "absmax" in dict(m.named_buffers())  # metadata stay buffers
    assert padded > 0  # the odd shapes exercise the padding
    if storage_dtype == torch.bfloat16:  # some byte pairs are NaN bit patterns: they must survive untouched
        assert any(torch.isnan(m.packed).any() for m in _nf4_layers(model))
    assert torch.equal(_nf4_bytes(model), original)
    names = {n for n, _ in model.named_parameters()}
    assert "backbone.model.layers.0.mlp.down_proj.packed" in names and not any(
        n.startswith("side.") for n in names if "packed" in n
    )
    assert all(not p.requires_grad for p in model.backbone.parameters())

    ids = _batch()
    logits_ref, logits = ref(input_ids=ids).logits, model(input_ids=ids).logits
    ref(input_ids=ids, labels=ids).loss.backward()
    model(input_ids=ids, labels=ids).loss.backward()
    assert torch.equal(logits, logits_ref)
    grads_ref = {n: p.grad for n, p in ref.side.named_parameters() if p.grad is not None}
    grads = {n: p.grad for n, p in model.side.named_parameters() if p.grad is not None}
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    assert all(torch.equal(grads[n], grads_ref[n]) for n in grads)


@pytest.mark.parametrize("shape", [(3, 3), (5, 7), (4, 64)])  # 5, 18 and 128 bytes
@pytest.mark.parametrize("storage_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nf4_linear_shardable_padding_and_casts(shape, storage_dtype):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    ref, layer = NF4Linear.from_linear(linear), NF4Linear.from_linear(linear)
    nbytes = ref.packed.numel()
    layer.make_shardable_(storage_dtype)
    assert layer.packed.numel() == -(-nbytes // storage_dtype.itemsize) and layer.packed_nbytes == nbytes
    assert torch.equal(layer.packed_bytes, ref.packed) and layer.storage_dtype == storage_dtype
    x = torch.randn(2, 3, shape[1], requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = layer(x), ref(x_ref)
    out.sum().backward()
    out_ref.sum().backward()
    assert torch.equal(out, out_ref) and torch.equal(x.grad, x_ref.grad)
    # a dtype cast of the model moves the bytes as bytes (it would otherwise convert them as numbers)
    layer.to(torch.float64)
    layer.half()
    assert layer.packed.dtype == storage_dtype and torch.equal(layer.packed_bytes, ref.packed)
    assert isinstance(layer.packed, nn.Parameter) and not layer.packed.requires_grad
    # converting again (another storage dtype) keeps the bytes
    layer.make_shardable_(torch.bfloat16)
    assert torch.equal(layer.packed_bytes, ref.packed)


def test_compute_dtype_cast_skips_shardable_bytes():
    backbone = tiny_backbone("llama", num_layers=2, seed=0, **ODD)
    from ladder_kernels.nn.nf4_linear import quantize_model_

    quantize_model_(backbone)
    make_backbone_shardable_(backbone, torch.float32)
    original = _nf4_bytes(backbone)
    model = LadderModel(backbone, LadderConfig(backbone_quant="nf4", compute_dtype="bfloat16", backend="torch"))
    assert torch.equal(_nf4_bytes(model), original)
    assert model.backbone.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "bad", [torch.uint8, torch.int32, torch.bool, torch.float64, torch.float8_e4m3fn, "bfloat16", None]
)
def test_bad_storage_dtype_names_the_argument(bad):
    model = _model()
    with pytest.raises((TypeError, ValueError), match="storage_dtype"):
        make_backbone_shardable_(model, bad)
    layer = _nf4_layers(model)[0]
    with pytest.raises((TypeError, ValueError), match="storage_dtype"):
        layer.make_shardable_(bad)
    assert layer.packed.dtype == torch.uint8  # nothing converted


def test_bitsandbytes_layers_are_refused():
    bnb = pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="Linear4bit"):
        make_backbone_shardable_(nn.Sequential(bnb.nn.Linear4bit(64, 32, quant_type="nf4")))


# --- two processes, gloo --------------------------------------------------------------------------------------


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a rank that fails mid-collective must not leave the other waiting for gloo's default 30 minutes
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        model = _model()
        make_backbone_shardable_(model, torch.bfloat16)
        mesh = init_device_mesh("cpu", (WORLD,))
        # Each backbone decoder layer: its NF4 bytes (and its frozen norms) are all-gathered just for its forward.
        for layer in model.backbone.model.layers:
            fully_shard(layer, mesh=mesh)
        for block in model.side.blocks:
            fully_shard(block, mesh=mesh)
        # The root takes the rest (ladders, mix, embeddings, final norm, lm_head): it spans the whole forward.
        fully_shard(model, mesh=mesh)
        layers = _nf4_layers(model)
        sharded = all(isinstance(m.packed, DTensor) for m in layers)
        local_bytes = sum(m.packed.to_local().numel() * m.packed.element_size() for m in layers)
        total_bytes = sum(m.packed.numel() * m.packed.element_size() for m in layers)

        def global_mean(loss):
            loss = loss.clone()
            dist.all_reduce(loss)
            return loss.item() / WORLD

        losses, _ = _train(model, _batch().chunk(WORLD)[rank], global_mean)
        result = dict(
            params=_side_params(model),
            losses=losses,
            nf4=_nf4_bytes(model),
            sharded=sharded,
            resharded=all(isinstance(m.packed, DTensor) for m in layers),
            local_bytes=local_bytes,
            total_bytes=total_bytes,
        )
    except Exception:  # noqa: BLE001 - recorded for the test to report
        result = dict(error=traceback.format_exc())
    try:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_backbone_matches_single_process(tmp_path):
    reference = _model()
    initial, original = _side_params(reference), _nf4_bytes(reference)
    losses, _ = _train(reference, _batch(), float)
    single = _side_params(reference)

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r, run in enumerate(runs):
        assert "error" not in run, f"rank {r}:\n{run['error']}"

    flat = lambda d: torch.cat([d[k].reshape(-1).double() for k in sorted(d)])  # noqa: E731
    run = runs[0]
    assert sorted(run["params"]) == sorted(single)
    moved = rel_err(flat(single), flat(initial))
    diff = rel_err(flat(run["params"]), flat(single))
    worst = max(rel_err(run["params"][k], single[k]) for k in single)
    total = run["total_bytes"]
    print(
        f"\nFSDP2 backbone x{WORLD}: side params rel diff {diff:.2e} (worst tensor {worst:.2e}, moved {moved:.2e}); "
        f"losses {run['losses']} vs {losses}; NF4 storage bytes per rank {[r['local_bytes'] for r in runs]} of {total} "
        f"({sum(m.packed_nbytes for m in _nf4_layers(reference))} unpadded)"
    )
    assert moved > 1e-3
    assert diff < 1e-4 and worst < 1e-4
    assert run["losses"] == pytest.approx(losses, rel=1e-5)
    # the bytes were sharded (and resharded after each forward), never changed, and split about evenly
    for r in runs:
        assert r["sharded"] and r["resharded"] and torch.equal(r["nf4"], original)
        assert r["total_bytes"] == total and abs(r["local_bytes"] - total / WORLD) <= 0.02 * total
    assert sum(r["local_bytes"] for r in runs) == total
