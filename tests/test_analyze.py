"""``dynamics analyze`` and ``--sharpness-every``: run folders in, phases and sharpness out."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dynamics
from dynamics.analysis.synthetic import make_curve
from dynamics.analyze import analyze_paths, analyze_run
from dynamics.cli import main
from dynamics.config import ConfigError
from dynamics.metrics import METRICS_SCHEMA


@pytest.fixture
def trained(tiny):
    return dynamics.train(tiny(method="lora", lr=3e-2, steps=40, n_train=128, eval_every=0, checkpoint_every=20,
                               keep_checkpoints=0, n_eval_generate=0))


def plant_curve(run, loss):
    """Replace a run's logged loss curve by ``loss`` (one value per step)."""
    rows = [{"step": i + 1, "loss": float(v), "loss_clean": float(v)} for i, v in enumerate(loss)]
    pq.write_table(pa.Table.from_pylist(rows, schema=METRICS_SCHEMA), run.path / "metrics.parquet")


def test_phases_of_a_planted_double_descent_are_written(trained):
    loss, truth = make_curve("bump", n_steps=400, noise=0.02, seed=0)
    assert truth.has_double_descent
    plant_curve(trained, loss)
    result = analyze_run(trained.path, sharpness=False)
    phases = pd.read_parquet(trained.path / "phases.parquet")
    assert phases["phase"].tolist()[:3] == ["converge", "diverge", "restabilise"]
    true_start = int(truth.phases.loc[truth.phases.phase == "diverge", "start_step"].iloc[0]) + 1  # steps from 1
    assert abs(int(phases.loc[phases.phase == "diverge", "start_step"].iloc[0]) - true_start) <= 25
    assert result["phases"]["has_double_descent"] is True
    assert json.loads((trained.path / "summary.json").read_text())["phases"]["has_double_descent"] is True
    assert bool(dynamics.load_runs(trained.path.parent)["double_descent"].iloc[0]) is True


def test_sharpness_at_chosen_checkpoints_and_no_duplicates(trained):
    analyze_run(trained.path, checkpoints="all", k=2)
    analyze_run(trained.path, checkpoints="40", k=2)  # again: replaces the rows of step 40
    table = pd.read_parquet(trained.path / "sharpness.parquet")
    assert table[["step", "rank"]].values.tolist() == [[20, 1], [20, 2], [40, 1], [40, 2]]
    assert table["converged"].all() and (table["n_hvp"] > 0).all()
    for _, rows in table.groupby("step"):
        assert rows["eigenvalue"].is_monotonic_decreasing
    summary = json.loads((trained.path / "summary.json").read_text())
    assert summary["sharpness"]["step"] == 40
    assert summary["sharpness"]["eigenvalues"][0] == pytest.approx(table["eigenvalue"].iloc[2])


def test_sharpness_is_reproducible_from_the_checkpoint(trained):
    first = analyze_run(trained.path, k=1)["sharpness"]["eigenvalues"][0]
    second = analyze_run(trained.path, k=1)["sharpness"]["eigenvalues"][0]
    assert first == second  # seeded start vector, fixed eval batches, same weights


def test_sharpness_during_training_is_logged_and_kept(tiny):
    run = dynamics.train(tiny(method="lora+mgpo", lr=3e-2, steps=24, sharpness_every=8, sharpness_k=2,
                              eval_every=0))
    table = pd.read_parquet(run.path / "sharpness.parquet")
    assert sorted(set(table["step"])) == [8, 16, 24] and set(table["source"]) == {"training"}
    analyze_run(run.path, k=1)
    after = pd.read_parquet(run.path / "sharpness.parquet")
    assert len(after[after["source"] == "training"]) == 6 and len(after[after["source"] == "checkpoint"]) == 1


@pytest.mark.parametrize(("options", "message"), [
    (dict(curve="accuracy"), "--curve accuracy: must be one of loss, loss_clean"),
    (dict(checkpoints="3"), "--checkpoints 3: "),
    (dict(checkpoints="soon"), "--checkpoints soon: must be last, all, or comma-separated steps"),
    (dict(k=10**9), "--k 1000000000: larger than the"),
])
def test_bad_options_are_one_line_errors(trained, options, message):
    with pytest.raises(ConfigError) as info:
        analyze_run(trained.path, **options)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_run_without_metrics_or_too_short_is_refused(trained, tmp_path):
    (trained.path / "metrics.parquet").unlink()
    with pytest.raises(ConfigError, match="no metrics yet"):
        analyze_run(trained.path)
    plant_curve(trained, np.linspace(3, 1, 5))
    with pytest.raises(ConfigError, match=trained.run_id):
        analyze_run(trained.path, sharpness=False)
    with pytest.raises(ConfigError, match="no such run folder"):
        analyze_paths([tmp_path / "absent"])


def test_cli_prints_a_table_and_fails_in_one_line(trained, capsys):
    assert main(["analyze", str(trained.path.parent), "--no-sharpness"]) == 0
    out = capsys.readouterr().out
    assert trained.run_id in out and "double_descent" in out
    assert main(["analyze", str(trained.path), "--k", "zero"]) == 2
    assert capsys.readouterr().err.strip() == "dynamics analyze: --k zero: must be an integer >= 1"
