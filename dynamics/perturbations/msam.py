"""Momentum-SAM (Becker et al. 2024, AdamW form): the paper-equation reading of LoRA-MGPO.

``msam`` is a parameter-space perturbation of the trainable parameters themselves,
``theta~ = theta - rho m / ||m||`` with the global norm over all trainable parameters and no APN;
the gradient is taken at ``theta~`` and the optimizer steps from ``theta``. Momentum-SAM keeps the
parameters at ``theta~`` between steps and moves them back for evaluation and saving; applying the
perturbation around each forward/backward and restoring the exact copy is the same computation
without that bookkeeping. It is the only MGPO reading that applies to ``full``.
"""

from __future__ import annotations

import torch
from torch import nn

from dynamics.perturbations.base import (
    CleanLoss,
    CountsSteps,
    check_first_moment,
    exact_restore,
    first_moment,
)
from dynamics.tensors import global_norm


class MomentumSAM(CountsSteps):
    """``msam``: theta~ = theta - rho m / ||m||_global on the trainable parameters (module doc).
    State: ``StepCount`` (no perturbation on the first step: no momentum yet)."""

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer, *, rho: float,
                 clean_loss_every: int, eps: float = 1e-12, method: str = "lora+msam") -> None:
        check_first_moment(optimizer, method)
        self.params = params
        self.optimizer = optimizer
        self.rho, self.eps = rho, eps
        self.method = method
        self.loss_clean = CleanLoss(clean_loss_every)
        self.begin_step()

    def begin_step(self) -> None:
        self._perturb_norm: float | None = None
        self.loss_clean.reset()

    def forward_backward(self, model: nn.Module, batch, loss_fn) -> torch.Tensor:
        steps = self.state.steps
        if steps == 0 or self.rho == 0:
            return self.loss_clean.unperturbed_pass(model, batch, loss_fn)
        self.loss_clean.before_perturbed_pass(steps, model, batch, loss_fn)
        momentum = [first_moment(self.optimizer, p) for p in self.params]
        if any(m is None for m in momentum):
            raise RuntimeError(f"--method {self.method}: a trainable parameter has no first moment "
                               f"after {steps} steps; refusing to train it unperturbed")
        norm = global_norm(momentum)
        factor = float(self.rho / (norm + self.eps))
        self._perturb_norm = factor * float(norm)
        with exact_restore(self.params):
            with torch.no_grad():
                torch._foreach_add_(self.params, [m.to(p.dtype) for m, p in zip(momentum, self.params)], alpha=-factor)
            loss = loss_fn(model, batch)
            loss.backward()
        return loss.detach()

    def step_metrics(self) -> dict[str, float | None]:
        return {"loss_clean": self.loss_clean.value(), "perturb_norm": self._perturb_norm}
