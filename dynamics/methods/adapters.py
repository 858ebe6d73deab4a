"""Adapters as peft configs, nothing else. LoRA goes on every linear layer except embeddings,
norms and the output/classification head (paper Sec. 4); peft's ``all-linear`` shorthand drops
the LM head and, with ``task_type=SEQ_CLS``, the classifier, which it trains in full instead."""

from __future__ import annotations

import torch
from torch import nn

from dynamics.config import RunConfig


def lora_config(cfg: RunConfig):
    from peft import LoraConfig, TaskType

    task_type = TaskType.CAUSAL_LM if cfg.task_kind == "causal_lm" else TaskType.SEQ_CLS
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        task_type=task_type,
    )


def apply_adapter(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Wrap ``model`` for ``cfg.adapter``. LoRA's A init draws from a seeded RNG fork."""
    if cfg.adapter == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, lora_config(cfg))
