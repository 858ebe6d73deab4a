"""The loop's counters (``Progress``, ``SessionClock``) and what it writes of them: the summary
(``save_summary``, always after the logs it names are on disk), checkpoints (``checkpoint``, at the
unperturbed weights) and the restore from the newest intact one (``restore``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from dynamics import runs
from dynamics.config import ConfigError, ConfigWarning, RunConfig
from dynamics.distributed import ONE_PROCESS, World
from dynamics.runs.logs import RunLogs
from dynamics.training.step import TrainState


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


def save_summary(run_dir, cfg: RunConfig, logs: RunLogs, clock: SessionClock, status: str, world: World = ONE_PROCESS,
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


def checkpoint(state: TrainState, run_dir, logs: RunLogs, clock: SessionClock, progress: Progress,
                device: torch.device) -> None:
    if not state.world.is_main:
        return
    save_summary(run_dir, state.cfg, logs, clock, "running")  # logs on disk cover every step up to the checkpoint
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    with state.perturbation.unperturbed(state.model):
        trainer_state = {"progress": vars(progress).copy(), "rng": rng, **state.state_dict()}
        runs.save_checkpoint(run_dir, progress.step, state.model, trainer_state, keep=state.cfg.keep_checkpoints)


def restore(state: TrainState, run_dir, device: torch.device) -> Progress:
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
        if state.world.is_main:
            runs.remove_debris(run_dir, 0)
        return Progress()
    runs.load_weights(state.model, runs.checkpoint_dir(run_dir, step))
    if state.world.is_main:  # an intact state is loaded: what a killed writer left can go
        runs.remove_debris(run_dir, step)
    state.load_state_dict(trainer_state)
    torch.set_rng_state(trainer_state["rng"]["torch"])
    if device.type == "cuda" and "cuda" in trainer_state["rng"]:
        torch.cuda.set_rng_state(trainer_state["rng"]["cuda"], device)
    return Progress(**trainer_state["progress"])
