"""bench/gpu_check and bench/gpu_wheels on CPU: the arguments every step passes on a GPU machine are accepted,
the wheels install from a folder, a failing or stopped step is recorded and the next one runs, and summary.md
holds the README's GPU targets, worked out from the benches' own CSV writers."""

from __future__ import annotations

import base64
import hashlib
import importlib.machinery
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import zipfile
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO


def _load(name: str, path: Path):
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    sys.modules[name] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


sys.path.insert(0, str(REPO / "bench"))
gpu_check = _load("gpu_check", REPO / "bench/gpu_check")
gpu_wheels = _load("gpu_wheels", REPO / "bench/gpu_wheels")
import gpu_summary  # noqa: E402 - bench/, put on sys.path above


def make_wheel(folder: Path, name: str, files: dict[str, bytes], version: str = "1.0") -> Path:
    """A minimal valid wheel (METADATA, WHEEL, top_level.txt, RECORD with hashes) holding `files`."""
    info = f"{name}-{version}.dist-info"
    files = dict(files)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{info}/top_level.txt"] = f"{name}\n".encode()
    digest = lambda data: base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()  # noqa: E731
    record = "".join(f"{path},sha256={digest(data)},{len(data)}\n" for path, data in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


# --- arguments -------------------------------------------------------------------------------------------------
def test_the_gpu_runs_arguments_are_accepted_and_bad_ones_named(tmp_path, capsys):
    bench = ["--device", "cuda", *gpu_check.BENCH_ARGS, "--out-dir", str(tmp_path)]
    assert gpu_summary.check_args("bench", bench) == 0
    e2e = ["--device", "cuda", "--methods", "ladder,xladder,qlora", *gpu_check.E2E_ARGS, "--out-dir", str(tmp_path)]
    assert gpu_summary.check_args("e2e", e2e) == 0
    out = capsys.readouterr().out
    assert "8 cases x 1 dtypes, backends ['triton', 'torch']" in out and "models ['llama-2-7b']" in out
    assert not torch.cuda.is_available() or torch.cuda.device_count()  # the check's patch did not leak
    # what the old script passed (argparse takes --model and --seq-len as abbreviations): no such model
    assert gpu_summary.check_args("e2e", ["--device", "cuda", "--model", "7b-shaped", "--seq-len", "2048"]) == 2
    assert "model '7b-shaped' is none of" in capsys.readouterr().err
    assert gpu_summary.check_args("e2e", ["--device", "cuda", "--methods", "lora"]) == 2
    assert "methods must be from" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_summary.check_args("bench", ["--device", "cuda", "--shapes", "4096"])


@pytest.mark.parametrize(
    "argv,needle",
    [(["--steps", "tests gpu"], "--steps"), (["--budget", "soon"], "--budget"), (["--budget", "5"], "--budget")],
)
def test_bad_options_name_the_option(argv, needle, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(argv)
    assert needle in capsys.readouterr().err


# --- steps ---------------------------------------------------------------------------------------------------
@pytest.fixture
def make_check():
    """gpu_check.Check(parse_args(argv)), its scratch folder removed afterwards (main() removes it in a run)."""
    made = []
    yield lambda argv: made.append(gpu_check.Check(gpu_check.parse_args(argv))) or made[-1]
    for check in made:
        shutil.rmtree(check.work, ignore_errors=True)


def test_a_failing_or_stopped_step_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch, make_check):
    monkeypatch.setitem(gpu_check.CAPS_S, "build", 2)
    monkeypatch.setattr(gpu_check, "DRY_SCALE", 1)
    check = make_check(["--dry-run", "--out", str(tmp_path / "out"), "--budget", "60"])
    py = sys.executable
    failed = check.run("env", [[py, "-c", "print('first'); raise SystemExit(3)"], [py, "-c", "print('never')"]])
    stopped = check.run("build", [[py, "-c", "import time; print('slow', flush=True); time.sleep(60)"]])
    passed = check.run("tests", [[py, "-c", "print('ok')"]])
    assert [s.status for s in check.steps] == ["FAIL (exit 3)", "TIMEOUT after 2s", "PASS"]
    assert (failed.ok, stopped.ok, passed.ok) == (False, False, True) and stopped.seconds < 30
    assert "first" in (check.work / "env.log").read_text() and "never" not in (check.work / "env.log").read_text()
    assert "slow" in (check.work / "build.log").read_text()


def test_wheels_install_from_the_folder_onto_the_steps_path(tmp_path, make_check):
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "gpucheck_dummy", {"gpucheck_dummy/__init__.py": b"VALUE = 42\n"})
    assert gpu_check.top_level_names(next(wheels.glob("*.whl"))) == ["gpucheck_dummy"]
    check = make_check(["--dry-run", "--out", str(tmp_path / "out"), "--wheels", str(wheels)])
    check.py = sys.executable
    gpu_check.step_wheels(check)
    assert [s.status for s in check.steps] == ["PASS"], (check.work / "wheels.log").read_text()
    site = check.work / "site"
    assert f"gpucheck_dummy -> {site}" in (check.work / "wheels.log").read_text()
    code = "import gpucheck_dummy; print(gpucheck_dummy.VALUE, gpucheck_dummy.__file__)"
    out = subprocess.run([sys.executable, "-c", code], env=check.env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["42", str(site / "gpucheck_dummy/__init__.py")]
    empty = make_check(["--dry-run", "--wheels", str(tmp_path / "none")])
    gpu_check.step_wheels(empty)
    assert empty.steps[0].status.startswith("SKIP: no wheels")


def test_dry_run_end_to_end_with_a_wheel(tmp_path):
    """The script itself, as CI can afford it: wheels and env steps, results folder, exit status."""
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "gpucheck_dummy", {"gpucheck_dummy/__init__.py": b"VALUE = 42\n"})
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "GPU_CHECK_DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable}
    cmd = [sys.executable, str(REPO / "bench/gpu_check"), "--steps", "wheels env", "--wheels", str(wheels)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "DRY RUN on CPU" in summary and "| wheels | PASS |" in summary and "| env | PASS |" in summary
    assert "overall: PASS" in summary and f"torch {torch.__version__}" in summary
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"wheels.log", "env.log", "env.json"} <= set(tar.getnames())


# --- summary.md ----------------------------------------------------------------------------------------------
def _kernel_csv(work: Path, medians: dict[tuple[int, str], float]) -> None:
    """nf4_matmul_cuda.csv written by bench_nf4_matmul's own to_csv, from rows with time_case's columns."""
    import bench_nf4_matmul as bnm

    q = bnm.quantize_nf4(torch.randn(64, 64) * 0.02, blocksize=64, double_quant=True)
    args = Namespace(device="cpu", backends=["torch"], warmup=1, repeats=1)
    template = bnm.time_case(64, 64, 1, torch.float32, q, bnm.dequantize_nf4(q, torch.float32), args)[0]
    rows = []
    for (m, method), ms in medians.items():
        dense = medians[m, "dense"]
        rows.append(dict(template, method=method, dtype="bfloat16", M=m, N=4096, K=4096, median_ms=ms,
                         ratio_vs_dense=round(ms / dense, 3)))  # fmt: skip
    (work / "nf4_matmul_cuda.csv").write_text(bnm.to_csv(rows, {"device": "cuda"}))


def _e2e_csv(work: Path) -> None:
    from ladder_kernels.planning.bench_report import csv_text

    values = {"ladder": (3.0, 2.9, 9000.0), "xladder": (2.5, 2.5, 9500.0), "qlora": (12.0, 11.0, 3000.0)}
    rows = [
        dict(
            method=method,
            model="llama-2-7b",
            seq_len=2048,
            batch=1,
            device="cuda",
            metric=metric,
            value=value,
            versions="v",
            timestamp="t",
            command="c",
        )  # fmt: skip
        for method, (peak, planned, tps) in values.items()
        for metric, value in (
            ("cuda_peak_bytes", peak * 2**30),
            ("planned_peak_bytes", planned * 2**30),
            ("tokens_per_s", tps),
            ("loss_first", 10.0),
            ("loss_last", 9.0),
            ("oom", 0),
        )  # fmt: skip
    ]
    # gpu_check runs QLoRA separately (tag cuda_qlora): the summary reads both
    (work / "e2e_cuda.csv").write_text(csv_text([r for r in rows if r["method"] != "qlora"]))
    (work / "e2e_cuda_qlora.csv").write_text(csv_text([r for r in rows if r["method"] == "qlora"]))


def test_summary_reads_the_targets_off_the_benches_csvs(tmp_path):
    ours, cached, bnb = "nf4_matmul[triton]", "nf4_matmul[triton] cached absmax", "bnb.matmul_4bit"
    medians = {(2048, "dense"): 1.0, (2048, ours): 1.05, (2048, cached): 1.0, (2048, bnb): 1.5}
    medians |= {(1, "dense"): 0.03, (1, ours): 0.02, (1, cached): 0.008, (1, bnb): 0.015}
    _kernel_csv(tmp_path, medians)
    _e2e_csv(tmp_path)
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.ops.test_a" name="test_ok"/>'
        '<testcase classname="tests.ops.test_a" name="test_bad"><failure message="boom">x</failure></testcase>'
        '<testcase classname="tests.nn.t" name="test_s"><skipped message="needs bitsandbytes"/></testcase>'
        "</testsuite></testsuites>"
    )
    (tmp_path / "tests.log").write_text("1 failed, 1 passed, 1 skipped\n")
    steps = [gpu_check.Step("tests", "FAIL (exit 1)", 100.0, ["pytest"]), gpu_check.Step("bench", "PASS", 50.0)]
    text = gpu_summary.summary_markdown(tmp_path, steps, False, "python3", 300.0, 460.0)
    assert "DRY RUN" not in text and "overall: FAIL: tests" in text
    assert "1 passed, 1 failed, 0 errors, 1 skipped." in text and "failure: tests.ops.test_a::test_bad: boom" in text
    assert "- 1 x needs bitsandbytes" in text
    # M=2048: 1/1.05 = 0.95x dense >= 0.9 (met); M=1: 0.03/0.02 = 1.5x < 3 (not met); slower than bnb at M=1
    assert f"| {ours} at M=2048, N x K = 4096 x 4096: >= 0.9x cuBLAS | 0.95x ({CACHED()}: 1.00x) | yes |" in text
    assert f"| {ours} at M=1, N x K = 4096 x 4096: >= 3.0x dense bf16 | 1.50x ({CACHED()}: 3.75x) | **no** |" in text
    assert "slower: 4096x4096 M=1: 1.33x | **no** |" in text
    assert "| llama-2-7b | 2048 | ladder | 3.00 | 0.25x | 2.90 | 0.967 | 9000 | 3.00x | 10.000 -> 9.000 |" in text
    assert "Ladder's measured peak on the 7B shape: 3.00 GiB, within a 12 GB card" in text
    dry = gpu_summary.summary_markdown(tmp_path, steps, True, "python3", 300.0, 460.0)
    assert "DRY RUN on CPU" in dry and "dry-run placeholders" in dry


def CACHED() -> str:
    return gpu_summary.CACHED


# --- bench/gpu_wheels ------------------------------------------------------------------------------------------
def test_bitsandbytes_repack_keeps_only_cuda130_and_cpu_and_installs(tmp_path):
    libs = {f"bitsandbytes/libbitsandbytes_{v}.so": v.encode() * 1000 for v in ("cpu", "cuda118", "cuda130", "xpu")}
    src = make_wheel(tmp_path / "src", "bitsandbytes", {"bitsandbytes/__init__.py": b"", **libs})
    out = tmp_path / "out" / src.name
    out.parent.mkdir()
    dropped = gpu_wheels.repack_bitsandbytes(src, out, cuda="130")
    assert sorted(dropped) == ["bitsandbytes/libbitsandbytes_cuda118.so", "bitsandbytes/libbitsandbytes_xpu.so"]
    gpu_wheels.check_record(out)  # RECORD rewritten to match
    with zipfile.ZipFile(out) as z:
        kept = sorted(n for n in z.namelist() if n.endswith(".so"))
    assert kept == ["bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"]
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site), str(out)]
    subprocess.run(pip, check=True, capture_output=True)
    assert (site / "bitsandbytes/libbitsandbytes_cuda130.so").read_bytes() == b"cuda130" * 1000
    with pytest.raises(ValueError, match="no libbitsandbytes_cuda126"):
        gpu_wheels.repack_bitsandbytes(src, tmp_path / "x.whl", cuda="126")
    with pytest.raises(SystemExit):
        gpu_wheels.parse_args(["--python-version", "312"])
