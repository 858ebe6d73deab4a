"""Hessian curvature of a live model at its current weights, on its task's eval or training loss:
the top eigenvalues (Lanczos), the trace (Hutchinson) and the eigenvalue density (stochastic
Lanczos quadrature), as rows of ``sharpness.parquet``, ``trace.parquet`` and ``density.parquet``.

The training loop calls it (``--sharpness-every``, eval loss) and so does ``dynamics analyze`` on
checkpoints (``--split eval`` or ``train``). The loss is the mean loss (training's units: nats per
target token) over the first ``n_batches`` batches of ``batch_size`` examples of the split, a fixed
set, so values at different steps and in different runs of the same task are comparable; the
parameters are the trainable ones (LoRA A/B, or every weight for ``full``). The training split's
first examples are the ones flat-minima claims are about (the loss the optimizer minimised); the
eval split's say how the minimum looks from held-out data. The algorithms are the pure ones of
``dynamics.analysis.sharpness``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import torch
from torch import nn

from dynamics.analysis.sharpness import hessian_eigenvalues, hessian_trace, model_loss_fn, spectral_density
from dynamics.analyze_config import SPLITS
from dynamics.config import ConfigError, RunConfig, check_value
from dynamics.data import TaskData, n_loss_terms
from dynamics.loss import loss_sum, to_device


@contextlib.contextmanager
def eager_attention(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Fused attention kernels (sdpa on CPU, flash and memory-efficient on GPUs) have no double
    backward: switch to eager while the HVPs run, on every device."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if current in (None, "eager") or not hasattr(base, "set_attn_implementation"):
        yield
        return
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(current)


def sharpness_batches(task: TaskData, cfg: RunConfig, n_batches: int, device: torch.device,
                      split: str = "eval") -> list[dict]:
    """The first ``n_batches`` batches of ``cfg.batch_size`` examples of ``split`` (in the split's
    stored order, not the training loop's shuffled one: the same examples for every run of a task)."""
    check_value(split in SPLITS, "split", split, "must be one of " + ", ".join(SPLITS))
    examples = getattr(task, split)[: n_batches * cfg.batch_size]
    if not examples:
        raise ConfigError("--n-eval 0: sharpness needs eval examples" if split == "eval" else
                          "--split train: the task has no training examples")
    return [to_device(task.collate(examples[i : i + cfg.batch_size]), device)
            for i in range(0, len(examples), cfg.batch_size)]


def hessian_loss(model: nn.Module, task: TaskData, cfg: RunConfig, device: torch.device,
                 n_batches: int, split: str = "eval") -> tuple[Any, list[torch.Tensor], int]:
    """The loss closure the curvature measures differentiate: ``(loss_fn, params, n_examples)``.

    ``loss_fn()`` is the mean loss over the first ``n_batches`` batches of ``split`` (nats per
    target token), ``params`` the trainable tensors."""
    batches = sharpness_batches(task, cfg, n_batches, device, split)
    total_terms = sum(n_loss_terms(b, task.kind) for b in batches)

    def batch_share(model: nn.Module, batch) -> torch.Tensor:  # sums to the split's mean over all batches
        return loss_sum(model, batch, task.kind) * len(batches) / total_terms

    params = [p for p in model.parameters() if p.requires_grad]
    return model_loss_fn(model, batches, batch_share), params, sum(int(b["input_ids"].shape[0]) for b in batches)


def measure_sharpness(model: nn.Module, task: TaskData, cfg: RunConfig, device: torch.device, *, k: int = 1,
                      n_batches: int = 1, tol: float = 1e-3, max_iter: int = 100, seed: int = 0,
                      step: int, source: str, split: str = "eval") -> list[dict[str, Any]]:
    """Top-k Hessian eigenvalues of ``split``'s loss at the model's current weights, as
    ``sharpness.parquet`` rows (with the loss itself, one extra forward pass)."""
    loss_fn, params, n_examples = hessian_loss(model, task, cfg, device, n_batches, split)
    if k > sum(p.numel() for p in params):
        raise ConfigError(f"--k {k}: larger than the {sum(p.numel() for p in params)} trainable parameters")
    with torch.no_grad():
        loss = float(loss_fn())
    started = time.perf_counter()
    with eager_attention(model, device):
        result = hessian_eigenvalues(loss_fn, params, k=k, tol=tol, max_iter=max_iter, seed=seed)
    seconds = time.perf_counter() - started
    return [{"step": step, "rank": i + 1, "eigenvalue": float(value), "residual": float(result.residuals[i]),
             "converged": bool(result.converged), "n_hvp": int(result.n_hvp), "n_examples": n_examples,
             "seconds": seconds, "source": source, "split": split, "loss": loss}
            for i, value in enumerate(result.eigenvalues)]


def measure_trace(model: nn.Module, task: TaskData, cfg: RunConfig, device: torch.device, *, n_batches: int = 1,
                  n_samples: int = 100, tol: float = 1e-2, seed: int = 0, step: int,
                  source: str, split: str = "eval") -> list[dict[str, Any]]:
    """Hutchinson's tr(H) of ``split``'s loss at the model's current weights, as one ``trace.parquet`` row."""
    loss_fn, params, n_examples = hessian_loss(model, task, cfg, device, n_batches, split)
    started = time.perf_counter()
    with eager_attention(model, device):
        result = hessian_trace(loss_fn, params, n_samples=n_samples, seed=seed, tol=tol)
    return [{"step": step, "trace": float(result.estimate), "standard_error": float(result.standard_error),
             "n_hvp": int(result.n_hvp), "converged": bool(result.converged), "n_examples": n_examples,
             "seconds": time.perf_counter() - started, "source": source, "split": split}]


def measure_density(model: nn.Module, task: TaskData, cfg: RunConfig, device: torch.device, *, n_batches: int = 1,
                    n_runs: int = 10, n_steps: int = 50, seed: int = 0, step: int,
                    source: str, split: str = "eval") -> list[dict[str, Any]]:
    """Stochastic Lanczos quadrature of the eigenvalue density of ``split``'s loss Hessian:
    ``density.parquet`` rows, one per quadrature node."""
    loss_fn, params, n_examples = hessian_loss(model, task, cfg, device, n_batches, split)
    with eager_attention(model, device):
        result = spectral_density(loss_fn, params, n_runs=n_runs, n_steps=n_steps, seed=seed)
    return [{"step": step, "probe": int(probe), "node": float(node), "weight": float(weight),
             "n_hvp": int(result.n_hvp), "n_examples": n_examples, "source": source, "split": split}
            for probe, node, weight in zip(result.probes, result.nodes, result.weights, strict=True)]
