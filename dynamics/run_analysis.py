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
from typing import Any, Callable, Sequence

import pandas as pd
import pyarrow as pa
import torch

from dynamics import runs
from dynamics.analysis import detect_phases, phase_summary
from dynamics.config import TASK_KIND, ConfigError
from dynamics.curvature import check_split, measure_density, measure_sharpness, measure_trace
from dynamics.data import load_task
from dynamics.files import UnreadableFile, write_parquet
from dynamics.models import build_model, load_tokenizer
from dynamics.runs.logs import DENSITY_SCHEMA, GENERATIONS_SCHEMA, PHASES_SCHEMA, SHARPNESS_SCHEMA, TRACE_SCHEMA
from dynamics.training.evaluate import generations


# --- a run folder ------------------------------------------------------------------------------------
def select_checkpoints(run: runs.Run, which: str) -> list[int]:
    """``last`` (default), ``all``, or comma-separated steps."""
    available = runs.checkpoint_steps(run.path)
    if which == "last":
        return available[-1:]
    if which == "all":
        return available
    try:
        wanted = [int(s) for s in which.split(",")]
    except ValueError:
        raise ConfigError(f"--checkpoints {which}: must be last, all, or comma-separated steps") from None
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise ConfigError(f"--checkpoints {which}: {run.run_id} has no checkpoint at step(s) "
                          f"{', '.join(map(str, missing))}; it has {', '.join(map(str, available)) or 'none'}")
    return wanted


def analyze_run(path: str | Path, *, curve: str = "loss", sharpness: bool = True, checkpoints: str = "last",
                k: int = 1, n_batches: int = 1, tol: float = 1e-3, max_iter: int = 100, trace: bool = False,
                trace_samples: int = 100, density: bool = False, density_runs: int = 10, density_steps: int = 50,
                exact_match: int = 0, max_new_tokens: int | None = None, decode_batch: int | None = None,
                split: str = "eval", **thresholds: float) -> dict[str, Any]:
    """Phases of the run's loss curve and Hessian curvature at its checkpoints; writes
    ``phases.parquet``, ``sharpness.parquet`` (top-k eigenvalues), with ``trace`` ``trace.parquet``
    (Hutchinson, ``trace_samples`` HVPs at most), with ``density`` ``density.parquet`` (SLQ,
    ``density_runs`` x ``density_steps`` HVPs) and with ``exact_match`` N ``generations.parquet``
    (greedy continuations of the first N held-out problems, at most ``max_new_tokens`` each,
    ``decode_batch`` prompts at a time; defaults: the run's own ``max_new_tokens`` and
    ``batch_size``), and returns the summary written to summary.json.
    The curvature is of the loss on the first ``n_batches`` batches of ``split`` (``eval``: held-out
    examples; ``train``: training examples); its rows say which, and its summary entries are
    ``sharpness`` / ``trace`` for eval and ``sharpness_train`` / ``trace_train`` for train.
    Rows measured again at a checkpoint replace the old ones of that step (and split).

    The run's lock is held throughout (``RunLock``), so no trainer resumes it meanwhile and its
    checkpoints stay put; a run in use by another process is refused in one line (ConfigError).
    The phases entry records the last step of the curve it was measured on (``step``)."""
    check_curve(curve)
    check_split(split)
    run = runs.load_run(path)  # DamagedRun when its files do not read
    try:
        lock = runs.RunLock(run.path).__enter__()
    except runs.RunInUse as error:
        raise ConfigError(f"{run.run_id}: the run is in use by another process{runs.describe_holder(error.holder)}; "
                          "analyze it when that process ends") from None
    try:
        return _analyze_locked(run, curve=curve, sharpness=sharpness, checkpoints=checkpoints, k=k,
                               n_batches=n_batches, tol=tol, max_iter=max_iter, trace=trace,
                               trace_samples=trace_samples, density=density, density_runs=density_runs,
                               density_steps=density_steps, exact_match=exact_match, max_new_tokens=max_new_tokens,
                               decode_batch=decode_batch, split=split, **thresholds)
    finally:
        lock.__exit__(None, None, None)


def _analyze_locked(run: runs.Run, *, curve: str, sharpness: bool, checkpoints: str, k: int, n_batches: int,
                    tol: float, max_iter: int, trace: bool, trace_samples: int, density: bool, density_runs: int,
                    density_steps: int, exact_match: int, max_new_tokens: int | None, decode_batch: int | None,
                    split: str, **thresholds: float) -> dict[str, Any]:
    try:
        cfg = runs.stored_config(run.path)
    except ConfigError as error:
        raise runs.DamagedRun(run.path, f"config.json: {error}") from None
    if exact_match:
        check_exact_match(cfg, exact_match)
    metrics = run.metrics
    if metrics.empty:
        raise ConfigError(f"{run.run_id}: no metrics yet (metrics.parquet is missing or empty)")
    series = metrics[["step", curve]].dropna()
    try:
        phases = detect_phases(series[curve].to_numpy(), series["step"].to_numpy(), **thresholds)
        summary = phase_summary(series[curve].to_numpy(), series["step"].to_numpy(), **thresholds)
    except ValueError as error:
        raise ConfigError(f"{run.run_id}: {error}") from None
    phases = phases.assign(curve=curve)
    measures = {name: options for name, wanted, options in (
        ("sharpness", sharpness, dict(k=k, tol=tol, max_iter=max_iter, split=split)),
        ("trace", trace, dict(n_samples=trace_samples, split=split)),
        ("density", density, dict(n_runs=density_runs, n_steps=density_steps, split=split)),
        ("generations", exact_match > 0, dict(n_problems=exact_match,
                                              max_new_tokens=max_new_tokens or cfg.max_new_tokens,
                                              batch_size=decode_batch or cfg.batch_size))) if wanted}
    steps = select_checkpoints(run, checkpoints) if measures else []
    try:  # before anything is written: a damaged run's files are never rewritten
        for step in steps:
            runs.read_trainer_state(run.path, step)
        if steps:
            runs.stored_initial_adapter(run.path, runs.stored_config(run.path))
    except runs.DamagedCheckpoint as error:
        raise runs.DamagedRun(run.path, str(error)) from None

    write_parquet(run.path / "phases.parquet", pa.Table.from_pandas(phases, schema=PHASES_SCHEMA,
                                                                     preserve_index=False))
    result: dict[str, Any] = {"phases": {"curve": curve, "step": int(series["step"].iloc[-1]), **_plain(summary)}}
    if measures:
        measured: dict[str, list[dict[str, Any]]] = {name: [] for name in measures}
        for step in steps:
            for name, rows in measure_at_checkpoint(run, step, measures, n_batches=n_batches).items():
                measured[name] += rows
        for name, rows in measured.items():
            _replace_checkpoint_rows(run, name, steps, rows, split)
        suffix = SUMMARY_SUFFIX[split]
        last = [r for r in measured.get("sharpness", []) if r["step"] == max(steps, default=None)]
        if last:
            result["sharpness" + suffix] = {"step": max(steps), "eigenvalues": [r["eigenvalue"] for r in last],
                                            "converged": all(r["converged"] for r in last),
                                            "n_examples": last[0]["n_examples"], "loss": last[0]["loss"]}
        last_trace = [r for r in measured.get("trace", []) if r["step"] == max(steps, default=None)]
        if last_trace:
            result["trace" + suffix] = _plain({key: last_trace[0][key]
                                               for key in ("step", "trace", "standard_error", "n_examples")})
        last_generations = [r for r in measured.get("generations", []) if r["step"] == max(steps, default=None)]
        if last_generations:
            result["exact_match"] = {"step": max(steps), "n_problems": len(last_generations),
                                     "max_new_tokens": measures["generations"]["max_new_tokens"],
                                     "exact_match": sum(r["correct"] for r in last_generations) / len(last_generations)}
    runs.update_summary(run.path, **result)
    return result


CHECKPOINT_TABLES = {"sharpness": (SHARPNESS_SCHEMA, ["step", "split", "source", "rank"]),
                     "trace": (TRACE_SCHEMA, ["step", "split", "source"]),
                     "density": (DENSITY_SCHEMA, ["step", "split", "source", "probe", "node"]),
                     "generations": (GENERATIONS_SCHEMA, ["step", "source", "problem"])}


def check_exact_match(cfg, n_problems: int) -> None:
    """``--exact-match N`` needs a generation task and N held-out problems: a one-line ConfigError."""
    generation_tasks = [task for task, kind in TASK_KIND.items() if kind == "causal_lm"]
    if cfg.task not in generation_tasks:
        raise ConfigError(f"--exact-match: task {cfg.task} is not a generation task; exact match needs one of "
                          f"{', '.join(generation_tasks)}")
    if n_problems > cfg.n_eval:
        raise ConfigError(f"--exact-match {n_problems}: the run holds out {cfg.n_eval} problems (n_eval); "
                          f"ask for at most that many")


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


def check_curve(curve: str) -> None:
    if curve not in ("loss", "loss_clean"):
        raise ConfigError(f"--curve {curve}: must be one of loss, loss_clean")


def analyze_paths(paths: Sequence[str | Path], on_problem: Callable[[str], None] | None = None,
                  **options: Any) -> pd.DataFrame:
    """Analyse every run folder named or found (recursively) under ``paths``; one row per run.

    A run that cannot be analysed (damaged: ``RUN_ID: damaged: ...``; or without metrics, too
    short, or missing the checkpoint asked for: ``RUN_ID: not analysed: ...``) raises, or with
    ``on_problem`` is passed to it as one line and the others go on; its files are left as they were.
    """
    check_curve(options.get("curve", "loss"))
    check_split(options.get("split", "eval"))
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
    rows = []
    for run_dir in run_dirs:
        try:
            result = analyze_run(run_dir, **options)
        except (runs.DamagedRun, UnreadableFile, ConfigError) as error:
            if on_problem is None:
                raise
            if isinstance(error, runs.DamagedRun):
                on_problem(str(error))
            elif isinstance(error, UnreadableFile):  # rows garbled behind an intact parquet footer
                on_problem(f"{run_dir.name}: damaged: {error}")
            else:
                on_problem(f"{run_dir.name}: not analysed: " + str(error).removeprefix(f"{run_dir.name}: "))
            continue
        suffix = SUMMARY_SUFFIX[options.get("split", "eval")]  # the table shows the split just measured
        phases, sharp = result["phases"], result.get("sharpness" + suffix, {})
        rows.append({"run_id": run_dir.name, "double_descent": phases["has_double_descent"],
                     "episodes": phases["n_episodes"], "amplitude": phases["divergence_amplitude"],
                     "steps_lost": phases["steps_lost"], "spikes": phases["n_spikes"],
                     "sharpness_step": sharp.get("step"), "top_eigenvalue": (sharp.get("eigenvalues") or [None])[0],
                     **({"split": options["split"]} if suffix else {}),
                     **({"trace": result["trace" + suffix]["trace"]} if "trace" + suffix in result else {}),
                     **({"exact_match": result["exact_match"]["exact_match"]} if "exact_match" in result else {})})
    return pd.DataFrame(rows)
