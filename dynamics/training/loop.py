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
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from dynamics import runs
from dynamics.adapters import LoraGASource, save_initial
from dynamics.config import ConfigError, ConfigWarning, RunConfig, as_config, warn_ineffective
from dynamics.curvature import measure_sharpness
from dynamics.data import TaskData, load_task, n_loss_terms
from dynamics.distributed import ONE_PROCESS, World, backend_for
from dynamics.files import first_line
from dynamics.loss import loss_sum, to_device
from dynamics.models import build_model, load_tokenizer, resolve_device, resolve_dtype
from dynamics.runs.logs import RunLogs
from dynamics.training.evaluate import evaluate
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
    plan = _agreed_plan(cfg, world)
    if plan.mode == "done":
        return runs.load_run(plan.run_dir)
    with torch_threads(cfg.threads):
        # all that can fail on bad input, before the folder is touched
        model, task, device, setup = _build(cfg, plan, world)
        runtime = {**_runtime(cfg, model, task, device, world), **setup} if plan.mode == "new" else None
        keep_initial = plan.mode == "new" and cfg.adapter in runs.INITIAL_ADAPTER_KEPT
        write_initial = (lambda folder: save_initial(model, folder / runs.INITIAL_ADAPTER)) if keep_initial else None
        claim = runs.claim_run(cfg, runtime, write_more=write_initial) if world.is_main else contextlib.nullcontext(
            plan.run_dir)
        with _claimed_by_main(world, claim, cfg, plan) as run_dir:  # the one writer, or a ConfigError
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


PLAN_MODES = ("new", "resume", "done")


def _agreed_plan(cfg: RunConfig, world: World) -> runs.RunPlan:
    """Process 0's plan, on every process (the others must not read a folder process 0 may be
    creating). A plan refused on process 0 is refused on all."""
    if not world.distributed:
        return runs.plan_run(cfg)
    if not world.is_main:
        mode = world.broadcast_int(-1)
        if mode < 0:
            raise _following_process_0(f"--run-id {cfg.run_dir.name}: refused by process 0 (its message says why)")
        return runs.RunPlan(PLAN_MODES[mode], cfg.run_dir)
    try:
        plan = runs.plan_run(cfg)
    except BaseException:
        world.broadcast_int(-1)
        raise
    world.broadcast_int(PLAN_MODES.index(plan.mode))
    return plan


def _following_process_0(message: str) -> ConfigError:
    """The refusal of a process other than 0, which follows process 0's (the CLI prints only that)."""
    error = ConfigError(message)
    error.follows_process_0 = True
    return error


@contextlib.contextmanager
def _claimed_by_main(world: World, claim, cfg: RunConfig, plan: runs.RunPlan) -> Iterator[Any]:
    """Enter ``claim`` (process 0's ``claim_run``) and tell every process how it went: yields the
    run folder, or None when the run finished while we loaded it."""
    CLAIMED, REFUSED, FINISHED = 1, 0, 2
    with contextlib.ExitStack() as stack:
        try:
            run_dir = stack.enter_context(claim)
        except BaseException:
            if world.is_main:
                world.broadcast_int(REFUSED)
            raise
        outcome = CLAIMED
        if world.is_main and plan.mode == "resume" and runs.plan_run(cfg).mode == "done":
            outcome = FINISHED
        outcome = world.broadcast_int(outcome)
        if outcome == REFUSED:
            raise _following_process_0(f"--run-id {cfg.run_dir.name}: process 0 could not claim the run "
                                       "(its message says why)")
        yield run_dir if outcome == CLAIMED else None


def _train_steps(cfg: RunConfig, run_dir, model: nn.Module, task: TaskData, device: torch.device,
                 resume: bool, on_start: Callable[[str], None] | None = None, world: World = ONE_PROCESS) -> runs.Run:
    from tqdm.auto import tqdm  # lazy: tqdm.auto probes for Jupyter widgets on import

    state = TrainState.create(cfg, model, world)
    # Process 0 writes the run's tables; the others keep their rows in memory and never flush.
    logs = RunLogs(run_dir, flush_every_s=5.0 if world.is_main else math.inf)
    progress = _restore(state, run_dir, device) if resume else Progress()
    if world.is_main:
        logs.load(keep_through_step=progress.step)  # drop rows logged after the checkpoint
    if on_start is not None and world.is_main:
        on_start(f"resuming from checkpoint step {progress.step}" if progress.step
                 else "resuming from the start (no checkpoint yet)" if resume else "new run")
    order = DataOrder(len(task.train), cfg.seed)
    clock = SessionClock(progress)
    bar = tqdm(total=cfg.steps, initial=progress.step, disable=not (cfg.progress and world.is_main), unit="step",
               desc=run_dir.name, dynamic_ncols=True)
    status = "running"
    model.train()
    try:
        with StopRequest() as stop:
            if progress.step == 0:
                _evaluate(state, task, logs, progress, device, bar)
                _save(run_dir, cfg, logs, clock, "running", world)
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
                    _checkpoint(state, run_dir, logs, clock, progress, device)
                if stop_now and not last_step:
                    status = "interrupted"
                    break
            else:
                status = "completed"
    except KeyboardInterrupt:
        _save(run_dir, cfg, logs, clock, "interrupted", world)
        raise
    except BaseException as error:
        _save(run_dir, cfg, logs, clock, "failed", world, error=f"{type(error).__name__}: {error}")
        raise
    finally:
        bar.close()
    _save(run_dir, cfg, logs, clock, status, world)
    world.barrier()  # the summary is on disk before any process reads the run back
    return runs.load_run(run_dir)


def every(interval: int, step: int) -> bool:
    """Whether something done every ``interval`` steps (0: never) is due at ``step``."""
    return bool(interval) and step % interval == 0


# --- setup ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` (0: leave torch's default) and restored after."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _build(cfg: RunConfig, plan: runs.RunPlan, world: World = ONE_PROCESS
           ) -> tuple[nn.Module, TaskData, torch.device, dict[str, float]]:
    """Model, task and device of ``cfg`` (a new run's folder is created only once they all load),
    and the seconds of one-off set-up worth recording (LoRA-GA's initialisation). In a
    data-parallel run each process builds the same model (LoRA-GA's gradient estimate included)
    and then takes process 0's weights, as DDP does, so they start bit-identical."""
    device = resolve_device(cfg)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    try:
        tokenizer = load_tokenizer(cfg)
    except (OSError, ValueError) as error:  # not found locally or on the hub, no network, no tokenizer files
        raise ConfigError(f"--model {cfg.model}: cannot load its tokenizer ({first_line(error)})") from error
    task = load_task(cfg, tokenizer)
    if not task.train:
        raise ConfigError(f"--seq-len {cfg.seq_len}: no --task {cfg.task} training example fits; raise it")
    loraga, estimate = None, None
    if cfg.adapter == "loraga" and plan.mode == "resume":
        try:
            loraga = runs.stored_initial_adapter(plan.run_dir, cfg)
        except runs.DamagedCheckpoint as error:
            raise ConfigError(f"--resume {plan.run_dir.name}: {error}; start the run again with --overwrite") from None
    elif cfg.adapter == "loraga":
        estimate = GradientEstimate(task, cfg, device)
        loraga = LoraGASource(gradient_step=estimate)
    try:
        model = build_model(cfg, num_labels=len(task.label_names) or None, loraga=loraga)
    except ConfigError:
        raise
    except (OSError, ValueError) as error:
        raise ConfigError(f"--model {cfg.model}: cannot load it ({first_line(error)})") from error
    world.broadcast_tensors([*model.parameters(), *model.buffers()])
    if estimate is None:
        return model, task, device, {}
    # the estimate's forward/backward passes, then peft's SVDs and offsets (until build_model returned)
    svd_s = time.perf_counter() - estimate.finished
    return model, task, device, {"loraga_gradient_s": round(estimate.seconds, 3), "loraga_svd_s": round(svd_s, 3),
                                 "adapter_init_s": round(estimate.seconds + svd_s, 3)}


class GradientEstimate:
    """LoRA-GA's gradient batches: the first ``loraga_batches`` batches of ``batch_size`` training
    examples in the run's own order (``DataOrder``; the batches steps 1, 2, ... then train on).
    Called with the base model, it runs forward and backward over each, the task loss as in
    training (mean per target token / example of the batch); peft sums the gradients of the
    target weights and divides by the number of batches. Records its wall time."""

    def __init__(self, task: TaskData, cfg: RunConfig, device: torch.device) -> None:
        self.task, self.cfg, self.device = task, cfg, device
        self.seconds = 0.0
        self.finished: float | None = None  # perf_counter() when the last backward returned

    def __call__(self, model: nn.Module) -> None:
        started = time.perf_counter()
        order = DataOrder(len(self.task.train), self.cfg.seed)
        kind = self.cfg.task_kind
        for k in range(self.cfg.loraga_batches):
            indices = order.indices(k * self.cfg.batch_size, self.cfg.batch_size)
            batch = to_device(self.task.collate([self.task.train[i] for i in indices]), self.device)
            with warnings.catch_warnings():  # peft's counting hooks on layers whose inputs need no grad: harmless
                warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
                (loss_sum(model, batch, kind) / max(n_loss_terms(batch, kind), 1)).backward()
        self.finished = time.perf_counter()
        self.seconds = self.finished - started


def _runtime(cfg: RunConfig, model: nn.Module, task: TaskData, device: torch.device,
             world: World = ONE_PROCESS) -> dict[str, Any]:
    """Where and on what a new run trains (config.json's ``runtime``)."""
    dtype = resolve_dtype(cfg, device)
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "processes": world.size,
            "n_train": len(task.train), "n_eval": len(task.eval),
            # parameters of the model as trained (base + adapter; tied weights once)
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters())}


class DataOrder:
    """Example ``i`` of the training stream (0-based, over all epochs) is
    ``train[perm_e[i % n]]`` with ``e = i // n`` and ``perm_e`` a permutation seeded by (seed, e):
    stateless, so resuming at any step needs no loader state."""

    def __init__(self, n_examples: int, seed: int) -> None:
        self.n_examples = n_examples
        self.seed = seed
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for i in range(start, start + count):
            epoch = i // self.n_examples
            if epoch != self._epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_examples)
                self._epoch = epoch
            out.append(int(self._perm[i % self.n_examples]))
        return out

    def micro_batches(self, task: TaskData, start: int, cfg: RunConfig, device: torch.device,
                      world: World = ONE_PROCESS) -> list[dict]:
        """One step's ``grad_accum`` micro-batches of ``batch_size`` examples from stream position
        ``start``, collated and on ``device``; in a data-parallel run, this process's shard of each."""
        indices = self.indices(start, cfg.batch_size * cfg.grad_accum)
        return [to_device(task.collate([task.train[i] for i in world.shard(indices[k : k + cfg.batch_size])]), device)
                for k in range(0, len(indices), cfg.batch_size)]


# --- progress, summary and checkpoints ---------------------------------------------------------------
@dataclass
class Progress:
    """The loop's counters; checkpointed as ``vars(progress)``."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # non-padding input tokens seen
    examples: int = 0  # training examples seen
    wall_time_s: float = 0.0  # over all sessions of this run

    def advance(self, tokens: int, examples: int) -> None:
        self.step += 1
        self.examples += examples
        self.tokens += tokens


class SessionClock:
    """Keeps ``progress.wall_time_s`` = time of earlier sessions + time since this one started."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.before = progress.wall_time_s
        self.started = time.perf_counter()

    def tick(self) -> Progress:
        self.progress.wall_time_s = self.before + time.perf_counter() - self.started
        return self.progress


def _save(run_dir, cfg: RunConfig, logs: RunLogs, clock: SessionClock, status: str, world: World = ONE_PROCESS,
          **extra: Any) -> None:
    """Flush the logs, then write summary.json (so the summary never names rows not on disk);
    process 0's duty."""
    progress = clock.tick()
    if not world.is_main:
        return
    logs.flush()
    fields = {"error": None, **logs.summary_numbers(), **extra}  # extra may set the error
    runs.update_summary(run_dir, status=status, steps_done=progress.step, steps_total=cfg.steps,
                        wall_time_s=round(progress.wall_time_s, 3), **fields)


def _checkpoint(state: TrainState, run_dir, logs: RunLogs, clock: SessionClock, progress: Progress,
                device: torch.device) -> None:
    if not state.world.is_main:
        return
    _save(run_dir, state.cfg, logs, clock, "running")  # logs on disk cover every step up to the checkpoint
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    with state.perturbation.unperturbed(state.model):
        trainer_state = {"progress": vars(progress).copy(), "rng": rng, **state.state_dict()}
        runs.save_checkpoint(run_dir, progress.step, state.model, trainer_state, keep=state.cfg.keep_checkpoints)


def _restore(state: TrainState, run_dir, device: torch.device) -> Progress:
    """Load the newest checkpoint that reads in full (a damaged newer one is named and skipped);
    a run with no checkpoint yet starts from step 0, one whose checkpoints are all damaged stops."""
    step, trainer_state, damaged = runs.latest_intact_checkpoint(run_dir)
    for line in damaged if state.world.is_main else ():
        warnings.warn(f"{run_dir.name}: {line}" + (f"; resuming from step {step}" if step else ""), ConfigWarning,
                      stacklevel=2)
    if step is None:
        if damaged:
            raise ConfigError(f"--resume {run_dir.name}: no intact checkpoint to resume from; "
                              "delete the run folder (or use --overwrite) to start it again")
        return Progress()
    runs.load_weights(state.model, runs.checkpoint_dir(run_dir, step))
    state.load_state_dict(trainer_state)
    torch.set_rng_state(trainer_state["rng"]["torch"])
    if device.type == "cuda" and "cuda" in trainer_state["rng"]:
        torch.cuda.set_rng_state(trainer_state["rng"]["cuda"], device)
    return Progress(**trainer_state["progress"])


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


# --- interruption ------------------------------------------------------------------------------------
class StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks after each step (it then checkpoints and stops);
    a second Ctrl-C interrupts at once. Only installed in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
