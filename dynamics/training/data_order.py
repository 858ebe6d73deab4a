"""The order in which a run sees its training examples, a pure function of (seed, epoch): a
resumed run draws exactly the batches an uninterrupted one would, with no loader state to save.
"""

from __future__ import annotations

import numpy as np
import torch

from dynamics.config import RunConfig
from dynamics.data import TaskData
from dynamics.distributed import ONE_PROCESS, World
from dynamics.loss import to_device


class DataOrder:
    """Example ``i`` of the training stream (0-based, over all epochs) is
    ``train[perm_e[i % n]]`` with ``e = i // n`` and ``perm_e`` a permutation seeded by (seed, e):
    stateless, so resuming at any step needs no loader state."""

    def __init__(self, n_examples: int, seed: int) -> None:
        self.n_examples = n_examples
        self.seed = seed
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for i in range(start, start + count):
            epoch = i // self.n_examples
            if epoch != self._epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_examples)
                self._epoch = epoch
            out.append(int(self._perm[i % self.n_examples]))
        return out

    def micro_batches(self, task: TaskData, start: int, cfg: RunConfig, device: torch.device,
                      world: World = ONE_PROCESS) -> list[dict]:
        """One step's ``grad_accum`` micro-batches of ``batch_size`` examples from stream position
        ``start``, collated and on ``device``; in a data-parallel run, this process's shard of each."""
        indices = self.indices(start, cfg.batch_size * cfg.grad_accum)
        return [to_device(task.collate([task.train[i] for i in world.shard(indices[k : k + cfg.batch_size])]), device)
                for k in range(0, len(indices), cfg.batch_size)]
