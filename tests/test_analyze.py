"""``dynamics analyze`` and ``--sharpness-every``: run folders in, phases and sharpness out."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import assert_expected

import dynamics
from dynamics import figures
from dynamics.analysis.synthetic import make_curve
from dynamics.analyze_config import AnalyzeConfig
from dynamics.cli import main
from dynamics.config import ConfigError, RunConfig
from dynamics.curvature import sharpness_batches
from dynamics.data import load_task
from dynamics.models import load_tokenizer
from dynamics.run_analysis import analyze_paths, analyze_run
from dynamics.runs import load_metrics
from dynamics.runs.logs import METRICS_SCHEMA


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
    assert_expected(summary["sharpness"]["eigenvalues"][0], table["eigenvalue"].iloc[2], rtol=1e-6, atol=1e-12)


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
    (dict(split="test"), "--split test: must be one of eval, train"),
])
def test_bad_options_are_one_line_errors(trained, options, message):
    with pytest.raises(ConfigError) as info:
        analyze_run(trained.path, **options)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_run_without_metrics_is_refused_and_a_short_one_analysed(trained, tmp_path):
    plant_curve(trained, np.linspace(3, 1, 5))  # shorter than every smoothing window
    result = analyze_run(trained.path, k=1, max_iter=5)
    assert result["phases"]["n_episodes"] == 0 and result["phases"]["step"] == 5
    assert result["sharpness"]["eigenvalues"]  # measured all the same
    (trained.path / "metrics.parquet").unlink()
    with pytest.raises(ConfigError, match="no metrics yet"):
        analyze_run(trained.path)
    with pytest.raises(ConfigError, match="no such run folder"):
        analyze_paths([tmp_path / "absent"])


def test_cli_prints_a_table_and_fails_in_one_line(trained, capsys):
    assert main(["analyze", str(trained.path.parent), "--no-sharpness"]) == 0
    out = capsys.readouterr().out
    assert trained.run_id in out and "double_descent" in out
    assert main(["analyze", str(trained.path), "--k", "zero"]) == 2
    assert capsys.readouterr().err.strip() == "dynamics analyze: --k 'zero': must be an integer"
    assert main(["analyze", str(trained.path), "--k", "0"]) == 2
    assert capsys.readouterr().err.strip() == "dynamics analyze: --k 0: must be an integer >= 1"


def test_trace_and_density_land_in_the_run_folder(trained):
    analyze_run(trained.path, checkpoints="all", sharpness=True, k=1, trace=True, trace_samples=30, density=True,
                density_runs=2, density_steps=8)
    run = dynamics.load_run(trained.path)
    trace = run.trace
    assert trace["step"].tolist() == [20, 40] and (trace["n_hvp"] > 0).all()
    density = run.density
    assert set(density["step"]) == {20, 40} and set(density["probe"]) == {0, 1}
    for _, rows in density.groupby("step"):
        assert_expected(rows["weight"].sum(), 1.0, rtol=1e-6, atol=1e-12)
        # the top Ritz value of the density bounds the top eigenvalue from below
        top = run.sharpness.query("step == @rows.step.iloc[0] and rank == 1")["eigenvalue"].iloc[0]
        assert rows["node"].max() <= top * (1 + 1e-3)
    assert trace["trace"].notna().all() and (trace["standard_error"] > 0).all()
    analyze_run(trained.path, checkpoints="40", sharpness=False, trace=True, trace_samples=10)
    assert run.trace["step"].tolist() == [20, 40]  # step 40 replaced, not duplicated
    assert json.loads((trained.path / "summary.json").read_text())["trace"]["step"] == 40
    # the run table carries the final checkpoint's trace beside its top eigenvalue
    row = dynamics.load_runs(trained.path.parent).set_index("run_id").loc[trained.run_id]
    assert_expected(row["hessian_trace"], run.trace.query("step == 40")["trace"].iloc[0], rtol=1e-6, atol=1e-12)


def test_training_loss_curvature_sits_beside_the_eval_loss_curvature(trained):
    eval_result = analyze_run(trained.path, k=1, trace=True, trace_samples=10)
    train_result = analyze_run(trained.path, k=1, trace=True, trace_samples=10, split="train")
    analyze_run(trained.path, k=1, split="train")  # again: replaces the train rows of step 40 only
    run = dynamics.load_run(trained.path)
    sharpness = run.sharpness.set_index("split")
    assert sorted(sharpness.index) == ["eval", "train"] and (sharpness["step"] == 40).all()
    assert sharpness.loc["eval", "eigenvalue"] == eval_result["sharpness"]["eigenvalues"][0]
    assert sharpness.loc["train", "eigenvalue"] == train_result["sharpness_train"]["eigenvalues"][0]
    assert sharpness.loc["eval", "eigenvalue"] != sharpness.loc["train", "eigenvalue"]  # different losses
    assert sharpness.loc["train", "n_examples"] == 4  # one batch of the run's batch_size
    # each row carries the loss whose Hessian it is: the two splits' losses differ
    assert sharpness["loss"].gt(0).all() and sharpness.loc["eval", "loss"] != sharpness.loc["train", "loss"]
    assert train_result["sharpness_train"]["loss"] == sharpness.loc["train", "loss"]
    assert sorted(run.trace["split"]) == ["eval", "train"]
    summary = json.loads((trained.path / "summary.json").read_text())
    assert summary["sharpness"] == eval_result["sharpness"]  # the eval entry is left as it was
    row = dynamics.load_runs(trained.path.parent).set_index("run_id").loc[trained.run_id]
    assert row["top_eigenvalue"] == sharpness.loc["eval", "eigenvalue"]
    assert row["top_eigenvalue_train"] == sharpness.loc["train", "eigenvalue"]
    assert row["hessian_trace_train"] == run.trace.set_index("split").loc["train", "trace"]
    # the figures of `dynamics figures` stay on the eval loss; the train rows are drawn only when asked for
    assert set(figures.final_sharpness(load_metrics(trained.path, table="sharpness"))["eigenvalue"]) \
        == {sharpness.loc["eval", "eigenvalue"]}
    assert set(figures.final_sharpness(load_metrics(trained.path, table="sharpness"), "train")["eigenvalue"]) \
        == {sharpness.loc["train", "eigenvalue"]}


def test_the_train_split_is_the_first_training_examples(tiny):
    cfg = RunConfig(**tiny(method="lora"))
    task = load_task(cfg, load_tokenizer(cfg))
    batches = sharpness_batches(task, cfg, 2, torch.device("cpu"), split="train")
    expected = [task.collate(task.train[:4]), task.collate(task.train[4:8])]
    for batch, want in zip(batches, expected, strict=True):
        assert torch.equal(batch["input_ids"], want["input_ids"]) and torch.equal(batch["labels"], want["labels"])


def test_curvature_files_written_before_the_split_column_read_as_eval(trained):
    analyze_run(trained.path, k=1)
    table = pq.read_table(trained.path / "sharpness.parquet")
    pq.write_table(table.drop_columns(["split", "loss"]), trained.path / "sharpness.parquet")  # an older run folder
    run = dynamics.load_run(trained.path)  # not damaged
    assert run.sharpness["split"].tolist() == ["eval"] and run.sharpness["loss"].isna().all()
    analyze_run(trained.path, k=1, split="train")
    assert sorted(dynamics.load_run(trained.path).sharpness["split"]) == ["eval", "train"]


def test_cli_analyze_trace_density_flags(trained, capsys):
    code = main(["analyze", str(trained.path), "--no-sharpness", "--trace", "--trace-samples", "5", "--density",
                 "--density-runs", "1", "--density-steps", "4"])
    assert code == 0
    assert "trace" in capsys.readouterr().out
    assert (trained.path / "trace.parquet").exists() and (trained.path / "density.parquet").exists()
    assert dynamics.load_run(trained.path).sharpness.empty
    assert main(["analyze", str(trained.path), "--trace-samples", "0"]) == 2
    capsys.readouterr()
    assert main(["analyze", str(trained.path), "--split", "test"]) == 2
    assert capsys.readouterr().err.strip() == "dynamics analyze: --split test: must be one of eval, train"


def test_phases_are_detected_on_the_fly_until_analyze_stores_them(trained):
    loss, _ = make_curve("bump", n_steps=400, noise=0.02, seed=0)
    plant_curve(trained, loss)
    run = dynamics.load_run(trained.path)
    assert not (trained.path / "phases.parquet").exists()
    assert run.phases["phase"].tolist()[:3] == ["converge", "diverge", "restabilise"]
    assert run.phase_summary["has_double_descent"] is True
    smoothed = run.smoothed_loss()
    assert smoothed.columns.tolist() == ["step", "loss", "smoothed"] and len(smoothed) == 400
    assert smoothed["smoothed"].std() < smoothed["loss"].std()
    table = dynamics.load_runs(trained.path.parent)
    assert table["n_episodes"].iloc[0] >= 1 and table["divergence_amplitude"].iloc[0] > 0.05
    analyze_run(trained.path, sharpness=False, min_rise=5.0)  # stored phases win over on-the-fly ones
    assert run.phases.empty and run.phase_summary["has_double_descent"] is False


def test_load_metrics_stacks_runs_with_their_settings(tiny):
    for rank in (2, 4):
        dynamics.train(tiny(method="lora", rank=rank, alpha=rank, steps=6, eval_every=0, checkpoint_every=0,
                            n_eval_generate=0))
    root = tiny()["runs_dir"]
    frame = dynamics.runs.load_metrics(root, with_settings=("method", "rank", "lr"))
    assert frame.columns[:4].tolist() == ["run_id", "method", "rank", "lr"]
    assert "step_lr" in frame and len(frame) == 12
    assert sorted(frame.groupby("rank")["step"].max().tolist()) == [6, 6]
    assert (frame["lr"] == tiny()["lr"]).all() and frame["step_lr"].max() <= tiny()["lr"]
    with pytest.raises(ConfigError, match="with_settings colour: not a run setting"):
        dynamics.runs.load_metrics(root, with_settings=("colour",))
    with pytest.raises(ConfigError, match="table weights: must be one of metrics"):
        dynamics.runs.load_metrics(root, table="weights")
    assert dynamics.runs.load_metrics(root, table="sharpness").columns[:6].tolist() == [
        "run_id", "method", "rank", "alpha", "lr", "seed"]


def test_exact_match_after_training_reads_what_training_measured(tiny, capsys):
    """``--exact-match N`` decodes the first N held-out problems at a checkpoint: at the last one it
    gives the number training's own eval gave at that step, and keeps every continuation."""
    measured_in_training = dynamics.train(tiny(method="lora", lr=3e-2, steps=30, n_train=128, eval_every=30,
                                               checkpoint_every=30, n_eval_generate=8, max_new_tokens=6))
    in_training = measured_in_training.evals.query("step == 30")["exact_match"].iloc[0]
    result = analyze_run(measured_in_training.path, sharpness=False, exact_match=8, max_new_tokens=6)
    assert result["exact_match"] == {"step": 30, "n_problems": 8, "max_new_tokens": 6, "exact_match": in_training}
    generations = measured_in_training.generations
    assert generations["problem"].tolist() == list(range(8)) and (generations["step"] == 30).all()
    assert generations["correct"].mean() == in_training
    assert (generations["n_new_tokens"] <= 6).all()
    assert (generations["stopped"] | (generations["n_new_tokens"] == 6)).all()  # EOS, or the budget ran out
    assert generations["reference"].str.len().gt(0).all() and generations["text"].notna().all()
    # more prompts at once (left-padded, positions from the mask): the same answers, step 30's rows replaced
    analyze_run(measured_in_training.path, sharpness=False, exact_match=8, max_new_tokens=6, decode_batch=8)
    pd.testing.assert_frame_equal(measured_in_training.generations, generations)
    # a run trained without generation gets its task metric from analyze
    silent = dynamics.train(tiny(method="lora", lr=3e-2, steps=30, n_train=128, eval_every=30, checkpoint_every=30,
                                 n_eval_generate=0, max_new_tokens=6, run_id="silent"))
    table = dynamics.load_runs(silent.path.parent).set_index("run_id")
    assert table.loc["silent", "eval_metric"] is None or pd.isna(table.loc["silent", "eval_metric"])
    assert main(["analyze", str(silent.path), "--no-sharpness", "--exact-match", "8"]) == 0
    assert "exact_match" in capsys.readouterr().out
    table = dynamics.load_runs(silent.path.parent).set_index("run_id")
    assert table.loc["silent", "eval_metric"] == silent.generations["correct"].mean()
    assert silent.generations["n_new_tokens"].max() <= 6  # the run's own max_new_tokens by default


def test_exact_match_refuses_bad_requests_in_one_line(trained, capsys):
    before = sorted(p.name for p in trained.path.iterdir())
    assert main(["analyze", str(trained.path), "--exact-match", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "dynamics analyze: --exact-match -1: must be an integer >= 0"
    assert main(["analyze", str(trained.path), "--no-sharpness", "--exact-match", "100000"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{trained.run_id}: not analysed: --exact-match 100000: the run holds out")
    assert sorted(p.name for p in trained.path.iterdir()) == before  # nothing written
    with pytest.raises(ConfigError, match="task bbc is not a generation task; exact match needs one of gsm, tiny"):
        AnalyzeConfig(exact_match=4).check_run(dynamics.RunConfig(task="bbc", model="minilm-l6"))


@pytest.mark.parametrize("flags, message", [
    (["--checkpoints", "abc"], "--checkpoints abc: must be last, all, or comma-separated steps >= 0"),
    (["--checkpoints", "-5"], "--checkpoints -5: must be last, all, or comma-separated steps >= 0"),
    (["--threshold", "foo=1"], "--threshold foo=1: unknown threshold foo"),
    (["--threshold", "min_rise=x"], "--threshold min_rise=x: must be a number"),
    (["--threshold", "min_duration=-5"], "--threshold: min_duration=-5.0: must be zero or positive"),
    (["--curve", "grad_norm"], "--curve grad_norm: must be one of loss, loss_clean"),
    (["--split", "test"], "--split test: must be one of eval, train"),
    (["--tol", "0"], "--tol 0.0: must be a positive number"),
    (["--decode-batch", "0"], "--decode-batch 0: must be an integer >= 1"),
])
def test_bad_analyze_flags_are_bad_input_before_any_run_is_read(tmp_path, capsys, flags, message):
    """AnalyzeConfig checks every flag once, at the boundary: exit 2, one line, no folder needed."""
    assert main(["analyze", str(tmp_path / "absent"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dynamics analyze: {message}") and "\n" not in err


def test_analyze_config_flags_are_its_fields():
    """Every AnalyzeConfig field is a flag of `dynamics analyze`, and the flags parse back to it."""
    import dataclasses

    from dynamics.cli import build_parser

    args = build_parser().parse_args(["analyze", "runs", "--k", "3", "--no-sharpness", "--threshold", "min_rise=0.1",
                                      "--threshold", "spike_sigmas=6", "--split", "train", "--checkpoints", "20,10"])
    given = {k: v for k, v in vars(args).items() if k not in ("command", "paths", "verbose")}
    config = AnalyzeConfig(**given)
    assert (config.k, config.sharpness, config.split) == (3, False, "train")
    assert config.threshold_values == {"min_rise": 0.1, "spike_sigmas": 6.0}
    assert config.checkpoint_steps == [10, 20]
    help_text = build_parser().subcommands["analyze"].format_help()
    for field in dataclasses.fields(AnalyzeConfig):
        assert (field.metadata.get("flag") or "--" + field.name.replace("_", "-")) in help_text
    # the Python API takes the same fields, and threshold names beside them
    assert AnalyzeConfig.from_options(k=2, min_rise=0.2).threshold_values == {"min_rise": 0.2}
    with pytest.raises(ConfigError, match="unknown analyze option 'kk'"):
        AnalyzeConfig.from_options(kk=2)
