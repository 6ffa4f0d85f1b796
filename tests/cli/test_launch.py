"""The `ladder-kernels` command sets OMP_WAIT_POLICY=PASSIVE before torch is imported unless the user set it, and
leaves a library import alone. Checked in child processes: a sitecustomize module (on the child's PYTHONPATH)
records the variable at the moment the child first imports torch, which is when OpenMP reads it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ladder_kernels import _launch
from tests.helpers import REPO

SPY = '''
import os, sys

class _TorchImportSpy:
    """Writes OMP_WAIT_POLICY as it is when `import torch` starts, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            with open(os.environ["LK_SPY_OUT"], "w") as f:
                f.write(os.environ.get("OMP_WAIT_POLICY", "<unset>"))
        return None

sys.meta_path.insert(0, _TorchImportSpy())
'''

CONSOLE_SCRIPT = """import sys
from ladder_kernels.cli import main
if __name__ == "__main__":
    sys.exit(main())
"""  # what pip writes for the console-script entry point `ladder_kernels.cli:main`


def _policy_at_torch_import(tmp_path, argv: list[str], user_value: str | None) -> tuple[str, str]:
    """(OMP_WAIT_POLICY when the child imported torch, the child's stdout)."""
    spy_dir = tmp_path / "spy"
    spy_dir.mkdir(exist_ok=True)
    (spy_dir / "sitecustomize.py").write_text(SPY, encoding="utf-8")
    out = tmp_path / "policy.txt"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(PYTHONPATH=os.pathsep.join([str(spy_dir), str(REPO)]), LK_SPY_OUT=str(out))
    if user_value is not None:
        env["OMP_WAIT_POLICY"] = user_value
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.exists(), "the child never imported torch"
    return out.read_text(encoding="utf-8"), proc.stdout


@pytest.mark.parametrize("user_value, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_python_m_sets_the_default_before_torch_and_keeps_the_users(tmp_path, user_value, expected):
    policy, stdout = _policy_at_torch_import(tmp_path, [sys.executable, "-m", "ladder_kernels", "--help"], user_value)
    assert policy == expected
    source = "set by ladder-kernels" if user_value is None else "yours"
    assert f"OMP_WAIT_POLICY={expected} ({source}" in stdout  # --help says what it does and what it did


def test_console_script_sets_the_default_before_torch(tmp_path):
    script = tmp_path / "ladder-kernels"
    script.write_text(CONSOLE_SCRIPT, encoding="utf-8")
    policy, _ = _policy_at_torch_import(tmp_path, [sys.executable, str(script), "--help"], None)
    assert policy == "PASSIVE"


def test_a_library_import_changes_nothing(tmp_path):
    policy, _ = _policy_at_torch_import(tmp_path, [sys.executable, "-c", "import ladder_kernels"], None)
    assert policy == "<unset>"


@pytest.mark.parametrize(
    "orig_argv, expected",
    [
        (["python", "-m", "ladder_kernels", "finetune"], True),
        (["python", "-u", "-X", "dev", "-m", "ladder_kernels"], True),  # torchrun's children run `python -u -m`
        (["python", "-mladder_kernels"], True),
        (["python", "-m", "pytest", "-m", "ladder_kernels"], False),
        (["python", "-m", "ladder_kernels_extra"], False),
        (["python", "train.py", "-m", "ladder_kernels"], False),
        (["python", "-c", "import ladder_kernels", "-m", "ladder_kernels"], False),
        (["python"], False),
    ],
)
def test_runs_as_module(orig_argv, expected):
    assert _launch.runs_as_module(orig_argv) is expected


def test_user_value_wins_even_when_empty():
    environ = {"OMP_WAIT_POLICY": ""}
    assert _launch.apply_cli_env_defaults(environ, cli=True) == {}
    assert environ == {"OMP_WAIT_POLICY": ""}
    environ = {}
    assert _launch.apply_cli_env_defaults(environ, cli=True) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert _launch.apply_cli_env_defaults({}, cli=False) == {}
