"""Smoothing a spectral density given as weighted nodes (numpy only, so figures and notebooks can
draw densities without importing torch; :func:`dynamics.analysis.spectral_density` computes them)."""

from __future__ import annotations

import math

import numpy as np


def gaussian_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """Smooth a weighted set of nodes into a density on ``grid``.

    ``p(x) = sum_j weights[j] * exp(-(x - nodes[j])^2 / (2 sigma^2)) / (sigma sqrt(2 pi))``;
    it integrates to ``sum(weights)`` (1 for :func:`spectral_density`) over a wide grid.

    Parameters
    ----------
    nodes, weights : ndarray, shape (m,)
        E.g. ``SpectralDensityResult.nodes`` and ``.weights``.
    grid : ndarray, shape (g,)
        Eigenvalues at which to evaluate the density.
    sigma : float
        Gaussian width, in eigenvalue units.

    Returns
    -------
    ndarray, shape (g,)
    """
    if not sigma > 0:
        raise ValueError(f"sigma={sigma}: must be positive")
    offsets = (np.asarray(grid, dtype=np.float64)[:, None] - np.asarray(nodes)[None, :]) / sigma
    kernel = np.exp(-0.5 * offsets**2) / (sigma * math.sqrt(2 * math.pi))
    return kernel @ np.asarray(weights, dtype=np.float64)
