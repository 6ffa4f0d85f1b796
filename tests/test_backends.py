"""resolve_backend: memoised per (device type, backend, op, kernel, TRITON_INTERPRET), with its checks intact."""

import pytest
import torch

from ladder_kernels import backends
from tests.helpers import require_backend


def test_resolution_is_memoised_and_follows_triton_interpret(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        backends.resolve_backend(cpu, "triton", "nf4_matmul", "nf4_matmul")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.resolve_backend(cpu, "triton", "nf4_matmul", "nf4_matmul") == "triton"
    hits = backends._resolve_backend.cache_info().hits
    assert backends.resolve_backend(cpu, "triton", "nf4_matmul", "nf4_matmul") == "triton"
    assert backends._resolve_backend.cache_info().hits == hits + 1


def test_default_backend_on_cpu():
    require_backend("cpu")
    assert backends.resolve_backend(torch.device("cpu"), None, "nf4_matmul", "nf4_matmul") == "cpu"
    assert backends.resolve_backend(torch.device("cpu"), None, "op", "no_such_kernel") == "torch"


@pytest.mark.parametrize("bad", ["cuda", "TORCH", ["cpu"], 3])
def test_bad_backend_names_the_argument(bad):
    with pytest.raises(ValueError, match=r"my_op: backend must be one of .* or None, got"):
        backends.resolve_backend(torch.device("cpu"), bad, "my_op", "nf4_matmul")
