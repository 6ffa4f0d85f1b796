import pytest
import torch

from ladder_kernels.defaults import METHODS, QLORA_METHODS
from ladder_kernels.planning.methods import (
    MethodTrainer,
    bnb_nf4_config,
    build_method_model,
    make_qlora_lk_model,
    make_qlora_model,
    quantize_to_bnb_4bit_,
)
from tests.helpers import has_package, needs, rel_err, tiny_config

if has_package("bitsandbytes"):  # the QLoRA tests need it; the Ladder ones run without (a bare GPU image)
    import bitsandbytes as bnb
needs_bnb = needs("bitsandbytes")

LINEAR_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _cfg(family="llama", num_layers=2, **kw):
    # multiples of bitsandbytes' blocksize (64): its CPU dequantize is wrong for blocks straddling rows
    return tiny_config(family, num_layers=num_layers, hidden_size=128, intermediate_size=256, vocab_size=320, **kw)


def _linear4bit_names(model):
    # peft wraps each as <name>.base_layer
    return {
        name.removesuffix(".base_layer").rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


@needs_bnb
def test_qlora_from_config_is_nf4_double_quant_with_lora_on_every_linear():
    model = make_qlora_model(_cfg())
    base = model.get_base_model()
    assert _linear4bit_names(base) == LINEAR_NAMES  # every linear but the LM head
    assert not isinstance(base.lm_head, bnb.nn.Linear4bit)
    for m in base.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            state = m.weight.quant_state
            assert (state.quant_type, state.nested, m.weight.dtype) == ("nf4", True, torch.uint8)
            assert m.weight.shape == (m.in_features * m.out_features // 2, 1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 2 * len(LINEAR_NAMES)  # A and B, per linear, per layer
    # the QLoRA reference script's dtypes: norms fp32, embeddings and LM head in the compute dtype
    assert base.model.norm.weight.dtype == torch.float32
    assert base.model.embed_tokens.weight.dtype == base.lm_head.weight.dtype == torch.bfloat16
    assert make_qlora_model(_cfg(), fp32_embeddings=True).get_base_model().lm_head.weight.dtype == torch.float32


@needs_bnb
def test_in_memory_quantization_gives_from_pretrained_bytes(tmp_path):
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_config(_cfg(), dtype=torch.bfloat16)
    source.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=bnb_nf4_config(), dtype=torch.bfloat16, device_map={"": "cpu"}
    )
    in_memory = quantize_to_bnb_4bit_(
        AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16), bnb_nf4_config()
    )
    pairs = [(a, b) for a, b in zip(loaded.modules(), in_memory.modules()) if isinstance(a, bnb.nn.Linear4bit)]
    assert len(pairs) == 2 * len(LINEAR_NAMES)
    for a, b in pairs:
        assert isinstance(b, bnb.nn.Linear4bit)
        assert torch.equal(a.weight.data, b.weight.data)
        assert torch.equal(a.weight.quant_state.absmax, b.weight.quant_state.absmax)
        assert torch.equal(a.weight.quant_state.state2.absmax, b.weight.quant_state.state2.absmax)
    assert in_memory.is_loaded_in_4bit


@needs_bnb
def test_qlora_from_folder_and_checkpointing_train_the_same(tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(_cfg(), dtype=torch.bfloat16).save_pretrained(tmp_path)
    ids = torch.randint(0, 320, (2, 32))
    losses = {}
    for ckpt in (False, True):
        torch.manual_seed(0)  # same LoRA init
        model = make_qlora_model(tmp_path, gradient_checkpointing=ckpt, device="cpu")
        assert model.get_base_model().is_activation_checkpointing == ckpt
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad.float() for n, p in model.named_parameters() if "lora_A" in n]
        losses[ckpt] = (loss.item(), torch.cat([g.flatten() for g in grads]))
    assert losses[False][0] == pytest.approx(losses[True][0], rel=1e-3)
    torch.testing.assert_close(losses[False][1], losses[True][1], rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("method", [pytest.param(m, marks=needs_bnb) if m in QLORA_METHODS else m for m in METHODS])
def test_every_method_learns_a_fixed_batch(method):
    torch.manual_seed(0)
    # fp32: CPU bf16 matmuls are slow without AVX512-BF16; the bf16 path is covered above
    trainer = MethodTrainer(method, _cfg(), dtype=torch.float32, lr=1e-2, lr_rule="uniform")
    ids = torch.randint(0, 320, (1, 16))
    first = trainer.step(ids).item()
    for _ in range(3):
        last = trainer.step(ids).item()
    assert last < first - 0.05, (method, first, last)


@needs_bnb
@pytest.mark.parametrize(
    "dtype,logits_tol,grad_tol",
    [
        # fp32: both dequantize the same NF4 bytes to the same fp32 weights and multiply in fp32; only the summation
        # order of a matmul may differ (K <= 256 terms: ~sqrt(K) * 6e-8 per layer).
        (torch.float32, 1e-6, 1e-5),
        # bf16: the same, but a different summation or rounding order moves results by up to one bf16 ulp (2**-8).
        (torch.bfloat16, 1e-2, 2e-2),
    ],
)
def test_qlora_lk_computes_like_qlora(dtype, logits_tol, grad_tol):
    """qlora-lk (bitsandbytes layers patched to nf4_matmul) against qlora (bitsandbytes' own matmul_4bit) on
    the same 4-bit bytes and the same LoRA weights: the full logits and every LoRA parameter's gradient after
    one backward. Measured on this CPU: both bitwise equal in fp32 and bf16 (at these sizes the cpu kernel
    dequantizes one tile and multiplies it with the same BLAS call that bitsandbytes' dequantize + linear makes)."""
    ids = torch.randint(0, 320, (2, 24))
    models = []
    for maker in (make_qlora_model, make_qlora_lk_model):
        torch.manual_seed(0)  # the same random backbone and its same NF4 bytes
        models.append(maker(_cfg(), compute_dtype=dtype))
    qlora, qlora_lk = models
    ref_state, lk_state = qlora.state_dict(), qlora_lk.state_dict()
    assert ref_state.keys() == lk_state.keys()
    assert all(torch.equal(ref_state[k], lk_state[k]) for k in ref_state)
    # lora_B starts at zero (so lora_A would get no gradient): random LoRA weights, copied into both models
    trainable = {n: p for n, p in qlora.named_parameters() if p.requires_grad}
    lk_trainable = {n: p for n, p in qlora_lk.named_parameters() if p.requires_grad}
    assert trainable.keys() == lk_trainable.keys() and all("lora_" in n for n in trainable) and len(trainable) == 28
    with torch.no_grad():
        for name, p in trainable.items():
            p.normal_(0, 0.05)
            lk_trainable[name].copy_(p)
    results = []
    for model, params in ((qlora, trainable), (qlora_lk, lk_trainable)):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in params.items()}))
    (ref_logits, ref_grads), (lk_logits, lk_grads) = results
    assert ref_logits.dtype == lk_logits.dtype and ref_logits.shape == lk_logits.shape == (2, 24, 320)
    assert rel_err(lk_logits, ref_logits) < logits_tol
    for name, g in ref_grads.items():
        assert g.norm() > 0, name
        assert rel_err(lk_grads[name], g) < grad_tol, name


def test_xladder_default_depth_and_ladder_rejects_it():
    model = build_method_model("xladder", _cfg(num_layers=8))
    assert model.ladder_config.xladder_depth == 2
    with pytest.raises(ValueError, match="xladder_depth"):
        build_method_model("ladder", _cfg(), xladder_depth=1)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="method must be one of"):
        build_method_model("lora", _cfg())
    with pytest.raises(ValueError, match="r must be a positive int"):
        make_qlora_model(_cfg(), r=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        make_qlora_model(_cfg(), dropout=1.5)
    with pytest.raises(ValueError, match="checkpoint folder"):
        make_qlora_model("/nonexistent/model")
    with pytest.raises(TypeError, match="model_or_dir must be"):
        make_qlora_model(42)
    with pytest.raises(ValueError, match="do not apply to method 'qlora'"):
        build_method_model("qlora", _cfg(), reduction_factor=4)


@needs_bnb
def test_bench_writes_a_side_by_side_table_and_plots(tmp_path):
    from ladder_kernels.planning.bench import BenchSettings, run_bench
    from ladder_kernels.planning.bench_report import read_results, write_results

    settings = BenchSettings(
        methods=("ladder", "qlora"),
        models=("tiny-llama",),
        seq_lens=(32,),
        steps=3,
        warmup=0,
        device="cpu",
        out_dir=tmp_path,
        tag="t",
        command="test",
    )
    csv_path, md_path, mem_png, speed_png = write_results(run_bench(settings), tmp_path, "t")
    rows = read_results(csv_path)
    assert {(r["method"], r["metric"]) for r in rows} >= {
        (m, k)
        for m in ("ladder", "qlora")
        for k in ("tracked_peak_bytes", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "loss_last")
    }
    value = {(r["method"], r["metric"]): float(r["value"]) for r in rows}
    for m in ("ladder", "qlora"):
        assert value[(m, "timed_steps")] == 3 and value[(m, "interleaved")] == 1
        assert value[(m, "step_s_min")] <= value[(m, "step_s")] <= value[(m, "step_s_max")]
    assert all(r["device"] == "cpu" and r["seq_len"] == "32" and "torch=" in r["versions"] for r in rows)
    peak = {r["method"]: float(r["value"]) for r in rows if r["metric"] == "tracked_peak_bytes"}
    assert 0 < peak["ladder"] < peak["qlora"]
    table = md_path.read_text()
    assert "| tiny-llama | 1 | 32 | qlora |" in table and f"{peak['ladder'] / peak['qlora']:.2f}" in table
    for png in (mem_png, speed_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="methods must be from"):
        BenchSettings(methods=("lora",))
    with pytest.raises(ValueError, match="seq_lens must be positive ints"):
        BenchSettings(seq_lens=(0,))


@needs_bnb
def test_qlora_trains_the_same_after_an_inference_forward():
    """bitsandbytes repacks 4-bit weights for a gradient-less CPU kernel at an eval-mode no-grad forward;
    make_qlora_model must undo it, or training after a zero-shot evaluation stops gradients at frozen layers."""
    torch.manual_seed(0)
    ids = torch.randint(0, 320, (2, 24))

    def lora_grads(evaluate_first: bool) -> dict:
        torch.manual_seed(1)
        model = make_qlora_model(_cfg(), compute_dtype=torch.float32)
        with torch.no_grad():  # lora_B starts at zero: give every LoRA tensor a gradient path
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = lora_grads(False), lora_grads(True)
    assert all(g.abs().sum() > 0 for g in plain.values())
    for name, g in plain.items():
        assert torch.allclose(after_eval[name], g, rtol=1e-4, atol=1e-6), name
