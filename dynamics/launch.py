"""The one command line that starts a data-parallel run: ``torchrun --standalone
--nproc-per-node N -m dynamics ARGS`` (``dynamics train --nproc N`` and a grid's
``--nproc-per-run N`` both use it; docs/distributed.md). No torch import: the CLI builds it
before torch loads."""

from __future__ import annotations

import sys
from typing import Sequence


def torchrun_command(nproc: int, dynamics_args: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node=N -m dynamics *args``, run
    by this Python (the launcher's own module, so no ``torchrun`` script need be on PATH)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "dynamics", *dynamics_args]
