"""Perturbations: what a method does around each forward/backward and optimizer step
(``base.Perturbation``), one file per method. The model, the adapter and the loop know none of them.

- ``mgpo.py``       mgpo, mgpo-noapn: LoRA-MGPO in merged weight space (reference code, eqs. 4-8)
- ``msam.py``       msam: the paper-equation reading, Momentum-SAM in parameter space
- ``sam.py``        sam: two passes per micro-batch
- ``noise.py``      noise: Flat-LoRA's random weight noise
- ``weight_space.py``, ``lora_fused.py``: applying a Delta to frozen weights without writing them
"""

from __future__ import annotations

import torch
from torch import nn

from dynamics.adapters.layers import adapter_layers
from dynamics.config import RunConfig
from dynamics.distributed import ONE_PROCESS, World
from dynamics.perturbations.base import NoPerturbation, Perturbation
from dynamics.perturbations.mgpo import MGPO
from dynamics.perturbations.msam import MomentumSAM
from dynamics.perturbations.noise import RandomWeightNoise, linear_weights
from dynamics.perturbations.sam import SAM

__all__ = ["MGPO", "SAM", "MomentumSAM", "NoPerturbation", "Perturbation", "RandomWeightNoise", "make_perturbation"]


def make_perturbation(cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                      world: World = ONE_PROCESS) -> Perturbation:
    """The perturbation of ``cfg.perturbation`` over ``model``'s LoRA-family layers or trainable
    parameters; ``optimizer`` is where MGPO and Momentum-SAM read their momentum, ``world`` the
    processes of a data-parallel run (SAM sums its ascent gradient over them)."""
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
        return SAM(params, rho=cfg.rho, sum_gradients=world.sum_gradients)
    if cfg.adapter == "full":
        return RandomWeightNoise(rho=cfg.rho, total_steps=cfg.steps, seed=cfg.seed, weights=linear_weights(model),
                                 clean_loss_every=cfg.clean_loss_every)
    return RandomWeightNoise(rho=cfg.rho, total_steps=cfg.steps, seed=cfg.seed, layers=adapter_layers(model),
                             clean_loss_every=cfg.clean_loss_every)
