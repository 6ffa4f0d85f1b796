"""Test setup. TRITON_INTERPRET must be set before anything imports triton, so the Triton kernels run on
CPU tensors here when there is no GPU."""
import os
import shutil

if not os.environ.get("TRITON_INTERPRET") and not shutil.which("nvidia-smi"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_device(request):
    """Seed every test; on a GPU machine, tests parametrized with backend="triton" build their tensors on
    CUDA (the compiled kernels), while the torch and cpu backends stay on CPU."""
    torch.manual_seed(1234)
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    on_gpu = params.get("backend") == "triton" and torch.cuda.is_available()
    if on_gpu:
        torch.set_default_device("cuda")
    yield
    if on_gpu:
        torch.set_default_device(None)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny end-to-end runs (pytestmark = usefixtures("one_thread")): tiny tensors gain nothing
    from threads, and on a busy shared CPU OpenMP spinning makes them 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny Llama checkpoint folder (config, safetensors, tokenizer), one per test module."""
    from tests.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so any element a kernel forgets to write shows up."""
    return t.fill_(float("nan"))


CPU_BACKENDS = ["torch", "cpu", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def require_backend(backend: str) -> None:
    """Skip a backend's test only where it was switched off on purpose (LADDER_KERNELS_NO_CPU_EXT=1, or no
    triton installed); a backend that should work here but does not is a failure, not a skip."""
    from ladder_kernels import backend_info

    info = backend_info()
    usable = {"torch": True, "cpu": info["cpu"], "triton": info["triton"] or info["triton_interpret"]}
    if usable[backend]:
        return
    why = info["why_not"].get("cpu" if backend == "cpu" else "triton_interpret")
    if backend == "cpu" and os.environ.get("LADDER_KERNELS_NO_CPU_EXT") == "1" or "not installed" in str(why):
        pytest.skip(f"backend {backend!r} switched off here: {why}")
    pytest.fail(f"backend {backend!r} should be available here but is not: {why}")
