"""Double-descent phases of a training-loss curve: converge, diverge, restabilise.

A LoRA loss curve often falls, rises for a while, then falls again. :func:`detect_phases` turns
one noisy per-step loss curve into a table of those phases, :func:`phase_summary` into a handful
of numbers (is there a double descent, how high was the rise, how many steps did it cost).
Both are pure: an array in, a DataFrame or dict out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import pandas as pd
from scipy import ndimage

PHASE_DTYPES = {
    "phase": "str",
    "start_step": "int64",
    "end_step": "int64",
    "start_loss": "float64",
    "end_loss": "float64",
}
PHASE_COLUMNS = tuple(PHASE_DTYPES)

# 1.4826 * the median absolute residual estimates the standard deviation of Gaussian noise
# while ignoring the spikes that a plain standard deviation would count as noise.
MAD_TO_SIGMA = 1.4826
# The noise is measured over this many smoothing windows around each step: long enough for a
# stable median, short enough to follow noise that grows as the loss falls (additive noise).
NOISE_WINDOW_SMOOTHINGS = 5


@dataclass(frozen=True)
class PhaseThresholds:
    """What counts as a divergence and as a recovery. Steps are optimizer steps.

    Relative quantities compare the smoothed loss ``s(t)`` with its running minimum
    ``m(t) = min_{t' <= t} s(t')``: the *excess* is ``e(t) = s(t) / m(t) - 1``, so 0.05 means the
    loss is 5 % above the lowest value reached so far.
    """

    smooth_steps: float = 21
    """Hann window (steps) averaging the de-spiked loss; longer is smoother but blurs boundaries
    by up to half a window."""
    despike_steps: float = 7
    """Median-filter window (steps) run first: it erases spikes up to ``(despike_steps - 1) / 2``
    steps long, so they never reach the divergence test."""
    min_rise: float = 0.05
    """A divergence must rise at least this far above the running minimum (0.05 = 5 %)."""
    min_duration: float = 20
    """... and stay that high for at least this many steps (a sustained rise, not a spike, nor
    the slow wiggle that noise leaves in the smoothed curve)."""
    near_min: float = 0.02
    """Within this of the running minimum (0.02 = 2 %) the loss counts as *at* its minimum: a
    divergence starts at the last such step before the rise and has restabilised at the first
    such step after the peak. A curve that never comes back this close has no restabilise row."""
    near_sigmas: float = 2.5
    """``near_min`` is raised by this many standard deviations ``sigma`` of the noise left in the
    smoothed curve: the running minimum of a noisy curve sits about 2 sigma below its middle,
    so a loss back at its true minimum reads about 2 sigma above it."""
    rise_sigmas: float = 4.0
    """``min_rise`` is raised by this many ``sigma``: noise alone moves the smoothed curve from
    its running minimum to 4 sigma above it now and then, but rarely for ``min_duration``."""
    min_rise_of_start: float = 0.02
    """... and at least this fraction of the start loss in absolute terms (0.02 = 2 % of
    ``start_loss``, the median raw loss of the first ``despike_steps`` steps): near a loss of
    zero a tiny absolute wobble is a large relative rise. Still scale-free: it compares the loss
    with itself."""
    near_of_start: float = 0.01
    """The loss also counts as at its minimum within this fraction of the start loss of it
    (0.01 = 1 % of ``start_loss``): a loss back at 0.01 after a rise to 0.5 has recovered, even if
    its running minimum was 0.003."""
    min_descent: float = 0.1
    """A curve *descended* when its smoothed loss falls at least this far below the start loss
    (0.1 = 10 %; the start is the median raw loss of the first ``despike_steps`` steps). A run
    stuck at its starting loss (a classifier at chance) may still wobble into a "divergence";
    :func:`phase_summary` reports ``descended`` so readers can tell it from one that learned."""

    def __post_init__(self) -> None:
        for name in ("smooth_steps", "despike_steps", "min_rise", "near_min", "min_descent"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a positive number")
        for name in ("min_duration", "near_sigmas", "rise_sigmas", "min_rise_of_start", "near_of_start"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be zero or positive")
        if self.near_min >= self.min_rise:
            raise ValueError(f"near_min={self.near_min!r}: must be smaller than min_rise={self.min_rise!r}")
        if self.near_of_start > self.min_rise_of_start:
            raise ValueError(f"near_of_start={self.near_of_start!r}: must not exceed "
                             f"min_rise_of_start={self.min_rise_of_start!r}")


@dataclass(frozen=True)
class SpikeThresholds:
    """What counts as a spike in :func:`phase_summary`'s ``n_spikes``. Steps are optimizer steps.

    A spike starts at step ``t`` when ``loss[t] > mean + spike_sigmas * std``, where mean and
    standard deviation are those of the raw loss over the ``spike_window`` steps before ``t``,
    and it must fall back below that same bar within ``spike_max_steps`` steps (a loss that jumps
    and stays up is a divergence, not a spike).
    """

    spike_window: float = 20
    """Length of the trailing window (steps) giving the mean and standard deviation."""
    spike_sigmas: float = 5.0
    """How many trailing standard deviations above the trailing mean make a spike. With 20
    points the standard deviation itself is uncertain by about 16 %, so 4 would flag a
    Gaussian noise point every few hundred steps; 5 flags about one per 10,000."""
    spike_max_steps: float = 3
    """Longest excursion (steps) still counted as a spike."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) > 0:
                raise ValueError(f"{field.name}={getattr(self, field.name)!r}: must be a positive number")


@dataclass(frozen=True)
class DivergenceEpisode:
    """One divergence as positions (0-based indices) into the loss array."""

    start_index: int  # last point at the running minimum before the rise
    peak_index: int  # highest smoothed loss of the episode
    recovery_index: int | None  # first point back at the running minimum; None if never


class PhaseSummary(TypedDict):
    """What :func:`phase_summary` returns: a loss curve's double descent in a handful of numbers.

    ``has_double_descent`` (bool)
        At least one divergence was followed by a re-stabilisation.
    ``divergence_amplitude`` (float)
        Highest peak of any divergence relative to the first minimum, the lowest smoothed
        loss before the first divergence: ``max_i s(peak_i) / min_{t <= start_1} s(t) - 1``
        (0.3 = 30 % above); 0.0 without divergence.
    ``rise_of_start`` (float)
        The same highest peak as a fraction of the start loss:
        ``(max_i s(peak_i) - min_{t <= start_1} s(t)) / start_loss`` (0.3 = the loss rose by
        30 % of where it started); 0.0 without divergence. Unlike the amplitude it stays
        readable when the first minimum is near zero.
    ``steps_lost`` (int or None)
        Steps from the start of the first divergence until the smoothed loss is back at or
        below the first minimum (or within ``near_of_start * start_loss`` of it); 0 without
        divergence, None if it never gets back.
    ``n_spikes`` (int)
        Short excursions of the raw loss, per :class:`SpikeThresholds`.
    ``n_episodes`` (int)
        Number of divergences (``diverge`` rows).
    ``start_loss`` (float)
        Median raw loss over the first ``despike_steps`` steps.
    ``loss_drop`` (float)
        How far the smoothed loss ever fell below the start: ``1 - min_t s(t) / start_loss``
        (0.9 = to a tenth of it; 0 or less: never below it).
    ``descended`` (bool)
        ``loss_drop >= min_descent``. A curve that did not descend has no first minimum worth
        the name, so its divergences are noise around its start, not a double descent.
    ``final_drop`` (float)
        ``1 - s(last) / start_loss``: how far below the start the curve ended. A curve that
        descended and ends with ``final_drop < min_descent`` gave everything back.
    ``early_rise`` (float)
        How far the smoothed loss climbed above its start before reaching its lowest point:
        ``max(0, max_{t <= t_min} s(t) / start_loss - 1)``, ``t_min = argmin_t s(t)``
        (1.0 = it doubled first). Near 0 for a curve that falls from its first step.
    ``rose_from_start`` (bool)
        That climb was a sustained rise, measured from the start as a divergence is measured
        from the running minimum: ``s >= (1 + min_rise) * start_loss`` from a first to a last
        step before ``t_min`` at least ``min_duration`` steps apart. Step 4 of
        :func:`detect_phases` counts no rise before a descent that comes back down, so such a
        curve, which climbs from its first steps and then falls below its start, has no
        divergence rows.
    """

    has_double_descent: bool
    divergence_amplitude: float
    rise_of_start: float
    steps_lost: int | None
    n_spikes: int
    n_episodes: int
    start_loss: float
    loss_drop: float
    descended: bool
    final_drop: float
    early_rise: float
    rose_from_start: bool


def detect_phases(
    loss: np.ndarray | pd.Series, step: np.ndarray | pd.Series | None = None, **thresholds: float
) -> pd.DataFrame:
    """Find the initial convergence, each sustained divergence and each re-stabilisation.

    How it works, step by step:

    1. Smooth: a median filter of ``despike_steps`` (erases isolated spikes), then a
       weighted average over a Hann window of ``smooth_steps`` (averages the noise): ``s(t)``.
       Both keep a non-increasing curve non-increasing, so a curve that only falls never shows
       a divergence.
    2. Measure the noise: ``sigma(t)``, the robust standard deviation (1.4826 x median absolute
       value) of ``loss / s - 1`` over the 5 smoothing windows around ``t``, times the
       window's noise gain ``sqrt(sum_i w_i^2)`` (0.26 for 21 points), is the relative noise
       left in ``s``. It raises the relative thresholds to
       ``near(t) = near_min + near_sigmas * sigma(t)`` and
       ``rise(t) = min_rise + rise_sigmas * sigma(t)``, and to the absolute floors
       ``near_of_start * L0`` and ``min_rise_of_start * L0`` (``L0`` the start loss, the median
       raw loss of the first ``despike_steps`` steps) read relative to the running minimum:
       ``near(t) >= near_of_start * L0 / m(t)``, ``rise(t) >= min_rise_of_start * L0 / m(t)``.
    3. Compare with the past: running minimum ``m(t) = min_{t'<=t} s(t')`` and excess
       ``e(t) = s(t) / m(t) - 1`` (a ratio, so multiplying the loss by a constant changes
       nothing).
    4. Candidate episodes are maximal runs of steps with ``e > near``. A run is a divergence if
       ``e >= rise`` from its first to its last such step spans at least ``min_duration`` steps,
       and if the loss had already fallen by ``rise`` before the run (a rise during warm-up,
       before any descent, that comes back down is not a divergence), or if the run lasts to the
       end of the curve still ``rise`` above the minimum (a climb from the first steps that never
       comes back is: the run collapsed).
    5. Boundaries: the divergence starts at the step just before the run (the last step at the
       minimum), peaks at the highest ``s`` in the run and has restabilised at the step just
       after the run (the first step back at the minimum). A run that lasts to the end of the
       curve has no restabilisation.

    Parameters
    ----------
    loss : array_like or pandas.Series, shape (n,)
        Training loss per logged step (nats/token), positive and finite. Series values are used;
        their index is ignored.
    step : array_like, shape (n,), optional
        Optimizer step of each loss value, strictly increasing integers (may start anywhere and
        have gaps). Default ``0 .. n-1``. Window lengths given in steps are converted to points
        with the median step spacing.
    **thresholds : float
        Fields of :class:`PhaseThresholds` (defaults): ``smooth_steps`` (21),
        ``despike_steps`` (7), ``min_rise`` (0.05), ``min_duration`` (20), ``near_min`` (0.02),
        ``near_sigmas`` (2.5), ``rise_sigmas`` (4), ``min_rise_of_start`` (0.02),
        ``near_of_start`` (0.01), ``min_descent`` (0.1).

    Returns
    -------
    pandas.DataFrame
        Columns ``phase`` (str), ``start_step``, ``end_step`` (int64, optimizer steps),
        ``start_loss``, ``end_loss`` (float64, smoothed loss at those steps). Rows in time order:
        ``converge``, then per episode ``diverge`` (start to peak) and ``restabilise`` (peak to
        recovery, absent if the loss never recovers; ``converge`` is absent too when the loss
        climbs from its first step). Consecutive rows share their boundary step. Empty (same
        columns and dtypes) when the curve has no divergence.

    Raises
    ------
    ValueError
        One line naming the problem: a threshold name that does not exist, a bad threshold
        value, a loss that is not 1-D, not finite (naming the step) or not positive, a ``step``
        of the wrong length or not increasing, fewer than 2 points. A curve shorter than a
        smoothing window is smoothed with the widest odd window it holds (15 points of a 16-step
        run); one shorter than ``min_duration`` has no divergence to find, and its table is empty.

    Examples
    --------
    >>> from dynamics.analysis.synthetic import make_curve
    >>> loss, truth = make_curve("bump", n_steps=400, noise=0.02, seed=0)
    >>> detect_phases(loss).phase.tolist()
    ['converge', 'diverge', 'restabilise']
    """
    phase_thresholds = thresholds_from_kwargs(thresholds, (PhaseThresholds,))[0]
    loss_values, steps = _checked_curve(loss, step)
    smoothed, episodes = _smooth_and_find_episodes(loss_values, steps, phase_thresholds)
    return phases_frame(episodes, smoothed, steps)


def phase_summary(
    loss: np.ndarray | pd.Series, step: np.ndarray | pd.Series | None = None, **thresholds: float
) -> PhaseSummary:
    """Summarise a loss curve's double descent in a handful of numbers.

    Parameters
    ----------
    loss, step
        As in :func:`detect_phases`.
    **thresholds : float
        Fields of :class:`PhaseThresholds` (passed to the phase detection) and of
        :class:`SpikeThresholds`: ``spike_window`` (20 steps), ``spike_sigmas`` (5),
        ``spike_max_steps`` (3).

    Returns
    -------
    PhaseSummary
        A dict of the keys :class:`PhaseSummary` documents (amplitude, steps lost, spikes,
        episodes, descent and early rise).
    """
    phase_thresholds, spike_thresholds = thresholds_from_kwargs(thresholds, (PhaseThresholds, SpikeThresholds))
    loss_values, steps = _checked_curve(loss, step)
    smoothed, episodes = _smooth_and_find_episodes(loss_values, steps, phase_thresholds)
    n_spikes = _count_spikes(loss_values, steps, spike_thresholds)
    start_loss = _start_loss(loss_values, steps, phase_thresholds)
    loss_drop = float(1.0 - smoothed.min() / start_loss)
    descent = {"start_loss": start_loss, "loss_drop": loss_drop,
               "descended": bool(loss_drop >= phase_thresholds.min_descent),
               "final_drop": float(1.0 - smoothed[-1] / start_loss),
               **_rise_from_start(smoothed, steps, start_loss, phase_thresholds)}
    if not episodes:
        return {
            "has_double_descent": False,
            "divergence_amplitude": 0.0,
            "rise_of_start": 0.0,
            "steps_lost": 0,
            "n_spikes": n_spikes,
            "n_episodes": 0,
            **descent,
        }
    first = episodes[0]
    first_minimum = smoothed[: first.start_index + 1].min()
    highest_peak = max(smoothed[episode.peak_index] for episode in episodes)
    back_at = first_minimum + phase_thresholds.near_of_start * start_loss
    back_below = np.flatnonzero(smoothed[first.peak_index :] <= back_at)
    steps_lost = int(steps[first.peak_index + back_below[0]] - steps[first.start_index]) if back_below.size else None
    return {
        "has_double_descent": any(episode.recovery_index is not None for episode in episodes),
        "divergence_amplitude": float(highest_peak / first_minimum - 1.0),
        "rise_of_start": float((highest_peak - first_minimum) / start_loss),
        "steps_lost": steps_lost,
        "n_spikes": n_spikes,
        "n_episodes": len(episodes),
        **descent,
    }


def find_episodes(
    smoothed: np.ndarray,
    step: np.ndarray,
    near_min: float | np.ndarray,
    min_rise: float | np.ndarray,
    min_duration: float,
) -> list[DivergenceEpisode]:
    """Divergence episodes of an already smooth curve (steps 3-5 of :func:`detect_phases`).

    Parameters
    ----------
    smoothed : ndarray, shape (n,)
        Positive, noise-free or smoothed loss.
    step : ndarray of int64, shape (n,)
        Strictly increasing optimizer steps.
    near_min, min_rise : float or ndarray, shape (n,)
        Relative excess over the running minimum that counts as at the minimum / as a rise,
        one value or one per point.
    min_duration : float
        Steps the excess must stay at or above ``min_rise``.

    Returns
    -------
    list of DivergenceEpisode
        In time order.
    """
    near_threshold = np.broadcast_to(near_min, smoothed.shape)  # (n,)
    rise_threshold = np.broadcast_to(min_rise, smoothed.shape)  # (n,)
    running_minimum = np.minimum.accumulate(smoothed)
    excess = smoothed / running_minimum - 1.0
    # scipy.signal.find_peaks measures a peak against the valleys on both sides; a divergence is
    # measured against the running minimum of the past, so runs of the excess are labelled.
    run_labels, _ = ndimage.label(excess > near_threshold)
    episodes = []
    for run_slice in ndimage.find_objects(run_labels):
        first, last = run_slice[0].start, run_slice[0].stop - 1  # first > 0 since excess[0] = 0
        risen = first + np.flatnonzero(excess[first : last + 1] >= rise_threshold[first : last + 1])
        if risen.size == 0 or step[risen[-1]] - step[risen[0]] < min_duration:
            continue
        start = first - 1
        recovery = last + 1 if last + 1 < smoothed.size else None
        descended_first = smoothed[: start + 1].max() >= (1.0 + rise_threshold[start]) * smoothed[start]
        still_risen = recovery is None and excess[-1] >= rise_threshold[-1]
        if not (descended_first or still_risen):  # a warm-up bump that came back down: not a divergence
            continue
        peak = first + int(np.argmax(smoothed[first : last + 1]))
        episodes.append(DivergenceEpisode(start, peak, recovery))
    return episodes


def smooth_loss(
    loss: np.ndarray | pd.Series, step: np.ndarray | pd.Series | None = None, **thresholds: float
) -> np.ndarray:
    """The smoothed curve ``s(t)`` that :func:`detect_phases` segments (its step 1).

    Parameters
    ----------
    loss, step
        As in :func:`detect_phases`.
    **thresholds : float
        Fields of :class:`PhaseThresholds`; only ``smooth_steps`` and ``despike_steps`` matter.

    Returns
    -------
    ndarray, shape (n,)
        Median-filtered then Hann-smoothed loss, in the units of ``loss`` (nats/token).
    """
    phase_thresholds = thresholds_from_kwargs(thresholds, (PhaseThresholds,))[0]
    loss_values, steps = _checked_curve(loss, step)
    return _smoothed(loss_values, steps, phase_thresholds)[0]


def phases_frame(episodes: list[DivergenceEpisode], smoothed: np.ndarray, step: np.ndarray) -> pd.DataFrame:
    """The phases table of :func:`detect_phases` from episodes found on ``smoothed``."""
    rows = []
    if episodes and episodes[0].start_index > 0:  # a climb from the first step converged nowhere
        rows.append(("converge", 0, episodes[0].start_index))
    for episode in episodes:
        rows.append(("diverge", episode.start_index, episode.peak_index))
        if episode.recovery_index is not None:
            rows.append(("restabilise", episode.peak_index, episode.recovery_index))
    start_index = np.array([row[1] for row in rows], dtype=np.int64)
    end_index = np.array([row[2] for row in rows], dtype=np.int64)
    columns = {
        "phase": [row[0] for row in rows],
        "start_step": step[start_index],
        "end_step": step[end_index],
        "start_loss": smoothed[start_index],
        "end_loss": smoothed[end_index],
    }
    return pd.DataFrame({name: pd.Series(values, dtype=PHASE_DTYPES[name]) for name, values in columns.items()})


def _smooth_and_find_episodes(
    loss: np.ndarray, step: np.ndarray, thresholds: PhaseThresholds
) -> tuple[np.ndarray, list[DivergenceEpisode]]:
    """Steps 1-5 of :func:`detect_phases`: the smoothed curve and its divergence episodes."""
    smoothed, window_weights = _smoothed(loss, step, thresholds)
    absolute_residual = pd.Series(np.abs(loss / smoothed - 1.0))
    smooth_points = window_weights.size
    noise_window = absolute_residual.rolling(NOISE_WINDOW_SMOOTHINGS * smooth_points, center=True, min_periods=1)
    local_noise_sigma = MAD_TO_SIGMA * noise_window.median().to_numpy()
    smoothed_noise_sigma = local_noise_sigma * np.sqrt(np.sum(window_weights**2))
    near, rise = excess_thresholds(smoothed, _start_loss(loss, step, thresholds), thresholds, smoothed_noise_sigma)
    return smoothed, find_episodes(smoothed, step, near_min=near, min_rise=rise, min_duration=thresholds.min_duration)


def excess_thresholds(
    smoothed: np.ndarray, start_loss: float, thresholds: PhaseThresholds, noise_sigma: float | np.ndarray = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The relative excesses ``near(t)``, ``rise(t)`` of :func:`detect_phases`' step 2, shape (n,):
    ``max(near_min + near_sigmas * sigma, near_of_start * L0 / m(t))`` and the same for the rise,
    ``m`` the running minimum of ``smoothed`` and ``L0 = start_loss``. With ``noise_sigma`` 0
    they are the definitions a noise-free curve is judged by (``dynamics.analysis.synthetic``)."""
    start_over_minimum = start_loss / np.minimum.accumulate(smoothed)  # the absolute floors read over m(t)
    near = np.maximum(thresholds.near_min + thresholds.near_sigmas * noise_sigma,
                      thresholds.near_of_start * start_over_minimum)
    rise = np.maximum(thresholds.min_rise + thresholds.rise_sigmas * noise_sigma,
                      thresholds.min_rise_of_start * start_over_minimum)
    return near, rise


def _smoothed(loss: np.ndarray, step: np.ndarray, thresholds: PhaseThresholds) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 of :func:`detect_phases`: the smoothed loss and the Hann window's weights."""
    step_spacing = float(np.median(np.diff(step)))
    # A curve shorter than a window (a 16-step try) is smoothed with the widest odd window it holds.
    widest = loss.size if loss.size % 2 else loss.size - 1
    despike_points = min(_odd_points(thresholds.despike_steps, step_spacing, minimum=1), widest)
    smooth_points = min(_odd_points(thresholds.smooth_steps, step_spacing, minimum=3), widest)
    # scipy.signal.medfilt pads with zeros, which drags both ends of a loss curve down;
    # ndimage's filters can repeat the edge value instead. A Savitzky-Golay filter would keep
    # peaks sharper, but its negative weights undershoot after a sharp drop, and the running
    # minimum then remembers the undershoot as a fake rise; a non-negative window cannot.
    despiked = ndimage.median_filter(loss, size=despike_points, mode="nearest")
    window_weights = hann_window(smooth_points + 2)[1:-1]  # drop the two zero ends
    window_weights /= window_weights.sum()
    return ndimage.convolve1d(despiked, window_weights, mode="nearest"), window_weights


def hann_window(size: int) -> np.ndarray:
    """The symmetric Hann window of ``size`` points, ``0.5 + 0.5 cos(x)`` for ``x`` evenly from
    -pi to pi: bit for bit ``scipy.signal.windows.hann(size)``, computed as scipy does, without
    importing ``scipy.signal`` (a second of every process's start-up, for one window)."""
    angles = np.linspace(-np.pi, np.pi, size)
    window = np.zeros(size)
    window += 0.5 * np.cos(0 * angles)
    window += 0.5 * np.cos(angles)
    return window


def _rise_from_start(smoothed: np.ndarray, step: np.ndarray, start_loss: float,
                     thresholds: PhaseThresholds) -> dict[str, Any]:
    """``early_rise`` and ``rose_from_start`` of :func:`phase_summary`."""
    before_lowest = smoothed[: int(np.argmin(smoothed)) + 1]
    risen = np.flatnonzero(before_lowest >= (1.0 + thresholds.min_rise) * start_loss)
    return {"early_rise": float(max(0.0, before_lowest.max() / start_loss - 1.0)),
            "rose_from_start": bool(risen.size and step[risen[-1]] - step[risen[0]] >= thresholds.min_duration)}


def _count_spikes(loss: np.ndarray, step: np.ndarray, thresholds: SpikeThresholds) -> int:
    """Number of short excursions above the trailing mean + k sigma (see SpikeThresholds)."""
    step_spacing = float(np.median(np.diff(step)))
    window_points = max(2, round(thresholds.spike_window / step_spacing))
    trailing = pd.Series(loss).rolling(window_points).agg(["mean", "std"]).shift(1)
    bar = (trailing["mean"] + thresholds.spike_sigmas * trailing["std"]).to_numpy()
    above = loss > bar  # False where the trailing window is not yet full (bar is NaN)
    excursion_starts = np.flatnonzero(above & ~np.r_[False, above[:-1]])
    # A plain loop: each excursion is judged against the bar of its own first step, which no
    # scipy run-length helper expresses.
    n_spikes = 0
    for start in excursion_starts:
        later = np.flatnonzero(loss[start + 1 :] <= bar[start])
        if later.size and step[start + 1 + later[0]] - step[start] <= thresholds.spike_max_steps:
            n_spikes += 1
    return n_spikes


def _start_loss(loss: np.ndarray, step: np.ndarray, thresholds: PhaseThresholds) -> float:
    """Median raw loss over the first ``despike_steps`` steps: where the curve started."""
    start_points = _odd_points(thresholds.despike_steps, float(np.median(np.diff(step))), minimum=1)
    return float(np.median(loss[:start_points]))


def _odd_points(window_steps: float, step_spacing: float, minimum: int) -> int:
    """A window given in steps as an odd number of points, at least ``minimum``."""
    points = max(minimum, round(window_steps / step_spacing))
    return points if points % 2 == 1 else points + 1


def thresholds_from_kwargs(thresholds: Mapping[str, float], kinds: tuple[type, ...]) -> tuple[Any, ...]:
    """Split ``**thresholds`` over the dataclasses ``kinds``; unknown names raise ValueError."""
    names_by_kind = [{field.name for field in dataclasses.fields(kind)} for kind in kinds]
    valid_names = sorted(set().union(*names_by_kind))
    unknown = sorted(set(thresholds) - set(valid_names))
    if unknown:
        raise ValueError(f"unknown threshold {', '.join(unknown)}: valid names are {', '.join(valid_names)}")
    return tuple(
        kind(**{name: value for name, value in thresholds.items() if name in names})
        for kind, names in zip(kinds, names_by_kind, strict=True)
    )


def _checked_curve(loss: np.ndarray | pd.Series, step: np.ndarray | pd.Series | None) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert: loss as float64 (n,), steps as int64 (n,)."""
    loss_values = np.asarray(loss, dtype=np.float64)
    if loss_values.ndim != 1:
        raise ValueError(f"loss must be 1-D, got shape {loss_values.shape}")
    if step is None:
        steps = np.arange(loss_values.size, dtype=np.int64)
    else:
        step_values = np.asarray(step)
        if step_values.shape != loss_values.shape:
            raise ValueError(f"step has shape {step_values.shape} but loss has shape {loss_values.shape}")
        steps = step_values.astype(np.int64)
        if not np.array_equal(steps, step_values):
            raise ValueError("step must hold whole numbers (optimizer steps)")
        if np.any(np.diff(steps) <= 0):
            bad = int(np.flatnonzero(np.diff(steps) <= 0)[0])
            raise ValueError(f"step must be strictly increasing: step {steps[bad + 1]} follows {steps[bad]}")
    if loss_values.size < 2:
        raise ValueError(f"loss has {loss_values.size} points, need a curve")
    non_finite = np.flatnonzero(~np.isfinite(loss_values))
    if non_finite.size:
        raise ValueError(f"loss is not finite at step {steps[non_finite[0]]} ({loss_values[non_finite[0]]})")
    non_positive = np.flatnonzero(loss_values <= 0)
    if non_positive.size:
        raise ValueError(
            f"loss must be positive (thresholds are relative): "
            f"{loss_values[non_positive[0]]} at step {steps[non_positive[0]]}"
        )
    return loss_values, steps
