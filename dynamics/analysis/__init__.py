"""Pure analysis of runs: double-descent phases of loss curves and Hessian sharpness.

Phase detection and density smoothing need numpy, pandas and scipy only; the sharpness functions import torch on
first use, so ``import dynamics.analysis`` stays light for table and figure code.
"""

from __future__ import annotations

import importlib
from typing import Any

from dynamics.analysis.density import gaussian_density
from dynamics.analysis.phases import (
    PhaseThresholds,
    SpikeThresholds,
    detect_phases,
    phase_summary,
    smooth_loss,
)

_SHARPNESS_NAMES = (
    "HessianEigenResult",
    "HessianTraceResult",
    "SpectralDensityResult",
    "hessian_eigenvalues",
    "hessian_trace",
    "model_loss_fn",
    "spectral_density",
)

__all__ = [
    "PhaseThresholds",
    "SpikeThresholds",
    "detect_phases",
    "gaussian_density",
    "phase_summary",
    "smooth_loss",
    *_SHARPNESS_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _SHARPNESS_NAMES:
        return getattr(importlib.import_module("dynamics.analysis.sharpness"), name)
    raise AttributeError(f"module 'dynamics.analysis' has no attribute {name!r}")
