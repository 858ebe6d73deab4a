"""LoRA-MGPO (Chang et al., Sec. 3.2) in its two readings, and the APN ablation.

``mgpo`` (default, the authors' reference code) and ``mgpo-noapn``: per LoRA layer l, in merged
weight space,

    d_l     = s (m_B A + B m_A)                     first-order change of s B A along the
                                                    optimizer's first moment m (AdamW exp_avg,
                                                    beta1 = mu; eq. 5 up to the (1 - mu) factor,
                                                    which the normalisation removes)
    g_l    <- beta g_l + (1 - beta) ||s (grad_B A + B grad_A)||_F      (eq. 8; first value as is)
    c_l     = min(1 / (g_l + eps), apn_cap)  under APN, 1 without       (adaptive normalisation)
    Delta_l = -rho c_l d_l / (||d_l||_F + eps)                           (eq. 4)

and each step's gradient is taken at ``W0 + Delta`` (eq. 6), with Delta applied to the frozen base
weight for the forward/backward only (``weight_perturbation``: W0 is never written), so the
optimizer, evaluation and checkpoints see unperturbed weights and eq. 7's restore is implicit.
No perturbation on the first step (no momentum yet). ``g_l`` is updated once per optimizer step
from the accumulated gradient (the reference updates it per micro-batch from partial gradients).
For AdaLoRA the same formulas use ``DeltaW = k B (A * E)`` (``layers.AdapterLayer``).

``msam`` (the paper-equation / Momentum-SAM reading, Becker et al. 2024, AdamW form): a
parameter-space perturbation of the trainable parameters themselves,
``theta~ = theta - rho m / ||m||`` with the global norm over all trainable parameters and no APN;
the gradient is taken at ``theta~`` and the optimizer steps from ``theta``. Momentum-SAM keeps the
parameters at ``theta~`` between steps and moves them back for evaluation and saving; applying the
perturbation around each forward/backward and restoring the exact copy is the same computation
without that bookkeeping. It is the only MGPO reading that applies to ``full``.

Why ``mgpo`` is the default: it is what produced the paper's numbers, and its per-layer merged-space
direction is what distinguishes MGPO from Momentum-SAM.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch
from torch import nn

from dynamics.methods.base import CleanLoss, PerturbationDefaults, global_norm
from dynamics.methods.layers import AdapterLayer, LowRank
from dynamics.methods.weight_perturbation import LowRankDelta, perturbed_base_layers


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


class MGPOState(NamedTuple):
    grad_ema: dict[str, torch.Tensor]  # layer name -> g_l, 0-d float32 (eq. 8)
    steps: int  # optimizer steps taken so far


class MGPO(PerturbationDefaults):
    """Momentum-guided perturbation of the frozen base weights of every LoRA-family layer."""

    def __init__(self, layers: list[AdapterLayer], optimizer: torch.optim.Optimizer, *, rho: float, beta: float,
                 apn: bool, apn_cap: float, eps: float, clean_loss_every: int, application: str = "auto",
                 method: str = "lora+mgpo") -> None:
        check_first_moment(optimizer, method)
        if not layers:
            raise ValueError(f"--method {method}: the model has no LoRA-family layer to perturb")
        self.layers = layers
        self.optimizer = optimizer
        self.rho, self.beta, self.apn, self.apn_cap, self.eps = rho, beta, apn, apn_cap, eps
        self.application = application
        self.method = method
        self.state = MGPOState(grad_ema={}, steps=0)
        self._deltas: dict[str, LowRank] | None = None  # this step's Delta_l, built on first use
        self._scales: dict[str, torch.Tensor] = {}  # this step's c_l
        self.loss_clean = CleanLoss(clean_loss_every)

    # --- the perturbation --------------------------------------------------------------------------
    def step_deltas(self) -> dict[str, LowRank]:
        """Delta_l for this step (eq. 4) as thin factors; empty on the first step or when rho = 0."""
        if self._deltas is not None:
            return self._deltas
        self._deltas, self._scales = {}, {}
        if self.state.steps == 0 or self.rho == 0:
            return self._deltas
        for layer in self.layers:
            momentum = {}
            for role, param in layer.parameters().items():
                moment = first_moment(self.optimizer, param)
                if moment is None:
                    raise RuntimeError(f"--method {self.method}: no first moment for {layer.name}.{role} after "
                                       f"{self.state.steps} steps; refusing to train it unperturbed")
                momentum[role] = moment
            direction = layer.change_along(momentum)  # d_l = s (m_B A + B m_A), rank <= 2r
            scale = self._apn_scale(layer.name, direction.U)
            coefficient = -self.rho * scale * direction.scale / (direction.frobenius_norm() + self.eps)
            # Fold the coefficient into U as a tensor: no host sync per layer.
            self._deltas[layer.name] = LowRank(direction.U * coefficient, direction.V, 1.0)
            self._scales[layer.name] = scale
        return self._deltas

    def _apn_scale(self, name: str, like: torch.Tensor) -> torch.Tensor:
        grad_ema = self.state.grad_ema.get(name)
        if not self.apn or grad_ema is None:
            return torch.ones((), dtype=like.dtype, device=like.device)
        return torch.clamp(1.0 / (grad_ema + self.eps), max=self.apn_cap)

    def forward_backward(self, model: nn.Module, batch, loss_fn) -> torch.Tensor:
        deltas = self.step_deltas()
        if not deltas:
            loss = loss_fn(model, batch)
            loss.backward()
            self.loss_clean.add(loss)
            return loss.detach()
        if self.loss_clean.due(self.state.steps):
            self.loss_clean.measure(model, batch, loss_fn)
        bases = {layer.base: LowRankDelta(deltas[layer.name]) for layer in self.layers}
        with perturbed_base_layers(bases, self.application):
            loss = loss_fn(model, batch)
        loss.backward()
        return loss.detach()

    # --- once per optimizer step ----------------------------------------------------------------
    def on_accumulated_grad(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """g_l <- beta g_l + (1 - beta) ||s (grad_B A + B grad_A)||_F on the step's full gradient."""
        for layer in self.layers:
            grads = {role: p.grad for role, p in layer.parameters().items()}
            if any(g is None for g in grads.values()):
                continue
            norm = layer.change_along(grads).frobenius_norm()
            previous = self.state.grad_ema.get(layer.name)
            ema = norm if previous is None else self.beta * previous + (1 - self.beta) * norm
            self.state.grad_ema[layer.name] = ema

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.state = self.state._replace(steps=self.state.steps + 1)
        self._deltas, self._scales = None, {}
        self.loss_clean.reset()

    # --- reporting and state ------------------------------------------------------------------------
    def step_metrics(self) -> dict[str, float | None]:
        ema = list(self.state.grad_ema.values())
        numbers: dict[str, float | None] = {
            "loss_clean": self.loss_clean.value(),
            "grad_ema": float(torch.stack(ema).mean()) if ema else None,
        }
        if self._deltas:
            numbers["apn_scale"] = float(torch.stack(list(self._scales.values())).mean())
            norms = torch.stack([d.frobenius_norm() for d in self._deltas.values()])
            numbers["perturb_norm"] = float(torch.linalg.vector_norm(norms))
        return numbers

    def layer_metrics(self) -> dict[str, dict[str, float]]:
        rows: dict[str, dict[str, float]] = {}
        names = [layer.name for layer in self.layers]
        for name in names:
            row = {}
            if name in self.state.grad_ema:
                row["grad_ema"] = self.state.grad_ema[name]
            if self._deltas and name in self._deltas:
                row["apn_scale"] = self._scales[name]
                row["perturb_norm"] = self._deltas[name].frobenius_norm()
            rows[name] = row
        values = [v for row in rows.values() for v in row.values()]
        if values:  # one host sync for every layer's numbers
            flat = iter(torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values]).tolist())
            rows = {name: {k: next(flat) for k in row} for name, row in rows.items()}
        return rows

    def state_dict(self) -> dict:
        return {"grad_ema": {k: v.detach().cpu() for k, v in self.state.grad_ema.items()}, "steps": self.state.steps}

    def load_state_dict(self, state: dict) -> None:
        device = self.layers[0].base.weight.device
        grad_ema = {k: v.to(device) for k, v in state["grad_ema"].items()}
        self.state = MGPOState(grad_ema=grad_ema, steps=int(state["steps"]))
        self._deltas, self._scales = None, {}


class MomentumSAM(PerturbationDefaults):
    """``msam``: theta~ = theta - rho m / ||m||_global on the trainable parameters (module doc)."""

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer, *, rho: float,
                 clean_loss_every: int, eps: float = 1e-12, method: str = "lora+msam") -> None:
        check_first_moment(optimizer, method)
        self.params = params
        self.optimizer = optimizer
        self.rho, self.eps = rho, eps
        self.method = method
        self.steps = 0
        self.loss_clean = CleanLoss(clean_loss_every)
        self._perturb_norm: float | None = None

    def forward_backward(self, model: nn.Module, batch, loss_fn) -> torch.Tensor:
        if self.steps == 0 or self.rho == 0:
            loss = loss_fn(model, batch)
            loss.backward()
            self.loss_clean.add(loss)
            return loss.detach()
        if self.loss_clean.due(self.steps):
            self.loss_clean.measure(model, batch, loss_fn)
        momentum = [first_moment(self.optimizer, p) for p in self.params]
        if any(m is None for m in momentum):
            raise RuntimeError(f"--method {self.method}: a trainable parameter has no first moment "
                               f"after {self.steps} steps; refusing to train it unperturbed")
        norm = global_norm(momentum)
        factor = float(self.rho / (norm + self.eps))
        self._perturb_norm = factor * float(norm)
        with exact_restore(self.params):
            with torch.no_grad():
                torch._foreach_add_(self.params, [m.to(p.dtype) for m, p in zip(momentum, self.params)], alpha=-factor)
            loss = loss_fn(model, batch)
            loss.backward()
        return loss.detach()

    def after_optimizer_step(self, model, optimizer) -> None:
        self.steps += 1
        self._perturb_norm = None
        self.loss_clean.reset()

    def step_metrics(self) -> dict[str, float | None]:
        return {"loss_clean": self.loss_clean.value(), "perturb_norm": self._perturb_norm}

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])


@contextlib.contextmanager
def exact_restore(params: list[torch.Tensor]) -> Iterator[None]:
    """Snapshot ``params`` and copy the snapshot back on exit (also after an exception): adding
    and subtracting a perturbation does not return the same floats, a copy does."""
    snapshot = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, snapshot)
