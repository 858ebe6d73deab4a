"""The perturbation protocol: everything a method does around forward/backward and the optimizer
step, so that the training loop never knows which method it runs (STYLE.md, Sec. 1).

The loop calls, per optimizer step::

    for batch in micro_batches:
        loss += perturbation.forward_backward(model, batch, loss_fn)   # perturb, backward, restore
    perturbation.on_accumulated_grad(model, optimizer)               # once, on the full gradient
    optimizer.step()
    perturbation.after_optimizer_step(model, optimizer)
    with perturbation.unperturbed(model):                             # eval and checkpoints
        ...

A perturbation never logs or saves: it reports numbers through ``step_metrics`` and
``layer_metrics`` and its state through ``state_dict``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from dynamics.config import RunConfig

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class Perturbation(Protocol):
    def forward_backward(self, model: nn.Module, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> torch.Tensor:
        """Forward and backward on one micro-batch; returns the detached loss the gradient was
        taken at. Weights are back at their unperturbed values when it returns or raises."""

    def on_accumulated_grad(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Once per optimizer step, after the last micro-batch's backward."""

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Once per optimizer step, after ``optimizer.step()``."""

    def unperturbed(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Context in which the model holds its unperturbed weights (eval, checkpoints)."""

    def step_metrics(self) -> dict[str, float | None]:
        """Scalars for this step's metrics row (``loss_clean``, ``grad_ema``, ``apn_scale``,
        ``perturb_norm``); a missing key is logged as null."""

    def layer_metrics(self) -> dict[str, dict[str, float]]:
        """Per-layer scalars (``grad_ema``, ``apn_scale``, ``perturb_norm``) keyed by layer name."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class NoPerturbation:
    """Plain training: one forward/backward at the current weights; ``loss_clean`` is ``loss``."""

    def forward_backward(self, model, batch, loss_fn):
        loss = loss_fn(model, batch)
        loss.backward()
        return loss.detach()

    def on_accumulated_grad(self, model, optimizer) -> None:
        return None

    def after_optimizer_step(self, model, optimizer) -> None:
        return None

    @contextlib.contextmanager
    def unperturbed(self, model) -> Iterator[None]:
        yield

    def step_metrics(self) -> dict[str, float | None]:
        return {}

    def layer_metrics(self) -> dict[str, dict[str, float]]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


def make_perturbation(cfg: RunConfig, model: nn.Module) -> Perturbation:
    """The perturbation named by ``cfg.method`` (``ADAPTER+PERTURBATION``)."""
    if cfg.perturbation is None:
        return NoPerturbation()
    raise ValueError(f"--method {cfg.method}: perturbation {cfg.perturbation} is not available")
