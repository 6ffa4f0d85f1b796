"""NF4Linear, quantize_model_ and patch_bnb_ on small transformers models (random weights, no downloads)."""

import pytest
import torch
from torch import nn

from ladder_kernels.nn import NF4Linear, patch_bnb_, quantize_model_
from ladder_kernels.quant import dequantize_nf4
from tests.helpers import rel_err

transformers = pytest.importorskip("transformers")


def tiny_llama(vocab=128, hidden=64, layers=2):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_matches_dequantized_linear(dtype):
    lin = nn.Linear(100, 37, bias=True)
    q = NF4Linear.from_linear(lin, compute_dtype=dtype)
    assert not any(p.requires_grad for p in q.parameters())
    assert "packed" in dict(q.named_buffers())
    x = torch.randn(4, 6, 100, requires_grad=True)
    out = q(x)
    ref = x.double() @ dequantize_nf4(q.nf4_weight, torch.float64).t() + lin.bias.double()
    assert out.dtype == x.dtype
    assert rel_err(out, ref) <= (1e-5 if dtype == torch.float32 else 1.5e-2)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_nf4_linear_state_dict_round_trip():
    q = NF4Linear.from_linear(nn.Linear(64, 32))
    q2 = NF4Linear.from_linear(nn.Linear(64, 32))
    q2.load_state_dict(q.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(q(x), q2(x))


def test_nf4_weight_is_reused_until_the_layer_tensors_change():
    lin = NF4Linear.from_linear(nn.Linear(96, 40))
    first = lin.nf4_weight
    assert lin.nf4_weight is first  # built once while the tensors are the same objects
    x = torch.randn(3, 96)
    before = lin(x)
    lin.load_state_dict(NF4Linear.from_linear(nn.Linear(96, 40)).state_dict())  # copied in place: still read
    assert lin.nf4_weight is first and rel_err(lin(x), before) > 1e-2
    lin.absmax = lin.absmax.clone()  # a new tensor object: a new weight
    assert lin.nf4_weight is not first and lin.nf4_weight.absmax is lin.absmax
    moved = lin.nf4_weight
    lin._apply(torch.clone)  # how .to(device) moves the tensors: nothing stale kept
    assert lin.nf4_weight is not moved and lin.nf4_weight.packed is lin.packed
    shardable = NF4Linear.from_linear(nn.Linear(96, 40)).make_shardable_()
    assert shardable.nf4_weight is not shardable.nf4_weight  # FSDP2 swaps the bytes: rebuilt every call
    assert shardable.matmul is not shardable.matmul


def test_prepared_matmul_follows_a_replaced_bias_or_backend():
    lin = NF4Linear.from_linear(nn.Linear(96, 40))
    x = torch.randn(5, 96)
    w64 = dequantize_nf4(lin.nf4_weight, torch.float64)
    first = lin.matmul
    assert lin.matmul is first
    lin.bias = nn.Parameter(torch.randn(40), requires_grad=False)
    assert lin.matmul is not first and lin.matmul.bias is lin.bias
    with torch.no_grad():
        assert rel_err(lin(x), x.double() @ w64.t() + lin.bias.double()) < 1e-5
    lin.backend = "torch"
    assert lin.matmul.backend == "torch" and rel_err(lin(x), x.double() @ w64.t() + lin.bias.double()) < 1e-5
    lin.bias = None
    with torch.no_grad():
        assert rel_err(lin(x), x.double() @ w64.t()) < 1e-5


def test_quantize_model_replaces_linears_and_keeps_outputs_close():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
    quantize_model_(model)
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["lm_head"] is nn.Linear  # skipped by default
    assert kinds["model.layers.0.self_attn.q_proj"] is NF4Linear
    assert not any(t is nn.Linear for n, t in kinds.items() if n != "lm_head")
    with torch.no_grad():
        out = model(ids).logits
    # 4-bit weights: close to, not equal to, the dense model
    assert rel_err(out, ref) < 0.15


def test_quantize_model_skip_patterns():
    model = tiny_llama()
    quantize_model_(model, skip_modules=("lm_head", "*.mlp.*"))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert type(model.model.layers[0].self_attn.o_proj) is NF4Linear


def _tiny_qlora(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")  # noqa: F841
    peft = pytest.importorskip("peft")
    tiny_llama().save_pretrained(tmp_path)
    qcfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qcfg, dtype=torch.float32)
    lcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    model = peft.get_peft_model(model, lcfg)
    # LoRA B starts at zero; make it non-zero so the adapters matter in the comparison
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    return model.train()  # as in training; in eval mode bitsandbytes repacks CPU weights with bf16 absmax


def test_patch_bnb_keeps_qlora_loss_and_lora_gradients(tmp_path):
    model = _tiny_qlora(tmp_path)
    ids = torch.randint(0, 128, (2, 9))

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_ref, grads_ref = loss_and_grads()
    n = patch_bnb_(model)
    assert n == 2 * 7  # 7 linear layers per decoder layer
    loss, grads = loss_and_grads()
    assert abs(loss.item() - loss_ref.item()) <= 1e-4 * abs(loss_ref.item())
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for name in grads:
        assert rel_err(grads[name], grads_ref[name]) <= 1e-4, name


def test_quantize_model_takes_bnb_layers_as_they_are(tmp_path):
    model = _tiny_qlora(tmp_path).get_base_model()
    base = model.model.layers[0].self_attn.q_proj.base_layer
    packed_before = base.weight.data
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = base(x)
    nf4 = NF4Linear.from_bnb(base)
    assert nf4.packed.data_ptr() == packed_before.data_ptr()  # shares bitsandbytes' bytes
    with torch.no_grad():
        assert rel_err(nf4(x), ref) <= 1e-5
