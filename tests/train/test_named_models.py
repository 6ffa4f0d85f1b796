"""--model gemma3-270m: the GGUF joined from its part packages once, checked, written atomically."""

from __future__ import annotations

import hashlib
import sys

import pytest

from ladder_kernels.errors import ModelError
from ladder_kernels.train import backbones


def _fake_package(root, parts: list[bytes], sha: str):
    pkg = root / backbones.GEMMA3_PACKAGE
    pkg.mkdir()
    for k, data in enumerate(parts):
        (pkg / f"part{k}").write_bytes(data)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "MODEL_NAME = 'model.gguf'\n"
        f"EXPECTED_SHA256 = {sha!r}\n"
        f"def chunk_paths():\n    return [Path(__file__).parent / f'part{{k}}' for k in range({len(parts)})]\n"
    )


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LADDER_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delitem(sys.modules, backbones.GEMMA3_PACKAGE, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (tmp_path / "site").mkdir()
    return tmp_path


def test_parts_are_joined_once_in_order(fake_env):
    parts = [b"GGUF" + bytes(range(200)), bytes(range(255, 0, -1)) * 3]
    _fake_package(fake_env / "site", parts, hashlib.sha256(b"".join(parts)).hexdigest())
    path = backbones.gemma3_gguf_path()
    assert path == fake_env / "cache" / "gguf" / "model.gguf"
    assert path.read_bytes() == b"".join(parts)
    assert not list(path.parent.glob(".tmp-*"))
    mtime = path.stat().st_mtime_ns
    assert backbones.gemma3_gguf_path() == path and path.stat().st_mtime_ns == mtime  # not joined again


def test_a_wrong_checksum_is_refused_and_nothing_written(fake_env):
    _fake_package(fake_env / "site", [b"abc", b"def"], "0" * 64)
    with pytest.raises(ModelError, match="sha256"):
        backbones.gemma3_gguf_path()
    assert not (fake_env / "cache" / "gguf" / "model.gguf").exists()


def test_missing_packages_name_the_requirements_file(monkeypatch):
    monkeypatch.setattr(backbones.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="--model gemma3-270m needs the PyPI packages in requirements-bench.txt"):
        backbones.resolve_model("gemma3-270m")
