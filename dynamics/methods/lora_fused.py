"""MGPO's perturbation folded into a plain LoRA layer's own matmuls (``fused`` application).

For a LoRA layer ``y = x W0^T + s (x A^T) B^T`` and MGPO's ``Delta = c (m_B A + B m_A)`` (``c``
already holds ``-rho c_l s / (||d_l|| + eps)``), the perturbed output is

    y = x W0^T + [h, h_m] [s B + c m_B, c B]^T,     h = x A^T,  h_m = x m_A^T,

two matmuls of inner size 2r on top of the base one, and no ``(m, n)`` matrix is ever built. The
gradients are written by hand so that, as in every other application, Delta is a constant:
``dL/dB = s g^T h``, ``dL/dA = s (g B)^T x`` and ``dL/dx = g W0 + [s gB + c g m_B, c gB] [A; m_A]``.
Extra cost over plain LoRA: ``2 tokens r (m + n)`` multiply-adds per layer, against the dense
build's ``4 m n r`` plus two passes over the weight; ``auto`` compares the two (module
``weight_perturbation``). Only plain LoRA layers qualify (no DoRA, no active dropout, not merged,
one adapter, no LoRA bias, adapter in the base weight's dtype); the others go through the base-weight path.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator

import torch

from dynamics.methods.layers import AdapterLayer, LowRankSum
from dynamics.methods.weight_perturbation import swapped_forwards


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


class _LoraPerturbedLinear(torch.autograd.Function):
    """The formulas of the module doc; gradients to x, A and B only."""

    @staticmethod
    def forward(ctx, x, A, B, weight, bias, m_A, m_B, coef, scaling: float):
        rows = x.reshape(-1, x.shape[-1])
        A_mA = torch.cat([A, m_A.to(A.dtype)])  # (2r, n)
        hidden = rows @ A_mA.T  # (T, 2r) = [h, h_m]
        coef = coef.to(A.dtype)
        mixing = torch.cat([scaling * B + coef * m_B.to(B.dtype), coef * B], dim=1)  # (m, 2r)
        y = rows @ weight.T if bias is None else torch.addmm(bias, rows, weight.T)
        y.addmm_(hidden, mixing.T)
        # Save what plain LoRA saves (x and h = x A^T, contiguous so the (T, 2r) buffer is freed) and
        # references to A, m_A, not their concatenation: the step then holds no more than LoRA.
        ctx.save_for_backward(rows, hidden[:, :A.shape[0]].contiguous(), A, m_A, B, weight, m_B, coef)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_output):
        rows, h, A, m_A, B, weight, m_B, coef = ctx.saved_tensors
        s = ctx.scaling
        g = grad_output.reshape(-1, grad_output.shape[-1])
        gB, g_mB = (g @ torch.cat([B, m_B.to(B.dtype)], dim=1)).chunk(2, dim=1)  # (T, r) each
        grad_A = s * (gB.T @ rows) if ctx.needs_input_grad[1] else None
        grad_B = s * (g.T @ h) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            grad_x.addmm_(torch.cat([s * gB + coef * g_mB, coef * gB], dim=1), torch.cat([A, m_A.to(A.dtype)]))
            grad_x = grad_x.view(*grad_output.shape[:-1], weight.shape[1])
        return grad_x, grad_A, grad_B, None, None, None, None, None, None


def _fused_forward(layer: AdapterLayer, delta: LowRankSum, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs:
        raise RuntimeError(f"{layer.name}: the fused MGPO forward takes only the input (got extra arguments)")
    module, key = layer.module, layer.adapter
    (m_B, _), (_, m_A) = delta.pairs  # LoRA pairs: (m_B, A), (B, m_A)
    base = layer.base
    x = x.to(module.lora_A[key].weight.dtype)
    return _LoraPerturbedLinear.apply(x, module.lora_A[key].weight, module.lora_B[key].weight, base.weight,
                                      base.bias, m_A, m_B, torch.as_tensor(delta.scale),
                                      float(module.scaling[key]))


@contextlib.contextmanager
def perturbed_lora_layers(deltas: dict[AdapterLayer, LowRankSum]) -> Iterator[None]:
    """Within the context each LoRA layer in ``deltas`` computes its forward with MGPO's Delta folded
    in; the original forward comes back on exit, also after an exception."""
    refused = [layer.name for layer in deltas if not fusable(layer)]
    if refused:
        raise ValueError(f"{refused[0]}: not a plain LoRA layer, the fused application does not apply")
    with swapped_forwards({layer.module: partial(_fused_forward, layer, delta) for layer, delta in deltas.items()}):
        yield


def fused_is_cheaper(layer: AdapterLayer, tokens: int) -> bool:
    """``2 T r (m + n)`` multiply-adds against the dense build's ``4 m n r`` plus its two passes over
    the ``(m, n)`` weight, counted as 160 multiply-adds per element (32 bytes of traffic at ~5
    multiply-adds per byte on the CPUs measured; ``benchmarks/overhead.py``)."""
    m, n = layer.base.weight.shape
    r = layer.parameters()["A"].shape[0]
    return 2 * tokens * r * (m + n) < m * n * (4 * r + 160)

