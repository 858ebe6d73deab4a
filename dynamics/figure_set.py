"""``dynamics figures``: every figure of ``dynamics.figures`` from folders of runs, as PNG + PDF.

Reads only run folders (config, summary, metrics, layers, eval, phases, sharpness, trace and
density parquet); phases missing on disk are detected on the fly, curvature is never computed
here. Each figure goes to ``OUT/NAME.png`` (README, docs) and ``OUT/NAME.pdf`` (vector, papers),
written to a temporary file and renamed, so an interrupted run leaves the previous figure whole.
``OUT/index.md`` lists every figure with the run ids it drew and the command; a figure the runs
cannot make is skipped with one line saying what it needs and which grid file makes it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd

from dynamics import figures, runs
from dynamics.analysis.cost import cost_table
from dynamics.analysis.methods import base_method, comparable_runs
from dynamics.config import ConfigError
from dynamics.files import write_atomic


@dataclasses.dataclass(frozen=True)
class RunsData:
    """The frames the figures draw, read once from the run folders of ``table`` (a load_runs frame)."""

    table: pd.DataFrame

    @cached_property
    def curves(self) -> pd.DataFrame:
        return runs.load_metrics(self.table, table="smoothed_loss")

    @cached_property
    def phases(self) -> pd.DataFrame:
        return runs.load_metrics(self.table, table="phases")

    # The curvature figures are of the eval loss (what training's --sharpness-every measures too),
    # except sharpness_train, which draws the training loss's rows (dynamics analyze --split train).
    @cached_property
    def all_sharpness(self) -> pd.DataFrame:
        return runs.load_metrics(self.table, table="sharpness")

    @cached_property
    def all_trace(self) -> pd.DataFrame:
        return runs.load_metrics(self.table, table="trace")

    @cached_property
    def sharpness(self) -> pd.DataFrame:
        return figures.of_split(self.all_sharpness, "eval")

    @cached_property
    def trace(self) -> pd.DataFrame:
        return figures.of_split(self.all_trace, "eval")

    @cached_property
    def density(self) -> pd.DataFrame:
        return figures.of_split(runs.load_metrics(self.table, table="density"), "eval")

    @cached_property
    def metrics(self) -> pd.DataFrame:
        return runs.load_metrics(self.table, table="metrics")


@dataclasses.dataclass(frozen=True)
class Drawn:
    """A figure and the run ids it used; ``tables`` are extra files (name -> text) beside it."""

    figure: Any
    run_ids: list[str]
    tables: dict[str, str] = dataclasses.field(default_factory=dict)


def _ids(frame: pd.DataFrame) -> list[str]:
    return sorted(frame["run_id"].unique()) if len(frame) else []


def _missing_curvature(data: RunsData, frame: pd.DataFrame, what: str, flag: str) -> figures.NotEnoughRuns:
    lacking = sorted(set(data.table["run_id"]) - set(frame["run_id"] if len(frame) else []))
    shown = ", ".join(lacking[:4]) + (f" and {len(lacking) - 4} more" if len(lacking) > 4 else "")
    return figures.NotEnoughRuns(f"needs {what}; run `dynamics analyze{flag}` on the runs first "
                                 f"(lacking: {shown or 'none'})")


def draw_loss_vs_rank(data: RunsData) -> Drawn:
    chosen, reference, _ = figures.rank_sweep(data.curves)
    return Drawn(figures.loss_vs_rank(data.curves, data.phases), _ids(pd.concat([chosen, reference])))


def draw_loss_vs_lr(data: RunsData) -> Drawn:
    chosen, _ = figures.lr_sweep(data.curves)
    return Drawn(figures.loss_vs_lr(data.curves, data.phases), _ids(chosen))


def draw_loss_by_method(data: RunsData) -> Drawn:
    return Drawn(figures.loss_by_method(data.curves), _ids(figures.method_cells(data.curves)))


def draw_phase_map(data: RunsData) -> Drawn:
    return Drawn(figures.phase_map(data.table), _ids(figures.phase_map_runs(data.table)))


def draw_sharpness(data: RunsData) -> Drawn:
    if data.sharpness.empty:
        raise _missing_curvature(data, data.sharpness, "top Hessian eigenvalues", "")
    return Drawn(figures.sharpness(data.sharpness), _ids(data.sharpness))


def draw_sharpness_by_method(data: RunsData) -> Drawn:
    if data.sharpness.empty:
        raise _missing_curvature(data, data.sharpness, "top Hessian eigenvalues", "")
    used = figures.curvature_cells(figures.final_sharpness(data.sharpness))
    return Drawn(figures.sharpness_by_method(data.sharpness, data.trace), _ids(used))


def draw_sharpness_train(data: RunsData) -> Drawn:
    train = figures.of_split(data.all_sharpness, "train")
    if train.empty:
        raise _missing_curvature(data, train, "top Hessian eigenvalues of the training loss", " --split train")
    used = figures.curvature_cells(figures.final_sharpness(train, "train"))
    traces = figures.of_split(data.all_trace, "train")
    return Drawn(figures.sharpness_by_method(train, traces, split="train"), _ids(used))


def draw_spectrum(data: RunsData) -> Drawn:
    if data.density.empty:
        raise _missing_curvature(data, data.density, "spectral densities of a lora and a lora+mgpo run",
                                 " --density")
    run_ids = figures.paired_runs(data.density[data.density["step"] == data.density.groupby("run_id")["step"]
                                                .transform("max")])
    return Drawn(figures.spectrum(data.density, run_ids=run_ids), sorted(run_ids))


def draw_mgpo_state(data: RunsData) -> Drawn:
    candidates = data.table[data.table["method"].map(base_method).str.endswith("+mgpo")]
    if candidates.empty:
        raise figures.NotEnoughRuns("needs a lora+mgpo run")
    # the method at its default knobs before its variants (figures.method_variants), then the longest
    candidates = candidates.assign(variant=candidates["method"].str.contains("[", regex=False))
    chosen = candidates.sort_values(["variant", "steps_done", "rank", "lr"],
                                    ascending=[True, False, False, False]).iloc[0]
    run = runs.load_run(chosen["path"])
    title = (f"{figures.method_label(chosen['method'])} state over training: {chosen['run_id']} "
             f"(rank {int(chosen['rank'])}, lr {chosen['lr']:g})")
    figure = figures.mgpo_state(run.metrics, run.layers, apn_cap=run.config.get("apn_cap"), title=title)
    return Drawn(figure, [chosen["run_id"]])


def draw_ablation(data: RunsData) -> Drawn:
    figure = figures.ablation(data.table)
    return Drawn(figure, _ids(comparable_runs(data.table, figures.ABLATION_METHODS)))


def draw_noise(data: RunsData) -> Drawn:
    figure = figures.noise(data.table)
    return Drawn(figure, _ids(comparable_runs(data.table, figures.NOISE_METHODS)))


def draw_cost(data: RunsData) -> Drawn:
    table = cost_table(data.table, data.metrics)
    if "lora" not in set(table["method"]) or table["method"].nunique() < 2:
        raise figures.NotEnoughRuns("needs a lora run and one or more other methods at the same setting")
    table = table.assign(full_name=table["method"].map(figures.method_label))
    used = comparable_runs(data.table, sorted(data.table["method"].unique()))
    columns = ["task", "method", "full_name", "rank", "lr", "runs", "trainable_params", "peak_mem_mb", "step_time_s",
               "adapter_init_s", "trainable_params_vs_lora", "peak_mem_mb_vs_lora", "step_time_s_vs_lora"]
    markdown = _cost_markdown(table)
    return Drawn(figures.cost(table), _ids(used), {"cost.csv": table[columns].to_csv(index=False),
                                                  "cost.md": markdown})


def _cost_markdown(table: pd.DataFrame) -> str:
    lines = ["| task | method | rank | runs | trainable params | peak memory (MB) | time per step (s) | set-up (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for _, row in table.iterrows():
        params = "n/a" if pd.isna(row["trainable_params"]) else (
            f"{row['trainable_params']:,.0f} ({row['trainable_params_vs_lora']:.2f}x)")
        lines.append(f"| {row['task']} | {row['full_name']} | {int(row['rank'])} | {int(row['runs'])} | {params} | "
                     f"{row['peak_mem_mb']:.0f} ({row['peak_mem_mb_vs_lora']:.2f}x) | "
                     f"{row['step_time_s']:.3f} ({row['step_time_s_vs_lora']:.2f}x) | "
                     f"{'-' if pd.isna(row['adapter_init_s']) else format(row['adapter_init_s'], '.1f')} |")
    return "\n".join(lines) + "\n\nRatios are relative to LoRA at the same task and setting; time per step is the " \
                              "median step_time_s, peak memory the largest peak_mem_mb of a run; set-up is the " \
                              "one-off initialisation before step 1 (LoRA-GA's gradient estimate and SVDs).\n"


@dataclasses.dataclass(frozen=True)
class FigureSpec:
    name: str
    draw: Callable[[RunsData], Drawn]
    what: str  # one line for index.md
    grid: str  # the grid file in grids/ that makes the runs it needs


FIGURES = (
    FigureSpec("loss_vs_rank", draw_loss_vs_rank, "training loss across ranks (r = alpha), phases shaded",
               "grids/rank_sweep.toml"),
    FigureSpec("loss_vs_lr", draw_loss_vs_lr, "training loss across learning rates", "grids/lr_sweep.toml"),
    FigureSpec("loss_by_method", draw_loss_by_method, "training loss of each method at shared (rank, lr) "
                                                      "settings, a line per seed", "studies/edge_mgpo_bbc.toml"),
    FigureSpec("phase_map", draw_phase_map, "rank x lr map of what each run did, with divergence amplitude",
               "grids/rank_sweep.toml and grids/lr_sweep.toml"),
    FigureSpec("sharpness", draw_sharpness, "top Hessian eigenvalue against rank / lr (and over training)",
               "grids/rank_sweep.toml, then dynamics analyze"),
    FigureSpec("sharpness_by_method", draw_sharpness_by_method, "top Hessian eigenvalue and trace of each "
               "method's final minimum at shared (rank, lr) settings", "studies/sharpness_bbc.toml, then "
               "dynamics analyze --trace"),
    FigureSpec("sharpness_train", draw_sharpness_train, "the same of the training loss (its first "
               "--batches batches)", "studies/sharpness_bbc.toml, then dynamics analyze --trace --split train"),
    FigureSpec("spectrum", draw_spectrum, "Hessian eigenvalue density (SLQ), LoRA vs LoRA-MGPO",
               "grids/methods_gsm.toml, then dynamics analyze --density"),
    FigureSpec("mgpo_state", draw_mgpo_state, "LoRA-MGPO's state over training (loss, norms, g_ema, APN)",
               "any grid with lora+mgpo, e.g. grids/methods_gsm.toml"),
    FigureSpec("ablation", draw_ablation, "APN ablation: task metric of lora, lora+mgpo-noapn, lora+mgpo",
               "grids/apn_ablation_gsm.toml or grids/apn_ablation_bbc.toml"),
    FigureSpec("noise", draw_noise, "MGPO against random-noise and SAM perturbations",
               "grids/random_noise.toml"),
    FigureSpec("cost", draw_cost, "trainable parameters, peak memory, time per step relative to LoRA "
                                  "(also cost.md, cost.csv)", "grids/methods_gsm.toml"),
)
FIGURE_NAMES = tuple(spec.name for spec in FIGURES)


# --- finding runs ---------------------------------------------------------------------------------------
def find_runs(paths: Sequence[str | Path]) -> pd.DataFrame:
    """The load_runs rows of every run folder named or found (recursively) under ``paths``."""
    frames = []
    for path in map(Path, paths):
        if not path.exists():
            raise ConfigError(f"{path}: no such run folder or folder of runs")
        if (path / "config.json").exists():
            table = runs.load_runs(path.parent)
            frames.append(table[table["path"] == str(path)])
            continue
        if not path.is_dir():
            raise ConfigError(f"{path}: not a run folder (no config.json) nor a folder of runs")
        table = runs.load_runs(path)
        if table.empty:
            raise ConfigError(f"{path}: not a run folder (no config.json) and holds no run folders")
        frames.append(table)
    table = pd.concat(frames, ignore_index=True).drop_duplicates("path")
    return table.reset_index(drop=True)


def parse_only(only: str | None) -> list[str]:
    if not only:
        return list(FIGURE_NAMES)
    names = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in names if name not in FIGURE_NAMES]
    if unknown or not names:
        raise ConfigError(f"--only {only}: unknown figure {', '.join(unknown) or '(none given)'}; "
                          f"allowed: {', '.join(FIGURE_NAMES)}")
    return names


# --- writing ------------------------------------------------------------------------------------------
def write_figure(drawn: Drawn, out: Path, name: str) -> list[Path]:
    written = []
    for suffix in (".png", ".pdf"):
        target = out / f"{name}{suffix}"
        write_atomic(target, lambda tmp, kind=suffix[1:]: drawn.figure.savefig(tmp, format=kind, bbox_inches="tight"))
        written.append(target)
    for file_name, text in drawn.tables.items():
        write_atomic(out / file_name, lambda tmp, text=text: tmp.write_text(text))
        written.append(out / file_name)
    return written


def write_index(out: Path, entries: dict[str, dict[str, Any]]) -> Path:
    """``index.md`` (for people) from ``.index.json`` (kept so ``--only`` updates one entry)."""
    state_path = out / ".index.json"
    previous = json.loads(state_path.read_text()) if state_path.exists() else {}
    merged = {**previous, **entries}
    merged = {name: merged[name] for name in FIGURE_NAMES if name in merged}
    write_atomic(state_path, lambda tmp: tmp.write_text(json.dumps(merged, indent=2) + "\n"))
    lines = ["# Figures", "", "Regenerate any of them with the command in its entry. Run ids name folders under "
             "the runs folder given.", ""]
    for name, entry in merged.items():
        spec = next(s for s in FIGURES if s.name == name)
        lines += [f"## {name}", "", f"{spec.what}.", "", f"![{name}]({name}.png) ([pdf]({name}.pdf))"
                  + "".join(f" ([{extra}]({extra}))" for extra in entry.get("extra", [])), "",
                  f"- command: `{entry['command']}`", f"- written: {entry['written_at']} (dynamics "
                  f"commit {entry['git_commit']})", f"- runs ({len(entry['run_ids'])}): "
                  + ", ".join(f"`{run_id}`" for run_id in entry["run_ids"]), ""]
    index = out / "index.md"
    write_atomic(index, lambda tmp: tmp.write_text("\n".join(lines)))
    return index


def make_figures(paths: Sequence[str | Path], out: str | Path = "figures", only: str | None = None,
                 command: str | None = None, log=print,
                 on_problem: Callable[[str], None] | None = None) -> dict[str, list[Path]]:
    """Draw and write the figures; returns figure name -> files written (skipped ones absent).

    Damaged run folders are left out, each named on one line (``RUN_ID: damaged: ...``) through
    ``on_problem`` (default: ``log``)."""
    matplotlib.use("Agg", force=False)  # files only; a notebook's backend is left alone (no pyplot here)
    names = parse_only(only)
    table = find_runs(paths)
    damaged = table["status"] == runs.DAMAGED
    for run_id, damage in zip(table.loc[damaged, "run_id"], table.loc[damaged, "damage"]):
        (on_problem or log)(f"{run_id}: damaged: {damage}")
    table = table[~damaged].reset_index(drop=True)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    data = RunsData(figures.method_variants(table))  # runs differing in a method's knobs: separate methods
    command = command or "dynamics figures " + " ".join(map(str, paths)) + f" --out {out}"
    written: dict[str, list[Path]] = {}
    entries: dict[str, dict[str, Any]] = {}
    for spec in (s for s in FIGURES if s.name in names):
        started = time.perf_counter()
        try:
            drawn = spec.draw(data)
        except figures.NotEnoughRuns as reason:
            log(f"figures: {skip_line(spec, reason)}")
            continue
        files = write_figure(drawn, out, spec.name)
        written[spec.name] = files
        entries[spec.name] = {"command": f"{command} --only {spec.name}" if " --only " not in command else command,
                              "run_ids": drawn.run_ids, "written_at": runs.now_iso(),
                              "git_commit": runs.git_commit(), "extra": sorted(drawn.tables)}
        log(f"figures: {spec.name:<13} {out / spec.name}.png, .pdf ({len(drawn.run_ids)} runs, "
            f"{time.perf_counter() - started:.1f} s)")
    if entries:
        log(f"figures: index        {write_index(out, entries)}")
    return written


# --- in a notebook -------------------------------------------------------------------------------------
def skip_line(spec: FigureSpec, reason: figures.NotEnoughRuns) -> str:
    """Why a figure is not drawn and which grid makes runs that support it: the one line the
    ``figures`` command prints and notebooks show."""
    return f"{spec.name:<13} skipped: {reason}; such runs come from {spec.grid}"


def show(name: str, where: str | Path | pd.DataFrame):
    """The figure ``dynamics figures WHERE --only NAME`` draws, for a notebook: the matplotlib
    Figure, or None after printing the one line that command prints when the runs cannot support
    it. ``where`` is a runs folder, a run folder or a ``load_runs`` frame (damaged runs left out)."""
    specs = {spec.name: spec for spec in FIGURES}
    if name not in specs:
        raise ConfigError(f"figure {name}: unknown; one of {', '.join(FIGURE_NAMES)}")
    table = where if isinstance(where, pd.DataFrame) else find_runs([where])
    if "status" in table:
        table = table[table["status"] != runs.DAMAGED].reset_index(drop=True)
    try:
        return specs[name].draw(RunsData(figures.method_variants(table))).figure
    except figures.NotEnoughRuns as reason:
        print(skip_line(specs[name], reason))
        return None


LACKING = {  # load_metrics table -> (what it holds, the command that makes it)
    "sharpness": ("top Hessian eigenvalues", "run `dynamics analyze` on the runs first"),
    "trace": ("Hessian traces", "run `dynamics analyze --trace` on the runs first"),
    "density": ("spectral densities", "run `dynamics analyze --density` on the runs first"),
    "sharpness_during_training": ("top Hessian eigenvalues during training",
                                  "train with --sharpness-every N (eval loss, every N steps)"),
    "generations": ("greedy generations", "run `dynamics analyze --exact-match N` on gsm or tiny runs"),
}


def lacking(table: str, rows: pd.DataFrame, where: pd.DataFrame) -> str | None:
    """For a notebook cell that draws ``rows`` (a ``load_metrics`` table of the runs ``where``):
    None when there are rows, else the one line saying what is missing and how to make it, in the
    words of the ``figures`` command (``_missing_curvature``)."""
    if len(rows):
        return None
    what, remedy = LACKING[table]
    lacking_ids = sorted(where["run_id"]) if "run_id" in where else []
    shown = ", ".join(lacking_ids[:4]) + (f" and {len(lacking_ids) - 4} more" if len(lacking_ids) > 4 else "")
    return f"{table}: needs {what}; {remedy} (lacking: {shown or 'none'})"
