"""Data parallelism: the processes of one run, as ``torchrun`` or ``accelerate launch`` start them.

One run may train on N processes (``torchrun --nproc-per-node N -m dynamics train ...``). The
launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; ``World.from_env``
joins the process group (gloo on CPUs, nccl on GPUs) and one process (``WORLD_SIZE`` unset) is a
world of one whose collectives are no-ops, so the training code has a single path.

What makes N processes train exactly like one (docs/distributed.md):

- ``batch_size`` stays the run's micro-batch (the config, and so the run id, does not depend on
  N); process ``rank`` takes examples ``[rank * b, (rank + 1) * b)`` of each, ``b = batch_size / N``.
- The loss of every process is divided by the step's *global* number of loss terms, so the sum of
  the processes' gradients is the one-process gradient; ``sum_gradients`` forms that sum (one flat
  all-reduce) before anything reads a gradient: clipping, MGPO's ``g_ema`` (eq. 8), AdaLoRA's
  allocation, SAM's ascent direction, the logged norms.
- Everything else a step uses (weights, AdamW's moments, the perturbation's state, the noise
  seeds) is then the same on every process without being sent.

We call the collectives ourselves instead of wrapping the model in ``DistributedDataParallel``:
DDP all-reduces inside ``backward()`` through hooks, which ``torch.autograd.grad`` (Hessian-vector
products) skips, and SAM needs the reduced gradient *between* its two backward passes of one
micro-batch, where DDP would either reduce twice or need ``no_sync`` juggling. One explicit
reduction per step (and one per SAM micro-batch) at a fixed point is simpler and exact.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

# Long enough for process 0 to evaluate, measure sharpness or write a checkpoint while the others
# wait in the next collective (gloo's and nccl's default of 10-30 minutes is not).
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class World:
    """The processes of this run: ``size`` of them, this one is ``rank`` (0 writes the run folder)
    and ``local_rank`` on its machine (its GPU index)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, backend: str) -> World:
        """The world the launcher started this process in (a world of one without a launcher);
        joins the process group with ``backend`` the first time."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        world = cls(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
        return world

    # --- collectives (no-ops in a world of one) ---------------------------------------------------
    def sum_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Replace each ``p.grad`` by its sum over the processes, in one flat all-reduce. A
        parameter with no gradient on any process keeps ``None`` (AdamW then skips it, as one
        process would)."""
        if not self.distributed or not params:
            return
        device = params[0].device
        has_grad = torch.tensor([float(p.grad is not None) for p in params], device=device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([has_grad.to(grads[0].dtype)] + [g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        present, offset = flat[: len(params)], len(params)
        for p, grad, seen in zip(params, grads, present.tolist()):
            values = flat[offset : offset + grad.numel()].view_as(grad)
            offset += grad.numel()
            p.grad = values.clone() if seen else None

    def sum_floats(self, values: Sequence[float | None]) -> list[float | None]:
        """Each value summed over the processes (``None`` where this process has none: a value is
        either measured on every process or on none)."""
        if not self.distributed:
            return list(values)
        flat = torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float64)
        dist.all_reduce(flat)
        return [None if v is None else s for v, s in zip(values, flat.tolist())]

    def sum_ints(self, values: Sequence[int]) -> list[int]:
        if not self.distributed:
            return list(values)
        flat = torch.tensor(list(values), dtype=torch.int64)
        dist.all_reduce(flat)
        return [int(v) for v in flat.tolist()]

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on one (a stop request, say)."""
        return bool(self.sum_ints([int(flag)])[0]) if self.distributed else flag

    def broadcast_int(self, value: int) -> int:
        """Process 0's ``value``, on every process."""
        if not self.distributed:
            return value
        box = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(box, src=0)
        return int(box.item())

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy process 0's values into ``tensors`` on every process (in place, as DDP does with
        the model at start-up)."""
        if not self.distributed:
            return
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def seed_step(self, seed: int, step: int) -> None:
        """Reseed torch's RNG on processes other than 0 for optimizer step ``step``, from (seed,
        rank, step): their dropout masks differ from process 0's and from each other's (the same
        seed everywhere would give the shards identical masks), and do not depend on where the run
        was last resumed. Process 0 keeps the run's own stream (checkpointed, as on one process)."""
        if self.rank:
            torch.manual_seed(int(np.random.SeedSequence([seed, self.rank, step]).generate_state(1)[0]))

    # --- the shard of a batch ---------------------------------------------------------------------
    def shard(self, indices: Sequence[int]) -> list[int]:
        """This process's contiguous share of one micro-batch's example indices."""
        per_process = len(indices) // self.size
        return list(indices[self.rank * per_process : (self.rank + 1) * per_process])


ONE_PROCESS = World()  # a run without a launcher


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def close() -> None:
    """Leave the process group (at the end of a data-parallel command)."""
    if dist.is_initialized():
        dist.destroy_process_group()
