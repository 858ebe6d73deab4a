"""Seeded synthetic LoRA-like loss curves with known phase boundaries, and the score of
:func:`~dynamics.analysis.phases.detect_phases` on them.

``python -m dynamics.analysis.synthetic`` prints detection precision/recall and boundary errors
over the seeded validation set (the numbers quoted in the README).

A curve is ``clean(t) * noise(t)`` where

* ``clean(t) = base(t) * (1 + A * g(t))``; ``base`` decays exponentially in the *cumulative*
  learning rate of a linear-warm-up + cosine schedule (so it is flat during warm-up and at the
  end), with a small optional rise during warm-up; ``g`` is a planted bump profile in [0, 1]
  (raised-cosine rise, raised-cosine fall, or a rise that never comes down) and ``A`` its
  relative amplitude;
* noise is multiplicative log-normal ``exp(noise * z - noise^2 / 2)`` plus additive Gaussian
  ``additive_noise * z'`` (nats), then optional isolated spikes (1-2 steps, x1.3-2.5).

The true phases are the definitions of :class:`~dynamics.analysis.phases.PhaseThresholds`
(default values) applied to the noise-free ``clean`` curve, so boundary errors measure what the
noise and smoothing cost, not a difference of definitions.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dynamics.analysis.phases import (
    PhaseThresholds,
    detect_phases,
    excess_thresholds,
    find_episodes,
    phase_summary,
    phases_frame,
)

CURVE_KINDS = ("decay", "plateau", "bump", "episodes", "no_recovery")
# (multiplicative relative std, additive std in nats): from a large-batch curve to a noisy
# small-batch one.
NOISE_LEVELS = ((0.01, 0.0), (0.03, 0.0), (0.06, 0.01), (0.10, 0.03))
SPIKE_COUNTS = (0, 4)


@dataclass(frozen=True)
class PlantedBump:
    """A bump put into the clean curve, in optimizer steps."""

    onset_step: int  # g starts rising
    top_step: int  # g reaches 1
    end_step: int | None  # g is back to 0; None for a rise that never comes down


@dataclass(frozen=True)
class CurveTruth:
    """What was planted in a synthetic curve and the phases it should produce."""

    kind: str
    clean: np.ndarray  # (n,) noise-free loss, nats
    phases: pd.DataFrame  # detect_phases' table for `clean`, by the definitions
    planted: tuple[PlantedBump, ...]
    spike_steps: tuple[int, ...]  # first step of each planted spike

    @property
    def has_double_descent(self) -> bool:
        """At least one divergence in the clean curve restabilises."""
        return bool((self.phases.phase == "restabilise").any())


def make_curve(
    kind: str,
    n_steps: int = 400,
    noise: float = 0.03,
    seed: int = 0,
    *,
    additive_noise: float = 0.0,
    n_spikes: int = 0,
    warmup_ratio: float = 0.03,
) -> tuple[np.ndarray, CurveTruth]:
    """One seeded synthetic loss curve and its truth.

    Parameters
    ----------
    kind : {"decay", "plateau", "bump", "episodes", "no_recovery"}
        ``decay``: plain exponential-ish decay. ``plateau``: fast decay, then a long flat
        stretch. ``bump``: one divergence that recovers. ``episodes``: 2 or 3 of them.
        ``no_recovery``: a sustained rise that never comes back down.
    n_steps : int
        Curve length (optimizer steps 0 .. n_steps-1).
    noise : float
        Relative standard deviation of the multiplicative noise (0.03 = 3 %).
    seed : int
        Seed of the ``numpy.random.Generator`` drawing every random choice.
    additive_noise : float
        Standard deviation of the additive noise, nats.
    n_spikes : int
        Isolated spikes of 1-2 steps, multiplying the noisy loss by 1.3-2.5.
    warmup_ratio : float
        Fraction of the steps spent in linear learning-rate warm-up.

    Returns
    -------
    loss : ndarray, shape (n_steps,)
        Noisy positive loss, float64.
    truth : CurveTruth
    """
    if kind not in CURVE_KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {', '.join(CURVE_KINDS)}")
    if n_steps < 100:
        raise ValueError(f"n_steps={n_steps}: must be at least 100 to hold a bump")
    rng = np.random.default_rng(seed)
    steps = np.arange(n_steps)
    base = _base_curve(rng, n_steps, warmup_ratio, fast=kind == "plateau")
    bump_profile, planted = _bump_profile(rng, kind, n_steps)
    amplitude = rng.uniform(0.12, 0.5)
    clean = base * (1.0 + amplitude * bump_profile)

    loss = clean * np.exp(noise * rng.standard_normal(n_steps) - noise**2 / 2)
    loss = loss + additive_noise * rng.standard_normal(n_steps)
    loss = np.maximum(loss, 0.05 * clean)  # keeps the loss positive at extreme additive noise
    spike_starts = _spike_starts(rng, n_spikes, n_steps, warmup_steps=round(warmup_ratio * n_steps))
    for start in spike_starts:
        length = int(rng.integers(1, 3))
        loss[start : start + length] *= rng.uniform(1.3, 2.5)

    definitions = PhaseThresholds()
    near, rise = excess_thresholds(clean, float(clean[0]), definitions)  # noise-free: the start is clean[0]
    true_episodes = find_episodes(clean, steps, near_min=near, min_rise=rise, min_duration=definitions.min_duration)
    truth = CurveTruth(
        kind=kind,
        clean=clean,
        phases=phases_frame(true_episodes, clean, steps),
        planted=planted,
        spike_steps=tuple(int(start) for start in spike_starts),
    )
    return loss, truth


def _base_curve(rng: np.random.Generator, n_steps: int, warmup_ratio: float, fast: bool) -> np.ndarray:
    """Decay in the cumulative learning rate of warm-up + cosine, shape (n_steps,)."""
    steps = np.arange(n_steps)
    warmup_steps = max(2, round(warmup_ratio * n_steps))
    learning_rate = np.where(
        steps < warmup_steps,
        (steps + 1) / warmup_steps,
        0.5 * (1 + np.cos(np.pi * (steps - warmup_steps) / (n_steps - warmup_steps))),
    )
    progress = np.cumsum(learning_rate) / np.sum(learning_rate)  # 0 .. 1
    initial_loss = rng.uniform(1.8, 3.0)
    final_loss = initial_loss * rng.uniform(0.15, 0.4)
    decay_scale = rng.uniform(0.02, 0.05) if fast else rng.uniform(0.08, 0.2)  # in progress
    base = final_loss + (initial_loss - final_loss) * np.exp(-progress / decay_scale)
    warmup_rise = rng.uniform(0.0, 0.015) * np.sin(np.pi * np.minimum(steps / warmup_steps, 1.0))
    return base * (1.0 + warmup_rise)


def _bump_profile(rng: np.random.Generator, kind: str, n_steps: int) -> tuple[np.ndarray, tuple[PlantedBump, ...]]:
    """The bump multiplier g (n_steps,) in [0, 1] and where each bump was planted."""
    steps = np.arange(n_steps)
    if kind in ("decay", "plateau"):
        return np.zeros(n_steps), ()
    if kind == "no_recovery":
        onset = round(rng.uniform(0.35, 0.6) * n_steps)
        rise = round(rng.uniform(0.04, 0.1) * n_steps)
        profile = _raised_cosine(steps, onset, rise)
        return profile, (PlantedBump(onset, onset + rise, None),)
    if kind == "bump":
        slots = [(0.25 * n_steps, 0.95 * n_steps)]
    else:
        n_episodes = int(rng.integers(2, 4))
        edges = np.linspace(0.2 * n_steps, 0.97 * n_steps, n_episodes + 1)
        slots = list(zip(edges[:-1], edges[1:], strict=True))
    profile = np.zeros(n_steps)
    planted = []
    for slot_start, slot_end in slots:
        slot = slot_end - slot_start
        onset = round(slot_start + rng.uniform(0.0, 0.25) * slot)
        rise = round(rng.uniform(0.12, 0.25) * slot)
        fall = round(rng.uniform(0.25, 0.45) * slot)
        top = onset + rise
        profile += _raised_cosine(steps, onset, rise) - _raised_cosine(steps, top, fall)
        planted.append(PlantedBump(onset, top, top + fall))
    return profile, tuple(planted)


def _raised_cosine(steps: np.ndarray, start: int, duration: int) -> np.ndarray:
    """0 before ``start``, rising as a half cosine to 1 at ``start + duration``, then 1."""
    fraction = np.clip((steps - start) / duration, 0.0, 1.0)
    return 0.5 * (1.0 - np.cos(np.pi * fraction))


def _spike_starts(rng: np.random.Generator, n_spikes: int, n_steps: int, warmup_steps: int) -> np.ndarray:
    """Spike positions after warm-up: a 10-step grid plus 0-7 steps of jitter, sorted."""
    candidates = np.arange(warmup_steps + 10, n_steps - 2, 10)
    chosen = rng.choice(candidates, size=n_spikes, replace=False)
    return np.sort(chosen + rng.integers(0, 8, size=n_spikes))


def validation_set(
    per_cell: int = 6, n_steps: int = 500, seed: int = 0
) -> list[tuple[np.ndarray, CurveTruth, dict[str, float]]]:
    """Curves over every kind x noise level x spike count, ``per_cell`` of each.

    Returns
    -------
    list of (loss, truth, settings)
        ``settings`` holds ``noise``, ``additive_noise`` and ``n_spikes`` of the curve.
    """
    curves = []
    cells = [
        (kind, noise_level, n_spikes)
        for kind in CURVE_KINDS
        for noise_level in NOISE_LEVELS
        for n_spikes in SPIKE_COUNTS
    ]
    for cell_index, (kind, (noise, additive_noise), n_spikes) in enumerate(cells):
        for repeat in range(per_cell):
            curve_seed = int(np.random.SeedSequence([seed, cell_index, repeat]).generate_state(1)[0])
            loss, truth = make_curve(
                kind,
                n_steps,
                noise,
                curve_seed,
                additive_noise=additive_noise,
                n_spikes=n_spikes,
            )
            settings = {"noise": noise, "additive_noise": additive_noise, "n_spikes": n_spikes}
            curves.append((loss, truth, settings))
    return curves


@dataclass(frozen=True)
class DetectionScores:
    """How well :func:`detect_phases` recovers the truth of a set of synthetic curves."""

    precision: float  # of "has a double descent" (a divergence that restabilises)
    recall: float
    divergence_precision: float  # of "has a divergence" (restabilising or not)
    divergence_recall: float
    boundary_errors: pd.DataFrame  # boundary, noise ('all' or level), n, mean, median, p90, max
    per_cell: pd.DataFrame  # one row per curve: kind, settings, truth and detected counts


def evaluate_detection(
    curves: Sequence[tuple[np.ndarray, CurveTruth, dict[str, float]]], **thresholds: float
) -> DetectionScores:
    """Run :func:`detect_phases` on every curve and score it against the truth.

    Episodes are paired by largest overlap in time; boundary errors are ``|detected - true|``
    in steps for the divergence start, the peak (only of true episodes that recover: a rise
    that never comes down has no defined peak) and the recovery (when both have one).
    """
    rows = []
    error_rows = []
    for loss, truth, settings in curves:
        detected = detect_phases(loss, **thresholds)
        true_episodes = _episodes_in_steps(truth.phases)
        found_episodes = _episodes_in_steps(detected)
        pairs = _pair_by_overlap(true_episodes, found_episodes, last_step=len(loss) - 1)
        for (true_start, true_peak, true_recovery), (start, peak, recovery) in pairs:
            errors = {"start": abs(start - true_start)}
            if true_recovery is not None:  # a rise that never comes down has no defined peak
                errors["peak"] = abs(peak - true_peak)
            if true_recovery is not None and recovery is not None:
                errors["recovery"] = abs(recovery - true_recovery)
            error_rows += [
                {"noise": settings["noise"], "boundary": boundary, "error": error} for boundary, error in errors.items()
            ]
        rows.append(
            {
                "kind": truth.kind,
                **settings,
                "true_double_descent": truth.has_double_descent,
                "found_double_descent": bool((detected.phase == "restabilise").any()),
                "true_episodes": len(true_episodes),
                "found_episodes": len(found_episodes),
                "found_spikes": phase_summary(loss, **thresholds)["n_spikes"],
            }
        )
    per_cell = pd.DataFrame(rows)
    precision, recall = _precision_recall(per_cell.true_double_descent, per_cell.found_double_descent)
    divergence_precision, divergence_recall = _precision_recall(per_cell.true_episodes > 0, per_cell.found_episodes > 0)
    errors_by_noise = pd.DataFrame(error_rows, columns=["noise", "boundary", "error"])
    all_noise_levels = errors_by_noise.assign(noise="all")
    boundary_errors = (
        pd.concat([all_noise_levels, errors_by_noise.astype({"noise": "str"})])
        .groupby(["boundary", "noise"], sort=False)
        .error.agg(
            n="size",
            mean="mean",
            median="median",
            p90=lambda error: error.quantile(0.9),
            max="max",
        )
        .reset_index()
    )
    return DetectionScores(
        precision=precision,
        recall=recall,
        divergence_precision=divergence_precision,
        divergence_recall=divergence_recall,
        boundary_errors=boundary_errors,
        per_cell=per_cell,
    )


def _episodes_in_steps(phases: pd.DataFrame) -> list[tuple[int, int, int | None]]:
    """(start, peak, recovery or None) per divergence of a phases table, in steps."""
    episodes = []
    records = phases.to_dict("records")
    for position, row in enumerate(records):
        if row["phase"] != "diverge":
            continue
        following = records[position + 1] if position + 1 < len(records) else None
        recovery = following["end_step"] if following is not None and following["phase"] == "restabilise" else None
        episodes.append((row["start_step"], row["end_step"], recovery))
    return episodes


def _pair_by_overlap(
    true_episodes: list[tuple[int, int, int | None]],
    found_episodes: list[tuple[int, int, int | None]],
    last_step: int,
) -> list[tuple[tuple[int, int, int | None], tuple[int, int, int | None]]]:
    """Pair each true episode with the unused found episode overlapping it most in time.

    An episode spans its start to its recovery (or ``last_step``); episodes that do not overlap
    any found one stay unpaired, and count in the precision/recall, not in boundary errors.
    """

    def overlap(first: tuple[int, int, int | None], second: tuple[int, int, int | None]) -> int:
        first_end = last_step if first[2] is None else first[2]
        second_end = last_step if second[2] is None else second[2]
        return min(first_end, second_end) - max(first[0], second[0])

    pairs = []
    unused = list(found_episodes)
    for true_episode in true_episodes:
        best = max(unused, key=lambda found: overlap(true_episode, found), default=None)
        if best is not None and overlap(true_episode, best) > 0:
            unused.remove(best)
            pairs.append((true_episode, best))
    return pairs


def _precision_recall(truth: pd.Series, found: pd.Series) -> tuple[float, float]:
    true_positives = int((truth & found).sum())
    precision = true_positives / found.sum() if found.sum() else float("nan")
    recall = true_positives / truth.sum() if truth.sum() else float("nan")
    return float(precision), float(recall)


def format_report(scores: DetectionScores) -> str:
    """A plain-text table of the scores, for the terminal and the README."""
    per_kind = (
        scores.per_cell.groupby(["kind", "noise", "additive_noise"], sort=False)
        .agg(
            curves=("kind", "size"),
            true_dd=("true_double_descent", "mean"),
            found_dd=("found_double_descent", "mean"),
            true_episodes=("true_episodes", "mean"),
            found_episodes=("found_episodes", "mean"),
        )
        .reset_index()
    )
    spike_curves = scores.per_cell[scores.per_cell.n_spikes > 0]
    spike_free_curves = scores.per_cell[scores.per_cell.n_spikes == 0]
    lines = [
        f"curves: {len(scores.per_cell)}",
        f"double descent   precision {scores.precision:.3f}  recall {scores.recall:.3f}",
        f"any divergence   precision {scores.divergence_precision:.3f}  recall {scores.divergence_recall:.3f}",
        "",
        "boundary error (steps, |detected - true|), by multiplicative noise level:",
        scores.boundary_errors.to_string(index=False, float_format=lambda value: f"{value:.1f}"),
        "",
        f"spikes: {int(spike_curves.n_spikes.sum())} planted, "
        f"{int(spike_curves.found_spikes.sum())} counted; "
        f"{int(spike_free_curves.found_spikes.sum())} counted on "
        f"{len(spike_free_curves)} curves without spikes",
        "",
        "share of curves with a double descent, and mean episodes, per kind and noise:",
        per_kind.to_string(index=False, float_format=lambda value: f"{value:.2f}"),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Score detect_phases on the seeded synthetic validation set.")
    parser.add_argument("--per-cell", type=int, default=6, help="curves per kind x noise x spikes")
    parser.add_argument("--n-steps", type=int, default=500, help="steps per curve")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole set")
    args = parser.parse_args(argv)
    curves = validation_set(per_cell=args.per_cell, n_steps=args.n_steps, seed=args.seed)
    print(
        f"python -m dynamics.analysis.synthetic --per-cell {args.per_cell} --n-steps {args.n_steps} --seed {args.seed}"
    )
    print(format_report(evaluate_detection(curves)))


if __name__ == "__main__":
    main()
