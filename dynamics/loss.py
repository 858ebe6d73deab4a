"""The task loss of a batch, shared by training, evaluation and curvature; moving batches to the device.

The loss of one optimizer step is the mean over every target token of the whole step (causal LM)
or over every example (classification), in nats, so a step with gradient accumulation equals one
big batch: each micro-batch contributes its loss *sum* divided by the step's number of terms.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dynamics.data import IGNORE_INDEX


def loss_sum(model: nn.Module, batch: Mapping[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Sum of per-term cross-entropies (nats): next-token over target positions (causal LM, logits
    (B, T, V) shifted by one) or one term per example (classification, logits (B, C))."""
    return cross_entropy_sum(forward_logits(model, batch, kind), batch["labels"], kind)


def forward_logits(model: nn.Module, batch: Mapping[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Logits (B, T, V) or (B, C). A causal LM builds no KV cache here (``use_cache=False``):
    nothing decodes from it."""
    no_cache = {"use_cache": False} if kind == "causal_lm" else {}
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **no_cache).logits


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """``loss_sum`` from logits already computed (``evaluate`` also reads predictions from them)."""
    if kind == "causal_lm":
        logits = logits[:, :-1, :]  # (B, T-1, V): position t predicts token t+1
        targets = labels[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def step_loss_fn(kind: str, n_terms: int, autocast: str | None = None
                 ) -> Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]:
    """``loss_fn(model, micro_batch)``: that micro-batch's share of the step's mean loss. With
    ``autocast`` (a device type) the forward runs under bf16 autocast; the backward then follows
    the forward's dtypes (autocast wraps the forward only, as torch recommends)."""

    def loss_fn(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with mixed_precision(autocast):
            return loss_sum(model, batch, kind) / n_terms

    return loss_fn


def mixed_precision(device_type: str | None) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device_type`` ("cpu", "cuda"), or nothing for None. Matmuls run in
    bf16, reductions and the loss (``cross_entropy_sum`` casts the logits) in fp32; the weights
    keep their dtype, so fp32 trainable weights and optimizer state stay fp32."""
    if device_type is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (non-blocking where the source is pinned)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
