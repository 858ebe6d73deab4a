"""``dynamics analyze``: run folders in; ``phases.parquet``, ``sharpness.parquet`` and, on request,
``trace.parquet``, ``density.parquet`` and ``generations.parquet`` out, plus ``phases`` /
``sharpness`` / ``trace`` / ``exact_match`` entries in ``summary.json`` so ``dynamics runs`` shows
them without recomputing.

Phases come from the pure ``dynamics.analysis.detect_phases`` on the loss curve; curvature from
``dynamics.curvature`` and exact match from greedy decoding (``dynamics.training.evaluate``) on
the run's model rebuilt at a checkpoint (``measure_at_checkpoint``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import pyarrow as pa
import torch

from dynamics import runs
from dynamics.analysis import detect_phases, phase_summary
from dynamics.analyze_config import AnalyzeConfig
from dynamics.config import ConfigError
from dynamics.curvature import measure_density, measure_sharpness, measure_trace
from dynamics.data import load_task
from dynamics.files import LinkRefused, UnreadableFile, describe_os_error, write_parquet
from dynamics.models import build_model, load_tokenizer
from dynamics.runs.logs import DENSITY_SCHEMA, GENERATIONS_SCHEMA, PHASES_SCHEMA, SHARPNESS_SCHEMA, TRACE_SCHEMA
from dynamics.training.evaluate import generations


# --- a run folder ------------------------------------------------------------------------------------
def select_checkpoints(run: runs.Run, options: AnalyzeConfig) -> list[int]:
    """The checkpoint steps ``options.checkpoints`` names in this run (``last``, ``all``, or
    steps it must have: a one-line ConfigError naming the missing ones)."""
    available = runs.checkpoint_steps(run.path)
    wanted = options.checkpoint_steps
    if wanted is None:
        return available[-1:] if options.checkpoints == "last" else available
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise ConfigError(f"--checkpoints {options.checkpoints}: {run.run_id} has no checkpoint at step(s) "
                          f"{', '.join(map(str, missing))}; it has {', '.join(map(str, available)) or 'none'}")
    return wanted


def analyze_run(path: str | Path, config: AnalyzeConfig | Mapping[str, Any] | None = None,
                **options: Any) -> dict[str, Any]:
    """Phases of the run's loss curve and Hessian curvature at its checkpoints, as ``config``
    (an :class:`AnalyzeConfig`; ``options`` are its fields or threshold names, over it) asks;
    writes ``phases.parquet``, ``sharpness.parquet`` (top-k eigenvalues), with ``trace``
    ``trace.parquet`` (Hutchinson), with ``density`` ``density.parquet`` (SLQ) and with
    ``exact_match`` N ``generations.parquet`` (greedy continuations of the first N held-out
    problems), and returns the summary written to summary.json.
    The curvature is of the loss on the first ``batches`` batches of ``split`` (``eval``: held-out
    examples; ``train``: training examples); its rows say which, and its summary entries are
    ``sharpness`` / ``trace`` for eval and ``sharpness_train`` / ``trace_train`` for train.
    Rows measured again at a checkpoint replace the old ones of that step (and split).

    The run's lock is held throughout (``RunLock``), so no trainer resumes it meanwhile and its
    checkpoints stay put; a run in use by another process is refused in one line (ConfigError).
    The phases entry records the last step of the curve it was measured on (``step``)."""
    settings = AnalyzeConfig.from_options(config, **options)
    run = runs.load_run(path)  # DamagedRun when its files do not read
    try:
        lock = runs.RunLock(run.path).__enter__()
    except runs.RunInUse as error:
        raise ConfigError(f"{run.run_id}: the run is in use by another process{runs.describe_holder(error.holder)}; "
                          "analyze it when that process ends") from None
    try:
        return _analyze_locked(run, settings)
    finally:
        lock.__exit__(None, None, None)


def _analyze_locked(run: runs.Run, options: AnalyzeConfig) -> dict[str, Any]:
    try:
        cfg = runs.stored_config(run.path)
    except ConfigError as error:
        raise runs.DamagedRun(run.path, f"config.json: {error}") from None
    options.check_run(cfg)
    phases, result = _phases(run, options)
    measures = _measures(options, cfg)
    steps = select_checkpoints(run, options) if measures else []
    try:  # before anything is written: a damaged run's files are never rewritten
        for step in steps:
            runs.read_trainer_state(run.path, step)
        if steps:
            runs.stored_initial_adapter(run.path, runs.stored_config(run.path))
    except runs.DamagedCheckpoint as error:
        raise runs.DamagedRun(run.path, str(error)) from None

    write_parquet(run.path / "phases.parquet", pa.Table.from_pandas(phases, schema=PHASES_SCHEMA,
                                                                     preserve_index=False))
    if measures:
        measured: dict[str, list[dict[str, Any]]] = {name: [] for name in measures}
        for step in steps:
            for name, rows in measure_at_checkpoint(run, step, measures, n_batches=options.batches).items():
                measured[name] += rows
        for name, rows in measured.items():
            _replace_checkpoint_rows(run, name, steps, rows, options.split)
        result.update(_summary_entries(measured, max(steps, default=None), options.split, measures))
    runs.update_summary(run.path, **result)
    return result


def _phases(run: runs.Run, options: AnalyzeConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The phases table of the run's ``options.curve`` and its summary entry."""
    metrics = run.metrics
    if metrics.empty:
        raise ConfigError(f"{run.run_id}: no metrics yet (metrics.parquet is missing or empty)")
    series = metrics[["step", options.curve]].dropna()
    loss, step = series[options.curve].to_numpy(), series["step"].to_numpy()
    try:
        phases = detect_phases(loss, step, **options.threshold_values)
        summary = phase_summary(loss, step, **options.threshold_values)
    except ValueError as error:
        raise ConfigError(f"{run.run_id}: {error}") from None
    entry = {"curve": options.curve, "step": int(series["step"].iloc[-1]), **_plain(summary)}
    return phases.assign(curve=options.curve), {"phases": entry}


def _measures(options: AnalyzeConfig, cfg) -> dict[str, dict[str, Any]]:
    """The measurements asked for: table name -> the options of its ``measure_<name>``."""
    split = options.split
    wanted = (
        ("sharpness", options.sharpness, dict(k=options.k, tol=options.tol, max_iter=options.max_iter, split=split)),
        ("trace", options.trace, dict(n_samples=options.trace_samples, split=split)),
        ("density", options.density, dict(n_runs=options.density_runs, n_steps=options.density_steps, split=split)),
        ("generations", options.exact_match > 0, dict(n_problems=options.exact_match,
                                                      max_new_tokens=options.max_new_tokens or cfg.max_new_tokens,
                                                      batch_size=options.decode_batch or cfg.batch_size)))
    return {name: settings for name, asked, settings in wanted if asked}


def _summary_entries(measured: dict[str, list[dict[str, Any]]], last_step: int | None, split: str,
                     measures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """summary.json's ``sharpness[_train]``, ``trace[_train]`` and ``exact_match`` entries, from
    the rows measured at the last checkpoint."""
    suffix = SUMMARY_SUFFIX[split]
    last = {name: [row for row in rows if row["step"] == last_step] for name, rows in measured.items()}
    entries: dict[str, Any] = {}
    if last.get("sharpness"):
        rows = last["sharpness"]
        entries["sharpness" + suffix] = {"step": last_step, "eigenvalues": [r["eigenvalue"] for r in rows],
                                         "converged": all(r["converged"] for r in rows),
                                         "n_examples": rows[0]["n_examples"], "loss": rows[0]["loss"]}
    if last.get("trace"):
        entries["trace" + suffix] = _plain({key: last["trace"][0][key]
                                            for key in ("step", "trace", "standard_error", "n_examples")})
    if last.get("generations"):
        rows = last["generations"]
        entries["exact_match"] = {"step": last_step, "n_problems": len(rows),
                                  "max_new_tokens": measures["generations"]["max_new_tokens"],
                                  "exact_match": sum(r["correct"] for r in rows) / len(rows)}
    return entries


CHECKPOINT_TABLES = {"sharpness": (SHARPNESS_SCHEMA, ["step", "split", "source", "rank"]),
                     "trace": (TRACE_SCHEMA, ["step", "split", "source"]),
                     "density": (DENSITY_SCHEMA, ["step", "split", "source", "probe", "node"]),
                     "generations": (GENERATIONS_SCHEMA, ["step", "source", "problem"])}


def measure_at_checkpoint(run: runs.Run, step: int, measures: dict[str, dict[str, Any]],
                          n_batches: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Rebuild the run's model at ``checkpoints/step_N`` once and take each of ``measures``
    (``sharpness``, ``trace``, ``density`` -> options of ``measure_<name>``; ``generations`` ->
    ``n_problems``, ``max_new_tokens``, ``batch_size``): rows per table."""
    cfg = runs.stored_config(run.path)
    previous_threads = torch.get_num_threads()
    if cfg.threads:  # as in training: the run's --threads, restored afterwards
        torch.set_num_threads(cfg.threads)
    try:
        task = load_task(cfg, load_tokenizer(cfg))
        model = build_model(cfg, num_labels=len(task.label_names) or None,
                            loraga=runs.stored_initial_adapter(run.path, cfg))
        runs.load_weights(model, runs.checkpoint_dir(run.path, step))
        device = next(model.parameters()).device
        measure = {"sharpness": measure_sharpness, "trace": measure_trace, "density": measure_density}
        measured = {name: measure[name](model, task, cfg, device, n_batches=n_batches, step=step, source="checkpoint",
                                        seed=cfg.seed, **options)
                    for name, options in measures.items() if name != "generations"}
        if "generations" in measures:
            options = measures["generations"]
            rows = generations(model, task, task.eval[: options["n_problems"]], device, options["max_new_tokens"],
                               options["batch_size"])
            measured["generations"] = [{"step": step, **row, "source": "checkpoint"} for row in rows]
        return measured
    finally:
        torch.set_num_threads(previous_threads)


def _replace_checkpoint_rows(run: runs.Run, table: str, steps: list[int], rows: list[dict[str, Any]],
                             split: str) -> None:
    """Write ``<table>.parquet`` with ``rows`` in place of the checkpoint rows of ``steps`` (and of
    ``split``, in the curvature tables: a train-split measurement keeps the eval-split rows)."""
    schema, order = CHECKPOINT_TABLES[table]
    existing = getattr(run, table)
    replaced = (existing["source"] == "checkpoint") & existing["step"].isin(steps)
    if "split" in existing:
        replaced &= existing["split"] == split
    keep = existing[~replaced]
    new = pd.DataFrame(rows, columns=schema.names)
    frame = pd.concat([keep, new], ignore_index=True) if len(keep) else new
    frame = frame.sort_values(order, ignore_index=True)
    write_parquet(run.path / f"{table}.parquet", pa.Table.from_pandas(frame, schema=schema, preserve_index=False))


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly scalars (numpy -> Python, NaN -> None)."""
    out = {}
    for key, value in values.items():
        value = value.item() if hasattr(value, "item") else value
        out[key] = None if isinstance(value, float) and math.isnan(value) else value
    return out


SUMMARY_SUFFIX = {"eval": "", "train": "_train"}  # summary.json: sharpness / sharpness_train, trace / trace_train


def analyze_paths(paths: Sequence[str | Path], config: AnalyzeConfig | Mapping[str, Any] | None = None,
                  on_problem: Callable[[str], None] | None = None, **options: Any) -> pd.DataFrame:
    """Analyse every run folder named or found (recursively) under ``paths`` as ``config`` (with
    ``options`` over it, as in :func:`analyze_run`) asks; one row per run.

    A run that cannot be analysed (damaged: ``RUN_ID: damaged: ...``; or without metrics, too
    short, or missing the checkpoint asked for: ``RUN_ID: not analysed: ...``) raises, or with
    ``on_problem`` is passed to it as one line and the others go on; its files are left as they were.
    """
    settings = AnalyzeConfig.from_options(config, **options)
    run_dirs = _run_dirs(paths)
    _check_steps_somewhere(run_dirs, settings)
    rows = []
    for run_dir in run_dirs:
        try:
            result = analyze_run(run_dir, settings)
        except (runs.DamagedRun, UnreadableFile, ConfigError, OSError) as error:
            if on_problem is None:
                raise
            if isinstance(error, runs.DamagedRun):
                on_problem(str(error))
            elif isinstance(error, OSError):  # a full or read-only disk: its files are as they were
                on_problem(f"{run_dir.name}: not analysed: {describe_os_error(error)}")
            elif isinstance(error, UnreadableFile) and not isinstance(error, LinkRefused):
                on_problem(f"{run_dir.name}: damaged: {error}")  # rows garbled behind an intact parquet footer
            else:
                on_problem(f"{run_dir.name}: not analysed: " + str(error).removeprefix(f"{run_dir.name}: "))
            continue
        rows.append(_table_row(run_dir.name, result, settings.split))
    return pd.DataFrame(rows)


def _check_steps_somewhere(run_dirs: Sequence[Path], options: AnalyzeConfig) -> None:
    """``--checkpoints 10,20`` that no run has in full is a mistyped flag, not a fault of each run:
    one ConfigError (exit 2) before any run is touched, with the steps the runs do have."""
    wanted = options.checkpoint_steps
    if not wanted or not options.measures_checkpoints:
        return
    held = {run_dir: set(runs.checkpoint_steps(run_dir)) for run_dir in run_dirs}
    if not any(set(wanted) <= steps for steps in held.values()):
        have = sorted(set().union(*held.values()))
        shown = ", ".join(map(str, have[:12])) + (", ..." if len(have) > 12 else "") if have else "none"
        raise ConfigError(f"--checkpoints {options.checkpoints}: no run has a checkpoint at every one of these steps; "
                          f"the runs have step(s) {shown} (or use last, all)")


def _run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """The run folders ``paths`` name, or hold (searched recursively); a one-line ConfigError for a
    path that is neither, or when none is found."""
    run_dirs = []
    for path in map(Path, paths):
        if (path / "config.json").exists():
            run_dirs.append(path)
        elif path.is_dir():
            run_dirs += [Path(p) for p in runs.load_runs(path)["path"]]
        else:
            raise ConfigError(f"{path}: no such run folder or folder of runs")
    if not run_dirs:
        raise ConfigError(f"{', '.join(map(str, paths))}: no run folders found")
    return run_dirs


def _table_row(run_id: str, result: dict[str, Any], split: str) -> dict[str, Any]:
    """The printed table's row of one run: its phases and the split just measured."""
    suffix = SUMMARY_SUFFIX[split]
    phases, sharp = result["phases"], result.get("sharpness" + suffix, {})
    return {"run_id": run_id, "double_descent": phases["has_double_descent"], "episodes": phases["n_episodes"],
            "amplitude": phases["divergence_amplitude"], "steps_lost": phases["steps_lost"],
            "spikes": phases["n_spikes"], "sharpness_step": sharp.get("step"),
            "top_eigenvalue": (sharp.get("eigenvalues") or [None])[0],
            **({"split": split} if suffix else {}),
            **({"trace": result["trace" + suffix]["trace"]} if "trace" + suffix in result else {}),
            **({"exact_match": result["exact_match"]["exact_match"]} if "exact_match" in result else {})}
