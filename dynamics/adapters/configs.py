"""Adapters as peft configs: how ``cfg.adapter`` parameterises the model (nothing else; the per-step
duties of AdaLoRA are in ``hooks.py``, the optimizer in ``training.optim``).

LoRA goes on every linear layer except embeddings, norms and the output/classification head
(paper Sec. 4); peft's ``all-linear`` shorthand drops the LM head and, with ``task_type=SEQ_CLS``,
the classifier, which it trains in full instead.

- lora: ``LoraConfig``; scaling s = alpha / r.
- rslora: ``LoraConfig(use_rslora=True)``; s = alpha / sqrt(r).
- dora: ``LoraConfig(use_dora=True)``; s = alpha / r, times DoRA's magnitude normalisation.
- pissa: ``LoraConfig(init_lora_weights="pissa")``: A, B from the top-r SVD of W0, which keeps the
  residual; s = alpha / r.
- loraplus: ``LoraConfig`` plus peft's ``create_loraplus_optimizer`` (B's learning rate is
  ``loraplus_ratio`` times A's); s = alpha / r.
- adalora: ``AdaLoraConfig``: rank ceil(1.5 r) per layer pruned to an average of r by SVD
  importance, with its orthogonality regulariser; s = alpha / ranknum.
- loraga: ``LoraConfig(init_lora_weights="lora_ga")``: A, B from the SVD of the full-weight
  gradient, W0 offset to keep the function (``loraga.py``); s = alpha / r.
"""

from __future__ import annotations

import math

import torch
from peft import AdaLoraConfig, LoraConfig, TaskType, get_peft_model
from torch import nn

from dynamics.adapters.loraga import LoraGASource, initialise, loraga_config
from dynamics.config import ConfigError, RunConfig
from dynamics.files import first_line


def peft_config(cfg: RunConfig):

    common = dict(lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout, target_modules="all-linear",
                  task_type=TaskType.CAUSAL_LM if cfg.task_kind == "causal_lm" else TaskType.SEQ_CLS)
    if cfg.adapter == "adalora":
        # AdaLoRA paper defaults for the schedule: warm-up 10 %, final fine-tuning 20 %, reallocate
        # every 10 steps; start from 1.5x the target budget.
        return AdaLoraConfig(init_r=math.ceil(1.5 * cfg.rank), target_r=cfg.rank, total_step=cfg.steps,
                             tinit=int(0.1 * cfg.steps), tfinal=int(0.2 * cfg.steps), deltaT=10, **common)
    if cfg.adapter == "loraga":
        return loraga_config(common, cfg)
    variant = {"rslora": dict(use_rslora=True), "dora": dict(use_dora=True),
               "pissa": dict(init_lora_weights="pissa")}.get(cfg.adapter, {})
    return LoraConfig(r=cfg.rank, **variant, **common)


def apply_adapter(model: nn.Module, cfg: RunConfig, loraga: LoraGASource | None = None) -> nn.Module:
    """Wrap ``model`` for ``cfg.adapter``. LoRA's A init draws from a seeded RNG fork; LoRA-GA
    needs ``loraga``, where its initial adapter comes from."""
    if cfg.adapter == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    if cfg.adapter == "loraga":
        if loraga is None:
            raise ValueError("--method loraga: the model needs its gradient batches or its run's initial adapter")
        try:
            return initialise(model, peft_config(cfg), loraga, cfg.seed)
        except ValueError as error:  # a quantised base, no linear layer: peft's words, on one line
            raise ConfigError(f"--method {cfg.method}: LoRA-GA cannot start on this model "
                              f"({first_line(error)})") from None

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, peft_config(cfg))
