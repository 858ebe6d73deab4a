"""What a run did (dynamics.analysis.outcomes): the outcome label, and how a loss blew up; and that
the label, the phases table and the run table agree on a run that rises and never comes back."""

import numpy as np
import pandas as pd
import pytest
from fake_runs import write_fake_run

import dynamics
from dynamics.analysis import OUTCOMES, blowup, cost_table, detect_phases, phase_summary, run_outcome


def test_run_outcome_covers_diverged_runs():
    assert run_outcome({"status": "diverged", "final_loss": float("nan")}) == "diverged"
    assert run_outcome({"status": "completed", "final_loss": 1.0, "double_descent": True}) == "double descent"
    assert run_outcome({"status": "completed", "final_loss": 1.0, "double_descent": False,
                                "n_episodes": 1}) == "collapse"
    assert run_outcome({"status": "completed", "final_loss": 1.0, "double_descent": False,
                                "n_episodes": 0}) == "smooth"
    # stuck at its start: whatever the detector found, it learned nothing; unknown (None) is not "stuck"
    assert run_outcome({"status": "completed", "final_loss": 1.61, "double_descent": True, "n_episodes": 1,
                                "descended": False}) == "no descent"
    assert run_outcome({"status": "completed", "final_loss": 1.0, "double_descent": True,
                                "descended": None}) == "double descent"
    # never descended but blew up from the start and stayed up (SmolLM2, r 128, lr 5e-3: 1.4 -> 5.2)
    assert run_outcome({"status": "completed", "final_loss": 5.2, "double_descent": False, "n_episodes": 0,
                                "descended": False, "final_drop": -2.7}) == "collapse"
    assert run_outcome({"status": "completed", "final_loss": 1.63, "double_descent": False, "n_episodes": 0,
                                "descended": False, "final_drop": -0.01}) == "no descent"
    # learned, then gave it all back slowly (no rise the detector calls a divergence): a collapse
    assert run_outcome({"status": "completed", "final_loss": 1.6, "double_descent": False, "n_episodes": 0,
                                "descended": True, "final_drop": 0.02}) == "collapse"
    assert run_outcome({"status": "completed", "final_loss": 0.1, "double_descent": False, "n_episodes": 0,
                                "descended": True, "final_drop": 0.9}) == "smooth"
    # climbed from its first steps, came back and learned (SmolLM2 past its edge, two seeds of five)
    climbed = {"status": "completed", "final_loss": 0.46, "double_descent": False, "n_episodes": 0,
               "descended": True, "final_drop": 0.7, "rose_from_start": True}
    assert run_outcome(climbed) == "rise from start"
    assert run_outcome({**climbed, "rose_from_start": None}) == "smooth"  # not measured: as before
    assert run_outcome({**climbed, "final_drop": 0.02}) == "collapse"  # came back, but not below its start



def test_blowup_finds_the_minimum_the_return_above_start_and_the_peak():
    # a collapse: 2.0 -> 1.0 by step 40, flat to step 60, back above 2.0 at step 69, 8.0 from step 120
    steps = pd.Series(range(1, 201))
    loss = steps.map(lambda t: 2.0 - t / 40 if t <= 40 else 1.0 if t <= 60 else min(1.0 + (t - 60) * 7 / 60, 8.0))
    numbers = blowup(loss, steps)
    assert numbers["min_loss"] == pytest.approx(1.0, abs=0.01) and 40 <= numbers["min_step"] <= 60
    assert abs(numbers["above_start_step"] - 69) <= 3  # the smoothed start is ~2 (the median filter keeps the ends)
    assert numbers["peak_loss"] == pytest.approx(8.0, abs=0.01) and numbers["peak_step"] >= 120
    assert pd.isna(numbers["below_start_step"])  # a collapse never comes back
    assert abs(numbers["doubled_step"] - 86) <= 3  # 1 + (t - 60) * 7 / 60 >= 2 * 2
    back_down = loss.where(steps <= 120, (8.0 - (steps - 120) * 0.1).clip(lower=0.5))
    recovers = blowup(back_down, steps)
    assert abs(recovers["below_start_step"] - 181) <= 3  # 8 - (t - 120) / 10 < 2
    # a run that only descends: its peak is the start, and it never goes back above it
    smooth = blowup(2.0 / steps ** 0.2, steps)
    assert smooth["peak_step"] == 1 and pd.isna(smooth["above_start_step"])


def climb_and_stay(steps: int = 200, seed: int = 0) -> np.ndarray:
    """SmolLM2 past its edge (gsm, r 128, lr 5e-3): 2.2 for 20 steps, a climb to 8 by step 60, and
    8 to the end, with 2 % noise; it never descended first."""
    step = np.arange(1, steps + 1)
    clean = np.interp(step, [1, 20, 60, steps], [2.2, 2.15, 8.0, 8.0])
    return clean * np.exp(0.02 * np.random.default_rng(seed).standard_normal(steps))


def test_a_rise_that_never_comes_back_is_a_diverge_phase_and_a_collapse():
    loss = climb_and_stay()
    phases = detect_phases(loss)
    assert phases["phase"].tolist() == ["converge", "diverge"]  # no restabilise: it never came back
    diverge = phases.iloc[1]
    assert 15 <= diverge["start_step"] <= 30 and diverge["end_loss"] == pytest.approx(8.0, rel=0.05)
    summary = phase_summary(loss)
    assert summary["n_episodes"] == 1 and summary["has_double_descent"] is False and summary["steps_lost"] is None
    assert run_outcome({"status": "completed", "final_loss": float(loss[-1]), "double_descent": False,
                        **summary}) == "collapse"


def test_a_climb_from_the_first_step_that_stays_up_has_no_converge_row():
    step = np.arange(200)
    loss = np.interp(step, [0, 40, 199], [1.5, 8.0, 8.0]) * np.exp(0.01 * np.random.default_rng(1).standard_normal(200))
    assert detect_phases(loss)["phase"].tolist() == ["diverge"]


def test_a_warmup_bump_that_comes_back_down_is_still_no_divergence():
    step = np.arange(400)
    loss = np.interp(step, [0, 20, 40, 140, 399], [2.0, 2.2, 2.2, 1.0, 0.9])
    assert detect_phases(loss).empty


def test_the_run_table_the_phases_and_the_figures_say_the_same(tmp_path):
    """One answer: load_runs' outcome column, the run's phases and the phase map's colours."""
    collapsed = write_fake_run(tmp_path, lr=5e-3, loss=climb_and_stay())
    step = np.arange(200)
    write_fake_run(tmp_path, lr=5e-4, loss=np.interp(step, [0, 80, 120, 160, 199], [2.0, 1.0, 1.5, 0.9, 0.85]))
    write_fake_run(tmp_path, lr=1e-4, loss=np.interp(step, [0, 100, 199], [2.0, 1.0, 0.9]))
    table = dynamics.load_runs(tmp_path).set_index("lr")
    assert table.loc[5e-3, "outcome"] == "collapse"
    assert table.loc[5e-4, "outcome"] == "double descent"
    assert table.loc[1e-4, "outcome"] == "smooth"
    assert set(table["outcome"]) <= set(OUTCOMES)
    phases = dynamics.load_run(collapsed).phases
    assert "diverge" in set(phases["phase"]) and "restabilise" not in set(phases["phase"])
    assert table.apply(run_outcome, axis=1).tolist() == table["outcome"].tolist()


def test_a_run_still_training_has_no_outcome(tmp_path):
    write_fake_run(tmp_path, status="running")
    assert dynamics.load_runs(tmp_path)["outcome"].isna().all()


def test_the_cost_table_reads_a_ledger_and_aggregates_seeds_by_mean_or_median():
    """The study report's path: one row per run with its own median step time and peak memory."""
    ledger = pd.DataFrame({"run_id": list("abcdef"), "task": "bbc", "rank": 8, "alpha": 8, "lr": 5e-3,
                           "method": ["lora"] * 3 + ["lora+sam"] * 3,
                           "step_time_s": [1.0, 1.0, 4.0, 2.0, 2.0, 2.0], "peak_mem_mb": [100.0] * 6})
    median = cost_table(ledger, over_seeds="median").set_index("method")
    mean = cost_table(ledger).set_index("method")
    assert median.loc["lora+sam", "step_time_s_vs_lora"] == 2.0  # 2 / median(1, 1, 4)
    assert mean.loc["lora+sam", "step_time_s_vs_lora"] == 1.0  # 2 / mean(1, 1, 4)
    assert median["runs"].tolist() == [3, 3] and median.index.tolist() == ["lora", "lora+sam"]
    assert cost_table(ledger[ledger["method"] != "lora"]).empty  # nothing to be relative to
    with pytest.raises(ValueError, match="over_seeds"):
        cost_table(ledger, over_seeds="max")
