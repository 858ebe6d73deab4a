"""Small tensor helpers shared by the training step and the perturbations."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def global_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all entries of ``tensors`` (a 0-d tensor, no host sync), accumulated in float32
    or in float64 for float64 tensors; 0 for no tensors."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(())
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t, dtype=dtype) for t in tensors]))
