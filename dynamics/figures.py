"""The paper's figures as plain functions: pandas frames in, a matplotlib ``Figure`` out.

No file reads, no ``plt.show()``, no pyplot state: a notebook calls the same function the
``dynamics figures`` command calls (``dynamics.figure_set`` reads the run folders and writes the
files). The frames are those of ``dynamics.runs``:

* ``runs``: :func:`dynamics.load_runs` (one row per run);
* ``curves``: ``load_metrics(root, table="smoothed_loss")`` (run_id, settings, step, loss, smoothed);
* ``phases``: ``load_metrics(root, table="phases")``;
* ``sharpness_rows``: ``load_metrics(root, table="sharpness")`` (``eigen_rank`` = eigenvalue index);
* ``trace_rows``: ``load_metrics(root, table="trace")``;
* ``density``: ``load_metrics(root, table="density")``;
* ``metrics``, ``layers``: one run's ``Run.metrics`` / ``Run.layers``, or ``load_metrics`` frames.

The figures are not attached to pyplot: in Jupyter run ``%matplotlib inline`` (or import
``matplotlib.pyplot``) once, so a returned ``Figure`` shows as an image rather than as text.

A function that cannot draw its figure from what it is given raises :class:`NotEnoughRuns`, whose
message says what is missing. Units: loss in nats per target token, steps are optimizer steps.
Colours: one per method in every figure (:func:`method_color`, the Okabe-Ito colour-blind-safe
palette); ranks and learning rates use the sequential, colour-blind-safe viridis map.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dynamics.analysis.density import gaussian_density
from dynamics.analysis.methods import base_method, comparable_runs, method_sort_key
from dynamics.analysis.outcomes import OUTCOMES, run_outcome
from dynamics.config import PAPER_DEFAULTS, TASK_KIND, RunConfig


class NotEnoughRuns(ValueError):
    """The frames given cannot make the figure; the message names what is missing."""


# Okabe & Ito (2008), "Color universal design": distinguishable under the common colour-vision
# deficiencies. Yellow (#F0E442) is left out: it vanishes on white.
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky_blue": "#56B4E9", "green": "#009E73",
             "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7", "grey": "#999999"}
METHOD_COLORS = {
    "lora": OKABE_ITO["blue"],
    "lora+mgpo": OKABE_ITO["vermillion"],
    "lora+mgpo-noapn": OKABE_ITO["orange"],
    "lora+noise": OKABE_ITO["green"],
    "lora+sam": OKABE_ITO["purple"],
    "lora+msam": OKABE_ITO["sky_blue"],
    "full": OKABE_ITO["black"],
}
_OTHER_COLORS = ("#6A3D9A", "#8C564B", "#17BECF", "#7F7F7F", "#BCBD22", "#1F4E79", "#B15928")

ADAPTER_LABELS = {"full": "Full FT", "lora": "LoRA", "rslora": "rsLoRA", "dora": "DoRA", "pissa": "PiSSA",
                  "loraplus": "LoRA+", "adalora": "AdaLoRA", "loraga": "LoRA-GA"}
PERTURBATION_LABELS = {"mgpo": "MGPO", "mgpo-noapn": "MGPO w/o APN", "msam": "MSAM", "sam": "SAM",
                       "noise": "random noise"}
# The knobs of a perturbation method whose setting makes a run a variant of its method in a figure
# (method_variants), and how far a variant's colour moves towards white (+) or black (-).
VARIANT_KNOBS = ("rho", "mu", "beta", "apn_cap")
VARIANT_SHADES = (0.45, -0.4, 0.7)
DEFAULT_APN_CAP = RunConfig.__dataclass_fields__["apn_cap"].default

LOSS_LABEL = "training loss (nats/token)"
STEP_LABEL = "step (optimizer steps)"

# What each run did, for the phase map (colour-blind-safe: light blue, orange, reddish purple,
# vermillion, pale yellow, grey), from the best outcome to the worst.
OUTCOME_COLORS = dict(zip(OUTCOMES, ("#D6EAF8", OKABE_ITO["orange"], OKABE_ITO["purple"], OKABE_ITO["vermillion"],
                                     "#F3E6A6", "#4D4D4D"), strict=True))

STYLE = {"font.size": 10, "axes.titlesize": 10.5, "axes.labelsize": 10, "legend.fontsize": 8.5,
         "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.spines.top": False, "axes.spines.right": False,
         "figure.dpi": 110, "savefig.dpi": 150, "legend.frameon": False}


def method_color(method: str) -> str:
    """The colour of ``method`` in every figure (a hex string); a variant (``lora+mgpo[apn_cap=1]``,
    :func:`method_variants`) gets a lighter or darker shade of its method's colour."""
    base, bracket, _ = method.partition("[")
    if bracket:
        amount = VARIANT_SHADES[sum(map(ord, method)) % len(VARIANT_SHADES)]  # stable across figures
        towards = np.ones(3) if amount > 0 else np.zeros(3)
        rgb = np.asarray(mpl.colors.to_rgb(method_color(base)))
        return mpl.colors.to_hex(rgb + abs(amount) * (towards - rgb))
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    adapter = method.split("+")[0]
    if adapter != "lora" and "+" not in method and adapter in ADAPTER_LABELS:
        return _OTHER_COLORS[list(ADAPTER_LABELS).index(adapter) % len(_OTHER_COLORS)]
    return _OTHER_COLORS[sum(map(ord, method)) % len(_OTHER_COLORS)]  # stable across runs and figures


def method_label(method: str) -> str:
    """The name legends show: ``lora+mgpo`` -> ``LoRA-MGPO`` (the paper's name), ``lora+noise`` ->
    ``LoRA + random noise``, a variant ``lora+mgpo[apn_cap=1]`` -> ``LoRA-MGPO (apn_cap 1)``."""
    method, bracket, knobs = method.partition("[")
    if bracket:
        return f"{method_label(method)} ({knobs.rstrip(']').replace('=', ' ').replace(',', ', ')})"
    adapter, _, perturbation = method.partition("+")
    name = ADAPTER_LABELS.get(adapter, adapter)
    if not perturbation:
        return name
    if perturbation == "mgpo":
        return f"{name}-MGPO"
    return f"{name} + {PERTURBATION_LABELS.get(perturbation, perturbation)}"


def method_variants(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` (a load_runs frame) with the runs of one perturbation method that differ in a
    ``VARIANT_KNOBS`` setting told apart: two LoRA-MGPO runs at apn_cap 10 and 1 are two methods in
    a figure, not two seeds of one. The runs at the method's default knobs (the paper's rho / mu /
    beta for the task, the reference code's apn_cap; else the most common setting) keep the plain
    name; each other run's ``method`` becomes ``method[knob=value,...]`` naming the knobs where it
    differs from them (:func:`method_label` shows ``LoRA-MGPO (apn_cap 1)``)."""
    knobs = [knob for knob in VARIANT_KNOBS if knob in runs]
    if runs.empty or not knobs:
        return runs
    runs = runs.copy()
    for method, group in runs.groupby("method"):
        settings = group[knobs].astype(float).round(12).drop_duplicates()
        if "+" not in method or "[" in method or len(settings) < 2:
            continue
        default = group[[_default_knobs(run, knobs) for _, run in group.iterrows()]]
        reference = (default if len(default) else group)[knobs].astype(float).round(12).value_counts().index[0]
        for index, run in group.iterrows():
            differ = [knob for knob, value in zip(knobs, reference, strict=True)
                      if not np.isclose(float(run[knob]), value)]
            if differ:
                runs.at[index, "method"] = f"{method}[{','.join(f'{k}={float(run[k]):g}' for k in differ)}]"
    return runs


def _default_knobs(run: pd.Series, knobs: Sequence[str]) -> bool:
    defaults = {**PAPER_DEFAULTS.get(TASK_KIND.get(run.get("task"), ""), {}), "apn_cap": DEFAULT_APN_CAP}
    return all(knob not in defaults or np.isclose(float(run[knob]), defaults[knob]) for knob in knobs)


@contextlib.contextmanager
def figure_style() -> Iterator[None]:
    """The rc settings every figure is built under (text sizes legible at README width)."""
    with mpl.rc_context(STYLE):
        yield


def _new_figure(n_panels: int, *, panel_width: float = 3.6, height: float = 3.2, ncols: int | None = None,
                sharey: bool = False) -> tuple[Figure, list[Any]]:
    ncols = ncols or n_panels
    nrows = math.ceil(n_panels / ncols)
    figure = Figure(figsize=(panel_width * ncols, height * nrows), layout="constrained")
    axes = figure.subplots(nrows, ncols, sharey=sharey, squeeze=False).ravel().tolist()
    for extra in axes[n_panels:]:
        extra.set_visible(False)
    return figure, axes[:n_panels]


def _spans_decades(values: Sequence[float] | np.ndarray, decades: float = 1.0) -> bool:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite) & (finite > 0)]
    return finite.size > 1 and math.log10(finite.max() / finite.min()) >= decades


def _format_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-").replace("e+0", "e")


def _methods(frame: pd.DataFrame) -> list[str]:
    return sorted(frame["method"].dropna().unique(), key=method_sort_key)


def _require(frame: pd.DataFrame | None, columns: Sequence[str], what: str) -> pd.DataFrame:
    if frame is None or frame.empty:
        raise NotEnoughRuns(f"needs {what}; none given")
    missing = [c for c in columns if c not in frame]
    if missing:
        raise NotEnoughRuns(f"needs {what} with column(s) {', '.join(missing)}")
    return frame


def _best_setting(frame: pd.DataFrame, by: str, varying: str) -> float:
    """The value of ``by`` at which ``varying`` takes the most values; ties go to the value with the
    most runs, then to the larger value (the paper's sweeps sit at the larger lr / rank)."""
    counts = frame.groupby(by).agg(values=(varying, "nunique"), runs=("run_id", "nunique"))
    return counts.sort_values(["values", "runs"]).index[-1] if len(counts) else None


def _sequential_colors(values: Sequence[float]) -> dict[float, Any]:
    """viridis from blue-purple to yellow-green, one per value: its darkest 15 % is too close to the
    black of full fine-tuning, its palest 15 % too faint on white."""
    values = sorted(values)
    positions = np.linspace(0.15, 0.85, len(values)) if len(values) > 1 else [0.35]
    return {value: mpl.colormaps["viridis"](position) for value, position in zip(values, positions, strict=True)}


# --- loss curves across ranks / learning rates (paper Figs 1-3) -------------------------------------------------
def rank_sweep(curves: pd.DataFrame, lr: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """The rows :func:`loss_vs_rank` draws: LoRA-family runs with r = alpha at ``lr`` (default: the
    lr with the most ranks), full fine-tuning at that lr, and the lr."""
    curves = _require(curves, ("run_id", "method", "rank", "alpha", "lr", "step", "loss", "smoothed"),
                      "loss curves (load_metrics(..., table='smoothed_loss'))")
    adapters = curves[(curves["method"] != "full") & np.isclose(curves["rank"], curves["alpha"])]
    if lr is None:
        if adapters.empty:
            raise NotEnoughRuns("needs LoRA-family runs (r = alpha) at two or more ranks with the same lr")
        lr = float(_best_setting(adapters, "lr", "rank"))
    chosen = adapters[np.isclose(adapters["lr"], lr)]
    chosen = chosen[chosen.groupby("method")["rank"].transform("nunique") >= 2]  # a panel needs two ranks
    if chosen["rank"].nunique() < 2:
        raise NotEnoughRuns(f"needs LoRA-family runs (r = alpha) at two or more ranks with lr {lr:g}")
    return chosen, curves[(curves["method"] == "full") & np.isclose(curves["lr"], lr)], lr


def lr_sweep(curves: pd.DataFrame, rank: int | None = None) -> tuple[pd.DataFrame, int]:
    """The rows :func:`loss_vs_lr` draws: LoRA-family runs at ``rank`` (default: the rank with the
    most lrs), plus full fine-tuning where it has two or more lrs; and the rank."""
    curves = _require(curves, ("run_id", "method", "rank", "lr", "step", "loss", "smoothed"),
                      "loss curves (load_metrics(..., table='smoothed_loss'))")
    adapters = curves[curves["method"] != "full"]
    if rank is None:
        if adapters.empty:
            raise NotEnoughRuns("needs LoRA-family runs at two or more learning rates with the same rank")
        rank = int(_best_setting(adapters, "rank", "lr"))
    chosen = adapters[adapters["rank"] == rank]
    chosen = chosen[chosen.groupby("method")["lr"].transform("nunique") >= 2]  # a panel needs two lrs
    if chosen["lr"].nunique() < 2:
        raise NotEnoughRuns(f"needs LoRA-family runs at two or more learning rates with rank {rank}")
    full = curves[curves["method"] == "full"]
    return (pd.concat([chosen, full], ignore_index=True) if full["lr"].nunique() >= 2 else chosen), rank


def loss_vs_rank(curves: pd.DataFrame, phases: pd.DataFrame | None = None, lr: float | None = None) -> Figure:
    """Training loss over steps, one curve per rank (runs with r = alpha) at one learning rate, one
    panel per method; full fine-tuning at that lr drawn in every panel as a reference.

    ``lr`` defaults to the learning rate with the most ranks (:func:`rank_sweep`). Raw loss faint,
    smoothed loss bold (the curve the phase detector segments), divergence phases shaded in the
    curve's colour, seeds as a band (min to max of the smoothed curves) around their mean.
    """
    chosen, reference, lr = rank_sweep(curves, lr)
    return _loss_panels(chosen, reference, phases, hue="rank", hue_label="rank r (= alpha)",
                        title=f"Training loss across ranks (r = alpha), lr {_format_lr(lr)}")


def loss_vs_lr(curves: pd.DataFrame, phases: pd.DataFrame | None = None, rank: int | None = None) -> Figure:
    """Training loss over steps, one curve per learning rate at one rank, one panel per method
    (full fine-tuning, whose rank setting means nothing, gets its own panel across its lrs).

    ``rank`` defaults to the rank with the most learning rates (:func:`lr_sweep`). Drawn as
    :func:`loss_vs_rank`.
    """
    chosen, rank = lr_sweep(curves, rank)
    return _loss_panels(chosen, None, phases, hue="lr", hue_label="learning rate",
                        title=f"Training loss across learning rates, rank {rank}", hue_format=_format_lr)


def method_cells(curves: pd.DataFrame, max_cells: int = 6) -> pd.DataFrame:
    """The rows :func:`loss_by_method` draws: LoRA-family runs at the (rank, lr) cells where two or
    more methods ran (at most ``max_cells``, those with the most methods, then runs), plus full
    fine-tuning at a cell's lr (its rank setting means nothing); a ``cell`` column names the cell."""
    curves = _require(curves, ("run_id", "method", "rank", "lr", "step", "smoothed"),
                      "loss curves (load_metrics(..., table='smoothed_loss'))")
    return _shared_cells(curves, max_cells, "runs of two or more methods at one (rank, lr) setting")


def _shared_cells(frame: pd.DataFrame, max_cells: int, needs: str) -> pd.DataFrame:
    """The rows of ``frame`` (with ``run_id``, ``method``, ``rank``, ``lr``) at the (rank, lr)
    cells where two or more methods ran, at most ``max_cells`` (most methods, then most runs), each
    named by a ``cell`` column; full fine-tuning joins the cells of its lr. Raises NotEnoughRuns
    saying it ``needs`` such runs when there is no such cell."""
    adapters, full = frame[frame["method"] != "full"], frame[frame["method"] == "full"]
    cells = (adapters.groupby(["rank", "lr"]).agg(methods=("method", "nunique"), runs=("run_id", "nunique"))
             .reset_index())
    cells["methods"] += [int(np.isclose(full["lr"], lr).any()) for lr in cells["lr"]]
    cells = cells[cells["methods"] >= 2]
    if cells.empty:
        raise NotEnoughRuns(f"needs {needs}")
    cells = cells.sort_values(["methods", "runs"], ascending=False).head(max_cells).sort_values(["rank", "lr"])
    chosen = []
    for rank, lr in zip(cells["rank"], cells["lr"], strict=True):
        name = f"rank {int(rank)}, lr {_format_lr(lr)}"
        at_cell = adapters[(adapters["rank"] == rank) & np.isclose(adapters["lr"], lr)]
        chosen += [at_cell.assign(cell=name), full[np.isclose(full["lr"], lr)].assign(cell=name)]
    return pd.concat(chosen, ignore_index=True)


def loss_by_method(curves: pd.DataFrame) -> Figure:
    """Smoothed training loss over steps of each method at shared (rank, lr) cells, a panel per cell
    (:func:`method_cells`), one line per seed in the method's colour: with a few seeds, each
    run's own curve says more than a mean (a seed that never learned would drag it)."""
    chosen = method_cells(curves)
    cells = list(dict.fromkeys(chosen["cell"]))
    with figure_style():
        figure, axes = _new_figure(len(cells), panel_width=3.7 if len(cells) > 1 else 5.5, height=3.6, sharey=True,
                                   ncols=min(len(cells), 3))
        log_y = _spans_decades(chosen["smoothed"].to_numpy())
        for ax, cell in zip(axes, cells, strict=True):
            at_cell = chosen[chosen["cell"] == cell]
            for method in _methods(at_cell):
                runs_of_method = at_cell[at_cell["method"] == method]
                label = method_label(method)  # seed counts differ between panels: the lines show them
                for k, (_, run) in enumerate(runs_of_method.groupby("run_id")):
                    run = run.sort_values("step")
                    ax.plot(run["step"], run["smoothed"], color=method_color(method), lw=1.4, alpha=0.85,
                            label=label if k == 0 else "_" + label)
            ax.set_title(cell)
            ax.set_xlabel(STEP_LABEL)
            if log_y:
                ax.set_yscale("log")
            ax.grid(alpha=0.25, lw=0.5)
        for ax in axes[:: min(len(cells), 3)]:
            ax.set_ylabel("smoothed loss (nats/token)" + (", log scale" if log_y else ""))
        handles = {}
        for ax in axes:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
        figure.legend(list(handles.values()), list(handles), title="method", loc="outside right center", fontsize=8,
                      title_fontsize=8.5)
        figure.suptitle("Training loss by method, a line per seed\n(perturbed methods: the loss at the perturbed "
                        "weights, where their gradient is taken)", fontsize=10.5)
    return figure


def _loss_panels(curves: pd.DataFrame, reference: pd.DataFrame | None, phases: pd.DataFrame | None, *,
                 hue: str, hue_label: str, title: str, hue_format=lambda value: f"{value:g}") -> Figure:
    methods = _methods(curves)
    colors = _sequential_colors(curves[hue].unique())
    diverge = (phases[phases["phase"] == "diverge"] if phases is not None and len(phases) and "phase" in phases
               else pd.DataFrame(columns=["run_id", "start_step", "end_step"]))
    with figure_style():
        figure, axes = _new_figure(len(methods), panel_width=3.7 if len(methods) > 1 else 5.5, sharey=True,
                                   ncols=min(len(methods), 3))
        all_losses = [curves["loss"].to_numpy()]
        if reference is not None and len(reference):
            all_losses.append(reference["loss"].to_numpy())
        log_y = _spans_decades(np.concatenate(all_losses))
        for ax, method in zip(axes, methods, strict=True):
            of_method = curves[curves["method"] == method]
            for value, group in sorted(of_method.groupby(hue), key=lambda item: item[0]):
                _draw_seeds(ax, group, colors[value], f"{hue_format(value)}")
                for _, episode in diverge[diverge["run_id"].isin(group["run_id"].unique())].iterrows():
                    ax.axvspan(episode["start_step"], episode["end_step"], color=colors[value], alpha=0.12, lw=0)
            if reference is not None and len(reference):
                mean = reference.groupby("step")["smoothed"].mean()
                ax.plot(mean.index, mean.to_numpy(), color=method_color("full"), lw=1.4, ls="--",
                        label=method_label("full"))
            ax.set_title(method_label(method), color=method_color(method), fontweight="bold")
            ax.set_xlabel(STEP_LABEL)
            if log_y:
                ax.set_yscale("log")
            ax.grid(alpha=0.25, lw=0.5)
        for ax in axes[:: min(len(methods), 3)]:
            ax.set_ylabel(LOSS_LABEL + (", log scale" if log_y else ""))
        handles, labels = axes[0].get_legend_handles_labels()
        if len(diverge):
            handles.append(Patch(color="0.5", alpha=0.25, lw=0))
            labels.append("divergence phase")
        # outside the panels: inside, it hid the curves of whichever panel it sat on
        figure.legend(handles, labels, title=hue_label, loc="outside right center", fontsize=8, title_fontsize=8.5)
        figure.suptitle(title + "  (faint: raw loss, bold: smoothed)", fontsize=11)
    return figure


def _draw_seeds(ax, group: pd.DataFrame, color, label: str) -> None:
    """One curve per setting: raw faint, smoothed bold; with several seeds their mean, and the band
    from the lowest to the highest smoothed curve."""
    by_step = group.groupby("step")
    raw = by_step["loss"].mean()
    smoothed = by_step["smoothed"]
    ax.plot(raw.index, raw.to_numpy(), color=color, lw=0.6, alpha=0.3)
    if group["run_id"].nunique() > 1:
        ax.fill_between(smoothed.min().index, smoothed.min().to_numpy(), smoothed.max().to_numpy(), color=color,
                        alpha=0.2, lw=0)
        label += f" ({group['run_id'].nunique()} seeds)"
    ax.plot(smoothed.mean().index, smoothed.mean().to_numpy(), color=color, lw=1.8, label=label)


# --- where the phenomenon lives ----------------------------------------------------------------------------------
def phase_map_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs :func:`phase_map` draws: methods run at two or more (rank, lr) cells; full
    fine-tuning's rank setting means nothing, so its runs count by lr alone (``rank`` set to 0).
    Failed runs, which stopped for a reason other than their loss, are left out."""
    runs = _require(runs, ("run_id", "method", "rank", "lr", "status", "final_loss", "double_descent",
                           "divergence_amplitude", "n_episodes"), "runs (load_runs)")
    runs = runs[runs["status"] != "failed"].assign(rank=lambda frame: frame["rank"].where(frame["method"] != "full", 0))
    cells_per_method = runs.drop_duplicates(["method", "rank", "lr"]).groupby("method").size()
    runs = runs[runs["method"].isin(cells_per_method[cells_per_method >= 2].index)]
    if runs.empty:
        raise NotEnoughRuns("needs runs of one method at two or more (rank, lr) settings")
    return runs


def phase_map(runs: pd.DataFrame) -> Figure:
    """A rank x learning-rate grid per method, each cell coloured by what its run did
    (:func:`run_outcome`) and annotated with the rise (highest divergence peak above the first
    minimum, in % of the start loss: ``rise_of_start``; for a rise from start, ``early_rise``) of
    a double descent, rise from start or collapse, else the final training loss, and, where runs
    were evaluated, the final task metric; with several seeds, the most common outcome, the means
    over the seeds that had it (the metric: over all that measured it, ``(2/5)`` where not every
    seed did), and how many did ("2/3 seeds")."""
    runs = phase_map_runs(runs).assign(outcome=lambda frame: frame.apply(run_outcome, axis=1))
    lrs = sorted(runs["lr"].unique())
    ranks = sorted(runs.loc[runs["method"] != "full", "rank"].unique()) or [0]
    methods = _methods(runs)
    outcomes = list(OUTCOME_COLORS)
    cmap = ListedColormap([OUTCOME_COLORS[o] for o in outcomes])
    with figure_style():
        figure, axes = _new_figure(len(methods), panel_width=max(2.6, 0.75 * len(lrs) + 1.4),
                                   height=max(2.4, 0.5 * len(ranks) + 1.4), ncols=min(len(methods), 3))
        for ax, method in zip(axes, methods, strict=True):
            rows = [0] if method == "full" else ranks
            cells = np.full((len(rows), len(lrs)), np.nan)
            for (rank, lr), group in runs[runs["method"] == method].groupby(["rank", "lr"]):
                i, j = rows.index(rank), lrs.index(lr)
                counts = group["outcome"].value_counts()
                agreeing = int(counts.max())
                # a tie goes to the worse outcome (later in OUTCOME_COLORS): a cell never looks better than its seeds
                outcome = max(counts[counts == agreeing].index, key=outcomes.index)
                cells[i, j] = outcomes.index(outcome)
                typical = group[group["outcome"] == outcome]  # the numbers of the seeds that did what the colour says
                # NaN for summaries stored before rise_of_start existed: the final loss is shown instead
                rise_column = "early_rise" if outcome == "rise from start" else "rise_of_start"
                rise = (pd.to_numeric(typical[rise_column], errors="coerce").mean() if rise_column in typical
                        else np.nan)
                final_loss = typical["final_loss"].astype(float).mean()
                text = ("NaN" if outcome == "diverged" else
                        f"rise {100 * rise:.0f}%" if outcome in ("double descent", "rise from start", "collapse")
                        and rise > 0 else
                        f"loss {final_loss:.2g}")
                metrics = pd.to_numeric(group["eval_metric"], errors="coerce").dropna() if "eval_metric" in group \
                    else pd.Series(dtype=float)
                if len(metrics):  # gsm's exact match is measured after training, on some runs only: say on how many
                    task = group["task"].iloc[0] if "task" in group else None
                    text += f"\n{TASK_METRIC_SHORT.get(task, 'metric')} {metrics.mean():.2f}"
                    text += f" ({len(metrics)}/{len(group)})" if len(metrics) < len(group) else ""
                if len(group) > 1:
                    text += f"\n{len(group)} seeds" if agreeing == len(group) else f"\n{agreeing}/{len(group)} seeds"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if outcome in ("diverged", "collapse") else "black")
            ax.imshow(np.ma.masked_invalid(cells), cmap=cmap, vmin=-0.5, vmax=len(outcomes) - 0.5, origin="lower",
                      aspect="auto")
            for (i, j) in zip(*np.nonzero(np.isnan(cells)), strict=True):
                ax.text(j, i, "not run", ha="center", va="center", fontsize=7, color="0.55")
            ax.set_xticks(range(len(lrs)), [_format_lr(lr) for lr in lrs])
            ax.set_yticks(range(len(rows)), ["all weights"] if method == "full" else [str(int(r)) for r in rows])
            ax.set_xlabel("learning rate")
            ax.set_ylabel("" if method == "full" else "rank r")
            ax.set_title(method_label(method), color=method_color(method), fontweight="bold")
            ax.tick_params(length=0)
            for spine in ax.spines.values():
                spine.set_visible(False)
        figure.legend([Patch(color=OUTCOME_COLORS[o]) for o in outcomes], outcomes, loc="outside lower center",
                      ncols=len(outcomes))
        figure.suptitle("What each run did (cell text: highest rise above the first minimum, or above the start for "
                        "a rise from start,\nin % of the start loss, or the final training loss; final eval metric: "
                        "acc = accuracy, EM = exact match)", fontsize=10.5)
    return figure


# --- curvature ------------------------------------------------------------------------------------------------------
def final_sharpness(sharpness_rows: pd.DataFrame, split: str = "eval") -> pd.DataFrame:
    """One row per run: the top eigenvalue of ``split``'s loss at its last checkpoint measurement
    (``source`` checkpoint, else training), with the run's settings."""
    rows = _require(sharpness_rows, ("run_id", "method", "eigen_rank", "eigenvalue", "step", "source"),
                    "Hessian eigenvalues (load_metrics(..., table='sharpness'))")
    rows = of_split(rows, split)
    top = rows[rows["eigen_rank"] == 1].assign(from_checkpoint=lambda frame: frame["source"] == "checkpoint")
    top = top.sort_values(["run_id", "from_checkpoint", "step"])
    return top.groupby("run_id", as_index=False).last()


def sharpness(sharpness_rows: pd.DataFrame) -> Figure:
    """Top Hessian eigenvalue of the eval loss at each run's final checkpoint against rank (at the
    most common lr) and against lr (at the most common rank), one colour per method, seeds as
    points, their mean joined by a line; and over training where ``--sharpness-every`` logged it."""
    final = final_sharpness(sharpness_rows)
    adapters = final[final["method"] != "full"]
    panels = []
    if adapters["rank"].nunique() >= 2:
        lr = float(_best_setting(adapters, "lr", "rank"))
        panels.append(("rank", "rank r", adapters[np.isclose(adapters["lr"], lr)], f"lr {_format_lr(lr)}"))
    if adapters["lr"].nunique() >= 2:
        rank = int(_best_setting(adapters, "rank", "lr"))
        panels.append(("lr", "learning rate", adapters[adapters["rank"] == rank], f"rank {rank}"))
    training = sharpness_rows[(sharpness_rows["source"] == "training") & (sharpness_rows["eigen_rank"] == 1)]
    if training["step"].nunique() >= 2:
        panels.append(("step", STEP_LABEL, training, "over training"))
    if not panels:
        raise NotEnoughRuns("needs top eigenvalues of runs at two or more ranks or lrs (dynamics analyze), "
                            "or logged over training (--sharpness-every)")
    with figure_style():
        figure, axes = _new_figure(len(panels), panel_width=3.8)
        for ax, (x, x_label, frame, subtitle) in zip(axes, panels, strict=True):
            for method in _methods(frame):
                of_method = frame[frame["method"] == method]
                color = method_color(method)
                if x == "step":
                    for _, run_rows in of_method.groupby("run_id"):
                        run_rows = run_rows.sort_values("step")
                        ax.plot(run_rows["step"], run_rows["eigenvalue"], color=color, lw=1.2, marker=".", ms=4,
                                alpha=0.8, label=method_label(method))
                    continue
                converged = of_method["converged"].fillna(False).astype(bool) if "converged" in of_method else True
                ax.scatter(of_method[x], of_method["eigenvalue"], s=30, lw=1.2, zorder=3, edgecolors=color,
                           facecolors=np.where(converged, color, "white"))
                mean = of_method.groupby(x)["eigenvalue"].mean()
                ax.plot(mean.index, mean.to_numpy(), color=color, lw=1.6, label=method_label(method))
            if x in ("rank", "lr"):
                ax.set_xscale("log", base=2 if x == "rank" else 10)
                ticks = sorted(frame[x].unique())  # the values run, not log-axis decades (2x10^-3, 3x10^-3, ...)
                ax.set_xticks(ticks, [str(int(t)) if x == "rank" else _format_lr(t) for t in ticks])
                ax.minorticks_off()
            if _spans_decades(frame["eigenvalue"]):
                ax.set_yscale("log")
            ax.set_xlabel(x_label)
            ax.set_ylabel("top Hessian eigenvalue λ_max")
            ax.set_title(subtitle)
            ax.grid(alpha=0.25, lw=0.5)
            handles, labels = ax.get_legend_handles_labels()
            unique = dict(zip(labels, handles, strict=True))
            ax.legend(unique.values(), unique.keys())
        unconverged = "converged" in final and not final["converged"].fillna(False).astype(bool).all()
        figure.suptitle("Sharpness: top eigenvalue of the eval-loss Hessian (trainable parameters)"
                        + ("\nhollow points: Lanczos not converged to --tol (a lower bound)" if unconverged else ""),
                        fontsize=11)
    return figure


def final_trace(trace_rows: pd.DataFrame, split: str = "eval") -> pd.DataFrame:
    """One row per run: the Hutchinson trace estimate of ``split``'s loss at its last measured checkpoint."""
    rows = _require(trace_rows, ("run_id", "method", "step", "trace", "standard_error"),
                    "Hessian traces (load_metrics(..., table='trace'))")
    rows = of_split(rows, split)
    return rows.sort_values(["run_id", "step"]).groupby("run_id", as_index=False).last()


def curvature_cells(final: pd.DataFrame, max_cells: int = 3) -> pd.DataFrame:
    """The rows of ``final`` (one per run: :func:`final_sharpness` or :func:`final_trace`) at the
    (rank, lr) cells where two or more methods were measured, as :func:`method_cells` picks them."""
    return _shared_cells(final, max_cells, "final-checkpoint curvature of two or more methods at one (rank, lr) "
                                           "setting (dynamics analyze)")


CURVATURE_OF = {"eval": ("eval-loss", "held-out"), "train": ("training-loss", "training")}  # split -> words


def sharpness_by_method(sharpness_rows: pd.DataFrame, trace_rows: pd.DataFrame | None = None,
                        split: str = "eval") -> Figure:
    """Curvature of each method's final minimum at shared (rank, lr) cells (:func:`curvature_cells`):
    the top eigenvalue of the Hessian of ``split``'s loss (``dynamics analyze [--split train]``;
    rows of other splits are left out) and, where measured, its Hutchinson trace (``--trace``), a
    point per seed (error bars: the trace's standard error) and a line at the seed mean. A column
    per cell, a row per measure; a log axis where the values span a decade or more (seeds of one
    setting often do)."""
    if split not in CURVATURE_OF:
        raise ValueError(f"split {split}: must be one of {', '.join(CURVATURE_OF)}")
    top = final_sharpness(sharpness_rows, split).rename(columns={"eigenvalue": "value"}).assign(error=np.nan)
    measures = [("λ_max (top eigenvalue)", curvature_cells(top))]
    if trace_rows is not None and not trace_rows.empty:
        traces = final_trace(trace_rows, split).rename(columns={"trace": "value", "standard_error": "error"})
        with contextlib.suppress(NotEnoughRuns):  # no trace at a shared cell: eigenvalues alone
            measures.append(("tr(H) (Hutchinson)", curvature_cells(traces)))
    cells = list(dict.fromkeys(measures[0][1]["cell"]))
    examples = sorted(pd.to_numeric(top["n_examples"], errors="coerce").dropna().astype(int).unique()) \
        if "n_examples" in top else []
    with figure_style():
        figure, axes = _new_figure(len(cells) * len(measures), ncols=len(cells),
                                   panel_width=max(3.2, 0.55 * top["method"].nunique() + 1.4), height=3.0)
        for row, (label, frame) in enumerate(measures):
            for column, cell in enumerate(cells):
                ax = axes[row * len(cells) + column]
                at_cell = frame[frame["cell"] == cell]
                if at_cell.empty:  # the trace was measured at other cells only
                    ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center",
                            color="0.55")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    ax.set_ylabel(label if column == 0 else "")
                    continue
                present = _methods(at_cell)
                for position, method in enumerate(present):
                    values = at_cell[at_cell["method"] == method]
                    color = method_color(method)
                    # the mean as a short line, not a bar: a bar's length means nothing on a log axis
                    ax.hlines(values["value"].mean(), position - 0.3, position + 0.3, color=color, lw=2.5,
                              label=f"mean {method}")
                    jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
                    ax.errorbar(position + jitter, values["value"], yerr=values["error"].fillna(0).abs(), fmt="o",
                                ms=4.5, color=color, ecolor="0.3", elinewidth=0.8, capsize=2)
                ax.set_xticks(range(len(present)), [method_label(m) for m in present], rotation=30, ha="right",
                              rotation_mode="anchor", fontsize=8)
                if _spans_decades(at_cell["value"]) and (at_cell["value"] > 0).all():
                    ax.set_yscale("log")
                    ax.yaxis.set_major_locator(mpl.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # 1-2-5: labels
                    ax.yaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
                    ax.yaxis.set_minor_formatter(mpl.ticker.NullFormatter())
                ax.set_xlim(-0.6, len(present) - 0.4)
                ax.set_ylabel(label if column == 0 else "")
                ax.set_title(cell if row == 0 else "")
                ax.grid(axis="y", alpha=0.25, lw=0.5)
        loss, examples_of = CURVATURE_OF[split]
        shown = f" on {examples[0]} {examples_of} examples" if len(examples) == 1 else ""
        bars = " (error bars: the trace estimate's standard error)" if len(measures) > 1 else ""
        figure.suptitle(f"Curvature of the final minimum by method: {loss} Hessian{shown}, trainable "
                        f"parameters\nlines: seed mean, points: seeds{bars}", fontsize=10.5)
    return figure


def of_split(rows: pd.DataFrame, split: str) -> pd.DataFrame:
    """The curvature rows (sharpness, trace, density) of ``split``, eval or train."""
    if "split" not in rows:  # a hand-made frame without the column: eval rows, as in older run folders
        return rows if split == "eval" else rows.iloc[:0]
    return rows[rows["split"] == split].reset_index(drop=True)


def spectrum(density: pd.DataFrame, run_ids: Sequence[str] | None = None, sigma: float | None = None,
             n_grid: int = 1000) -> Figure:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019; the plot
    PyHessian made known), one curve per run at its last measured step, on a log density axis.

    ``run_ids`` default: one run per method, preferring LoRA and LoRA-MGPO at the same rank, lr
    and seed (the largest such rank). ``sigma`` (eigenvalue units) defaults to 1 % of the spread
    of all nodes; each curve is :func:`dynamics.analysis.gaussian_density` of its nodes.
    """
    density = _require(density, ("run_id", "method", "step", "node", "weight"),
                       "spectral densities (dynamics analyze --density)")
    last_step = density.groupby("run_id")["step"].transform("max")
    density = density[density["step"] == last_step]
    if run_ids is None:
        run_ids = paired_runs(density)
    chosen = density[density["run_id"].isin(run_ids)]
    if chosen.empty:
        raise NotEnoughRuns(f"none of the runs {', '.join(run_ids)} has a spectral density")
    low, high = chosen["node"].min(), chosen["node"].max()
    spread = max(high - low, 1e-12)
    sigma = sigma or 0.01 * spread
    grid = np.linspace(low - 0.05 * spread, high + 0.05 * spread, n_grid)
    with figure_style():
        figure, (ax,) = _new_figure(1, panel_width=6.5, height=4.0)
        peak = 0.0
        by_run = sorted(chosen.groupby("run_id"), key=lambda item: method_sort_key(item[1]["method"].iloc[0]))
        for _, rows in by_run:
            method = rows["method"].iloc[0]
            weights = rows["weight"].to_numpy()
            values = gaussian_density(rows["node"].to_numpy(), weights / weights.sum(), grid, sigma)
            peak = max(peak, values.max())
            shown = ("lr", "seed") if method == "full" else ("rank", "lr", "seed")
            settings = ", ".join(f"{name} {_format_lr(rows[name].iloc[0]) if name == 'lr' else rows[name].iloc[0]}"
                                 for name in shown if name in rows)
            ax.plot(grid, values, color=method_color(method), lw=1.5,
                    label=f"{method_label(method)} ({settings}; step {int(rows['step'].iloc[0])}, "
                          f"{int(rows['n_hvp'].iloc[0])} HVPs)" if "n_hvp" in rows else method_label(method))
            ax.axvline(rows["node"].max(), color=method_color(method), lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_ylim(peak * 1e-6, peak * 3)
        ax.set_xlabel("eigenvalue of the eval-loss Hessian (dotted: largest Ritz value)")
        ax.set_ylabel("density (log scale)")
        ax.grid(alpha=0.25, lw=0.5)
        figure.legend(loc="outside lower center", ncols=1)
        figure.suptitle(f"Hessian eigenvalue density (stochastic Lanczos quadrature, Gaussian σ = {sigma:.2g})",
                        fontsize=11)
    return figure


def paired_runs(frame: pd.DataFrame) -> list[str]:
    """One run per LoRA-family method (full fine-tuning's Hessian is over other parameters, so it is
    left out), preferring runs that share rank, lr and seed (the largest such setting)."""
    keys = [k for k in ("rank", "lr", "seed") if k in frame]
    settings = frame.drop_duplicates("run_id")
    settings = settings[settings["method"] != "full"] if (settings["method"] != "full").any() else settings
    if keys:
        shared = settings.groupby(keys)["method"].nunique()
        if len(shared) and shared.max() >= 2:
            best = shared[shared == shared.max()].index
            chosen_key = max(best, key=lambda key: key if isinstance(key, tuple) else (key,))
            chosen_key = chosen_key if isinstance(chosen_key, tuple) else (chosen_key,)
            mask = np.logical_and.reduce([settings[k] == v for k, v in zip(keys, chosen_key, strict=True)])
            settings = settings[mask]
    return settings.drop_duplicates("method")["run_id"].tolist()


# --- MGPO's own state ------------------------------------------------------------------------------------------------
def mgpo_state(metrics: pd.DataFrame, layers: pd.DataFrame | None = None, *, apn_cap: float | None = None,
               title: str | None = None) -> Figure:
    """An instrument panel of one MGPO run over steps: the loss at the perturbed point against the
    clean loss, the gradient and AdamW momentum norms, the gradient-norm EMA ``g_ema`` (eq. 8), the
    APN factor ``c = min(1 / g_ema, cap)`` with the cap drawn, the perturbation norm, and a layer x
    step heat map of the APN factor from ``layers.parquet``."""
    metrics = _require(metrics, ("step", "loss", "loss_clean", "grad_norm", "momentum_norm", "grad_ema", "apn_scale",
                                 "perturb_norm"), "the metrics of one MGPO run")
    if metrics["perturb_norm"].notna().sum() == 0:
        raise NotEnoughRuns("needs a run with a weight perturbation (perturb_norm logged), e.g. lora+mgpo")
    heat = None
    if layers is not None and len(layers) and layers["apn_scale"].notna().any():
        heat = layers.pivot_table(index="layer", columns="step", values="apn_scale", aggfunc="mean", sort=False)
    with figure_style():
        n_panels = 6 if heat is not None else 5
        figure, axes = _new_figure(n_panels, panel_width=3.5, height=2.7, ncols=3)
        step = metrics["step"]
        loss_ax, norm_ax, ema_ax, apn_ax, perturb_ax = axes[:5]
        loss_ax.plot(step, metrics["loss"], color=OKABE_ITO["vermillion"], lw=0.8, label="loss (perturbed point)")
        clean = metrics[["step", "loss_clean"]].dropna()
        loss_ax.plot(clean["step"], clean["loss_clean"], color=OKABE_ITO["blue"], lw=1.2, marker=".", ms=3,
                     label="loss_clean (unperturbed)")
        loss_ax.set_ylabel("loss (nats/token)")
        loss_ax.legend()
        norm_ax.plot(step, metrics["grad_norm"], color=OKABE_ITO["green"], lw=0.8, label="gradient (before clipping)")
        norm_ax.plot(step, metrics["momentum_norm"], color=OKABE_ITO["purple"], lw=1.2, label="AdamW momentum")
        norm_ax.set_yscale("log")
        norm_ax.set_ylabel("global L2 norm")
        norm_ax.legend()
        ema_ax.plot(step, metrics["grad_ema"], color=OKABE_ITO["orange"], lw=1.2)
        ema_ax.set_ylabel("g_ema, mean over layers")
        if _spans_decades(metrics["grad_ema"]):
            ema_ax.set_yscale("log")
        apn_ax.plot(step, metrics["apn_scale"], color=OKABE_ITO["sky_blue"], lw=1.2, label="c, mean over layers")
        if apn_cap is not None:
            apn_ax.axhline(apn_cap, color="0.3", ls="--", lw=1, label=f"cap {apn_cap:g}")
        apn_ax.set_ylabel("APN factor c = min(1/g_ema, cap)")
        apn_ax.legend()
        perturb_ax.plot(step, metrics["perturb_norm"], color=OKABE_ITO["vermillion"], lw=1.0)
        perturb_ax.set_ylabel("perturbation norm ||ΔW||")
        for ax in axes[:5]:
            ax.set_xlabel(STEP_LABEL)
            ax.grid(alpha=0.25, lw=0.5)
        loss_ax.set_title("loss at the perturbed vs clean weights")
        norm_ax.set_title("gradient and momentum")
        ema_ax.set_title("gradient-norm EMA (eq. 8)")
        apn_ax.set_title("adaptive perturbation normalisation")
        perturb_ax.set_title("perturbation applied")
        if heat is not None:
            heat_ax = axes[5]
            steps = heat.columns.to_numpy()
            image = heat_ax.imshow(heat.to_numpy(), aspect="auto", interpolation="nearest", cmap="cividis",
                                   extent=(steps.min(), steps.max(), len(heat) - 0.5, -0.5))
            short = [_short_layer(name) for name in heat.index]
            every = max(1, len(short) // 12)
            heat_ax.set_yticks(range(0, len(short), every), short[::every], fontsize=6.5)
            heat_ax.set_xlabel(STEP_LABEL)
            heat_ax.set_title("APN factor c per layer")
            figure.colorbar(image, ax=heat_ax, label="c")
        if title:
            figure.suptitle(title, fontsize=11)
    return figure


def _short_layer(name: str) -> str:
    """``base_model.model.model.layers.3.self_attn.q_proj`` -> ``3.q_proj``."""
    parts = name.split(".")
    if "layers" in parts and parts.index("layers") + 1 < len(parts):
        return f"{parts[parts.index('layers') + 1]}.{parts[-1]}"
    return parts[-1]


# --- method comparisons (paper Fig. 4, Tables 3-4) --------------------------------------------------------------------
ABLATION_METHODS = ("lora", "lora+mgpo-noapn", "lora+mgpo")
NOISE_METHODS = ("full", "lora", "lora+noise", "lora+sam", "lora+mgpo")
TASK_METRIC_SHORT = {"gsm": "EM", "tiny": "EM", "bbc": "acc"}
TASK_METRICS = {"gsm": ("eval_metric", "exact match"), "tiny": ("eval_metric", "exact match"),
                "bbc": ("eval_metric", "accuracy")}


def ablation(runs: pd.DataFrame) -> Figure:
    """Paper Fig. 4: the task metric and held-out loss of LoRA, LoRA + MGPO without APN and
    LoRA-MGPO at one setting, bars at the seed mean, points per seed."""
    return _method_bars(runs, ABLATION_METHODS, "APN ablation (paper Fig. 4)", needs=("lora+mgpo-noapn",))


def noise(runs: pd.DataFrame) -> Figure:
    """Paper Table 4: LoRA-MGPO against random weight noise (Flat-LoRA), SAM, LoRA and full
    fine-tuning at one setting, drawn as :func:`ablation`."""
    return _method_bars(runs, NOISE_METHODS, "Momentum-guided vs random perturbation (paper Table 4)",
                        needs=("lora+noise", "lora+sam"))


def _method_bars(runs: pd.DataFrame, methods: Sequence[str], title: str, needs: Sequence[str]) -> Figure:
    """Bars of the methods present at one setting; ``needs``: one of these must be among them (the
    method the figure is about)."""
    runs = _require(runs, ("method", "task", "rank", "alpha", "lr", "eval_metric", "eval_loss"), "runs (load_runs)")
    chosen = comparable_runs(runs[runs["status"].isin(["completed", "diverged"])], methods)
    if chosen["method"].nunique() < 2 or not set(needs) & set(chosen["method"].map(base_method)):
        raise NotEnoughRuns(f"needs finished runs of {' or '.join(needs)} and another of {', '.join(methods)} "
                            "at one setting")
    tasks = sorted(chosen["task"].unique())
    panels = []
    for task in tasks:
        column, name = TASK_METRICS.get(task, ("eval_metric", "task metric"))
        of_task = chosen[chosen["task"] == task]
        if of_task[column].notna().any():
            panels.append((of_task, column, f"{name} (%)", 100.0, task))
        if task == "bbc" and of_task["eval_macro_f1"].notna().any():
            panels.append((of_task, "eval_macro_f1", "macro-F1 (%)", 100.0, task))
        panels.append((of_task, "eval_loss", "held-out loss (nats/token)" if task != "bbc" else
                       "held-out loss (nats/example)", 1.0, task))
    with figure_style():
        figure, axes = _new_figure(len(panels), panel_width=3.3, height=3.0)
        for ax, (frame, column, label, scale, task) in zip(axes, panels, strict=True):
            present = sorted(frame["method"].unique(), key=lambda m: (list(methods).index(base_method(m)), m))
            # one number format per panel: 3 significant digits of its largest mean (7.10 beside 6.56, not 7.1)
            largest = frame.groupby("method")[column].mean().abs().max() * scale
            decimals = max(0, 2 - math.floor(math.log10(largest))) if largest > 0 else 0
            for position, method in enumerate(present):
                values = frame.loc[frame["method"] == method, column].astype(float) * scale
                color = method_color(method)
                if column == "eval_loss":  # a loss has no natural zero: points, not bars from 0
                    ax.plot(position, values.mean(), marker="D", color=color, ms=8)
                else:
                    ax.bar(position, values.mean(), color=color, alpha=0.85, width=0.7)
                ax.scatter(np.full(len(values), position), values, color="black", s=10, zorder=3)
                if len(values) > 1:
                    ax.errorbar(position, values.mean(), yerr=[[values.mean() - values.min()],
                                                               [values.max() - values.mean()]],
                                color="black", capsize=3, lw=1)
                ax.annotate(f"{values.mean():.{decimals}f}", (position, values.max()), xytext=(0, 4),
                            textcoords="offset points", ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(present)), [method_label(m) for m in present], rotation=30, ha="right",
                          rotation_mode="anchor", fontsize=8)
            ax.set_xlim(-0.6, len(present) - 0.4)  # room for the labels of the end points (a loss panel has no bars)
            ax.margins(y=0.12)
            ax.set_ylabel(label)
            settings = frame[frame["method"] != "full"].iloc[0]
            ax.set_title(f"{task}: rank {int(settings['rank'])}, lr {_format_lr(settings['lr'])}, "
                         f"{frame.groupby('method').size().max()} seed(s)", fontsize=9)
            ax.grid(axis="y", alpha=0.25, lw=0.5)
        figure.suptitle(title + " — bars / diamonds: seed mean, dots: seeds", fontsize=11)
    return figure


# --- cost (paper Table 3) ------------------------------------------------------------------------------
def cost(table: pd.DataFrame) -> Figure:
    """Bars of the three ratios to LoRA of :func:`dynamics.analysis.cost.cost_table` (1 = the cost
    of LoRA, drawn)."""
    table = _require(table, ("method", "trainable_params_vs_lora", "peak_mem_mb_vs_lora", "step_time_s_vs_lora"),
                     "a cost table (dynamics.analysis.cost.cost_table)")
    if table["method"].nunique() < 2:
        raise NotEnoughRuns("needs a lora run and one or more other methods at the same setting")
    panels = (("trainable_params_vs_lora", "trainable parameters"), ("peak_mem_mb_vs_lora", "peak memory"),
              ("step_time_s_vs_lora", "time per step"))
    with figure_style():
        figure, axes = _new_figure(3, panel_width=3.1, height=0.35 * len(table) + 1.4, sharey=True)
        methods = table["method"].tolist()
        for ax, (column, name) in zip(axes, panels, strict=True):
            values = table[column].to_numpy(dtype=float)
            ax.barh(range(len(methods)), values, color=[method_color(m) for m in methods], alpha=0.85, height=0.7)
            for position, value in enumerate(values):
                text = f"{value:,.0f}x" if value >= 1000 else f"{value:.3g}x"
                ax.annotate(text, (value, position), xytext=(3, 0), textcoords="offset points", va="center",
                            fontsize=8)
            ax.axvline(1.0, color="0.3", ls="--", lw=0.8)
            if _spans_decades(values):
                ax.set_xscale("log")
            ax.margins(x=0.25)
            ax.set_xlabel("relative to LoRA (1 = LoRA)")
            ax.set_title(name)
            ax.grid(axis="x", alpha=0.25, lw=0.5)
        axes[0].set_yticks(range(len(methods)), [method_label(m) for m in methods])
        axes[0].invert_yaxis()
        first = table.iloc[0]
        figure.suptitle(f"Cost per method relative to LoRA (paper Table 3; {first['task']}, rank {int(first['rank'])})",
                        fontsize=11)
    return figure
