"""LoRA-MGPO (Chang et al., Sec. 3.2) as the authors' reference code computes it, and the APN ablation.

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
weight for the forward/backward only (``weight_space``: W0 is never written), so the
optimizer, evaluation and checkpoints see unperturbed weights and eq. 7's restore is implicit.
No perturbation on the first step (no momentum yet). ``g_l`` is updated once per optimizer step
from the accumulated gradient (the reference updates it per micro-batch from partial gradients).
For AdaLoRA the same formulas use ``DeltaW = k B (A * E)`` (``layers.AdapterLayer``).

The paper-equation reading (Momentum-SAM in parameter space) is ``msam``, in ``msam.py``.

Why ``mgpo`` is the default: it is what produced the paper's numbers, and its per-layer merged-space
direction is what distinguishes MGPO from Momentum-SAM.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dynamics.adapters.layers import AdapterGroup, AdapterLayer, FactorGrams, group_layers
from dynamics.perturbations.base import (
    CleanLoss,
    PerturbationDefaults,
    check_first_moment,
    first_moment,
)
from dynamics.perturbations.lora_fused import fusable, perturbed_lora_layers
from dynamics.perturbations.weight_space import LowRankDelta, LowRankSum, perturbed_base_layers


class MGPOState(NamedTuple):
    """What MGPO carries from one optimizer step to the next, and all that its checkpoint holds."""

    steps: int  # optimizer steps taken so far; no perturbation while 0 (no momentum yet)
    grad_ema: tuple[torch.Tensor | None, ...]  # per layer group, (G,) float32 g_l (eq. 8); None until set


class StepPerturbation(NamedTuple):
    """One step's perturbation: ``deltas`` by layer name, and per group the ``(G,)`` APN factors
    c_l and Frobenius norms ||Delta_l||_F = rho c_l ||d_l|| / (||d_l|| + eps)."""

    deltas: dict[str, LowRankSum]
    scales: list[torch.Tensor]
    norms: list[torch.Tensor]


class MGPO(PerturbationDefaults):
    """Momentum-guided perturbation of the frozen base weights of every LoRA-family layer.

    The per-layer quantities are computed for each group of equally shaped layers at once
    (``adapters.layers.AdapterGroup``). Besides ``state`` it holds only this step's scratch:
    Delta (built on first use) and, per group, the Gram matrices B^T B and P P^T at this step's
    parameters, shared by the momentum norm (before the forward) and the gradient norm (after the
    backward); ``begin_step`` drops them when the optimizer has stepped.
    """

    def __init__(self, layers: list[AdapterLayer], optimizer: torch.optim.Optimizer, *, rho: float, beta: float,
                 apn: bool, apn_cap: float, eps: float, clean_loss_every: int, application: str = "auto",
                 method: str = "lora+mgpo") -> None:
        check_first_moment(optimizer, method)
        if not layers:
            raise ValueError(f"--method {method}: the model has no LoRA-family layer to perturb")
        self.layers = layers
        self.groups = group_layers(layers)
        self.optimizer = optimizer
        self.rho, self.beta, self.apn, self.apn_cap, self.eps = rho, beta, apn, apn_cap, eps
        self.application = application
        self.method = method
        refused = [layer.name for layer in layers if not fusable(layer)] if application == "fused" else []
        if refused:
            raise ValueError(f"--perturb-application fused: {refused[0]} is not a plain LoRA layer (DoRA, AdaLoRA, "
                             "dropout, LoRA bias or mixed dtypes); use auto, dense or lowrank")
        self.state = MGPOState(steps=0, grad_ema=(None,) * len(self.groups))
        self.loss_clean = CleanLoss(clean_loss_every)
        self.begin_step()

    def begin_step(self) -> None:
        """Drop the finished step's scratch (Delta, Grams, clean loss)."""
        self._step: StepPerturbation | None = None
        self._grams: list[FactorGrams | None] = [None] * len(self.groups)
        self.loss_clean.reset()

    def grad_ema_by_layer(self) -> dict[str, torch.Tensor]:
        """g_l by layer name, 0-d float32 tensors (layers whose group has no g_l yet are left out)."""
        grad_ema = {}
        for group, ema in zip(self.groups, self.state.grad_ema):
            if ema is not None:
                grad_ema.update(zip(group.names, ema.unbind()))
        return grad_ema

    # --- the perturbation --------------------------------------------------------------------------
    def step_perturbation(self) -> StepPerturbation:
        """This step's Delta_l (eq. 4), c_l and ||Delta_l||_F; empty on the first step or when rho = 0."""
        if self._step is not None:
            return self._step
        self._step = StepPerturbation({}, [], [])
        if self.state.steps == 0 or self.rho == 0:
            return self._step
        for index, (group, grad_ema) in enumerate(zip(self.groups, self.state.grad_ema)):
            moments = self._first_moments(group)
            # ||d_l||, d_l = s (m_B A + B m_A) of rank <= 2r, from r x r Gram matrices
            norms, self._grams[index] = group.change_norms(group.stacked(moments), self._grams[index])
            scales = self._apn_scales(grad_ema, norms)
            coefficients = -self.rho * scales * group.scales(norms) / (norms + self.eps)
            # Delta_l references the layer's own parameters and moments (no copy held for the step);
            # its coefficient stays a tensor: no host sync.
            for g, (layer, moment) in enumerate(zip(group.layers, moments)):
                self._step.deltas[layer.name] = LowRankSum(layer.change_pairs(moment), coefficients[g])
            self._step.scales.append(scales)
            self._step.norms.append(self.rho * scales * norms / (norms + self.eps))
        return self._step

    def step_deltas(self) -> dict[str, LowRankSum]:
        """Delta_l for this step (eq. 4) as thin factors, by layer name."""
        return self.step_perturbation().deltas

    def _first_moments(self, group: AdapterGroup) -> list[dict[str, torch.Tensor]]:
        moments = []
        for layer in group.layers:
            moment = {role: first_moment(self.optimizer, param) for role, param in layer.parameters().items()}
            if any(m is None for m in moment.values()):
                raise RuntimeError(f"--method {self.method}: no first moment for {layer.name} after "
                                   f"{self.state.steps} steps; refusing to train it unperturbed")
            moments.append(moment)
        return moments

    def _apn_scales(self, grad_ema: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        if not self.apn or grad_ema is None:
            return torch.ones_like(like)
        return torch.clamp(1.0 / (grad_ema.to(like) + self.eps), max=self.apn_cap)

    def forward_backward(self, model: nn.Module, batch, loss_fn) -> torch.Tensor:
        deltas = self.step_deltas()
        if not deltas:
            return self.loss_clean.unperturbed_pass(model, batch, loss_fn)
        self.loss_clean.before_perturbed_pass(self.state.steps, model, batch, loss_fn)
        fused, through_base = self._split_by_application()
        bases = {layer.base: LowRankDelta(deltas[layer.name]) for layer in through_base}
        base_application = "auto" if self.application in ("auto", "fused") else self.application
        ways = ("lowrank", "lowrank") if self.application == "fused" else None  # None: cheapest per layer
        with perturbed_lora_layers({layer: deltas[layer.name] for layer in fused}, ways), \
                perturbed_base_layers(bases, base_application):
            loss = loss_fn(model, batch)
            loss.backward()  # inside: gradient checkpointing re-runs the perturbed forward here
        return loss.detach()

    def _split_by_application(self) -> tuple[list[AdapterLayer], list[AdapterLayer]]:
        """(layers whose LoRA forward takes Delta in, layers perturbed through the base weight)."""
        if self.application in ("dense", "lowrank"):
            return [], list(self.layers)
        if self.application == "fused":  # every layer is fusable: checked in __init__
            return list(self.layers), []
        return ([layer for layer in self.layers if fusable(layer)],
                [layer for layer in self.layers if not fusable(layer)])

    # --- once per optimizer step ----------------------------------------------------------------
    def on_accumulated_grad(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """g_l <- beta g_l + (1 - beta) ||s (grad_B A + B grad_A)||_F on the step's full gradient
        (the first value as is). A group with a layer that got no gradient keeps its g_l."""
        grad_ema = list(self.state.grad_ema)
        for index, group in enumerate(self.groups):
            grads = [{role: p.grad for role, p in layer.parameters().items()} for layer in group.layers]
            if any(g is None for layer_grads in grads for g in layer_grads.values()):
                continue
            norms, self._grams[index] = group.change_norms(group.stacked(grads), self._grams[index])
            previous = grad_ema[index]
            grad_ema[index] = norms if previous is None else self.beta * previous + (1 - self.beta) * norms
        self.state = self.state._replace(grad_ema=tuple(grad_ema))

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.state = self.state._replace(steps=self.state.steps + 1)
        self.begin_step()

    # --- reporting and state ------------------------------------------------------------------------
    def step_metrics(self) -> dict[str, float | None]:
        ema = [e for e in self.state.grad_ema if e is not None]
        numbers: dict[str, float | None] = {
            "loss_clean": self.loss_clean.value(),
            "grad_ema": float(torch.cat(ema).mean()) if ema else None,
        }
        if self._step is not None and self._step.deltas:
            numbers["apn_scale"] = float(torch.cat(self._step.scales).mean())
            numbers["perturb_norm"] = float(torch.linalg.vector_norm(torch.cat(self._step.norms)))
        return numbers

    def layer_metrics(self) -> dict[str, dict[str, float]]:
        columns: dict[str, tuple | list] = {"grad_ema": self.state.grad_ema}
        if self._step is not None and self._step.deltas:
            columns.update(apn_scale=self._step.scales, perturb_norm=self._step.norms)
        rows: dict[str, dict[str, float]] = {layer.name: {} for layer in self.layers}
        for column, per_group in columns.items():
            for group, values in zip(self.groups, per_group):
                if values is not None:
                    for name, value in zip(group.names, values.tolist()):  # one host sync per group
                        rows[name][column] = value
        return rows

    def state_dict(self) -> dict:
        """``{"steps": int, "grad_ema": {layer name: 0-d CPU tensor}}`` (the checkpoint format)."""
        return {"grad_ema": {k: v.detach().cpu() for k, v in self.grad_ema_by_layer().items()},
                "steps": self.state.steps}

    def load_state_dict(self, state: dict) -> None:
        device = self.layers[0].base.weight.device
        saved = state["grad_ema"]
        grad_ema = tuple(torch.stack([saved[name] for name in group.names]).to(device)
                         if all(name in saved for name in group.names) else None for group in self.groups)
        self.state = MGPOState(steps=int(state["steps"]), grad_ema=grad_ema)
        self.begin_step()
