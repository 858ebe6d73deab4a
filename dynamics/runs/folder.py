"""The run folder on disk, write side: the plan (new, resume, done), creation, the writer's
lock and ``summary.json``.

Layout (docs/design.md, "The run folder")::

    runs/<run_id>/
      config.json          {"config": every resolved setting, "runtime": device, dtype, threads,
                            parameter counts, "versions", "cpu", "git_commit", "host", "command",
                            "started_at"}
      summary.json         status (STATUSES), steps done, wall time, final and best eval; entries
                           ``phases``, ``sharpness``, ``trace`` (``sharpness_train``, ``trace_train``
                           with ``--split train``), ``exact_match`` added by ``dynamics analyze``
      metrics.parquet      one row per optimizer step            (logs.METRICS_SCHEMA)
      layers.parquet       per-layer rows                        (logs.LAYERS_SCHEMA)
      eval.parquet         one row per evaluation                (logs.EVAL_SCHEMA)
      sharpness.parquet    top Hessian eigenvalues, eval or train loss (logs.SHARPNESS_SCHEMA)
      phases.parquet       double-descent phases                 (logs.PHASES_SCHEMA, dynamics analyze)
      trace.parquet, density.parquet                             (dynamics analyze --trace / --density)
      checkpoints/step_N/  weights (safetensors) + trainer_state.pt   (runs.checkpoints)
      initial_adapter/     the step-0 adapter of pissa / loraga, a plain peft LoRA folder: what
                           rebuilds LoRA-GA's offset base and exports to the original base
      log.txt              what the grid's worker printed         (executors)
      .lock                the writer's flock                     (RunLock)

Every file is written to a temporary file and renamed (``dynamics.files``), so readers never see
half a file. A run folder holds no symbolic links: every writer (all take ``RunLock``) first checks
the folder and everything in it (``files.refuse_links``) and refuses in one line naming a link, and
opens ``.lock`` and ``log.txt`` with ``O_NOFOLLOW``; so nothing outside the folder is written,
replaced or deleted through one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dynamics.config import ConfigError, RunConfig, flag
from dynamics.files import (
    named_as_target,
    open_no_follow,
    read_json,
    refuse_links,
    replace_folder,
    staging_folder_beside,
    write_json,
)

# How a run stands: ``running`` while trained (or killed while it was), then one of the others.
STATUSES = ("running", "completed", "diverged", "failed", "interrupted")
FINISHED = ("completed", "diverged")  # a result: never trained again (a divergence is a result)
ENDED = STATUSES[1:]  # how one training attempt can end
DAMAGED = "damaged"  # never written: what readers call a folder whose files do not read (read.check_run)
INITIAL_ADAPTER = "initial_adapter"
# Adapters whose initialisation changes the base weights: the run keeps their step-0 adapter.
INITIAL_ADAPTER_KEPT = ("pissa", "loraga")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")



def git_commit() -> str | None:
    """The commit of the dynamics source tree (with ``+dirty`` when it has local changes)."""
    source = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                               capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_version() -> str:
    try:
        return importlib.metadata.version("dynamics")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def cpu_model() -> str:
    """The processor's name (Linux: /proc/cpuinfo's "model name"; else what ``platform`` says)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "unknown"


def environment_info() -> dict[str, Any]:
    # lazy: only a new run records these; reading runs back must not import torch
    import peft
    import torch
    import transformers

    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "dynamics": package_version(),
        },
        # float results on CPU depend on the kernels the math libraries pick for this processor
        # (docs/results.md, section 8): which one ran is part of what a run was made with
        "cpu": {"model": cpu_model(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
                "cores": os.cpu_count()},
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv),
        "started_at": now_iso(),
    }


# --- existence and resume checks --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What ``train`` will do with the run folder: ``new``, ``resume`` or ``done`` (nothing)."""

    mode: str
    run_dir: Path
    status: str | None = None


def plan_run(cfg: RunConfig) -> RunPlan:
    """Decide, before anything is written, whether the run starts, resumes or is already done.

    Raises ConfigError when the folder exists and neither ``--resume`` nor ``--overwrite`` is given,
    or when ``--resume`` finds a run whose experiment settings differ from ``cfg``.
    """
    run_dir = cfg.run_dir
    if os.path.lexists(run_dir):
        refuse_links(run_dir)
    if not run_dir.exists() or cfg.overwrite:
        return RunPlan("new", run_dir)
    if not (run_dir / "config.json").exists():
        raise ConfigError(f"--run-id {run_dir.name}: {run_dir} exists but is not a run folder; choose another --run-id")
    status = read_summary(run_dir).get("status", "running")
    if not cfg.resume:
        raise ConfigError(f"--run-id {run_dir.name}: {run_dir} exists (status {status}); "
                          "pass --resume to continue it or --overwrite to replace it")
    stored = stored_config(run_dir)
    differences = config_differences(stored, cfg)
    if differences:
        raise ConfigError(f"--resume {run_dir.name}: settings differ from the stored run: {'; '.join(differences)}")
    if status in FINISHED:
        return RunPlan("done", run_dir, status)
    return RunPlan("resume", run_dir, status)


def stored_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    values = read_json(path).get("config")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: has no config object")
    return RunConfig.from_dict(values, source=str(path))


def config_differences(stored: RunConfig, requested: RunConfig) -> list[str]:
    """``--field stored -> requested`` for each experiment field that differs."""
    old, new = stored.experiment_dict(), requested.experiment_dict()
    return [f"{flag(k)} {old[k]} -> {new[k]}" for k in old if old[k] != new[k]]


# --- creation, lock, summary ---------------------------------------------------------------------
def create_run_dir(cfg: RunConfig, runtime: dict[str, Any]) -> Path:
    """Create ``cfg.run_dir`` with ``config.json`` and a ``running`` summary (``claim_run`` without
    keeping the lock; for tests and tools that lay out a run by hand)."""
    with claim_run(cfg, runtime) as run_dir:
        return run_dir


@contextlib.contextmanager
def claim_run(cfg: RunConfig, runtime: dict[str, Any] | None = None,
              write_more: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Hold ``cfg.run_dir`` as its one writer for the duration of the context.

    - A new run (``runtime`` given) is staged beside its final name with ``config.json``, a
      ``running`` summary and its lock already held, then renamed into place. The rename onto an
      existing folder fails, so of two simultaneous starts exactly one gets the folder; the other
      gets a ConfigError and leaves nothing behind.
    - With ``--overwrite`` the old folder's lock is taken first (refused while its writer lives),
      and the new folder replaces it in one swap (``files.replace_folder``): at every moment one
      intact run is there.
    - Resuming (``runtime`` None) locks the existing folder (``RunLock``).

    ``write_more(folder)`` adds files to a new run's staged folder before it is renamed into place
    (the initial adapter), so they are there from the moment the run is.
    """
    run_dir = cfg.run_dir
    if runtime is None:
        with RunLock(run_dir):
            yield run_dir
        return
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(run_dir):
        refuse_links(run_dir)  # a dangling link in the run's place: never replaced, never followed
    replacing = cfg.overwrite and run_dir.exists()  # without --overwrite an existing folder is never replaced
    with contextlib.ExitStack() as stack:
        if replacing:
            stack.enter_context(RunLock(run_dir, purpose="--overwrite"))
        staging = staging_folder_beside(run_dir)
        try:
            write_json(staging / "config.json", {"config": cfg.to_dict(), "runtime": runtime, **environment_info()})
            write_json(staging / "summary.json", {"status": "running", "steps_done": 0, "steps_total": cfg.steps,
                                                  "updated_at": now_iso()})
            if write_more is not None:
                write_more(staging)
            lock = stack.enter_context(RunLock(staging))  # the lock moves with the folder
            if replacing:
                replace_folder(staging, run_dir)
            else:
                try:
                    staging.rename(run_dir)
                except OSError:  # ENOTEMPTY / EEXIST: another process claimed the name first
                    raise ClaimLost(f"--run-id {run_dir.name}: another process started this run first; "
                                    "pass --resume to continue it, or choose another --run-id") from None
            lock.moved_to(run_dir)
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            fault = named_as_target(error, staging, run_dir)
            if fault is not error:
                raise fault from error
            raise
        yield run_dir


class ClaimLost(ConfigError):
    """Two processes started the same new run at once and the other one got it."""


class RunInUse(ConfigError):
    """The run's lock is held by another process (``holder``: its ``(pid, host)``, if known)."""

    def __init__(self, message: str, holder: tuple[int, str] | None) -> None:
        super().__init__(message)
        self.holder = holder


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``: one process at a time writes a run (trains it,
    replaces it, or analyses it); released by the kernel when the process dies, even by SIGKILL.
    The file holds the holder's ``pid host`` so others can say who has it."""

    def __init__(self, run_dir: Path, purpose: str = "--run-id") -> None:
        self.path = Path(run_dir) / ".lock"
        self.purpose = purpose
        self._fh = None

    def __enter__(self) -> RunLock:
        refuse_links(self.path.parent)  # LinkRefused: the one-line refusal, before anything is written
        self._fh = os.fdopen(open_no_follow(self.path, os.O_RDWR | os.O_CREAT), "r+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            holder = lock_holder(self.path.parent)
            raise RunInUse(f"{self.purpose} {self.path.parent.name}: the run is in use by another process"
                           f"{describe_holder(holder)}", holder) from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"{os.getpid()} {socket.gethostname()}\n")
        self._fh.flush()
        return self

    def moved_to(self, run_dir: Path) -> None:
        """The locked folder was renamed to ``run_dir`` (the open file and its lock move with it)."""
        self.path = Path(run_dir) / ".lock"

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


def lock_holder(run_dir: Path) -> tuple[int, str] | None:
    """``(pid, host)`` written by the last process that locked the run, if readable."""
    lock = Path(run_dir) / ".lock"
    if lock.is_symlink():
        return None
    try:
        pid, host = lock.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def describe_holder(holder: tuple[int, str] | None) -> str:
    return f" (pid {holder[0]} on {holder[1]})" if holder else ""


def writer_alive(run_dir: Path) -> bool | None:
    """Whether a process holds the run's lock now: read from the kernel's lock table
    (``/proc/locks``, matched by the lock file's inode) without taking the lock, which would block
    a writer starting at that moment. None where it cannot be told (no ``/proc/locks``)."""
    lock = Path(run_dir) / ".lock"
    try:
        inode = os.lstat(lock).st_ino
    except OSError:
        return False  # never locked: every writer creates the file
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    return any(len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode)
               for fields in (line.split() for line in table.splitlines()))


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    return read_json(path) if path.exists() else {}


def update_summary(run_dir: Path, **fields: Any) -> dict[str, Any]:
    summary = {**read_summary(run_dir), **fields, "updated_at": now_iso()}
    write_json(Path(run_dir) / "summary.json", summary)
    return summary


