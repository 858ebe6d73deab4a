"""SAM (Foret et al. 2021): two forward/backward passes per micro-batch.

    g  = grad L(theta)                       first pass; its loss is ``loss_clean``, for free
    e  = rho g / (||g||_2 + eps)             global norm over the trainable parameters
    g~ = grad L(theta + e)                   second pass: the gradient the optimizer uses

``theta`` is restored from an exact copy after the second pass (not by subtracting e), as in
davda54/sam. With gradient accumulation each micro-batch takes its own ascent step from its own
gradient (SAM's m-sharpness with m = the micro-batch size); the gradients of earlier
micro-batches are set aside during the two passes and added back.

Data parallel (``dynamics.distributed``): ``sum_gradients`` sums the first pass's gradient over the
processes before ``e`` is formed, so every process ascends along the gradient of the whole
micro-batch, as one process would (the global-ascent reading; per-process ascent, SAM's
m-sharpness with m = the shard, would make the result depend on the number of processes). The
second pass's gradient is summed with the rest of the step's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from dynamics.perturbations.base import CleanLoss, PerturbationDefaults, exact_restore
from dynamics.tensors import global_norm


class SAM(PerturbationDefaults):
    """Two passes per micro-batch (module doc). No state carries over between steps."""

    def __init__(self, params: list[torch.Tensor], *, rho: float, eps: float = 1e-12,
                 sum_gradients: Callable[[Sequence[torch.Tensor]], None] = lambda params: None) -> None:
        self.params = params
        self.sum_gradients = sum_gradients  # over the processes of a data-parallel run (module doc)
        self.rho, self.eps = rho, eps
        self.loss_clean = CleanLoss(every=0)  # fed by the first pass, every step
        self.begin_step()

    def begin_step(self) -> None:
        self._perturb_norm: torch.Tensor | None = None  # largest ascent norm over this step's micro-batches
        self.loss_clean.reset()

    def forward_backward(self, model: nn.Module, batch, loss_fn) -> torch.Tensor:
        accumulated = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        clean = loss_fn(model, batch)
        clean.backward()
        self.sum_gradients(self.params)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        grad_norm = global_norm(grads)
        ascent = torch._foreach_mul(grads, self.rho / (grad_norm + self.eps))
        for p in self.params:
            p.grad = None
        with exact_restore(self.params):
            with torch.no_grad():
                torch._foreach_add_(self.params, ascent)
            loss = loss_fn(model, batch)
            loss.backward()
        for p, earlier in zip(self.params, accumulated):
            if earlier is not None:
                p.grad = earlier if p.grad is None else p.grad.add_(earlier)
        self.loss_clean.add(clean)
        step_norm = global_norm(ascent)
        self._perturb_norm = step_norm if self._perturb_norm is None else torch.maximum(self._perturb_norm, step_norm)
        return loss.detach()

    def after_optimizer_step(self, model, optimizer) -> None:
        self.begin_step()

    def step_metrics(self) -> dict[str, float | None]:
        return {"loss_clean": self.loss_clean.value(),
                "perturb_norm": float(self._perturb_norm) if self._perturb_norm is not None else None}
