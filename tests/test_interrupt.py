"""A killed or interrupted run resumes to exactly the losses of an uninterrupted one.

These start ``dynamics train`` as a real process and signal it, so they take a few seconds each."""

import json
import signal
import time

import launch
import numpy as np
import pytest

import dynamics
from dynamics import runs
from dynamics.config import RunConfig, config_flags

pytestmark = pytest.mark.slow

SETTINGS = dict(model="tiny-llama", task="tiny", method="lora", lr=3e-2, steps=400, batch_size=8, n_train=256,
                n_eval=8, n_eval_generate=0, eval_every=100, checkpoint_every=20, keep_checkpoints=2, threads=1,
                layer_metrics_every=10, progress=False)


def cli_args(settings: dict) -> list[str]:
    return config_flags(RunConfig(**settings))


def start(settings: dict) -> launch.Command:
    """``dynamics train`` with ``settings`` in a process of its own (started fast: tests/launch.py)."""
    return launch.Command(["train", *cli_args(settings)])


def wait_for(predicate, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    return dynamics.train({**SETTINGS, "runs_dir": str(root), "run_id": "ref"})


def assert_matches(run, reference):
    metrics, expected = run.metrics, reference.metrics
    assert metrics["step"].tolist() == list(range(1, SETTINGS["steps"] + 1))
    np.testing.assert_array_equal(metrics["loss"].to_numpy(), expected["loss"].to_numpy())
    np.testing.assert_array_equal(run.evals["loss"].to_numpy(), reference.evals["loss"].to_numpy())
    assert not run.layers.duplicated(["step", "layer"]).any()


def test_sigkill_then_resume_is_identical(tmp_path, reference):
    settings = {**SETTINGS, "runs_dir": str(tmp_path), "run_id": "killed"}
    process = start(settings)
    run_dir = tmp_path / "killed"
    wait_for(lambda: runs.checkpoint_steps(run_dir) if run_dir.exists() else False, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "running" and summary["steps_done"] < SETTINGS["steps"]
    resumed = dynamics.train({**settings, "resume": True})
    assert resumed.summary["status"] == "completed"
    assert_matches(resumed, reference)


def test_ctrl_c_checkpoints_exits_130_and_resumes_identically(tmp_path, reference):
    settings = {**SETTINGS, "runs_dir": str(tmp_path), "run_id": "stopped"}
    process = start(settings)
    run_dir = tmp_path / "stopped"
    wait_for(lambda: (run_dir / "metrics.parquet").exists(), process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert runs.checkpoint_steps(run_dir)[-1] == summary["steps_done"] < SETTINGS["steps"]
    assert "status   interrupted" in out
    resumed = dynamics.train({**settings, "resume": True})
    assert_matches(resumed, reference)


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_analyze_stops_on_a_signal_in_one_line_and_leaves_the_run_as_it_was(tmp_path, signum, code, word):
    run = dynamics.train({**SETTINGS, "steps": 20, "checkpoint_every": 20, "runs_dir": str(tmp_path)})
    before = {p.name: p.stat().st_mtime_ns for p in run.path.iterdir()}
    # a long measurement: the signal lands in it, whatever the moment
    analyze = launch.Command(["analyze", str(run.path), "--no-sharpness", "--density", "--density-runs", "100000"])
    wait_for(lambda: (run.path / "phases.parquet").exists(), analyze)
    time.sleep(0.3)
    for _ in range(2):  # once, then again while it stops
        analyze.send_signal(signum)
        time.sleep(0.05)
    assert analyze.wait(timeout=60) == code
    _, err = analyze.communicate()
    assert err.strip().splitlines() == [f"dynamics analyze: {word}"], err
    assert not (run.path / "density.parquet").exists()  # nothing half-measured written
    assert {p.name for p in run.path.iterdir()} == set(before) | {"phases.parquet", ".lock"}
    assert dynamics.train({**SETTINGS, "steps": 20, "checkpoint_every": 20, "runs_dir": str(tmp_path),
                           "resume": True}).summary["status"] == "completed"  # its lock was let go


def test_two_sigterms_end_a_run_checkpointed_and_resumable(tmp_path, reference):
    settings = {**SETTINGS, "runs_dir": str(tmp_path), "run_id": "twice"}
    process = start(settings)
    run_dir = tmp_path / "twice"
    wait_for(lambda: bool(runs.checkpoint_steps(run_dir)), process)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 130
    assert runs.read_summary(run_dir)["status"] == "interrupted"
    resumed = dynamics.train({**settings, "resume": True})
    np.testing.assert_array_equal(resumed.metrics["loss"].to_numpy(), reference.metrics["loss"].to_numpy())
