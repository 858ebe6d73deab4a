"""studies/report.py, the script behind docs/results.md's numbers: seed aggregation, paired
differences and the learned-only rise, on a hand-made run table."""

import numpy as np
import pandas as pd
import pytest
from helpers import assert_expected

from studies import report as study_report


@pytest.fixture(scope="module")
def report():
    return study_report


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
    runs = table().assign(eval_loss=lambda t: 1.0 + t["seed"] / 10 + (t["method"] == "lora+mgpo") * 0.5,
                          eval_metric=lambda t: np.where(t["method"] == "lora", np.nan, 1 / 61),
                          em_last_number=lambda t: np.where(t["method"] == "lora", np.nan, 3 / 61))
    cells = report.cell_table(runs, ["method"], report.GSM_METRICS).set_index("method")
    assert "eval acc" not in cells.columns
    assert cells.loc["lora", "exact match"] == "-"  # not measured
    assert cells.loc["lora+mgpo", "EM, last number"] == f"{3 / 61:.3f} ± 0.000"
    # a metric measured on some of a cell's runs says so
    runs.loc[(runs["method"] == "lora+mgpo") & (runs["seed"] == 1), "eval_metric"] = np.nan
    cells = report.cell_table(runs, ["method"], report.GSM_METRICS).set_index("method")
    assert cells.loc["lora+mgpo", "exact match"] == f"{1 / 61:.3f} (1 of 2 runs)"
    assert cells.loc["lora+mgpo", "eval loss"] == f"{1.55:.3f} ± {pd.Series([1.5, 1.6]).std():.3f}"
    pairs = report.paired(runs, "lora+mgpo", "lora", ["rank", "lr"], report.GSM_METRICS[:1]).iloc[0]
    assert pairs["Δ eval loss"] == "0.500 ± 0.000"
    assert report.STUDIES["gsm"]["settings"]["model"] == "smollm2-135m"


def ledger_rows():
    rows = table().assign(run_id=lambda t: [f"{m}-s{s}" for m, s in zip(t["method"], t["seed"])], status="completed",
                          rho=0.05, apn_cap=10.0,
                          eval_loss=0.2, double_descent=lambda t: t["outcome"] == "double descent", n_episodes=1,
                          descended=True, loss_drop=0.9, final_drop=lambda t: 1 - t["final_loss"] / 1.6,
                          rises=lambda t: ["120-131 170-180", "", "118-130", "", ""])
    rows.loc[rows["outcome"] == "collapse", "final_drop"] = 0.0  # a collapse gave its descent back
    return rows


def test_ledger_keeps_first_runs_and_records_re_runs_beside_them(report, tmp_path):
    ledger = ledger_rows()
    first_csv, reruns_csv = tmp_path / "runs.csv", tmp_path / "reruns.csv"
    ledger.to_csv(first_csv, index=False)
    # on disk: a re-run of lora seed 0 that reproduces it, one of lora+mgpo seed 1 that does not, one new run
    on_disk = pd.concat([ledger.iloc[[0]], ledger.iloc[[3]].assign(final_loss=0.07),
                         ledger.iloc[[1]].assign(run_id="new", seed=5)]).assign(on_disk=True, path="somewhere",
                                                                                 started_at="2026-12-05T02:00:00")
    lines = []
    measured = report.ledgers(on_disk, first_csv, reruns_csv, {"task": "bbc"}, log=lines.append)
    first = measured.first.set_index("run_id")
    assert len(first) == 6 and first.loc["lora+mgpo-s1", "final_loss"] == 0.05  # the first measurement stays
    assert first.loc["new", "on_disk"] and not first.loc["lora-s0", "on_disk"]
    assert (first.loc[~first["on_disk"].astype(bool), "task"] == "bbc").all()
    assert sorted(measured.reruns["run_id"]) == ["lora+mgpo-s1", "lora-s0"]
    assert measured.latest.set_index("run_id").loc["lora+mgpo-s1", "final_loss"] == 0.07
    assert "report: lora+mgpo-s1: re-run final_loss 0.07, first run 0.05" in lines
    assert "report: 1 of 2 re-runs reproduce their first run's final_loss, eval_loss, eval_metric" in lines
    replication = report.replication_table(measured).set_index("seed")
    assert replication["reproduced"].tolist() == ["yes", "no"]
    assert replication.loc[1, "final loss"] == "0.05 / 0.07"
    # the ledger written back, read again with the same folders on disk: the new run is its own row
    # (same started_at), not a re-run of itself
    measured.first.to_csv(first_csv, index=False)
    measured.reruns.to_csv(reruns_csv, index=False)
    again = report.ledgers(on_disk, first_csv, reruns_csv, {"task": "bbc"}, log=lambda line: None)
    assert sorted(again.reruns["run_id"]) == ["lora+mgpo-s1", "lora-s0"] and len(again.first) == 6
    replaced = report.ledgers(on_disk, first_csv, reruns_csv, {}, replace=True, log=lambda line: None)
    assert replaced.first.set_index("run_id").loc["lora+mgpo-s1", "final_loss"] == 0.07
    # a later session re-runs lora+mgpo seed 1 again: a second re-run row, the earlier one kept
    later = ledger.iloc[[3]].assign(final_loss=0.05, on_disk=True, path="elsewhere", started_at="2026-12-06T04:00:00")
    third = report.ledgers(later, first_csv, reruns_csv, {}, log=lambda line: None)
    reruns = third.reruns[third.reruns["run_id"] == "lora+mgpo-s1"]
    assert sorted(reruns["final_loss"]) == [0.05, 0.07] and len(third.reruns) == 3
    assert third.latest.set_index("run_id").loc["lora+mgpo-s1", "final_loss"] == 0.05  # the latest re-run
    assert third.first_reruns.set_index("run_id").loc["lora+mgpo-s1", "final_loss"] == 0.07  # the earliest
    assert report.replication_table(third)["re-run"].tolist()[-1] == "2026-12-06"


def test_ledger_rows_name_outcomes_their_numbers_no_longer_give(report, tmp_path):
    ledger = ledger_rows()
    ledger.loc[0, "outcome"] = "smooth"  # its numbers say double descent
    ledger.to_csv(tmp_path / "runs.csv", index=False)
    lines = []
    report.ledgers(ledger.iloc[:0].assign(on_disk=True, path=None, started_at=None), tmp_path / "runs.csv",
                   tmp_path / "reruns.csv", {}, log=lines.append)
    assert f"report: lora-s0: {tmp_path / 'runs.csv'} says smooth, its numbers now read double descent" in lines


def test_rise_table_reads_the_ledger_rises(report, tmp_path):
    ledger = ledger_rows()
    ledger.to_csv(tmp_path / "runs.csv", index=False)
    measured = report.ledgers(ledger.iloc[:0].assign(on_disk=True, path=None, started_at=None), tmp_path / "runs.csv",
                              tmp_path / "reruns.csv", {}, log=lambda line: None)
    rises = report.rise_steps_table(measured.first)
    assert rises[["seed", "start", "peak", "method"]].values.tolist() == [
        [0, 120, 131, "lora"], [0, 170, 180, "lora"], [1, 118, 130, "lora"]]


def test_runs_where_one_collapsed_get_a_blowup_row_and_others_none(report):
    runs = table().assign(rho=0.01, apn_cap=10.0, eval_loss=1.0, min_loss=0.5, min_step=10, above_start_step=40.0,
                          peak_loss=8.0, peak_step=60, below_start_step=float("nan"), doubled_step=45.0)
    elsewhere = runs.iloc[[0]].assign(lr=1e-3, outcome="collapse", seed=5)
    rows = report.blowup_table(pd.concat([runs, elsewhere], ignore_index=True))
    at_cell = rows[rows["lr"] == 5e-3]
    assert len(at_cell) == 5  # the collapsed LoRA seed and every other run at its (rank, lr)
    collapsed = at_cell[at_cell["outcome"] == "collapse"].iloc[0]
    assert collapsed["peak loss (step)"] == "8.00 (60)" and collapsed["at 2x start at step"] == "45"
    assert collapsed["below start again at step"] == "-"
    assert rows[rows["lr"] == 1e-3]["seed"].tolist() == [5]


def test_a_metric_the_task_does_not_measure_does_not_stop_the_replication_check(report):
    first = pd.Series({"final_loss": 5.21725, "eval_loss": 5.46772, "eval_metric": np.nan})
    again = pd.Series({"final_loss": 5.217251, "eval_loss": 5.46772, "eval_metric": None})
    assert report._differences(first, again) == []
    moved = pd.concat([again.drop("eval_loss"), pd.Series({"eval_loss": 5.4})])
    assert report._differences(first, moved) == ["eval_loss"]


def test_generation_numbers_read_the_last_checkpoint(report):
    """Exact match's companions: how many wrote "#### N" at all, and the lenient last-number reading."""
    generations = pd.DataFrame({"step": [100, 200, 200, 200], "problem": [0, 0, 1, 2],
                                "reference": ["7", "7", "12", "5"],
                                "text": ["#### 9", "3 + 4 = 7\n#### 7", "so 12 apples", "#### 6, or 5"]})
    numbers = report.generation_numbers(generations)
    assert numbers["em_problems"] == 3  # step 200 only
    assert_expected(numbers["em_answered"], 2 / 3, rtol=1e-6, atol=1e-12)
    # 7, 12 and 5 are each the last number written
    assert_expected(numbers["em_last_number"], 1.0, rtol=1e-6, atol=1e-12)
    assert np.isnan(report.generation_numbers(generations.iloc[:0])["em_problems"])


def test_training_loss_curvature_is_aggregated_and_paired_beside_the_eval_loss(report):
    runs = table().assign(top_eigenvalue=lambda t: 10.0 + t["seed"], hessian_trace=-50.0, hessian_trace_se=5.0,
                          curvature_examples=32,
                          top_eigenvalue_train=lambda t: np.where(t["method"] == "lora", 4.0, 2.0) * (1 + t["seed"]),
                          hessian_trace_train=lambda t: 20.0 * (1 + t["seed"]), hessian_trace_train_se=2.0,
                          curvature_examples_train=32, curvature_loss=0.2, curvature_loss_train=0.01)
    runs.loc[runs["seed"] == 2, "top_eigenvalue_train"] = np.nan  # not measured on the train split
    cells = report.curvature_table(runs, ["method"], split="train").set_index("method")
    assert cells.loc["lora", "seeds"] == 2 and cells.loc["lora", "train examples"] == "32"
    assert cells.loc["lora", "λ_max"] == f"6.0 ± {pd.Series([4.0, 8.0]).std():.1f}"
    assert cells.loc["lora", "tr(H)"] == "30 ± 14" and cells.loc["lora", "tr(H) standard error (mean)"] == "2"
    assert cells.loc["lora", "loss there"] == "0.0100 ± 0.0000"
    assert report.curvature_table(runs, ["method"]).set_index("method").loc["lora", "seeds"] == 3  # eval: all
    pairs = report.curvature_pairs(runs).iloc[0]
    assert (pairs["method"], pairs["pairs"]) == ("lora+mgpo", 2)
    assert pairs["λ_max train / lora's"] == "0.50 0.50" and pairs["lower (train)"] == "2 of 2"
    assert pairs["λ_max eval / lora's"] == "1.00 1.00" and pairs["lower (eval)"] == "0 of 2"
    # the training-loss λ_max ranked against its loss: a perfect rank order is ρ = 1
    learned = runs[runs["outcome"] != "collapse"].assign(curvature_loss_train=lambda t: t["top_eigenvalue_train"] / 100)
    correlations = report.curvature_correlations(learned).set_index("training-loss λ_max against")
    assert correlations.loc["training loss on the same examples", "Spearman ρ"] == "1.00"
    assert correlations.loc["training loss on the same examples", "runs"] == 4


def test_the_report_writes_into_this_repository(report):
    assert (report.ROOT / "studies" / "report.py").is_file()
    assert report.STUDY == report.ROOT / "docs" / "study" and (report.STUDY / "tables.md").is_file()
