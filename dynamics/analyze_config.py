"""``AnalyzeConfig``: every setting of ``dynamics analyze``, one frozen dataclass validated once.

As for ``RunConfig``, each field is a flag (``max_iter`` -> ``--max-iter``; ``thresholds`` is the
repeatable ``--threshold NAME=VALUE``), values arriving as strings are coerced here, and a bad
value is one ``ConfigError`` line naming the flag and what is allowed (the CLI exits 2), before
any run is read. What can only be checked against a run (a checkpoint it lacks, exact match on a
classification task) is checked by :meth:`AnalyzeConfig.check_run`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from dynamics.analysis.phases import PhaseThresholds, SpikeThresholds, thresholds_from_kwargs
from dynamics.config import TASK_KIND, ConfigError, RunConfig, check_value, coerce_field, config_field
from dynamics.files import did_you_mean

CURVES = ("loss", "loss_clean")  # metrics columns the phase detector may segment
SPLITS = ("eval", "train")  # whose loss the curvature is of: held-out or training examples
CHECKPOINT_WORDS = ("last", "all")
THRESHOLD_NAMES = tuple(f.name for kind in (PhaseThresholds, SpikeThresholds) for f in dataclasses.fields(kind))


@dataclass(frozen=True)
class AnalyzeConfig:
    """What ``dynamics analyze`` measures, and how. Units: steps are optimizer steps."""

    curve: str = config_field("loss", "metrics column to segment into phases", CURVES)
    checkpoints: str = config_field("last", "where to measure curvature and exact match: last, all, or "
                                            "comma-separated steps")
    sharpness: bool = config_field(True, "top Hessian eigenvalues (--no-sharpness: phases only, unless --trace, "
                                         "--density or --exact-match)")
    k: int = config_field(1, "top eigenvalues to compute")
    batches: int = config_field(1, "batches (of the run's batch_size) in the loss whose Hessian is measured")
    split: str = config_field("eval", "whose loss the curvature (--k, --trace, --density) is of: eval (the first "
                                      "held-out examples) or train (the first training examples, the loss the "
                                      "optimizer minimised)", SPLITS)
    tol: float = config_field(1e-3, "Lanczos residual tolerance, relative")
    max_iter: int = config_field(100, "at most this many Hessian-vector products for the eigenvalues")
    trace: bool = config_field(False, "also the Hutchinson trace of the Hessian (trace.parquet)")
    trace_samples: int = config_field(100, "at most this many Rademacher samples (HVPs) for --trace")
    density: bool = config_field(False, "also the Hessian eigenvalue density by stochastic Lanczos quadrature "
                                        "(density.parquet)")
    density_runs: int = config_field(10, "random start vectors for --density")
    density_steps: int = config_field(50, "Lanczos steps per start vector for --density")
    exact_match: int = config_field(0, "also greedy-decode the first N held-out problems at each checkpoint "
                                       "measured and score them (gsm, tiny): generations.parquet and the run's "
                                       "exact match")
    max_new_tokens: int | None = config_field(None, "generation budget per problem for --exact-match (default: "
                                                    "the run's max_new_tokens)")
    decode_batch: int | None = config_field(None, "prompts decoded at once for --exact-match (default: the run's "
                                                  "batch_size); on a CPU 16 is about twice as fast as 4, with the "
                                                  "same greedy answers up to float ties")
    thresholds: tuple[tuple[str, float], ...] = config_field(
        (), "a phase-detection threshold NAME=VALUE (dynamics.analysis.PhaseThresholds, SpikeThresholds); "
            "repeatable", flag="--threshold")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "thresholds":
                object.__setattr__(self, f.name, coerce_field(f, getattr(self, f.name), AnalyzeConfig))
        object.__setattr__(self, "thresholds", _coerce_thresholds(self.thresholds))
        check_value(self.curve in CURVES, "curve", self.curve, "must be one of " + ", ".join(CURVES))
        check_value(self.split in SPLITS, "split", self.split, "must be one of " + ", ".join(SPLITS))
        self.checkpoint_steps  # noqa: B018  (parses, or raises the one-line error)
        for name in ("k", "batches", "max_iter", "trace_samples", "density_runs", "density_steps"):
            check_value(getattr(self, name) >= 1, name, getattr(self, name), "must be an integer >= 1")
        check_value(self.tol > 0 and self.tol < float("inf"), "tol", self.tol, "must be a positive number")
        check_value(self.exact_match >= 0, "exact_match", self.exact_match, "must be an integer >= 0")
        for name in ("max_new_tokens", "decode_batch"):
            value = getattr(self, name)
            check_value(value is None or value >= 1, name, value, "must be an integer >= 1")

    @property
    def threshold_values(self) -> dict[str, float]:
        """``thresholds`` as keyword arguments of ``detect_phases`` / ``phase_summary``."""
        return dict(self.thresholds)

    @property
    def checkpoint_steps(self) -> list[int] | None:
        """``checkpoints`` as steps (ascending), or None for ``last`` / ``all``."""
        if self.checkpoints in CHECKPOINT_WORDS:
            return None
        try:
            steps = sorted({int(part) for part in self.checkpoints.split(",")})
        except ValueError:
            steps = []
        if not steps or steps[0] < 0:
            raise ConfigError(f"--checkpoints {self.checkpoints}: must be last, all, or comma-separated steps >= 0")
        return steps

    @property
    def measures_checkpoints(self) -> bool:
        """Whether a run's model is rebuilt at checkpoints (anything beyond the phases)."""
        return self.sharpness or self.trace or self.density or self.exact_match > 0

    def check_run(self, run_config: RunConfig) -> None:
        """What this analysis needs of a run's own settings: a one-line ConfigError otherwise
        (``--exact-match`` on a classification task, or more problems than it holds out)."""
        if not self.exact_match:
            return
        generation_tasks = [task for task, kind in TASK_KIND.items() if kind == "causal_lm"]
        scored = run_config.task in generation_tasks or (run_config.task == "data" and run_config.answer_column
                                                         and run_config.task_kind == "causal_lm")
        if not scored:
            raise ConfigError(f"--exact-match: task {run_config.task} is not a generation task; exact match needs "
                              f"one of {', '.join(generation_tasks)}, or --data rows with an --answer-column")
        if self.exact_match > run_config.n_eval:
            raise ConfigError(f"--exact-match {self.exact_match}: the run holds out {run_config.n_eval} problems "
                              "(n_eval); ask for at most that many")

    @classmethod
    def from_options(cls, config: AnalyzeConfig | Mapping[str, Any] | None = None, **options: Any) -> AnalyzeConfig:
        """``config`` (default: the defaults) with ``options`` over it: field names, or threshold
        names (``min_rise=5.0``), which join ``thresholds``. Unknown names: a one-line ConfigError."""
        base = config if isinstance(config, AnalyzeConfig) else cls(**dict(config or {}))
        fields = {f.name for f in dataclasses.fields(cls)}
        thresholds = dict(base.thresholds)
        changes = {}
        for name, value in options.items():
            if name in fields:
                changes[name] = value
            elif name in THRESHOLD_NAMES:
                thresholds[name] = value
            else:
                raise ConfigError(f"unknown analyze option '{name}'{did_you_mean(name, sorted(fields))}")
        if "thresholds" in changes:
            thresholds.update(dict(_coerce_thresholds(changes.pop("thresholds"))))
        return dataclasses.replace(base, **changes, thresholds=tuple(thresholds.items()))


def _coerce_thresholds(value: Any) -> tuple[tuple[str, float], ...]:
    """``--threshold NAME=VALUE`` texts, a mapping or (name, value) pairs -> sorted (name, float)
    pairs, each name and value checked by the thresholds' own dataclasses."""
    items = value.items() if isinstance(value, Mapping) else value
    pairs = {}
    for item in items:
        name, raw = item.partition("=")[::2] if isinstance(item, str) else item
        if name not in THRESHOLD_NAMES:
            raise ConfigError(f"--threshold {name}={raw}: unknown threshold {name}{did_you_mean(name, THRESHOLD_NAMES)}"
                              f"; one of {', '.join(THRESHOLD_NAMES)}")
        try:
            pairs[name] = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"--threshold {name}={raw}: must be a number") from None
    try:
        thresholds_from_kwargs(pairs, (PhaseThresholds, SpikeThresholds))
    except ValueError as error:
        raise ConfigError(f"--threshold: {error}") from None
    return tuple(sorted(pairs.items()))
