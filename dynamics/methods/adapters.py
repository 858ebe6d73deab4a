"""Adapters as peft configs, plus the few per-step duties some of them carry (``AdapterHooks``).

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
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dynamics.config import RunConfig


def peft_config(cfg: RunConfig):
    from peft import AdaLoraConfig, LoraConfig, TaskType

    common = dict(lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout, target_modules="all-linear",
                  task_type=TaskType.CAUSAL_LM if cfg.task_kind == "causal_lm" else TaskType.SEQ_CLS)
    if cfg.adapter == "adalora":
        # AdaLoRA paper defaults for the schedule: warm-up 10 %, final fine-tuning 20 %, reallocate
        # every 10 steps; start from 1.5x the target budget.
        return AdaLoraConfig(init_r=math.ceil(1.5 * cfg.rank), target_r=cfg.rank, total_step=cfg.steps,
                             tinit=int(0.1 * cfg.steps), tfinal=int(0.2 * cfg.steps), deltaT=10, **common)
    variant = {"rslora": dict(use_rslora=True), "dora": dict(use_dora=True),
               "pissa": dict(init_lora_weights="pissa")}.get(cfg.adapter, {})
    return LoraConfig(r=cfg.rank, **variant, **common)


def apply_adapter(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Wrap ``model`` for ``cfg.adapter``. LoRA's A init draws from a seeded RNG fork."""
    if cfg.adapter == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, peft_config(cfg))


def make_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with beta1 = mu (the momentum MGPO reuses) and weight decay 0 by default (paper
    Sec. 4); for LoRA+ peft's grouping, B at ``loraplus_ratio`` times the learning rate of A."""
    adamw = dict(betas=(cfg.mu, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    if cfg.adapter == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.lr, loraplus_lr_ratio=cfg.loraplus_ratio,
                                         **adamw)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, **adamw)


class AdapterHooks:
    """Per-step duties of an adapter, called by the loop; nothing for most adapters."""

    def before_optimizer_step(self, model: nn.Module) -> None:
        """After the last backward of a step, before clipping and the optimizer step."""

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """After ``optimizer.step()``, before the gradients are cleared; ``step`` counts from 0."""

    def state_dict(self, model: nn.Module) -> dict:
        return {}

    def load_state_dict(self, model: nn.Module, state: dict) -> None:
        return None


class AdaLoraHooks(AdapterHooks):
    """AdaLoRA's orthogonality regulariser and its rank allocation, run each step as peft requires
    (``update_and_allocate`` after the optimizer step, before the gradients are cleared); the rank
    allocator's importance estimates and the rank pattern are checkpointed so a resume is exact."""

    def before_optimizer_step(self, model: nn.Module) -> None:
        # peft adds this term inside its forward only when the model returns a loss; we compute our
        # own token-mean loss from the logits, so we add its gradient here, once per step.
        regulariser = orthogonality_regulariser(model)
        if regulariser is not None:
            regulariser.backward()

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        model.base_model.update_and_allocate(step)

    def state_dict(self, model: nn.Module) -> dict:
        allocator = model.base_model.rankallocator
        config = model.peft_config[model.base_model.trainable_adapter_name]
        return {name: {k: v.detach().cpu() for k, v in getattr(allocator, name).items()}
                for name in ("ipt", "exp_avg_ipt", "exp_avg_unc")} | {"rank_pattern": config.rank_pattern}

    def load_state_dict(self, model: nn.Module, state: dict) -> None:
        allocator = model.base_model.rankallocator
        device = next(model.parameters()).device
        for name in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, name, {k: v.to(device) for k, v in state[name].items()})
        model.peft_config[model.base_model.trainable_adapter_name].rank_pattern = state["rank_pattern"]


def orthogonality_regulariser(model: nn.Module) -> torch.Tensor | None:
    """AdaLoRA's ``w * mean_P ||P P^T - I||_F`` over its A (rows) and B (columns) factors, as in
    peft's ``AdaLoraModel.forward`` (weight ``orth_reg_weight``, default 0.5)."""
    config = model.peft_config[model.base_model.trainable_adapter_name]
    terms = []
    for name, p in model.named_parameters():
        if p.requires_grad and (".lora_A." in name or ".lora_B." in name):
            covariance = p @ p.T if ".lora_A." in name else p.T @ p
            identity = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
            terms.append(torch.linalg.matrix_norm(covariance - identity))
    if not terms or config.orth_reg_weight == 0:
        return None
    return config.orth_reg_weight * torch.stack(terms).mean()


def adapter_hooks(cfg: RunConfig) -> AdapterHooks:
    return AdaLoraHooks() if cfg.adapter == "adalora" else AdapterHooks()
