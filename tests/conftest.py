"""Test setup. TRITON_INTERPRET must be set before anything imports triton, so the Triton kernels run on
CPU tensors here when there is no GPU."""

import os
import shutil

if not os.environ.get("TRITON_INTERPRET") and not shutil.which("nvidia-smi"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import write_tiny_checkpoint  # noqa: E402

# What bench/gpu_check runs on a CUDA machine (`pytest -m gpu`): the Triton kernels' own tests, every op test
# parametrized with backend="triton" (compiled there, interpreted here), and tests marked @pytest.mark.gpu.
GPU_PATH_MODULES = ("tests/kernels/test_triton_",)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: on the GPU path (Triton kernels, ops and LadderModel on CUDA): what bench/gpu_check runs"
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        path = item.path.relative_to(config.rootpath).as_posix()
        if params.get("backend") == "triton" or path.startswith(GPU_PATH_MODULES):
            item.add_marker(pytest.mark.gpu)


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
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")
