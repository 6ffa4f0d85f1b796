"""Data-parallel training of a LadderModel on CPU with the gloo backend and 2 processes.

DDP (find_unused_parameters=False) and FSDP2 (fully_shard on each side block and the model root, the frozen
backbone's parameters ignored) on a fixed global batch split across the ranks must end with the same side
parameters as one process training on the whole batch. One spawn runs both; the tests read its results.
`torchrun --nproc_per_node 2 -m ladder_kernels finetune` must likewise match the same command in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ladder_kernels.nn.config import LadderConfig
from ladder_kernels.nn.ladder import LadderModel
from ladder_kernels.nn.nf4_linear import NF4Linear
from tests.helpers import REPO, rel_err, tiny_backbone

WORLD = 2
STEPS = 3
LR = 1e-2
GLOBAL_BATCH, SEQ = 4, 12
GATES = ("scalar", "vector")


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, 96, (GLOBAL_BATCH, SEQ), generator=g)


def _model(side_seed: int = 0, gate: str = "scalar") -> LadderModel:
    torch.manual_seed(side_seed)
    # side_init='random' zeroes up_proj, so the first step trains only it: STEPS >= 2 trains everything.
    config = LadderConfig(backbone_quant="nf4", side_init="random", init_std=0.05, backend="torch", gate=gate)
    return LadderModel(tiny_backbone("llama", num_layers=2, seed=0), config)


def _side_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.removeprefix("module.")] = full.detach().clone()
    return out


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name.removeprefix("module.")] = g.detach().clone()
    return out


def _train(model: torch.nn.Module, ids: torch.Tensor, reduce_loss) -> tuple[list[float], dict[str, torch.Tensor]]:
    """STEPS AdamW steps on ids; (per-step global loss, the first step's gradients)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    losses, first_grads = [], None
    model.train()
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(reduce_loss(loss.detach()))
        if first_grads is None:
            first_grads = _grads(model)
        opt.step()
    return losses, first_grads


def _state_checksums(model: torch.nn.Module) -> list[float]:
    """One number per parameter and buffer (the NF4 bytes included), to compare across ranks."""
    out = []
    for t in [*model.parameters(), *model.buffers()]:
        t = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()
        out.append(
            float(
                t.double().mul(torch.arange(t.numel(), dtype=torch.float64).reshape(t.shape).remainder(97).add(1)).sum()
            )
        )
    return out


def _global_mean(loss: torch.Tensor) -> float:
    loss = loss.clone()
    dist.all_reduce(loss)
    return loss.item() / dist.get_world_size()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        ids = _batch()
        local = ids.chunk(WORLD)[rank]

        # --- DDP: rank 1 starts from other side weights and corrupted NF4 bytes; DDP's broadcast fixes both.
        model = _model(side_seed=rank)
        if rank == 1:
            nf4 = next(m for m in model.backbone.modules() if isinstance(m, NF4Linear))
            nf4.packed[:8] ^= 0xFF
        before = _state_checksums(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        bucketed = sorted(n.removeprefix("module.") for n, p in ddp.named_parameters() if p.requires_grad)
        after = _state_checksums(model)
        everyone_before, everyone_after = [None] * WORLD, [None] * WORLD
        dist.all_gather_object(everyone_before, before)
        dist.all_gather_object(everyone_after, after)
        losses, grads = _train(ddp, local, _global_mean)
        if rank == 0:
            torch.save(
                dict(
                    params=_side_params(ddp),
                    grads=grads,
                    losses=losses,
                    bucketed=bucketed,
                    checksums_before=everyone_before,
                    checksums_after=everyone_after,
                ),
                os.path.join(out_dir, "ddp.pt"),
            )
        dist.barrier()

        # --- FSDP2 on the side network: each side block, then the model root (the backbone's parameters ignored).
        # The root is the LadderModel, not .side: side.project (the ladders) runs from the backbone's hooks and
        # side.mix after side.forward, so only a root around the whole forward unshards those parameters.
        # gate='scalar' keeps its α in shape [1]: fully_shard rejects 0-dim parameters.
        for gate in GATES:
            try:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                model = _model(side_seed=0, gate=gate)
                mesh = init_device_mesh("cpu", (WORLD,))
                for block in model.side.blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(model, mesh=mesh, ignored_params=set(model.backbone.parameters()))
                losses, grads = _train(model, local, _global_mean)
                result = dict(params=_side_params(model), grads=grads, losses=losses)
            except Exception:  # noqa: BLE001 - recorded for the test to report as a failure
                result = dict(error=f"rank {rank}:\n{traceback.format_exc()}")
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"fsdp2-{gate}.pt"))
            elif "error" in result:  # rank 0 may have passed: keep the other rank's traceback for the report too
                Path(out_dir, f"fsdp2-{gate}-rank{rank}.err").write_text(result["error"], encoding="utf-8")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references (gate 'scalar' for DDP, both for FSDP2) plus one 2-process gloo spawn."""
    tmp = tmp_path_factory.mktemp("dist")
    single = {}
    for gate in GATES:
        reference = _model(side_seed=0, gate=gate)
        initial, checksums = _side_params(reference), _state_checksums(reference)
        losses, grads = _train(reference, _batch(), float)
        single[gate] = dict(
            params=_side_params(reference), grads=grads, losses=losses, initial=initial, checksums=checksums
        )
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    load = lambda name: torch.load(tmp / name, weights_only=True)  # noqa: E731 - our own files
    return single["scalar"], load("ddp.pt"), {gate: (single[gate], load(f"fsdp2-{gate}.pt")) for gate in GATES}, tmp


def _compare(single: dict, run: dict, label: str) -> None:
    assert sorted(run["params"]) == sorted(single["params"])
    flat = lambda d: torch.cat([d[k].reshape(-1).double() for k in sorted(d)])  # noqa: E731
    # Training moved the parameters (so agreement below is not trivially about untouched weights) ...
    moved = rel_err(flat(single["params"]), flat(single["initial"]))
    assert moved > 1e-3, moved
    # ... the first step's averaged gradients match (AdamW would hide a gradient scaling error) ...
    grad_err = rel_err(flat(run["grads"]), flat(single["grads"]))
    # ... the global loss per step and the final side parameters match one process on the whole batch.
    param_err = rel_err(flat(run["params"]), flat(single["params"]))
    update_err = rel_err(
        flat(run["params"]) - flat(single["initial"]), flat(single["params"]) - flat(single["initial"])
    )
    worst = max(rel_err(run["params"][k], single["params"][k]) for k in single["params"])
    print(
        f"\n{label}: rel diff params {param_err:.2e} (worst tensor {worst:.2e}, of the update {update_err:.2e}), "
        f"first-step grads {grad_err:.2e}, losses {run['losses']} vs {single['losses']}"
    )
    assert run["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert grad_err < 1e-4
    assert param_err < 1e-4 and worst < 1e-4 and update_err < 1e-3


def test_ddp_matches_single_process(runs):
    single, ddp, _, _ = runs
    # Only the side network's parameters are in DDP's gradient buckets; the NF4 backbone is frozen buffers.
    assert ddp["bucketed"] == sorted(single["params"]) and all(k.startswith("side.") for k in ddp["bucketed"])
    # DDP's construction broadcast rank 0's parameters and buffers (uint8 NF4 bytes included) to rank 1.
    assert ddp["checksums_before"][0] != ddp["checksums_before"][1]
    assert ddp["checksums_after"][0] == ddp["checksums_after"][1] == ddp["checksums_before"][0] == single["checksums"]
    _compare(single, ddp, "DDP")


@pytest.mark.parametrize("gate", GATES)
def test_fsdp2_side_network_matches_single_process(runs, gate):
    single, fsdp = runs[2][gate]
    # A worker's exception is a failure (FSDP2 on CPU/gloo works with the pinned torch), with its traceback.
    errors = [fsdp["error"]] if "error" in fsdp else []
    errors += [p.read_text(encoding="utf-8") for p in sorted(runs[3].glob(f"fsdp2-{gate}-rank*.err"))]
    if errors:
        pytest.fail(f"FSDP2 (fully_shard) gate={gate} raised in the worker:\n" + "\n".join(errors), pytrace=False)
    _compare(single, fsdp, f"FSDP2 gate={gate}")


# --- `ladder-kernels finetune` under torchrun ---------------------------------------------------------------


def _flat_adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "ladder_model.safetensors")


@pytest.mark.parametrize("task", ["sentiment", "arith"])  # arith: examples of different token counts
def test_torchrun_finetune_matches_one_process(task, tmp_path, monkeypatch):
    """--batch-size is the global micro-batch: 2 processes take 4 examples each of every 8 and end where one
    process does with the same command. On the CPU with gloo everywhere (a GPU machine may have one GPU only)."""
    import ladder_kernels.train.distributed
    from ladder_kernels.cli import main

    monkeypatch.setattr(ladder_kernels.train.distributed, "device", lambda: torch.device("cpu"))
    from tests.helpers import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "model")
    args = [
        "finetune",
        "--model",
        str(model),
        "--task",
        task,
        "--seq-len",
        "48",
        "--batch-size",
        "8",
        "--grad-accum",
        "2",
        "--steps",
        "4",
        "--epochs",
        "1",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "1",
        "--reduction-factor",
        "2",
        "--eval-samples",
        "3",
        "--checkpoint-every",
        "2",
        "--dtype",
        "float32",
    ]
    if task == "sentiment":
        words = {"negative": "awful", "neutral": "okay", "positive": "great"}
        data = tmp_path / "data.jsonl"
        data.write_text(
            "".join(
                json.dumps({"text": f"car {i} is {w}", "label": label}) + "\n"
                for i in range(40)
                for label, w in words.items()
            ),
            encoding="utf-8",
        )
        args += ["--data", str(data)]
    repo = REPO
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(WORLD),
            "-m",
            "ladder_kernels",
            *args,
            "--output-dir",
            str(tmp_path / "torchrun"),
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # rank 0 alone evaluates and reports
    assert proc.stdout.count("run folder:") == 1 and proc.stderr.count("zero-shot held-out") == 1, (
        proc.stdout + proc.stderr
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--output-dir", str(tmp_path / "single")]) == 0
        # what a rank alone would see if the ranks did not share the batch: 4 examples per micro-batch
        assert main([*args, "--batch-size", "4", "--output-dir", str(tmp_path / "half")]) == 0
    finally:
        torch.set_num_threads(threads)

    flat = lambda d: torch.cat([d[k].reshape(-1).double() for k in sorted(d)])  # noqa: E731
    multi, single, half = (_flat_adapter(tmp_path / n) for n in ("torchrun", "single", "half"))
    diff = rel_err(flat(multi), flat(single))
    worst = max(rel_err(multi[k], single[k]) for k in single)
    print(
        f"\ntorchrun x{WORLD} vs one process ({task}): side weights rel diff {diff:.2e} (worst tensor {worst:.2e}); "
        f"half the batch: {rel_err(flat(half), flat(single)):.2e}"
    )
    assert multi.keys() == single.keys() and diff < 1e-4 and worst < 1e-4
    assert rel_err(flat(half), flat(single)) > 100 * max(diff, 1e-6)  # the comparison tells batches apart
    summary = json.loads((tmp_path / "torchrun" / "summary.json").read_text())
    reference = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert summary["processes"] == WORLD and summary["steps"] == 4 and summary["tokens"] == reference["tokens"]
    history = torch.load(tmp_path / "torchrun" / "checkpoint.pt", weights_only=True)["history"]
    assert history == pytest.approx(
        torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)["history"], rel=1e-5
    )
