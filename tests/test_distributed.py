"""Data-parallel training (``dynamics.distributed``) on CPU processes (gloo), launched by torchrun as
a user would: N processes with per-process batch b train like one process with batch N * b, to
float round-off, for every method; a run killed on one process count resumes on another.

Each launch starts real processes (imports included: ~20 s on 2 cores), so one launch trains all
methods in turn (``tests/dp_worker.py``)."""

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import launch
import psutil
import pytest
from helpers import assert_expected

import dynamics
from dynamics import runs
from dynamics.config import RunConfig, config_flags

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("dp_worker.py")
METHODS = ["lora", "lora+mgpo", "lora+sam", "lora+noise", "full"]
# batch 8 = 2 processes x 4; grad_accum 2 so the gradient sum spans micro-batches too
SETTINGS = dict(model="tiny-llama", task="tiny", steps=8, batch_size=8, grad_accum=2, lr=3e-3, n_train=64, n_eval=8,
                n_eval_generate=0, eval_every=4, checkpoint_every=4, layer_metrics_every=2, threads=1,
                progress=False, rho=0.05)
COMPARED = ["loss", "loss_clean", "grad_norm", "param_norm", "update_norm", "momentum_norm", "grad_ema",
            "apn_scale", "perturb_norm"]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def assert_same_run(run, reference, rtol=1e-5, atol=1e-7):
    """Every logged number of ``run`` equals ``reference``'s to float round-off."""
    a, b = run.metrics, reference.metrics
    assert a["step"].tolist() == b["step"].tolist()
    assert a["tokens"].tolist() == b["tokens"].tolist()
    for column in COMPARED:
        assert_expected(a[column].to_numpy(float), b[column].to_numpy(float), rtol=rtol, atol=atol, equal_nan=True,
                        msg=column)
    layers_a, layers_b = (t.sort_values(["step", "layer"]).reset_index(drop=True)
                          for t in (run.layers, reference.layers))
    assert layers_a[["step", "layer"]].equals(layers_b[["step", "layer"]])
    for column in ("grad_norm", "grad_ema", "apn_scale", "perturb_norm"):
        assert_expected(layers_a[column].to_numpy(float), layers_b[column].to_numpy(float), rtol=rtol, atol=atol,
                        equal_nan=True, msg=f"layers.{column}")
    assert_expected(run.evals["loss"], reference.evals["loss"], rtol=rtol, atol=0, equal_nan=True)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    configs = [{**SETTINGS, "method": m, "runs_dir": str(root / "two"), "run_id": m} for m in METHODS]
    (root / "configs.json").write_text(json.dumps(configs))
    started = time.perf_counter()
    done = subprocess.run(torchrun(2, str(WORKER), str(root / "configs.json")), env=env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, time.perf_counter() - started


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_train_like_one(two_process_runs, method):
    root, _ = two_process_runs
    two = dynamics.load_run(root / "two" / method)
    one = dynamics.train({**SETTINGS, "method": method, "runs_dir": str(root / "one"), "run_id": method})
    assert two.summary["status"] == one.summary["status"] == "completed"
    assert two.info["runtime"]["processes"] == 2 and one.info["runtime"]["processes"] == 1
    assert_same_run(two, one)
    if method not in ("lora", "full"):  # the perturbation did something (MGPO: from step 2, once momentum exists)
        assert (two.metrics["perturb_norm"].iloc[1:] > 0).all()
    # one writer: no stray temp or lock files of the other process
    assert sorted(p.name for p in two.path.iterdir() if p.name.startswith(".")) == \
        sorted(p.name for p in one.path.iterdir() if p.name.startswith("."))


KILL_SETTINGS = {**SETTINGS, "method": "lora+mgpo", "steps": 40, "checkpoint_every": 10, "keep_checkpoints": 2,
                 "eval_every": 20, "n_train": 256}


def cli_args(settings: dict) -> list[str]:
    return config_flags(RunConfig(**settings))


def lock_released(run_dir: Path) -> bool:
    """Whether the run's ``.lock`` can be taken. The kernel frees a ``flock`` when the last thread of
    its holder exits, which can be after the killed process already reads as a zombie (its main
    thread is gone, its other threads still exiting): so wait on the lock, not on process status."""
    with open(run_dir / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def kill_after_first_checkpoint(command: list[str] | launch.Command, run_dir: Path) -> None:
    """Start ``command`` (a command line, or a ``dynamics`` process already started), SIGKILL it and
    every process under it once the run has a checkpoint, and wait until the run's lock is free."""
    process = command if isinstance(command, launch.Command) else subprocess.Popen(
        command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir.exists() and runs.checkpoint_steps(run_dir)):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    # the launcher and every process under it (torchrun's workers live in their own sessions)
    tree = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while not lock_released(run_dir):
        assert time.monotonic() < deadline, "a worker outlived SIGKILL (the run's lock is still held)"
        time.sleep(0.05)
    summary = runs.read_summary(run_dir)
    assert summary["status"] == "running" and summary["steps_done"] < KILL_SETTINGS["steps"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    return dynamics.train({**KILL_SETTINGS, "runs_dir": str(root), "run_id": "ref"})


def test_killed_on_two_processes_resumes_on_one(tmp_path, uninterrupted):
    settings = {**KILL_SETTINGS, "runs_dir": str(tmp_path), "run_id": "moved"}
    kill_after_first_checkpoint(torchrun(2, "-m", "dynamics", "train", *cli_args(settings)), tmp_path / "moved")
    resumed = dynamics.train({**settings, "resume": True})
    assert resumed.summary["status"] == "completed"
    assert resumed.metrics["step"].tolist() == list(range(1, KILL_SETTINGS["steps"] + 1))
    assert_same_run(resumed, uninterrupted, rtol=1e-4)


def test_killed_on_one_process_resumes_on_two_with_nproc(tmp_path, uninterrupted):
    settings = {**KILL_SETTINGS, "runs_dir": str(tmp_path), "run_id": "moved"}
    kill_after_first_checkpoint(launch.Command(["train", *cli_args(settings)]), tmp_path / "moved")
    done = launch.run(["train", "--nproc", "2", *cli_args(settings), "--resume"], env=env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from checkpoint step" in done.stderr
    assert done.stdout.count("status   completed") == 1  # printed once, by process 0
    resumed = dynamics.load_run(tmp_path / "moved")
    assert resumed.summary["status"] == "completed"
    assert_same_run(resumed, uninterrupted, rtol=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "3"], "--batch-size 3: must be a multiple of --nproc 2"),
    (["--nproc", "0"], "--nproc"),
])
def test_nproc_bad_input_is_one_line_before_any_process_starts(tmp_path, flags, message):
    args = ["--nproc", "2", *cli_args({**SETTINGS, "method": "lora", "runs_dir": str(tmp_path)}), *flags]
    done = launch.run(["train", *args], env=env(), timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_config_flags_parse_back_to_the_same_config(tiny):
    from dynamics.cli import build_parser, config_from_args

    cfg = RunConfig(**tiny(method="lora+mgpo", lr=3.3e-4, rho=0.0123456789, autocast=True, run_id="x"))
    args = build_parser().parse_args(["train", *config_flags(cfg)])
    assert config_from_args(args) == cfg


def test_grid_trains_each_run_on_several_processes(tmp_path):
    from dynamics.grid import run_grid

    settings = {**SETTINGS, "method": "lora+mgpo", "threads": 0}
    cfg = RunConfig(**settings, runs_dir=str(tmp_path / "grid"))
    table = run_grid([cfg], nproc_per_run=2, progress=False)
    assert table["status"].tolist() == ["completed"]
    run = dynamics.load_run(cfg.run_dir)
    assert run.info["runtime"]["processes"] == 2 and run.info["runtime"]["threads"] == 1
    assert "new run" in (cfg.run_dir / "log.txt").read_text()
    one = dynamics.train({**settings, "runs_dir": str(tmp_path / "one")})
    assert_same_run(run, one)
    with pytest.raises(dynamics.ConfigError, match="--nproc-per-run 3: run .* has batch_size 8"):
        run_grid([cfg], nproc_per_run=3, progress=False)


def test_processes_other_than_0_draw_their_own_dropout_masks_per_step():
    import torch

    from dynamics.distributed import World

    def draws(world, step):
        torch.manual_seed(123)  # the run's stream, as restored from a checkpoint
        world.seed_step(seed=0, step=step)
        return torch.rand(4)

    one, two = World(rank=1, size=2), World(rank=2, size=3)
    assert torch.equal(draws(World(), 5), draws(World(), 5)) and torch.equal(draws(World(), 5), draws(World(), 6))
    assert not torch.equal(draws(one, 5), draws(World(), 5))  # not process 0's masks
    assert not torch.equal(draws(one, 5), draws(two, 5)) and not torch.equal(draws(one, 5), draws(one, 6))
    assert torch.equal(draws(one, 5), draws(one, 5))  # a function of (seed, rank, step): resumable
