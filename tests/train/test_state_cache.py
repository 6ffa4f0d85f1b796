"""The backbone-state cache (train/state_cache.py): replayed states give the backbone's losses and gradients
(bitwise for a bf16 backbone with bf16 storage, within bf16 / int8 rounding otherwise), the epoch order keeps each
batch's class mix and each process's share, a cache from another backbone or data is refused, a damaged file is
detected, a full disk leaves nothing behind; the planner's cache bytes."""

from __future__ import annotations

import errno
import random
from types import SimpleNamespace

import pytest
import torch

from ladder_kernels.errors import TrainingError
from ladder_kernels.nn.config import LadderConfig
from ladder_kernels.nn.ladder import LadderModel
from ladder_kernels.planning.planner import state_cache_bytes_per_token
from ladder_kernels.train import state_cache
from ladder_kernels.train.data import BatchStream, Dataset, Example, collate
from ladder_kernels.train.state_cache import EpochOrder, StateCache, build_cache, signature
from tests.helpers import rel_err, tiny_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

N_ROWS, MICRO = 12, 4


def _rows(vocab: int = 96) -> dict[int, tuple[list[int], list[int]]]:
    """Training rows of ragged lengths, the loss on their last two tokens."""
    g = random.Random(3)
    rows = {}
    for i in range(N_ROWS):
        n = g.randint(5, 19)
        ids = [1] + [g.randint(3, vocab - 1) for _ in range(n - 1)]
        rows[i] = (ids, [-100] * (n - 2) + ids[-2:])
    return rows


def _model(dtype: torch.dtype, storage: str) -> LadderModel:
    torch.manual_seed(0)
    config = LadderConfig(reduction_factor=2, ladder_layers=[1, 3], ladder_storage=storage)
    return LadderModel(tiny_backbone(num_layers=4, dtype=dtype), config)


def _cache(tmp_path, model, dtype, storage) -> tuple[StateCache, dict, list[list[int]]]:
    rows = _rows()
    shares = [list(range(s, s + MICRO)) for s in range(0, N_ROWS, MICRO)]
    cfg = SimpleNamespace(seq_len=32, batch_size=MICRO, ladder_storage=storage)
    sig = signature(model, cfg, [rows[i][0] for i in range(N_ROWS)], 0, 1, dtype)
    path = tmp_path / state_cache.cache_name(sig)
    build_cache(path, sig, model, shares, lambda idx: [rows[i] for i in idx], 0, show_progress=False)
    return StateCache(path, sig), rows, shares


def _loss_and_grads(model: LadderModel, batch: dict, states=None) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    extra = {} if states is None else {"backbone_states": states}
    loss = model(**batch, **extra).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.side.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "dtype, storage, tolerance",
    [(torch.bfloat16, "bf16", 0.0), (torch.float32, "bf16", 2e-2), (torch.float32, "int8", 3e-2)],
)
def test_replayed_states_give_the_backbones_losses_and_gradients(tmp_path, dtype, storage, tolerance):
    """Each micro-batch as the caching pass ran it, and a reshuffled one (other examples beside each other)."""
    model = _model(dtype, storage)
    cache, rows, shares = _cache(tmp_path, model, dtype, storage)
    worst = 0.0
    for share in [*shares, [5, 0, 10, 3]]:
        batch = collate([rows[i] for i in share], 0)
        ref_loss, ref_grads = _loss_and_grads(model, batch)
        loss, grads = _loss_and_grads(model, batch, cache.states(share, batch["input_ids"].shape[1], "cpu"))
        assert grads.keys() == ref_grads.keys() and len(grads) > 4
        if tolerance == 0.0 and share in shares:  # the backbone's own bits, in the same batch: bitwise
            assert torch.equal(loss, ref_loss)
            assert all(torch.equal(grads[k], ref_grads[k]) for k in grads), [
                k for k in grads if not torch.equal(grads[k], ref_grads[k])
            ]
        errors = [rel_err(loss, ref_loss)] + [rel_err(grads[k], ref_grads[k]) for k in grads]
        worst = max(worst, *errors)
        assert max(errors) <= max(tolerance, 1e-2 if dtype == torch.bfloat16 else 0.0), (share, errors)
    if tolerance:
        assert worst > 0  # the storage rounds: the comparison is not of a tensor with itself
    # the control: another example's states give another loss
    batch = collate([rows[i] for i in shares[0]], 0)
    wrong = cache.states(shares[0][::-1], batch["input_ids"].shape[1], "cpu")
    assert not torch.equal(_loss_and_grads(model, batch, wrong)[0], _loss_and_grads(model, batch)[0])


def test_the_caching_pass_groups_examples_by_length_and_keeps_every_one(tmp_path):
    """by_length: each example once, micro-batches of the training size, shortest first (less padding than the
    training batches); a cache built from those batches replays every training batch within bf16 rounding."""
    rows = _rows()
    shares = [list(range(s, s + MICRO)) for s in range(0, N_ROWS, MICRO)] + [[0, 5]]  # a repeat, a short share
    grouped = state_cache.by_length(shares, lambda idx: [rows[i] for i in idx])
    assert sorted(i for g in grouped for i in g) == list(range(N_ROWS))
    assert [len(g) for g in grouped] == [MICRO] * (N_ROWS // MICRO)
    lengths = [len(rows[i][0]) for g in grouped for i in g]
    assert lengths == sorted(lengths)
    padded = lambda batches: sum(len(b) * max(len(rows[i][0]) for i in b) for b in batches)  # noqa: E731
    assert padded(grouped) < padded(shares[:-1])
    model = _model(torch.float32, "bf16")
    cfg = SimpleNamespace(seq_len=32, batch_size=MICRO, ladder_storage="bf16")
    sig = signature(model, cfg, [rows[i][0] for i in range(N_ROWS)], 0, 1, torch.float32)
    path = tmp_path / state_cache.cache_name(sig)
    build_cache(path, sig, model, grouped, lambda idx: [rows[i] for i in idx], 0, show_progress=False)
    cache = StateCache(path, sig)
    for share in shares[:-1]:
        batch = collate([rows[i] for i in share], 0)
        ref_loss, ref_grads = _loss_and_grads(model, batch)
        loss, grads = _loss_and_grads(model, batch, cache.states(share, batch["input_ids"].shape[1], "cpu"))
        assert max([rel_err(loss, ref_loss)] + [rel_err(grads[k], ref_grads[k]) for k in grads]) <= 2e-2


def test_memory_budget_holds_examples_and_gives_the_same_states(tmp_path):
    model = _model(torch.float32, "int8")
    cache, rows, shares = _cache(tmp_path, model, torch.float32, "int8")
    held = StateCache(cache.path, cache.header["signature"], memory_budget=10**9)
    for share in shares:
        width = max(len(rows[i][0]) for i in share)
        a, b = cache.states(share, width, "cpu"), held.states(share, width, "cpu")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    blocks = [state_cache._block_bytes(e[1], len(cache.keys), cache.hidden, "int8") for e in cache.header["entries"]]
    assert held.held_bytes == sum(blocks)
    assert cache.held_bytes == 0
    n_tokens = sum(len(rows[i][0]) for i in range(N_ROWS))
    per_token = state_cache_bytes_per_token(cache.hidden, len(cache.keys), "int8")
    assert abs(cache.bytes_per_example * N_ROWS - per_token * n_tokens) < state_cache.ALIGN * 2 * N_ROWS


def test_another_backbone_or_data_is_refused_naming_what_differs(tmp_path):
    model = _model(torch.float32, "bf16")
    cache, rows, _ = _cache(tmp_path, model, torch.float32, "bf16")
    sig = cache.header["signature"]
    for change in ({"data_sha256": "0" * 64}, {"weights_sha256": "f" * 64}, {"storage": "int8"}, {"world_size": 2}):
        with pytest.raises(TrainingError, match=f"made for another backbone, data or settings: {next(iter(change))}"):
            StateCache(cache.path, {**sig, **change})
    other = _model(torch.float32, "bf16")
    with torch.no_grad():
        other.backbone.model.layers[0].input_layernorm.weight.mul_(1.5)  # the same shapes, other weights
    cfg = SimpleNamespace(seq_len=32, batch_size=MICRO, ladder_storage="bf16")
    other_sig = signature(other, cfg, [rows[i][0] for i in range(N_ROWS)], 0, 1, torch.float32)
    assert other_sig["weights_sha256"] != sig["weights_sha256"]
    assert state_cache.cache_name(other_sig) != cache.path.name
    with pytest.raises(TrainingError, match="weights_sha256"):
        StateCache(cache.path, other_sig)


def test_a_truncated_or_corrupted_file_is_detected(tmp_path):
    model = _model(torch.float32, "bf16")
    cache, rows, shares = _cache(tmp_path, model, torch.float32, "bf16")
    sig, data = cache.header["signature"], cache.path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 20, 0):
        cache.path.write_bytes(data[:cut])
        with pytest.raises(TrainingError, match="damaged or truncated.*delete it to rebuild it"):
            StateCache(cache.path, sig)
    index, n, offset, _ = cache.header["entries"][1]
    flipped = bytearray(data)
    flipped[offset + 7] ^= 0x40
    cache.path.write_bytes(bytes(flipped))
    damaged = StateCache(cache.path, sig)
    damaged.states([cache.header["entries"][0][0]], 32, "cpu")  # an intact example reads
    with pytest.raises(TrainingError, match=f"corrupted \\(example {index} fails its checksum\\)"):
        damaged.states([index], 32, "cpu")


@pytest.mark.parametrize("when", ["first write", "header"])
def test_a_full_disk_stops_naming_the_cache_dir_and_keeps_nothing(tmp_path, monkeypatch, when):
    model = _model(torch.float32, "bf16")
    rows = _rows()
    real, calls = state_cache._write_all, []

    def full(fd, data):
        calls.append(len(data))
        if when == "first write" or len(calls) > 1 + N_ROWS:  # the magic, N_ROWS blocks, then the header
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(state_cache, "_write_all", full)
    folder = tmp_path / "cache"
    sig = signature(
        model, SimpleNamespace(seq_len=32, batch_size=MICRO, ladder_storage="bf16"), [], 0, 1, torch.float32
    )
    with pytest.raises(TrainingError, match=f"--cache-dir {folder}: the disk filled up.*partial file was removed"):
        build_cache(
            folder / "x.states", sig, model, [list(range(N_ROWS))], lambda idx: [rows[i] for i in idx], 0, False
        )
    assert folder.is_dir() and not list(folder.iterdir())


def test_too_little_free_space_is_refused_before_the_backbone_runs(tmp_path, monkeypatch):
    model = _model(torch.float32, "bf16")
    rows = _rows()
    monkeypatch.setattr(state_cache.shutil, "disk_usage", lambda p: SimpleNamespace(free=1000))
    monkeypatch.setattr(state_cache, "_run_backbone", lambda *a: pytest.fail("the backbone ran"))
    sig = signature(
        model, SimpleNamespace(seq_len=32, batch_size=MICRO, ladder_storage="bf16"), [], 0, 1, torch.float32
    )
    with pytest.raises(TrainingError, match=r"--cache-dir .*needs 0.00 GiB, the disk has 0.00 GiB free"):
        build_cache(tmp_path / "x.states", sig, model, [[0, 1]], lambda idx: [rows[i] for i in idx], 0, False)
    assert not list(tmp_path.iterdir())


def test_orphaned_temporary_files_are_removed_and_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".tmp-{dead.pid}-abc123x.states"
    live = tmp_path / f".tmp-{os.getpid()}-def456x.states"
    other = tmp_path / f".tmp-{dead.pid}-abc123y.states"  # another cache's: left alone
    for p in (orphan, live, other):
        p.write_bytes(b"partial")
    state_cache._remove_orphans(tmp_path, "x.states")
    assert not orphan.exists() and live.exists() and other.exists()


def _dataset(n: int = 90) -> Dataset:
    labels = ("a", "b", "c")
    train = tuple(Example(f"row {i}", " " + labels[(i * i) % 3]) for i in range(n))
    return Dataset("sentiment", train, (), labels, "test")


@pytest.mark.parametrize("world", [1, 2])
def test_later_epochs_permute_within_class_and_process(world):
    data = _dataset()
    stream = BatchStream(data, 12, seed=5, balance=0.5)
    classes = [data.label_of(ex) for ex in data.train]
    order = EpochOrder(stream, batches=4, micro=6, world=world, classes=classes, seed=5)
    assert order.epoch(0) == [i for b in range(4) for i in stream.indices(b)]
    assert [order.indices(0, b) for b in range(4)] == [stream.indices(b) for b in range(4)]
    first, second, third = order.epoch(0), list(order.epoch(1)), order.epoch(2)
    assert sorted(second) == sorted(first) and second != first and third != second
    assert [classes[i] for i in second] == [classes[i] for i in first]  # every batch keeps its class mix
    for rank in range(world):
        mine = {first[p] for p in range(len(first)) if order.rank_of(p) == rank}
        assert {second[p] for p in range(len(second)) if order.rank_of(p) == rank} <= mine
        assert [i for s in order.shares(rank) for i in s] == [
            first[p] for p in range(len(first)) if order.rank_of(p) == rank
        ]
    again = EpochOrder(stream, batches=4, micro=6, world=world, classes=classes, seed=5)
    assert again.epoch(1) == second  # a pure function of the seed: resume finds the same order
    assert EpochOrder(stream, batches=4, micro=6, world=world, classes=classes, seed=6).epoch(1) != second


def test_planner_reports_the_cache_bytes():
    from ladder_kernels.planning.planner import plan
    from tests.helpers import tiny_config

    cfg = tiny_config(num_layers=4)
    for storage, per_row in (("bf16", 2 * cfg.hidden_size), ("int8", cfg.hidden_size + 4)):
        p = plan(cfg, "ladder", seq_len=16, batch_size=2, dtype="float32", ladder_layers=[1, 3], ladder_storage=storage)
        assert p.cache_bytes_per_example == (2 + 2) * per_row * 16  # branch, 2 ladders, final
        assert p.to_dict()["cache_bytes_per_example"] == p.cache_bytes_per_example
    assert plan(cfg, "qlora", seq_len=16, batch_size=2, dtype="float32").cache_bytes_per_example == 0


def test_plan_command_prints_the_cache_of_steps_x_batch_examples(tmp_path, capsys):
    import json

    from ladder_kernels.cli import main
    from tests.helpers import tiny_config

    path = tmp_path / "config.json"
    tiny_config(num_layers=6).to_json_file(path)
    args = ["plan", "--model", str(path), "--seq-len", "16", "--batch-size", "2", "--steps", "10", "--no-max-context"]
    assert main(args + ["--methods", "ladder,qlora", "--ladder-every", "2", "--json"]) == 0
    plans = {p["method"]: p for p in json.loads(capsys.readouterr().out)}
    per_example = (2 + 3) * 2 * 64 * 16  # branch, ladders on layers 1, 3, 5, final; bf16; 16 tokens
    assert plans["ladder"]["cache_bytes_per_example"] == per_example
    assert plans["ladder"]["cache_bytes"] == per_example * 10 * 2 and plans["qlora"]["cache_bytes"] == 0
    assert main(args + ["--methods", "ladder", "--ladder-every", "2", "--ladder-storage", "int8"]) == 0
    out = capsys.readouterr().out
    assert "(10 steps x batch 2 = 20 examples of at most 16 tokens" in out
    assert f"ladder {5 * 68 * 16 / 2**20:.3g} MiB per example, {5 * 68 * 16 * 20 / 2**20:.3g} MiB in all" in out
    assert main(args[:-1] + ["--steps", "0"]) == 2 and "--steps must be an integer >= 1" in capsys.readouterr().err
