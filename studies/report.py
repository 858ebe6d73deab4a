"""Everything docs/results.md quotes, re-derived from the study's run folders.

    python studies/report.py runs/study                      # bbc: tables + CSVs + figures
    python studies/report.py runs/study --no-figures
    python studies/report.py runs/study_gsm --study gsm      # the SmolLM2 + gsm half

Writes ``docs/study/study_runs.csv`` (one row per run: settings, outcome, phase numbers, eval
metrics, cost, curvature, the steps of every rise, LoRA-MGPO's APN statistics),
``docs/study/tables.md`` (the seed-aggregated tables of docs/results.md, mean ± sample standard
deviation over seeds, and the paired LoRA-MGPO - LoRA differences per seed) and, unless
``--no-figures``, the figures under ``docs/figures/study/`` by ``dynamics figures`` on the subset of
runs each one needs (each folder's index.md lists the run ids and the command). The runs come from
the grid files beside this script.

The per-run CSV is the study's ledger: the study spans sessions and machines, and run folders do
not travel (they stay out of git). It holds each run id's first measurement; a row whose run is
not on disk is kept as it was measured, so a report over a few new runs never drops the others.
A run re-run in a later session (same settings and seed, started at another time) does not
replace its row: it goes to ``docs/study/study_reruns.csv`` beside it (every re-run of it, one row
each, told apart by ``started_at``), and the tables show both (runs are bit-for-bit repeatable on
one machine and software stack, not across them). Every
table is computed from the ledgers. A figure needs the run folders (curves): a figure set whose
runs are not all on disk is left as committed, said in one line; the phase map needs only the
ledger's columns and is always redrawn from all of it. ``--replace``: the runs on disk replace
the rows of their ids (a study re-run whole on another machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

import dynamics
from dynamics import figures, runs
from dynamics.analysis import blowup, cost_table, run_outcome
from dynamics.config import RunConfig
from dynamics.data import gsm
from dynamics.figure_set import Drawn, make_figures, write_figure, write_index

ROOT = Path(__file__).resolve().parents[1]  # the repository (studies/report.py)
STUDY = ROOT / "docs" / "study"
FIGURES_OUT = ROOT / "docs" / "figures" / "study"
# each half's shared settings (the grids under studies/ named *_bbc / *_gsm) and its outputs
STUDIES = {
    "bbc": {"settings": {"model": "minilm-l6", "task": "bbc", "steps": 300, "batch_size": 8, "seq_len": 64},
            "runs_csv": "study_runs.csv", "reruns_csv": "study_reruns.csv", "tables_md": "tables.md",
            "figures": FIGURES_OUT, "rho": 0.05},
    "gsm": {"settings": {"model": "smollm2-135m", "task": "gsm", "steps": 200, "batch_size": 4, "seq_len": 128},
            "runs_csv": "study_runs_gsm.csv", "reruns_csv": "study_reruns_gsm.csv", "tables_md": "tables_gsm.md",
            "figures": FIGURES_OUT / "gsm",
            "rho": 0.01},
}
BBC_METRICS = (("eval acc", "eval_metric"), ("eval macro-F1", "eval_macro_f1"))
# gsm: the held-out answer loss, exact match (the number after "####", greedy decoding by
# `dynamics analyze --exact-match`; the run table's eval_metric) and the lenient reading (the last number
# written) where it was measured
GSM_METRICS = (("eval loss", "eval_loss"), ("exact match", "eval_metric"), ("EM, last number", "em_last_number"))
DEFAULT_CAP = RunConfig.__dataclass_fields__["apn_cap"].default  # MGPO's for both tasks; rho is per task (STUDIES)
LEARNED = ("smooth", "double descent")  # outcomes of runs that learned and kept it
RUN_COLUMNS = ["run_id", "method", "rank", "alpha", "lr", "seed", "rho", "apn_cap", "status", "outcome", "final_loss",
               "eval_loss", "eval_metric", "eval_macro_f1", "double_descent", "rise_of_start", "divergence_amplitude",
               "steps_lost", "n_episodes", "loss_drop", "final_drop", "early_rise", "rose_from_start",
               "top_eigenvalue", "step_time_s", "peak_mem_mb",
               "wall_time_s",
               # added with the ledger (rows of earlier runs carry what their committed tables showed)
               "descended", "rises", "hessian_trace", "hessian_trace_se", "curvature_examples",
               "apn_cap_pct_first50", "apn_cap_pct", "apn_scale_median", "apn_layer_cap_pct", "perturb_norm_median",
               # how a run blew up (smoothed training loss; added for the gsm collapses, empty for earlier runs)
               "min_loss", "min_step", "above_start_step", "peak_loss", "peak_step", "below_start_step",
               "doubled_step",
               # gsm exact match by `dynamics analyze --exact-match` (generations.parquet; empty where not measured):
               # problems decoded, the share that wrote "#### N", the share whose last number is the answer
               "em_problems", "em_answered", "em_last_number",
               # curvature of the training loss (`dynamics analyze --split train`; empty where not measured)
               "top_eigenvalue_train", "hessian_trace_train", "hessian_trace_train_se", "curvature_examples_train",
               # the loss on the examples whose Hessian was measured (fifth session on; eval and train)
               "curvature_loss", "curvature_loss_train",
               # where and with what the run was made (unknown for runs of the first sessions)
               "started_at", "versions", "cpu"]
# what a re-run is checked against its first run on (bit-for-bit on one machine; across machines
# float-level differences can grow into another trajectory, docs/results.md section 8)
REPRODUCED = ("final_loss", "eval_loss", "eval_metric")


def study_runs(runs_dir: Path, study: str = "bbc") -> pd.DataFrame:
    """The completed runs of one half of the study (``STUDIES``) under ``runs_dir``: their
    load_runs row, outcome and the numbers read from their files (``_from_files``)."""
    table = dynamics.load_runs(runs_dir)
    table = table[table["status"].isin(["completed", "diverged"])]
    for field, value in STUDIES[study]["settings"].items():
        table = table[table[field] == value] if field in table else table.iloc[:0]
    if table.empty:
        return pd.DataFrame(columns=[*RUN_COLUMNS, "path", "on_disk"])
    table = table.assign(rank=lambda t: t["rank"].where(t["method"] != "full", 0),
                         alpha=lambda t: t["alpha"].where(t["method"] != "full", 0),
                         rho=lambda t: t["rho"].fillna(STUDIES[study]["rho"]),
                         outcome=lambda t: t.apply(run_outcome, axis=1))
    measured = pd.DataFrame([_from_files(dynamics.load_run(path), cap)
                             for path, cap in zip(table["path"], table["apn_cap"], strict=True)], index=table.index)
    return _sorted(pd.concat([table, measured], axis=1).assign(on_disk=True))


def _from_files(run, apn_cap: float) -> dict:
    """The per-run numbers read from a run's files rather than its summary: cost (median step
    time, peak memory), where its rises start and peak, curvature details, and for LoRA-MGPO how
    long the APN factor c = min(1 / g_ema, apn_cap) sat at its cap (``apn_scale`` of
    metrics.parquet is the mean over layers; layers.parquet has the per-layer factor every
    ``layer_metrics_every`` steps) and the median perturbation norm (global, over layers)."""
    metrics = run.metrics
    diverge = run.phases[run.phases["phase"] == "diverge"]
    top, trace = _final_curvature(run, "eval")
    top_train, trace_train = _final_curvature(run, "train")
    versions = run.info.get("versions") or {}
    cpu = run.info.get("cpu") or {}  # recorded from the study's third session on
    row = {"started_at": run.info.get("started_at"),
           "versions": " ".join(f"{name} {versions[name]}" for name in ("torch", "transformers", "peft")
                                if name in versions),
           "cpu": f"{cpu.get('model')} ({cpu.get('torch_capability')})" if cpu else None,
           "step_time_s": float(metrics["step_time_s"].median()), "peak_mem_mb": float(metrics["peak_mem_mb"].max()),
           "rises": " ".join(f"{int(a)}-{int(b)}" for a, b in zip(diverge["start_step"], diverge["end_step"],
                                                                  strict=True)),
           "hessian_trace_se": float(trace["standard_error"].iloc[0]) if len(trace) else np.nan,
           "curvature_examples": int(top["n_examples"].iloc[0]) if len(top) else np.nan,
           "hessian_trace_train_se": float(trace_train["standard_error"].iloc[0]) if len(trace_train) else np.nan,
           "curvature_examples_train": int(top_train["n_examples"].iloc[0]) if len(top_train) else np.nan,
           "curvature_loss": float(top["loss"].iloc[0]) if len(top) else np.nan,
           "curvature_loss_train": float(top_train["loss"].iloc[0]) if len(top_train) else np.nan,
           **blowup(metrics["loss"], metrics["step"]), **generation_numbers(run.generations)}
    scale = metrics["apn_scale"].dropna() if "apn_scale" in metrics else pd.Series(dtype=float)
    if len(scale):
        first = scale[metrics.loc[scale.index, "step"] <= 50]
        layers = run.layers
        per_layer = layers["apn_scale"].dropna() if layers is not None and "apn_scale" in layers else scale.iloc[:0]
        row.update(apn_cap_pct_first50=100 * np.isclose(first, apn_cap, rtol=1e-3).mean(),
                   apn_cap_pct=100 * np.isclose(scale, apn_cap, rtol=1e-3).mean(),
                   apn_scale_median=float(scale.median()),
                   apn_layer_cap_pct=100 * np.isclose(per_layer, apn_cap, rtol=1e-3).mean() if len(per_layer)
                   else np.nan,
                   perturb_norm_median=float(metrics["perturb_norm"].median()))
    return row


def _final_curvature(run, split: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The last measured top-eigenvalue row and trace row of ``split``'s loss (empty where none)."""
    sharpness, trace = run.sharpness, run.trace
    top = sharpness[(sharpness["rank"] == 1) & (sharpness["split"] == split)].sort_values("step").tail(1)
    return top, trace[trace["split"] == split].sort_values("step").tail(1)


def generation_numbers(generations: pd.DataFrame) -> dict:
    """From ``generations.parquet`` at its last step: problems decoded (``em_problems``), the share
    whose continuation wrote ``#### N`` (``em_answered``) and the share whose last number written
    is the answer (``em_last_number``, the lenient reading); NaN where none were decoded."""
    if generations.empty:
        return {"em_problems": np.nan, "em_answered": np.nan, "em_last_number": np.nan}
    last = generations[generations["step"] == generations["step"].max()]
    return {"em_problems": len(last),
            "em_answered": float(np.mean([gsm.final_number(text) is not None for text in last["text"]])),
            "em_last_number": float(np.mean([gsm.last_number(text) == reference
                                             for text, reference in zip(last["text"], last["reference"],
                                                                        strict=True)]))}


@dataclasses.dataclass
class Ledgers:
    """The study's runs as measured: ``first``, each run id's first measurement (the per-run CSV),
    and ``reruns``, every later run of a run id measured before (the re-runs CSV; a run id re-run
    in two sessions has two rows). ``on_disk``: the row's run folder is here (a re-run's first
    measurement is not)."""

    first: pd.DataFrame
    reruns: pd.DataFrame

    @property
    def latest(self) -> pd.DataFrame:
        """Each run id as last measured: its latest re-run where there is one, else its first run."""
        first = self.first[~self.first["run_id"].isin(self.reruns["run_id"])]
        return _sorted(pd.concat([first, _sorted(self.reruns).groupby("run_id").tail(1)], ignore_index=True))

    @property
    def first_reruns(self) -> pd.DataFrame:
        """Each re-run id's earliest re-run (bbc: the second session's, on the second machine)."""
        return _sorted(self.reruns).groupby("run_id").head(1).reset_index(drop=True)


def _start(table: pd.DataFrame) -> pd.Series | str:
    """``started_at`` as sortable text ('' for a hand-made table without it)."""
    return table["started_at"].astype(str) if "started_at" in table else ""


def ledgers(on_disk: pd.DataFrame, first_csv: Path, reruns_csv: Path, settings: dict, replace: bool = False,
            log=print) -> Ledgers:
    """The committed ledgers brought up to date with the runs on disk (``study_runs``).

    A run on disk whose id is not in the first ledger is a new row there. One that is, with the
    same ``started_at``, is that row's own folder (its row is refreshed: a later ``dynamics
    analyze`` shows). One that is, started at another time (another session, machine or library
    versions), is a re-run: the first ledger keeps its row, the re-runs ledger takes the run (in
    place of its own earlier row, beside re-runs of the id started at other times), and a re-run
    that does not reproduce its first run's ``REPRODUCED`` numbers is named in one line. With
    ``replace`` the runs on disk win everywhere (a study re-run whole elsewhere). Rows kept from a
    CSV have ``on_disk`` False, no ``path`` and the half's shared ``settings``; a kept row whose
    outcome is not what ``run_outcome`` makes of its numbers now is named in one line."""
    first, reruns = (_read_ledger(path, settings, log) for path in (first_csv, reruns_csv))
    known = first.set_index("run_id")
    started = known["started_at"].reindex(on_disk["run_id"]).to_numpy() if len(known) else np.full(len(on_disk), None)
    in_first = on_disk["run_id"].isin(known.index).to_numpy()
    same_folder = in_first & (on_disk["started_at"].astype(str).to_numpy() == started.astype(str))
    rerun = on_disk[in_first & ~same_folder & (not replace)]
    own = on_disk[~in_first | same_folder | replace]
    first = _sorted(pd.concat([first[~first["run_id"].isin(own["run_id"])], own], ignore_index=True))
    def made(table: pd.DataFrame) -> pd.Series:  # one run: its id and when it started
        return table["run_id"].astype(str) + " " + table["started_at"].astype(str)

    reruns = _sorted(pd.concat([reruns[~made(reruns).isin(made(rerun))], rerun], ignore_index=True))
    if len(rerun):
        reproduced = 0
        for _, again in rerun.iterrows():
            before = known.loc[again["run_id"]]
            differ = _differences(before, again)
            reproduced += not differ
            for column in differ:
                log(f"report: {again['run_id']}: re-run {column} {again[column]:.6g}, first run {before[column]:.6g}")
        log(f"report: {reproduced} of {len(rerun)} re-runs reproduce their first run's {', '.join(REPRODUCED)}")
    log(f"report: {len(on_disk)} runs on disk ({len(rerun)} re-runs of earlier runs); {len(first)} runs in "
        f"{_shown(first_csv)}, {len(reruns)} in {_shown(reruns_csv)}")
    return Ledgers(first, reruns)


def _read_ledger(path: Path, settings: dict, log) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=[*RUN_COLUMNS, "path", "on_disk"])
    # rises: "start-peak" pairs; empty (NaN once read) where the detector found none
    rows = pd.read_csv(path, dtype={"rises": str, "started_at": str, "versions": str})
    rows = rows.reindex(columns=list(dict.fromkeys([*rows.columns, *RUN_COLUMNS])))  # older ledgers lack some
    rows = rows.assign(on_disk=False, path=None, **settings)
    for run_id, stored, now in zip(rows["run_id"], rows["outcome"], rows.apply(run_outcome, axis=1),
                                   strict=True):
        if stored != now:
            log(f"report: {run_id}: {_shown(path)} says {stored}, its numbers now read {now}")
    return rows


def _differences(first: pd.Series, rerun: pd.Series) -> list[str]:
    """The ``REPRODUCED`` numbers a re-run does not reproduce (to 1e-4 relative); a number its
    first run did not measure (gsm's exact match before `--exact-match` existed) is not compared."""
    def number(value) -> float:  # not measured: NaN
        return float(pd.to_numeric(value, errors="coerce")) if value is not None else np.nan

    return [column for column in REPRODUCED if not np.isnan(number(first[column])) and
            not np.isclose(number(rerun[column]), number(first[column]), rtol=1e-4)]


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def _sorted(table: pd.DataFrame) -> pd.DataFrame:
    # infer_objects: a concat with an empty (object) frame must not turn numbers into objects,
    # which the CSV would write as 2333.0 instead of 2333
    # started_at last: the re-runs of one run id in the order they were made
    return table.assign(_start=_start(table)).sort_values(
        ["method", "rank", "lr", "rho", "apn_cap", "seed", "_start"]).drop(columns="_start").reset_index(
        drop=True).infer_objects()


def replication_table(ledgers: Ledgers, metric: tuple[str, str] = BBC_METRICS[0]) -> pd.DataFrame:
    """Each re-run beside its first run: outcome, final training loss, rise, the eval ``metric``
    (label, column), and whether it reproduced them; ``re-run`` says when (and on what processor,
    where recorded) the re-run was made."""
    first = ledgers.first.set_index("run_id")
    rows = []
    for _, rerun in ledgers.reruns.iterrows():
        before = first.loc[rerun["run_id"]]
        cpu = f", {rerun['cpu']}" if isinstance(rerun.get("cpu"), str) else ""
        rows.append({"method": rerun["method"], "rank": rerun["rank"], "lr": rerun["lr"], "rho": rerun["rho"],
                     "apn_cap": rerun["apn_cap"], "seed": rerun["seed"],
                     "re-run": f"{str(rerun['started_at'])[:10]}{cpu}",
                     "outcome (first / re-run)": f"{before['outcome']} / {rerun['outcome']}",
                     "final loss": f"{before['final_loss']:.3g} / {rerun['final_loss']:.3g}",
                     "rise % of start": f"{100 * before['rise_of_start']:.0f} / {100 * rerun['rise_of_start']:.0f}",
                     metric[0]: f"{before[metric[1]]:.3f} / {rerun[metric[1]]:.3f}",
                     "reproduced": "no" if _differences(before, rerun) else "yes"})
    return pd.DataFrame(rows)


def at_defaults(table: pd.DataFrame, study: str = "bbc") -> pd.DataFrame:
    """Runs at MGPO's default knobs for the task (the rho x cap grid's other runs left out)."""
    return table[np.isclose(table["rho"], STUDIES[study]["rho"]) & np.isclose(table["apn_cap"], DEFAULT_CAP)]


def mean_sd(values: pd.Series, digits: int = 3) -> str:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{values.iloc[0]:.{digits}f}"
    mean = values.mean()
    mean = 0.0 if round(mean, digits) == 0 else mean  # a mean that rounds to zero prints 0.000, not -0.000
    return f"{mean:.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def outcome_counts(outcomes: pd.Series) -> str:
    counts = outcomes.value_counts()
    return ", ".join(f"{n} {name}" for name, n in counts.items())


def cell_table(table: pd.DataFrame, keys: list[str], metrics=BBC_METRICS) -> pd.DataFrame:
    """Seed-aggregated rows per ``keys``: outcomes, rise, steps lost, losses, eval ``metrics``
    ((label, run-table column) pairs) and the top Hessian eigenvalue."""
    rows = []
    for key, group in table.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        learned = group[group["outcome"].isin(LEARNED)]  # a rise means something only where the run learned
        rows.append({**dict(zip(keys, key, strict=True)), "seeds": len(group),
                     "outcomes": outcome_counts(group["outcome"]),
                     "rise % of start": mean_sd(100 * learned["rise_of_start"], 0),
                     "steps lost": mean_sd(learned["steps_lost"], 0),
                     "final loss": mean_sd(group["final_loss"]),
                     **{label: measured_mean_sd(group[column]) for label, column in metrics},
                     "λ_max": measured_mean_sd(group["top_eigenvalue"], 2)})
    return pd.DataFrame(rows)


def measured_mean_sd(values: pd.Series, digits: int = 3) -> str:
    """``mean_sd`` of the runs that measured it, saying how many those were when not all:
    ``"0.008 ± 0.012 (2 of 5 runs)"``."""
    measured = int(pd.to_numeric(values, errors="coerce").notna().sum())
    text = mean_sd(values, digits)
    return text if measured in (0, len(values)) else f"{text} ({measured} of {len(values)} runs)"


def paired(table: pd.DataFrame, method: str, baseline: str, keys: list[str],
           metrics=BBC_METRICS[:1]) -> pd.DataFrame:
    """``method`` - ``baseline`` per seed at each cell (same seed: same data order and head init);
    ``metrics``: the (label, run-table column) pairs of the eval metrics compared."""
    columns = [*dict.fromkeys(column for _, column in metrics), "final_loss", "rise_of_start", "outcome"]
    a = table[table["method"] == method].set_index([*keys, "seed"])[columns]
    b = table[table["method"] == baseline].set_index([*keys, "seed"])[columns]
    both = a.merge(b, left_index=True, right_index=True, suffixes=("_a", "_b"))
    rows = []
    for key, group in both.groupby(level=keys):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(keys, key, strict=True)), "pairs": len(group),
                     **{f"Δ {label}": measured_mean_sd(group[f"{column}_a"] - group[f"{column}_b"])
                        for label, column in metrics},
                     "Δ final loss": mean_sd(group["final_loss_a"] - group["final_loss_b"]),
                     "Δ rise % of start (both learned)": mean_sd(
                         100 * (group["rise_of_start_a"] - group["rise_of_start_b"])
                         [group["outcome_a"].isin(LEARNED) & group["outcome_b"].isin(LEARNED)], 0),
                     "outcomes": " / ".join(f"{x} vs {y}" for x, y in zip(group["outcome_a"], group["outcome_b"],
                                                                           strict=True))})
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame, empty: str = "(no runs yet)") -> str:
    if frame.empty:
        return f"{empty}\n"
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else "-"
    return str(value)


def tables(ledgers: Ledgers) -> str:
    """The markdown of docs/study/tables.md: every table from the first measurement of each run,
    but the curvature table (each run as last measured: the curvature on four batches was
    measured on re-runs) and the re-runs' own."""
    table = ledgers.first
    defaults = at_defaults(table)
    lora_full = defaults[defaults["method"].isin(["lora", "full"])]
    edge = defaults[defaults["method"].isin(["lora", "lora+mgpo"]) &
                    (((defaults["rank"] == 8) & defaults["lr"].isin([2e-3, 5e-3, 1e-2])) |
                     ((defaults["rank"] == 128) & defaults["lr"].isin([5e-4, 1e-3, 2e-3])))]
    cell = defaults[(defaults["rank"] == 8) & np.isclose(defaults["lr"], 5e-3) & (defaults["method"] != "full")]
    knobs = table[(table["method"] == "lora+mgpo") & (table["rank"] == 8) & np.isclose(table["lr"], 5e-3)]
    rerun_cells = at_defaults(ledgers.first_reruns)  # the second machine's (later re-runs repeat the first runs)
    rerun_cells = rerun_cells[(rerun_cells["rank"] == 8) & (rerun_cells["method"] != "full")]
    sections = [
        ("Phase map: LoRA and full fine-tuning per (rank, lr), all seeds run",
         cell_table(lora_full, ["method", "rank", "lr"])),
        ("Learning edge: LoRA vs LoRA-MGPO", cell_table(edge, ["rank", "lr", "method"])),
        ("Learning edge: LoRA-MGPO - LoRA, paired by seed", paired(edge, "lora+mgpo", "lora", ["rank", "lr"])),
        *perturbation_sections(cell),
        ("Divergences by seed: start and peak step of every detected rise (default MGPO knobs)",
         rise_steps_table(defaults)),
        ("LoRA-MGPO's APN factor per run: at its cap, and what the run did", mgpo_state_table(table)),
        ("MGPO rho x apn_cap at r = alpha = 8, lr 5e-3, per seed", cell_table(knobs, ["rho", "apn_cap", "seed"])),
        ("MGPO rho x apn_cap at r = alpha = 8, lr 5e-3, over seeds", cell_table(knobs, ["rho", "apn_cap"])),
        ("Curvature of the final minimum per cell and method (default MGPO knobs; each run as last measured)",
         curvature_table(at_defaults(ledgers.latest), ["rank", "lr", "method"])),
        ("Curvature of the final minimum on the second machine (each run id's first re-run; the second session)",
         curvature_table(at_defaults(ledgers.first_reruns), ["rank", "lr", "method"])),
        ("Curvature of the training loss at the final minimum per cell and method (its first 4 batches of 8 "
         "training articles; each run as last measured)",
         curvature_table(at_defaults(ledgers.latest), ["rank", "lr", "method"], split="train")),
        ("Curvature against LoRA's, paired by seed: the ratio of top eigenvalues per pair, eval and training loss",
         curvature_pairs(at_defaults(ledgers.latest))),
        ("What the training-loss curvature follows (runs that learned, each as last measured)",
         curvature_correlations(at_defaults(ledgers.latest))),
        ("Re-runs: runs of an earlier session run again (same settings and seed), first / re-run",
         replication_table(ledgers)),
        ("Re-runs: the r = alpha = 8 cells again, per cell and method (each run id's first re-run only)",
         cell_table(rerun_cells, ["rank", "lr", "method"])),
        ("Re-runs: each method - LoRA, paired by seed (each run id's first re-run only)",
         pd.concat([paired(rerun_cells, m, "lora", ["rank", "lr"]).assign(method=m)
                    for m in sorted(rerun_cells["method"].unique()) if m != "lora"] or [pd.DataFrame()])),
    ]
    text = ["# Study tables (generated by `python studies/report.py runs/study`; do not edit)\n",
            "Mean ± sample standard deviation over seeds; `rise % of start`: the highest divergence peak above the "
            "first minimum of the smoothed training loss, in % of the start loss (0 when no divergence); "
            "`steps lost`: steps from the divergence start until the loss is back at its first minimum; both over "
            "the seeds that learned (outcome smooth or double descent; '-' when none did); eval "
            "acc / macro-F1 on 256 held-out articles at step 300; λ_max: top Hessian eigenvalue of the eval loss "
            "at the final checkpoint, where `dynamics analyze` measured it, and tr(H) its Hutchinson trace, on the "
            "number of held-out articles the curvature table gives (8: one batch, the first pass; 32: four "
            "batches).\n"]
    return _sections_markdown(text, sections)


def gsm_tables(ledgers: Ledgers) -> str:
    """The markdown of docs/study/tables_gsm.md (SmolLM2-135M + gsm, 200 steps of 4 x 128)."""
    table = ledgers.first
    defaults = at_defaults(table, "gsm")
    latest = at_defaults(ledgers.latest, "gsm")
    metric = GSM_METRICS[0]
    lora_full = defaults[defaults["method"].isin(["lora", "full"])]
    mgpo_cells = defaults[defaults["method"] == "lora+mgpo"][["rank", "lr"]].drop_duplicates()
    contrast = defaults[defaults["method"].isin(["lora", "lora+mgpo"])].merge(mgpo_cells, on=["rank", "lr"])
    sections = [
        ("Phase map: LoRA and full fine-tuning per (rank, lr), all seeds run",
         cell_table(lora_full, ["method", "rank", "lr"], GSM_METRICS)),
        ("LoRA vs LoRA-MGPO where both ran", cell_table(contrast, ["rank", "lr", "method"], GSM_METRICS)),
        ("LoRA-MGPO - LoRA, paired by seed", paired(contrast, "lora+mgpo", "lora", ["rank", "lr"], GSM_METRICS)),
        ("Past the edge: how each run at a (rank, lr) where a run collapsed went up and whether it came back "
         "(smoothed training loss; each run as last measured, '-' where its run folder was not read for it)",
         blowup_table(latest)),
        # each run as last measured: exact match was measured on the re-runs of LoRA and LoRA-MGPO here
        *[(f"{title} (each run as last measured)", frame) for title, frame in perturbation_sections(
            latest[(latest["rank"] == 8) & np.isclose(latest["lr"], 5e-3) & (latest["method"] != "full")],
            GSM_METRICS, GSM_METRICS,
            COST_TITLE + " — NOT a cost measurement here: these runs shared the 2 cores with one to three other "
            "processes (other runs, exact-match decoding, the test suite), differently from run to run; the overhead "
            "benchmark (benchmarks/) measures cost on a quiet machine")],
        ("Divergences: start and peak step of every detected rise", rise_steps_table(defaults)),
        ("LoRA-MGPO's APN factor per run: at its cap, and what the run did", mgpo_state_table(table, metric)),
        ("Re-runs: runs of an earlier session run again (same settings and seed), first / re-run",
         replication_table(ledgers, metric)),
    ]
    text = ["# Study tables, SmolLM2-135M + gsm (generated by `python studies/report.py runs/study_gsm "
            "--study gsm`; do not edit)\n",
            "Mean ± sample standard deviation over seeds where more than one ran; `rise % of start`: the highest "
            "divergence peak above the first minimum of the smoothed training loss, in % of the start loss (0 when "
            "no divergence); `steps lost`: steps from the divergence start until the loss is back at its first "
            "minimum; both over the runs that learned (outcome smooth or double descent); eval loss: mean "
            "cross-entropy of the answer tokens (the worked solution) of the 61 held-out problems at step 200; "
            "exact match: the share of those 61 whose greedy continuation of the question (at most 256 new tokens) "
            "writes `#### N` with N the answer, and `EM, last number` the share whose last number written is the "
            "answer (`dynamics analyze RUN --exact-match 64` at the final checkpoint; '-' where not measured: "
            "runs whose folders were gone before the option existed).\n"]
    return _sections_markdown(text, sections)


COST_TITLE = "Cost at r = alpha = 8, lr 5e-3 (median step time, peak memory; two runs shared the 2 cores)"


def perturbation_sections(cell: pd.DataFrame, metrics=BBC_METRICS, paired_on=BBC_METRICS[:1],
                          cost_title: str = COST_TITLE) -> list[tuple[str, pd.DataFrame]]:
    """The perturbation comparison at r = alpha = 8, lr 5e-3 (the paper's Fig. 4 and Table 4
    analogues): per method over seeds on ``metrics``, each method - LoRA paired by seed on
    ``paired_on`` ((label, run-table column) pairs), and cost under ``cost_title``."""
    return [
        ("Perturbations at r = alpha = 8, lr 5e-3", cell_table(cell, ["method"], metrics)),
        ("Perturbations at r = alpha = 8, lr 5e-3: each - LoRA, paired by seed",
         pd.concat([paired(cell, m, "lora", ["rank", "lr"], paired_on).assign(method=m)
                    for m in sorted(cell["method"].unique()) if m != "lora"] or [pd.DataFrame()])),
        (cost_title, cost_rows(cell)),
    ]


def blowup_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per run at a (method, rank, lr) cell where some run collapsed, and per run of another
    method at such a (rank, lr): how its smoothed training loss went up and whether it came back
    below its start (``blowup``)."""
    collapsed = table.loc[table["outcome"] == "collapse", ["rank", "lr"]].drop_duplicates()
    rows = []
    for _, run in _sorted(table.merge(collapsed, on=["rank", "lr"])).iterrows():
        rows.append({"method": run["method"], "rank": run["rank"], "lr": run["lr"], "seed": run["seed"],
                     "outcome": run["outcome"],
                     "lowest before the peak (step)": _at(run["min_loss"], run["min_step"]),
                     "at 2x start at step": _cell(run["doubled_step"]),
                     "peak loss (step)": _at(run["peak_loss"], run["peak_step"]),
                     "below start again at step": _cell(run["below_start_step"]),
                     "final loss": f"{run['final_loss']:.2f}", "eval loss": f"{run['eval_loss']:.2f}"})
    return pd.DataFrame(rows)


def _at(value, step) -> str:
    return "-" if pd.isna(value) else f"{value:.2f} ({int(step)})"


def _sections_markdown(text: list[str], sections: list[tuple[str, pd.DataFrame]]) -> str:
    """``text`` (title, preamble) and each ``## title`` with its table, an empty one said in words."""
    for title, frame in sections:
        empty = ("(no rise detected in any run)" if title.startswith("Divergences") else
                 "(none)" if title.startswith("Re-runs") else "(no runs yet)")
        text += [f"## {title}\n", markdown(frame, empty)]
    return "\n".join(text)


def rise_steps_table(table: pd.DataFrame) -> pd.DataFrame:
    """Where each run's divergences start and peak (phase detector, smoothed training loss; the
    ledger's ``rises``, "start-peak" pairs), per seed: runs of one seed draw the same batches in
    the same order, whatever their method, rank or lr, so rises that share steps within a seed
    point at the data, not the optimizer."""
    rows = []
    for _, run in table.iterrows():
        for rise in str(run["rises"] if isinstance(run["rises"], str) else "").split():
            start, peak = map(int, rise.split("-"))
            rows.append({"seed": run["seed"], "start": start, "peak": peak, "method": run["method"],
                         "rank": run["rank"], "lr": run["lr"], "outcome": run["outcome"]})
    return pd.DataFrame(rows).sort_values(["seed", "start"]) if rows else pd.DataFrame()


def mgpo_state_table(table: pd.DataFrame, metric: tuple[str, str] = BBC_METRICS[0]) -> pd.DataFrame:
    """Per LoRA-MGPO run: how long the APN factor c = min(1 / g_ema, apn_cap) sat at its cap (over
    the mean factor of each step: steps 1-50 and all; over the logged per-layer factors), its
    median, the median perturbation norm, and what the run did (``_from_files``)."""
    rows = []
    for _, run in table[table["method"] == "lora+mgpo"].iterrows():
        rows.append({"rank": run["rank"], "lr": run["lr"], "rho": run["rho"], "apn_cap": run["apn_cap"],
                     "seed": run["seed"], "outcome": run["outcome"], metric[0]: f"{run[metric[1]]:.3f}",
                     "% steps at cap (1-50)": f"{run['apn_cap_pct_first50']:.0f}",
                     "% steps at cap (all)": f"{run['apn_cap_pct']:.0f}",
                     "median apn_scale": f"{run['apn_scale_median']:.2f}",
                     "% layer-steps at cap": f"{run['apn_layer_cap_pct']:.0f}",
                     "median perturb_norm": f"{run['perturb_norm_median']:.2f}"})
    return pd.DataFrame(rows)


CURVATURE_COLUMNS = {"eval": ("top_eigenvalue", "hessian_trace", "hessian_trace_se", "curvature_examples",
                              "curvature_loss"),
                     "train": ("top_eigenvalue_train", "hessian_trace_train", "hessian_trace_train_se",
                               "curvature_examples_train", "curvature_loss_train")}


def curvature_table(table: pd.DataFrame, keys: list[str], split: str = "eval") -> pd.DataFrame:
    """Seed-aggregated curvature of the final minimum per ``keys``: the top Hessian eigenvalue and
    the Hutchinson trace of ``split``'s loss (``dynamics analyze [--split train]``; the mean of the
    trace estimates' standard errors beside the spread over seeds), on how many examples, and what
    the runs did (a run at chance sits on a plateau, whose low curvature says nothing of flatness),
    with the loss on those examples where recorded (a Hessian's size follows the loss level)."""
    top, trace, trace_se, examples_column, loss = CURVATURE_COLUMNS[split]
    rows = []
    measured = table[pd.to_numeric(table[top], errors="coerce").notna()]
    for key, group in measured.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        examples = sorted(group[examples_column].dropna().astype(int).unique())
        rows.append({**dict(zip(keys, key, strict=True)), "seeds": len(group),
                     "outcomes": outcome_counts(group["outcome"]),
                     f"{split} examples": ", ".join(map(str, examples)) or "-",
                     "loss there": measured_mean_sd(group[loss], 4),
                     "λ_max": mean_sd(group[top], 1),
                     "tr(H)": mean_sd(group[trace], 0),
                     "tr(H) standard error (mean)": (f"{group[trace_se].mean():.0f}"
                                                     if group[trace_se].notna().any() else "-")})
    return pd.DataFrame(rows)


def curvature_pairs(table: pd.DataFrame, baseline: str = "lora") -> pd.DataFrame:
    """Each method's final-minimum curvature against ``baseline``'s of the same seed and cell
    (rank, lr), eval and training loss side by side: the ratio of top eigenvalues per pair, and in
    how many pairs the method's is lower. Runs without a training-loss measurement are left out."""
    columns = ["top_eigenvalue", "top_eigenvalue_train", "hessian_trace_train", "outcome"]
    measured = table[pd.to_numeric(table["top_eigenvalue_train"], errors="coerce").notna()]
    base = measured[measured["method"] == baseline].set_index(["rank", "lr", "seed"])[columns]
    rows = []
    for (rank, lr, method), group in measured[measured["method"] != baseline].groupby(["rank", "lr", "method"]):
        both = group.set_index(["rank", "lr", "seed"])[columns].merge(base, left_index=True, right_index=True,
                                                                    suffixes=("", "_base"))
        if both.empty:
            continue
        row = {"rank": rank, "lr": lr, "method": method, "pairs": len(both)}
        for label, column in (("eval", "top_eigenvalue"), ("train", "top_eigenvalue_train")):
            ratio = both[column].astype(float) / both[f"{column}_base"].astype(float)
            row[f"λ_max {label} / {baseline}'s"] = " ".join(f"{value:.2f}" for value in ratio)
            row[f"lower ({label})"] = f"{int((ratio < 1).sum())} of {len(ratio)}"
        row["outcomes"] = " / ".join(f"{x} vs {y}" for x, y in zip(both["outcome"], both["outcome_base"], strict=True))
        rows.append(row)
    return pd.DataFrame(rows)


def curvature_correlations(table: pd.DataFrame) -> pd.DataFrame:
    """Over the runs that learned and have a training-loss curvature: Spearman's rank correlation
    of the training-loss λ_max with the training loss on those same examples, and with the
    eval-loss λ_max (is the training loss's curvature a property of the minimum, or of how far
    the run fitted its examples?)."""
    measured = table[table["outcome"].isin(LEARNED) & pd.to_numeric(table["top_eigenvalue_train"],
                                                                      errors="coerce").notna()]
    rows = []
    for label, column in (("training loss on the same examples", "curvature_loss_train"),
                          ("eval-loss λ_max", "top_eigenvalue")):
        both = measured[["top_eigenvalue_train", column]].astype(float).dropna()
        if len(both) >= 3:
            rho, p_value = stats.spearmanr(both["top_eigenvalue_train"], both[column])
            rows.append({"training-loss λ_max against": label, "runs": len(both), "Spearman ρ": f"{rho:.2f}",
                         "p": f"{p_value:.1g}"})
    return pd.DataFrame(rows)


def cost_rows(cell: pd.DataFrame) -> pd.DataFrame:
    """``dynamics.analysis.cost_table`` of one cell's ledger rows (each run's median step time and
    peak memory), the median over seeds, as the tables print it."""
    table = cost_table(cell.assign(task="study"), over_seeds="median") if len(cell) else pd.DataFrame()
    return pd.DataFrame([{"method": row["method"], "runs": row["runs"], "step time (s)": f"{row['step_time_s']:.3f}",
                          "vs LoRA": f"{row['step_time_s_vs_lora']:.2f}x",
                          "peak memory (MB)": f"{row['peak_mem_mb']:.0f}",
                          "memory vs LoRA": f"{row['peak_mem_mb_vs_lora']:.2f}x"} for _, row in table.iterrows()])


def draw(ledgers: Ledgers) -> None:
    """Each bbc study figure from the runs it needs (``draw_sets``): the first measurement of each
    run, but the curvature figure (its runs as last measured)."""
    defaults = at_defaults(ledgers.first)
    latest = at_defaults(ledgers.latest)
    r8 = defaults[(defaults["rank"] == 8) & (defaults["method"] != "full")]
    latest_r8 = latest[(latest["rank"] == 8) & (latest["method"] != "full")]
    subsets = {
        "phase_map": (defaults[defaults["method"].isin(["lora", "full", "lora+mgpo"])], "phase_map"),
        "edge_r8": (defaults[defaults["method"].isin(["lora", "lora+mgpo"]) & (defaults["rank"] == 8) &
                             defaults["lr"].isin([2e-3, 5e-3, 1e-2])], "loss_vs_lr,loss_by_method,sharpness"),
        # full fine-tuning learns at the same three lrs: its panel sits beside LoRA's
        "edge_r128": (defaults[((defaults["method"].isin(["lora", "lora+mgpo"]) & (defaults["rank"] == 128)) |
                                (defaults["method"] == "full")) & defaults["lr"].isin([5e-4, 1e-3, 2e-3])],
                      "loss_vs_lr,loss_by_method,sharpness"),
        "rank_lr2e-3": (defaults[defaults["method"].isin(["lora", "lora+mgpo"]) & np.isclose(defaults["lr"], 2e-3)],
                        "loss_vs_rank"),
        "perturbations": (r8[np.isclose(r8["lr"], 5e-3)], "loss_by_method,ablation,noise,cost,mgpo_state"),
        # studies/sharpness_bbc.toml: curvature on 4 eval batches, the trace with it
        "sharpness": (latest_r8[latest_r8["lr"].isin([2e-3, 5e-3]) & (latest_r8["curvature_examples"] == 32)],
                      "sharpness_by_method,sharpness_train"),
    }
    draw_sets(subsets, FIGURES_OUT, "python studies/report.py runs/study")


def draw_gsm(ledgers: Ledgers) -> None:
    """The gsm half's figures: its phase map, loss against lr and rank, LoRA vs LoRA-MGPO at r 8
    and past the edge (r 128), and the perturbations at r 8."""
    defaults = at_defaults(ledgers.first, "gsm")
    mgpo_cells = defaults[defaults["method"] == "lora+mgpo"][["rank", "lr"]].drop_duplicates()
    contrast = defaults[defaults["method"].isin(["lora", "lora+mgpo"])].merge(mgpo_cells, on=["rank", "lr"])
    latest = at_defaults(ledgers.latest, "gsm")
    edge = latest[np.isclose(latest["lr"], 5e-3)]
    subsets = {
        # each run as last measured: exact match was measured on re-runs (they reproduced their first runs)
        "phase_map": (latest, "phase_map"),
        # one folder per rank: loss_vs_lr draws one rank (the lower on a tie)
        "lora_lr_r8": (defaults[(defaults["method"] == "lora") & (defaults["rank"] == 8)], "loss_vs_lr"),
        "lora_lr_r128": (defaults[(defaults["method"] == "lora") & (defaults["rank"] == 128)], "loss_vs_lr"),
        "lora_rank": (defaults[defaults["method"] == "lora"], "loss_vs_rank"),
        "lora_vs_mgpo": (contrast[contrast["rank"] == 8] if contrast["method"].nunique() >= 2 else contrast.iloc[:0],
                         "loss_by_method,mgpo_state"),
        # studies/collapse_gsm.toml (its LoRA seed 0 re-runs the phase map's: as last measured)
        "collapse_r128": (edge[edge["method"].isin(["lora", "lora+mgpo"]) & (edge["rank"] == 128)],
                          "loss_by_method"),  # its MGPO state per seed: draw_mgpo_states
        # studies/perturbations_gsm.toml with studies/lora_mgpo_gsm.toml's LoRA and LoRA-MGPO
        # no cost figure: their step times were taken on shared, differently loaded cores (the cost table says so)
        "perturbations": (edge[(edge["rank"] == 8) & (edge["method"] != "full")],
                          "loss_by_method,ablation,noise"),
    }
    draw_sets(subsets, STUDIES["gsm"]["figures"], "python studies/report.py runs/study_gsm --study gsm")


def draw_sets(subsets: dict[str, tuple[pd.DataFrame, str]], out_root: Path, report_command: str) -> None:
    """Each figure set (name -> (its runs, the ``dynamics figures --only`` names)) into
    ``out_root/name``: the phase map from the ledger's columns (every run, on disk or not), the
    others by ``dynamics figures`` on the run folders, only where all of the set's runs are on
    disk (else the committed figures stay, said in one line)."""
    for name, (frame, only) in subsets.items():
        out = out_root / name
        where = f"{out.relative_to(ROOT)}"
        if frame.empty:
            print(f"report: {where}: no runs yet")
            continue
        if only == "phase_map":
            draw_phase_map(frame, out, f"{report_command} (figure set {name}): the phase map of {len(frame)} ledger "
                                       f"rows")
            continue
        missing = int((~frame["on_disk"].astype(bool)).sum())
        if missing:
            print(f"report: {where}: {missing} of its {len(frame)} runs are not on disk here; figures left as "
                  "committed")
            continue
        make_figures(sorted(frame["path"]), out=out, only=only,
                     command=f"{report_command} (figure set {name}): dynamics figures <{len(frame)} runs> "
                             f"--out {where} --only {only}")


def draw_phase_map(frame: pd.DataFrame, out: Path, command: str) -> None:
    """``figures.phase_map`` of ledger rows (it reads only the run table's columns), written with
    an index entry as ``dynamics figures`` writes one."""
    out.mkdir(parents=True, exist_ok=True)
    figure = figures.phase_map(frame)
    run_ids = sorted(figures.phase_map_runs(frame)["run_id"])
    write_figure(Drawn(figure, run_ids), out, "phase_map")
    plt.close(figure)
    write_index(out, {"phase_map": {"command": command, "run_ids": run_ids, "written_at": runs.now_iso(),
                                    "git_commit": runs.git_commit(), "extra": []}})
    print(f"report: {out.relative_to(ROOT)}/phase_map.png ({len(run_ids)} runs)")


def draw_mgpo_states(table: pd.DataFrame, out: Path = FIGURES_OUT / "mgpo_state", study: str = "bbc",
                     rank: int = 8, lr: float = 5e-3, seeds: tuple[int, ...] = (0, 2)) -> None:
    """LoRA-MGPO's instrument panel, one figure per seed (``out/seed<N>.png``), at one (rank, lr)
    and the task's default knobs: bbc r 8, lr 5e-3, seeds 0 (learned) and 2 (stuck at chance) by
    default."""
    chosen = at_defaults(table, study)
    chosen = chosen[(chosen["method"] == "lora+mgpo") & (chosen["rank"] == rank) & np.isclose(chosen["lr"], lr)]
    chosen = chosen[chosen["seed"].isin(seeds)]
    if chosen.empty or not chosen["on_disk"].astype(bool).all():
        print(f"report: {out.relative_to(ROOT)}: its runs are not on disk here; figures left as committed")
        return
    out.mkdir(parents=True, exist_ok=True)
    for _, row in chosen.iterrows():
        run = dynamics.load_run(row["path"])
        # the detector's label hides a rise from the start: say how high it went
        peak = blowup(run.metrics["loss"], run.metrics["step"])
        rose = (f", smoothed loss peak {peak['peak_loss']:.2f} at step {peak['peak_step']}"
                if peak["peak_step"] > 1 else "")
        title = (f"LoRA-MGPO state, r {rank}, lr {lr:g}, seed {row['seed']} ({row['outcome']}{rose}): "
                 f"{row['run_id']}")
        figure = figures.mgpo_state(run.metrics, run.layers, apn_cap=run.config.get("apn_cap"), title=title)
        write_figure(Drawn(figure, [row["run_id"]]), out, f"seed{row['seed']}")
        plt.close(figure)
        print(f"report: {out / f'seed{row.seed}'}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", nargs="?", default="runs/study", type=Path)
    parser.add_argument("--study", choices=sorted(STUDIES), default="bbc",
                        help="which half: bbc (MiniLM-L6, default) or gsm (SmolLM2-135M)")
    parser.add_argument("--replace", action="store_true",
                        help="runs on disk replace the ledger's rows of their ids (a study re-run whole elsewhere)")
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args()
    study = STUDIES[args.study]
    runs_csv, reruns_csv, tables_md = (STUDY / study[key] for key in ("runs_csv", "reruns_csv", "tables_md"))
    measured = ledgers(study_runs(args.runs_dir, args.study), runs_csv, reruns_csv, study["settings"],
                       replace=args.replace)
    STUDY.mkdir(parents=True, exist_ok=True)
    measured.first[RUN_COLUMNS].to_csv(runs_csv, index=False, float_format="%.6g")
    if len(measured.reruns) or reruns_csv.exists():
        measured.reruns[RUN_COLUMNS].to_csv(reruns_csv, index=False, float_format="%.6g")
    tables_md.write_text(tables(measured) if args.study == "bbc" else gsm_tables(measured))
    print(f"report: {runs_csv}, {reruns_csv.name}, {tables_md}")
    if args.no_figures:
        return
    if args.study == "bbc":
        draw(measured)
        draw_mgpo_states(measured.first)
    else:
        draw_gsm(measured)
        draw_mgpo_states(measured.latest, STUDIES["gsm"]["figures"] / "collapse_r128" / "mgpo_state", "gsm",
                         rank=128, lr=5e-3, seeds=(0, 1, 2, 3, 4))


if __name__ == "__main__":
    main()
