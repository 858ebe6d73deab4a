"""Pure analysis of runs: double-descent phases of loss curves, what a run did (its outcome, how
it blew up, what it cost) and Hessian sharpness.

Phase detection and density smoothing need numpy, pandas and scipy only; the sharpness functions import torch on
first use, so ``import dynamics.analysis`` stays light for table and figure code.
"""

from __future__ import annotations

import importlib
from typing import Any

from dynamics.analysis.cost import cost_table
from dynamics.analysis.density import gaussian_density
from dynamics.analysis.outcomes import OUTCOMES, blowup, run_outcome
from dynamics.analysis.phases import (
    PhaseThresholds,
    SpikeThresholds,
    detect_phases,
    phase_summary,
    smooth_loss,
)

_SHARPNESS_NAMES = (
    "HessianEigenResult",
    "HessianVectorProduct",
    "HessianTraceResult",
    "SpectralDensityResult",
    "hessian_eigenvalues",
    "hessian_trace",
    "model_loss_fn",
    "preserved_params",
    "spectral_density",
)

__all__ = [
    "OUTCOMES",
    "PhaseThresholds",
    "SpikeThresholds",
    "blowup",
    "cost_table",
    "detect_phases",
    "gaussian_density",
    "phase_summary",
    "run_outcome",
    "smooth_loss",
    *_SHARPNESS_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _SHARPNESS_NAMES:
        return getattr(importlib.import_module("dynamics.analysis.sharpness"), name)
    raise AttributeError(f"module 'dynamics.analysis' has no attribute {name!r}")
