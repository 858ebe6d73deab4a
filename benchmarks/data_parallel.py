"""Data parallelism: how close N processes come to one, and what they cost in wall time (not a test).

For each method, one run on 1 process and the same run on N processes (``torchrun --standalone``,
gloo on CPUs, nccl on GPUs), same global batch; the table gives the largest relative difference of
every logged quantity over all steps (and layers), and each run's wall time (``summary.json``,
training only) beside the command's (imports and set-up included).

    .venv/bin/python benchmarks/data_parallel.py                                   # tiny-llama, 5 methods
    .venv/bin/python benchmarks/data_parallel.py --model minilm-l6 --task bbc --methods lora,lora+mgpo \\
        --steps 20 --batch-size 16 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import dynamics
from dynamics.config import RunConfig, config_flags

COLUMNS = ["loss", "loss_clean", "grad_norm", "param_norm", "update_norm", "momentum_norm", "grad_ema",
           "apn_scale", "perturb_norm"]
LAYER_COLUMNS = ["grad_norm", "grad_ema", "apn_scale", "perturb_norm"]


def flags(settings: dict) -> list[str]:
    return config_flags(RunConfig(**settings))


def largest_relative_difference(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    both = np.isfinite(a) & np.isfinite(b)
    if not both.any():
        return None
    scale = np.maximum(np.abs(b[both]), 1e-12)
    return float(np.max(np.abs(a[both] - b[both]) / scale))


def timed(command: list[str], threads: int) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--task", default="tiny")
    parser.add_argument("--methods", default="lora,lora+mgpo,lora+sam,lora+noise,full")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process of the N")
    parser.add_argument("--threads-one", type=int, default=None, help="torch threads of the 1 process (default: "
                                                                       "--threads)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per example (default: the config's)")
    parser.add_argument("--no-dropout", action="store_true", help="switch every dropout off (benchmarks/no_dropout.py)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="data-parallel-"))
    threads_one = args.threads_one or args.threads
    base = dict(model=args.model, task=args.task, steps=args.steps, batch_size=args.batch_size, lr=3e-3,
                eval_every=0, checkpoint_every=0, layer_metrics_every=5, progress=False, n_eval=0)
    if args.seq_len:
        base["seq_len"] = args.seq_len
    entry = [str(Path(__file__).with_name("no_dropout.py"))] if args.no_dropout else ["-m", "dynamics"]
    if args.task == "tiny":
        base.update(n_train=256, n_eval_generate=0)
    lines = [f"# {' '.join(sys.argv)}", f"# {platform.node()}, {os.cpu_count()} CPUs, {args.nproc} processes of "
             f"{args.threads} thread(s) vs 1 process of {threads_one} thread(s); global batch {args.batch_size}; "
             f"{args.steps} steps" + (", every dropout off" if args.no_dropout else ""),
             f"{'method':<12} {'max rel diff (metrics)':>23} {'(layers)':>10} {'worst column':>14} "
             f"{'train s, 1':>10} {'train s, N':>10} {'cmd s, 1':>9} {'cmd s, N':>9}"]
    print("\n".join(lines), flush=True)
    for method in args.methods.split(","):
        settings = {**base, "method": method}
        one_cmd = [sys.executable, *entry, "train", *flags({**settings, "runs_dir": str(root / "one"),
                                                                        "run_id": method, "threads": threads_one})]
        many_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                    *entry, "train", *flags({**settings, "runs_dir": str(root / "many"), "run_id": method,
                                                       "threads": args.threads})]
        one_s, many_s = timed(one_cmd, threads_one), timed(many_cmd, args.threads)
        one, many = dynamics.load_run(root / "one" / method), dynamics.load_run(root / "many" / method)
        diffs = {c: largest_relative_difference(many.metrics[c], one.metrics[c]) for c in COLUMNS}
        diffs = {c: d for c, d in diffs.items() if d is not None}
        la, lb = (t.sort_values(["step", "layer"]).reset_index(drop=True) for t in (many.layers, one.layers))
        layer_diffs = [largest_relative_difference(la[c], lb[c]) for c in LAYER_COLUMNS]
        worst = max(diffs, key=diffs.get)
        line = (f"{method:<12} {diffs[worst]:>23.2e} {max(d for d in layer_diffs if d is not None):>10.2e} "
                f"{worst:>14} {one.summary['wall_time_s']:>10.1f} {many.summary['wall_time_s']:>10.1f} "
                f"{one_s:>9.1f} {many_s:>9.1f}")
        print(line, flush=True)
        lines.append(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
