"""LoRA-GA (Wang et al. 2024, arXiv 2407.05000) through peft (>= 0.19): the adapter starts along
the full-weight gradient, and the base weight is offset so the model's function is unchanged.

For every adapted linear layer, with G the average gradient of its weight W0 (out, in) over the
estimation batches and G ~= U S V^T (``torch.svd_lowrank``, top 4r), peft's ``lora_ga_init``
with the default ``direction="ArB2r"``, ``scale="stable"`` sets::

    A0 = V[:, :r]^T                                     (r, in)
    B0 = U[:, r:2r] diag(S[r:2r]) * out^(1/4) / sqrt(gamma)   (out, r)
    W0' = W0 - s B0 A0,   s = alpha / r

so ``W0' + s B0 A0 = W0`` (to float round-off) at step 0, and training moves A, B from there while
W0' stays frozen. This module only wires it: ``initialise`` runs peft's ``preprocess_loraga``
(the gradients) and ``get_peft_model`` (the SVD and offset); it re-implements none of it.

A rebuilt model (resume, analyze, export) must get the same W0'. Re-estimating the gradient would
cost the batches again, so a run keeps its step-0 adapter (A0, B0) as ``initial_adapter/``
(``runs.INITIAL_ADAPTER``)
(safetensors, written by us; peft's own gradient cache is an unrestricted ``torch.load``, never
used here) and ``load_initial`` re-derives ``W0' = W0 - s B0 A0`` from it with the arithmetic of
``lora_ga_init`` (float32, then the weight dtype), bit for bit. The same folder, whose config
says ``init_lora_weights=True``, is what peft's ``path_initial_model_for_weight_conversion``
needs to export the trained adapter as a plain LoRA on the original W0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers  # private helper: see initialise
from peft.utils.other import transpose
from safetensors.torch import load_file
from torch import nn


@dataclass(frozen=True)
class LoraGASource:
    """Where a LoRA-GA model's initial adapter comes from: a new estimate, with
    ``gradient_step(model)`` running forward and backward over the estimation batches (peft
    accumulates and averages the gradients), or ``initial_adapter``, a folder ``save_initial``
    wrote. Exactly one of the two."""

    gradient_step: Callable[[nn.Module], None] | None = None
    initial_adapter: Path | None = None

    def __post_init__(self) -> None:
        if (self.gradient_step is None) == (self.initial_adapter is None):
            raise ValueError("LoraGASource takes a gradient_step or an initial_adapter folder, exactly one")


def loraga_config(common: dict, cfg):
    """peft's LoraConfig for LoRA-GA with the run's ``loraga_*`` settings."""

    ga = LoraGAConfig(direction=cfg.loraga_direction, scale=cfg.loraga_scale, stable_gamma=cfg.loraga_stable_gamma)
    return LoraConfig(r=cfg.rank, init_lora_weights="lora_ga", lora_ga_config=ga, **common)


def initialise(base: nn.Module, lora_config, source: LoraGASource, seed: int) -> nn.Module:
    """``base`` wrapped as a LoRA-GA peft model: A0, B0 and W0' from a new gradient estimate, or
    restored from ``source.initial_adapter``. Draws (dropout during the estimate,
    ``svd_lowrank``'s random start) come from a fork of torch's RNG seeded by ``seed``.

    Raises ValueError for a model peft cannot initialise (a quantised base, no linear layers)."""
    # peft expands "all-linear" only inside get_peft_model; preprocess_loraga runs before it and
    # would match no layer, so the same expansion is applied first (private helper, same rule).
    lora_config = _maybe_include_all_linear_layers(copy.deepcopy(lora_config), base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if source.gradient_step is not None:
            preprocess_loraga(base, lora_config, lambda: source.gradient_step(base))
        # Without an estimate, peft falls back to LoRA's random init; load_initial then overwrites it.
        model = get_peft_model(base, lora_config)
    if source.initial_adapter is not None:
        load_initial(model, source.initial_adapter)
    return model


def save_initial(model: nn.Module, folder: Path) -> None:
    """Write the model's current (step-0) adapter to ``folder`` as a plain LoRA adapter
    (``adapter_model.safetensors``, ``adapter_config.json`` with ``init_lora_weights=True``)."""
    config = model.peft_config[model.active_adapter]
    init, ga = config.init_lora_weights, config.lora_ga_config
    config.init_lora_weights, config.lora_ga_config = True, None  # what peft's conversion requires of it
    try:
        model.save_pretrained(folder)
    finally:
        config.init_lora_weights, config.lora_ga_config = init, ga


def load_initial(model: nn.Module, folder: Path) -> None:
    """Set the adapter to the stored A0, B0 (and the head, for a classifier) and every adapted
    layer's frozen weight to ``W0' = W0 - s B0 A0``, computed as peft's ``lora_ga_init`` does
    (float32 product and difference, cast back to the weight's dtype). ``model`` must hold the
    original W0 (freshly built)."""

    result = set_peft_model_state_dict(model, load_file(str(Path(folder) / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise ValueError(f"{folder}: initial adapter has keys this model lacks: {result.unexpected_keys[:3]}")
    name = model.active_adapter
    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, LoraLayer) or name not in layer.lora_A:
                continue
            weight = layer.get_base_layer().weight
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            offset = layer.scaling[name] * (b.float() @ a.float())
            w = transpose(weight.data.to(torch.float32), layer.fan_in_fan_out) - offset
            weight.data = transpose(w.to(weight.dtype), layer.fan_in_fan_out)
