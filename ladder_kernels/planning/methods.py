"""The fine-tuning methods compared by the benchmark and the memory planner, each built the way its users
run it, and one training step (forward, backward, AdamW step) for any of them (`MethodTrainer`).

Methods:
  ladder       LadderModel over the NF4 backbone (ladder_kernels.nn.ladder), LadderConfig defaults
  xladder      the same with xladder_depth = δ (default: a quarter of the backbone's layers, at least 1)
  qlora        QLoRA as below, no gradient checkpointing
  qlora-ckpt   the same with gradient checkpointing
  qlora-lk     qlora with its bitsandbytes 4-bit layers computing through ladder-kernels' nf4_matmul

QLoRA the way its users run it:

transformers' bitsandbytes 4-bit NF4 (double quantization, bf16 compute) + peft LoRA on every linear layer
except the LM head, prepared with peft's `prepare_model_for_kbit_training`, optional gradient checkpointing.

What `prepare_model_for_kbit_training` does to memory: it upcasts every non-4-bit parameter to fp32 (norms,
embeddings, the LM head). The QLoRA reference script (artidoro/qlora, `get_accelerate_model`) then casts the
embeddings and the LM head back to the compute dtype and keeps the norms in fp32; that is the default here
(`fp32_embeddings=False`), the leaner of the two. `fp32_embeddings=True` keeps peft's fp32 copies (for 7B:
+0.5 GB of weights and fp32 logits). LoRA weights stay as peft makes them (fp32; its layers cast their input
to fp32 for the adapter path).

Models built from a config or passed in unquantized are quantized in memory, module for module as
`from_pretrained(..., quantization_config=...)` does it (transformers' `replace_with_bnb_linear`, then
bitsandbytes' `Params4bit` quantization). bitsandbytes registers fake implementations for its ops, so the
same code builds and trains a QLoRA model under `FakeTensorMode` (the memory planner does that).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from ladder_kernels.defaults import (
    DEFAULT_LR_RULE,
    LADDER_METHODS,
    LORA_R,
    METHODS,
    QLORA_METHODS,
    default_lr,
    default_xladder_depth,
)
from ladder_kernels.nn.step_sizes import param_groups

__all__ = [
    "MethodTrainer",
    "build_method_model",
    "make_qlora_model",
    "make_qlora_lk_model",
    "bnb_nf4_config",
]


def bnb_nf4_config(compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = True):
    """The BitsAndBytesConfig of the QLoRA paper: 4-bit NF4, optional double quantization."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _is_4bit(model: nn.Module) -> bool:
    import bitsandbytes as bnb

    return getattr(model, "is_loaded_in_4bit", False) or any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def _fake_params4bit(weight: torch.Tensor, module: nn.Module) -> nn.Parameter:
    """What `Params4bit(weight).to(device)` holds, on fake tensors (a Params4bit cannot wrap a FakeTensor).

    bitsandbytes' own quantize_4bit runs through its fake implementations, so the packed weight
    ([numel/2, 1] uint8) and the QuantState (absmax, nested absmax, code, offset) have the real shapes and
    dtypes; Linear4bit.forward and MatMul4Bit read only these attributes.
    """
    import bitsandbytes as bnb

    spec = module.weight  # the meta Params4bit made by replace_with_bnb_linear: blocksize, quant_type, ...
    # bitsandbytes builds and caches its 8-bit code table on first use; built from fakes it would be
    # data-dependent (and a fake would be cached), so it is built for real first
    with unset_fake_temporarily():
        bnb.functional.name2qmap.setdefault("dynamic", bnb.functional.create_dynamic_map())
    packed, state = bnb.functional.quantize_4bit(
        weight.contiguous(),
        blocksize=spec.blocksize,
        compress_statistics=spec.compress_statistics,
        quant_type=spec.quant_type,
        quant_storage=spec.quant_storage,
    )
    param = nn.Parameter(packed, requires_grad=False)  # a FakeTensor flagged as a parameter
    for name in ("blocksize", "compress_statistics", "quant_type", "quant_storage"):
        setattr(param, name, getattr(spec, name))
    param.quant_state, param.bnb_quantized, param.module = state, True, module
    module.quant_state = state
    return param


def quantize_to_bnb_4bit_(model: nn.Module, bnb_config) -> nn.Module:
    """Replace the model's linear layers (not the LM head nor tied weights) by bitsandbytes Linear4bit with
    the weights quantized, in place, as transformers' loader does; the 16-bit weights are released."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers import AutoHfQuantizer
    from transformers.quantizers.base import get_keys_to_not_convert

    skip = get_keys_to_not_convert(model)
    originals = {name: (m.weight.data, m.bias) for name, m in model.named_modules() if type(m) is nn.Linear}
    # the module skeletons live on the meta device; a Params4bit cannot wrap a FakeTensor, so they are
    # made outside any fake mode (they hold no memory either way)
    with unset_fake_temporarily():
        replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=bnb_config)
    for name in list(originals):
        weight, bias = originals.pop(name)  # released once quantized: one layer's 16-bit weight at a time
        module = model.get_submodule(name)
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if isinstance(weight, FakeTensor):
            module.weight = _fake_params4bit(weight, module)
        else:
            # the same construction as transformers' Bnb4bitQuantize: a Params4bit moved to its device quantizes
            module.weight = bnb.nn.Params4bit(weight, requires_grad=False, **module.weight.__dict__).to(weight.device)
        if bias is not None:
            module.bias = nn.Parameter(bias.data, requires_grad=False)
    model.is_quantized = True
    model.quantization_method = bnb_config.quant_method
    model.is_loaded_in_4bit = True
    model.hf_quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=False)
    model.config.quantization_config = bnb_config
    return model


def _load_base(model_or_dir, bnb_config, compute_dtype: torch.dtype, device) -> nn.Module:
    from transformers import AutoModelForCausalLM, PretrainedConfig

    if isinstance(model_or_dir, (str, os.PathLike)):
        path = Path(model_or_dir)
        if not (path / "config.json").is_file():
            raise ValueError(
                "make_qlora_model: model_or_dir must be a transformers checkpoint folder (with config.json), got "
                f"{path}"
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=bnb_config, dtype=compute_dtype, device_map={"": str(device)}
        )
    if isinstance(model_or_dir, PretrainedConfig):
        # random initialisation; under FakeTensorMode this allocates nothing
        with torch.device(device or "cpu"):
            model = AutoModelForCausalLM.from_config(model_or_dir, dtype=compute_dtype)
        return quantize_to_bnb_4bit_(model, bnb_config)
    if isinstance(model_or_dir, nn.Module):
        if _is_4bit(model_or_dir):
            return model_or_dir
        if device is not None:
            model_or_dir.to(device)
        return quantize_to_bnb_4bit_(model_or_dir.to(compute_dtype), bnb_config)
    raise TypeError(
        "make_qlora_model: model_or_dir must be a checkpoint folder, a transformers config or a causal LM module, "
        f"got {type(model_or_dir).__name__}"
    )


def _cast_input_to_weight_dtype(module: nn.Module, args):
    return (args[0].to(module.weight.dtype),) + tuple(args[1:])


def make_qlora_model(
    model_or_dir: Union[str, os.PathLike, nn.Module, "PretrainedConfig"],  # noqa: F821
    r: int = LORA_R,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: Union[str, list] = "all-linear",
    gradient_checkpointing: bool = False,
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    fp32_embeddings: bool = False,
    device=None,
):
    """A trainable QLoRA peft model (train mode) from a checkpoint folder, a config (random weights) or a
    model (quantized in place unless it already is 4-bit).

    target_modules="all-linear": every linear layer but the output layer, as peft defines it.
    device: where a folder is loaded / a config is built (default: CUDA if present, else CPU for folders;
    CPU for configs).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"make_qlora_model: r must be a positive int, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"make_qlora_model: dropout must be in [0, 1), got {dropout!r}")
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"make_qlora_model: compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")

    model = _load_base(model_or_dir, bnb_nf4_config(compute_dtype, double_quant), compute_dtype, device)
    # non-reentrant checkpointing: what torch and transformers recommend (the reentrant default is deprecated)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    if not fp32_embeddings and compute_dtype != torch.float32:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None and module.weight.dtype == torch.float32:
                module.weight.data = module.weight.data.to(compute_dtype)  # as peft casts (works on fakes)
        head = model.get_output_embeddings()
        if head is not None:
            # the fp32 final norm feeds the LM head: cast as autocast would, so plain training loops work too
            head.register_forward_pre_hook(_cast_input_to_weight_dtype)
    model.config.use_cache = False  # no KV cache in training
    _keep_bnb_layout_for_training_(model)
    lora = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none", task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    return peft_model


def _keep_bnb_layout_for_training_(model: nn.Module) -> None:
    """bitsandbytes (0.50, CPUs with AVX512-BF16) repacks a Linear4bit for its CPU gemv kernel at the first
    no-grad forward in eval mode (a zero-shot evaluation). That kernel has no backward, so later training steps
    would silently stop gradients at every frozen layer, and undoing the repack is lossy (absmax goes through
    bf16): a model that trains never takes that path."""
    from ladder_kernels.nn.nf4_linear import bnb_linear4bit_class

    linear4bit = bnb_linear4bit_class()
    for module in model.modules():
        if linear4bit is not None and isinstance(module, linear4bit):
            module.support_avx512bf16_for_cpu = False


def make_qlora_lk_model(model_or_dir, **kwargs):
    """`make_qlora_model`, with its bitsandbytes 4-bit layers computing through ladder-kernels' nf4_matmul."""
    from ladder_kernels.nn.nf4_linear import patch_bnb_

    model = make_qlora_model(model_or_dir, **kwargs)
    if patch_bnb_(model) == 0:
        raise RuntimeError("make_qlora_lk_model: no bitsandbytes nf4 layer was found to patch")
    return model


# --- every method, and its training step -------------------------------------------------------------------
def _load_plain_backbone(source, dtype: torch.dtype, device) -> nn.Module:
    """A 16-bit causal LM for LadderModel (which quantizes it to NF4 itself)."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"build_method_model: source must be a transformers checkpoint folder (with config.json), got {path}"
            )
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": str(device or "cpu")})
    if isinstance(source, PretrainedConfig):
        with torch.device(device or "cpu"):
            return AutoModelForCausalLM.from_config(source, dtype=dtype)
    if isinstance(source, nn.Module):
        return source
    raise TypeError(
        "build_method_model: source must be a checkpoint folder, a transformers config or a model, got "
        f"{type(source).__name__}"
    )


def build_method_model(
    method: str, source, dtype: torch.dtype = torch.bfloat16, device=None, lora_r: int = LORA_R, **ladder_options
) -> nn.Module:
    """The trainable model of `method` (see the module docstring) over `source`: a checkpoint folder, a
    transformers config (random weights) or a model. ladder_options: LadderConfig fields (Ladder methods)."""
    if method not in METHODS:
        raise ValueError(f"build_method_model: method must be one of {METHODS}, got {method!r}")
    if method in QLORA_METHODS:
        if ladder_options:
            raise ValueError(
                f"build_method_model: LadderConfig options {sorted(ladder_options)} do not apply to method {method!r}"
            )
        maker = make_qlora_lk_model if method == "qlora-lk" else make_qlora_model
        return maker(
            source, r=lora_r, compute_dtype=dtype, gradient_checkpointing=method == "qlora-ckpt", device=device
        )
    from ladder_kernels.nn.config import LadderConfig
    from ladder_kernels.nn.ladder import LadderModel

    backbone = _load_plain_backbone(source, dtype, device)
    if method == "xladder":
        ladder_options.setdefault("xladder_depth", default_xladder_depth(backbone.config.num_hidden_layers))
    elif ladder_options.get("xladder_depth", 0):
        raise ValueError("build_method_model: method 'ladder' takes no xladder_depth (use method='xladder')")
    model = LadderModel(backbone, LadderConfig(**ladder_options))
    model.train()
    return model


class MethodTrainer:
    """One method's model and AdamW optimizer (on the trainable parameters; lr and lr rule as finetune's defaults),
    and its training step.

    QLoRA steps run under autocast to the compute dtype, as HF Trainer's bf16=True runs them (peft leaves
    norms in fp32 and LoRA weights in fp32); Ladder handles its dtypes itself.
    """

    def __init__(
        self,
        method: str,
        source,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
        lr: Optional[float] = None,
        lora_r: int = LORA_R,
        lr_rule: Optional[str] = None,
        **ladder_options,
    ):
        self.method = method
        self.model = build_method_model(method, source, dtype=dtype, device=device, lora_r=lora_r, **ladder_options)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise RuntimeError(f"MethodTrainer: method {method!r} built a model with no trainable parameters")
        rule = (lr_rule or DEFAULT_LR_RULE) if method in LADDER_METHODS else "uniform"  # as finetune trains
        lr = default_lr(method, rule) if lr is None else lr
        self.optimizer = torch.optim.AdamW(param_groups(self.model, lr, rule), lr=lr)
        self.autocast_dtype = dtype if method in QLORA_METHODS and dtype != torch.float32 else None
        self.device = trainable[0].device

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, on_phase=None) -> torch.Tensor:
        """Forward with loss, backward, AdamW step, zero_grad(set_to_none). Returns the detached loss.

        on_phase(name) is called as "forward", "backward" and "optimizer" begin (the planner files memory
        by phase through it)."""
        phase = on_phase or (lambda name: None)
        labels = input_ids if labels is None else labels
        phase("forward")
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = self.model(input_ids=input_ids, labels=labels).loss
        phase("backward")
        loss.backward()
        phase("optimizer")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
