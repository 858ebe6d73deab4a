"""The LoRA-family layers of a peft model, seen as low-rank maps ``(A, B, ...) -> DeltaW``.

Every perturbation that works in merged weight space needs, per layer, the first-order change of
``DeltaW`` along a tangent of the adapter parameters (the optimizer's momentum for MGPO, the
gradient for APN's norm). That change has rank <= 2r, so it is returned as two thin factors
``U (m, 2r)`` and ``V (2r, n)`` with ``U @ V`` the dense change; norms come from 2r x 2r Gram
matrices and the dense matrix is only built where it is cheaper (``weight_perturbation``).

- LoRA / rsLoRA / PiSSA / LoRA+ / DoRA: ``DeltaW = s B A`` with ``s = module.scaling`` (alpha/r, or
  alpha/sqrt(r) for rsLoRA), so along ``(t_A, t_B)`` the change is ``s (t_B A + B t_A)``
  = ``[s t_B, s B] @ [A; t_A]``. DoRA's magnitude vector is left out of the direction.
- AdaLoRA (``SVDLinear``): ``DeltaW = k B (A * E)`` with ``k = s / (ranknum + 1e-5)``, so the change
  is ``k [t_B, B] @ [A * E; t_A * E + A * t_E]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LowRank:
    """A dense ``(m, n)`` matrix held as ``scale * U @ V`` with ``U (m, k)``, ``V (k, n)``."""

    U: torch.Tensor
    V: torch.Tensor
    scale: float = 1.0

    def dense(self) -> torch.Tensor:
        return self.scale * (self.U @ self.V)

    def frobenius_norm(self) -> torch.Tensor:
        """||scale U V||_F from Gram matrices: ||UV||^2 = sum((U^T U) * (V V^T)); O((m+n) k^2)."""
        gram = (self.U.T @ self.U) * (self.V @ self.V.T)
        return abs(self.scale) * gram.sum().clamp_min(0).sqrt()


@dataclass(frozen=True)
class AdapterLayer:
    """One LoRA-family layer: its module name, the peft tuner module and its frozen base Linear."""

    name: str
    module: nn.Module
    adapter: str = "default"

    @property
    def base(self) -> nn.Linear:
        return self.module.get_base_layer()

    @property
    def is_adalora(self) -> bool:
        return hasattr(self.module, "lora_E")

    def parameters(self) -> dict[str, torch.Tensor]:
        """The trainable factors by role: ``A (r, n)``, ``B (m, r)`` and AdaLoRA's ``E (r, 1)``."""
        module, key = self.module, self.adapter
        if self.is_adalora:
            return {"A": module.lora_A[key], "B": module.lora_B[key], "E": module.lora_E[key]}
        return {"A": module.lora_A[key].weight, "B": module.lora_B[key].weight}

    def change_along(self, tangent: dict[str, torch.Tensor]) -> LowRank:
        """First-order change of ``DeltaW`` along ``tangent`` (same roles as ``parameters()``), as
        thin factors in float32 (float64 for float64 parameters), detached. Formulas: module doc."""
        p = {k: _at_least_float32(v) for k, v in self.parameters().items()}
        t = {k: _at_least_float32(v) for k, v in tangent.items()}
        U = torch.cat([t["B"], p["B"]], dim=1)  # (m, 2r)
        if self.is_adalora:
            ranknum = float(self.module.ranknum[self.adapter].detach())
            scale = float(self.module.scaling[self.adapter]) / (ranknum + 1e-5)
            V = torch.cat([p["A"] * p["E"], t["A"] * p["E"] + p["A"] * t["E"]], dim=0)  # (2r, n)
        else:
            scale = float(self.module.scaling[self.adapter])
            V = torch.cat([p["A"], t["A"]], dim=0)  # (2r, n)
        return LowRank(U, V, scale)

    def delta_weight(self) -> torch.Tensor:
        """The dense ``DeltaW`` (m, n) of the adapter (peft's own formula), detached."""
        return self.module.get_delta_weight(self.adapter).detach()


def adapter_layers(model: nn.Module) -> list[AdapterLayer]:
    """Every LoRA-family tuner layer with a trainable adapter on a Linear base, in module order.

    Raises ValueError for a tuner layer whose base is not an ``nn.Linear`` (e.g. Conv1D with
    ``fan_in_fan_out``), instead of skipping it silently as a type check would.
    """
    from peft.tuners.lora import LoraLayer

    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not len(module.lora_A):
            continue
        adapter = module.active_adapters[0]
        if not isinstance(module.get_base_layer(), nn.Linear) or getattr(module, "fan_in_fan_out", False):
            raise ValueError(f"layer {name}: weight-space perturbations need an nn.Linear base layer, "
                             f"found {type(module.get_base_layer()).__name__}")
        layers.append(AdapterLayer(_short_name(name), module, adapter))
    return layers


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32))


def _short_name(name: str) -> str:
    return name.removeprefix("base_model.model.")
