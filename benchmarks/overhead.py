"""Step time and peak memory of each perturbation as a ratio to plain LoRA (not a test).

Time: one process, one model per rank; every method gets its own optimizer and perturbation over
that model and, after warm-up, the methods take steps in turn (round-robin), so slow drifts of the
machine hit them all alike; the median over rounds is reported. Memory: each (rank, method) runs
in a child process whose peak resident set (CPU) or peak CUDA allocation (GPU) is read over the
training steps only (the high-water mark is reset after loading). On a CPU the children run with
glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` and ``MALLOC_TRIM_THRESHOLD_=0``, so every tensor over
64 KiB is its own mapping and is returned to the system when freed: the resident set then follows
the live tensors instead of what the allocator happens to keep (without it, identical runs differ by
~5 % in peak RSS). ``noise`` is timed at mid-training
(its ramp f = 0.5), ``mgpo`` without the extra clean-loss forward unless the row says so.

    .venv/bin/python benchmarks/overhead.py                      # SmolLM2-135M, r = 8 and 128, 8 x 128
    .venv/bin/python benchmarks/overhead.py --model tiny-llama --task tiny --ranks 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from dynamics.config import RunConfig
from dynamics.data import load_task
from dynamics.loss import to_device
from dynamics.models import build_model, load_tokenizer
from dynamics.training.step import TrainState, peak_memory_mb, reset_peak_memory, train_step

# label -> config overrides
VARIANTS = {
    "lora": dict(method="lora"),
    "lora+mgpo": dict(method="lora+mgpo"),
    "lora+mgpo dense": dict(method="lora+mgpo", perturb_application="dense"),
    "lora+mgpo lowrank": dict(method="lora+mgpo", perturb_application="lowrank"),
    "lora+mgpo fused": dict(method="lora+mgpo", perturb_application="fused"),
    "lora+mgpo clean/10": dict(method="lora+mgpo", clean_loss_every=10),
    "lora+mgpo-noapn": dict(method="lora+mgpo-noapn"),
    "lora+msam": dict(method="lora+msam"),
    "lora+noise": dict(method="lora+noise"),
    "lora+sam": dict(method="lora+sam"),
}


def config(args, rank: int, overrides: dict) -> RunConfig:
    values = dict(model=args.model, task=args.task, rank=rank, alpha=2 * rank, lr=1e-4, steps=1000,
                  batch_size=args.batch_size, seq_len=args.seq_len, n_train=64, n_eval=0, clean_loss_every=0,
                  device=args.device, dtype=args.dtype, instrument=False)  # norms off: the method's cost only
    return RunConfig(**{**values, **overrides})


class Stepper:
    """One method's optimizer, scheduler, perturbation and adapter hooks (a ``TrainState``) over a
    shared model, stepped by the training loop's own ``train_step``."""

    def __init__(self, cfg: RunConfig, model) -> None:
        self.state = TrainState.create(cfg, model)
        self.steps = 0
        if cfg.perturbation == "noise":
            self.state.perturbation.load_state_dict({"steps": cfg.steps // 2})  # noise ramp f = 0.5

    def step(self, micro_batches, kind: str) -> float:
        """Seconds of one ``train_step``, as it measures itself (``step_time_s``)."""
        self.steps += 1
        return train_step(self.state, micro_batches, self.steps).row["step_time_s"]


def batches(cfg: RunConfig, device):
    task = load_task(cfg, load_tokenizer(cfg))
    return task.kind, [to_device(task.collate(task.train[: cfg.batch_size]), device)]


def time_rank(args, rank: int) -> dict[str, float]:
    base_cfg = config(args, rank, VARIANTS["lora"])
    model = build_model(base_cfg)
    device = next(model.parameters()).device
    kind, micro_batches = batches(base_cfg, device)
    steppers = {label: Stepper(config(args, rank, VARIANTS[label]), model) for label in args.variants}
    for stepper in steppers.values():
        for _ in range(args.warmup):
            stepper.step(micro_batches, kind)
    times: dict[str, list[float]] = {label: [] for label in steppers}
    for _ in range(args.rounds):
        for label, stepper in steppers.items():
            times[label].append(stepper.step(micro_batches, kind))
    if args.profile:  # where the time goes: one more step of each method under torch.profiler
        from torch.profiler import ProfilerActivity, profile

        for label, stepper in steppers.items():
            with profile(activities=[ProfilerActivity.CPU]) as profiler:
                stepper.step(micro_batches, kind)
            print(f"# profile, rank {rank}, {label}\n"
                  + profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return {label: statistics.median(values) for label, values in times.items()}


def child_peak_memory(args, rank: int, label: str) -> float:
    """Run in a fresh process: peak memory (MB) over warm-up + 2 steps of one method."""
    command = [sys.executable, __file__, "--child", label, "--ranks", str(rank), "--model", args.model,
               "--task", args.task, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--device", args.device, "--dtype", args.dtype, "--warmup", str(args.warmup)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}  # see module doc
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mb"]


def run_child(args) -> None:
    cfg = config(args, args.ranks[0], VARIANTS[args.child])
    model = build_model(cfg)
    device = next(model.parameters()).device
    kind, micro_batches = batches(cfg, device)
    stepper = Stepper(cfg, model)
    reset_peak_memory(device)
    for _ in range(args.warmup + 2):
        stepper.step(micro_batches, kind)
    print(json.dumps({"peak_mb": peak_memory_mb(device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="gsm")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 128])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method first")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per method, round-robin")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method memory processes")
    parser.add_argument("--no-time", action="store_true", help="skip the step-time rounds")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="rows to measure (lora is always included: it is the denominator)")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table per method")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.variants = ["lora", *(label for label in args.variants if label != "lora")]
    if args.child:
        run_child(args)
        return

    probe = config(args, args.ranks[0], VARIANTS["lora"])
    device = "cuda" if probe.device == "cuda" or (probe.device == "auto" and torch.cuda.is_available()) else "cpu"
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} device={device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"# {args.model} batch {args.batch_size} x {args.seq_len} tokens; time: median of {args.rounds} "
          f"round-robin steps after {args.warmup} warm-up; memory: peak over the steps, one process per row")
    print(f"{'rank':>5} {'method':<22}{'s/step':>8}{'x LoRA':>8}{'peak MB':>9}{'x LoRA':>8}")
    for rank in args.ranks:
        seconds = {label: float("nan") for label in args.variants} if args.no_time else time_rank(args, rank)
        memory = {} if args.no_memory else {label: child_peak_memory(args, rank, label) for label in args.variants}
        for label in args.variants:
            mem = f"{memory[label]:>9.0f}{memory[label] / memory['lora']:>8.3f}" if memory else ""
            print(f"{rank:>5} {label:<22}{seconds[label]:>8.3f}{seconds[label] / seconds['lora']:>8.3f}{mem}")


if __name__ == "__main__":
    main()
