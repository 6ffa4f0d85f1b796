"""Test setup. TRITON_INTERPRET must be set before anything imports triton, so the Triton kernels run on
CPU tensors here when there is no GPU."""
import os
import shutil

if not os.environ.get("TRITON_INTERPRET") and not shutil.which("nvidia-smi"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so any element a kernel forgets to write shows up."""
    return t.fill_(float("nan"))


CPU_BACKENDS = ["torch", "cpu", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
