"""Stopping a run cleanly: SIGINT / SIGTERM ask the loop to checkpoint after the current step
and stop (``StopRequest``); a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


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
