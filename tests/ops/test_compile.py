"""torch.compile(fullgraph=True) on CPU (inductor) of the public ops and of LadderModel's loss.

Each case compiles one function with fullgraph=True (any graph break raises) and dynamic=False, and compares
the compiled output and gradients with the same call run eagerly on the same inputs. The ops' kernels are
opaque custom ops, so compiled and eager run the same kernel; inductor compiles what is around them (reshapes,
casts, the bias add, the loss reduction) and the backward graph. Shapes are tiny and odd (not multiples of the
NF4 blocksize, of any tile, or of each other). That each op's fake implementation matches its real one is
torch.library.opcheck's job (test_opcheck in the ops' own test files).

What compiles with fullgraph=True here (torch 2.13, CPU):
  - nf4_matmul, downproj and fused_linear_cross_entropy, on the "torch" and "cpu" backends (the "cpu" backend
    needs resolve_backend to be a constant for dynamo: it checks the file system to load the extension);
  - LadderModel.forward(labels=...) when it replays the backbone's outputs (backbone_states): the side network,
    the ladders' down-projections, the gates, the output mix and the fused loss, forward and backward;
  - the backbone's own transformers forward with NF4Linear layers (not tested here; checked by hand).
What does not: LadderModel.forward running the backbone, because it registers forward hooks on the backbone's
decoder layers at every call (RemovableHandle's class-level id counter cannot be traced); compiled without
fullgraph it runs with graph breaks there. A forward with an attention_mask that has padding also breaks the
graph (`bool(attention_mask.all())` picks the mask).
"""

from __future__ import annotations

import pytest
import torch

import ladder_kernels as lk
from ladder_kernels import LadderConfig, LadderModel, quantize_nf4
from tests.helpers import rel_err, require_backend, tiny_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["torch", "cpu"]
# compiled vs eager: the same kernels; inductor may fuse and reorder the few ops around them. fp32: a few ulps;
# bf16: one bf16 ulp (2**-8) where inductor fuses a cast or an add that eager rounds separately. Measured: at
# most 1e-7 in every case (0 for nf4_matmul and downproj in bf16; the cross-entropy's losses are fp32).
TOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3}
CASES = [("torch", torch.float32), ("cpu", torch.float32), ("cpu", torch.bfloat16)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _run(fn, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn(*inputs) and the gradients of a random projection of it w.r.t. the inputs that require grad."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    (out.float() * weight).sum().backward()
    return out.detach(), [t.grad for t in inputs if t.requires_grad]


def _check(fn, inputs, dtype):
    eager_out, eager_grads = _run(fn, inputs)
    compiled_out, compiled_grads = _run(_compiled(fn), inputs)
    assert compiled_out.dtype == eager_out.dtype and compiled_out.shape == eager_out.shape
    assert rel_err(compiled_out, eager_out) < TOL[dtype]
    assert len(compiled_grads) == len(eager_grads) > 0
    for got, want in zip(compiled_grads, eager_grads):
        assert got.dtype == want.dtype and got.shape == want.shape and want.norm() > 0
        assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("backend,dtype", CASES)
def test_nf4_matmul_compiles_fullgraph(backend, dtype):
    require_backend(backend)
    q = quantize_nf4(torch.randn(37, 70))  # 2590 weights: the last NF4 block is partial
    x = torch.randn(3, 5, 70, dtype=dtype, requires_grad=True)
    bias = torch.randn(37, dtype=dtype, requires_grad=True)
    _check(lambda x, bias: lk.nf4_matmul(x, q, bias, backend=backend), [x, bias], dtype)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_downproj_compiles_fullgraph(backend, dtype, storage):
    require_backend(backend)
    h = torch.randn(3, 5, 70, dtype=dtype)  # from the frozen backbone: no grad
    weight = torch.randn(11, 70, requires_grad=True)  # fp32 master weights
    bias = torch.randn(11, requires_grad=True)
    _check(
        lambda h, weight, bias: lk.downproj(h, weight, bias, storage=storage, backend=backend), [h, weight, bias], dtype
    )


@pytest.mark.parametrize("backend,dtype", CASES)
def test_fused_linear_cross_entropy_compiles_fullgraph(backend, dtype):
    require_backend(backend)
    hidden = torch.randn(3, 5, 70, dtype=dtype, requires_grad=True)
    weight = torch.randn(93, 70, dtype=dtype)  # frozen lm_head
    labels = torch.randint(0, 93, (3, 5))
    labels[0, 1] = labels[2, 4] = -100

    def loss(hidden):  # 15 tokens in chunks of 4: three full chunks and a partial one
        return lk.fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4, softcap=7.0, backend=backend)

    _check(loss, [hidden], dtype)


def _ladder_model(backend: str) -> LadderModel:
    torch.manual_seed(0)
    model = LadderModel(
        tiny_backbone("llama", num_layers=2, seed=0),
        LadderConfig(backend=backend, side_init="random", init_std=0.05, ladder_storage="int8"),
    )
    with torch.no_grad():  # side_init="random" zeroes up_proj: perturb every side weight so all get gradients
        for p in model.side.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.train()


def _loss_and_grads(model: LadderModel, fn, ids, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn(ids, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", ["cpu"])
def test_ladder_model_loss_on_replayed_backbone_compiles_fullgraph(backend):
    """Compiled: LadderModel.forward(input_ids, labels, backbone_states=<filled dict>), the side network and the
    fused loss with their backward, as one graph. Not compiled: the backbone forward that filled the dict (run
    eagerly once, as finetune --steps-per-batch does; see the module docstring for why)."""
    require_backend(backend)
    model = _ladder_model(backend)
    ids = torch.randint(3, 96, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100  # prompt tokens: the eager forward selects the scored rows, the compiled one keeps all
    states: dict = {}
    with torch.no_grad():
        model(input_ids=ids, labels=labels, backbone_states=states)  # the eager backbone run fills the dict

    def loss(ids, labels):
        return model(input_ids=ids, labels=labels, backbone_states=states).loss

    eager_loss, eager_grads = _loss_and_grads(model, loss, ids, labels)
    compiled_loss, compiled_grads = _loss_and_grads(model, _compiled(loss), ids, labels)
    # the replay is the full forward (tested in test_ladder_streaming); here the compiled replay is the eager one
    full_loss, _ = _loss_and_grads(model, lambda i, lab: model(input_ids=i, labels=lab).loss, ids, labels)
    assert torch.equal(eager_loss, full_loss)
    # fp32; measured: loss equal, gradients within 6e-7 (inductor fuses the side blocks' norms, RoPE and SwiGLU)
    assert rel_err(compiled_loss, eager_loss) < 1e-6
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 10
    for name, want in eager_grads.items():
        assert want.norm() > 0, name
        assert rel_err(compiled_grads[name], want) < 5e-6, name


@pytest.mark.xfail(
    strict=True,
    raises=torch._dynamo.exc.Unsupported,
    reason="LadderModel.forward registers forward hooks on the backbone's layers at each call",
)
def test_ladder_model_full_forward_does_not_compile_fullgraph_yet():
    """The known limitation, kept visible: this starts passing (and so fails, strict) once the backbone's hooks
    are registered outside the forward; then the README and the replay test above can cover the full forward."""
    model = _ladder_model("cpu")
    ids = torch.randint(3, 96, (2, 9))
    _compiled(lambda ids: model(input_ids=ids, labels=ids).loss)(ids)
