"""The figures draw what they claim (lines per rank, shaded phases, units, method colours) on run
folders with planted dynamics; ``dynamics figures`` writes them, skips what the runs cannot make,
and refuses bad input with one line and exit status 2."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from fake_runs import write_fake_grid, write_fake_run
from helpers import assert_expected
from matplotlib.colors import to_hex
from matplotlib.patches import Polygon, Rectangle

from dynamics import figures
from dynamics.analysis import cost_table
from dynamics.cli import main
from dynamics.figure_set import FIGURE_NAMES, make_figures
from dynamics.runs import load_metrics, load_runs

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def grid_root(tmp_path_factory) -> Path:
    return write_fake_grid(tmp_path_factory.mktemp("fake") / "runs")


@pytest.fixture(scope="module")
def runs_table(grid_root):
    return load_runs(grid_root)


@pytest.fixture(scope="module")
def curves(runs_table):
    return load_metrics(runs_table, table="smoothed_loss")


@pytest.fixture(scope="module")
def phases(runs_table):
    return load_metrics(runs_table, table="phases")


def bold_lines(ax):
    return [line for line in ax.get_lines() if line.get_linewidth() >= 1.4 and not line.get_label().startswith("_")]


def shaded_spans(ax):
    return [patch for patch in ax.patches if isinstance(patch, (Polygon, Rectangle))]


def test_loss_vs_rank_one_panel_per_method_one_bold_curve_per_rank(curves, phases):
    figure = figures.loss_vs_rank(curves, phases)
    lora, mgpo = [ax for ax in figure.axes if ax.get_visible()]
    assert (lora.get_title(), mgpo.get_title()) == ("LoRA", "LoRA-MGPO")
    assert "5e-4" in figure._suptitle.get_text()  # the lr with the most runs (two seeds at r = 32)
    for ax in (lora, mgpo):
        assert [line.get_label() for line in bold_lines(ax)] == ["8", "32 (2 seeds)", "128", "Full FT"]
        assert ax.get_xlabel() == "step (optimizer steps)"
    assert "nats/token" in lora.get_ylabel()
    # LoRA's r = 32 and r = 128 runs at 5e-4 carry a planted divergence: shaded (alpha 0.12); MGPO's none.
    spans = shaded_spans(lora)
    assert len(spans) >= 2
    assert_expected([p.get_alpha() for p in spans], [0.12] * len(spans), rtol=1e-6, atol=1e-12)
    assert not [p for p in shaded_spans(mgpo) if abs(p.get_alpha() - 0.12) <= 1e-6 * 0.12]
    # Seeds as a band: the r = 32 curve has a fill between its seeds.
    assert len(lora.collections) >= 1


def test_loss_vs_rank_draws_the_smoothed_curve_it_was_given(curves):
    figure = figures.loss_vs_rank(curves, lr=1e-4)
    lora = figure.axes[0]
    r8 = next(line for line in bold_lines(lora) if line.get_label() == "8")
    expected = curves[(curves["method"] == "lora") & (curves["rank"] == 8) & np.isclose(curves["lr"], 1e-4)]
    assert_expected(r8.get_ydata(), expected.sort_values("step")["smoothed"].to_numpy(), rtol=1e-7, atol=0)
    assert "1e-4" in figure._suptitle.get_text()


def test_loss_vs_lr_curves_are_learning_rates(curves, phases):
    figure = figures.loss_vs_lr(curves, phases)
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert titles == ["LoRA", "LoRA-MGPO", "Full FT"]  # full has two lrs; one-lr methods get no panel
    assert [line.get_label() for line in bold_lines(figure.axes[0])] == ["1e-4", "5e-4", "1e-3"]
    assert "rank 8" in figure._suptitle.get_text()


def test_loss_figures_need_a_sweep(tmp_path):
    write_fake_run(tmp_path, method="lora", rank=8)
    table = load_runs(tmp_path)
    one_run = load_metrics(table, table="smoothed_loss")
    with pytest.raises(figures.NotEnoughRuns, match="two or more ranks"):
        figures.loss_vs_rank(one_run)
    with pytest.raises(figures.NotEnoughRuns, match="two or more learning rates"):
        figures.loss_vs_lr(one_run)
    with pytest.raises(figures.NotEnoughRuns, match="two or more"):
        figures.phase_map(table)


def test_loss_by_method_a_panel_per_shared_cell_a_line_per_seed(curves):
    figure = figures.loss_by_method(curves)
    panels = [ax for ax in figure.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in panels]
    assert "rank 32, lr 5e-4" in titles  # LoRA and LoRA-MGPO there, full FT at that lr too
    panel = panels[titles.index("rank 32, lr 5e-4")]
    colors = [to_hex(line.get_color()) for line in panel.get_lines()]
    lora_runs = curves[(curves["method"] == "lora") & (curves["rank"] == 32) & (curves["lr"] == 5e-4)]["run_id"]
    assert colors.count(figures.method_color("lora").lower()) == lora_runs.nunique() == 2  # one line per seed
    assert figures.method_color("full").lower() in colors
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels[:3] == ["LoRA", "LoRA-MGPO", "Full FT"]  # each method once, whatever its panels
    with pytest.raises(figures.NotEnoughRuns, match="two or more methods"):
        figures.loss_by_method(curves[curves["method"] == "lora"])


def test_phase_map_cells_say_what_each_run_did(runs_table):
    figure = figures.phase_map(runs_table)
    lora = next(ax for ax in figure.axes if ax.get_title() == "LoRA")
    assert [ax.get_title() for ax in figure.axes if ax.get_title()] == ["LoRA", "LoRA-MGPO", "Full FT"]
    cells = lora.images[0].get_array()
    outcomes = list(figures.OUTCOME_COLORS)
    # rows: ranks 8, 32, 128; columns: lr 1e-4, 5e-4, 1e-3 (origin lower)
    assert [outcomes[int(v)] for v in cells[0]] == ["smooth"] * 3
    assert outcomes[int(cells[1, 1])] == "double descent"
    assert outcomes[int(cells[2, 2])] == "collapse"
    texts = [text.get_text() for text in lora.texts]
    assert any(text.startswith("rise ") and "%\n" in text and text.endswith("\n2 seeds") for text in texts)
    assert lora.get_xlabel() == "learning rate" and lora.get_ylabel() == "rank r"


def test_phase_map_says_when_a_metric_was_measured_on_some_seeds_only(runs_table):
    """gsm's exact match is measured after training on the runs still on disk: a cell's mean is over
    those, and says how many."""
    two_seeds = runs_table.groupby(["method", "rank", "lr"])["run_id"].transform("size") == 2
    first_of_each = two_seeds & ~runs_table.duplicated(["method", "rank", "lr"])
    partly = runs_table.assign(eval_metric=runs_table["eval_metric"].where(~first_of_each))
    texts = [text.get_text() for ax in figures.phase_map(partly).axes for text in ax.texts]
    assert any("(1/2)" in text for text in texts)
    assert not any("(1/2)" in text for ax in figures.phase_map(runs_table).axes for text in
                   [t.get_text() for t in ax.texts])


def test_sharpness_against_rank_lr_and_steps_in_method_colours(runs_table):
    rows = load_metrics(runs_table, table="sharpness")
    figure = figures.sharpness(rows)
    by_rank, by_lr, over_training = figure.axes
    assert by_rank.get_xlabel() == "rank r" and by_lr.get_xlabel() == "learning rate"
    assert over_training.get_xlabel() == "step (optimizer steps)"
    for ax in (by_rank, by_lr):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert to_hex(lines["LoRA"].get_color()) == figures.method_color("lora").lower()
        assert to_hex(lines["LoRA-MGPO"].get_color()) == figures.method_color("lora+mgpo").lower()
    lora_by_rank = {line.get_label(): line for line in by_rank.get_lines()}["LoRA"]
    assert_expected(lora_by_rank.get_xdata(), [8, 32, 128], rtol=1e-7, atol=0)
    final = figures.final_sharpness(rows)
    assert (final["source"] == "checkpoint").all() and (final["eigen_rank"] == 1).all()


def test_sharpness_by_method_marks_seed_means_of_eigenvalue_and_trace(runs_table):
    rows, traces = load_metrics(runs_table, table="sharpness"), load_metrics(runs_table, table="trace")
    figure = figures.sharpness_by_method(rows, traces)
    axes = [ax for ax in figure.axes if ax.get_visible()]
    assert len(axes) == 6  # three cells (r 32 / 5e-4 first: the most runs) x eigenvalue and trace rows
    titles = [ax.get_title() for ax in axes[:3]]
    assert "rank 32, lr 5e-4" in titles
    column = titles.index("rank 32, lr 5e-4")
    top, trace = axes[column], axes[3 + column]
    assert [label.get_text() for label in top.get_xticklabels()] == ["LoRA", "LoRA-MGPO"]
    base = {"lora": 2.0 * 32 ** 0.5 / 5e-4 ** 0.1, "lora+mgpo": 32 ** 0.5 / 5e-4 ** 0.1}
    def assert_means(ax, factor):
        """One mean line per method at ``factor`` x its base value, in the method's colour."""
        lines = {c.get_label()[5:]: c for c in ax.collections if c.get_label().startswith("mean ")}
        assert sorted(lines) == sorted(base)
        for method, line in lines.items():
            assert to_hex(line.get_color()[0]) == figures.method_color(method).lower()
            assert_expected(line.get_segments()[0][0][1], factor * base[method], rtol=1e-6, atol=1e-12, msg=method)

    # seeds 0 and 1 measured 1x and 2x the base value: the mean line sits at 1.5x, in the method's colour
    assert_means(top, 1.5)
    assert_means(trace, 15)
    others = [axes[3 + i] for i in range(3) if i != column]
    assert all(ax.texts[0].get_text() == "not measured" for ax in others)  # no trace there: said, not drawn
    assert "on 8 held-out examples" in figure._suptitle.get_text()
    one_method = rows[rows["method"] == "lora"]
    with pytest.raises(figures.NotEnoughRuns, match="two or more methods"):
        figures.sharpness_by_method(one_method)
    # the training loss's rows (3x the eval values in the fake runs), which the eval figure above left out
    train = figures.sharpness_by_method(rows, traces, split="train")
    train_axes = [ax for ax in train.axes if ax.get_visible()]
    train_top = train_axes[[ax.get_title() for ax in train_axes[:3]].index("rank 32, lr 5e-4")]
    assert_means(train_top, 4.5)
    assert "training-loss Hessian on 8 training examples" in train._suptitle.get_text()
    with pytest.raises(figures.NotEnoughRuns):
        figures.sharpness_by_method(rows[rows["split"] == "eval"], traces, split="train")


def test_spectrum_overlays_a_lora_and_an_mgpo_run(runs_table):
    figure = figures.spectrum(load_metrics(runs_table, table="density"))
    (ax,) = figure.axes
    curves = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    assert [to_hex(line.get_color()) for line in curves] == [figures.method_color("lora").lower(),
                                                             figures.method_color("lora+mgpo").lower()]
    assert ax.get_yscale() == "log"
    # The planted outlier eigenvalue: LoRA's density peaks near 30, MGPO's near 15.
    lora_x, lora_y = curves[0].get_xdata(), curves[0].get_ydata()
    assert 25 < lora_x[np.argmax(np.where(lora_x > 5, lora_y, 0))] < 32


def test_spectrum_integrates_to_one(runs_table):
    density = load_metrics(runs_table, table="density")
    figure = figures.spectrum(density, sigma=0.05, n_grid=20000)
    line = figure.axes[0].get_lines()[0]
    assert_expected(np.trapezoid(line.get_ydata(), line.get_xdata()), 1.0, rtol=1e-3, atol=1e-12)


def test_mgpo_state_panels_and_cap(grid_root):
    from dynamics import load_run

    run_dir = next(p for p in grid_root.iterdir() if p.name.startswith("lora+mgpo-r8-lr0.0005"))
    run = load_run(run_dir)
    figure = figures.mgpo_state(run.metrics, run.layers, apn_cap=10.0)
    titles = [ax.get_title() for ax in figure.axes]
    assert "APN factor c per layer" in titles and "gradient-norm EMA (eq. 8)" in titles
    apn = next(ax for ax in figure.axes if ax.get_title() == "adaptive perturbation normalisation")
    assert any(line.get_label() == "cap 10" for line in apn.get_lines())
    heat = next(ax for ax in figure.axes if ax.get_title() == "APN factor c per layer")
    assert [t.get_text() for t in heat.get_yticklabels()] == ["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"]
    lora = load_run(next(p for p in grid_root.iterdir() if p.name.startswith("lora-r8-lr0.0005")))
    with pytest.raises(figures.NotEnoughRuns, match="perturbation"):
        figures.mgpo_state(lora.metrics, lora.layers)


def test_ablation_bars_are_the_task_metric_at_one_setting(runs_table):
    figure = figures.ablation(runs_table)
    metric_ax, loss_ax = figure.axes
    assert [t.get_text() for t in metric_ax.get_xticklabels()] == ["LoRA", "LoRA + MGPO w/o APN", "LoRA-MGPO"]
    assert_expected([bar.get_height() for bar in metric_ax.patches], [20, 22, 25], rtol=1e-7, atol=0)
    assert metric_ax.get_ylabel() == "exact match (%)"
    assert "rank 8, lr 5e-4" in metric_ax.get_title()
    assert "nats/token" in loss_ax.get_ylabel()


def test_noise_compares_perturbations(runs_table):
    figure = figures.noise(runs_table)
    labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert labels == ["Full FT", "LoRA", "LoRA + random noise", "LoRA + SAM", "LoRA-MGPO"]


def test_cost_table_is_relative_to_lora(runs_table):
    metrics = load_metrics(runs_table, table="metrics")
    table = cost_table(runs_table, metrics).set_index("method")
    assert_expected(table.loc["lora", "step_time_s_vs_lora"], 1.0, rtol=1e-6, atol=1e-12)
    assert_expected(table.loc["lora+mgpo", "step_time_s_vs_lora"], 1.15, rtol=1e-6, atol=1e-12)
    assert_expected(table.loc["lora+sam", "step_time_s_vs_lora"], 2.0, rtol=1e-6, atol=1e-12)
    assert_expected(table.loc["full", "trainable_params_vs_lora"], 135_000_000 / 8000, rtol=1e-6, atol=1e-12)
    assert_expected(table.loc["lora+mgpo", "peak_mem_mb_vs_lora"], 1.04, rtol=1e-6, atol=1e-12)
    figure = figures.cost(table.reset_index())
    assert [ax.get_title() for ax in figure.axes] == ["trainable parameters", "peak memory", "time per step"]


def test_method_colours_are_fixed_and_distinct():
    main_methods = ["lora", "lora+mgpo", "lora+mgpo-noapn", "lora+noise", "lora+sam", "lora+msam", "full"]
    colours = [figures.method_color(m) for m in main_methods]
    assert len(set(colours)) == len(colours)
    assert figures.method_color("dora+mgpo") == figures.method_color("dora+mgpo")
    assert figures.method_label("lora+mgpo") == "LoRA-MGPO"
    assert figures.method_label("dora+noise") == "DoRA + random noise"


def test_runs_of_one_method_at_other_knobs_are_variants_not_seeds():
    runs = pd.DataFrame({"run_id": list("abcde"), "task": "bbc",
                         "method": ["lora+mgpo", "lora+mgpo", "lora+mgpo", "lora", "lora+noise"],
                         "rho": [0.05, 0.05, 0.2, 0.05, 0.05], "mu": 0.9, "beta": 0.9,
                         "apn_cap": [10.0, 1.0, 10.0, 10.0, 10.0]})
    named = figures.method_variants(runs).set_index("run_id")["method"]
    # the paper's bbc knobs (rho 0.05) and the reference cap 10 keep the plain name
    assert named.to_dict() == {"a": "lora+mgpo", "b": "lora+mgpo[apn_cap=1]", "c": "lora+mgpo[rho=0.2]",
                               "d": "lora", "e": "lora+noise"}
    assert figures.method_label("lora+mgpo[apn_cap=1]") == "LoRA-MGPO (apn_cap 1)"
    assert figures.method_label("lora+mgpo[rho=0.2,apn_cap=1]") == "LoRA-MGPO (rho 0.2, apn_cap 1)"
    colours = [figures.method_color(m) for m in named]
    assert len(set(colours)) == len(colours)  # each variant its own shade of its method's colour
    # no run at the defaults: the most common setting keeps the plain name
    off_default = runs.assign(rho=[0.01, 0.01, 0.2, 0.05, 0.05], apn_cap=10.0)
    named = figures.method_variants(off_default).set_index("run_id")["method"]
    assert named[["a", "b", "c"]].tolist() == ["lora+mgpo", "lora+mgpo", "lora+mgpo[rho=0.2]"]
    assert figures.method_variants(runs.iloc[[0, 3]]).equals(runs.iloc[[0, 3]])  # one setting: unchanged


def test_ablation_shows_a_variant_beside_its_method(runs_table):
    mgpo = runs_table[runs_table["method"] == "lora+mgpo"]
    capped = mgpo.assign(run_id=mgpo["run_id"] + "-cap1", apn_cap=1.0, eval_metric=0.5)
    figure = figures.ablation(figures.method_variants(pd.concat([runs_table, capped], ignore_index=True)))
    labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert labels == ["LoRA", "LoRA + MGPO w/o APN", "LoRA-MGPO", "LoRA-MGPO (apn_cap 1)"]
    assert_expected(figure.axes[0].patches[-1].get_height(), 50, rtol=1e-6, atol=1e-12)


# --- the command --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def figures_command(grid_root, tmp_path_factory):
    """``dynamics figures`` on the fake grid, once for the module: (out folder, exit status,
    stdout, stderr)."""
    out = tmp_path_factory.mktemp("figures-command") / "figures"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["figures", str(grid_root), "--out", str(out)])
    return out, code, stdout.getvalue(), stderr.getvalue()


def test_figures_command_writes_every_figure_and_an_index(grid_root, figures_command):
    out, code, stdout, stderr = figures_command
    assert code == 0
    for name in FIGURE_NAMES:
        assert (out / f"{name}.png").stat().st_size > 10_000
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    assert (out / "cost.csv").read_text().startswith("task,method,")
    assert "| LoRA-MGPO |" in (out / "cost.md").read_text()
    index = (out / "index.md").read_text()
    assert all(f"## {name}" in index for name in FIGURE_NAMES)
    assert f"dynamics figures {grid_root} --out {out} --only loss_vs_rank" in index
    assert "`lora+mgpo-r32-lr0.0005-s1-" in index  # run ids, traceable to their folders
    assert len([line for line in stderr.splitlines() if line.startswith("figures: ")]) == len(FIGURE_NAMES) + 1
    assert stdout.split() == [str(out / f"{name}.png") for name in FIGURE_NAMES]
    assert not list(out.glob(".*.tmp*"))


def test_figures_only_rewrites_its_figures_and_keeps_the_index(grid_root, figures_command, tmp_path):
    out = tmp_path / "figures"
    shutil.copytree(figures_command[0], out)  # every figure drawn, their times kept (copy2)
    before = {name: (out / f"{name}.png").stat().st_mtime_ns for name in FIGURE_NAMES}
    make_figures([grid_root], out, only="cost,spectrum", log=lambda line: None)
    after = {name: (out / f"{name}.png").stat().st_mtime_ns for name in FIGURE_NAMES}
    assert {name for name in FIGURE_NAMES if after[name] != before[name]} == {"cost", "spectrum"}
    assert all(f"## {name}" in (out / "index.md").read_text() for name in FIGURE_NAMES)


def test_figures_skips_with_one_line_naming_the_grid(tmp_path):
    for rank in (8, 32):
        write_fake_run(tmp_path / "runs", method="lora", rank=rank, kind="bump")
    lines: list[str] = []
    written = make_figures([tmp_path / "runs"], tmp_path / "figures", log=lines.append)
    assert set(written) == {"loss_vs_rank", "phase_map"}
    skipped = {line.split()[1]: line for line in lines if "skipped" in line}
    assert "grids/lr_sweep.toml" in skipped["loss_vs_lr"]
    assert "dynamics analyze --density" in skipped["spectrum"] and "lora-r8-" in skipped["spectrum"]
    assert "grids/apn_ablation_gsm.toml" in skipped["ablation"]
    assert all(len(line.splitlines()) == 1 for line in lines)


def test_figures_of_one_run_folder(grid_root, tmp_path):
    run_dir = next(p for p in grid_root.iterdir() if p.name.startswith("lora+mgpo-r8-lr0.0005"))
    written = make_figures([run_dir], tmp_path / "figures", log=lambda line: None)
    assert set(written) == {"mgpo_state", "sharpness"}  # this run logged sharpness over training
    assert figures_drawn_from_one_run(tmp_path / "figures" / "index.md") == {run_dir.name}


def figures_drawn_from_one_run(index: Path) -> set[str]:
    runs_lines = [line for line in index.read_text().splitlines() if line.startswith("- runs (")]
    return {run_id.strip("` ") for line in runs_lines for run_id in line.split(": ", 1)[1].split(", ")}


@pytest.mark.parametrize("arguments, message", [
    (["--only", "loss_vs_rnak"], "--only loss_vs_rnak: unknown figure loss_vs_rnak; allowed: loss_vs_rank,"),
    (["{empty}"], "not a run folder (no config.json) and holds no run folders"),
    (["{absent}"], "no such run folder or folder of runs"),
])
def test_figures_bad_input_is_one_line_and_exit_2(grid_root, tmp_path, capsys, arguments, message):
    (tmp_path / "empty").mkdir()
    arguments = [a.format(empty=tmp_path / "empty", absent=tmp_path / "absent") for a in arguments]
    paths = [] if arguments[0].startswith("--") else arguments
    options = arguments if arguments[0].startswith("--") else []
    out = tmp_path / "out"
    code = main(["figures", *(paths or [str(grid_root)]), "--out", str(out), *options])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and message in error
    assert not out.exists()


def test_figure_code_does_not_import_torch(grid_root):
    code = ("import sys; from dynamics import figures, figure_set; from dynamics.runs import load_runs, load_metrics; "
            f"t = load_runs({str(grid_root)!r}); figures.phase_map(t); "
            "figures.loss_vs_rank(load_metrics(t, table='smoothed_loss'), load_metrics(t, table='phases')); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


def test_sixteen_step_runs_are_drawn(tmp_path):
    """A quick try shorter than the smoothing window still has its loss curves drawn."""
    for rank in (8, 32):
        write_fake_run(tmp_path / "runs", method="lora", rank=rank, steps=16, loss=np.linspace(2.0, 1.0, 16))
    lines: list[str] = []
    written = make_figures([tmp_path / "runs"], tmp_path / "figures", only="loss_vs_rank", log=lines.append)
    assert set(written) == {"loss_vs_rank"}, lines
