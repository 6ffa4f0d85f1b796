"""Atomic writes: readers see the old file (or folder) or the new one, never a partial write."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes | bytearray) -> None:
    """Write to a temporary file in the same folder, fsync, then os.replace."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(
        dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=os.path.basename(path)
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(target: Path, replace: bool = False):
    """Yields a temporary folder next to `target`, renamed to `target` when the block succeeds (removed when it
    fails). replace=True swaps out an existing `target`; otherwise an existing complete target (made by a
    concurrent writer) is kept."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # a plain mkdir (not mkdtemp, which makes it owner-only) gives the folder the user's usual permissions
    tmp = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        yield tmp
        if replace and target.exists():
            old = target.with_name(f".old-{target.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            shutil.rmtree(old)
        try:
            os.replace(tmp, target)
        except OSError:
            if replace or not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
