"""Reading run folders back (the layout is in ``runs.folder``): ``Run`` for one folder, and
``load_runs`` / ``load_metrics`` for a table across many. No torch: notebooks, figures and the
``runs`` command read runs without it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from dynamics.analysis import detect_phases, phase_summary, run_outcome, smooth_loss
from dynamics.config import ConfigError
from dynamics.files import UnreadableFile, check_parquet, read_json, read_parquet
from dynamics.runs import logs
from dynamics.runs.checkpoints import checkpoint_dir, checkpoint_steps
from dynamics.runs.folder import DAMAGED, read_summary, writer_alive

# The settings every table, figure and command reads from a run's config.json.
REQUIRED_SETTINGS = ("model", "task", "method", "steps", "lr", "seed")
# The run folder's tables and their schemas (a table that exists must hold every column).
TABLES = {"metrics.parquet": logs.METRICS_SCHEMA, "layers.parquet": logs.LAYERS_SCHEMA,
          "eval.parquet": logs.EVAL_SCHEMA, "sharpness.parquet": logs.SHARPNESS_SCHEMA,
          "phases.parquet": logs.PHASES_SCHEMA, "trace.parquet": logs.TRACE_SCHEMA,
          "density.parquet": logs.DENSITY_SCHEMA, "generations.parquet": logs.GENERATIONS_SCHEMA}


class DamagedRun(ValueError):
    """A run folder whose files do not read as a run (cut off by a full disk, a lost node, a hand
    edit). ``str()`` is the one line commands print: ``RUN_ID: damaged: what is wrong``."""

    def __init__(self, run_dir: str | os.PathLike, what: str) -> None:
        self.run_dir, self.what = Path(run_dir), what
        super().__init__(f"{self.run_dir.name}: damaged: {what}")


def check_run(run_dir: str | os.PathLike) -> None:
    """Raise ``DamagedRun`` unless ``config.json`` holds a config object with the settings every
    reader needs, ``summary.json`` is a JSON object, and every table present is a parquet file with
    its schema's columns (its footer is read, not its rows: cheap for any run length)."""
    run_dir = Path(run_dir)
    try:
        config = read_json(run_dir / "config.json", "config.json").get("config")
        if not isinstance(config, dict):
            raise UnreadableFile('config.json: has no "config" object')
        missing = [name for name in REQUIRED_SETTINGS if name not in config]
        if missing:
            raise UnreadableFile(f"config.json: lacks the setting(s) {', '.join(missing)}")
        read_json(run_dir / "summary.json", "summary.json")
        for name, schema in TABLES.items():
            if (run_dir / name).exists():
                check_parquet(run_dir / name, name, _required_columns(name, schema))
    except UnreadableFile as error:
        raise DamagedRun(run_dir, str(error)) from None


@dataclasses.dataclass(frozen=True)
class Run:
    """A run folder, read lazily: ``.config`` and ``.summary`` are dicts, ``.metrics``,
    ``.evals`` and ``.layers`` pandas DataFrames (empty when the file does not exist yet)."""

    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    @cached_property
    def config(self) -> dict[str, Any]:
        return read_json(self.path / "config.json")["config"]

    @cached_property
    def info(self) -> dict[str, Any]:
        """Everything in config.json besides the settings: runtime, versions, commit, host."""
        return {k: v for k, v in read_json(self.path / "config.json").items() if k != "config"}

    @property
    def summary(self) -> dict[str, Any]:
        return read_summary(self.path)

    @property
    def metrics(self) -> pd.DataFrame:
        return _read_parquet(self.path / "metrics.parquet", logs.METRICS_SCHEMA)

    @property
    def evals(self) -> pd.DataFrame:
        return _read_parquet(self.path / "eval.parquet", logs.EVAL_SCHEMA)

    @property
    def layers(self) -> pd.DataFrame:
        return _read_parquet(self.path / "layers.parquet", logs.LAYERS_SCHEMA)

    @property
    def checkpoints(self) -> list[Path]:
        return [checkpoint_dir(self.path, s) for s in checkpoint_steps(self.path)]

    # --- analysis results (written by ``dynamics analyze``; phases also detected on the fly) ---
    @property
    def phases(self) -> pd.DataFrame:
        """Double-descent phases (``logs.PHASES_SCHEMA``): ``phases.parquet`` when ``dynamics analyze``
        wrote it, else detected now from the ``loss`` column with the default thresholds (empty
        for a curve too short to segment)."""
        if (self.path / "phases.parquet").exists() and self._phases_current():
            return _read_parquet(self.path / "phases.parquet", logs.PHASES_SCHEMA)
        series = self._curve("loss")
        try:
            detected = detect_phases(series["loss"].to_numpy(), series["step"].to_numpy())
        except ValueError:  # fewer than two points, or a non-finite loss (a diverged run)
            return logs.PHASES_SCHEMA.empty_table().to_pandas()
        return detected.assign(curve="loss")

    @property
    def phase_summary(self) -> dict[str, Any]:
        """``has_double_descent``, ``divergence_amplitude``, ``steps_lost``, ``n_spikes``,
        ``n_episodes``, ``start_loss``, ``loss_drop``, ``descended``, ``final_drop``,
        ``rise_of_start``, ``early_rise``, ``rose_from_start`` and ``curve`` (see
        :func:`dynamics.analysis.phase_summary`): the entry ``dynamics analyze`` stored in
        summary.json (with the ``step`` it was measured at) while it covers the run, else computed
        now from ``loss``; ``{}`` when the curve cannot be segmented."""
        stored = self.summary.get("phases")
        if stored and self._phases_current():
            return dict(stored)
        series = self._curve("loss")
        try:
            return {"curve": "loss", **phase_summary(series["loss"].to_numpy(), series["step"].to_numpy())}
        except ValueError:
            return {}

    def smoothed_loss(self, curve: str = "loss", **thresholds: float) -> pd.DataFrame:
        """Columns ``step``, ``loss`` (raw ``curve``) and ``smoothed``: the curve the phase detector
        segments (:func:`dynamics.analysis.smooth_loss`); empty when it has fewer than two points
        or a non-finite value."""
        series = self._curve(curve).rename(columns={curve: "loss"})
        try:
            smoothed = smooth_loss(series["loss"].to_numpy(), series["step"].to_numpy(), **thresholds)
        except ValueError:
            return pd.DataFrame({"step": pd.Series(dtype="int64"), "loss": pd.Series(dtype="float64"),
                                 "smoothed": pd.Series(dtype="float64")})
        return series.assign(smoothed=smoothed)

    @property
    def sharpness(self) -> pd.DataFrame:
        """Top Hessian eigenvalues (``logs.SHARPNESS_SCHEMA``), one row per (step, split, source, rank)."""
        return _read_parquet(self.path / "sharpness.parquet", logs.SHARPNESS_SCHEMA)

    @property
    def trace(self) -> pd.DataFrame:
        """Hutchinson estimates of tr(H) (``logs.TRACE_SCHEMA``) from ``dynamics analyze --trace``."""
        return _read_parquet(self.path / "trace.parquet", logs.TRACE_SCHEMA)

    @property
    def density(self) -> pd.DataFrame:
        """Spectral density nodes and weights (``logs.DENSITY_SCHEMA``) from ``dynamics analyze --density``;
        smooth them with :func:`dynamics.analysis.gaussian_density`."""
        return _read_parquet(self.path / "density.parquet", logs.DENSITY_SCHEMA)

    @property
    def generations(self) -> pd.DataFrame:
        """Greedy continuations of held-out problems (``logs.GENERATIONS_SCHEMA``) from
        ``dynamics analyze --exact-match N``, one row per (step, problem)."""
        return _read_parquet(self.path / "generations.parquet", logs.GENERATIONS_SCHEMA)

    def _phases_current(self) -> bool:
        """Whether ``dynamics analyze``'s phases cover the run as it is now: measured up to the
        step it has reached (a run analysed part-way and trained on since has stale ones, which
        are then detected afresh). Entries written before the step was recorded count as current."""
        summary = self.summary
        measured_at = (summary.get("phases") or {}).get("step")
        return measured_at is None or measured_at >= (summary.get("steps_done") or 0)

    def _curve(self, column: str) -> pd.DataFrame:
        metrics = self.metrics
        if column not in metrics:
            raise ConfigError(f"--curve {column}: not a metrics column; use loss or loss_clean")
        return metrics[["step", column]].dropna().reset_index(drop=True)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.summary.get('status')!r})"


def run_status(run_dir: str | os.PathLike) -> str | None:
    """None when there is no run at ``run_dir`` yet, ``DAMAGED`` when its files do not read, else
    the status in its summary (``running`` for a run killed before it wrote one)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        return None
    try:
        check_run(run_dir)
    except DamagedRun:
        return DAMAGED
    return read_summary(run_dir).get("status", "running")


def _required_columns(name: str, schema) -> list[str]:
    """The columns a table file must hold: its schema's, less those added later (``logs.ADDED_COLUMNS``)."""
    return [column for column in schema.names if column not in logs.ADDED_COLUMNS.get(name, {})]


def _read_parquet(path: Path, schema) -> pd.DataFrame:
    """The table at ``path`` with every column of ``schema`` (empty when there is no file); a column
    added after the file was written takes the value older files imply (``logs.ADDED_COLUMNS``)."""
    if not path.exists():
        return schema.empty_table().to_pandas()
    frame = read_parquet(path, f"{path.parent.name}/{path.name}", _required_columns(path.name, schema))
    for column, value in logs.ADDED_COLUMNS.get(path.name, {}).items():
        if column not in frame:
            frame[column] = value
    return frame


def load_run(path: str | os.PathLike) -> Run:
    """The run folder at ``path``; raises ``DamagedRun`` when its files do not read (``check_run``)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a run folder (no config.json)")
    check_run(path)
    return Run(path)


RUN_TABLE_COLUMNS = ["run_id", "method", "adapter", "perturbation", "model", "task", "rank", "alpha", "lr", "seed",
                     "steps", "status", "outcome", "alive", "steps_done", "final_loss", "eval_loss", "eval_metric",
                     "eval_macro_f1", "double_descent", "divergence_amplitude", "steps_lost", "n_episodes",
                     "descended", "loss_drop", "final_drop", "rise_of_start", "early_rise", "rose_from_start",
                     "top_eigenvalue", "hessian_trace", "top_eigenvalue_train", "hessian_trace_train", "wall_time_s",
                     "adapter_init_s", "trainable_params", "damage", "path"]


RUN_MARKERS = ("summary.json", "metrics.parquet", "checkpoints")  # only a run of ours writes these


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is a run folder, by what it holds: a file only a run writes
    (``RUN_MARKERS``), or a ``config.json`` whose top level holds our ``"config"`` object. A folder
    with only another tool's ``config.json`` is not a run (and is left alone); a run that lost its
    ``config.json`` still is (a damaged one)."""
    if any((folder / name).exists() for name in RUN_MARKERS):
        return True
    try:
        stored = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):  # unreadable, not JSON, not UTF-8: nothing says it is ours
        return False
    return isinstance(stored, dict) and isinstance(stored.get("config"), dict)


def run_folders(root: Path) -> list[Path]:
    """The run folders under ``root`` (recursively, ``root`` itself included), sorted; hidden folders
    (staging) and folders inside a run's ``checkpoints/`` are not searched."""
    if not root.exists():
        return []
    found = {path.parent for name in ("config.json", *RUN_MARKERS[:2]) for path in root.rglob(name)}
    found |= {path.parent for path in root.rglob("checkpoints") if path.is_dir()}
    return sorted(folder for folder in found
                  if not any(part.startswith(".") for part in folder.relative_to(root).parts)
                  and "checkpoints" not in folder.relative_to(root).parts and is_run_folder(folder))


def load_runs(root: str | os.PathLike = "runs") -> pd.DataFrame:
    """One row per run folder under ``root`` (searched recursively): settings, status and the
    summary's final numbers. Columns: ``RUN_TABLE_COLUMNS`` then every other config field.

    The phase columns (``double_descent``, ``divergence_amplitude``, ``steps_lost``,
    ``n_episodes``, ``descended``, ``loss_drop``, ``final_drop``, ``rise_of_start``, ``early_rise``,
    ``rose_from_start``)
    come from ``dynamics analyze`` where it ran, else from the loss curve now
    (:attr:`Run.phase_summary`); None where there is no curve to segment yet. ``outcome`` is what
    a finished run did (``dynamics.analysis.run_outcome``: smooth, double descent, rise from start,
    collapse, no descent, diverged); None while it runs, or failed or was interrupted.

    A damaged run folder (``check_run``) is not left out: its row has status ``damaged``, the
    one-line reason in ``damage``, and nothing else but ``run_id`` and ``path``."""
    root = Path(root)
    rows = []
    for run_dir in run_folders(root):
        try:
            check_run(run_dir)
            rows.append(_run_row(run_dir))
        except (DamagedRun, UnreadableFile) as error:  # UnreadableFile: rows garbled behind an intact footer
            what = error.what if isinstance(error, DamagedRun) else str(error)
            rows.append({"run_id": run_dir.name, "status": DAMAGED, "damage": what, "path": str(run_dir)})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=RUN_TABLE_COLUMNS)
    ordered = [c for c in RUN_TABLE_COLUMNS if c in frame] + [c for c in frame if c not in RUN_TABLE_COLUMNS]
    return frame[ordered]


def _run_row(run_dir: Path) -> dict[str, Any]:
    stored = read_json(run_dir / "config.json")
    config = stored["config"]
    runtime = stored.get("runtime") or {}
    summary = read_summary(run_dir)
    phases = Run(run_dir).phase_summary if (run_dir / "metrics.parquet").exists() else {}
    final_eval = summary.get("final_eval") or {}
    settings = {k: v for k, v in config.items() if k not in ("run_id", "resume", "overwrite", "progress")}
    adapter, _, perturbation = str(config.get("method", "")).partition("+")
    row = {
        **settings,
        "adapter": adapter,
        "perturbation": perturbation or None,
        "run_id": run_dir.name,
        "status": summary.get("status"),
        # a "running" run's writer: alive (holds the lock), gone (killed before it could say so), None: can't tell
        "alive": writer_alive(run_dir) if summary.get("status") == "running" else None,
        "steps_done": summary.get("steps_done"),
        "final_loss": summary.get("final_loss"),
        "eval_loss": final_eval.get("loss"),
        "eval_metric": _final_metric(summary),
        "eval_macro_f1": final_eval.get("macro_f1"),
        "wall_time_s": summary.get("wall_time_s"),
        "adapter_init_s": runtime.get("adapter_init_s"),  # one-off set-up (LoRA-GA's estimate); None: none
        "trainable_params": runtime.get("trainable_params"),
        "double_descent": phases.get("has_double_descent"),
        "divergence_amplitude": phases.get("divergence_amplitude"),
        "steps_lost": phases.get("steps_lost"),
        "n_episodes": phases.get("n_episodes"),
        "descended": phases.get("descended"),  # None in summaries an older `dynamics analyze` stored
        "loss_drop": phases.get("loss_drop"),
        "final_drop": phases.get("final_drop"),
        "rise_of_start": phases.get("rise_of_start"),
        "early_rise": phases.get("early_rise"),  # None in summaries stored before it existed
        "rose_from_start": phases.get("rose_from_start"),
        "top_eigenvalue": ((summary.get("sharpness") or {}).get("eigenvalues") or [None])[0],
        "hessian_trace": (summary.get("trace") or {}).get("trace"),  # dynamics analyze --trace (Hutchinson)
        # the same of the training loss (dynamics analyze --split train)
        "top_eigenvalue_train": ((summary.get("sharpness_train") or {}).get("eigenvalues") or [None])[0],
        "hessian_trace_train": (summary.get("trace_train") or {}).get("trace"),
        "damage": None,
        "path": str(run_dir),
    }
    # a run still training has no outcome yet
    return {**row, "outcome": run_outcome(row) if row["status"] in ("completed", "diverged") else None}


def _final_metric(summary: dict[str, Any]) -> float | None:
    """The task metric at the run's last step: accuracy (classification) or exact match, measured
    in training (``--n-eval-generate``) or afterwards by ``dynamics analyze --exact-match`` at the
    final checkpoint; None where neither measured it."""
    final_eval = summary.get("final_eval") or {}
    if "exact_match" in final_eval or "accuracy" in final_eval:
        return final_eval.get("exact_match", final_eval.get("accuracy"))
    generated = summary.get("exact_match") or {}
    return generated.get("exact_match") if generated.get("step") == summary.get("steps_done") else None


DEFAULT_SETTINGS = ("method", "rank", "alpha", "lr", "seed")


def load_metrics(root: str | os.PathLike | pd.DataFrame = "runs", with_settings: Sequence[str] = DEFAULT_SETTINGS,
                 table: str = "metrics") -> pd.DataFrame:
    """One long frame of every run's per-step rows, for plotting across runs with pandas.

    Parameters
    ----------
    root
        A folder of runs (searched like :func:`load_runs`), a run folder, or a ``load_runs`` frame
        (any subset of its rows).
    with_settings
        Config fields added as columns (e.g. ``("method", "rank", "lr")``); unknown names raise
        ConfigError naming the allowed ones.
    table
        ``metrics`` (``logs.METRICS_SCHEMA``, one row per step), ``layers``, ``evals``, ``phases``,
        ``smoothed_loss`` (step, loss, smoothed), ``sharpness``, ``trace`` or ``density``: the
        :class:`Run` attribute of that name, stacked.

    Returns
    -------
    DataFrame
        ``run_id``, the settings, then the table's columns; runs without rows add none. A table
        column named like a setting is renamed: the scheduled per-step ``lr`` of ``metrics`` becomes
        ``step_lr`` (``lr`` is the config's peak learning rate), the eigenvalue index ``rank`` of
        ``sharpness`` becomes ``eigen_rank`` (``rank`` is the LoRA rank), others ``<table>_<name>``.
    """
    allowed = ("metrics", "layers", "evals", "phases", "smoothed_loss", "sharpness", "trace", "density")
    if table not in allowed:
        raise ConfigError(f"table {table}: must be one of {', '.join(allowed)}")
    if isinstance(root, pd.DataFrame):
        frame = root
    elif (Path(root) / "config.json").exists():
        frame = load_runs(Path(root).parent)
        frame = frame[frame["path"] == str(Path(root))]
    else:
        frame = load_runs(root)
    settings = list(with_settings)
    unknown = [name for name in settings if len(frame) and name not in frame]
    if unknown:
        known = [c for c in frame.columns if c not in ("path",)]
        raise ConfigError(f"with_settings {', '.join(unknown)}: not a run setting; allowed: {', '.join(known)}")
    parts = []
    for _, row in frame[frame["status"] != DAMAGED].iterrows():  # commands name the damaged ones
        rows = getattr(Run(Path(row["path"])), table)
        rows = rows() if callable(rows) else rows  # smoothed_loss is a method (it takes thresholds)
        if len(rows):
            rows = rows.rename(columns={name: _renamed(table, name) for name in settings if name in rows})
            parts.append(rows.assign(run_id=row["run_id"], **{name: row[name] for name in settings}))
    names = (["step", "loss", "smoothed"] if table == "smoothed_loss" else
             getattr(logs, {"evals": "EVAL", "metrics": "METRICS"}.get(table, table.upper()) + "_SCHEMA").names)
    columns = ["run_id", *settings, *[_renamed(table, c) if c in settings else c for c in names]]
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]


def _renamed(table: str, column: str) -> str:
    """The name :func:`load_metrics` gives a table column that clashes with a setting."""
    return {("metrics", "lr"): "step_lr", ("sharpness", "rank"): "eigen_rank"}.get((table, column),
                                                                                 f"{table}_{column}")
