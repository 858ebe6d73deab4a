"""Hostile files and faults of the file system (issue 33): nothing outside a run folder is ever
written or deleted through a symbolic link, and a full, read-only or unwritable disk is one line.

The link tests are generated: every file and folder of a real run folder (the folder itself
included) is, in turn, replaced by a symbolic link to a copy of it outside the runs folder (the
sentinel), and every command that writes into a run (train --resume, train --overwrite, analyze,
export, a grid's worker) must leave the sentinel byte for byte as it was, refuse in one line naming
the link, exit 2, and leave the run folder as it was.

Faults are real where the machine allows (a small tmpfs the test mounts, remounted read-only; needs
root and mount rights) and injected at the write calls otherwise, in a process of its own
(``launch.run_code``): ``os.replace`` raising ENOSPC / EROFS / EACCES as a full, read-only or
unwritable disk does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import launch
import pytest
from conftest import tiny_config

import dynamics
from dynamics import runs
from dynamics.cli import main
from dynamics.config import RunConfig
from dynamics.executors import run_one
from dynamics.files import as_os_error, describe_os_error

RUN_ID = "victim"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A resumable tiny LoRA run with every kind of file a run folder holds: trained 12 steps
    (checkpoints at 6 and 12), analysed (phases, sharpness), a grid's log.txt and its lock file;
    then set back to ``interrupted`` at step 6 (its step-12 checkpoint removed), so ``--resume``
    trains, checkpoints, prunes and rewrites every table."""
    root = tmp_path_factory.mktemp("pristine")
    cfg = tiny_config(root, method="lora", rank=4, run_id=RUN_ID, keep_checkpoints=2)
    dynamics.train(cfg)
    run_dir = root / "runs" / RUN_ID
    assert main(["analyze", str(run_dir), "--k", "1", "--batches", "1", "--max-iter", "4"]) == 0
    (run_dir / "log.txt").write_text("=== an earlier attempt\n")
    shutil.rmtree(run_dir / "checkpoints" / "step_12")
    runs.update_summary(run_dir, status="interrupted", steps_done=6)
    return root / "runs"


def entries(run_dir: Path) -> list[str]:
    """Every file and folder under ``run_dir``, relative to it, and ``.`` for the folder itself."""
    return ["."] + sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))


def fingerprint(path: Path) -> dict[str, tuple]:
    """What is at and under ``path``, links not followed: kind, bytes, mode, mtime of each entry."""
    found = {}
    for entry in [path, *sorted(path.rglob("*"))] if path.is_dir() and not path.is_symlink() else [path]:
        stat = entry.lstat()
        content = os.readlink(entry) if entry.is_symlink() else entry.read_bytes() if entry.is_file() else b""
        found[str(entry.relative_to(path))] = (stat.st_mode, stat.st_mtime_ns, content)
    return found


def contents(run_dir: Path) -> dict[str, bytes]:
    """The bytes of every file of a run but its lock file (which holds the last writer's pid)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture
def linked(pristine, tmp_path):
    """``link(entry)``: a fresh copy of the run with ``entry`` replaced by a link to a sentinel copy of
    it outside the runs folder; returns (runs folder, run folder, link path, sentinel path)."""
    def link(entry: str):
        root = tmp_path / entry.replace("/", "_") / "runs"
        shutil.copytree(pristine, root, symlinks=True)
        run_dir = root / RUN_ID
        target = (run_dir / entry).resolve() if entry != "." else run_dir
        sentinel = tmp_path / entry.replace("/", "_") / "outside" / Path(target).name
        sentinel.parent.mkdir()
        shutil.move(str(target), str(sentinel))  # the sentinel is what was there: commands would use it
        os.symlink(sentinel, target, target_is_directory=sentinel.is_dir())
        return root, run_dir, target, sentinel
    return link


WRITERS = {
    "train --resume": lambda root, run_dir, out: resume_argv(root),
    "train --overwrite": lambda root, run_dir, out: ["train", *_flags(root), "--overwrite"],
    "analyze": lambda root, run_dir, out: ["analyze", str(run_dir), "--k", "1", "--batches", "1", "--max-iter", "4"],
    "export": lambda root, run_dir, out: ["export", str(run_dir), "--out", str(out)],
}


def resume_argv(root: Path) -> list[str]:
    return ["train", "--run-id", RUN_ID, "--runs-dir", str(root), "--resume", "--no-progress"]


def _flags(root: Path) -> list[str]:
    cfg = tiny_config(root.parent, method="lora", rank=4, run_id=RUN_ID, keep_checkpoints=2)
    return [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items() if k != "progress"] + ["--no-progress"]


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_no_command_writes_through_a_link_anywhere_in_a_run_folder(pristine, linked, capsys, tmp_path, command):
    """The generator: each entry of the run folder in turn a link to a sentinel outside."""
    for entry in entries(pristine / RUN_ID):
        root, run_dir, link, sentinel = linked(entry)
        before_sentinel, before_run = fingerprint(sentinel), fingerprint(run_dir)
        out = tmp_path / entry.replace("/", "_") / "export"
        capsys.readouterr()
        code = main(WRITERS[command](root, run_dir, out))
        err = capsys.readouterr().err.strip()
        assert fingerprint(sentinel) == before_sentinel, f"{command} wrote through {entry}"
        assert fingerprint(run_dir) == before_run, f"{command} changed the run beside the link {entry}"
        assert not out.exists(), f"{command} exported though {entry} is a link"
        assert code == (1 if command == "analyze" else 2), (entry, err)  # analyze: the run is not analysed
        assert len(err.splitlines()) == 1 and str(link) in err and "symbolic link" in err, (entry, err)


@pytest.mark.parametrize("entry", [".", "log.txt", "checkpoints", ".lock", "summary.json"])
def test_a_grid_worker_neither_trains_nor_logs_through_a_link(linked, entry):
    root, run_dir, link, sentinel = linked(entry)
    before_sentinel, before_run = fingerprint(sentinel), fingerprint(run_dir)
    cfg = RunConfig.from_dict(tiny_config(root.parent, method="lora", rank=4, run_id=RUN_ID, keep_checkpoints=2))
    outcome = run_one(cfg)
    assert fingerprint(sentinel) == before_sentinel and fingerprint(run_dir) == before_run
    assert outcome.status == "failed" and str(link) in outcome.error and "symbolic link" in outcome.error


def test_a_dangling_link_in_a_new_runs_place_is_refused_and_nothing_made(tmp_path, capsys):
    root = tmp_path / "runs"
    root.mkdir()
    os.symlink(tmp_path / "nowhere", root / RUN_ID)
    assert main(["train", *_flags(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "symbolic link" in err
    assert sorted(p.name for p in root.iterdir()) == [RUN_ID] and not (tmp_path / "nowhere").exists()


def test_reading_commands_read_through_links(linked, capsys):
    """Links are refused for writing only: `dynamics runs` shows a run whose tables are links."""
    root, run_dir, link, sentinel = linked("metrics.parquet")
    assert main(["runs", str(root)]) == 0
    assert RUN_ID in capsys.readouterr().out


# --- faults of the file system ---------------------------------------------------------------------
def test_os_errors_are_one_line_with_the_path_and_a_remedy():
    full = describe_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/metrics.parquet"))
    assert full.startswith("runs/x/metrics.parquet: no space left on device; free space") and "--resume" in full
    assert "read-only" in describe_os_error(OSError(errno.EROFS, os.strerror(errno.EROFS), "runs"))
    # libraries that hide the OS error: safetensors and pyarrow name it in their message
    hidden = as_os_error(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), "f")
    assert (hidden.errno, hidden.filename) == (errno.ENOSPC, "f")
    assert as_os_error(ValueError("os error 28"), "f") is None  # not a write failure


INJECT = textwrap.dedent("""
    import errno, os, sys
    import dynamics.files
    from dynamics.cli import main
    real_replace, calls = os.replace, [0]
    def failing_replace(src, dst, *args, **kwargs):
        calls[0] += 1
        if calls[0] > {after} and str(dst).startswith({root!r}):
            raise OSError(errno.{code}, os.strerror(errno.{code}), str(dst))
        return real_replace(src, dst, *args, **kwargs)
    os.replace = failing_replace
    sys.exit(main({argv!r}))
""")


def inject(code: str, argv: list[str], root: Path, after: int = 0) -> subprocess.CompletedProcess:
    """``dynamics ARGV`` in its own process, every atomic write under ``root`` failing with ``code``
    after the first ``after`` succeed."""
    return launch.run_code(INJECT.format(code=code, argv=argv, root=str(root), after=after))


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS", "EACCES", "EPERM"])
def test_a_fault_while_training_is_one_line_and_the_run_resumes_exactly(pristine, tmp_path, code):
    root = tmp_path / "runs"
    shutil.copytree(pristine, root)
    run_dir = root / RUN_ID
    # a write or two succeeds (the summary at the claim), then the disk is full / read-only
    result = inject(code, resume_argv(root), root, after=2)
    err = result.stderr.strip()
    assert result.returncode == 1 and len(err.splitlines()) <= 2, err  # the start line, then the fault
    assert "Traceback" not in err and os.strerror(getattr(errno, code)).lower() in err.splitlines()[-1]
    assert not list(run_dir.rglob("*.tmp")), "a temporary file left behind"
    assert main(["runs", str(root)]) in (0, 1)  # still readable
    assert main(resume_argv(root)) == 0
    reference = tmp_path / "reference"
    shutil.copytree(pristine, reference)
    assert main(resume_argv(reference)) == 0
    assert_same_losses(run_dir, reference / RUN_ID)


def assert_same_losses(a: Path, b: Path) -> None:
    left, right = runs.load_metrics(a), runs.load_metrics(b)
    assert list(left["step"]) == list(right["step"]) == list(range(1, 13))
    assert left["loss"].tolist() == right["loss"].tolist()


@pytest.mark.parametrize("argv", [["analyze", "{run}"], ["runs", "{root}", "--csv", "{root}/table.csv"],
                                  ["train", "--runs-dir", "{root}", "--run-id", "new", "--model", "tiny-llama",
                                   "--task", "tiny", "--steps", "2", "--n-train", "8", "--n-eval", "2"]])
def test_other_commands_on_a_full_disk_say_so_in_one_line(pristine, tmp_path, argv):
    root = tmp_path / "runs"
    shutil.copytree(pristine, root)
    before = contents(root / RUN_ID)
    argv = [a.format(run=root / RUN_ID, root=root) for a in argv]
    result = inject("ENOSPC", argv, root)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and "no space left on device" in lines[0], lines
    assert contents(root / RUN_ID) == before
    assert not (root / "new").exists() and not list(root.glob(".*")), "a half-made run"


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str):
    """A tmpfs of ``size`` mounted on ``folder``; skips where the machine does not allow it."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights); the injected faults cover it")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_real_full_disk_then_a_read_only_one(pristine, tmp_path):
    """A real 600 KiB file system: the resumed run's checkpoint does not fit (safetensors and
    torch.save fail in their own words); then remounted read-only."""
    with small_filesystem(tmp_path / "small", "600k") as small:
        root = small / "runs"
        shutil.copytree(pristine, root, ignore=shutil.ignore_patterns("sharpness.parquet", "layers.parquet"))
        filler = small / "filler"
        free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
        filler.write_bytes(b"\0" * max(free - 48_000, 0))  # room for a few tables, not for a checkpoint
        result = launch.run(resume_argv(root))
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert "no space left on device" in last and "--resume" in last, last
        assert not [p for p in (root / RUN_ID / "checkpoints").iterdir() if p.name.startswith(".")]
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(small)], check=True)
        for argv in (resume_argv(root),
                     ["analyze", str(root / RUN_ID)]):
            result = launch.run(argv)
            lines = result.stderr.strip().splitlines()
            assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result.stderr
            assert len(lines) == 1 and "read-only" in lines[0], lines
        subprocess.run(["mount", "-o", "remount,rw", str(small)], check=True)
        assert main(resume_argv(root)) == 0


def test_a_checkpoint_no_run_has_is_bad_input_exit_2_and_nothing_written(pristine, tmp_path, capsys):
    root = tmp_path / "runs"
    shutil.copytree(pristine, root)
    before = contents(root / RUN_ID)
    assert main(["analyze", str(root), "--checkpoints", "999"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("dynamics analyze: --checkpoints 999: no run has a checkpoint at every one of these steps; "
                   "the runs have step(s) 6 (or use last, all)")
    assert contents(root / RUN_ID) == before
    assert main(["analyze", str(root), "--checkpoints", "6", "--k", "1", "--batches", "1", "--max-iter", "4"]) == 0


def test_a_grid_worker_on_a_full_disk_reports_the_run_failed_and_never_raises(pristine, tmp_path, monkeypatch):
    """The worker's side: the run fails with ENOSPC and its log.txt cannot be appended either."""
    import dynamics.training

    cfg = RunConfig.from_dict(tiny_config(tmp_path, method="lora", rank=4, run_id=RUN_ID, keep_checkpoints=2))
    shutil.copytree(pristine, cfg.run_dir.parent)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(cfg.run_dir / "metrics.parquet"))

    monkeypatch.setattr(dynamics.training, "train", full)
    monkeypatch.setattr(os, "fdopen", full)  # log.txt's append
    outcome = run_one(cfg)
    assert outcome.status == "failed" and "\n" not in outcome.error
    assert outcome.error.startswith(f"{cfg.run_dir / 'metrics.parquet'}: no space left on device")
    assert "log.txt not written" in outcome.error


def test_a_grid_driver_that_cannot_record_a_lost_worker_says_so_and_goes_on(pristine, tmp_path, monkeypatch):
    from dynamics import executors

    cfg = RunConfig.from_dict(tiny_config(tmp_path, method="lora", rank=4, run_id=RUN_ID, keep_checkpoints=2))
    shutil.copytree(pristine, cfg.run_dir.parent)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(cfg.run_dir / "summary.json"))

    monkeypatch.setattr(runs, "update_summary", full)
    outcome = executors.record_lost_worker(cfg, "worker process died (killed by SIGKILL)")
    assert outcome.status == "failed" and "not recorded in the run folder" in outcome.error
    assert "no space left on device" in outcome.error


def test_a_grid_on_a_real_full_disk_fails_each_run_in_one_line_and_finishes(tmp_path):
    with small_filesystem(tmp_path / "small", "1500k") as small:
        grid = tmp_path / "full.toml"
        grid.write_text('[base]\nmodel = "tiny-llama"\ntask = "tiny"\nmethod = "lora"\nrank = 4\nsteps = 6\n'
                        'batch_size = 4\nn_train = 64\nn_eval = 8\ncheckpoint_every = 3\nthreads = 1\n'
                        '\n[axes]\nseed = [0, 1]\n')
        filler = small / "filler"
        free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
        filler.write_bytes(b"\0" * max(free - 60_000, 0))  # room to claim the runs, not to checkpoint them
        result = launch.run(["grid", str(grid), "--runs-dir", str(small / "runs")])
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert "2 runs: 2 failed" in result.stderr, result.stderr
        assert result.stderr.count("no space left on device") >= 2, result.stderr
        # (that such a run resumes exactly once there is room: the injected faults above)
