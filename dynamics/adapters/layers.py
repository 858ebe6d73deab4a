"""The LoRA-family layers of a peft model, seen as low-rank maps ``(A, B, ...) -> DeltaW``.

Every perturbation that works in merged weight space needs, per layer, the first-order change of
``DeltaW`` along a tangent of the adapter parameters (the optimizer's momentum for MGPO, the
gradient for APN's norm). That change has rank <= 2r, so it is returned as two thin factors
``U (m, 2r)`` and ``V (2r, n)`` with ``U @ V`` the dense change; norms come from r x r Gram
matrices (``AdapterGroup.change_norms``) and the dense matrix is only built where it is cheaper
(``perturbations.weight_space``).
Layers of one shape are handled together (``AdapterGroup``: SmolLM2 has 210 adapted layers in 4
shapes), so a step's bookkeeping is a few batched matmuls rather than ~10 small ops per layer.

- LoRA / rsLoRA / PiSSA / LoRA+ / DoRA: ``DeltaW = s B A`` with ``s = module.scaling`` (alpha/r, or
  alpha/sqrt(r) for rsLoRA), so along ``(t_A, t_B)`` the change is ``s (t_B A + B t_A)``
  = ``[s t_B, s B] @ [A; t_A]``. DoRA's magnitude vector is left out of the direction.
- AdaLoRA (``SVDLinear``): ``DeltaW = k B (A * E)`` with ``k = s / (ranknum + 1e-5)``, so the change
  is ``k [t_B, B] @ [A * E; t_A * E + A * t_E]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import nn


@dataclass(frozen=True)
class FactorGrams:
    """The Gram matrices of a group's own factors, shared by the norm of every change at these
    parameter values (MGPO takes two per step: momentum and gradient). ``U = [t_B, B]`` and
    ``V = [P; Q]`` factor a change (module doc), ``P = A`` (LoRA) or ``A * E`` (AdaLoRA). Only the
    ``r x r`` products are kept: a stacked copy of the factors held for the step would add every
    adapter's size to the peak memory (+5 % at r = 128 on SmolLM2)."""

    BtB: torch.Tensor  # (G, r, r) B^T B, >= float32
    PPt: torch.Tensor  # (G, r, r) P P^T


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

    def change_pairs(self, tangent: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The change along ``tangent`` without its scale, as ``((U_1, V_1), (U_2, V_2))`` made of the
        layer's own (detached) tensors where the formula allows: LoRA ``(t_B, A), (B, t_A)``; AdaLoRA
        ``(t_B, A * E), (B, t_A * E + A * t_E)``. Multiply by ``scales()`` for the change itself."""
        p = {role: v.detach() for role, v in self.parameters().items()}
        t = {role: v.detach() for role, v in tangent.items()}
        if self.is_adalora:
            return (t["B"], p["A"] * p["E"]), (p["B"], t["A"] * p["E"] + p["A"] * t["E"])
        return (t["B"], p["A"]), (p["B"], t["A"])

    def delta_weight(self) -> torch.Tensor:
        """The dense ``DeltaW`` (m, n) of the adapter (peft's own formula), detached."""
        return self.module.get_delta_weight(self.adapter).detach()


@dataclass(frozen=True)
class AdapterGroup:
    """Adapter layers of one kind and shape, whose factors stack into ``(G, ...)`` tensors."""

    layers: tuple[AdapterLayer, ...]

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def stacked(self, tensors_by_layer: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``{role: (G, ...)}`` from one ``{role: tensor}`` per layer, detached, >= float32."""
        return {role: _at_least_float32(torch.stack([t[role] for t in tensors_by_layer]))
                for role in tensors_by_layer[0]}

    def parameters(self) -> dict[str, torch.Tensor]:
        return self.stacked([layer.parameters() for layer in self.layers])

    def scales(self, like: torch.Tensor) -> torch.Tensor:
        """``(G,)`` the factor s (LoRA family) or k = s / (ranknum + 1e-5) (AdaLoRA) per layer."""
        scaling = torch.tensor([float(layer.module.scaling[layer.adapter]) for layer in self.layers],
                               dtype=like.dtype, device=like.device)
        if not self.layers[0].is_adalora:
            return scaling
        ranknum = torch.stack([layer.module.ranknum[layer.adapter].detach().reshape(()) for layer in self.layers])
        return scaling / (ranknum.to(like) + 1e-5)

    def change_norms(self, tangent: dict[str, torch.Tensor],
                     grams: FactorGrams | None = None) -> tuple[torch.Tensor, FactorGrams]:
        """``(G,)`` Frobenius norms of each layer's change along ``tangent`` (``{role: (G, ...)}``,
        stacked like ``parameters()``), without building it.

        The change is ``scale [t_B, B] [P; Q]`` (``Q = t_A``, or ``t_A * E + A * t_E`` for AdaLoRA), so

            ||change||^2 / scale^2 = <t_B^T t_B, P P^T> + 2 <t_B^T B, P Q^T> + <B^T B, Q Q^T>,

        four ``r x r`` products of cost ``r^2 m`` or ``r^2 n`` each, plus ``B^T B`` and ``P P^T``, which
        depend on the parameters alone. Returns the norms and those two Grams (computed here when
        ``grams`` is None): pass them back to the next call at the same parameters to share them.
        """
        p = self.parameters()
        t = {role: _at_least_float32(v) for role, v in tangent.items()}
        adalora = self.layers[0].is_adalora
        B, P = p["B"], p["A"] * p["E"] if adalora else p["A"]
        Q = t["A"] * p["E"] + p["A"] * t["E"] if adalora else t["A"]
        if grams is None:
            grams = FactorGrams(B.mT @ B, P @ P.mT)
        tB = t["B"]
        squared = ((tB.mT @ tB) * grams.PPt).sum(dim=(1, 2))
        squared += 2 * ((tB.mT @ B) * (P @ Q.mT)).sum(dim=(1, 2))
        squared += (grams.BtB * (Q @ Q.mT)).sum(dim=(1, 2))
        return self.scales(squared).abs() * squared.clamp_min(0).sqrt(), grams


# Suffixes peft puts after the adapted module's name in a parameter's name.
_PEFT_PARAMETER_MARKERS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.", ".lora_E.", ".modules_to_save.")


def layer_name(name: str) -> str:
    """The one name of a layer, used as the ``layer`` column of layers.parquet and as the key of
    every per-layer number: the adapted module's name without peft's wrappers. Takes a module
    name or a parameter name::

        base_model.model.model.layers.0.mlp.up_proj                       -> model.layers.0.mlp.up_proj
        base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight -> model.layers.0.mlp.up_proj
        model.layers.0.mlp.up_proj.weight  (full fine-tuning)              -> model.layers.0.mlp.up_proj
    """
    name = name.removeprefix("base_model.model.")
    for marker in _PEFT_PARAMETER_MARKERS:
        name = name.split(marker)[0]
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


def group_layers(layers: list[AdapterLayer]) -> list[AdapterGroup]:
    """Partition ``layers`` into groups of equal kind, factor shapes, dtype and device (first-seen
    order; the layers keep their relative order within a group)."""
    groups: dict[tuple, list[AdapterLayer]] = {}
    for layer in layers:
        params = layer.parameters()
        key = (layer.is_adalora, *((role, tuple(t.shape), t.dtype, t.device) for role, t in params.items()))
        groups.setdefault(key, []).append(layer)
    return [AdapterGroup(tuple(members)) for members in groups.values()]


def adapter_layers(model: nn.Module) -> list[AdapterLayer]:
    """Every LoRA-family tuner layer with a trainable adapter on a Linear base, in module order.

    Raises ValueError for a tuner layer whose base is not an ``nn.Linear`` (e.g. Conv1D with
    ``fan_in_fan_out``), instead of skipping it silently as a type check would.
    """

    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not len(module.lora_A):
            continue
        adapter = module.active_adapters[0]
        if not isinstance(module.get_base_layer(), nn.Linear) or getattr(module, "fan_in_fan_out", False):
            raise ValueError(f"layer {name}: weight-space perturbations need an nn.Linear base layer, "
                             f"found {type(module.get_base_layer()).__name__}")
        layers.append(AdapterLayer(layer_name(name), module, adapter))
    return layers


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32))
