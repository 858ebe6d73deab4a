"""Run a forward/backward at ``W0 + Delta`` without ever writing into the frozen base weight W0.

The reference implementation adds Delta into W0 before the forward and subtracts it afterwards;
in bf16 (and in fp32, by rounding) ``W0 + Delta - Delta != W0`` and the drift grows over thousands
of steps. Here the base layer's forward is swapped, for the duration of one forward pass, for one
that computes ``x (W0 + Delta)^T`` from the untouched W0, in one of two exact ways:

- ``dense``: ``W0 + Delta`` is built inside a custom autograd function and rebuilt in backward to
  form ``dx = dy (W0 + Delta)`` instead of being saved, so memory grows by one layer's weight at a
  time, and time by two ``(m, n)`` builds per layer (independent of the number of tokens);
- ``lowrank``: for ``Delta = c U V`` of rank k, ``x W0^T + c (x V^T) U^T`` with U, V detached;
  time grows with tokens x (m + n) x k, nothing dense is built.

``auto`` takes, per layer and per call, the cheaper by multiply-adds: low-rank when
``2 tokens (m + n) k < 2 m n k + 2 m n`` (the dense build's matmul plus its add), else dense.
Dense-only perturbations (random noise) always use ``dense``.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dynamics.methods.layers import LowRank

APPLICATIONS = ("auto", "dense", "lowrank")


class WeightDelta(Protocol):
    """A perturbation of one frozen weight: ``perturbed(W0)`` returns ``W0 + Delta`` (a new tensor),
    deterministically, so it can be rebuilt in backward."""

    def perturbed(self, weight: torch.Tensor) -> torch.Tensor: ...


class LowRankDelta:
    """``Delta = c U V`` (U (m, k), V (k, n), detached)."""

    def __init__(self, factors: LowRank) -> None:
        self.factors = factors

    def perturbed(self, weight: torch.Tensor) -> torch.Tensor:
        U = self.factors.U.to(weight.dtype)
        V = self.factors.V.to(weight.dtype)
        return torch.addmm(weight, U, V, alpha=self.factors.scale)


class _PerturbedLinear(torch.autograd.Function):
    """``y = x (W0 + Delta)^T + b`` for a frozen W0 (no gradient to W0, Delta or b); ``W0 + Delta``
    is rebuilt in backward rather than saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                build: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.build = build
        ctx.save_for_backward(weight)
        return F.linear(x, build(weight), bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = grad_output @ ctx.build(weight) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def _perturbed_forward(base: nn.Linear, delta: WeightDelta, application: str, x: torch.Tensor) -> torch.Tensor:
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        raise RuntimeError("base-weight perturbations apply to frozen layers only")
    mode = application
    if mode == "auto":
        mode = "lowrank" if isinstance(delta, LowRankDelta) and _lowrank_is_cheaper(x, base, delta) else "dense"
    if mode == "lowrank":
        if not isinstance(delta, LowRankDelta):
            raise ValueError(f"application lowrank needs a low-rank perturbation, got {type(delta).__name__}")
        U = delta.factors.U.to(x.dtype)
        V = delta.factors.V.to(x.dtype)
        return F.linear(x, base.weight, base.bias) + delta.factors.scale * F.linear(F.linear(x, V), U)
    return _PerturbedLinear.apply(x, base.weight, base.bias, delta.perturbed)


def _lowrank_is_cheaper(x: torch.Tensor, base: nn.Linear, delta: LowRankDelta) -> bool:
    tokens = x.numel() // x.shape[-1]
    m, n = base.weight.shape
    k = delta.factors.U.shape[1]
    return 2 * tokens * (m + n) * k < 2 * m * n * k + 2 * m * n


@contextlib.contextmanager
def perturbed_base_layers(deltas: dict[nn.Linear, WeightDelta], application: str = "auto") -> Iterator[None]:
    """Within the context, each base Linear in ``deltas`` computes its forward at ``W0 + Delta``;
    the original forward comes back on exit, also after an exception. W0 itself is never written.

    Only the forward needs to happen inside: the backward of what was computed inside uses the
    perturbed weights through the autograd graph.
    """
    if application not in APPLICATIONS:
        raise ValueError(f"application {application!r}: must be one of {', '.join(APPLICATIONS)}")
    previous = {}
    try:
        for base, delta in deltas.items():
            previous[base] = base.__dict__.get("forward")  # an instance-level forward (e.g. a hook library's)
            base.forward = partial(_perturbed_forward, base, delta, application)
        yield
    finally:
        for base, original in previous.items():
            if original is None:
                del base.forward
            else:
                base.forward = original
