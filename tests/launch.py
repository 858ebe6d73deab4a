"""``dynamics`` commands as separate processes, started fast: forked from a server process that
has imported the training stack once (multiprocessing's forkserver, as the grid's local executor
starts its workers, ``dynamics.executors._worker_context``), instead of a new interpreter that
imports torch, transformers and peft again (about 6 s of CPU each on 2 cores).

The child is a real process: its own pid, its own signal handlers, exit status and output; it
runs ``dynamics.cli.main(argv)`` exactly as ``python -m dynamics`` does after start-up. What it
shares with the server is the imported modules, nothing that ran: the server never trains, so no
thread pool or RNG state is forked. Tests of start-up itself (``python -m dynamics``, torchrun's
processes, a module imported first) keep using ``subprocess``.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

PRELOAD = ["dynamics.cli", "dynamics.executors", "dynamics.training", "dynamics.run_analysis", "peft"]


def _context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # no effect once the server runs (the grid's list is close)
    return context


def _run_cli(argv: list[str], env: dict[str, str] | None, cwd: str | None, out_path: str, err_path: str) -> None:
    """The child: the environment and working folder asked for, output to the two files, default
    signal handling, then ``dynamics ARGV``; its exit status is the command's."""
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    _redirect(out_path, err_path)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from dynamics.cli import main  # lazy: preloaded by the server

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def _run_code(code: str, out_path: str, err_path: str) -> None:
    """A child that runs Python ``code`` (as ``python -c``), output to the two files."""
    _redirect(out_path, err_path)
    exec(compile(code, "<launch.run_code>", "exec"), {"__name__": "__main__"})


def _redirect(out_path: str, err_path: str) -> None:
    for fd, path in ((1, out_path), (2, err_path)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115  (the process's own stdout)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


class Command:
    """A running ``dynamics ARGV``, with the part of ``subprocess.Popen``'s interface the tests
    use: ``pid``, ``poll()``, ``wait(timeout)``, ``send_signal(sig)``, ``communicate(timeout)`` ->
    ``(stdout, stderr)`` as text, ``returncode`` (negative: killed by that signal)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 code: str | None = None):
        self._folder = Path(tempfile.mkdtemp(prefix="dynamics-command-"))
        self._out, self._err = self._folder / "stdout", self._folder / "stderr"
        self.args = ["python", "-c", code] if code is not None else ["dynamics", *argv]
        target, args = (_run_code, (code,)) if code is not None else (
            _run_cli, (list(argv), env, None if cwd is None else str(cwd)))
        self._process = _context().Process(target=target, args=(*args, str(self._out), str(self._err)))
        self._process.start()
        self.pid = self._process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not self._process.is_alive():
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        output = tuple(path.read_text() if path.exists() else "" for path in (self._out, self._err))
        shutil.rmtree(self._folder, ignore_errors=True)
        return output


def run(argv: list[str], env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
        timeout: float | None = 300) -> subprocess.CompletedProcess:
    """``subprocess.run([python, -m, dynamics, *argv], capture_output=True, text=True)``, started
    fast (:class:`Command`)."""
    command = Command(argv, env=env, cwd=cwd)
    try:
        out, err = command.communicate(timeout)
    except subprocess.TimeoutExpired:
        command.kill()
        raise
    return subprocess.CompletedProcess(command.args, command.returncode, out, err)


def run_code(code: str, timeout: float | None = 300) -> subprocess.CompletedProcess:
    """``python -c CODE`` in a process forked from the server: the third-party libraries it has
    imported are there already; ``dynamics`` modules the code needs fresh, it removes from
    ``sys.modules`` itself."""
    command = Command([], code=code)
    out, err = command.communicate(timeout)
    return subprocess.CompletedProcess(command.args, command.returncode, out, err)
