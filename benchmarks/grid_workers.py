"""Wall time of a small sweep run sequentially (``--workers 1``: one worker process with all the
cores' torch threads, and again with one thread) against ``--workers 2`` (two worker processes,
half the threads each).

Each measurement runs the real command, ``python -m dynamics grid FILE --runs-dir NEW_DIR
[--workers 2]``, in a fresh runs folder, so it includes everything a user waits for: the worker
processes' start-up (imports), model loading, data, training, evaluation and checkpoints. The
modes alternate (``--repeats`` rounds) so a change in the machine's load hits each; the load
average is printed with each number. Also checks that every mode logs the same losses. Not a test:
numbers depend on the machine, and on what else runs on it.

    .venv/bin/python benchmarks/grid_workers.py                        # tiny-llama and SmolLM2-135M
    .venv/bin/python benchmarks/grid_workers.py --sweeps tiny --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import dynamics
from dynamics.executors import usable_cpus

# Two small sweeps of 4 runs each (TOML [base] and [axes] bodies). tiny: the random 2-layer model,
# a few ms per step, so start-up dominates; smollm2: the packaged 135M model on GSM-style math,
# LoRA r = 8, a few seconds per step on 2 cores, so training dominates.
SWEEPS = {
    "tiny": """
[base]
model = "tiny-llama"
task = "tiny"
method = "lora"
steps = 200
batch_size = 8
n_train = 256
n_eval = 16
n_eval_generate = 0
eval_every = 100
checkpoint_every = 100
[axes]
rank = [4, 16]
alpha = "rank"
lr = [3e-3, 3e-2]
""",
    "smollm2": """
[base]
model = "smollm2-135m"
task = "gsm"
method = "lora"
steps = 4
batch_size = 4
seq_len = 128
n_train = 64
n_eval = 4
n_eval_generate = 0
eval_every = 0
checkpoint_every = 0
[axes]
lr = [2e-4, 5e-4]
seed = [0, 1]
""",
}


# (label, --workers, threads in the grid's [base] or None for the executor's default cpus // workers)
MODES = [("sequential", 1, None), ("sequential, 1 thread", 1, 1), ("--workers 2", 2, None)]


def run_sweep(grid: Path, runs_dir: Path, workers: int) -> float:
    """Seconds of wall time for the grid command (it must exit 0)."""
    command = [sys.executable, "-m", "dynamics", "grid", str(grid), "--runs-dir", str(runs_dir),
               "--workers", str(workers)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return wall_s


def max_loss_difference(first: Path, second: Path) -> float:
    """Largest |loss difference| over every step of every run of two runs folders of one grid."""
    largest = 0.0
    for run_dir in sorted(first.iterdir()):
        a = dynamics.load_run(run_dir).metrics["loss"].to_numpy()
        b = dynamics.load_run(second / run_dir.name).metrics["loss"].to_numpy()
        largest = max(largest, float(np.max(np.abs(a - b))))
    return largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweeps", nargs="+", choices=sorted(SWEEPS), default=["tiny", "smollm2"])
    parser.add_argument("--repeats", type=int, default=2, help="rounds of every mode")
    args = parser.parse_args()

    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} {platform.machine()}, {usable_cpus()} CPU cores, "
          f"device=cpu dtype=float32, torch={torch.__version__}")
    print(f"{'sweep':<9}{'mode':<22}{'wall s':>8}{'load avg 1m':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sweeps:
            walls: list[list[float]] = [[] for _ in MODES]
            for repeat in range(args.repeats):
                for mode, (label, workers, threads) in enumerate(MODES):
                    grid = Path(tmp) / f"{name}-{mode}.toml"
                    grid.write_text(SWEEPS[name].replace("[base]", "[base]\nthreads = 1" if threads else "[base]"))
                    load = os.getloadavg()[0]
                    walls[mode].append(run_sweep(grid, Path(tmp) / f"{name}-{mode}-{repeat}", workers))
                    print(f"{name:<9}{label:<22}{walls[mode][-1]:>8.1f}{load:>13.2f}", flush=True)
            for mode, (label, _, _) in enumerate(MODES):
                difference = max_loss_difference(Path(tmp) / f"{name}-0-0", Path(tmp) / f"{name}-{mode}-0")
                print(f"{name:<9}{label:<22} median {statistics.median(walls[mode]):.1f} s; "
                      f"max |loss - sequential loss| {difference:.2e}")

if __name__ == "__main__":
    main()
