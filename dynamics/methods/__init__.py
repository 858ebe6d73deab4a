"""Adapters (how the model is parameterised) and perturbations (what happens around each step)."""

from dynamics.methods.base import NoPerturbation, Perturbation, make_perturbation

__all__ = ["NoPerturbation", "Perturbation", "make_perturbation"]
