"""The backbone-state cache of `ladder-kernels finetune --epochs E`: many epochs for the price of one backbone pass.

The backbone is frozen, so what it hands the side network for an example never changes. Before training, a
caching pass runs the backbone once over epoch 1's examples (those `BatchStream` draws for --steps optimizer
steps, regrouped into micro-batches of similar length: `by_length`) and stores, per example and for real tokens
only, every tensor the side network reads (LadderModel.forward's `backbone_states`: the branch point, each ladder
layer and the final normed hidden state) in the --ladder-storage format: bf16, or int8 rows with an fp32 absmax
scale per row (ops/downproj.quantize_rows_int8, the same rounding as the int8 ladder storage). Every epoch, the
first included, then trains from the cache with no backbone forward, so a run's result does not depend on whether
its cache was built or reused. Epoch 1 keeps BatchStream's batches; epoch e > 1 permutes the same examples with a
seeded permutation per epoch, within each class (and each process's share), so every batch keeps its class mix.

Exactness: a micro-batch replayed as cached gives the backbone's own bits (bf16 backbone and storage); a training
batch gives them up to float rounding, within bf16 / int8 rounding of the stored values otherwise.

The file (one per signature, in --cache-dir): magic, the examples' blocks (64-byte aligned), a JSON header
(signature, per example: training-set index, tokens, offset, crc32), the header's length and crc32, magic. It is
written to a temporary file and renamed when complete, so a crash or a full disk never leaves a partial cache;
it is read per example with os.preadv, not memory-mapped: pages come from the OS page cache (not counted in the
process's RSS); --cache-memory keeps up to that many bytes of examples in process memory as well.

Data-parallel runs: each process caches its own share (the signature holds rank and world size) and epochs > 1
permute examples only among the positions of the same process, so no process reads another's file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ladder_kernels.defaults import STATE_CACHE_FOLDER
from ladder_kernels.errors import TrainingError
from ladder_kernels.nn.ladder import positions_from_mask
from ladder_kernels.nn.nf4_linear import NF4Linear as NF4
from ladder_kernels.nn.side import BRANCH
from ladder_kernels.ops.downproj import dequantize_rows_int8, quantize_rows_int8
from ladder_kernels.planning.planner import state_cache_bytes_per_token
from ladder_kernels.train.data import collate

FORMAT_VERSION = 1
MAGIC = b"LKSTATE1"
FOOTER, ALIGN = struct.Struct("<QI8s"), 64  # footer: header length, header crc32, magic; blocks 64-byte aligned
WEIGHT_SAMPLE = 4096  # elements hashed per backbone tensor (strided over the whole tensor)


def default_cache_dir() -> Path:
    from ladder_kernels.train.backbones import cache_root

    return cache_root() / STATE_CACHE_FOLDER


# --- the order of the examples ---------------------------------------------------------------------------
class EpochOrder:
    """The training-set indices of every batch of every epoch. Epoch 0 holds BatchStream's first `batches` batches
    of `batch` examples (micro-batches of `micro`, process r taking every world-th example of each); epoch e > 0
    permutes those examples with a seeded permutation within each (class, process) group of positions."""

    def __init__(self, stream, batches: int, micro: int, world: int, classes: Optional[Sequence], seed: int):
        self.batch, self.micro, self.world, self.seed = stream.batch_size, micro, world, seed
        self.flat = [i for b in range(batches) for i in stream.indices(b)]
        self.batches = batches
        self.classes = classes  # per training-set index, its class (None: one group)
        self._epoch: tuple[int, list[int]] = (0, self.flat)

    def rank_of(self, position: int) -> int:
        return (position % self.micro) % self.world

    def epoch(self, e: int) -> list[int]:
        if e == 0:
            return self.flat
        if self._epoch[0] != e:
            groups: dict = {}
            for p, i in enumerate(self.flat):
                key = (self.classes[i] if self.classes is not None else None, self.rank_of(p))
                groups.setdefault(key, []).append(p)
            out = list(self.flat)
            for key in sorted(groups, key=repr):
                positions = groups[key]
                values = [self.flat[p] for p in positions]
                random.Random(f"{self.seed}:{e}:{key!r}").shuffle(values)
                for p, v in zip(positions, values):
                    out[p] = v
            self._epoch = (e, out)
        return self._epoch[1]

    def indices(self, e: int, b: int) -> list[int]:
        return self.epoch(e)[b * self.batch : (b + 1) * self.batch]

    def shares(self, rank: int) -> list[list[int]]:
        """Epoch 0's micro-batches as process `rank` sees them (its share of each)."""
        return [self.flat[s : s + self.micro][rank :: self.world] for s in range(0, len(self.flat), self.micro)]


# --- the signature -----------------------------------------------------------------------------------------
def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of every backbone tensor's name, shape, dtype and a strided sample of its bytes."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict(keep_vars=False).items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // WEIGHT_SAMPLE)].contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()


def signature(model, cfg, ids: Sequence[Sequence[int]], rank: int, world: int, dtype: torch.dtype) -> dict:
    """What the cached tensors depend on: the backbone, the cached token ids (in order), the side network's
    sources, the storage, the compute dtype, the micro-batches they were computed in, and the process's share."""
    data = hashlib.sha256()
    for row in ids:
        data.update(struct.pack(f"<{len(row) + 1}q", len(row), *row))
    config = model.backbone.config
    return {
        "format": FORMAT_VERSION,
        "model_type": str(getattr(config, "model_type", "")),
        "num_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "weights_sha256": weights_digest(model.backbone),
        "data_sha256": data.hexdigest(),
        "examples": len(ids),
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "branch_source": int(model.side.branch_source),
        "ladder_sources": [int(s) for s in model.side.ladder_sources],
        "storage": cfg.ladder_storage,
        "dtype": str(dtype).removeprefix("torch."),
        "matmul_dtype": sorted({str(m.compute_dtype or dtype) for m in model.backbone.modules() if isinstance(m, NF4)}),
        "rank": rank,
        "world_size": world,
    }


def cache_name(sig: dict) -> str:
    digest = hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:24]
    return f"{sig['model_type'] or 'model'}-{sig['storage']}-{digest}.states"


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


# --- the cache -----------------------------------------------------------------------------------------------
class StateCache:
    """An open, validated cache file: `states(indices, width, device)` gives a batch's backbone_states."""

    def __init__(self, path: Path, expected: dict, memory_budget: int = 0):
        self.path, self.memory_budget = Path(path), memory_budget
        self.header = _read_header(self.path, expected)
        self.keys = [_key(k) for k in self.header["keys"]]
        self.dtype = getattr(torch, self.header["dtype"])
        self.hidden = self.header["hidden_size"]
        self.entries = {int(i): (n, off, crc) for i, n, off, crc in self.header["entries"]}
        self.size = self.path.stat().st_size
        self.fd = os.open(self.path, os.O_RDONLY)
        self._held: dict[int, torch.Tensor] = {}
        self.held_bytes = 0
        self._checked: set[int] = set()  # examples whose checksum was verified (at their first read)
        self.reused = False  # set by open_or_build: found complete in --cache-dir

    def close(self) -> None:
        if getattr(self, "fd", None) is not None:  # (__init__ may have failed before opening it)
            os.close(self.fd)
            self.fd = None

    __del__ = close

    @property
    def bytes_per_example(self) -> float:
        return (self.header["data_bytes"] - _aligned(len(MAGIC))) / max(1, len(self.entries))

    def _block(self, index: int) -> torch.Tensor:
        if index in self._held:
            return self._held[index]
        if index not in self.entries:
            raise TrainingError(f"the backbone-state cache {self.path} holds no training example {index}")
        n, offset, crc = self.entries[index]
        buf = bytearray(_block_bytes(n, len(self.keys), self.hidden, self.header["storage"]))
        got = 0
        while got < len(buf):
            read = os.preadv(self.fd, [memoryview(buf)[got:]], offset + got)
            if read == 0:
                raise TrainingError(f"the backbone-state cache {self.path} is truncated; delete it to rebuild it")
            got += read
        if index not in self._checked:
            if zlib.crc32(buf) != crc:
                raise TrainingError(
                    f"the backbone-state cache {self.path} is corrupted (example {index} fails its checksum); delete "
                    "it to rebuild it"
                )
            self._checked.add(index)
        block = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        if self.held_bytes + len(buf) <= self.memory_budget:
            self._held[index] = block
            self.held_bytes += len(buf)
        return block

    def example(self, index: int) -> dict:
        """One example's tensors [tokens, hidden] in the backbone's dtype, by backbone_states key."""
        block, n, D = self._block(index), self.entries[index][0], self.hidden
        out, k = {}, len(self.keys)
        if self.header["storage"] == "int8":
            scales = block[: 4 * n * k].view(torch.float32).view(k, n)
            codes = block[_aligned(4 * n * k) :][: n * D * k].view(torch.int8).view(k, n, D)
            for j, key in enumerate(self.keys):
                out[key] = dequantize_rows_int8(codes[j], scales[j]).to(self.dtype)
        else:
            values = block[: 2 * n * D * k].view(torch.bfloat16).view(k, n, D)
            for j, key in enumerate(self.keys):
                out[key] = values[j].to(self.dtype)
        return out

    def states(self, indices: Sequence[int], width: int, device) -> dict:
        """backbone_states for a right-padded batch of these examples (zeros on the padding)."""
        batch = {key: torch.zeros(len(indices), width, self.hidden, dtype=self.dtype) for key in self.keys}
        for row, index in enumerate(indices):
            for key, value in self.example(index).items():
                batch[key][row, : value.shape[0]] = value
        return {key: value.to(device) for key, value in batch.items()}


def _key(k):
    return k if k in (BRANCH, "final") else int(k)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _block_bytes(tokens: int, keys: int, hidden: int, storage: str) -> int:
    if storage == "int8":
        return _aligned(4 * tokens * keys) + tokens * hidden * keys
    return 2 * tokens * hidden * keys


def _read_header(path: Path, expected: dict) -> dict:
    """The header of a complete cache file made for `expected`; anything else is a TrainingError naming it."""
    damaged = f"the backbone-state cache {path} is damaged or truncated ({{}}); delete it to rebuild it"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < len(MAGIC) + FOOTER.size or f.read(len(MAGIC)) != MAGIC:
                raise TrainingError(damaged.format("no cache header"))
            f.seek(size - FOOTER.size)
            length, crc, magic = FOOTER.unpack(f.read(FOOTER.size))
            if magic != MAGIC or length > size - len(MAGIC) - FOOTER.size:
                raise TrainingError(damaged.format("no complete footer"))
            f.seek(size - FOOTER.size - length)
            raw = f.read(length)
    except OSError as exc:
        raise TrainingError(f"cannot read the backbone-state cache {path}: {exc}") from None
    if zlib.crc32(raw) != crc:
        raise TrainingError(damaged.format("header checksum mismatch"))
    header = json.loads(raw)
    if header.get("data_offset", 0) + header.get("data_bytes", -1) + length + FOOTER.size != size:
        raise TrainingError(damaged.format(f"{size} bytes, the header describes another size"))
    saved = header.get("signature", {})
    differ = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if differ:
        what = ", ".join(f"{k} (cache: {str(a)[:16]}, this run: {str(b)[:16]})" for k, (a, b) in sorted(differ.items()))
        raise TrainingError(
            f"the backbone-state cache {path} was made for another backbone, data or settings: {what}; it is not "
            "read. Delete it, or pass another --cache-dir"
        )
    return header


def build_cache(
    path: Path,
    sig: dict,
    model,
    shares: Sequence[Sequence[int]],
    rows: Callable[[Sequence[int]], list],
    pad_id: int,
    show_progress: bool = True,
) -> float:
    """Run the backbone over `shares` (micro-batches of training-set indices) and write each example's states
    once, atomically; returns the seconds spent. A full disk is a TrainingError naming --cache-dir, with nothing
    kept."""
    from tqdm.auto import tqdm

    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingError(f"--cache-dir {folder}: cannot create the folder ({exc})") from None
    keys = [BRANCH, *range(len(model.side.ladder_sources)), "final"]
    storage, hidden = sig["storage"], sig["hidden_size"]
    unique = list(dict.fromkeys(i for share in shares for i in share))
    lengths = {i: len(ids) for i, (ids, _) in zip(unique, rows(unique))}
    need = sum(_aligned(_block_bytes(n, len(keys), hidden, storage)) for n in lengths.values())
    free, advice = shutil.disk_usage(folder).free, "free space or pass another --cache-dir"
    advice += ", or use --ladder-storage int8 (about half the bytes)" if storage != "int8" else ""
    if free < need + 2**20:
        raise TrainingError(
            f"--cache-dir {folder}: the backbone-state cache needs {need / 2**30:.2f} GiB, the disk has "
            f"{free / 2**30:.2f} GiB free; {advice}"
        )
    _remove_orphans(folder, path.name)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{os.getpid()}-", suffix=path.name)
    entries, offset, start = [], _aligned(len(MAGIC)), time.perf_counter()
    try:
        try:
            _write_all(fd, MAGIC.ljust(offset, b"\0"))
            with torch.no_grad():
                for share in tqdm(shares, desc="caching backbone states", unit="batch", disable=not show_progress):
                    new = {i: row for row, i in reversed(list(enumerate(share))) if i in lengths}  # first rows
                    if not new:
                        continue
                    states, mask = _run_backbone(model, share, rows, pad_id)
                    for i, row in sorted(new.items(), key=lambda item: item[1]):
                        block = _encode(states, keys, row, lengths[i], storage)
                        _write_all(fd, block.ljust(_aligned(len(block)), b"\0"))
                        entries.append((i, lengths[i], offset, zlib.crc32(block)))
                        offset += _aligned(len(block))
                        del lengths[i]
            seconds = time.perf_counter() - start
            header = {
                "signature": sig,
                "keys": [str(k) for k in keys],
                "storage": storage,
                "dtype": sig["dtype"],
                "hidden_size": hidden,
                "entries": entries,
                "data_offset": 0,
                "data_bytes": offset,
                "backbone_seconds": seconds,
                "micro_batches": len(shares),
            }
            raw = json.dumps(header).encode()
            _write_all(fd, raw + FOOTER.pack(len(raw), zlib.crc32(raw), MAGIC))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink(tmp)
        if _disk_full(exc):
            raise TrainingError(
                f"--cache-dir {folder}: the disk filled up while writing the backbone-state cache ({offset / 2**30:.2f}"
                f" of {need / 2**30:.2f} GiB); the partial file was removed. {advice[0].upper() + advice[1:]}"
            ) from None
        raise TrainingError(f"--cache-dir {folder}: cannot write the backbone-state cache: {exc}") from None
    except BaseException:
        _unlink(tmp)
        raise
    return seconds


def _remove_orphans(folder: Path, name: str) -> None:
    """Temporary files of this cache left by a killed process (its pid, in the name, no longer runs): never read,
    removed here. Another live process's temporary file (a concurrent run building the same cache) is kept."""
    for leftover in folder.glob(f".tmp-*-*{name}"):
        pid = leftover.name.split("-")[1]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _unlink(str(leftover))
        except (ValueError, PermissionError):
            pass  # not ours to judge


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _run_backbone(model, share, rows, pad_id) -> tuple[dict, torch.Tensor]:
    """The backbone_states of one micro-batch, computed as LadderModel.forward computes them in training."""
    batch = collate(rows(share), pad_id)
    dev = model.device
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    states: dict = {}

    def keep(source, h):
        states[source] = h

    states["final"] = model._run_backbone(keep, ids, mask, positions_from_mask(mask, ids), None)
    return states, mask


def _encode(states: dict, keys: list, row: int, n: int, storage: str) -> bytes:
    """One example's block: int8 = every key's fp32 row scales, then (64-byte aligned) its int8 rows; bf16 = every
    key's bf16 rows."""
    values = [states[k][row, :n].detach().cpu() for k in keys]
    if storage == "int8":
        quantized = [quantize_rows_int8(v) for v in values]
        scales = b"".join(s.numpy().tobytes() for _, s in quantized)
        return scales.ljust(_aligned(len(scales)), b"\0") + b"".join(q.numpy().tobytes() for q, _ in quantized)
    return b"".join(v.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes() for v in values)


def by_length(shares: Sequence[Sequence[int]], rows) -> list[list[int]]:
    """The examples of `shares`, each once, in micro-batches of the same size, shortest first: little padding (29%
    of the training batches' tokens on the embedded task). A token's states do not depend on the other rows."""
    unique = list(dict.fromkeys(i for share in shares for i in share))
    lengths = {i: len(ids) for i, (ids, _) in zip(unique, rows(unique))}
    ordered = sorted(unique, key=lengths.__getitem__)  # stable: ties keep the training order
    size = max((len(share) for share in shares), default=1)
    return [ordered[s : s + size] for s in range(0, len(ordered), size)]


def open_or_build(
    model, cfg, order: EpochOrder, rows, pad_id: int, rank: int, world: int, dtype: torch.dtype, main: bool
) -> tuple[StateCache, float]:
    """The run's cache (reused when a complete one with its signature exists in --cache-dir, else built);
    returns it and the seconds spent building it (0 when reused)."""
    from ladder_kernels.units import parse_bytes

    shares = order.shares(rank)
    unique = list(dict.fromkeys(i for share in shares for i in share))
    sig = signature(model, cfg, [ids for ids, _ in rows(unique)], rank, world, dtype)
    folder = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    path = folder / cache_name(sig)
    built = 0.0
    if not path.is_file():
        built = build_cache(path, sig, model, by_length(shares, rows), rows, pad_id, show_progress=main)
    elif main:
        print(f"reusing the backbone-state cache {path}", file=sys.stderr)
    cache = StateCache(path, sig, parse_bytes(cfg.cache_memory))
    cache.reused = built == 0.0
    return cache, built


def cache_summary(cache: StateCache, built: float, replayed: int, batches: int) -> dict:
    """The summary's `state_cache` entry; time saved: caching-pass seconds per batch x batches replayed - this build."""
    per_batch = cache.header["backbone_seconds"] / max(1, batches)
    return {
        "path": str(cache.path),
        "bytes": cache.size,
        "bytes_per_example": cache.bytes_per_example,
        "examples": len(cache.entries),
        "storage": cache.header["storage"],
        "reused": cache.reused,
        "build_seconds": built,
        "first_build_seconds": cache.header["backbone_seconds"],  # when the cache was made, by this run or another
        "backbone_seconds_per_batch": per_batch,
        "replayed_batches": replayed,
        "backbone_seconds_saved": per_batch * replayed - built,
        "held_in_memory_bytes": cache.held_bytes,
        "bytes_per_token": state_cache_bytes_per_token(cache.hidden, len(cache.keys), cache.header["storage"]),
    }


class RunCache:
    """A TrainingRun's epochs (`batch(step)`: step -> its batch key and indices) and its cache (`states`)."""

    def __init__(self, run):
        cfg = run.cfg
        self.steps_per_epoch, self.steps_per_batch = cfg.steps_in_effect, cfg.steps_per_batch
        self.batches = -(-self.steps_per_epoch // self.steps_per_batch)  # per epoch
        dataset = run.dataset
        classes = [dataset.label_of(ex) for ex in dataset.train] if dataset.is_classification else None
        self.order = EpochOrder(run.stream, self.batches, cfg.batch_size, run.world_size, classes, cfg.seed)
        self.cache, self.built = open_or_build(
            run.model,
            cfg,
            self.order,
            run._rows,
            run.tokenizer.pad_token_id,
            run.rank,
            run.world_size,
            cfg.torch_dtype,
            main=run.rank == 0,
        )
        self.replayed = 0  # batches trained from the cache in this session

    def batch(self, step: int) -> tuple[tuple[int, int], list[int]]:
        epoch, j = divmod(step, self.steps_per_epoch)
        b = j // self.steps_per_batch
        return (epoch, b), self.order.indices(epoch, b)

    def states(self, indices: Sequence[int], width: int, device) -> dict:
        return self.cache.states(indices, width, device)

    def close(self) -> None:
        self.cache.close()

    def summary(self) -> dict:
        return cache_summary(self.cache, self.built, self.replayed, self.batches)
