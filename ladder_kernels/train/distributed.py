"""Data parallel under torchrun / accelerate launch (WORLD_SIZE > 1): one process group (gloo on CPU, nccl on
CUDA), the model in DistributedDataParallel, each process taking its share of every micro-batch, and rank 0
alone evaluating, logging and writing the run folder."""

from __future__ import annotations

import contextlib
import os

import torch


def device() -> torch.device:
    return torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    )  # under torchrun: this process's GPU (set_device)


@contextlib.contextmanager
def distributed_from_env():
    """The process group of a torchrun / accelerate launch run (WORLD_SIZE > 1), for the duration of the block;
    nothing in a single process or when the caller already made one."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(rank, number of processes) of the current process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def from_rank0(value, world_size: int):
    """Rank 0's value on every rank (a picklable object)."""
    if world_size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(world_size: int, *values: float) -> list[float]:
    """The sums over the ranks of each value."""
    if world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def data_parallel(model: torch.nn.Module, world_size: int) -> torch.nn.Module:
    """The model in DistributedDataParallel in a process group (only the trainable parameters' gradients are
    all-reduced), else the model itself."""
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # The frozen backbone comes from the same checkpoint on every rank and never changes: DDP leaves it alone
    # (no broadcast at construction or before each forward, a backbone's worth of traffic). Broadcasting it is
    # also wrong for QLoRA on CPU: bitsandbytes repacks 4-bit weights in place at their first inference, which
    # only rank 0 (zero-shot evaluation) has done.
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DistributedDataParallel(
        model,
        device_ids=[torch.cuda.current_device()] if torch.cuda.is_available() else None,
        find_unused_parameters=False,
    )


def token_weight(labels: torch.Tensor, world_size: int) -> float:
    """In a process group: the factor that turns this rank's mean loss into its share of the global mean over
    the micro-batch's scored tokens (DDP averages gradients over ranks, so the share is scaled by N)."""
    scored = float((labels[:, 1:] != -100).sum())
    (total,) = all_sum(world_size, scored)
    return scored * world_size / total
