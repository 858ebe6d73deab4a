"""Random weight noise (Flat-LoRA, Li et al. 2024): the paper's "LoRA + Random Noise" baseline.

For each perturbed weight ``W' (m, n)`` (the merged ``W0 + DeltaW`` of a LoRA-family layer, or the
weight itself under ``full``), output row i gets Gaussian noise of standard deviation

    sigma_i = f(t) * rho / sqrt(n) * ||W'_i||_2,      f(t) = (1 - cos(pi t / T)) / 2

(a cosine ramp from 0 to 1 over the T training steps), drawn fresh each optimizer step, added for
the step's forward/backward and removed after. The noise of layer l at step t comes from a
generator seeded by (seed, t, l), so it is rebuilt exactly in backward instead of being stored,
and a resumed run draws the same noise. On a LoRA-family model the noise goes to the frozen base
weight through ``weight_space`` (W0 is never written); under ``full`` it is added to the
trainable weight and the exact copy is restored after backward.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from dynamics.adapters.layers import AdapterLayer, layer_name
from dynamics.perturbations.base import CleanLoss, CountsSteps, exact_restore
from dynamics.perturbations.weight_space import perturbed_base_layers


class NoiseDelta:
    """``W0 + sigma[:, None] * N(0, 1)`` with the normal draws fixed by ``seed``."""

    def __init__(self, row_sigma: torch.Tensor, seed: int) -> None:
        self.row_sigma = row_sigma  # (m,)
        self.seed = seed

    def noise(self, like: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        generator = torch.Generator(device=like.device).manual_seed(self.seed)
        if out is None:
            out = torch.empty_like(like, memory_format=torch.contiguous_format)
        draws = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype, out=out)
        return draws.mul_(self.row_sigma.to(like.dtype)[:, None])

    def perturbed(self, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.noise(weight, out).add_(weight)


def ramp(step: int, total_steps: int) -> float:
    """f(t) = (1 - cos(pi t / T)) / 2: 0 at the first step, 1 at the last."""
    return 0.5 * (1.0 - math.cos(math.pi * min(step, total_steps) / total_steps))


def layer_seed(seed: int, step: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])


def linear_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights ``full`` perturbs: every nn.Linear but the output/classification head, the set
    peft's ``all-linear`` would give LoRA."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skipped = {id(head)} | {id(getattr(model, n, None)) for n in ("classifier", "score")}
    return {layer_name(name): module.weight for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and id(module) not in skipped}


class RandomWeightNoise(CountsSteps):
    """Flat-LoRA's noise (module doc); state: ``StepCount`` (the ramp and the seeds follow it)."""

    def __init__(self, *, rho: float, total_steps: int, seed: int, clean_loss_every: int,
                 layers: list[AdapterLayer] | None = None, weights: dict[str, nn.Parameter] | None = None) -> None:
        if (layers is None) == (weights is None):
            raise ValueError("give either LoRA-family layers or the trainable weights to perturb")
        self.layers, self.weights = layers, weights
        self.rho, self.total_steps, self.seed = rho, total_steps, seed
        self.loss_clean = CleanLoss(clean_loss_every)
        self.begin_step()

    def begin_step(self) -> None:
        self._deltas: dict[str, NoiseDelta] | None = None  # this step's noise, built on first use
        self._norms: dict[str, torch.Tensor] = {}
        self.loss_clean.reset()

    def _merged_weights(self) -> dict[str, torch.Tensor]:
        if self.layers is not None:
            return {layer.name: layer.base.weight.detach().float() + layer.delta_weight().float()
                    for layer in self.layers}
        return {name: w.detach().float() for name, w in self.weights.items()}

    def step_deltas(self) -> dict[str, NoiseDelta]:
        if self._deltas is not None:
            return self._deltas
        self._deltas, self._norms = {}, {}
        steps = self.state.steps
        strength = ramp(steps, self.total_steps) * self.rho
        if strength == 0:
            return self._deltas
        for index, (name, merged) in enumerate(self._merged_weights().items()):
            row_norms = torch.linalg.vector_norm(merged, dim=1)  # ||W'_i||, (m,)
            sigma = strength / math.sqrt(merged.shape[1]) * row_norms
            self._deltas[name] = NoiseDelta(sigma, layer_seed(self.seed, steps, index))
            self._norms[name] = torch.linalg.vector_norm(sigma) * math.sqrt(merged.shape[1])  # E||noise||_F
        return self._deltas

    def forward_backward(self, model: nn.Module, batch, loss_fn) -> torch.Tensor:
        deltas = self.step_deltas()
        if not deltas:
            return self.loss_clean.unperturbed_pass(model, batch, loss_fn)
        self.loss_clean.before_perturbed_pass(self.state.steps, model, batch, loss_fn)
        if self.layers is not None:
            bases = {layer.base: deltas[layer.name] for layer in self.layers}
            with perturbed_base_layers(bases, application="dense"):
                loss = loss_fn(model, batch)
                loss.backward()  # inside: gradient checkpointing re-runs the perturbed forward here
            return loss.detach()
        weights = list(self.weights.values())
        with exact_restore(weights):
            with torch.no_grad():
                for name, weight in self.weights.items():
                    weight.add_(deltas[name].noise(weight))
            loss = loss_fn(model, batch)
            loss.backward()
        return loss.detach()

    def step_metrics(self) -> dict[str, float | None]:
        norm = float(torch.linalg.vector_norm(torch.stack(list(self._norms.values())))) if self._norms else 0.0
        return {"loss_clean": self.loss_clean.value(), "perturb_norm": norm}

    def layer_metrics(self) -> dict[str, dict[str, float]]:
        if not self._norms:
            return {}
        values = torch.stack(list(self._norms.values())).tolist()
        return {name: {"perturb_norm": value} for name, value in zip(self._norms, values)}
