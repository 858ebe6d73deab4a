"""``SweepBoard``: a grid's progress in a terminal or a log, one line per run (queued, running
step k/N, completed, diverged, failed, interrupted, skipped) and a line of counts with the
elapsed time and an ETA. The executors (``dynamics.executors``) report to it; it reads each
running run's ``metrics.parquet`` footer for the steps done.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pyarrow.parquet as pq

from dynamics import runs
from dynamics.config import RunConfig


@dataclass(frozen=True)
class RunOutcome:
    """How one attempt at a run ended: a status (``runs.ENDED``) and the error, if any."""

    run_id: str
    status: str
    steps_done: int | None = None
    error: str | None = None


@dataclass
class _Entry:
    run_id: str
    run_dir: Path
    steps_total: int  # optimizer steps
    action: str  # new, resume, retry, skip
    state: str  # queued, running, or a final status
    steps_done: int = 0  # optimizer steps logged (metrics.parquet rows)
    steps_at_start: int = 0  # steps done before this sweep
    final_loss: float | None = None
    error: str | None = None


class SweepBoard:
    """One line per run (queued, running step k/N, completed, diverged, failed, interrupted, or
    skipped) and a line of counts with the elapsed time and an ETA.

    On a terminal the block is redrawn in place; elsewhere (a log file) a run's line is printed
    when its state changes and every ``heartbeat_s`` seconds while it runs. The ETA is the steps
    left divided by the steps per second this sweep has achieved so far (start-up included).
    """

    def __init__(self, plan: Sequence[tuple[RunConfig, str]], stream: TextIO | None,
                 heartbeat_s: float = 30.0, clock=time.monotonic) -> None:
        self.stream = stream
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self.started_at = clock()
        self.started_wall = time.time()
        self.entries: dict[str, _Entry] = {}
        for cfg, action in plan:
            damaged = action == "skip" and runs.run_status(cfg.run_dir) == runs.DAMAGED
            summary = {"status": runs.DAMAGED} if damaged else runs.read_summary(cfg.run_dir)
            done = _steps_logged(cfg.run_dir) if action != "skip" else summary.get("steps_done") or 0
            state = (summary.get("status") or "completed") if action == "skip" else "queued"
            self.entries[cfg.resolved_run_id] = _Entry(
                cfg.resolved_run_id, cfg.run_dir, cfg.steps, action, state, done, done,
                summary.get("final_loss"), summary.get("error") if action == "skip" else None)
        self._tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._drawn = 0  # lines drawn last time (terminal)
        self._printed: dict[str, tuple[str, float]] = {}  # run id -> (state, when) last printed (log)
        self._last_counts = 0.0
        if stream is not None and not self._tty:
            for entry in self.entries.values():
                self._print_entry(entry)
        self.refresh(force=True)

    # executors report here
    def started(self, run_id: str) -> None:
        self.entries[run_id].state = "running"

    def finished(self, outcome: RunOutcome) -> None:
        entry = self.entries[outcome.run_id]
        summary = runs.read_summary(entry.run_dir)
        entry.state = outcome.status
        entry.steps_done = outcome.steps_done if outcome.steps_done is not None else entry.steps_done
        entry.final_loss = summary.get("final_loss")
        entry.error = outcome.error

    def refresh(self, force: bool = False) -> None:
        """Look at the run folders of unfinished runs and redraw (terminal) or print changes (log)."""
        for entry in self.entries.values():
            if entry.state in ("queued", "running"):
                entry.steps_done = _steps_logged(entry.run_dir)
                if entry.state == "queued" and _touched_since(entry.run_dir, self.started_wall):
                    entry.state = "running"  # Ray: the task has started
        if self.stream is None:
            return
        if self._tty:
            self._redraw()
            return
        now = self.clock()
        changed = False
        for entry in self.entries.values():
            state, when = self._printed.get(entry.run_id, (None, now))
            if entry.state != state or (entry.state == "running" and now - when >= self.heartbeat_s):
                self._print_entry(entry)
                changed = True
        if force or changed or now - self._last_counts >= self.heartbeat_s:
            self._last_counts = now
            print(self.counts_line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.stream is None:
            return
        self.refresh()
        if self._tty:
            self._drawn = 0  # leave the final block on screen

    # what is shown
    def line(self, entry: _Entry) -> str:
        steps = f"{entry.steps_done}/{entry.steps_total}"
        if entry.state == "queued":
            text = {"new": "queued", "resume": f"queued (resumes, {entry.steps_at_start} steps logged)",
                    "retry": f"queued (retries failed run, {entry.steps_at_start} steps logged)"}[entry.action]
        elif entry.state == "running":
            text = f"running step {steps}"
        else:
            text = f"{entry.state} {steps}"
            if entry.final_loss is not None and math.isfinite(entry.final_loss):
                text += f" loss {entry.final_loss:.4f}"
            if entry.action == "skip":
                text += " (skipped" + ("; --retry-failed retries it)" if entry.state == "failed" else ")")
            if entry.error:
                text += f": {entry.error}"
        return f"{entry.run_id}  {text}"

    def lines(self) -> list[str]:
        return [self.line(entry) for entry in self.entries.values()] + [self.counts_line()]

    def counts_line(self) -> str:
        counts: dict[str, int] = {}
        for entry in self.entries.values():
            counts[entry.state] = counts.get(entry.state, 0) + 1
        elapsed = self.clock() - self.started_at
        eta = self.eta_s()
        parts = ", ".join(f"{n} {state}" for state, n in counts.items())
        return (f"{len(self.entries)} runs: {parts} | elapsed {_duration(elapsed)}"
                f" | ETA {_duration(eta) if eta is not None else '--'}")

    def eta_s(self) -> float | None:
        """Seconds until every unfinished run is done at this sweep's throughput so far; 0 when
        nothing is left, None before the first step."""
        unfinished = [e for e in self.entries.values() if e.state in ("queued", "running")]
        left = sum(max(0, e.steps_total - e.steps_done) for e in unfinished)
        if left == 0:
            return 0.0
        done = sum(max(0, e.steps_done - e.steps_at_start) for e in self.entries.values())
        if done == 0:
            return None
        return left * (self.clock() - self.started_at) / done

    def _print_entry(self, entry: _Entry) -> None:
        self._printed[entry.run_id] = (entry.state, self.clock())
        print(self.line(entry), file=self.stream, flush=True)

    def _redraw(self) -> None:
        columns, rows = shutil.get_terminal_size()
        lines = self.lines()
        if len(lines) > rows - 1:  # too tall: the runs being trained or failed, then the counts
            shown = [self.line(e) for e in self.entries.values() if e.state in ("running", "failed")]
            lines = shown[: rows - 3] + [f"... and {len(self.entries) - len(shown[: rows - 3])} more runs", lines[-1]]
        text = "".join(line[:columns] + "\n" for line in lines)
        up = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
        self.stream.write(up + text)
        self.stream.flush()
        self._drawn = len(lines)


def _steps_logged(run_dir: Path) -> int:
    """Rows in ``metrics.parquet`` (one per optimizer step), read from the file footer."""
    path = Path(run_dir) / "metrics.parquet"
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, ValueError):  # not written yet, or replaced while being read
        return 0


def _touched_since(run_dir: Path, wall_time: float) -> bool:
    for name in ("metrics.parquet", "summary.json"):
        with contextlib.suppress(OSError):
            if (Path(run_dir) / name).stat().st_mtime >= wall_time:
                return True
    return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
