"""The perturbation protocol: everything a method does around forward/backward and the optimizer
step, so that the training loop never knows which method it runs (docs/architecture.md).

The loop calls, per optimizer step::

    for batch in micro_batches:
        loss += perturbation.forward_backward(model, batch, loss_fn)   # perturb, backward, restore
    perturbation.on_accumulated_grad(model, optimizer)               # once, on the full gradient
    optimizer.step()
    perturbation.after_optimizer_step(model, optimizer)
    with perturbation.unperturbed(model):                             # eval and checkpoints
        ...

A perturbation never logs or saves: it reports numbers through ``step_metrics`` and
``layer_metrics``. What it carries from one step to the next is one explicit object, its
``state`` (a NamedTuple, as optax keeps a transform's state), and ``state_dict`` is that object in
checkpoint form; everything else it holds is scratch for the current step, rebuilt after each
optimizer step.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, NamedTuple, Protocol

import torch
from torch import nn

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class Perturbation(Protocol):
    state: tuple  # what it carries between optimizer steps: a NamedTuple, () for none

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

    def state_dict(self) -> dict:
        """``state`` as plain values and CPU tensors, for ``trainer_state.pt``."""

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state`` from ``state_dict()``'s output and drop this step's scratch."""


class StepCount(NamedTuple):
    """The state of a perturbation whose only memory is the step counter (noise, Momentum-SAM)."""

    steps: int  # optimizer steps taken so far


class PerturbationDefaults:
    """No-op defaults for every hook of the protocol but ``forward_backward``; a perturbation
    overrides only what it needs."""

    state: tuple = ()

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


class CountsSteps(PerturbationDefaults):
    """Defaults for a perturbation whose state is ``StepCount``: it advances after each optimizer
    step, and ``begin_step`` (overridden) drops the finished step's scratch."""

    state: StepCount = StepCount(steps=0)

    def begin_step(self) -> None:
        """Forget everything computed for the previous step (called after each optimizer step and
        after a restore)."""

    def after_optimizer_step(self, model, optimizer) -> None:
        self.state = StepCount(self.state.steps + 1)
        self.begin_step()

    def state_dict(self) -> dict:
        return {"steps": self.state.steps}

    def load_state_dict(self, state: dict) -> None:
        self.state = StepCount(int(state["steps"]))
        self.begin_step()


def plain_forward_backward(model: nn.Module, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> torch.Tensor:
    """One forward/backward at the current weights; returns the detached loss."""
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach()


class NoPerturbation(PerturbationDefaults):
    """Plain training: one forward/backward at the current weights; ``loss_clean`` is ``loss``."""

    def forward_backward(self, model, batch, loss_fn):
        return plain_forward_backward(model, batch, loss_fn)


# --- the optimizer's first moment (MGPO and Momentum-SAM take their direction from it) --------------
def first_moment(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor | None:
    state = optimizer.state.get(param, {})
    return state.get("exp_avg", state.get("momentum_buffer"))


def check_first_moment(optimizer: torch.optim.Optimizer, method: str) -> None:
    """Raise at start-up when the optimizer keeps no first moment to reuse (e.g. Adafactor,
    SGD without momentum): MGPO would otherwise silently become plain LoRA."""
    keeps_moment = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) or (
        isinstance(optimizer, torch.optim.SGD) and all(g.get("momentum", 0) > 0 for g in optimizer.param_groups))
    if not keeps_moment:
        raise ValueError(f"--method {method}: the optimizer {type(optimizer).__name__} keeps no first moment "
                         "(exp_avg or momentum_buffer) to take the perturbation direction from")


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

    def unperturbed_pass(self, model: nn.Module, batch, loss_fn: LossFn) -> torch.Tensor:
        """Forward/backward at the current weights, for a step that is not perturbed (rho 0, no
        momentum yet): its loss is the clean loss too. Returns the detached loss."""
        loss = plain_forward_backward(model, batch, loss_fn)
        self.add(loss)
        return loss

    def before_perturbed_pass(self, step: int, model: nn.Module, batch, loss_fn: LossFn) -> None:
        """On the steps it is due, the clean loss of ``batch`` by an extra no-grad forward."""
        if self.due(step):
            self.measure(model, batch, loss_fn)

    def value(self) -> float | None:
        return float(self.total) if self.total is not None else None

    def reset(self) -> None:
        self.total = None


@contextlib.contextmanager
def exact_restore(params: list[torch.Tensor]) -> Iterator[None]:
    """Snapshot ``params`` and copy the snapshot back on exit (also after an exception): adding
    and subtracting a perturbation does not return the same floats, a copy does (davda54/sam)."""
    snapshot = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, snapshot)
