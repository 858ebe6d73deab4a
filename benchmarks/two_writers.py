"""Trials of issue 18 (two writers, one run), as a new user would try them, each repeated.

    python benchmarks/two_writers.py [--trials 5] [--out benchmarks/results/two_writers.txt]

Each scenario starts real ``dynamics`` processes on tiny-llama (timing as it falls) and ends by
checking the run folder: exactly one intact run, no staging folder left, and the message each
process printed. The table gives, per scenario, how often each outcome happened.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import dynamics
from dynamics import runs
from dynamics.config import RunConfig, config_flags

SHORT = dict(model="tiny-llama", task="tiny", method="lora", rank=4, lr=3e-2, steps=40, batch_size=8, n_train=128,
             n_eval=8, n_eval_generate=0, eval_every=0, checkpoint_every=10, threads=1, progress=False)
LONG = {**SHORT, "steps": 4000, "checkpoint_every": 1, "keep_checkpoints": 1}  # a checkpoint swap every step
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def cli_args(settings: dict) -> list[str]:
    return config_flags(RunConfig(**settings))


def popen(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dynamics", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV, text=True)


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynamics", *argv], capture_output=True, text=True, env=ENV,
                          timeout=600)


def wait_for(predicate, process, timeout=180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise RuntimeError(f"process ended early: {process.communicate()}")
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.01)


def message(stderr: str) -> str:
    """The one error line a refused command printed (with pids, hosts and run ids generalised)."""
    lines = [line for line in stderr.splitlines() if line.startswith("dynamics ") or ": not analysed:" in line]
    if not lines:
        return "-"
    text = re.sub(r"\bpid \d+", "pid PID", lines[-1])
    return text.replace(os.uname().nodename, "HOST")


def folder_state(runs_dir: Path, run_id: str) -> str:
    """'one intact run (STATUS)' or what is wrong with the folder."""
    names = sorted(p.name for p in runs_dir.iterdir())
    if names != [run_id]:
        return f"folders {names}"
    try:
        runs.check_run(runs_dir / run_id)
    except runs.DamagedRun as damaged:
        return f"damaged: {damaged}"
    summary = runs.read_summary(runs_dir / run_id)
    metrics = dynamics.load_run(runs_dir / run_id).metrics
    steps = metrics["step"].tolist()
    if steps != list(range(1, len(steps) + 1)):
        return "metrics steps out of order"
    return f"one intact run ({summary['status']})"


def two_starts(root: Path, how: str) -> str:
    second = {**SHORT, "lr": 1e-2} if how == "other settings" else SHORT
    resume = {"resume": True} if how == "both --resume" else {}
    processes = [popen("train", *cli_args({**s, **resume, "runs_dir": str(root), "run_id": "same"}))
                 for s in (SHORT, second)]
    results = [(p.returncode, err) for p in processes for _, err in [p.communicate(timeout=600)]]
    trained = sum(code == 0 and "nothing to do" not in err for code, err in results)
    other = [f"exit {code}: {message(err) if code else 'nothing to do' if 'nothing to do' in err else 'trained'}"
             for code, err in results if not (code == 0 and "nothing to do" not in err)]
    return f"{trained} trained; other: {'; '.join(other) or '-'}; {folder_state(root, 'same')}"


def overwrite_live(root: Path) -> str:
    live = popen("train", *cli_args({**LONG, "runs_dir": str(root), "run_id": "r"}))
    wait_for(lambda: bool(runs.checkpoint_steps(root / "r")), live)
    refused = run_cli("train", *cli_args({**SHORT, "runs_dir": str(root), "run_id": "r", "overwrite": True}))
    still = live.poll() is None
    live.send_signal(signal.SIGINT)
    live.wait(timeout=120)
    return (f"--overwrite exit {refused.returncode}: {message(refused.stderr)}; live run kept going: {still}; "
            f"{folder_state(root, 'r')}")


def overwrite_killed(root: Path, rng: random.Random) -> str:
    """--overwrite of a finished run, SIGKILLed at a random moment: old run or new, never neither."""
    dynamics.train({**SHORT, "runs_dir": str(root), "run_id": "r"})
    process = popen("train", *cli_args({**LONG, "lr": 1e-2, "runs_dir": str(root), "run_id": "r",
                                        "overwrite": True}))
    time.sleep(rng.uniform(2.0, 10.0))  # import, set-up, the swap, the first steps: wherever it lands
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    leftovers = [p.name for p in root.iterdir() if p.name != "r"]
    config = runs.stored_config(root / "r")
    which = "old run" if config.lr == SHORT["lr"] else "new run"
    summary = runs.read_summary(root / "r")
    return f"{which} ({summary['status']}); leftover folders {leftovers or 'none'}"


def killed_mid_swap(root: Path, rng: random.Random, reference: np.ndarray) -> str:
    settings = {**LONG, "steps": 120, "runs_dir": str(root), "run_id": "k"}
    process = popen("train", *cli_args(settings))
    wait_for(lambda: len(runs.checkpoint_steps(root / "k")) >= 1, process)
    time.sleep(rng.uniform(0.05, 0.6))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    step, _, damaged = runs.latest_intact_checkpoint(root / "k")
    status = runs.read_summary(root / "k")["status"]
    listing = run_cli("runs", str(root)).stdout
    shown = "running (no process)" if "running (no process)" in listing else status
    resumed = dynamics.train({**settings, "resume": True})
    same = np.array_equal(resumed.metrics["loss"].to_numpy(), reference)
    return (f"intact checkpoint: {step is not None}, damaged ones {len(damaged)}; runs shows '{shown}'; "
            f"resume identical to uninterrupted: {same}")


def analyze_live(root: Path) -> str:
    live = popen("train", *cli_args({**LONG, "runs_dir": str(root), "run_id": "live"}))
    wait_for(lambda: bool(runs.checkpoint_steps(root / "live")) and (root / "live" / "metrics.parquet").exists(),
             live)
    result = run_cli("analyze", str(root / "live"), "--max-iter", "2")
    live.send_signal(signal.SIGINT)
    live.wait(timeout=120)
    wrote = (root / "live" / "phases.parquet").exists()
    return f"analyze exit {result.returncode}: {message(result.stderr)}; wrote phases: {wrote}"


def grid_killed(root: Path, rng: random.Random) -> str:
    grid = root.parent / "grid.toml"
    grid.write_text("[base]\nmodel = 'tiny-llama'\ntask = 'tiny'\nsteps = 400\nbatch_size = 8\nn_train = 128\n"
                    "n_eval = 8\nn_eval_generate = 0\neval_every = 0\ncheckpoint_every = 20\nthreads = 1\n"
                    "method = 'lora'\nrank = 4\nlr = 3e-2\n[axes]\nseed = [0]\n")
    driver = subprocess.Popen([sys.executable, "-m", "dynamics", "grid", str(grid), "--runs-dir", str(root)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True,
                              start_new_session=True)
    wait_for(lambda: any(runs.checkpoint_steps(p) for p in root.iterdir() if not p.name.startswith(".")), driver)
    time.sleep(rng.uniform(0.0, 1.0))
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its run, as a closed terminal would
    driver.wait(timeout=60)
    time.sleep(0.2)
    listing = run_cli("runs", str(root)).stdout
    shown = "running (no process)" if "running (no process)" in listing else "other"
    again = run_cli("grid", str(grid), "--runs-dir", str(root))
    table = dynamics.load_runs(root)
    return f"runs shows '{shown}'; grid rerun exit {again.returncode}, statuses {sorted(table['status'])}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", default="", help="run the scenarios whose name contains this text")
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as scratch:
        reference = dynamics.train({**LONG, "steps": 120, "runs_dir": scratch, "run_id": "ref"})
        reference_loss = reference.metrics["loss"].to_numpy()
        scenarios = {
            "two starts, same settings": lambda root: two_starts(root, "same settings"),
            "two starts, other settings": lambda root: two_starts(root, "other settings"),
            "two --resume of a new run": lambda root: two_starts(root, "both --resume"),
            "--overwrite of a live run": overwrite_live,
            "--overwrite of a finished run, SIGKILLed": lambda root: overwrite_killed(root, rng),
            "SIGKILL mid checkpoint swap, then --resume": lambda root: killed_mid_swap(root, rng, reference_loss),
            "analyze on a live run": analyze_live,
            "grid driver and run SIGKILLed, grid rerun": lambda root: grid_killed(root, rng),
        }
        lines = [f"# benchmarks/two_writers.py --trials {args.trials} (tiny-llama, real processes)", ""]
        for name, scenario in scenarios.items():
            if args.only not in name:
                continue
            outcomes = collections.Counter()
            started = time.perf_counter()
            for trial in range(args.trials):
                case = Path(scratch) / f"{len(lines)}-{trial}"
                case.mkdir()
                (case / "runs").mkdir()
                outcomes[scenario(case / "runs")] += 1
            lines.append(f"{name} ({time.perf_counter() - started:.0f} s):")
            lines += [f"  {count}/{args.trials}  {outcome}" for outcome, count in outcomes.most_common()]
            print("\n".join(lines[-1 - len(outcomes):]), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
