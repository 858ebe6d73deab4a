"""Run-level analysis: a run folder in, ``phases.parquet`` and ``sharpness.parquet`` out.

The pure functions live in ``dynamics.analysis`` (``detect_phases``, ``phase_summary``,
``hessian_eigenvalues``); this module reads a run, rebuilds its model at a checkpoint, feeds them,
and writes the results beside the run's other files, plus a ``phases`` / ``sharpness`` entry in
``summary.json`` so ``dynamics runs`` can show them without recomputing.

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
from dynamics.metrics import PHASES_SCHEMA, SHARPNESS_SCHEMA


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


def measure_sharpness(model: nn.Module, task: TaskData, cfg: RunConfig, device: torch.device, *, k: int = 1,
                      n_batches: int = 1, tol: float = 1e-3, max_iter: int = 100, seed: int = 0,
                      step: int, source: str) -> list[dict[str, Any]]:
    """Top-k Hessian eigenvalues at the model's current weights, as ``sharpness.parquet`` rows."""
    from dynamics.analysis import hessian_eigenvalues, model_loss_fn
    from dynamics.data import n_loss_terms
    from dynamics.loop import loss_sum

    batches = sharpness_batches(task, cfg, n_batches, device)
    total_terms = sum(n_loss_terms(b, task.kind) for b in batches)

    def batch_share(model: nn.Module, batch) -> torch.Tensor:  # sums to the eval mean over all batches
        return loss_sum(model, batch, task.kind) * len(batches) / total_terms

    params = [p for p in model.parameters() if p.requires_grad]
    if k > sum(p.numel() for p in params):
        raise ConfigError(f"--k {k}: larger than the {sum(p.numel() for p in params)} trainable parameters")
    started = time.perf_counter()
    with eager_attention(model, device):
        result = hessian_eigenvalues(model_loss_fn(model, batches, batch_share), params, k=k, tol=tol,
                                     max_iter=max_iter, seed=seed)
    seconds = time.perf_counter() - started
    return [{"step": step, "rank": i + 1, "eigenvalue": float(value), "residual": float(result.residuals[i]),
             "converged": bool(result.converged), "n_hvp": int(result.n_hvp),
             "n_examples": sum(int(b["input_ids"].shape[0]) for b in batches), "seconds": seconds, "source": source}
            for i, value in enumerate(result.eigenvalues)]


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
                k: int = 1, n_batches: int = 1, tol: float = 1e-3, max_iter: int = 100,
                **thresholds: float) -> dict[str, Any]:
    """Phases of the run's loss curve and Hessian sharpness at its checkpoints; writes
    ``phases.parquet`` / ``sharpness.parquet`` and returns the summary written to summary.json."""
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

    if sharpness:
        steps = select_checkpoints(run, checkpoints)
        rows = [row for step in steps for row in sharpness_at_checkpoint(run, step, k=k, n_batches=n_batches,
                                                                          tol=tol, max_iter=max_iter)]
        existing = run_sharpness(run.path)
        keep = existing[~((existing["source"] == "checkpoint") & existing["step"].isin(steps))]
        table = pd.concat([keep, pd.DataFrame(rows)], ignore_index=True) if len(keep) else pd.DataFrame(rows)
        table = table.sort_values(["step", "source", "rank"], ignore_index=True)
        write_parquet(run.path / "sharpness.parquet", pa.Table.from_pandas(table, schema=SHARPNESS_SCHEMA,
                                                                            preserve_index=False))
        if rows:
            last = [r for r in rows if r["step"] == max(steps)]
            result["sharpness"] = {"step": max(steps), "eigenvalues": [r["eigenvalue"] for r in last],
                                   "converged": all(r["converged"] for r in last)}
    runs.update_summary(run.path, **result)
    return result


def sharpness_at_checkpoint(run: runs.Run, step: int, **options: Any) -> list[dict[str, Any]]:
    from dynamics.data import load_task
    from dynamics.models import build_model, load_tokenizer

    cfg = runs.stored_config(run.path).resolved()
    task = load_task(cfg, load_tokenizer(cfg))
    model = build_model(cfg, num_labels=len(task.label_names) or None)
    runs.load_weights(model, runs.checkpoint_dir(run.path, step))
    device = next(model.parameters()).device
    return measure_sharpness(model, task, cfg, device, step=step, source="checkpoint", seed=cfg.seed, **options)


def run_sharpness(path: Path) -> pd.DataFrame:
    file = Path(path) / "sharpness.parquet"
    return pd.read_parquet(file) if file.exists() else SHARPNESS_SCHEMA.empty_table().to_pandas()


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
                     "sharpness_step": sharp.get("step"), "top_eigenvalue": (sharp.get("eigenvalues") or [None])[0]})
    return pd.DataFrame(rows)
