"""Run folders written directly (no training): seeded synthetic loss curves with planted divergences,
so figure tests know what each figure must show. Same files and schemas as a trained run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynamics.analysis.synthetic import make_curve
from dynamics.config import RunConfig
from dynamics.files import write_json
from dynamics.runs.logs import (
    DENSITY_SCHEMA,
    EVAL_SCHEMA,
    LAYERS_SCHEMA,
    METRICS_SCHEMA,
    SHARPNESS_SCHEMA,
    TRACE_SCHEMA,
)

LAYERS = [f"base_model.model.model.layers.{i}.self_attn.{name}" for i in range(2) for name in ("q_proj", "v_proj")]


def write_fake_run(root: Path, *, method: str = "lora", rank: int = 8, lr: float = 5e-4, seed: int = 0,
                   kind: str = "decay", steps: int = 200, task: str = "tiny", status: str = "completed",
                   eval_metric: float = 0.1, eval_loss: float = 1.0, trainable_params: int | None = None,
                   step_time_s: float = 1.0, peak_mem_mb: float = 1000.0, top_eigenvalue: float | None = None,
                   sharpness_over_training: bool = False, density_center: float | None = None,
                   hessian_trace: float | None = None, loss: np.ndarray | None = None) -> Path:
    """One run folder under ``root``; ``kind`` is a :func:`make_curve` kind (``bump`` = a double
    descent), or ``loss`` the curve itself (``steps`` points). Returns its path."""
    model = "tiny-llama" if task == "tiny" else "smollm2-135m"
    cfg = RunConfig.from_dict(dict(model=model, task=task, method=method, rank=rank, alpha=rank, lr=lr, seed=seed,
                                   steps=steps, runs_dir=str(root), progress=False))
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True)
    params = trainable_params if trainable_params is not None else 1000 * rank
    write_json(run_dir / "config.json", {"config": cfg.to_dict(),
                                                "runtime": {"device": "cpu", "trainable_params": params}})
    if loss is None:
        loss, _ = make_curve(kind, n_steps=steps, noise=0.02, seed=seed + 7 * rank)
    step = np.arange(1, steps + 1)
    perturbed = "+mgpo" in method
    columns = {name: np.full(steps, np.nan) for name in METRICS_SCHEMA.names}
    columns.update(step=step, epoch=step / 100.0, tokens=step * 1000, loss=loss, lr=np.full(steps, lr),
                   grad_norm=np.linspace(2.0, 0.5, steps), momentum_norm=np.linspace(1.0, 0.2, steps),
                   param_norm=np.full(steps, 10.0), update_norm=np.full(steps, 0.01),
                   step_time_s=np.full(steps, step_time_s), peak_mem_mb=np.full(steps, peak_mem_mb))
    if perturbed:
        columns.update(loss_clean=np.where(step % 10 == 0, loss * 0.98, np.nan),
                       grad_ema=np.linspace(0.05, 0.2, steps), apn_scale=np.minimum(1 / np.linspace(0.05, 0.2, steps),
                                                                                    10.0),
                       perturb_norm=np.linspace(0.5, 0.1, steps))
    columns["tokens"] = columns["tokens"].astype(np.int64)
    pq.write_table(pa.Table.from_pydict(columns, schema=METRICS_SCHEMA), run_dir / "metrics.parquet")
    if perturbed:
        layer_steps = step[::10]
        rows = {"step": np.repeat(layer_steps, len(LAYERS)), "layer": LAYERS * len(layer_steps)}
        n = len(rows["step"])
        rows.update(grad_norm=np.full(n, 0.1), grad_ema=np.full(n, 0.1),
                    apn_scale=np.tile(np.arange(1, len(LAYERS) + 1, dtype=float), len(layer_steps)),
                    perturb_norm=np.full(n, 0.05))
        pq.write_table(pa.Table.from_pydict(rows, schema=LAYERS_SCHEMA), run_dir / "layers.parquet")
    metric = {"exact_match": eval_metric} if task != "bbc" else {"accuracy": eval_metric, "macro_f1": eval_metric}
    eval_row = {"step": [steps], "split": ["eval"], "loss": [eval_loss], "n_examples": [64], "eval_time_s": [1.0],
                **{k: [v] for k, v in metric.items()}}
    pq.write_table(pa.Table.from_pydict({name: eval_row.get(name, [None]) for name in EVAL_SCHEMA.names},
                                        schema=EVAL_SCHEMA), run_dir / "eval.parquet")
    summary = {"status": status, "steps_done": steps, "steps_total": steps, "final_loss": float(loss[-1]),
               "final_eval": {"step": steps, "loss": eval_loss, **metric}, "wall_time_s": steps * step_time_s}
    if top_eigenvalue is not None:
        sharp_steps = [steps // 4, steps // 2, steps] if sharpness_over_training else [steps]
        sources = ["training", "training", "checkpoint"] if sharpness_over_training else ["checkpoint"]
        rows = {"step": sharp_steps, "rank": [1] * len(sharp_steps),
                "eigenvalue": [top_eigenvalue * (0.5 if s != steps else 1.0) for s in sharp_steps],
                "residual": [1e-4] * len(sharp_steps), "converged": [True] * len(sharp_steps),
                "n_hvp": [20] * len(sharp_steps), "n_examples": [8] * len(sharp_steps),
                "seconds": [1.0] * len(sharp_steps), "source": sources, "split": ["eval"] * len(sharp_steps),
                "loss": [0.5] * len(sharp_steps)}
        # and the training loss's at the final checkpoint (analyze --split train): 3x the eval value
        rows = {name: [*values, TRAIN_ROW.get(name, values[-1])] for name, values in rows.items()}
        rows["eigenvalue"][-1] *= 3
        pq.write_table(pa.Table.from_pydict(rows, schema=SHARPNESS_SCHEMA), run_dir / "sharpness.parquet")
        summary["sharpness"] = {"step": steps, "eigenvalues": [top_eigenvalue], "converged": True}
    if hessian_trace is not None:
        rows = {"step": [steps], "trace": [hessian_trace], "standard_error": [0.05 * hessian_trace], "n_hvp": [30],
                "converged": [False], "n_examples": [8], "seconds": [1.0], "source": ["checkpoint"],
                "split": ["eval"]}
        rows = {name: [*values, TRAIN_ROW.get(name, values[-1])] for name, values in rows.items()}
        rows["trace"][-1] *= 3
        pq.write_table(pa.Table.from_pydict(rows, schema=TRACE_SCHEMA), run_dir / "trace.parquet")
        summary["trace"] = {"step": steps, "trace": hessian_trace, "standard_error": 0.05 * hessian_trace}
    if density_center is not None:
        rng = np.random.default_rng(seed)
        nodes = np.concatenate([rng.normal(0.0, 0.05, 8), [density_center], rng.normal(0, 0.05, 8),
                                [density_center * 0.9]])
        weights = np.concatenate([np.full(8, 0.9 / 8), [0.1], np.full(8, 0.9 / 8), [0.1]]) / 2
        rows = {"step": [steps] * 18, "probe": [0] * 9 + [1] * 9, "node": nodes, "weight": weights,
                "n_hvp": [18] * 18, "n_examples": [8] * 18, "source": ["checkpoint"] * 18,
                "split": ["eval"] * 18}
        pq.write_table(pa.Table.from_pydict(rows, schema=DENSITY_SCHEMA), run_dir / "density.parquet")
    write_json(run_dir / "summary.json", summary)
    return run_dir


TRAIN_ROW = {"split": "train", "source": "checkpoint"}  # how a train-split curvature row differs


def write_fake_grid(root: Path) -> Path:
    """A small study: lora and lora+mgpo at ranks 8/32/128 x lrs 1e-4/5e-4/1e-3 (LoRA at high rank and
    lr shows a double descent, MGPO a smooth curve), 2 seeds at one cell, full at two lrs, the
    ablation and noise methods at r = 8, lr 5e-4, curvature on some runs (the trace at r = 32, lr 5e-4
    only, where seed 1's curvature is twice seed 0's)."""
    for method in ("lora", "lora+mgpo"):
        for rank in (8, 32, 128):
            for lr in (1e-4, 5e-4, 1e-3):
                kind = "bump" if method == "lora" and rank >= 32 and lr >= 5e-4 else "decay"
                if method == "lora" and rank == 128 and lr == 1e-3:
                    kind = "no_recovery"
                seeds = (0, 1) if (rank, lr) == (32, 5e-4) else (0,)
                for seed in seeds:
                    top_eigenvalue = (2.0 if method == "lora" else 1.0) * rank ** 0.5 / lr ** 0.1 * (1 + seed)
                    write_fake_run(root, method=method, rank=rank, lr=lr, seed=seed, kind=kind,
                                   eval_metric=0.2 if method == "lora" else 0.25,
                                   top_eigenvalue=top_eigenvalue,
                                   hessian_trace=10 * top_eigenvalue if (rank, lr) == (32, 5e-4) else None,
                                   sharpness_over_training=(rank, lr) == (8, 5e-4),
                                   density_center=(30.0 if method == "lora" else 15.0) if (rank, lr) == (32, 5e-4)
                                   else None,
                                   step_time_s=1.0 if method == "lora" else 1.15,
                                   peak_mem_mb=1000.0 if method == "lora" else 1040.0)
    for lr in (5e-4, 1e-4):
        write_fake_run(root, method="full", rank=8, lr=lr, kind="decay", eval_metric=0.3, trainable_params=135_000_000,
                       step_time_s=2.0, peak_mem_mb=3000.0)
    for method, score in (("lora+mgpo-noapn", 0.22), ("lora+noise", 0.21), ("lora+sam", 0.24)):
        write_fake_run(root, method=method, rank=8, lr=5e-4, kind="decay", eval_metric=score,
                       step_time_s=2.0 if method == "lora+sam" else 1.1)
    return root
