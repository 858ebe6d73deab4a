"""What each method costs (paper Table 3): trainable parameters, peak memory and time per step,
each relative to LoRA at the same setting. Pure: frames in, a frame out.

``dynamics figures`` draws it (``cost``) from run folders; the study report tabulates it from its
ledger, whose rows already hold each run's median step time and peak memory.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dynamics.analysis.methods import comparable_runs, method_sort_key

COST_COLUMNS = ("trainable_params", "peak_mem_mb", "step_time_s")
OVER_SEEDS = ("mean", "median")


def per_run_cost(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per run (index ``run_id``): ``step_time_s``, the median wall seconds of an optimizer step
    (forward/backward + optimizer, so one-off costs such as the first step do not count), and
    ``peak_mem_mb``, the largest peak memory logged (MB: CUDA allocation on GPU, resident set on
    CPU), from ``load_metrics`` rows."""
    return metrics.groupby("run_id").agg(step_time_s=("step_time_s", "median"), peak_mem_mb=("peak_mem_mb", "max"))


def cost_table(runs: pd.DataFrame, metrics: pd.DataFrame | None = None, over_seeds: str = "mean") -> pd.DataFrame:
    """One row per (task, method) at the setting :func:`comparable_runs` picks: ``runs`` (seeds),
    ``trainable_params``, ``peak_mem_mb``, ``step_time_s`` and ``adapter_init_s`` (the one-off
    set-up before step 1, LoRA-GA's gradient estimate and SVDs; NaN for adapters without one),
    aggregated over seeds by ``over_seeds`` (``mean`` or ``median``), and ``<column>_vs_lora``,
    each divided by LoRA's.

    The per-run cost comes from ``metrics`` (:func:`per_run_cost`) when given, else from the
    ``step_time_s`` / ``peak_mem_mb`` columns of ``runs`` (a ledger that stores them). A task
    without a LoRA run at the setting is left out; none at all gives an empty frame.
    """
    if over_seeds not in OVER_SEEDS:
        raise ValueError(f"over_seeds={over_seeds!r}: must be one of {', '.join(OVER_SEEDS)}")
    chosen = comparable_runs(runs, sorted(runs["method"].unique()))
    if metrics is not None:
        chosen = chosen.drop(columns=["step_time_s", "peak_mem_mb"], errors="ignore").join(
            per_run_cost(metrics), on="run_id")
    init_s = pd.to_numeric(chosen["adapter_init_s"], errors="coerce") if "adapter_init_s" in chosen else np.nan
    chosen = chosen.assign(adapter_init_s=init_s)
    if "trainable_params" not in chosen:
        chosen = chosen.assign(trainable_params=np.nan)
    table = chosen.groupby(["task", "method"], as_index=False).agg(
        rank=("rank", "first"), lr=("lr", "first"), runs=("run_id", "size"),
        **{column: (column, over_seeds) for column in (*COST_COLUMNS, "adapter_init_s")})
    parts = []
    for _, of_task in table.groupby("task"):
        lora = of_task[of_task["method"] == "lora"]
        if lora.empty:
            continue
        parts.append(of_task.assign(**{f"{column}_vs_lora": of_task[column] / float(lora[column].iloc[0])
                                       for column in COST_COLUMNS}))
    if not parts:
        return table.iloc[:0]
    return pd.concat(parts, ignore_index=True).sort_values(
        ["task", "method"], key=lambda col: col.map(method_sort_key) if col.name == "method" else col,
        ignore_index=True)
