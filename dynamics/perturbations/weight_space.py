"""Run a forward/backward at ``W0 + Delta`` without ever writing into the frozen base weight W0.

The reference implementation adds Delta into W0 before the forward and subtracts it afterwards;
in bf16 (and in fp32, by rounding) ``W0 + Delta - Delta != W0`` and the drift grows over thousands
of steps. Here the base layer's forward is swapped, for the duration of one forward pass, for one
that computes ``x (W0 + Delta)^T`` from the untouched W0, in one of two exact ways:

- ``dense``: ``W0 + Delta`` is built inside a custom autograd function and rebuilt in backward to
  form ``dx = dy (W0 + Delta)`` instead of being saved; it is built into one workspace per weight
  shape, shared by the layers of that shape, so memory grows by a few weights and no step
  allocates (and page-faults) a fresh m x n buffer per layer. Time: two ``(m, n)`` builds per layer,
  independent of the number of tokens;
- ``lowrank``: for ``Delta = sum_i U_i V_i`` of rank k (factors detached), ``y = x W0^T +
  sum_i (x V_i^T) U_i^T`` and ``dx = dy W0 + sum_i (dy U_i) V_i``, each low-rank term accumulated
  in place into the base matmul's result (``addmm_``), so no activation-sized temporary is made;
  time grows with tokens x (m + n) x k, nothing dense is built.

MGPO's Delta is held as ``LowRankSum`` pairs that reference the adapter's own parameters and
optimizer moments, so a step keeps no copy of them (at r = 128 on SmolLM2 a thin-factor copy of
every layer's Delta would be ~310 MB).

``auto`` takes, per layer and per call, the cheaper by multiply-adds: low-rank when
``2 tokens (m + n) k < 2 m n k + 2 m n`` (the dense build's matmul plus its add), else dense.
Dense-only perturbations (random noise) always use ``dense``. MGPO's ``auto`` sends plain LoRA
layers through ``lora_fused`` instead, which folds Delta into the adapter's own matmuls and is
never more expensive than either way here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

APPLICATIONS = ("auto", "dense", "lowrank")


@dataclass(frozen=True)
class LowRankSum:
    """A dense ``(m, n)`` matrix held as ``scale * sum_i U_i @ V_i`` (``U_i (m, k_i)``, ``V_i (k_i, n)``)
    whose factors are existing tensors (parameters, optimizer moments), so holding it copies nothing;
    ``scale`` is a float or a 0-d tensor (no host sync)."""

    pairs: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    scale: torch.Tensor | float = 1.0


class WeightDelta(Protocol):
    """A perturbation of one frozen weight: ``perturbed(W0, out)`` writes ``W0 + Delta`` into ``out``
    (a tensor like W0, or a new one when None) and returns it, deterministically, so it can be
    rebuilt in backward."""

    def perturbed(self, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor: ...


class LowRankDelta:
    """``Delta = scale * sum_i U_i V_i`` (a ``LowRankSum``; factors detached)."""

    def __init__(self, factors: LowRankSum) -> None:
        self.factors = factors

    def scaled_pairs(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(U_i, scale V_i)]`` in ``dtype``: the scale goes onto the (k, n) factors, made per call."""
        scale = self.factors.scale
        unit = isinstance(scale, (int, float)) and scale == 1
        return [(U.to(dtype), (V if unit else V * scale).to(dtype)) for U, V in self.factors.pairs]

    @property
    def rank_bound(self) -> int:
        return sum(U.shape[1] for U, _ in self.factors.pairs)

    def perturbed(self, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        (U, V), *rest = self.scaled_pairs(weight.dtype)
        built = torch.addmm(weight, U, V) if out is None else torch.addmm(weight, U, V, out=out)
        for U, V in rest:
            built.addmm_(U, V)
        return built


class Workspace:
    """One reusable buffer per (shape, dtype, device) for dense ``W0 + Delta`` builds. Safe because
    each build is consumed by one matmul before the next build of that shape starts (forward runs
    layer by layer, and so does the backward of one graph)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def like(self, weight: torch.Tensor) -> torch.Tensor:
        key = (tuple(weight.shape), weight.dtype, weight.device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty_like(weight, memory_format=torch.contiguous_format)
        return self.buffers[key]


class _PerturbedLinear(torch.autograd.Function):
    """``y = x (W0 + Delta)^T + b`` for a frozen W0 (no gradient to W0, Delta or b); ``W0 + Delta``
    is rebuilt in backward rather than saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, delta: WeightDelta,
                workspace: Workspace) -> torch.Tensor:
        ctx.delta, ctx.workspace = delta, workspace
        ctx.save_for_backward(weight)
        return F.linear(x, delta.perturbed(weight, workspace.like(weight)), bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (weight,) = ctx.saved_tensors
        built = ctx.delta.perturbed(weight, ctx.workspace.like(weight))
        return grad_output @ built, None, None, None, None


class _LowRankPerturbedLinear(torch.autograd.Function):
    """``y = x (W0 + sum_i U_i V_i)^T + b`` for a frozen W0 and detached factor pairs
    ``U_i (m, k_i)``, ``V_i (k_i, n)`` given flat as ``U_1, V_1, U_2, V_2, ...``: gradient to x only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *factors: torch.Tensor):
        ctx.save_for_backward(weight, *factors)
        rows = x.reshape(-1, x.shape[-1])
        y = rows @ weight.T if bias is None else torch.addmm(bias, rows, weight.T)
        for U, V in zip(factors[0::2], factors[1::2]):
            y.addmm_(rows @ V.T, U.T)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        no_grads = (None,) * (2 + len(ctx.saved_tensors))
        if not ctx.needs_input_grad[0]:
            return (None, *no_grads)
        weight, *factors = ctx.saved_tensors
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_x = rows @ weight
        for U, V in zip(factors[0::2], factors[1::2]):
            grad_x.addmm_(rows @ U, V)
        return (grad_x.view(*grad_output.shape[:-1], weight.shape[1]), *no_grads)


def _perturbed_forward(base: nn.Linear, delta: WeightDelta, application: str, workspace: Workspace,
                       x: torch.Tensor) -> torch.Tensor:
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        raise RuntimeError("base-weight perturbations apply to frozen layers only")
    mode = application
    if mode == "auto":
        mode = "lowrank" if isinstance(delta, LowRankDelta) and _lowrank_is_cheaper(x, base, delta) else "dense"
    if mode == "lowrank":
        if not isinstance(delta, LowRankDelta):
            raise ValueError(f"application lowrank needs a low-rank perturbation, got {type(delta).__name__}")
        factors = [t for pair in delta.scaled_pairs(x.dtype) for t in pair]
        return _LowRankPerturbedLinear.apply(x, base.weight, base.bias, *factors)
    return _PerturbedLinear.apply(x, base.weight, base.bias, delta, workspace)


def _lowrank_is_cheaper(x: torch.Tensor, base: nn.Linear, delta: LowRankDelta) -> bool:
    tokens = x.numel() // x.shape[-1]
    m, n = base.weight.shape
    k = delta.rank_bound
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
    workspace = Workspace()
    with swapped_forwards({base: partial(_perturbed_forward, base, delta, application, workspace)
                           for base, delta in deltas.items()}):
        yield


@contextlib.contextmanager
def swapped_forwards(forwards: dict[nn.Module, Callable]) -> Iterator[None]:
    """Set each module's ``forward`` (an instance attribute) for the duration of the context and put
    back what was there on exit, also after an exception (an instance-level forward some hook
    library installed is kept)."""
    previous = {}
    try:
        for module, forward in forwards.items():
            previous[module] = module.__dict__.get("forward")
            module.forward = forward
        yield
    finally:
        for module, original in previous.items():
            if original is None:
                del module.forward
            else:
                module.forward = original
