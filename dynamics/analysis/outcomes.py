"""What a run did, in one word and a few timings: the outcome label of a run-table row
(:func:`run_outcome`) and how its smoothed loss went up (:func:`blowup`).

Pure: a mapping or arrays in, a string or dict out. ``dynamics.load_runs`` puts the label in its
``outcome`` column, the phase map colours cells by it and the study report tabulates it, so every
place that says what a run did says the same thing. The label reads the numbers of
:func:`dynamics.analysis.phase_summary`, which in turn reads the phases of
:func:`dynamics.analysis.detect_phases`: a run whose loss rises and never comes back is a
``collapse`` here and has a ``diverge`` row without a ``restabilise`` row there.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from dynamics.analysis.phases import PhaseThresholds, smooth_loss

# From the best outcome to the worst (the phase map's legend order).
OUTCOMES = ("smooth", "double descent", "rise from start", "collapse", "no descent", "diverged")


def run_outcome(row: Mapping[str, Any]) -> str:
    """What a run did, from its run-table row (``dynamics.load_runs``; a dict or Series).

    - ``diverged``: status diverged, or a non-finite final loss;
    - ``no descent``: its smoothed loss never fell ``min_descent`` below the start and did not end
      ``min_descent`` above it (it did not learn, whatever wobbles the detector found);
    - ``collapse``: it descended but ended less than ``min_descent`` below its start, having given
      its progress back, however slowly; or it never descended and ended more than ``min_descent``
      above its start; or a divergence that never came back (a ``diverge`` phase without a
      ``restabilise``);
    - ``double descent``: a divergence followed by a re-stabilisation;
    - ``rise from start``: no divergence, but a sustained climb from its first steps before it
      came down below its start (``rose_from_start``);
    - ``smooth``: none of these.

    Cells that were never measured (None / NaN: a summary an older ``dynamics analyze`` stored)
    are read as unknown, and the label falls back to what the measured ones support.
    """
    final_loss = _known(row.get("final_loss"))
    if row.get("status") == "diverged" or not np.isfinite(float(np.nan if final_loss is None else final_loss)):
        return "diverged"
    min_descent = PhaseThresholds().min_descent
    descended = _known(row.get("descended"))
    final_drop = _known(row.get("final_drop"))
    if descended is False:
        rose_and_stayed = final_drop is not None and final_drop < -min_descent
        return "collapse" if rose_and_stayed else "no descent"
    if descended and final_drop is not None and final_drop < min_descent:
        return "collapse"
    if bool(_known(row.get("double_descent"))):
        return "double descent"
    if (_known(row.get("n_episodes")) or 0) > 0:
        return "collapse"
    if _known(row.get("rose_from_start")):
        return "rise from start"
    return "smooth"


def _known(value: Any) -> Any:
    """``value``, or None where a run-table cell is None / NaN (not measured)."""
    if value is None:
        return None
    if isinstance(value, (float, np.floating)) and np.isnan(value):
        return None
    return bool(value) if isinstance(value, (bool, np.bool_)) else value


def blowup(loss: np.ndarray, step: np.ndarray) -> dict[str, float]:
    """How the smoothed training loss ``s(t)`` (:func:`smooth_loss`, the phase detector's curve)
    went up.

    Parameters
    ----------
    loss, step : array_like, shape (n,)
        As in :func:`dynamics.analysis.detect_phases` (nats/token; optimizer steps as logged).

    Returns
    -------
    dict
        ``peak_loss``, ``peak_step``: the highest ``s`` and its step; ``min_loss``, ``min_step``:
        the lowest ``s`` before that peak; ``above_start_step``: the first step after that minimum
        where ``s > s(0)`` (NaN if never); ``below_start_step``: the first step after the peak
        where ``s < s(0)`` again, a recovery (NaN if never or if the peak is the first point);
        ``doubled_step``: the first step where ``s >= 2 s(0)``, a blow-up (NaN if never).
    """
    steps = np.asarray(step)
    smoothed = smooth_loss(loss, step)
    peak = int(np.argmax(smoothed))
    lowest = int(np.argmin(smoothed[: peak + 1]))
    above = np.flatnonzero(smoothed[lowest:] > smoothed[0])
    below = np.flatnonzero(smoothed[peak:] < smoothed[0]) if peak > 0 else np.array([], dtype=int)
    doubled = np.flatnonzero(smoothed >= 2 * smoothed[0])
    return {"peak_loss": float(smoothed[peak]), "peak_step": int(steps[peak]),
            "doubled_step": int(steps[doubled[0]]) if len(doubled) else np.nan,
            "below_start_step": int(steps[peak + below[0]]) if len(below) else np.nan,
            "min_loss": float(smoothed[lowest]), "min_step": int(steps[lowest]),
            "above_start_step": int(steps[lowest + above[0]]) if len(above) else np.nan}
