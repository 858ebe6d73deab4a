"""Process 0's word on a data-parallel run, heard by every process: the plan (new / resume /
done) and whether it claimed the run folder (``dynamics.distributed``; docs/distributed.md). In a
run of one process both are just process 0's own.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from dynamics import runs
from dynamics.config import ConfigError, RunConfig
from dynamics.distributed import World

PLAN_MODES = ("new", "resume", "done")


def agreed_plan(cfg: RunConfig, world: World) -> runs.RunPlan:
    """Process 0's plan, on every process (the others must not read a folder process 0 may be
    creating). A plan refused on process 0 is refused on all."""
    if not world.distributed:
        return runs.plan_run(cfg)
    if not world.is_main:
        mode = world.broadcast_int(-1)
        if mode < 0:
            raise following_process_0(f"--run-id {cfg.run_dir.name}: refused by process 0 (its message says why)")
        return runs.RunPlan(PLAN_MODES[mode], cfg.run_dir)
    try:
        plan = runs.plan_run(cfg)
    except BaseException:
        world.broadcast_int(-1)
        raise
    world.broadcast_int(PLAN_MODES.index(plan.mode))
    return plan


def following_process_0(message: str) -> ConfigError:
    """The refusal of a process other than 0, which follows process 0's (the CLI prints only that)."""
    error = ConfigError(message)
    error.follows_process_0 = True
    return error


@contextlib.contextmanager
def claimed_by_main(world: World, claim, cfg: RunConfig, plan: runs.RunPlan) -> Iterator[Any]:
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
            raise following_process_0(f"--run-id {cfg.run_dir.name}: process 0 could not claim the run "
                                       "(its message says why)")
        yield run_dir if outcome == CLAIMED else None
