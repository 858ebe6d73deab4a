"""The run folder ``runs/<run_id>/``: creation, summary, checkpoints, locking, and loading runs back.

Layout (DESIGN.md)::

    config.json         {"config": every resolved setting, "runtime": device/dtype/threads,
                         "versions": ..., "git_commit": ..., "host": ..., "started_at": ...}
    summary.json        status, steps done, wall time, final and best eval
    metrics.parquet     one row per optimizer step      (dynamics.metrics.METRICS_SCHEMA)
    layers.parquet      per-layer rows                  (dynamics.metrics.LAYERS_SCHEMA)
    eval.parquet        one row per evaluation          (dynamics.metrics.EVAL_SCHEMA)
    checkpoints/step_N/ weights.safetensors (+ adapter_config.json) and trainer_state.pt

JSON files are written to a temporary file and renamed, so readers never see half a file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from dynamics.config import ConfigError, RunConfig, flag

CHECKPOINT_PREFIX = "step_"


def _mkdtemp_beside(target: Path) -> Path:
    """A staging folder next to ``target`` with the permissions a plain mkdir would give."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    return staging


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def git_commit() -> str | None:
    """The commit of the dynamics source tree (with ``+dirty`` when it has local changes)."""
    source = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                               capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    import dynamics

    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "dynamics": dynamics.__version__,
        },
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv),
        "started_at": now_iso(),
    }


# --- existence and resume checks --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What ``train`` will do with the run folder: ``new``, ``resume`` or ``done`` (nothing)."""

    mode: str
    run_dir: Path
    status: str | None = None


def plan_run(cfg: RunConfig) -> RunPlan:
    """Decide, before anything is written, whether the run starts, resumes or is already done.

    Raises ConfigError when the folder exists and neither ``--resume`` nor ``--overwrite`` is given,
    or when ``--resume`` finds a run whose experiment settings differ from ``cfg``.
    """
    run_dir = cfg.run_dir
    if not run_dir.exists() or cfg.overwrite:
        return RunPlan("new", run_dir)
    if not (run_dir / "config.json").exists():
        raise ConfigError(f"--run-id {run_dir.name}: {run_dir} exists but is not a run folder; choose another --run-id")
    status = read_summary(run_dir).get("status", "running")
    if not cfg.resume:
        raise ConfigError(f"--run-id {run_dir.name}: {run_dir} exists (status {status}); "
                          "pass --resume to continue it or --overwrite to replace it")
    stored = stored_config(run_dir)
    differences = config_differences(stored, cfg)
    if differences:
        raise ConfigError(f"--resume {run_dir.name}: settings differ from the stored run: {'; '.join(differences)}")
    if status in ("completed", "diverged"):
        return RunPlan("done", run_dir, status)
    return RunPlan("resume", run_dir, status)


def stored_config(run_dir: Path) -> RunConfig:
    values = read_json(Path(run_dir) / "config.json")["config"]
    return RunConfig.from_dict(values, source=str(Path(run_dir) / "config.json"))


def config_differences(stored: RunConfig, requested: RunConfig) -> list[str]:
    """``--field stored -> requested`` for each experiment field that differs."""
    old, new = stored.resolved().experiment_dict(), requested.resolved().experiment_dict()
    return [f"{flag(k)} {old[k]} -> {new[k]}" for k in old if old[k] != new[k]]


# --- creation, lock, summary ---------------------------------------------------------------------
def create_run_dir(cfg: RunConfig, runtime: dict[str, Any]) -> Path:
    """Create ``cfg.run_dir`` with ``config.json`` and a ``running`` summary, in one rename.

    With ``--overwrite`` the old folder is removed only now, after the new run has been set up.
    """
    run_dir = cfg.run_dir
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _mkdtemp_beside(run_dir)
    payload = {"config": cfg.resolved().to_dict(), "runtime": runtime, **environment_info()}
    write_json_atomic(staging / "config.json", payload)
    write_json_atomic(staging / "summary.json", {"status": "running", "steps_done": 0, "steps_total": cfg.steps,
                                                 "updated_at": now_iso()})
    if run_dir.exists():
        shutil.rmtree(run_dir)
    staging.rename(run_dir)
    return run_dir


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``: one writer per run; released by the kernel
    when the process dies, even by SIGKILL."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fh = None

    def __enter__(self) -> RunLock:
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            message = f"--run-id {self.path.parent.name}: the run is being trained by another process"
            raise ConfigError(message) from None
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    return read_json(path) if path.exists() else {}


def update_summary(run_dir: Path, **fields: Any) -> dict[str, Any]:
    summary = {**read_summary(run_dir), **fields, "updated_at": now_iso()}
    write_json_atomic(Path(run_dir) / "summary.json", summary)
    return summary


# --- checkpoints -------------------------------------------------------------------------------
def checkpoint_steps(run_dir: Path) -> list[int]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.exists():
        return []
    steps = []
    for path in folder.iterdir():
        match = re.fullmatch(CHECKPOINT_PREFIX + r"(\d+)", path.name)
        if match and (path / "trainer_state.pt").exists():
            steps.append(int(match.group(1)))
    return sorted(steps)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"


def save_checkpoint(run_dir: Path, step: int, model, trainer_state: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step_N`` (weights as safetensors + ``trainer_state.pt``) atomically,
    then drop all but the newest ``keep`` checkpoints (``keep=0`` keeps all)."""
    import torch

    target = checkpoint_dir(run_dir, step)
    target.parent.mkdir(exist_ok=True)
    staging = _mkdtemp_beside(target)
    save_weights(model, staging)
    torch.save(trainer_state, staging / "trainer_state.pt")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    if keep > 0:
        for old in checkpoint_steps(run_dir)[:-keep]:
            shutil.rmtree(checkpoint_dir(run_dir, old), ignore_errors=True)
    return target


def save_weights(model, folder: Path) -> None:
    """Trainable weights only: the adapter (peft layout, loadable by ``PeftModel.from_pretrained``)
    or, for full fine-tuning, the whole model (shared tensors such as tied embeddings saved once)."""
    from safetensors.torch import save_model

    if hasattr(model, "peft_config"):
        config = model.peft_config[model.active_adapter]
        rank_pattern = getattr(config, "rank_pattern", None)
        # AdaLoRA: peft saves weights cut down to its rank pattern; keep them full size (pruned ranks
        # are zeroed in E) so a resume continues the very tensors the optimizer state belongs to,
        # and PeftModel.from_pretrained still loads them. The pattern is in trainer_state.pt.
        if rank_pattern:
            config.rank_pattern = None
        try:
            model.save_pretrained(folder)
        finally:
            if rank_pattern:
                config.rank_pattern = rank_pattern
    else:
        save_model(model, str(folder / "model.safetensors"))


def load_weights(model, folder: Path) -> None:
    from safetensors.torch import load_file, load_model

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint {folder} has unexpected adapter keys: {result.unexpected_keys[:3]}")
    else:
        load_model(model, str(folder / "model.safetensors"))


def load_trainer_state(folder: Path) -> dict[str, Any]:
    import torch

    return torch.load(folder / "trainer_state.pt", weights_only=True)


# --- reading runs back --------------------------------------------------------------------------
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
        from dynamics.metrics import METRICS_SCHEMA

        return _read_parquet(self.path / "metrics.parquet", METRICS_SCHEMA)

    @property
    def evals(self) -> pd.DataFrame:
        from dynamics.metrics import EVAL_SCHEMA

        return _read_parquet(self.path / "eval.parquet", EVAL_SCHEMA)

    @property
    def layers(self) -> pd.DataFrame:
        from dynamics.metrics import LAYERS_SCHEMA

        return _read_parquet(self.path / "layers.parquet", LAYERS_SCHEMA)

    @property
    def checkpoints(self) -> list[Path]:
        return [checkpoint_dir(self.path, s) for s in checkpoint_steps(self.path)]

    # --- analysis results (written by ``dynamics analyze``; phases also detected on the fly) ---
    @property
    def phases(self) -> pd.DataFrame:
        """Double-descent phases (``PHASES_SCHEMA``): ``phases.parquet`` when ``dynamics analyze``
        wrote it, else detected now from the ``loss`` column with the default thresholds (empty
        for a curve too short to segment)."""
        from dynamics.metrics import PHASES_SCHEMA

        if (self.path / "phases.parquet").exists():
            return _read_parquet(self.path / "phases.parquet", PHASES_SCHEMA)
        from dynamics.analysis import detect_phases

        series = self._curve("loss")
        try:
            detected = detect_phases(series["loss"].to_numpy(), series["step"].to_numpy())
        except ValueError:  # fewer than two points, or a non-finite loss (a diverged run)
            return PHASES_SCHEMA.empty_table().to_pandas()
        return detected.assign(curve="loss")

    @property
    def phase_summary(self) -> dict[str, Any]:
        """``has_double_descent``, ``divergence_amplitude``, ``steps_lost``, ``n_spikes``,
        ``n_episodes`` and ``curve`` (see :func:`dynamics.analysis.phase_summary`): the entry
        ``dynamics analyze`` stored in summary.json, else computed now from ``loss``; ``{}`` when
        the curve cannot be segmented."""
        stored = self.summary.get("phases")
        if stored:
            return dict(stored)
        from dynamics.analysis import phase_summary

        series = self._curve("loss")
        try:
            return {"curve": "loss", **phase_summary(series["loss"].to_numpy(), series["step"].to_numpy())}
        except ValueError:
            return {}

    def smoothed_loss(self, curve: str = "loss", **thresholds: float) -> pd.DataFrame:
        """Columns ``step``, ``loss`` (raw ``curve``) and ``smoothed``: the curve the phase detector
        segments (:func:`dynamics.analysis.smooth_loss`); empty when it has fewer than two points
        or a non-finite value."""
        from dynamics.analysis import smooth_loss

        series = self._curve(curve).rename(columns={curve: "loss"})
        try:
            smoothed = smooth_loss(series["loss"].to_numpy(), series["step"].to_numpy(), **thresholds)
        except ValueError:
            return pd.DataFrame({"step": pd.Series(dtype="int64"), "loss": pd.Series(dtype="float64"),
                                 "smoothed": pd.Series(dtype="float64")})
        return series.assign(smoothed=smoothed)

    @property
    def sharpness(self) -> pd.DataFrame:
        """Top Hessian eigenvalues (``SHARPNESS_SCHEMA``), one row per (step, source, rank)."""
        from dynamics.metrics import SHARPNESS_SCHEMA

        return _read_parquet(self.path / "sharpness.parquet", SHARPNESS_SCHEMA)

    @property
    def trace(self) -> pd.DataFrame:
        """Hutchinson estimates of tr(H) (``TRACE_SCHEMA``) from ``dynamics analyze --trace``."""
        from dynamics.metrics import TRACE_SCHEMA

        return _read_parquet(self.path / "trace.parquet", TRACE_SCHEMA)

    @property
    def density(self) -> pd.DataFrame:
        """Spectral density nodes and weights (``DENSITY_SCHEMA``) from ``dynamics analyze --density``;
        smooth them with :func:`dynamics.analysis.gaussian_density`."""
        from dynamics.metrics import DENSITY_SCHEMA

        return _read_parquet(self.path / "density.parquet", DENSITY_SCHEMA)

    def _curve(self, column: str) -> pd.DataFrame:
        metrics = self.metrics
        if column not in metrics:
            raise ConfigError(f"--curve {column}: not a metrics column; use loss or loss_clean")
        return metrics[["step", column]].dropna().reset_index(drop=True)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.summary.get('status')!r})"


def _read_parquet(path: Path, schema) -> pd.DataFrame:
    if not path.exists():
        return schema.empty_table().to_pandas()
    return pd.read_parquet(path)


def load_run(path: str | os.PathLike) -> Run:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a run folder (no config.json)")
    return Run(path)


RUN_TABLE_COLUMNS = ["run_id", "method", "adapter", "perturbation", "model", "task", "rank", "alpha", "lr", "seed",
                     "steps", "status", "steps_done", "final_loss", "eval_loss", "eval_metric", "eval_macro_f1",
                     "double_descent", "divergence_amplitude", "steps_lost", "n_episodes", "top_eigenvalue",
                     "wall_time_s", "trainable_params", "path"]


def load_runs(root: str | os.PathLike = "runs") -> pd.DataFrame:
    """One row per run folder under ``root`` (searched recursively): settings, status and the
    summary's final numbers. Columns: ``RUN_TABLE_COLUMNS`` then every other config field.

    The phase columns (``double_descent``, ``divergence_amplitude``, ``steps_lost``,
    ``n_episodes``) come from ``dynamics analyze`` where it ran, else from the loss curve now
    (:attr:`Run.phase_summary`); None where there is no curve to segment yet."""
    root = Path(root)
    rows = []
    for config_path in sorted(root.rglob("config.json")) if root.exists() else []:
        run_dir = config_path.parent
        if any(part.startswith(".") for part in run_dir.relative_to(root).parts) or "checkpoints" in run_dir.parts:
            continue
        try:
            stored = read_json(config_path)
            config = stored["config"]
        except (ValueError, KeyError):
            continue
        runtime = stored.get("runtime") or {}
        summary = read_summary(run_dir)
        phases = Run(run_dir).phase_summary if (run_dir / "metrics.parquet").exists() else {}
        final_eval = summary.get("final_eval") or {}
        settings = {k: v for k, v in config.items() if k not in ("run_id", "resume", "overwrite", "progress")}
        adapter, _, perturbation = str(config.get("method", "")).partition("+")
        rows.append({
            **settings,
            "adapter": adapter,
            "perturbation": perturbation or None,
            "run_id": run_dir.name,
            "status": summary.get("status"),
            "steps_done": summary.get("steps_done"),
            "final_loss": summary.get("final_loss"),
            "eval_loss": final_eval.get("loss"),
            "eval_metric": final_eval.get("exact_match", final_eval.get("accuracy")),
            "eval_macro_f1": final_eval.get("macro_f1"),
            "wall_time_s": summary.get("wall_time_s"),
            "trainable_params": runtime.get("trainable_params"),
            "double_descent": phases.get("has_double_descent"),
            "divergence_amplitude": phases.get("divergence_amplitude"),
            "steps_lost": phases.get("steps_lost"),
            "n_episodes": phases.get("n_episodes"),
            "top_eigenvalue": ((summary.get("sharpness") or {}).get("eigenvalues") or [None])[0],
            "path": str(run_dir),
        })
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=RUN_TABLE_COLUMNS)
    ordered = [c for c in RUN_TABLE_COLUMNS if c in frame] + [c for c in frame if c not in RUN_TABLE_COLUMNS]
    return frame[ordered]


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
        ``metrics`` (``METRICS_SCHEMA``, one row per step), ``layers``, ``evals``, ``phases``,
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
    for _, row in frame.iterrows():
        rows = getattr(Run(Path(row["path"])), table)
        rows = rows() if callable(rows) else rows  # smoothed_loss is a method (it takes thresholds)
        if len(rows):
            rows = rows.rename(columns={name: _renamed(table, name) for name in settings if name in rows})
            parts.append(rows.assign(run_id=row["run_id"], **{name: row[name] for name in settings}))
    from dynamics import metrics as schemas

    names = (["step", "loss", "smoothed"] if table == "smoothed_loss" else
             getattr(schemas, {"evals": "EVAL", "metrics": "METRICS"}.get(table, table.upper()) + "_SCHEMA").names)
    columns = ["run_id", *settings, *[_renamed(table, c) if c in settings else c for c in names]]
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]


def _renamed(table: str, column: str) -> str:
    """The name :func:`load_metrics` gives a table column that clashes with a setting."""
    return {("metrics", "lr"): "step_lr", ("sharpness", "rank"): "eigen_rank"}.get((table, column),
                                                                                 f"{table}_{column}")
