"""Two writers, one run (issue 18): a run folder is claimed atomically, a live run is never
replaced or analysed under its trainer, and a run whose process died is shown as such.

Real processes with real timing: each test starts ``dynamics train`` and races it against a
second command, or kills it at a moment that falls wherever it falls.
"""

import os
import signal
import time
from pathlib import Path

import launch
import numpy as np
import pytest
from test_interrupt import cli_args, wait_for

import dynamics
from dynamics import runs

pytestmark = pytest.mark.slow

SHORT = dict(model="tiny-llama", task="tiny", method="lora", rank=4, lr=3e-2, steps=40, batch_size=8, n_train=128,
             n_eval=8, n_eval_generate=0, eval_every=0, checkpoint_every=10, threads=1, progress=False)
LONG = {**SHORT, "steps": 4000, "checkpoint_every": 1, "keep_checkpoints": 1}  # a checkpoint swap every step


def popen(*argv: str) -> launch.Command:
    """``dynamics ARGV`` in a process of its own (started fast: tests/launch.py)."""
    return launch.Command(list(argv))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dynamics ")]


# Two trials of each race: each is two processes racing for one folder, a few seconds.
@pytest.mark.parametrize("trial", range(2))
@pytest.mark.parametrize("how", ["same settings", "other settings", "both --resume"])
def test_of_two_simultaneous_starts_exactly_one_proceeds(tmp_path, how, trial):
    second = {**SHORT, "lr": 1e-2} if how == "other settings" else SHORT
    resume = {"resume": True} if how == "both --resume" else {}  # of a run that does not exist yet
    runs_dir = str(tmp_path / "runs")
    processes = [popen("train", *cli_args({**settings, **resume, "runs_dir": runs_dir, "run_id": "same"}))
                 for settings in (SHORT, second)]
    results = [(p.returncode, out, err) for p in processes for out, err in [p.communicate(timeout=300)]]
    trained = [i for i, (code, _, err) in enumerate(results) if code == 0 and "nothing to do" not in err]
    assert len(trained) == 1, results  # exactly one process trained the run
    other_code, _, other_err = results[1 - trained[0]]
    lines = error_lines(other_err)
    if other_code == 0:  # a --resume that came after the end: nothing to do, nothing touched
        assert how == "both --resume" and "already completed; nothing to do" in other_err, results
    else:
        assert other_code == 2 and len(lines) == 1, results
        assert any(reason in lines[0] for reason in ("another process started this run first", "exists (status",
                                                     "in use by another process")), lines
    run = dynamics.load_run(tmp_path / "runs" / "same")
    assert run.summary["status"] == "completed"
    assert run.metrics["step"].tolist() == list(range(1, 41))  # one run's rows, whole, no mixture
    winning_lr = (SHORT, second)[trained[0]]["lr"]
    assert run.config["lr"] == winning_lr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["same"]  # no staging left behind


def test_overwrite_of_a_live_run_is_refused_and_of_a_finished_one_replaces_it(tmp_path):
    runs_dir = str(tmp_path / "runs")
    live = popen("train", *cli_args({**LONG, "runs_dir": runs_dir, "run_id": "r"}))
    run_dir = tmp_path / "runs" / "r"
    try:
        wait_for(lambda: bool(runs.checkpoint_steps(run_dir)), live)
        assert runs.writer_alive(run_dir) is True
        refused = launch.run(["train", *cli_args({**SHORT, "runs_dir": runs_dir, "run_id": "r", "overwrite": True})])
        assert refused.returncode == 2
        assert error_lines(refused.stderr) == [f"dynamics train: --overwrite r: the run is in use by another process "
                                               f"(pid {live.pid} on {os.uname().nodename})"]
        assert live.poll() is None and runs.stored_config(run_dir).steps == LONG["steps"]  # untouched, still going
    finally:
        live.send_signal(signal.SIGINT)  # checkpoints and stops
        live.wait(timeout=120)
    assert runs.read_summary(run_dir)["status"] == "interrupted"
    replaced = dynamics.train({**SHORT, "runs_dir": runs_dir, "run_id": "r", "overwrite": True})
    assert replaced.summary["status"] == "completed" and replaced.config["steps"] == SHORT["steps"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]


SWAPPED = {**LONG, "steps": 60}  # the kill lands within the first ten steps; the rest resumes


@pytest.fixture(scope="module")
def swap_reference(tmp_path_factory):
    """The uninterrupted run of SWAPPED's settings, without its checkpoints (saving one never
    changes what training computes: a resumed run must equal this one bit for bit)."""
    root = tmp_path_factory.mktemp("swap-reference")
    return dynamics.train({**SWAPPED, "checkpoint_every": 0, "runs_dir": str(root), "run_id": "reference"})


@pytest.mark.parametrize("trial", range(3))
def test_a_run_killed_mid_checkpoint_swap_keeps_an_intact_checkpoint_and_resumes_exactly(tmp_path, trial,
                                                                                          swap_reference):
    settings = {**SWAPPED, "runs_dir": str(tmp_path / "runs"), "run_id": "k"}
    reference = swap_reference
    run_dir = tmp_path / "runs" / "k"
    process = popen("train", *cli_args(settings))
    wait_for(lambda: len(runs.checkpoint_steps(run_dir)) >= 1, process)
    time.sleep(0.05 + 0.15 * trial)  # wherever in the save / swap / rotation it lands
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    step, state, damaged = runs.latest_intact_checkpoint(run_dir)
    assert step is not None and damaged == [], damaged
    if runs.read_summary(run_dir)["status"] == "running":  # killed before the end: shown as dead
        assert runs.writer_alive(run_dir) is False
        table = dynamics.load_runs(tmp_path / "runs").set_index("run_id")
        assert table.loc["k", "alive"] is not None and not table.loc["k", "alive"]
        listing = launch.run(["runs", str(tmp_path / "runs")])
        assert "running (no process)" in listing.stdout
    resumed = dynamics.train({**settings, "resume": True})
    assert resumed.summary["status"] == "completed"
    np.testing.assert_array_equal(resumed.metrics["loss"].to_numpy(), reference.metrics["loss"].to_numpy())


def test_analyze_refuses_a_live_run_in_one_line_and_marks_phases_with_their_step(tmp_path):
    runs_dir = str(tmp_path / "runs")
    live = popen("train", *cli_args({**LONG, "runs_dir": runs_dir, "run_id": "live"}))
    run_dir = tmp_path / "runs" / "live"
    try:
        wait_for(lambda: bool(runs.checkpoint_steps(run_dir)) and (run_dir / "metrics.parquet").exists(), live)
        result = launch.run(["analyze", str(run_dir), "--max-iter", "2"])
        assert result.returncode == 1, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("live:")]
        assert lines == [f"live: not analysed: the run is in use by another process (pid {live.pid} on "
                         f"{os.uname().nodename}); analyze it when that process ends"], result.stderr
        assert not (run_dir / "phases.parquet").exists()
    finally:
        live.send_signal(signal.SIGINT)
        live.wait(timeout=120)

    # Analysed part-way, then trained on: the stored phases name their step and stop counting.
    run = dynamics.train({**SHORT, "runs_dir": runs_dir, "run_id": "partial", "steps": 60, "checkpoint_every": 30})
    from dynamics.run_analysis import analyze_run

    stored = analyze_run(run.path, sharpness=False)["phases"]
    assert stored["step"] == 60 and run.phase_summary == stored
    runs.update_summary(run.path, steps_done=90)  # as if it had been resumed and gone on
    assert "step" not in run.phase_summary  # recomputed from the curve, not the stale entry


def test_two_grid_drivers_started_together_train_each_run_once_and_neither_says_failed(tmp_path):
    """Issue 33: two `dynamics grid` on one grid file at once. Every run is trained by exactly one
    of them (one section in its log.txt, one row per step); a driver that lost a run to the other
    reports it "skipped: another process has it", never failed, and both exit 0."""
    grid = tmp_path / "race.toml"
    base = {k: v for k, v in {**SHORT, "steps": 12, "checkpoint_every": 6}.items() if k != "progress"}
    grid.write_text("[base]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in base.items())
                    + "\n[axes]\nseed = [0, 1, 2]\n")
    root = tmp_path / "runs"
    drivers = [popen("grid", str(grid), "--runs-dir", str(root)) for _ in range(2)]
    outputs = [driver.communicate(timeout=240) for driver in drivers]
    for driver, (_out, err) in zip(drivers, outputs):
        assert driver.returncode == 0, err
        assert "failed" not in err and "Traceback" not in err, err
    table = dynamics.load_runs(root)
    assert sorted(table["status"]) == ["completed"] * 3
    for path in table["path"]:
        log = (Path(path) / "log.txt").read_text()
        assert log.count("===") == 1 and "Traceback" not in log, log  # trained once, by one driver
        assert list(runs.load_metrics(path)["step"]) == list(range(1, 13))
