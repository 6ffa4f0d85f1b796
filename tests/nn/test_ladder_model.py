"""LadderModel on tiny random backbones of several families: step-0 equivalence, training, wiring, pruned
init, generation with two caches, padding, save/load, int8 ladders, gradient accumulation, HF Trainer."""

import copy
import os

import pytest
import torch

from ladder_kernels.nn.config import LadderConfig
from ladder_kernels.nn.ladder import LadderModel, get_ladder_model
from ladder_kernels.nn.nf4_linear import NF4Linear
from ladder_kernels.nn.side import BRANCH
from tests.helpers import DEVICE, FAMILIES, rel_err, require_backend, tiny_backbone

VOCAB = 96


def make_model(family="llama", num_layers=2, seed=0, **config):
    """Unquantized backbones by default (fast); the NF4 path is exercised where backbone_quant="nf4" is asked."""
    config.setdefault("reduction_factor", 4)
    config.setdefault("backbone_quant", "none")
    return LadderModel(tiny_backbone(family, num_layers=num_layers, seed=seed).to(DEVICE), LadderConfig(**config))


@torch.no_grad()
def perturb_side_(model, scale=0.3):
    """Make the side network matter to the output (at init the output mix is exactly the backbone)."""
    for name, p in model.side.named_parameters():
        p.add_(scale * p.abs().mean().clamp_min(0.05) * torch.randn_like(p))


def random_ids(batch, length, low=3):
    return torch.randint(low, VOCAB, (batch, length), device=DEVICE)


def toy_batch(batch=8, length=12, symbols=16):
    """A learnable sequence task over 16 of the 96 tokens: each token is a fixed function of the previous one
    (knowing only which 16 tokens occur gets the loss to log 16 = 2.8, not below)."""
    steps = [torch.randint(0, symbols, (batch, 1), device=DEVICE)]
    for _ in range(length - 1):
        steps.append((steps[-1] * 5 + 3) % symbols)
    return torch.cat(steps, dim=1) + 3


# --- step 0 is the backbone ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_step0_loss_and_logits_equal_the_quantized_backbone(family):
    model = make_model(family, num_layers=3, backbone_quant="nf4")
    assert isinstance(model.backbone.model.layers[0].mlp.up_proj, NF4Linear)
    assert not isinstance(model.backbone.lm_head, NF4Linear)
    ids = random_ids(2, 10)
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        ref = model.backbone(ids, labels=labels)
        ours_loss = model(ids, labels=labels).loss
        ours_logits = model(ids).logits
    assert ours_loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert rel_err(ours_logits, ref.logits) < 1e-5  # Gemma3: the final logit softcap is applied too
    with torch.no_grad():
        assert rel_err(model(ids, logits_to_keep=2).logits, ours_logits[:, -2:]) < 1e-6


# --- training ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "family, extra",
    [
        ("llama", dict(backbone_quant="nf4")),
        ("qwen2", dict(gate="vector", side_init="random")),
        ("gemma3", dict(xladder_depth=1, ladder_storage="int8")),
    ],
)
def test_training_learns_and_leaves_the_backbone_bit_identical(family, extra):
    model = make_model(family, num_layers=3, **extra)
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    model.train()
    for step in range(30):
        batch = toy_batch()
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        if step == 1:  # by now the zero-initialised up_proj has moved, so every side parameter has a gradient
            for name, p in model.named_parameters():
                if name.startswith("backbone."):
                    assert p.grad is None and not p.requires_grad, name
                else:
                    assert name.startswith("side.") and p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.25 * losses[0], losses  # 4.6 -> below 1.2
    after = model.backbone.state_dict()
    assert frozen.keys() == after.keys()
    for k, v in frozen.items():
        assert torch.equal(v, after[k]), k
    assert not model.backbone.training


def test_gradient_accumulation_with_num_items_matches_the_full_batch():
    model = make_model("llama")
    perturb_side_(model)
    ids = random_ids(4, 10)
    labels = ids.clone()
    labels[1, 6:] = -100
    labels[3, :4] = -100
    model(ids, labels=labels).loss.backward()
    full = {n: p.grad.clone() for n, p in model.side.named_parameters()}
    model.zero_grad()
    n_items = (labels[:, 1:] != -100).sum()
    for half in (slice(0, 2), slice(2, 4)):
        model(ids[half], labels=labels[half], num_items_in_batch=n_items).loss.backward()
    for name, p in model.side.named_parameters():
        assert rel_err(p.grad, full[name]) < 1e-5, name


def test_int8_ladder_storage_gradients_within_1e2_of_bf16():
    bf16 = make_model("llama", num_layers=3, ladder_storage="bf16")
    perturb_side_(bf16)
    int8 = make_model("llama", num_layers=3, ladder_storage="int8")
    int8.side.load_state_dict(bf16.side.state_dict())
    ids = random_ids(2, 16)
    for model in (bf16, int8):
        model(ids, labels=ids).loss.backward()
    for (name, a), b in zip(bf16.side.named_parameters(), int8.side.parameters()):
        assert rel_err(b.grad, a.grad) < 1e-2, name
    assert rel_err(int8.side.ladders[0].grad, bf16.side.ladders[0].grad) > 0  # really a different storage


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_kernel_backends_agree_with_the_torch_reference_end_to_end(backend):
    """The down-projection and cross-entropy kernels inside a LadderModel (the triton case runs on CUDA where
    there is a GPU, under the interpreter otherwise; the cpu case on CPU)."""
    require_backend(backend)
    device = "cpu" if backend == "cpu" else DEVICE
    models = {}
    for name in ("torch", backend):
        models[name] = LadderModel(
            tiny_backbone("llama", num_layers=2).to(device),
            LadderConfig(reduction_factor=4, backbone_quant="none", backend=name, ladder_storage="int8"),
        )
    perturb_side_(models["torch"])
    models[backend].side.load_state_dict(models["torch"].side.state_dict())
    ids = torch.randint(3, VOCAB, (2, 8), device=device)
    losses = {name: model(ids, labels=ids).loss for name, model in models.items()}
    for loss in losses.values():
        loss.backward()
    assert losses[backend].item() == pytest.approx(losses["torch"].item(), rel=1e-4)
    for (name, a), b in zip(models["torch"].side.named_parameters(), models[backend].side.parameters()):
        assert rel_err(b.grad, a.grad) < 1e-3, name


def test_side_checkpointing_gives_the_same_gradients():
    plain = make_model("qwen2", num_layers=2, dropout=0.1)
    perturb_side_(plain)
    ckpt = make_model("qwen2", num_layers=2, dropout=0.1, side_checkpointing=True)
    ckpt.side.load_state_dict(plain.side.state_dict())
    plain.train(), ckpt.train()
    ids = random_ids(2, 10)
    for model in (plain, ckpt):
        torch.manual_seed(7)  # the same dropout masks; recomputation must replay them
        model(ids, labels=ids).loss.backward()
    for (name, a), b in zip(plain.side.named_parameters(), ckpt.side.parameters()):
        assert rel_err(b.grad, a.grad) < 1e-6, name


@pytest.mark.parametrize("family,extra", [("llama", {}), ("qwen2", {"xladder_depth": 1})])
def test_replayed_backbone_states_give_the_recomputed_loss_and_gradients(family, extra):
    """forward(backbone_states={}) keeps what the side network reads; a second call replays it without running
    the backbone, and must give what a full forward gives with the side network as it is by then."""
    model = make_model(family, num_layers=3, backbone_quant="nf4", **extra)
    perturb_side_(model)
    ids = random_ids(3, 11)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # ragged
    labels = ids.masked_fill(mask == 0, -100)
    states = {}
    model(ids, attention_mask=mask, labels=labels, backbone_states=states).loss.backward()
    assert len(states) == len(model.side.ladder_sources) + 2  # branch input, each ladder layer, final
    perturb_side_(model)  # as an optimizer step would
    model.zero_grad(set_to_none=True)
    calls = []
    hook = model.backbone.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    replayed = model(ids, attention_mask=mask, labels=labels, backbone_states=states).loss
    replayed.backward()
    hook.remove()
    assert not calls  # the backbone did not run
    replayed_grads = {n: p.grad.clone() for n, p in model.side.named_parameters()}
    model.zero_grad(set_to_none=True)
    full = model(ids, attention_mask=mask, labels=labels).loss
    full.backward()
    assert replayed.item() == full.item()
    for name, p in model.side.named_parameters():
        assert p.grad.abs().sum() > 0 and torch.equal(replayed_grads[name], p.grad), name
    with pytest.raises(TypeError, match="backbone_states must be a dict"):
        model(ids, labels=labels, backbone_states=[])


def test_bf16_compute_matches_the_backbone_at_step0_and_trains():
    model = make_model("llama", compute_dtype="bfloat16", backbone_quant="nf4")
    assert model.backbone.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.side.parameters())  # fp32 master weights
    ids = random_ids(2, 12)
    with torch.no_grad():
        ref = model.backbone(ids, labels=ids).loss
    loss = model(ids, labels=ids).loss
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.side.parameters())


def test_bitsandbytes_4bit_backbone_is_used_as_it_is(tmp_path):
    """A transformers bnb-4bit model keeps its Linear4bit layers (patched to our NF4 matmul), not re-quantized."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_backbone("llama", num_layers=1, hidden_size=256, intermediate_size=512).save_pretrained(tmp_path)
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    backbone = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config, device_map={"": DEVICE})
    linear4bit = type(backbone.model.layers[0].mlp.up_proj)
    model = LadderModel(backbone, LadderConfig(reduction_factor=4))  # pruned init reads the 4-bit weights
    assert type(model.backbone.model.layers[0].mlp.up_proj) is linear4bit
    ids = random_ids(2, 8)
    with torch.no_grad():
        reference = model.backbone(ids, labels=ids).loss
    loss = model(ids, labels=ids).loss
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    loss.backward()
    assert model.side.up_proj.weight.grad.abs().sum() > 0


# --- wiring --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "num_layers, extra, branch, expected_map",
    [
        (4, dict(xladder_depth=2), 1, [2, 3, None, None]),
        (3, dict(xladder_depth=3), -1, [0, 1, 2, None, None, None]),
        (4, dict(ladder_layers=[0, 2]), -1, [0, 2]),
        (3, {}, -1, [0, 1, 2]),
    ],
)
def test_connection_map_and_which_hidden_states_feed_which_ladders(num_layers, extra, branch, expected_map):
    model = make_model("mistral", num_layers=num_layers, **extra)
    perturb_side_(model)
    assert model.connection_map() == expected_map
    assert model.side.branch_source == branch
    assert len(model.side.blocks) == len(expected_map) and len(model.side.ladders) == len(model.side.ladder_sources)
    # Recompute the side stream by hand from the backbone's own per-layer hidden states.
    ids = random_ids(2, 9)
    layers = model.backbone.model.layers
    seen = {}

    def keep_input(module, args, kwargs):
        seen[-1] = args[0] if args else kwargs["hidden_states"]

    def keep_output(index):
        def hook(module, args, out):
            seen[index] = out

        return hook

    handles = [layers[0].register_forward_pre_hook(keep_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(keep_output(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        h_final = model.backbone.model(ids).last_hidden_state
        for h in handles:
            h.remove()
        side = model.side
        positions = torch.arange(9, device=DEVICE)[None].expand(2, -1)
        ladders = [side.project(k, seen[src]) for k, src in enumerate(side.ladder_sources)]
        expected = model._logits(side.mix(side(side.project(BRANCH, seen[branch]), ladders, positions), h_final))
        assert rel_err(model(ids).logits, expected) < 1e-6


@pytest.mark.parametrize("family", ["qwen2", "gemma"])  # q/k/v biases; (1 + w) norms and tanh-GELU
def test_pruned_side_block_reproduces_its_backbone_layer(family):
    """With r=1 and pruned head dims / MLP units that carry nothing (zero weights), a pruned side block must
    compute exactly what its backbone layer computes: checks the rotary pair, value dim, unit and gain indexing."""
    backbone = tiny_backbone(family, num_layers=2).to(DEVICE)
    heads, kv, hd = 4, 2, 16

    def zero_rows_(linear, rows):
        linear.weight[rows] = 0
        if linear.bias is not None:
            linear.bias[rows] = 0

    with torch.no_grad():
        for layer in backbone.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for g in range(kv):  # drop 4 of 8 rotary pairs (same per kv group) and 8 of 16 value dims per kv head
                pairs = torch.randperm(hd // 2)[:4]
                dead = torch.cat((pairs, pairs + hd // 2))
                for h in range(g * heads // kv, (g + 1) * heads // kv):
                    zero_rows_(attn.q_proj, h * hd + dead)
                zero_rows_(attn.k_proj, g * hd + dead)
                zero_rows_(attn.v_proj, g * hd + torch.randperm(hd)[:8])
            units = torch.randperm(128)[:64]
            mlp.gate_proj.weight[units] = 0
            mlp.up_proj.weight[units] = 0
    model = LadderModel(
        backbone, LadderConfig(reduction_factor=1, side_head_dim=8, side_intermediate_size=64, backbone_quant="none")
    )
    inner = model.backbone.model
    h = torch.randn(2, 7, 64, device=DEVICE)
    positions = torch.arange(7, device=DEVICE)[None].expand(2, -1)
    with torch.no_grad():
        expected = inner.layers[1](
            h, attention_mask=None, position_ids=positions, position_embeddings=inner.rotary_emb(h, positions)
        )
        got = model.side.blocks[0](h, positions, None, None, 0)  # block 0 takes layer 0's output: mirrors layer 1
        assert rel_err(got, expected) < 1e-5
        assert torch.equal(model.side.project(1, h), h)  # ladders start as channel selections (all channels at r=1)
        assert rel_err(model.side.norm(h), inner.norm(h)) < 1e-6


# --- generation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, padded", [("llama", True), ("mistral", True), ("gemma3", True), ("gemma3", False)])
def test_greedy_generate_with_two_caches_equals_recomputation(family, padded):
    model = make_model(family, num_layers=2)
    perturb_side_(model)
    prompt = random_ids(2, 6)
    mask = torch.ones_like(prompt)
    if padded:
        mask[1, :2] = 0  # left padding
    # without padding generate passes no mask to the backbone: its cache alone must keep the windows right
    out = model.generate(prompt, max_new_tokens=8, attention_mask=mask if padded else None)
    ids, m = prompt, mask
    with torch.no_grad():
        for _ in range(8):
            nxt = model(ids, attention_mask=m).logits[:, -1].argmax(-1, keepdim=True)
            ids, m = torch.cat((ids, nxt), 1), torch.cat((m, torch.ones_like(nxt)), 1)
    assert torch.equal(out, ids)  # 14 tokens: beyond the tiny sliding windows (4 and 8)


def test_generate_stops_at_eos_and_samples_within_top_p():
    model = make_model("llama")
    perturb_side_(model)
    prompt = random_ids(3, 4)
    greedy = model.generate(prompt, max_new_tokens=6)
    eos = int(greedy[0, 5])  # the second generated token of row 0
    out = model.generate(prompt, max_new_tokens=6, eos_token_id=eos)
    assert out.shape[1] <= 10 and torch.equal(out[0, :6], greedy[0, :6])
    assert (out[0, 6:] == eos).all()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    tiny_p = model.generate(prompt, max_new_tokens=6, do_sample=True, top_p=1e-6, generator=gen)
    assert torch.equal(tiny_p, greedy)  # top_p -> 0 keeps only the most likely token
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, max_new_tokens=-1)


# --- padding -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, side", [("llama", "right"), ("llama", "left"), ("gemma3", "left")])
def test_padding_changes_nothing_on_real_tokens(family, side):
    model = make_model(family, num_layers=2)
    perturb_side_(model)
    long, short = random_ids(1, 10), random_ids(1, 6)
    pad = torch.zeros(1, 4, dtype=short.dtype, device=DEVICE)
    padded = torch.cat((short, pad), 1) if side == "right" else torch.cat((pad, short), 1)
    mask = (
        torch.cat((torch.ones_like(short), pad), 1) if side == "right" else torch.cat((pad, torch.ones_like(short)), 1)
    )
    batch = torch.cat((long, padded))
    batch_mask = torch.cat((torch.ones_like(long), mask))
    with torch.no_grad():
        together = model(batch, attention_mask=batch_mask).logits
        alone_long, alone_short = model(long).logits, model(short).logits
    real = slice(0, 6) if side == "right" else slice(4, 10)
    assert rel_err(together[0], alone_long[0]) < 1e-5
    assert rel_err(together[1, real], alone_short[0]) < 1e-5
    labels = torch.where(batch_mask.bool(), batch, torch.full_like(batch, -100))
    labels[1, real.start] = -100  # the first real token is predicted by nothing real (a pad, with left padding)
    with torch.no_grad():
        loss_short = model(batch[1:], attention_mask=batch_mask[1:], labels=labels[1:]).loss
        assert loss_short.item() == pytest.approx(model(short, labels=short).loss.item(), rel=1e-5)


# --- save / load ---------------------------------------------------------------------------------------------
def test_save_load_restores_identical_logits_and_saves_only_the_side(tmp_path):
    model = make_model("gemma", num_layers=2, gate="vector", xladder_depth=1)
    perturb_side_(model)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["ladder_config.json", "ladder_model.safetensors"]
    from safetensors import safe_open

    with safe_open(tmp_path / "ladder_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.side.state_dict()) and not any("backbone" in k for k in keys)
    assert set(model.state_dict()) == {"side." + k for k in keys}
    restored = LadderModel.from_pretrained(tiny_backbone("gemma", num_layers=2).to(DEVICE), tmp_path)
    assert restored.ladder_config == model.ladder_config
    ids = random_ids(2, 8)
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="does not match"):
        LadderModel.from_pretrained(tiny_backbone("gemma", num_layers=3).to(DEVICE), tmp_path)


def test_adapters_saved_with_the_branch_projection_as_ladders_0_still_load(tmp_path):
    """Before branch_proj had its own name, ladders.0 held it and ladders.k fed side block k - 1."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = make_model("llama", num_layers=3)
    perturb_side_(model)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "ladder_model.safetensors"
    with safe_open(weights, "pt") as f:
        metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    def old_name(key: str) -> str:
        if key == "branch_proj":
            return "ladders.0"
        return f"ladders.{int(key.split('.')[1]) + 1}" if key.startswith("ladders.") else key

    old = {old_name(k): v for k, v in state.items()}
    assert "branch_proj" not in old and len([k for k in old if k.startswith("ladders.")]) == 1 + len(model.side.ladders)
    save_file(old, weights, metadata=metadata)
    restored = LadderModel.from_pretrained(tiny_backbone("llama", num_layers=3).to(DEVICE), tmp_path)
    ids = random_ids(2, 8)
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, model(ids).logits)


def test_scalar_gate_and_mix_are_shape_1_and_old_0_dim_adapters_still_load(tmp_path):
    """Shape [1], not 0-dim, so that FSDP2's fully_shard accepts them; adapters saved with 0-dim ones load."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = make_model("llama", num_layers=2, gate="scalar", output_mix="scalar")
    perturb_side_(model)
    scalars = {k: v for k, v in model.side.state_dict().items() if k.endswith(".alpha") or k == "mix_weight"}
    assert scalars and all(v.shape == (1,) for v in scalars.values()) and "gates.0.alpha" in scalars
    model.save_pretrained(tmp_path)
    weights = tmp_path / "ladder_model.safetensors"
    with safe_open(weights, "pt") as f:
        metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(
        {k: v.reshape(()) if k in scalars else v for k, v in state.items()}, weights, metadata=metadata
    )  # the old layout
    restored = LadderModel.from_pretrained(tiny_backbone("llama", num_layers=2).to(DEVICE), tmp_path)
    assert all(restored.side.state_dict()[k].shape == (1,) for k in scalars)
    ids = random_ids(2, 8)
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, model(ids).logits)


def test_hf_trainer_trains_and_checkpoints_only_the_side(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make_model("llama", seed=3)
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    data = [{"input_ids": row, "labels": row} for row in toy_batch(16).cpu()]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-2,
        save_steps=3,
        logging_steps=1,
        report_to=[],
        use_cpu=DEVICE == "cpu",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    ckpt = tmp_path / "checkpoint-3"
    from safetensors.torch import load_file

    saved = load_file(ckpt / "model.safetensors")
    assert saved and all(k.startswith("side.") for k in saved)
    for k, v in frozen.items():
        assert torch.equal(v, model.backbone.state_dict()[k]), k
    restored = LadderModel.from_pretrained(
        tiny_backbone("llama", num_layers=2, seed=3).to(DEVICE), ckpt, config=model.ladder_config
    )
    ids = random_ids(1, 8)
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, model(ids).logits)


# --- errors --------------------------------------------------------------------------------------------------
def test_unsupported_backbones_and_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="missing model.model"):
        LadderModel(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="config must be a LadderConfig"):
        LadderModel(tiny_backbone("llama"), {"reduction_factor": 4})
    with pytest.raises(ValueError, match="xladder_depth 5 exceeds"):
        LadderModel(tiny_backbone("llama", num_layers=2), LadderConfig(xladder_depth=5, backbone_quant="none"))
    with pytest.raises(ValueError, match="ladder_layers"):
        LadderModel(tiny_backbone("llama", num_layers=2), LadderConfig(ladder_layers=[0, 2], backbone_quant="none"))
    model = get_ladder_model(tiny_backbone("llama"), LadderConfig(reduction_factor=4, backbone_quant="none"))
    ids = random_ids(2, 5).cpu()
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(ids.float())
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        model(ids, labels=ids[:, :4])
    with pytest.raises(TypeError, match="unexpected arguments"):
        model(ids, output_attentions=True)


def test_deepcopy_and_state_dict_round_trip_keep_the_backbone_out():
    model = make_model("llama", backbone_quant="none")
    perturb_side_(model)
    clone = make_model("llama", backbone_quant="none", side_init="random")
    result = clone.load_state_dict(copy.deepcopy(model.state_dict()))
    assert not result.missing_keys and not result.unexpected_keys
    ids = random_ids(1, 6)
    with torch.no_grad():
        assert torch.equal(clone(ids).logits, model(ids).logits)
