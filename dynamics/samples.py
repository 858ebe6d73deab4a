"""Small sample runs for the notebooks and their tests: a method x rank x lr grid of tiny-llama runs.

``make_sample_runs(root)`` trains, on the synthetic ``tiny`` task (a random two-layer Llama, see
``dynamics.data.tiny``), ``lora`` and ``lora+mgpo`` at ranks 2 and 8 (alpha = rank) and learning
rates 3e-3 and 3e-1, plus ``full`` fine-tuning at 3e-3 as a reference: 9 runs of 60 optimizer
steps, each checkpointed at its last step, with per-layer rows every 5 steps and, for the two rank-8
runs at 3e-3, the Hessian's top 2 eigenvalues every 20 steps during training. Then
:func:`dynamics.run_analysis.analyze_run` writes phases, top-2 eigenvalues, a Hutchinson trace (20
HVPs), an SLQ spectral density (3 x 10 HVPs) and the greedy continuations of the 16 held-out
sequences (exact match) at the last checkpoint of every run.

At 3e-1 the loss of the LoRA runs stalls and jumps by a few tenths of a nat per token, too briefly
for the phase detector to call it a divergence: on this task no cheap setting we tried (no
clipping, constant schedule, batch 16, lr up to 1) gives a detected double descent, so the phase
tables of these runs are empty (a curve without a divergence has no phases).
The curvature does differ: at 3e-1 LoRA-MGPO at rank 8 ends where the top eigenvalue is about
1.7e4 (LoRA there: 0.07), which the trace and the density's largest node confirm.

Cost, measured on 2 shared CPU cores (torch on 1 thread): 24 s from an empty root (about 1.5 s of
training and 1 s of analysis per run, plus a few seconds of first-call warm-up), 0.1 s for a
re-run (every run found finished and analysed: nothing trained, measured or written);
``python -m dynamics.samples ROOT`` takes 24 s wall. ``quick=False`` trains 300 steps at ranks
2, 8, 32 and learning rates 3e-3, 3e-2, 3e-1, with full fine-tuning at each lr (21 runs).

Seeded and deterministic: every run has ``seed=0`` and ``data_seed=0``, torch runs one thread, and
each folder name is the default run id (a hash of the settings), so a re-run finds its own runs
(``resume=True``).

Command line: ``python -m dynamics.samples ROOT [--full]`` prints the run folders.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from dynamics import runs
from dynamics.config import ConfigWarning
from dynamics.run_analysis import analyze_run
from dynamics.training import train
from dynamics.training.setup import torch_threads

# exact match: the 16 held-out sequences decoded (answers are at most 12 tokens and a separator)
ANALYSIS_OPTIONS = dict(trace=True, density=True, trace_samples=20, density_runs=3, density_steps=10, k=2,
                        exact_match=16, max_new_tokens=13)


def sample_configs(root: str | Path, *, quick: bool = True) -> list[dict[str, Any]]:
    """The config dicts :func:`make_sample_runs` trains, in order (adapter runs, then ``full``)."""
    steps = 60 if quick else 300
    ranks = (2, 8) if quick else (2, 8, 32)
    lrs = (3e-3, 3e-1) if quick else (3e-3, 3e-2, 3e-1)
    base = dict(
        model="tiny-llama", task="tiny", steps=steps, batch_size=8, n_train=256, n_eval=16,
        n_eval_generate=0,  # no greedy decoding: eval loss only
        eval_every=20,
        checkpoint_every=steps // 2,  # also at the last step, which analyze measures
        layer_metrics_every=5,  # layers.parquet rows (grad norm, APN factor) every 5 steps
        seed=0, data_seed=0, threads=1,  # one torch thread: deterministic, and fair to shared cores
        runs_dir=str(root), resume=True, progress=False,
    )
    sharpness = dict(sharpness_every=20 if quick else 50, sharpness_k=2)  # eigenvalues during training
    configs = []
    for method in ("lora", "lora+mgpo"):
        for rank in ranks:
            for lr in lrs:
                traced = sharpness if rank == 8 and lr == lrs[0] else {}
                configs.append({**base, "method": method, "rank": rank, "alpha": rank, "lr": lr, **traced})
    for lr in lrs[:1] if quick else lrs:
        configs.append({**base, "method": "full", "lr": lr})  # rank/alpha mean nothing here: left at default
    return configs


def make_sample_runs(root: str | Path, *, quick: bool = True) -> list[Path]:
    """Train (or find finished) the sample runs under ``root`` and analyse each; returns their folders.

    A run already finished under ``root`` is not trained again, and one whose sharpness, trace and
    density tables already hold its last checkpoint is not analysed again. Analysis runs torch on
    one thread (the caller's setting is restored): with two threads on two busy cores the HVPs took
    ten times longer.
    """
    paths = []
    with torch_threads(1):
        for config in sample_configs(root, quick=quick):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConfigWarning)
                warnings.simplefilter("ignore", FutureWarning)  # transformers deprecation notices
                run = train(config)
                if not _analysed(run):
                    analyze_run(run.path, **ANALYSIS_OPTIONS)
            paths.append(run.path)
    return paths


def _analysed(run: runs.Run) -> bool:
    """Whether ``analyze_run`` has measured this run at its last checkpoint already."""
    steps = runs.checkpoint_steps(run.path)
    if not steps or not (run.path / "phases.parquet").exists():
        return False
    return all(steps[-1] in set(table["step"]) for table in (run.sharpness, run.trace, run.density,
                                                               run.generations))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dynamics.samples", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder to hold the run folders (created if missing)")
    parser.add_argument("--full", action="store_true", help="the larger grid (300 steps, 3 ranks, 3 lrs)")
    args = parser.parse_args(argv)
    for path in make_sample_runs(args.root, quick=not args.full):
        print(path)


if __name__ == "__main__":
    main()
