"""MGPO's perturbation folded into a plain LoRA layer's own forward and backward.

A LoRA layer computes ``y = x W0^T + s (x A^T) B^T``; MGPO's ``Delta = c (m_B A + B m_A)`` (``c``
already holds ``-rho c_l s / (||d_l|| + eps)``) makes the effective weight

    W0 + s B A + Delta = W0 + (s B + c m_B) A + c B m_A.

The ``m_B A`` term rides on LoRA's own ``h = x A^T`` for free in the forward (only the ``(m, r)``
factor ``s B + c m_B`` changes). Each pass then chooses, per layer, how the rest enters (extra
multiply-adds over plain LoRA, T = tokens):

- forward ``lowrank``: ``y = x W0^T + [h, x m_A^T] [s B + c m_B, c B]^T`` -- ``T r (m + n)``;
- forward ``dense``: ``y = x (W0 + c B m_A)^T + h (s B + c m_B)^T`` with ``W0 + c B m_A`` built in a
  workspace -- ``m n r`` and one pass over the weight;
- backward ``lowrank``: ``dx = g W0 + [s gB + c g m_B, c gB] [A; m_A]`` -- ``T r (m + n)``;
- backward ``half``: ``dx = g (W0 + c B m_A) + (s gB + c g m_B) A``, the weight rebuilt -- ``m n r +
  T m r``;
- backward ``dense``: ``dx = g (W0 + Delta) + s gB A``, ``W0 + Delta`` rebuilt -- ``2 m n r``.

``auto`` takes the cheapest of each by that count (plus ``WEIGHT_PASS_COST`` per weight element
built); with 8 x 128 tokens on SmolLM2 that is all-lowrank at r = 8 and dense forward with dense
or half backward at r = 128, ~27 % fewer multiply-adds than building ``W0 + Delta`` in both passes. Nothing
``(m, n)`` is saved for backward, no m x n buffer is allocated per layer (``Workspace``), and W0 is
never written. Gradients are written by hand so that, as in every other application, Delta is a
constant: ``dL/dB = s g^T h``, ``dL/dA = s (g B)^T x``.

Only plain LoRA layers qualify (no DoRA, no active dropout, not merged, one adapter, no LoRA bias,
adapter in the base weight's dtype); the others go through the base-weight path
(``weight_space``).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator

import torch

from dynamics.adapters.layers import AdapterLayer
from dynamics.perturbations.weight_space import LowRankSum, Workspace, swapped_forwards


def fusable(layer: AdapterLayer) -> bool:
    """Whether ``layer`` is a plain LoRA layer whose forward this module can replace exactly."""
    module, key = layer.module, layer.adapter
    dropout = module.lora_dropout[key] if hasattr(module, "lora_dropout") else None
    dropout_off = isinstance(dropout, torch.nn.Identity) or (
        isinstance(dropout, torch.nn.Dropout) and (dropout.p == 0 or not dropout.training))
    return (not layer.is_adalora and not module.use_dora.get(key, False) and dropout_off and not module.merged
            and len(module.active_adapters) == 1 and module.lora_B[key].bias is None
            and not getattr(module, "disable_adapters", False)
            and module.lora_A[key].weight.dtype == layer.base.weight.dtype)  # peft mixes dtypes otherwise


FORWARD_WAYS = ("lowrank", "dense")
BACKWARD_WAYS = ("lowrank", "half", "dense")
# Multiply-adds that one element of a built (m, n) weight costs in memory traffic (read W0, write
# and read the build: ~12 bytes at ~6-7 multiply-adds per byte on the CPUs measured).
WEIGHT_PASS_COST = 80


def cheapest_ways(m: int, n: int, r: int, tokens: int) -> tuple[str, str]:
    """(forward way, backward way) with the fewest extra multiply-adds (module doc)."""
    forward = {"lowrank": tokens * r * (m + n), "dense": m * n * (r + WEIGHT_PASS_COST)}
    backward = {
        "lowrank": tokens * r * (m + n),
        "half": m * n * (r + WEIGHT_PASS_COST) + tokens * m * r,
        "dense": m * n * (2 * r + WEIGHT_PASS_COST),
    }
    return min(forward, key=forward.get), min(backward, key=backward.get)


class _LoraPerturbedLinear(torch.autograd.Function):
    """The formulas of the module doc; gradients to x, A and B only."""

    @staticmethod
    def forward(ctx, x, A, B, weight, bias, m_A, m_B, coef, scaling: float, ways: tuple[str, str],
                workspace: Workspace):
        rows = x.reshape(-1, x.shape[-1])
        coef = coef.to(A.dtype)
        m_A, m_B = m_A.to(A.dtype), m_B.to(B.dtype)
        B_side = scaling * B + coef * m_B  # (m, r)
        if ways[0] == "lowrank":
            hidden = rows @ torch.cat([A, m_A]).T  # (T, 2r) = [h, x m_A^T]
            y = rows @ weight.T if bias is None else torch.addmm(bias, rows, weight.T)
            y.addmm_(hidden, torch.cat([B_side, coef * B], dim=1).T)
            h = hidden[:, :A.shape[0]].contiguous()  # the (T, 2r) buffer is then freed
        else:
            built = torch.addmm(weight, coef * B, m_A, out=workspace.like(weight))  # W0 + c B m_A
            y = rows @ built.T if bias is None else torch.addmm(bias, rows, built.T)
            h = rows @ A.T
            y.addmm_(h, B_side.T)
        # What plain LoRA saves (x, h) plus references to tensors that exist anyway: nothing (m, n).
        ctx.save_for_backward(rows, h, A, m_A, B, weight, m_B, coef)
        ctx.scaling, ctx.ways, ctx.workspace = scaling, ways, workspace
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_output):
        rows, h, A, m_A, B, weight, m_B, coef = ctx.saved_tensors
        s, way = ctx.scaling, ctx.ways[1]
        g = grad_output.reshape(-1, grad_output.shape[-1])
        gB = g @ B  # (T, r)
        g_mB = None if way == "dense" else g @ m_B  # (T, r)
        grad_A = s * (gB.T @ rows) if ctx.needs_input_grad[1] else None
        grad_B = s * (g.T @ h) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            if way == "lowrank":
                grad_x = g @ weight
                grad_x.addmm_(torch.cat([s * gB + coef * g_mB, coef * gB], dim=1), torch.cat([A, m_A]))
            elif way == "half":
                grad_x = g @ torch.addmm(weight, coef * B, m_A, out=ctx.workspace.like(weight))
                grad_x.addmm_(s * gB + coef * g_mB, A)
            else:  # W0 + Delta as two rank-r updates: no (m, 2r) / (2r, n) concatenations to copy
                built = torch.addmm(weight, coef * m_B, A, out=ctx.workspace.like(weight)).addmm_(coef * B, m_A)
                grad_x = g @ built
                grad_x.addmm_(gB, A, alpha=s)
            grad_x = grad_x.view(*grad_output.shape[:-1], weight.shape[1])
        return grad_x, grad_A, grad_B, None, None, None, None, None, None, None, None


def _fused_forward(layer: AdapterLayer, delta: LowRankSum, ways: tuple[str, str] | None, workspace: Workspace,
                   x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs:
        raise RuntimeError(f"{layer.name}: the fused MGPO forward takes only the input (got extra arguments)")
    module, key = layer.module, layer.adapter
    (m_B, _), (_, m_A) = delta.pairs  # LoRA pairs: (m_B, A), (B, m_A)
    base = layer.base
    A, B = module.lora_A[key].weight, module.lora_B[key].weight
    x = x.to(A.dtype)
    if ways is None:
        ways = cheapest_ways(*base.weight.shape, A.shape[0], x.numel() // x.shape[-1])
    return _LoraPerturbedLinear.apply(x, A, B, base.weight, base.bias, m_A, m_B, torch.as_tensor(delta.scale),
                                      float(module.scaling[key]), ways, workspace)


@contextlib.contextmanager
def perturbed_lora_layers(deltas: dict[AdapterLayer, LowRankSum],
                          ways: tuple[str, str] | None = None) -> Iterator[None]:
    """Within the context each LoRA layer in ``deltas`` computes its forward (and backward) with
    MGPO's Delta folded in, the (forward, backward) ``ways`` of the module doc or, when None, the
    cheapest per layer; the original forward comes back on exit, also after an exception."""
    refused = [layer.name for layer in deltas if not fusable(layer)]
    if refused:
        raise ValueError(f"{refused[0]}: not a plain LoRA layer, the fused application does not apply")
    if ways is not None and (ways[0] not in FORWARD_WAYS or ways[1] not in BACKWARD_WAYS):
        raise ValueError(f"ways={ways}: forward one of {FORWARD_WAYS}, backward one of {BACKWARD_WAYS}")
    workspace = Workspace()
    with swapped_forwards({layer.module: partial(_fused_forward, layer, delta, ways, workspace)
                           for layer, delta in deltas.items()}):
        yield
