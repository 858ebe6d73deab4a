"""Run-level analysis: a run folder in; ``phases.parquet``, ``sharpness.parquet`` and, on
request, ``trace.parquet`` and ``density.parquet`` out.

The pure functions live in ``dynamics.analysis`` (``detect_phases``, ``phase_summary``,
``hessian_eigenvalues``, ``hessian_trace``, ``spectral_density``); this module reads a run,
rebuilds its model at a checkpoint, feeds them, and writes the results beside the run's other
files, plus ``phases`` / ``sharpness`` / ``trace`` entries in ``summary.json`` so ``dynamics
runs`` can show them without recomputing.

Sharpness is the Hessian's top eigenvalues of the mean eval loss (same units as training: nats
per target token) with respect to the trainable parameters (LoRA A/B, or every weight for
``full``), over the first ``batches`` eval batches of ``batch_size`` examples: a fixed set, so
values at different steps and in different runs of the same task are comparable.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from dynamics import runs
from dynamics.config import ConfigError, RunConfig
from dynamics.data import TaskData
from dynamics.metrics import DENSITY_SCHEMA, PHASES_SCHEMA, SHARPNESS_SCHEMA, TRACE_SCHEMA


def write_parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


# --- sharpness of a model ----------------------------------------------------------------------------
@contextlib.contextmanager
def eager_attention(model: nn.Module, device: torch.device) -> Iterator[None]:
    """On CPU the fused (sdpa) attention has no double backward: switch to eager for the HVPs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if device.type != "cpu" or current in (None, "eager") or not hasattr(base, "set_attn_implementation"):
        yield
        return
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(current)


def sharpness_batches(task: TaskData, cfg: RunConfig, n_batches: int, device: torch.device) -> list[dict]:
    from dynamics.loop import to_device

    examples = task.eval[: n_batches * cfg.batch_size]
    if not examples:
        raise ConfigError("--n-eval 0: sharpness needs eval examples")
    return [to_device(task.collate(examples[i : i + cfg.batch_size]), device)
            for i in range(0, len(examples), cfg.batch_size)]


def hessian_loss(model: nn.Module, task: TaskData, cfg: RunConfig, device: torch.device,
                 n_batches: int) -> tuple[Any, list[torch.Tensor], int]:
    """The eval-loss closure the curvature measures differentiate: ``(loss_fn, params, n_examples)``.

    ``loss_fn()`` is the mean eval loss over the first ``n_batches`` eval batches (nats per target
    token), ``params`` the trainable tensors."""
    from dynamics.analysis import model_loss_fn
    from dynamics.data import n_loss_terms
    from dynamics.loop import loss_sum

    batches = sharpness_batches(task, cfg, n_batches, device)
    total_terms = sum(n_loss_terms(b, task.kind) for b in batches)

    def batch_share(model: nn.Module, batch) -> torch.Tensor:  # sums to the eval mean over all batches
        return loss_sum(model, batch, task.kind) * len(batches) / total_terms

    params = [p for p in model.parameters() if p.requires_grad]
    return model_loss_fn(model, batches, batch_share), params, sum(int(b["input_ids"].shape[0]) for b in batches)


def measure_sharpness(model: nn.Module, task: TaskData, cfg: RunConfig, device: torch.device, *, k: int = 1,
                      n_batches: int = 1, tol: float = 1e-3, max_iter: int = 100, seed: int = 0,
                      step: int, source: str) -> list[dict[str, Any]]:
    """Top-k Hessian eigenvalues at the model's current weights, as ``sharpness.parquet`` rows."""
    from dynamics.analysis import hessian_eigenvalues

    loss_fn, params, n_examples = hessian_loss(model, task, cfg, device, n_batches)
    if k > sum(p.numel() for p in params):
        raise ConfigError(f"--k {k}: larger than the {sum(p.numel() for p in params)} trainable parameters")
    started = time.perf_counter()
    with eager_attention(model, device):
        result = hessian_eigenvalues(loss_fn, params, k=k, tol=tol, max_iter=max_iter, seed=seed)
    seconds = time.perf_counter() - started
    return [{"step": step, "rank": i + 1, "eigenvalue": float(value), "residual": float(result.residuals[i]),
             "converged": bool(result.converged), "n_hvp": int(result.n_hvp), "n_examples": n_examples,
             "seconds": seconds, "source": source}
            for i, value in enumerate(result.eigenvalues)]


def measure_trace(model: nn.Module, task: TaskData, cfg: RunConfig, device: torch.device, *, n_batches: int = 1,
                  n_samples: int = 100, tol: float = 1e-2, seed: int = 0, step: int,
                  source: str) -> list[dict[str, Any]]:
    """Hutchinson's tr(H) at the model's current weights, as one ``trace.parquet`` row."""
    from dynamics.analysis import hessian_trace

    loss_fn, params, n_examples = hessian_loss(model, task, cfg, device, n_batches)
    started = time.perf_counter()
    with eager_attention(model, device):
        result = hessian_trace(loss_fn, params, n_samples=n_samples, seed=seed, tol=tol)
    return [{"step": step, "trace": float(result.estimate), "standard_error": float(result.standard_error),
             "n_hvp": int(result.n_hvp), "converged": bool(result.converged), "n_examples": n_examples,
             "seconds": time.perf_counter() - started, "source": source}]


def measure_density(model: nn.Module, task: TaskData, cfg: RunConfig, device: torch.device, *, n_batches: int = 1,
                    n_runs: int = 10, n_steps: int = 50, seed: int = 0, step: int,
                    source: str) -> list[dict[str, Any]]:
    """Stochastic Lanczos quadrature of the Hessian's eigenvalue density: ``density.parquet`` rows,
    one per quadrature node."""
    from dynamics.analysis import spectral_density

    loss_fn, params, n_examples = hessian_loss(model, task, cfg, device, n_batches)
    with eager_attention(model, device):
        result = spectral_density(loss_fn, params, n_runs=n_runs, n_steps=n_steps, seed=seed)
    return [{"step": step, "probe": int(probe), "node": float(node), "weight": float(weight),
             "n_hvp": int(result.n_hvp), "n_examples": n_examples, "source": source}
            for probe, node, weight in zip(result.probes, result.nodes, result.weights, strict=True)]


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
                **thresholds: float) -> dict[str, Any]:
    """Phases of the run's loss curve and Hessian curvature at its checkpoints; writes
    ``phases.parquet``, ``sharpness.parquet`` (top-k eigenvalues), with ``trace`` ``trace.parquet``
    (Hutchinson, ``trace_samples`` HVPs at most) and with ``density`` ``density.parquet`` (SLQ,
    ``density_runs`` x ``density_steps`` HVPs), and returns the summary written to summary.json.
    Rows measured again at a checkpoint replace the old ones of that step."""
    from dynamics.analysis import detect_phases, phase_summary

    run = runs.load_run(path)
    metrics = run.metrics
    if metrics.empty:
        raise ConfigError(f"{run.path}: no metrics yet (metrics.parquet is missing or empty)")
    if curve not in ("loss", "loss_clean"):
        raise ConfigError(f"--curve {curve}: must be one of loss, loss_clean")
    series = metrics[["step", curve]].dropna()
    try:
        phases = detect_phases(series[curve].to_numpy(), series["step"].to_numpy(), **thresholds)
        summary = phase_summary(series[curve].to_numpy(), series["step"].to_numpy(), **thresholds)
    except ValueError as error:
        raise ConfigError(f"{run.run_id}: {error}") from None
    phases = phases.assign(curve=curve)
    write_parquet(run.path / "phases.parquet", pa.Table.from_pandas(phases, schema=PHASES_SCHEMA,
                                                                     preserve_index=False))
    result: dict[str, Any] = {"phases": {"curve": curve, **_plain(summary)}}

    measures = {name: options for name, wanted, options in (
        ("sharpness", sharpness, dict(k=k, tol=tol, max_iter=max_iter)),
        ("trace", trace, dict(n_samples=trace_samples)),
        ("density", density, dict(n_runs=density_runs, n_steps=density_steps))) if wanted}
    if measures:
        steps = select_checkpoints(run, checkpoints)
        measured: dict[str, list[dict[str, Any]]] = {name: [] for name in measures}
        for step in steps:
            for name, rows in curvature_at_checkpoint(run, step, measures, n_batches=n_batches).items():
                measured[name] += rows
        for name, rows in measured.items():
            _replace_checkpoint_rows(run, name, steps, rows)
        last = [r for r in measured.get("sharpness", []) if r["step"] == max(steps, default=None)]
        if last:
            result["sharpness"] = {"step": max(steps), "eigenvalues": [r["eigenvalue"] for r in last],
                                   "converged": all(r["converged"] for r in last)}
        last_trace = [r for r in measured.get("trace", []) if r["step"] == max(steps, default=None)]
        if last_trace:
            result["trace"] = _plain({key: last_trace[0][key] for key in ("step", "trace", "standard_error")})
    runs.update_summary(run.path, **result)
    return result


CURVATURE_TABLES = {"sharpness": (SHARPNESS_SCHEMA, ["step", "source", "rank"]),
                    "trace": (TRACE_SCHEMA, ["step", "source"]),
                    "density": (DENSITY_SCHEMA, ["step", "source", "probe", "node"])}


def curvature_at_checkpoint(run: runs.Run, step: int, measures: dict[str, dict[str, Any]],
                            n_batches: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Rebuild the run's model at ``checkpoints/step_N`` once and take each of ``measures``
    (``sharpness``, ``trace``, ``density`` -> options of ``measure_<name>``): rows per table."""
    from dynamics.data import load_task
    from dynamics.models import build_model, load_tokenizer

    cfg = runs.stored_config(run.path).resolved()
    previous_threads = torch.get_num_threads()
    if cfg.threads:  # as in training: the run's --threads, restored afterwards
        torch.set_num_threads(cfg.threads)
    try:
        task = load_task(cfg, load_tokenizer(cfg))
        model = build_model(cfg, num_labels=len(task.label_names) or None)
        runs.load_weights(model, runs.checkpoint_dir(run.path, step))
        device = next(model.parameters()).device
        measure = {"sharpness": measure_sharpness, "trace": measure_trace, "density": measure_density}
        return {name: measure[name](model, task, cfg, device, n_batches=n_batches, step=step, source="checkpoint",
                                    seed=cfg.seed, **options)
                for name, options in measures.items()}
    finally:
        torch.set_num_threads(previous_threads)


def _replace_checkpoint_rows(run: runs.Run, table: str, steps: list[int], rows: list[dict[str, Any]]) -> None:
    """Write ``<table>.parquet`` with ``rows`` in place of the checkpoint rows of ``steps``."""
    schema, order = CURVATURE_TABLES[table]
    existing = getattr(run, table)
    keep = existing[~((existing["source"] == "checkpoint") & existing["step"].isin(steps))]
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


def analyze_paths(paths: Sequence[str | Path], **options: Any) -> pd.DataFrame:
    """Analyse every run folder named or found (recursively) under ``paths``; one row per run."""
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
        result = analyze_run(run_dir, **options)
        phases, sharp = result["phases"], result.get("sharpness", {})
        rows.append({"run_id": run_dir.name, "double_descent": phases["has_double_descent"],
                     "episodes": phases["n_episodes"], "amplitude": phases["divergence_amplitude"],
                     "steps_lost": phases["steps_lost"], "spikes": phases["n_spikes"],
                     "sharpness_step": sharp.get("step"), "top_eigenvalue": (sharp.get("eigenvalues") or [None])[0],
                     **({"trace": result["trace"]["trace"]} if "trace" in result else {})})
    return pd.DataFrame(rows)
