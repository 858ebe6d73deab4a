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


class PerturbationDefaults:
    """No-op defaults for every hook of the protocol but ``forward_backward``; a perturbation
    overrides only what it needs."""

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


class NoPerturbation(PerturbationDefaults):
    """Plain training: one forward/backward at the current weights; ``loss_clean`` is ``loss``."""

    def forward_backward(self, model, batch, loss_fn):
        loss = loss_fn(model, batch)
        loss.backward()
        return loss.detach()


def make_perturbation(cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer) -> Perturbation:
    """The perturbation named by ``cfg.method`` (``ADAPTER+PERTURBATION``), over ``model``'s
    LoRA-family layers or trainable parameters; ``optimizer`` is where MGPO reads its momentum."""
    from dynamics.methods.layers import adapter_layers
    from dynamics.methods.mgpo import MGPO, MomentumSAM
    from dynamics.methods.noise import RandomWeightNoise, linear_weights
    from dynamics.methods.sam import SAM

    cfg = cfg.resolved()
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.perturbation is None:
        return NoPerturbation()
    if cfg.perturbation in ("mgpo", "mgpo-noapn"):
        return MGPO(adapter_layers(model), optimizer, rho=cfg.rho, beta=cfg.beta, apn=cfg.perturbation == "mgpo",
                    apn_cap=cfg.apn_cap, eps=cfg.apn_eps, clean_loss_every=cfg.clean_loss_every,
                    application=cfg.perturb_application, method=cfg.method)
    if cfg.perturbation == "msam":
        return MomentumSAM(params, optimizer, rho=cfg.rho, clean_loss_every=cfg.clean_loss_every, method=cfg.method)
    if cfg.perturbation == "sam":
        return SAM(params, rho=cfg.rho)
    if cfg.adapter == "full":
        return RandomWeightNoise(rho=cfg.rho, total_steps=cfg.steps, seed=cfg.seed, weights=linear_weights(model),
                                 clean_loss_every=cfg.clean_loss_every)
    return RandomWeightNoise(rho=cfg.rho, total_steps=cfg.steps, seed=cfg.seed, layers=adapter_layers(model),
                             clean_loss_every=cfg.clean_loss_every)


def global_norm(tensors) -> torch.Tensor:
    """L2 norm over all entries of ``tensors`` (a 0-d tensor, no host sync), accumulated in float32
    or in float64 for float64 tensors."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(())
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t, dtype=dtype) for t in tensors]))


class CleanLoss:
    """``loss_clean`` of one step, summed over its micro-batches: taken from an unperturbed pass when
    there is one, or measured by an extra no-grad forward every ``every`` steps (0: never)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.total: torch.Tensor | None = None

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach()
        self.total = loss if self.total is None else self.total + loss

    def measure(self, model: nn.Module, batch, loss_fn: LossFn) -> None:
        with torch.no_grad():
            self.add(loss_fn(model, batch))

    def value(self) -> float | None:
        return float(self.total) if self.total is not None else None

    def reset(self) -> None:
        self.total = None
