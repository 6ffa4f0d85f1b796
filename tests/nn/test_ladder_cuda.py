"""A LadderModel training step on the GPU path: NF4 backbone, Triton kernels (compiled on CUDA, interpreted on
CPU), AdamW; against the same step on the torch reference backend on CPU. With 2+ GPUs, DDP over NCCL against
one process. bench/gpu_check runs these (`pytest -m gpu`)."""

from __future__ import annotations

import os

import pytest
import torch

from ladder_kernels.nn.config import LadderConfig
from ladder_kernels.nn.ladder import LadderModel
from tests.helpers import DEVICE, rel_err, require_backend, tiny_backbone

pytestmark = pytest.mark.gpu
VOCAB, STEPS, LR = 96, 3, 0.5


def _model(backend: str, device: str, side_seed: int = 0) -> LadderModel:
    torch.manual_seed(side_seed)
    # side_init="random" zeroes up_proj, so only a second step trains everything: STEPS >= 2
    config = LadderConfig(backbone_quant="nf4", side_init="random", init_std=0.05, backend=backend, reduction_factor=4)
    return LadderModel(tiny_backbone("llama", num_layers=2, seed=0), config).to(device)


def _batch(device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, VOCAB, (4, 12), generator=g).to(device)


def _train(model: torch.nn.Module, ids: torch.Tensor, steps: int = STEPS) -> tuple[list[float], dict, dict]:
    """(loss per step, the last step's gradients, the parameters after the last step), on CPU. Plain SGD: its
    update is linear in the gradient, so kernels that agree give parameters that agree (AdamW's normalized step
    would turn rounding noise in a near-zero gradient into a full lr-sized difference)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        trainable = [(n.removeprefix("module."), p) for n, p in model.named_parameters() if p.requires_grad]
        grads = {n: p.grad.detach().cpu() for n, p in trainable if p.grad is not None}
        opt.step()
    return losses, grads, {n: p.detach().cpu() for n, p in trainable}


def _compare(run, reference, tol: float) -> None:
    """Losses and final parameters within tol; gradients within 1e-2: the ladders' dW is computed from the bf16
    copy of each ladder input (LadderConfig's default storage), where a rounding flip is one bf16 ulp (2^-8)."""
    (losses, grads, params), (ref_losses, ref_grads, ref_params) = run, reference
    assert losses == pytest.approx(ref_losses, rel=tol)
    assert grads and sorted(grads) == sorted(ref_grads) and sorted(params) == sorted(ref_params)
    for name, ref in ref_grads.items():
        assert rel_err(grads[name], ref) < 1e-2, name
    for name, ref in ref_params.items():
        assert rel_err(params[name], ref) < tol, name


def test_ladder_training_step_on_the_gpu_path_matches_the_torch_reference():
    require_backend("triton")
    reference = _train(_model("torch", "cpu"), _batch("cpu"))
    model = _model("triton", DEVICE)
    assert next(model.buffers()).device.type == torch.device(DEVICE).type  # the NF4 bytes moved with the model
    run = _train(model, _batch(DEVICE))
    losses = run[0]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]  # the steps train
    # measured on CPU (interpreter, fp32 dots): losses 1e-7, gradients 4e-3, parameters 5e-5. On CUDA the kernels
    # sum in another order and their fp32 dots may go through tf32x3.
    _compare(run, reference, tol=1e-3 if DEVICE == "cuda" else 1e-4)


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model("triton", f"cuda:{rank}", side_seed=rank)  # rank 1 starts elsewhere: DDP broadcasts rank 0's
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
        ids = _batch(f"cuda:{rank}").chunk(world)[rank]
        _, grads, params = _train(ddp, ids)
        if rank == 0:
            torch.save(dict(grads=grads, params=params), out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL data parallel needs 2 or more GPUs")
def test_ddp_over_nccl_matches_one_process(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_nccl_available():
        pytest.fail("this CUDA torch build has no NCCL")
    world = 2
    out = tmp_path / "ddp.pt"
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), str(out)), nprocs=world, join=True)
    ddp = torch.load(out, weights_only=True)
    # one process on the whole batch; each rank's mean loss over its half averages to the same gradient
    _, ref_grads, ref_params = _train(_model("triton", "cuda:0"), _batch("cuda:0"))
    assert ddp["grads"] and sorted(ddp["grads"]) == sorted(ref_grads)
    for name, ref in ref_grads.items():
        assert rel_err(ddp["grads"][name], ref) < 1e-3, name
    for name, ref in ref_params.items():
        assert rel_err(ddp["params"][name], ref) < 1e-3, name
