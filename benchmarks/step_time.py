"""Seconds per optimizer step and the cost of instrumentation, measured in one process.

Runs short trainings of the same config alternately with instrumentation on (defaults: global
norms every step, per-layer rows every 10 steps) and off (``--no-instrument``, no layer rows),
and reports the median step time of each (first step of every run dropped as warm-up), their ratio
and the process's peak resident memory. Not a test: numbers depend on the machine.

    .venv/bin/python benchmarks/step_time.py                     # SmolLM2-135M LoRA r=8, 8 x 128
    .venv/bin/python benchmarks/step_time.py --model tiny-llama --task tiny
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import tempfile
import time

import torch

import dynamics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="gsm")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, interleaved")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as runs_dir:
        for repeat in range(args.repeats):
            for instrument in (True, False):
                run = dynamics.train(dict(
                    model=args.model, task=args.task, method=args.method, rank=args.rank, alpha=2 * args.rank,
                    lr=5e-4, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, n_train=256,
                    n_eval=0, eval_every=0, checkpoint_every=0, instrument=instrument,
                    layer_metrics_every=10 if instrument else 0, device=args.device, dtype=args.dtype,
                    runs_dir=runs_dir, run_id=f"bench-{instrument}-{repeat}", progress=False))
                times[instrument] += run.metrics["step_time_s"].iloc[1:].tolist()
                device = run.info["runtime"]["device"]
                dtype = run.info["runtime"]["dtype"]
    on, off = statistics.median(times[True]), statistics.median(times[False])
    instrumentation_ms = time_instrumentation(args)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} device={device} dtype={dtype} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"# {args.model} {args.method} r={args.rank} batch {args.batch_size} x {args.seq_len} tokens, "
          f"{args.repeats} x {args.steps - 1} timed steps per variant")
    print(f"{'variant':<22}{'median s/step':>14}{'min':>8}{'max':>8}")
    for label, instrument in (("instrumented", True), ("not instrumented", False)):
        values = times[instrument]
        print(f"{label:<22}{statistics.median(values):>14.3f}{min(values):>8.3f}{max(values):>8.3f}")
    print(f"overhead ratio (instrumented / not): {on / off:.3f}")
    print(f"instrumentation work alone (snapshot + 3 norms, median of 20): {instrumentation_ms:.1f} ms/step "
          f"= {instrumentation_ms / 1000 / off:.2%} of a step")
    print(f"peak resident memory of the process: {peak_rss_mb:.0f} MB")


def time_instrumentation(args) -> float:
    """Milliseconds of the per-step instrumentation (parameter snapshot, update/param/momentum
    norms) on the same model's trainable parameters, with AdamW state in place."""
    from dynamics.config import RunConfig
    from dynamics.models import build_model, trainable_parameters
    from dynamics.training.optim import make_optimizer
    from dynamics.training.step import step_norms

    cfg = RunConfig(model=args.model, task=args.task, method=args.method, rank=args.rank, device=args.device,
                    dtype=args.dtype)
    model = build_model(cfg, num_labels=5 if cfg.task_kind == "classification" else None)
    params = [p for _, p in trainable_parameters(model)]
    optimizer = make_optimizer(cfg, model)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    samples = []
    for _ in range(20):
        started = time.perf_counter()
        before = [p.detach().clone() for p in params]  # what train_step copies for update_norm
        step_norms(params, before, optimizer)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


if __name__ == "__main__":
    main()
