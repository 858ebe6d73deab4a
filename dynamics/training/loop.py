"""The training loop: ``train(config)``, one readable function over ``train_step``, no Trainer
subclass.

    config -> model + data -> train_step (perturbation hooks) -> runs/<run_id>/*.parquet

Each optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` examples (``train_step``
documents the step). Data order is a pure function of (seed, epoch), so a resumed run draws
exactly the batches an uninterrupted one would.

Started by ``torchrun`` / ``accelerate launch`` on N processes, the same function trains one run
data-parallel (``dynamics.distributed``): each process takes its shard of every micro-batch, the
step sums the gradients, and process 0 alone claims the run folder, evaluates, measures sharpness,
logs and checkpoints; the others wait for it in the next step's collectives.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from dynamics import runs
from dynamics.adapters import save_initial
from dynamics.config import ConfigError, RunConfig, as_config, warn_ineffective
from dynamics.curvature import measure_sharpness
from dynamics.data import TaskData
from dynamics.data.user_task import describe_data
from dynamics.distributed import ONE_PROCESS, World, backend_for
from dynamics.models import resolve_device
from dynamics.runs.logs import RunLogs
from dynamics.training.data_order import DataOrder
from dynamics.training.evaluate import evaluate
from dynamics.training.handshake import agreed_plan, claimed_by_main
from dynamics.training.interrupt import StopRequest
from dynamics.training.progress import Progress, SessionClock, checkpoint, restore, save_summary
from dynamics.training.setup import build_run, runtime_info, torch_threads
from dynamics.training.step import TrainState, train_step


def train(config: RunConfig | Mapping[str, Any], on_start: Callable[[str], None] | None = None,
          world: World | None = None) -> runs.Run:
    """Run (or resume) one instrumented training; returns the run folder as a ``Run``.

    ``on_start`` is called once the model and data are loaded and the first step is about to run,
    with what happens (``new run``, ``resuming from checkpoint step N``): nothing is announced for a
    run refused on bad input.

    The run ends ``completed``, ``diverged`` (non-finite loss or gradient: the step is not applied,
    everything logged so far is kept), ``interrupted`` (SIGINT/SIGTERM: a checkpoint is written) or
    ``failed`` (an exception, re-raised after the status is recorded). Bad settings raise
    ``ConfigError`` before anything is written.

    ``world`` is the processes of a data-parallel run (default: the launcher's, read from the
    environment; one process without a launcher).
    """
    cfg = as_config(config)
    world = world or World.from_env(backend_for(resolve_device(cfg)))
    if cfg.batch_size % world.size:
        raise ConfigError(f"--batch-size {cfg.batch_size}: must be a multiple of the {world.size} processes "
                          "(each takes an equal shard of every micro-batch)")
    if world.is_main:
        warn_ineffective(cfg)
    plan = agreed_plan(cfg, world)
    if plan.mode == "done":
        return runs.load_run(plan.run_dir)
    with torch_threads(cfg.threads):
        # all that can fail on bad input, before the folder is touched
        model, task, device, setup = build_run(cfg, plan, world)
        runtime = {**runtime_info(cfg, model, task, device, world), **setup} if plan.mode == "new" else None
        keep_initial = plan.mode == "new" and cfg.adapter in runs.INITIAL_ADAPTER_KEPT
        write_initial = (lambda folder: save_initial(model, folder / runs.INITIAL_ADAPTER)) if keep_initial else None
        claim = runs.claim_run(cfg, runtime, write_more=write_initial) if world.is_main else contextlib.nullcontext(
            plan.run_dir)
        with claimed_by_main(world, claim, cfg, plan) as run_dir:  # the one writer, or a ConfigError
            if run_dir is None:  # finished while we loaded
                return runs.load_run(plan.run_dir)
            if runtime and setup and world.is_main:
                runs.update_summary(run_dir, **setup)  # one-off costs, beside the run's wall time
            # Draws during training (dropout, noise) come from a fork of torch's RNG seeded by cfg.seed
            # (or restored from the checkpoint): reproducible, the caller's RNG state left as it was.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(cfg.seed)
                return _train_steps(cfg, run_dir, model, task, device, resume=plan.mode == "resume",
                                    on_start=on_start, world=world)


def _train_steps(cfg: RunConfig, run_dir, model: nn.Module, task: TaskData, device: torch.device,
                 resume: bool, on_start: Callable[[str], None] | None = None, world: World = ONE_PROCESS) -> runs.Run:
    """The claimed run, from its set-up to its last summary, with SIGINT / SIGTERM turned into a
    request the loop answers after a step (checkpoint, then stop): a signal that comes during the
    set-up or the final summary (a grid's orphaned worker, a second SIGTERM) never kills the
    process between a claim and the summary that says how the run ended."""
    with StopRequest() as stop:
        return _run_loop(cfg, run_dir, model, task, device, resume, on_start, world, stop)


def _run_loop(cfg: RunConfig, run_dir, model: nn.Module, task: TaskData, device: torch.device, resume: bool,
              on_start: Callable[[str], None] | None, world: World, stop: StopRequest) -> runs.Run:
    from tqdm.auto import tqdm  # lazy: tqdm.auto probes for Jupyter widgets on import

    state = TrainState.create(cfg, model, world)
    # Process 0 writes the run's tables; the others keep their rows in memory and never flush.
    logs = RunLogs(run_dir, flush_every_s=5.0 if world.is_main else math.inf)
    progress = restore(state, run_dir, device) if resume else Progress()
    if world.is_main:
        # rows logged after the checkpoint are recomputed; with no checkpoint yet, every row is (the
        # step-0 evaluation too: kept, it would be logged twice)
        logs.load(keep_through_step=progress.step if progress.step else -1)
    if on_start is not None and world.is_main:
        what = (f"resuming from checkpoint step {progress.step}" if progress.step
                else "resuming from the start (no checkpoint yet)" if resume else "new run")
        on_start(what + (f"; {describe_data(task.info)}" if task.info else ""))
    order = DataOrder(len(task.train), cfg.seed)
    clock = SessionClock(progress)
    bar = tqdm(total=cfg.steps, initial=progress.step, disable=not (cfg.progress and world.is_main), unit="step",
               desc=run_dir.name, dynamic_ncols=True)
    status = "running"
    model.train()
    try:
        if progress.step == 0:
            _evaluate(state, task, logs, progress, device, bar)
            save_summary(run_dir, cfg, logs, clock, "running", world)
        while progress.step < cfg.steps:
            micro_batches = order.micro_batches(task, progress.examples, cfg, device, world)
            step = progress.step + 1
            world.seed_step(cfg.seed, step)
            result = train_step(state, micro_batches, step, layer_metrics=every(cfg.layer_metrics_every, step))
            if not result.applied:
                logs.metrics.append(result.row)
                status = "diverged"
                break
            progress.advance(result.tokens, cfg.batch_size * cfg.grad_accum)
            logs.metrics.append({**result.row, "tokens": progress.tokens,
                                 "epoch": progress.examples / len(task.train)})
            for row in result.layer_rows:
                logs.layers.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{result.row['loss']:.4f}", lr=f"{result.row['lr']:.2e}", refresh=False)

            last_step = step == cfg.steps
            if last_step or every(cfg.eval_every, step):
                _evaluate(state, task, logs, progress, device, bar)
            if every(cfg.sharpness_every, step):
                _measure_sharpness(state, task, logs, progress, device, bar)
            stop_now = world.any(stop.requested)  # every process stops after the same step
            if last_step or every(cfg.checkpoint_every, step) or stop_now:
                checkpoint(state, run_dir, logs, clock, progress, device)
            if stop_now and not last_step:
                status = "interrupted"
                break
        else:
            status = "completed"
    except KeyboardInterrupt:
        save_summary(run_dir, cfg, logs, clock, "interrupted", world)
        raise
    except BaseException as error:
        # on a full or read-only disk the summary may not be writable either: the run then stays
        # `running` with no writer, which readers and --resume treat as a killed run; the error that
        # stopped it is what the caller hears
        with contextlib.suppress(OSError):
            save_summary(run_dir, cfg, logs, clock, "failed", world, error=f"{type(error).__name__}: {error}")
        raise
    finally:
        bar.close()
    save_summary(run_dir, cfg, logs, clock, status, world)
    world.barrier()  # the summary is on disk before any process reads the run back
    return runs.load_run(run_dir)


def every(interval: int, step: int) -> bool:
    """Whether something done every ``interval`` steps (0: never) is due at ``step``."""
    return bool(interval) and step % interval == 0


# --- evaluation and sharpness during training -------------------------------------------------------
def _evaluate(state: TrainState, task: TaskData, logs: RunLogs, progress: Progress, device, bar) -> None:
    if state.cfg.n_eval and task.eval and state.world.is_main:
        bar.set_postfix_str("evaluating", refresh=True)
        with state.perturbation.unperturbed(state.model):
            logs.evals.append({"step": progress.step, **evaluate(state.model, task, state.cfg, device)})


def _measure_sharpness(state: TrainState, task: TaskData, logs: RunLogs, progress: Progress, device, bar) -> None:
    cfg = state.cfg
    if not state.world.is_main:
        return
    bar.set_postfix_str("sharpness", refresh=True)
    with state.perturbation.unperturbed(state.model):
        rows = measure_sharpness(state.model, task, cfg, device, k=cfg.sharpness_k, n_batches=cfg.sharpness_batches,
                                 seed=cfg.seed, step=progress.step, source="training")
    for row in rows:
        logs.sharpness.append(row)


