"""Running a grid's runs: ``run_one`` trains one run in this process; the executors call it in
worker processes on this machine (``run_local``) or as Ray tasks (``run_ray``); ``SweepBoard``
(``dynamics.sweep_board``) shows one line per run and an ETA.

Each run writes only its own folder, so executors need no locking of their own; the run folder's
``.lock`` (held while a run trains) keeps two processes from training one run, and ``run_one``
waits for a run another process is training instead of failing it.

Faults. ``run_one`` never raises for a run: an exception is recorded by the training loop as
``failed`` and returned as an outcome. A worker process that dies (killed, out of memory) is
recorded ``failed`` with the signal or exit code, and the sweep goes on with a new worker. A local
worker stops (SIGTERM: it checkpoints and ends ``interrupted``) when the sweep's process is gone,
even after a SIGKILL, so a restarted sweep resumes from there. A Ray task whose worker or node is
lost is retried by Ray (``RAY_MAX_RETRIES``) and resumes the run from its last checkpoint.

Ray expects the run folders on a file system every node and the driver share (as for Ray Tune's
``storage_path``) and ``dynamics`` installed on every node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynamics import runs
from dynamics.config import ConfigError, RunConfig, config_flags
from dynamics.files import UnreadableFile, describe_os_error, first_line, open_no_follow, refuse_links
from dynamics.launch import torchrun_command
from dynamics.sweep_board import RunOutcome, SweepBoard

FINAL_STATUSES = runs.ENDED  # how one attempt can end
RAY_MAX_RETRIES = 3  # re-runs of a Ray task whose worker or node is lost (never after an exception)
POLL_S = 1.0  # seconds between looks at the runs (progress, dead workers)
BUSY = "skipped: another process has it"  # a run another driver (or `dynamics train`) claimed first


# --- one run -------------------------------------------------------------------------------------
def run_one(cfg: RunConfig, nproc: int = 1) -> RunOutcome:
    """Train ``cfg`` in this process: start it, resume it from its last checkpoint, or return at
    once when it is already completed or diverged (``train`` with ``resume=True``). Never raises
    for a failing run. What the run prints (warnings, a traceback) is appended to ``log.txt`` in
    its folder, one section per attempt. With ``nproc`` > 1 the run trains data-parallel on that
    many processes of this machine, under ``torchrun --standalone`` (``launch_run``)."""
    from dynamics.training import train  # lazy: `dynamics grid --dry-run` must not import torch

    cfg = dataclasses.replace(cfg, resume=True, overwrite=False, progress=False)
    run_id, run_dir = cfg.resolved_run_id, cfg.run_dir
    _wait_while_locked(run_dir)
    finished = _finished_summary(run_dir)
    if finished is not None:  # another driver trained it while we waited: its result, and no log section
        return RunOutcome(run_id, finished["status"], finished.get("steps_done"))
    checkpoints = runs.checkpoint_steps(run_dir)
    start = (f"resuming from checkpoint step {checkpoints[-1]}" if checkpoints
             else "starting" if not run_dir.exists() else "starting over (no checkpoint)")
    log = io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(log))
        stack.enter_context(contextlib.redirect_stderr(log))
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("default")
        warnings.simplefilter("ignore", FutureWarning)  # library deprecation notices
        try:
            summary = train(cfg).summary if nproc == 1 else launch_run(cfg, nproc, log)
            outcome = RunOutcome(run_id, summary["status"], summary.get("steps_done"), summary.get("error"))
        except KeyboardInterrupt:
            outcome = RunOutcome(run_id, "interrupted", _steps_done(run_dir))
        except (runs.ClaimLost, runs.RunInUse) as error:  # another driver or `train` has it: not ours
            return RunOutcome(run_id, "skipped", _steps_done(run_dir),
                              f"{BUSY}; {first_line(error)}")
        except Exception as error:  # a failing run is an outcome, not a crash of the sweep
            traceback.print_exc(file=log)
            outcome = RunOutcome(run_id, "failed", _steps_done(run_dir), failure_message(error))
    if os.path.lexists(run_dir):
        try:
            _append_log(run_dir, start, log.getvalue(), caught)
        except (OSError, UnreadableFile) as error:  # a full disk, a link: the outcome still says what happened
            problem = describe_os_error(error) if isinstance(error, OSError) else str(error)
            outcome = dataclasses.replace(outcome, error=f"{outcome.error or outcome.status}; log.txt not written: "
                                                         f"{problem}")
    return outcome


def failure_message(error: BaseException) -> str:
    """One line for why a run failed: our own errors as they are, an OS error with its path and
    remedy (``files.describe_os_error``), anything else with its type."""
    if isinstance(error, (ConfigError, UnreadableFile)):
        return str(error)
    if isinstance(error, OSError):
        return describe_os_error(error)
    return f"{type(error).__name__}: {error}"


def _finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run that is completed or diverged, else None (also when it does not read:
    training it says why)."""
    try:
        summary = runs.read_summary(run_dir) if (run_dir / "summary.json").is_file() else {}
    except (OSError, UnreadableFile):
        return None
    return summary if summary.get("status") in runs.FINISHED else None


def _steps_done(run_dir: Path) -> int | None:
    """The steps a run's summary records, None when it does not read (a full disk, a link)."""
    try:
        return runs.read_summary(run_dir).get("steps_done")
    except (OSError, UnreadableFile):
        return None


def launch_run(cfg: RunConfig, nproc: int, log: io.StringIO) -> dict[str, Any]:
    """Train ``cfg`` on ``nproc`` processes (``torchrun --standalone --nproc-per-node nproc -m
    dynamics train``, ``cfg`` as flags) and return its summary; the processes' output goes to
    ``log``. SIGTERM to this process is passed on (torchrun hands it to every process, which
    checkpoint after the same step)."""
    process = subprocess.Popen(torchrun_command(nproc, ["train", *config_flags(cfg)]), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM)) if in_main_thread \
        else None
    try:
        output, _ = process.communicate()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    log.write(output)
    summary = runs.read_summary(cfg.run_dir) if (cfg.run_dir / "summary.json").exists() else {}
    if process.returncode and summary.get("status") in (None, "running"):
        last = [line for line in output.splitlines() if line.strip()][-1:] or ["no output"]
        raise RuntimeError(f"torchrun exited with code {process.returncode}: {last[0].strip()}")
    return summary


def _wait_while_locked(run_dir: Path, poll_s: float = 0.5) -> None:
    """Wait until no other process trains this run (e.g. a worker of a killed sweep checkpointing)."""
    while os.path.lexists(run_dir / ".lock"):
        try:
            with runs.RunLock(run_dir):
                return
        except runs.RunInUse:
            time.sleep(poll_s)
        except (OSError, UnreadableFile, ConfigError):  # a link, a read-only folder: train says so, once
            return


def _append_log(run_dir: Path, start: str, output: str, caught: Sequence[warnings.WarningMessage]) -> None:
    """One section of ``log.txt``: a header line (when, where, how the attempt began and ended),
    the warnings, then what the run printed."""
    status = runs.read_summary(run_dir).get("status")
    lines = [f"=== {runs.now_iso()} {socket.gethostname()} pid {os.getpid()}: {start}; ended {status}"]
    lines += [f"warning: {w.category.__name__}: {w.message}" for w in caught]
    refuse_links(run_dir)  # never appended through a link, nor into a linked folder
    with os.fdopen(open_no_follow(run_dir / "log.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as fh:
        fh.write("".join(line + "\n" for line in lines) + output)


def record_lost_worker(cfg: RunConfig, reason: str) -> RunOutcome:
    """Mark a run whose worker died as ``failed`` with ``reason`` (when it has a folder and no
    other process holds it), so a re-run of the grid only retries it with ``--retry-failed``."""
    summary = {}
    if (cfg.run_dir / "config.json").exists():
        try:
            with runs.RunLock(cfg.run_dir):
                summary = runs.update_summary(cfg.run_dir, status="failed", error=reason)
        except ConfigError:  # another process has it now; leave its summary alone
            pass
        except (OSError, UnreadableFile) as error:  # a full disk, a link: failed in memory, said here
            problem = describe_os_error(error) if isinstance(error, OSError) else str(error)
            reason = f"{reason}; not recorded in the run folder: {problem}"
    return RunOutcome(cfg.resolved_run_id, "failed", summary.get("steps_done"), reason)


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# --- local executor -----------------------------------------------------------------------------------
class _Worker:
    """A worker process that trains the runs it is sent, one after another, so the imports
    (torch, transformers: a few seconds) are paid once per worker, not once per run. If it dies,
    only the run it held is affected."""

    def __init__(self, context) -> None:
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_conn,), daemon=True,
                                       name="dynamics-grid-worker")
        self.process.start()
        child_conn.close()
        self.cfg: RunConfig | None = None

    def start(self, cfg: RunConfig, nproc: int = 1) -> None:
        self.cfg = cfg
        self.conn.send((cfg, nproc))

    def finished(self) -> RunOutcome | str | None:
        """The outcome of the run it holds; None while it trains; why it died if it died first."""
        if self.conn.poll():
            try:
                return self.conn.recv()
            except (EOFError, OSError):
                pass  # died while answering
        elif self.process.is_alive():
            return None
        self.process.join(timeout=5)
        return f"worker process died ({_exit_reason(self.process.exitcode)})"

    def stop(self) -> None:
        """Ask the run to checkpoint and stop (the loop handles SIGTERM after the current step)."""
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGTERM)

    def close(self) -> None:
        self.conn.close()  # an idle worker sees end-of-file and exits
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


def _serve(conn) -> None:
    """A worker's main loop: receive a config, train it, send back the outcome."""
    threading.Thread(target=_stop_when_orphaned, daemon=True).start()
    while True:
        try:
            cfg, nproc = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        outcome = run_one(cfg, nproc)
        try:
            conn.send(outcome)
        except OSError:  # the sweep is gone
            return


def _stop_when_orphaned() -> None:
    """SIGTERM this worker once the sweep's process is gone (even killed with SIGKILL): the run
    checkpoints and stops instead of training on unwatched and holding its lock."""
    multiprocessing.connection.wait([multiprocessing.parent_process().sentinel])
    os.kill(os.getpid(), signal.SIGTERM)


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _worker_context():
    """How worker processes start. On Linux, forked from a server process that has imported
    torch, transformers and peft once (~5 s on 2 cores), so each further worker (after a crash, in
    the next sweep of this session) starts in well under a second rather than re-importing
    (measured: 5.5 s to the first outcome of a tiny run by spawn, 0.55 s by the forkserver). The
    server keeps the environment variables it started with. Elsewhere: spawn."""
    if sys.platform != "linux":
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["dynamics.executors", "dynamics.training", "peft"])
    return context


def run_local(configs: Sequence[RunConfig], workers: int, board: SweepBoard, nproc: int = 1) -> list[RunOutcome]:
    """Run ``configs`` in up to ``workers`` worker processes at once, each run with
    ``max(1, cpus // workers)`` torch threads unless its config sets ``threads``; with ``nproc`` >
    1 each run is data-parallel on that many processes of ``cpus // (workers * nproc)`` threads.

    Ctrl-C (or SIGTERM to the workers) lets each running run checkpoint and end ``interrupted``;
    queued runs are not started.
    """
    threads = max(1, usable_cpus() // (workers * nproc))
    queue = deque(dataclasses.replace(cfg, threads=cfg.threads or threads) for cfg in configs)
    context = _worker_context()
    idle: list[_Worker] = []
    busy: list[_Worker] = []
    outcomes: list[RunOutcome] = []
    stopping = False
    try:
        while busy or (queue and not stopping):
            try:
                while queue and not stopping and len(busy) < workers:
                    while idle and not idle[-1].process.is_alive():  # died between runs
                        idle.pop().close()
                    worker = idle.pop() if idle else _Worker(context)
                    worker.start(queue.popleft(), nproc)
                    busy.append(worker)
                    board.started(worker.cfg.resolved_run_id)
                waitables = [w.conn for w in busy] + [w.process.sentinel for w in busy]
                multiprocessing.connection.wait(waitables, timeout=POLL_S)
                for worker in list(busy):
                    outcome = worker.finished()
                    if outcome is None:
                        continue
                    busy.remove(worker)
                    if isinstance(outcome, str):  # the worker died with the run
                        outcome = (RunOutcome(worker.cfg.resolved_run_id, "interrupted", error=outcome)
                                   if stopping else record_lost_worker(worker.cfg, outcome))
                    else:
                        idle.append(worker)
                    outcomes.append(outcome)
                    board.finished(outcome)
                board.refresh()
            except KeyboardInterrupt:
                stopping = True
                for worker in busy:
                    worker.stop()
    finally:
        for worker in idle + busy:
            worker.close()
    interrupted = [RunOutcome(cfg.resolved_run_id, "interrupted", error="not started: the sweep was stopped")
                   for cfg in queue]
    for outcome in interrupted:
        board.finished(outcome)
    return outcomes + interrupted


# --- Ray executor ------------------------------------------------------------------------------------
def run_ray(configs: Sequence[RunConfig], address: str | None, board: SweepBoard, nproc: int = 1
            ) -> list[RunOutcome]:
    """One Ray task per run (``run_one``), asking for ``threads`` CPUs (1 when unset) and one GPU
    when the run's device is ``cuda`` (or ``auto`` on a cluster that has GPUs), each times
    ``nproc``: a run with ``nproc`` > 1 trains data-parallel under torchrun on the one node Ray
    places it on. Tasks whose worker or node is lost are retried ``RAY_MAX_RETRIES`` times and
    resume from the run's checkpoint.

    Uses the Ray this process is connected to, else ``address`` (default ``$RAY_ADDRESS``), else
    starts a local Ray for the sweep and stops it at the end.
    """
    try:
        import ray  # lazy: an optional extra (pip install dynamics[ray]), needed by --executor ray only
    except ImportError:
        raise ConfigError("--executor ray: Ray is not installed; pip install 'dynamics[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        _init_ray(ray, address or os.environ.get("RAY_ADDRESS"))
    try:
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        task = ray.remote(run_one)
        pending = {}
        for cfg in configs:
            cpus = cfg.threads or 1
            gpus = 1 if cfg.device == "cuda" or (cfg.device == "auto" and has_gpus) else 0
            cfg = dataclasses.replace(cfg, threads=cpus, runs_dir=str(Path(cfg.runs_dir).resolve()))
            options = dict(num_cpus=cpus * nproc, num_gpus=gpus * nproc, max_retries=RAY_MAX_RETRIES,
                           retry_exceptions=False, name=f"dynamics:{cfg.resolved_run_id}")
            pending[task.options(**options).remote(cfg, nproc)] = cfg
        return _collect_ray(ray, pending, board)
    finally:
        if started_here:
            ray.shutdown()


def _init_ray(ray, address: str | None) -> None:
    quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
    if address is None:
        ray.init(num_cpus=usable_cpus(), include_dashboard=False, **quiet)
        return
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConfigError(f"--ray-address {address}: cannot connect to Ray ({first_line(error)})") from None


def _collect_ray(ray, pending: dict[Any, RunConfig], board: SweepBoard) -> list[RunOutcome]:
    outcomes = []
    while pending:
        try:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
            for ref in done:
                cfg = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as error:  # lost more than RAY_MAX_RETRIES times
                    reason = f"Ray task lost ({type(error).__name__}: {first_line(error)})"
                    outcome = record_lost_worker(cfg, reason)
                outcomes.append(outcome)
                board.finished(outcome)
            board.refresh()
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref)  # KeyboardInterrupt in a running task: the run ends interrupted
            ray.wait(list(pending), num_returns=len(pending), timeout=30)
            for cfg in pending.values():
                outcome = RunOutcome(cfg.resolved_run_id, "interrupted", error="the sweep was stopped")
                outcomes.append(outcome)
                board.finished(outcome)
            pending.clear()
    return outcomes
