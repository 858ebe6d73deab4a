"""The per-step duties an adapter carries, called by the training step: nothing for most, the
orthogonality regulariser and rank allocation for AdaLoRA (peft's ``update_and_allocate``).
"""

from __future__ import annotations

import torch
from torch import nn

from dynamics.config import RunConfig


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
