"""What a user installing from a wheel or an sdist gets: the wheel carries the C++ sources (for the just-in-time
build) as ladder_kernels/csrc/, the compiled ladder_kernels._C, the planner configs, and complete metadata; the
sdist carries csrc/ and what setup.py needs.

Both are built from a copy of the repository in a temporary folder (build/ and *.egg-info land there, never in
the checkout). The wheel build compiles the C++ extension with the torch of this interpreter
(--no-build-isolation, as the Makefile installs): a few minutes, 8 on a busy 2-core CPU."""

import email.parser
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import ladder_kernels

pytestmark = pytest.mark.slow  # one C++ compile of the extension (minutes on a busy 2-core CPU); never skipped

ROOT = Path(__file__).resolve().parents[2]
CSRC = sorted((ROOT / "csrc").glob("*.cpp"))
CONFIGS = sorted((ROOT / "ladder_kernels" / "configs").glob("*.json"))
BUILD_TIMEOUT_S = 1800
IGNORED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.so",
    ".pytest_cache",
    ".hypothesis",
    ".benchmarks",
    "runs",
    "outputs",
)


def _copy_repo(dest: Path) -> Path:
    """The repository's tracked and not-ignored files (git), else the folder minus build outputs and venvs."""
    try:
        cmd = ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
        listed = subprocess.run(cmd, check=True, capture_output=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        listed = None
    if not listed:
        shutil.copytree(ROOT, dest, ignore=IGNORED)
        return dest
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():  # listed but deleted in the worktree: skip
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)  # the build must see only the copy's sources
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    output = f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{output}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_repo(tmp / "src")
    out = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)], cwd=tmp)
    wheels = list(out.glob("ladder_kernels-*.whl"))
    assert len(wheels) == 1, f"expected one ladder_kernels wheel in {out}, got {sorted(p.name for p in out.iterdir())}"
    with zipfile.ZipFile(wheels[0]) as zf:
        yield zf


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tarfile.TarFile:
    tmp = tmp_path_factory.mktemp("sdist")
    src = _copy_repo(tmp / "src")
    out = tmp / "dist"
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"], cwd=src)
    sdists = list(out.glob("ladder_kernels-*.tar.gz"))
    assert len(sdists) == 1, f"expected one ladder_kernels sdist in {out}, got {sorted(p.name for p in out.iterdir())}"
    with tarfile.open(sdists[0]) as tf:
        yield tf


def _metadata(wheel: zipfile.ZipFile):
    [name] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.parser.Parser().parsestr(wheel.read(name).decode())


def test_repo_has_what_the_checks_compare():
    assert CSRC and CONFIGS, f"no csrc/*.cpp or ladder_kernels/configs/*.json under {ROOT}"


def test_wheel_ships_the_cpp_sources_byte_for_byte(wheel):
    names = set(wheel.namelist())
    missing = [p.name for p in CSRC if f"ladder_kernels/csrc/{p.name}" not in names]
    assert not missing, f"the wheel lacks ladder_kernels/csrc/ for {missing} (the just-in-time build needs them)"
    for p in CSRC:
        shipped = wheel.read(f"ladder_kernels/csrc/{p.name}")
        assert shipped == p.read_bytes(), f"ladder_kernels/csrc/{p.name} differs from csrc/{p.name}"


def test_wheel_ships_the_compiled_extension(wheel):
    compiled = [n for n in wheel.namelist() if n.startswith("ladder_kernels/_C") and n.endswith(".so")]
    assert len(compiled) == 1, f"expected one compiled ladder_kernels/_C*.so in the wheel, got {compiled}"
    assert wheel.getinfo(compiled[0]).file_size > 0


def test_wheel_ships_the_planner_configs(wheel):
    names = set(wheel.namelist())
    missing = [p.name for p in CONFIGS if f"ladder_kernels/configs/{p.name}" not in names]
    assert not missing, f"the wheel lacks ladder_kernels/configs/{missing}"


def test_wheel_metadata(wheel):
    meta = _metadata(wheel)
    assert meta["Version"] == ladder_kernels.__version__
    requires = {Requirement(r).name.lower(): Requirement(r) for r in meta.get_all("Requires-Dist", [])}
    runtime = {name for name, req in requires.items() if req.marker is None or "extra" not in str(req.marker)}
    for needed in (
        "torch",
        "transformers",
        "bitsandbytes",
        "safetensors",
        "accelerate",
        "peft",
        "gguf",
        "matplotlib",
        "numpy",
        "tqdm",
        "ninja",
    ):
        assert needed in runtime, f"{needed} is not a runtime Requires-Dist of the wheel (got {sorted(runtime)})"
    assert "Apache-2.0" in (meta.get("License-Expression") or "")
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel.namelist()), "the wheel lacks its LICENSE"
    entry_points = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert entry_points and b"ladder-kernels = ladder_kernels.cli:main" in wheel.read(entry_points[0])


def test_sdist_carries_csrc_and_build_files(sdist):
    members = {m.name.split("/", 1)[1]: m for m in sdist.getmembers() if "/" in m.name}
    for p in CSRC:
        assert f"csrc/{p.name}" in members, f"the sdist lacks csrc/{p.name}"
        assert sdist.extractfile(members[f"csrc/{p.name}"]).read() == p.read_bytes()
    for needed in (
        "setup.py",
        "pyproject.toml",
        "LICENSE",
        "README.md",
        "ladder_kernels/_version.py",
        *(f"ladder_kernels/configs/{p.name}" for p in CONFIGS),
    ):
        assert needed in members, f"the sdist lacks {needed}"
    assert not [n for n in members if n.endswith(".so")], "the sdist carries compiled objects"
