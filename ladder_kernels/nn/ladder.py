"""LadderModel: a frozen (NF4) transformers causal LM streamed forward-only, plus a trainable side network.

The backbone runs its own forward under torch.no_grad() (so its masks, RoPE, sliding windows and embedding
scaling stay its business); forward hooks on its decoder layers turn each ladder layer's output h_l into
z_l = downproj_l(h_l) as it appears, and the backbone's loop then drops h_l. Only the ladder inputs kept for
the down-projections' weight gradients (bf16 or int8) and the side network's own activations (width D/r)
live until backward. The loss goes through the frozen lm_head by the fused chunked cross-entropy.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor
from transformers.modeling_outputs import CausalLMOutputWithPast

from ladder_kernels.defaults import DTYPES
from ladder_kernels.io import write_bytes_atomic
from ladder_kernels.nn.backbone import BackboneSpec
from ladder_kernels.nn.config import LadderConfig
from ladder_kernels.nn.nf4_linear import NF4Linear, bnb_linear4bit_class, patch_bnb_, quantize_model_
from ladder_kernels.nn.pruned_init import prune_into_side_
from ladder_kernels.nn.side import BRANCH, SideKVCache, attention_mask_for, side_network
from ladder_kernels.ops.cross_entropy import fused_linear_cross_entropy

CONFIG_NAME = "ladder_config.json"
WEIGHTS_NAME = "ladder_model.safetensors"
TRAINER_WEIGHTS_NAME = "model.safetensors"  # what HF Trainer writes for a non-PreTrainedModel (our state_dict)


# --- backbone introspection --------------------------------------------------------------------------------
def _contains(model: nn.Module, cls) -> bool:
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


def _drop_backbone_state(module, state_dict, prefix, local_metadata) -> None:
    """A LadderModel's state is its side network: the frozen backbone is restored from its own source."""
    for key in [k for k in state_dict if k.startswith(prefix + "backbone.")]:
        del state_dict[key]


def _ignore_missing_backbone(module, incompatible_keys) -> None:
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if ".backbone." not in "." + k]


# --- the model -----------------------------------------------------------------------------------------------
class LadderModel(nn.Module):
    """A frozen transformers causal LM (`.backbone`) with a trainable ladder side network (`.side`).

    Only `.side` trains; `state_dict()` holds only it (so HF Trainer checkpoints hold only it). `.config` is the
    backbone's transformers config, `.ladder_config` the LadderConfig.
    """

    accepts_loss_kwargs = True  # HF Trainer passes num_items_in_batch: exact loss under gradient accumulation
    main_input_name = "input_ids"

    def __init__(self, backbone: nn.Module, config: Optional[LadderConfig] = None, *, _initialize_side: bool = True):
        super().__init__()
        config = LadderConfig() if config is None else config
        if not isinstance(config, LadderConfig):
            raise TypeError(f"LadderModel: config must be a LadderConfig or None, got {type(config).__name__}")
        spec = BackboneSpec.of(backbone)
        self.ladder_config = config
        if config.compute_dtype != "auto":
            dtype = DTYPES[config.compute_dtype]
            # NF4 bytes stored as floats (make_backbone_shardable_) are not numbers to cast
            nf4_storage = {id(m.packed) for m in backbone.modules() if isinstance(m, NF4Linear)}
            for p in backbone.parameters():
                if p.is_floating_point() and p.dtype != dtype and id(p) not in nf4_storage:
                    p.data = p.data.to(dtype)
        device = spec.inner.embed_tokens.weight.device
        side = side_network(spec, config).to(device)
        if _initialize_side and config.side_init == "pruned":
            prune_into_side_(side, spec)
        linear4bit = bnb_linear4bit_class()
        if _contains(backbone, linear4bit):
            patch_bnb_(backbone)
        elif config.backbone_quant == "nf4" and not _contains(backbone, NF4Linear):
            quantize_model_(backbone, skip_modules=("lm_head",))
        if config.backend is not None:
            for module in backbone.modules():
                if isinstance(module, NF4Linear):
                    module.backend = config.backend
        backbone.requires_grad_(False)
        backbone.eval()
        self.backbone, self.side, self.spec = backbone, side, spec
        self.register_state_dict_post_hook(_drop_backbone_state)
        self.register_load_state_dict_post_hook(_ignore_missing_backbone)

    # --- conveniences ------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.backbone.config

    @property
    def device(self) -> torch.device:
        return self.backbone.model.embed_tokens.weight.device

    def train(self, mode: bool = True) -> "LadderModel":
        super().train(mode)
        self.backbone.eval()  # the frozen backbone never runs dropout
        return self

    def connection_map(self) -> list[Optional[int]]:
        """Per side block, the backbone layer (0-based) feeding its ladder; None for xLadder's free blocks."""
        return self.side.connection_map()

    # --- streaming forward -------------------------------------------------------------------------------
    def stream(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor],
        position_ids: Tensor,
        backbone_cache=None,
        side_cache: Optional[SideKVCache] = None,
        backbone_states: Optional[dict] = None,
    ) -> tuple[Tensor, Tensor]:
        """Backbone under no_grad with ladder hooks, then the side stream: (side stream s [B, T, d], the
        backbone's final normed hidden state [B, T, D]); `side.mix` of them is what lm_head reads.

        backbone_states: an empty dict is filled with the backbone's outputs that the side network reads (keys
        BRANCH, the ladder numbers 0..n-1 and "final", values [B, T, D]); a filled one is replayed instead of
        running the backbone (the same batch again: see forward)."""
        side, grad = self.side, torch.is_grad_enabled()
        ladder_inputs: dict = {}
        capture = backbone_states is not None

        def project(source, h: Tensor) -> None:
            if capture:
                backbone_states[source] = h
            with torch.set_grad_enabled(grad):
                ladder_inputs[source] = side.project(source, h)

        if capture and "final" in backbone_states:  # replay: the side network reads what the backbone gave before
            for source in (BRANCH, *range(len(side.ladder_sources))):
                project(source, backbone_states[source])
            h_final = backbone_states["final"]
        else:
            h_final = self._run_backbone(project, input_ids, attention_mask, position_ids, backbone_cache)
            if capture:
                backbone_states["final"] = h_final
        past = side_cache.get_seq_length() if side_cache is not None else 0
        padding = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        mask = attention_mask_for(padding, input_ids.shape[1], past, input_ids.device)
        ladders = [ladder_inputs[k] for k in range(len(side.ladder_sources))]
        return side(ladder_inputs[BRANCH], ladders, position_ids, mask, side_cache), h_final

    def _run_backbone(
        self, project, input_ids: Tensor, attention_mask: Optional[Tensor], position_ids: Tensor, backbone_cache
    ) -> Tensor:
        """The backbone's forward under no_grad, its final normed hidden state [B, T, D]; hooks hand the side
        network's inputs to project(source, h) as they appear (BRANCH: the branch point, k: ladder k), so the
        backbone's loop can drop each h after it."""
        layers, side = self.spec.layers, self.side

        def ladder_hook(source):
            def hook(module, args, output):
                project(source, output[0] if isinstance(output, tuple) else output)

            return hook

        def embedding_hook(module, args, kwargs):
            project(BRANCH, args[0] if args else kwargs["hidden_states"])

        handles = [layers[src].register_forward_hook(ladder_hook(k)) for k, src in enumerate(side.ladder_sources)]
        if side.branch_source < 0:
            handles.append(layers[0].register_forward_pre_hook(embedding_hook, with_kwargs=True))
        else:
            handles.append(layers[side.branch_source].register_forward_hook(ladder_hook(BRANCH)))
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=backbone_cache is not None,
        )
        if backbone_cache is not None:
            kwargs[self.spec.cache_kwarg] = backbone_cache
        try:
            with torch.no_grad():
                return self.spec.inner(**kwargs)[0]
        finally:
            for handle in handles:
                handle.remove()

    def _logits(self, hidden: Tensor) -> Tensor:
        lm_head = self.backbone.lm_head
        logits = lm_head(hidden.to(lm_head.weight.dtype))
        cap = self.spec.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        num_items_in_batch=None,
        logits_to_keep: int = 0,
        backbone_states: Optional[dict] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Loss (fused cross-entropy, logits None) when labels are given, else logits [B, T, vocab] (only the last
        `logits_to_keep` positions if > 0, as in transformers).

        backbone_states: several optimizer steps on one batch need one backbone forward. Pass an empty dict with
        the batch's first call: it keeps the backbone's outputs that the side network reads (every ladder layer's
        hidden state and the final one, [B, T, D] each); a later call with the same batch and that dict replays
        them and skips the backbone. The caller keeps the dict per batch.

        labels are shifted inside (position t predicts labels[t + 1]); -100 is ignored. num_items_in_batch (HF
        Trainer, gradient accumulation): the loss is the sum over tokens divided by it.
        """
        # transformers callers may pass these flags; they change nothing here. Anything else is an error.
        unknown = sorted(
            k
            for k, v in kwargs.items()
            if not (k in ("use_cache", "return_dict") and (v is None or isinstance(v, bool)))
        )
        if unknown:
            raise TypeError(f"LadderModel.forward: unexpected arguments {unknown}")
        _check_ids("input_ids", input_ids, None)
        if attention_mask is not None:
            _check_ids("attention_mask", attention_mask, input_ids.shape)
        if labels is not None:
            _check_ids("labels", labels, input_ids.shape)
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"LadderModel.forward: logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, input_ids)
        if backbone_states is not None and not isinstance(backbone_states, dict):
            raise TypeError(
                f"LadderModel.forward: backbone_states must be a dict or None, got {type(backbone_states).__name__}"
            )
        s, h_final = self.stream(input_ids, attention_mask, position_ids, backbone_states=backbone_states)
        if labels is None:
            if logits_to_keep:
                s, h_final = s[:, -logits_to_keep:], h_final[:, -logits_to_keep:]
            return CausalLMOutputWithPast(logits=self._logits(self.side.mix(s, h_final)))
        lm_head = self.backbone.lm_head
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
        scored = shifted != -100
        # e.g. loss on answers only: the output mix and lm_head see only scored rows. Fake tensors (the memory
        # planner) have no values to select by: they keep every row, an upper bound. Under torch.compile every row
        # is kept too (a data-dependent branch and shape would break the graph); the loss is the same, as the
        # cross-entropy skips -100 rows.
        if not isinstance(labels, FakeTensor) and not torch.compiler.is_compiling() and not bool(scored.all()):
            s, h_final, shifted = s[scored], h_final[scored], shifted[scored]
        hidden = self.side.mix(s, h_final)
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = fused_linear_cross_entropy(
            hidden.to(lm_head.weight.dtype),
            lm_head.weight,
            shifted,
            bias=getattr(lm_head, "bias", None),
            ignore_index=-100,
            chunk_size=self.ladder_config.loss_chunk_size,
            reduction=reduction,
            softcap=self.spec.logit_softcap,
            backend=self.ladder_config.backend,
        )
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
        return CausalLMOutputWithPast(loss=loss)

    # --- generation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id=None,
        attention_mask: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """[B, T + n] token ids. Two KV caches (the backbone's transformers cache and the side's) advance together.
        Finished sequences (eos_token_id: int or list) are padded with their first eos id."""
        _check_ids("input_ids", input_ids, None)
        if attention_mask is not None:
            _check_ids("attention_mask", attention_mask, input_ids.shape)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if do_sample and not temperature > 0:
            raise ValueError(f"generate: temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        # without padding no mask is passed at all: the backbone then builds none per token, nor does the side
        padded = attention_mask is not None and not bool(attention_mask.all())
        mask = attention_mask.to(input_ids.dtype) if padded else None
        positions = positions_from_mask(mask, input_ids)
        backbone_cache, side_cache = self._new_backbone_cache(), SideKVCache(len(self.side.blocks))
        s, h_final = self.stream(input_ids, mask, positions, backbone_cache, side_cache)
        ids, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            logits = self._logits(self.side.mix(s[:, -1], h_final[:, -1])).float()
            token = _next_token(logits, do_sample, temperature, top_p, generator)
            if eos:
                token = torch.where(done, torch.full_like(token, eos[0]), token)
                done = done | torch.isin(token, torch.tensor(eos, device=token.device))
            ids = torch.cat((ids, token[:, None]), dim=1)
            if step == max_new_tokens - 1 or (eos and bool(done.all())):
                break
            if mask is not None:
                mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            positions = positions[:, -1:] + 1
            s, h_final = self.stream(token[:, None], mask, positions, backbone_cache, side_cache)
        return ids

    def _new_backbone_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.config)
        except TypeError:  # older transformers: no config argument
            return DynamicCache()

    def _backbone_signature(self) -> dict[str, str]:
        """What a saved side network was trained on (safetensors metadata), checked when loading."""
        cfg = self.config
        return {
            "format": "pt",
            "backbone_model_type": str(getattr(cfg, "model_type", "")),
            "backbone_num_layers": str(len(self.backbone.model.layers)),
            "backbone_hidden_size": str(cfg.hidden_size),
            "backbone_vocab_size": str(self.backbone.lm_head.weight.shape[0]),
        }

    # --- save / load ------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """ladder_config.json + ladder_model.safetensors (the side network only), each written atomically."""
        from safetensors.torch import save

        os.makedirs(save_directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.side.state_dict().items()}
        write_bytes_atomic(os.path.join(save_directory, WEIGHTS_NAME), save(state, metadata=self._backbone_signature()))
        self.ladder_config.to_json_file(os.path.join(save_directory, CONFIG_NAME))

    @classmethod
    def from_pretrained(
        cls, backbone: nn.Module, directory: str | os.PathLike, config: Optional[LadderConfig] = None
    ) -> "LadderModel":
        """Rebuild from `save_pretrained` output (or an HF Trainer checkpoint plus `config`). Reads only JSON and
        safetensors."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        config_path = os.path.join(directory, CONFIG_NAME)
        if config is None:
            if not os.path.isfile(config_path):
                raise FileNotFoundError(
                    f"LadderModel.from_pretrained: {config_path} not found (pass config= for a Trainer checkpoint)"
                )
            config = LadderConfig.from_json_file(config_path)
        weights = next(
            (
                os.path.join(directory, n)
                for n in (WEIGHTS_NAME, TRAINER_WEIGHTS_NAME)
                if os.path.isfile(os.path.join(directory, n))
            ),
            None,
        )
        if weights is None:
            raise FileNotFoundError(
                f"LadderModel.from_pretrained: neither {WEIGHTS_NAME} nor {TRAINER_WEIGHTS_NAME} in {directory}"
            )
        model = cls(backbone, config, _initialize_side=False)
        try:
            with safe_open(weights, "pt") as f:
                saved_for = f.metadata() or {}
            state = load_file(weights, device=str(model.device))
        except SafetensorError as exc:  # truncated, or not a safetensors file at all
            raise ValueError(f"LadderModel.from_pretrained: {weights} is not a valid safetensors file: {exc}") from exc
        expected = model._backbone_signature()
        mismatched = {k: (v, expected[k]) for k, v in saved_for.items() if k in expected and v != expected[k]}
        if mismatched:
            raise ValueError(
                f"LadderModel.from_pretrained: {weights} does not match this backbone (saved vs given: {mismatched})"
            )
        state = {k.removeprefix("side."): v for k, v in state.items()}
        if "ladders.0" in state and "branch_proj" not in state:  # adapters saved when ladders[0] was the branch
            n = len(model.side.ladders)
            state = {_renumber_ladder(k, n): v for k, v in state.items()}
        # adapters saved before the scalar gate / output mix became shape [1] (for FSDP2) hold them 0-dim
        shapes = {k: v.shape for k, v in model.side.state_dict().items()}
        state = {k: v.reshape(1) if v.dim() == 0 and shapes.get(k) == (1,) else v for k, v in state.items()}
        try:
            model.side.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"LadderModel.from_pretrained: {weights} does not match this backbone and config: {exc}"
            ) from exc
        return model


def get_ladder_model(backbone: nn.Module, config: Optional[LadderConfig] = None) -> LadderModel:
    """Wrap `backbone` (quantized to NF4 in place unless config.backbone_quant='none', frozen) with a side network."""
    return LadderModel(backbone, config)


# --- helpers -------------------------------------------------------------------------------------------------
def _renumber_ladder(key: str, n: int) -> str:
    """Old adapter key -> current: ladders.0 was the branch projection, ladders.k (k >= 1) ladder k - 1."""
    if not key.startswith("ladders."):
        return key
    k = int(key.split(".")[1])
    return "branch_proj" if k == 0 else f"ladders.{k - 1}" if k <= n else key


def positions_from_mask(attention_mask: Optional[Tensor], input_ids: Tensor) -> Tensor:
    """Position ids counting only real tokens (left padding does not shift them); arange without a mask."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _check_ids(name: str, t, shape) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"LadderModel: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"LadderModel: {name} must be an integer tensor, got {t.dtype}")
    if shape is None and t.dim() != 2:
        raise ValueError(f"LadderModel: {name} must be 2-D [batch, seq], got shape {tuple(t.shape)}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"LadderModel: {name} must have input_ids' shape {tuple(shape)}, got {tuple(t.shape)}")


def _next_token(logits: Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> Tensor:
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the smallest prefix reaching top_p (at least one)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
