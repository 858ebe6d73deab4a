"""The run folder's tables: one fixed pyarrow schema per parquet file, and ``ParquetLog``, which
writes rows of one schema while the run goes on.

Each log keeps its rows in memory and rewrites its file on ``flush()`` atomically
(``files.write_parquet``): a reader (``pandas.read_parquet`` from a notebook, the
grid's progress line) sees the previous complete file or the new one, never a torn one. Rewriting
is O(rows) but cheap next to a training step: 10,000 steps x 15 columns is well under 1 MB.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from dynamics.files import write_parquet

# metrics.parquet, one row per optimizer step (docs/design.md). Units: loss in nats per target token
# (causal LM) or per example (classification); norms are global L2 norms over trainable
# parameters; step_time_s wall seconds of forward/backward + optimizer step; peak_mem_mb the peak
# CUDA allocation during the step on GPU, the process's peak resident set during the step on CPU.
METRICS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),  # optimizer steps done, 1-based
        ("epoch", pa.float64()),  # training examples seen / training set size
        ("tokens", pa.int64()),  # non-padding input tokens seen so far
        ("loss", pa.float64()),  # loss the gradient was taken at (perturbed point under MGPO/SAM)
        ("loss_clean", pa.float64()),  # loss at the unperturbed weights
        ("lr", pa.float64()),  # learning rate used by this step
        ("grad_norm", pa.float64()),  # before clipping
        ("param_norm", pa.float64()),  # after the step
        ("update_norm", pa.float64()),  # ||theta_t - theta_{t-1}||
        ("momentum_norm", pa.float64()),  # ||AdamW exp_avg|| after the step
        ("grad_ema", pa.float64()),  # APN: mean over layers of g_ema (eq. 8)
        ("apn_scale", pa.float64()),  # APN: mean over layers of c = min(1/g_ema, cap)
        ("perturb_norm", pa.float64()),  # global norm of the weight perturbation applied
        ("step_time_s", pa.float64()),
        ("peak_mem_mb", pa.float64()),
        ("tokens_per_s", pa.float64()),  # non-padding input tokens of the step (all processes) / step_time_s
    ]
)

LAYERS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("layer", pa.string()),  # module name, e.g. base_model.model.model.layers.0.self_attn.q_proj
        ("grad_norm", pa.float64()),  # norm of this layer's trainable-parameter gradient
        ("grad_ema", pa.float64()),
        ("apn_scale", pa.float64()),
        ("perturb_norm", pa.float64()),
    ]
)

EVAL_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("split", pa.string()),  # "eval"
        ("loss", pa.float64()),
        ("accuracy", pa.float64()),  # classification
        ("macro_f1", pa.float64()),  # classification
        ("exact_match", pa.float64()),  # causal LM, greedy decoding of n_eval_generate problems
        ("n_examples", pa.int64()),
        ("eval_time_s", pa.float64()),
    ]
)

# Written by ``dynamics analyze`` (phases, sharpness) and by ``--sharpness-every`` during training.
PHASES_SCHEMA = pa.schema([
    ("phase", pa.string()),  # converge, diverge, restabilise
    ("start_step", pa.int64()),
    ("end_step", pa.int64()),
    ("start_loss", pa.float64()),
    ("end_loss", pa.float64()),
    ("curve", pa.string()),  # the metrics column analysed: loss or loss_clean
])

SHARPNESS_SCHEMA = pa.schema([
    ("step", pa.int64()),  # optimizer steps done when measured
    ("rank", pa.int64()),  # 1 for the top eigenvalue, 2 for the next, ...
    ("eigenvalue", pa.float64()),  # of the Hessian of the split's loss (nats per target token)
    ("residual", pa.float64()),  # Ritz residual ||H y - theta y||
    ("converged", pa.bool_()),
    ("n_hvp", pa.int64()),  # Hessian-vector products used
    ("n_examples", pa.int64()),  # examples of the split in the loss
    ("seconds", pa.float64()),
    ("source", pa.string()),  # "checkpoint" (dynamics analyze) or "training" (--sharpness-every)
    ("split", pa.string()),  # whose loss: "eval" (held-out examples) or "train" (analyze --split train)
    ("loss", pa.float64()),  # that loss at the weights measured (nats per target token): a Hessian's size
                             # follows the loss level (near a zero cross-entropy every curvature is small)
])


# Written by ``dynamics analyze --trace`` (Hutchinson) and ``--density`` (stochastic Lanczos quadrature).
TRACE_SCHEMA = pa.schema([
    ("step", pa.int64()),  # optimizer steps done at the checkpoint
    ("trace", pa.float64()),  # Hutchinson estimate of tr(H), H of the split's loss (nats per target token)
    ("standard_error", pa.float64()),  # of the estimate; NaN with one sample
    ("n_hvp", pa.int64()),  # one per Rademacher sample
    ("converged", pa.bool_()),  # standard_error <= tol * |trace|
    ("n_examples", pa.int64()),
    ("seconds", pa.float64()),
    ("source", pa.string()),  # "checkpoint"
    ("split", pa.string()),  # "eval" or "train", as in sharpness.parquet
])

DENSITY_SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("probe", pa.int64()),  # which random start vector (0 .. n_runs-1) the node came from
    ("node", pa.float64()),  # a Ritz value (eigenvalue units)
    ("weight", pa.float64()),  # its quadrature weight; the weights of one step sum to 1
    ("n_hvp", pa.int64()),  # HVPs of the whole density at this step
    ("n_examples", pa.int64()),
    ("source", pa.string()),  # "checkpoint"
    ("split", pa.string()),  # "eval" or "train", as in sharpness.parquet
])

# Columns added to a table after run folders with the older layout were written: a file without
# one reads as if it held the value given here (the only value the older code could write).
ADDED_COLUMNS = {"sharpness.parquet": {"split": "eval", "loss": math.nan}, "trace.parquet": {"split": "eval"},
                 "density.parquet": {"split": "eval"}}


# Written by ``dynamics analyze --exact-match N``: one row per held-out problem greedily decoded at a
# checkpoint, so a reader can see what the model wrote, not only how often it was right.
GENERATIONS_SCHEMA = pa.schema([
    ("step", pa.int64()),  # optimizer steps done at the checkpoint
    ("problem", pa.int64()),  # position in the task's eval set (the first N are decoded)
    ("reference", pa.string()),  # the answer it is scored against (gsm: the number after "####")
    ("text", pa.string()),  # the decoded continuation of the prompt, special tokens dropped
    ("correct", pa.bool_()),  # the task's own scoring (gsm: the number after the first "####" matches)
    ("n_new_tokens", pa.int64()),  # tokens generated, EOS included
    ("stopped", pa.bool_()),  # ended with EOS (False: cut at max_new_tokens)
    ("source", pa.string()),  # "checkpoint"
])

class ParquetLog:
    """Rows of one schema, flushed atomically to ``path``.

    Rows are dicts keyed by column name; missing keys are written as null, unknown keys raise.
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, flush_every_s: float = 5.0) -> None:
        self.path = Path(path)
        self.schema = schema
        self.flush_every_s = flush_every_s
        self._columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        self._dirty = False
        self._last_flush = time.monotonic()

    def __len__(self) -> int:
        return len(self._columns["step"])

    def append(self, row: Mapping[str, Any]) -> None:
        unknown = set(row) - set(self._columns)
        if unknown:
            raise KeyError(f"{self.path.name}: unknown columns {sorted(unknown)}")
        for name, values in self._columns.items():
            values.append(row.get(name))
        self._dirty = True
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def load(self, keep_through_step: int) -> None:
        """Read the rows already on disk, keeping those with ``step <= keep_through_step``
        (rows after the checkpoint a run resumes from are recomputed, never duplicated)."""
        self._columns = {name: [] for name in self.schema.names}
        if self.path.exists():
            table = pq.read_table(self.path, schema=self.schema)
            for row in table.to_pylist():
                if row["step"] <= keep_through_step:
                    for name, values in self._columns.items():
                        values.append(row[name])
        self._dirty = True

    def table(self) -> pa.Table:
        return pa.table(self._columns, schema=self.schema)

    def flush(self) -> None:
        if not self._dirty:
            return
        write_parquet(self.path, self.table())
        self._dirty = False
        self._last_flush = time.monotonic()


class RunLogs:
    """The four tables a training run writes as it goes: ``metrics``, ``layers``, ``evals`` and
    ``sharpness`` (``--sharpness-every``), each a ``ParquetLog`` in ``run_dir``."""

    def __init__(self, run_dir: str | os.PathLike, flush_every_s: float = 5.0) -> None:
        run_dir = Path(run_dir)
        self.metrics = ParquetLog(run_dir / "metrics.parquet", METRICS_SCHEMA, flush_every_s)
        self.layers = ParquetLog(run_dir / "layers.parquet", LAYERS_SCHEMA, flush_every_s)
        self.evals = ParquetLog(run_dir / "eval.parquet", EVAL_SCHEMA, flush_every_s)
        self.sharpness = ParquetLog(run_dir / "sharpness.parquet", SHARPNESS_SCHEMA, flush_every_s)

    def all(self) -> tuple[ParquetLog, ...]:
        return self.metrics, self.layers, self.evals, self.sharpness

    def load(self, keep_through_step: int) -> None:
        """Rows already on disk up to ``keep_through_step`` (a resumed run's checkpoint)."""
        for log in self.all():
            log.load(keep_through_step)

    def flush(self) -> None:
        for log in self.all():
            log.flush()

    def summary_numbers(self) -> dict[str, Any]:
        """``final_loss``, ``final_loss_clean``, ``final_eval`` and ``best_eval`` (lowest finite
        eval loss) for summary.json, from the rows logged so far."""
        numbers: dict[str, Any] = {}
        if len(self.metrics):
            last = self.metrics.table().slice(len(self.metrics) - 1).to_pylist()[0]
            numbers.update(final_loss=last["loss"], final_loss_clean=last["loss_clean"])
        if len(self.evals):
            rows = self.evals.table().to_pylist()
            keep = ("step", "loss", "accuracy", "macro_f1", "exact_match")
            numbers["final_eval"] = {k: rows[-1][k] for k in keep if rows[-1][k] is not None}
            best = min(rows, key=_finite_loss_or_inf)
            numbers["best_eval"] = {k: best[k] for k in keep if best[k] is not None}
        return numbers


def _finite_loss_or_inf(row: Mapping[str, Any]) -> float:
    loss = row["loss"]
    return loss if loss is not None and math.isfinite(loss) else math.inf
