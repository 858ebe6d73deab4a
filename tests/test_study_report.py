"""grids/study/report.py, the script behind docs/results.md's numbers: seed aggregation, paired
differences and the learned-only rise, on a hand-made run table."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

REPORT = Path(__file__).resolve().parents[1] / "grids" / "study" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("study_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table():
    rows = []
    for seed, (lora_acc, mgpo_acc, lora_rise, mgpo_rise) in enumerate([(0.90, 0.95, 0.30, 0.10),
                                                                       (0.92, 0.93, 0.20, 0.00)]):
        rows.append(dict(method="lora", rank=8, lr=5e-3, seed=seed, eval_metric=lora_acc, final_loss=0.1,
                         rise_of_start=lora_rise, steps_lost=50, outcome="double descent"))
        mgpo_outcome = "smooth" if mgpo_rise == 0 else "double descent"
        rows.append(dict(method="lora+mgpo", rank=8, lr=5e-3, seed=seed, eval_metric=mgpo_acc, final_loss=0.05,
                         rise_of_start=mgpo_rise, steps_lost=0, outcome=mgpo_outcome))
    # a seed that collapsed: its rise must not enter the mean rise, its accuracy must enter the mean accuracy
    rows.append(dict(method="lora", rank=8, lr=5e-3, seed=2, eval_metric=0.24, final_loss=1.6, rise_of_start=0.9,
                     steps_lost=None, outcome="collapse"))
    return pd.DataFrame(rows).assign(eval_macro_f1=lambda t: t["eval_metric"], top_eigenvalue=None)


def test_cells_average_over_seeds_and_rises_over_runs_that_learned(report):
    cells = report.cell_table(table(), ["method"]).set_index("method")
    assert cells.loc["lora", "seeds"] == 3
    assert cells.loc["lora", "outcomes"] == "2 double descent, 1 collapse"
    assert cells.loc["lora", "rise % of start"] == "25 ± 7"  # 30 and 20; the collapse's 90 left out
    accuracies = pd.Series([0.90, 0.92, 0.24])
    assert cells.loc["lora", "eval acc"] == f"{accuracies.mean():.3f} ± {accuracies.std():.3f}"
    assert cells.loc["lora+mgpo", "λ_max"] == "-"


def test_paired_differences_match_seeds(report):
    pairs = report.paired(table(), "lora+mgpo", "lora", ["rank", "lr"]).iloc[0]
    assert pairs["pairs"] == 2  # seed 2 has no MGPO run
    assert pairs["Δ eval acc"] == f"{0.03:.3f} ± {pd.Series([0.05, 0.01]).std():.3f}"
    assert pairs["Δ rise % of start (both learned)"] == "-20 ± 0"
    assert pairs["outcomes"] == "double descent vs double descent / smooth vs double descent"


def test_gsm_half_reads_eval_loss_not_accuracy(report):
    runs = table().assign(eval_loss=lambda t: 1.0 + t["seed"] / 10 + (t["method"] == "lora+mgpo") * 0.5)
    cells = report.cell_table(runs, ["method"], report.GSM_METRICS).set_index("method")
    assert "eval acc" not in cells.columns
    assert cells.loc["lora+mgpo", "eval loss"] == f"{1.55:.3f} ± {pd.Series([1.5, 1.6]).std():.3f}"
    pairs = report.paired(runs, "lora+mgpo", "lora", ["rank", "lr"], report.GSM_METRICS[0]).iloc[0]
    assert pairs["Δ eval loss"] == "0.500 ± 0.000"
    assert report.STUDIES["gsm"]["settings"]["model"] == "smollm2-135m"
