"""bench/gpu_aot, the ahead-of-time compile check of the Triton kernels for sm_80/86/89/90 without a GPU: its quick
subset passes (what CI checks of GPU readiness), and it fails when a card's shared memory is too small."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import triton  # noqa: E402

from tests.helpers import REPO  # noqa: E402

SCRIPT = REPO / "bench" / "gpu_aot"


def run_aot(*args, timeout=900):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("this Triton ships no ptxas: nothing can be compiled for a GPU here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, lines, proc.stderr


def test_quick_subset_passes(tmp_path):
    rc, lines, err = run_aot("--quick", "--out", str(tmp_path / "aot"))
    assert rc == 0, "\n".join(lines[-40:]) + err[-3000:]
    assert lines[-1].startswith("gpu_aot: PASS: sm_86,sm_90;"), lines[-1]
    md = (tmp_path / "aot.md").read_text()
    assert "| sm_86 | 101376 |" in md and "| sm_90 | 232448 |" in md
    csv_rows = (tmp_path / "aot.csv").read_text().splitlines()
    assert csv_rows[0].startswith("target,shape,config,default,kept,shared,regs,spills")
    rows = [r.split(",") for r in csv_rows[1:]]
    assert {r[0] for r in rows} == {"86", "90"} and len(rows) > 50
    assert all(int(r[5]) > 0 and int(r[6]) > 0 and int(r[7]) >= 0 for r in rows)  # shared, registers, spills read
    assert any(r[8] == "wgmma" for r in rows if r[0] == "90") and not any(r[8] == "wgmma" for r in rows if r[0] == "86")


def test_fails_when_shared_memory_is_too_small():
    rc, lines, _ = run_aot(
        "--targets", "86", "--shapes", "nf4 fwd M=1 K4096 bf16$", "--shared-limit", "86=2048", "--no-every-config"
    )
    assert rc == 1, lines[-20:]
    assert lines[-1].startswith("gpu_aot: FAIL: sm_86;"), lines[-1]
    assert any("no config survives pruning within 2048 B" in line for line in lines)


def test_bad_arguments_fail():
    rc, lines, err = run_aot("--targets", "eighty-six")
    assert rc == 2 and "bad --targets" in err
    rc, lines, _ = run_aot("--shapes", "no such shape")
    assert rc == 2 and "no call shape matches" in lines[-1]
