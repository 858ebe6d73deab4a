"""The optimizer and the learning-rate schedule of a run (paper Sec. 4: AdamW, weight decay 0,
cosine schedule after a linear warm-up of 3 % of the steps)."""

from __future__ import annotations

import math

import torch
from peft.optimizers import create_loraplus_optimizer
from torch import nn
from transformers import get_scheduler

from dynamics.config import RunConfig


def make_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with beta1 = mu (the momentum MGPO reuses) and weight decay 0 by default (paper
    Sec. 4); for LoRA+ peft's grouping, B at ``loraplus_ratio`` times the learning rate of A."""
    adamw = dict(betas=(cfg.mu, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    if cfg.adapter == "loraplus":

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.lr, loraplus_lr_ratio=cfg.loraplus_ratio,
                                         **adamw)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, **adamw)


def make_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' schedule of ``cfg.schedule`` with ``ceil(warmup_ratio * steps)`` warm-up steps."""

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    warmup_steps = math.ceil(cfg.warmup_ratio * cfg.steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=cfg.steps)
