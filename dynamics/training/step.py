"""One optimizer step, as a function the loop and the benchmarks both call.

    for micro_batch in micro_batches:
        loss += perturbation.forward_backward(model, micro_batch, loss_fn)   # perturb, backward, restore
    world.sum_gradients(params)                                            # data parallel: the global gradient
    perturbation.on_accumulated_grad(model, optimizer)                     # e.g. MGPO's g_l (eq. 8)
    hooks.before_optimizer_step(model)                                     # e.g. AdaLoRA's regulariser
    grad_norm = clip(grads)                                                # norm before clipping
    if loss and grad_norm are finite:
        optimizer.step(); scheduler.step(); hooks.after_optimizer_step(...)
        optimizer.zero_grad(); perturbation.after_optimizer_step(...)

``train_step`` returns the step's ``metrics.parquet`` row (and per-layer rows when asked); a step
whose loss or gradient is not finite is not applied, and says so. In a data-parallel run
(``dynamics.distributed``) ``micro_batches`` are this process's shards, the loss is divided by the
step's global number of loss terms, and after the gradient sum every process holds the numbers one
process would: the row is the same on all of them.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from dynamics.adapters import AdapterHooks, adapter_hooks, layer_name
from dynamics.config import RunConfig
from dynamics.data import n_loss_terms
from dynamics.distributed import ONE_PROCESS, World
from dynamics.loss import step_loss_fn
from dynamics.perturbations import Perturbation, make_perturbation
from dynamics.tensors import global_norm
from dynamics.training.optim import make_optimizer, make_scheduler


@dataclass
class TrainState:
    """The objects an optimizer step updates, built for ``cfg`` around ``model``; with the loop's
    progress counters this is what a checkpoint holds."""

    cfg: RunConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch LRScheduler (transformers' LambdaLR)
    perturbation: Perturbation
    hooks: AdapterHooks
    params: list[torch.Tensor] = field(default_factory=list)  # trainable tensors, in model order
    layers: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # layer_name -> its trainable tensors
    world: World = field(default_factory=World)  # the processes of a data-parallel run

    @classmethod
    def create(cls, cfg: RunConfig, model: nn.Module, world: World = ONE_PROCESS) -> TrainState:
        optimizer = make_optimizer(cfg, model)
        layers: dict[str, list[torch.Tensor]] = {}
        params = []
        for name, p in model.named_parameters():
            if p.requires_grad:
                params.append(p)
                layers.setdefault(layer_name(name), []).append(p)
        return cls(cfg, model, optimizer, make_scheduler(cfg, optimizer),
                   make_perturbation(cfg, model, optimizer, world), adapter_hooks(cfg), params, layers, world)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler, perturbation and adapter state (``trainer_state.pt`` holds these
        beside the loop's progress and RNG states)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "perturbation": self.perturbation.state_dict(), "adapter": self.hooks.state_dict(self.model)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.perturbation.load_state_dict(state["perturbation"])
        self.hooks.load_state_dict(self.model, state["adapter"])


@dataclass
class StepResult:
    row: dict[str, Any]  # the metrics.parquet row, but for the loop's counters (tokens, epoch)
    layer_rows: list[dict[str, Any]]  # layers.parquet rows; empty unless asked for
    applied: bool  # False: the loss or gradient was not finite, the weights did not move
    tokens: int = 0  # non-padding input tokens of the step, over all processes


def train_step(state: TrainState, micro_batches: Sequence[dict[str, torch.Tensor]], step: int,
               layer_metrics: bool = False) -> StepResult:
    """Take optimizer step number ``step`` (1-based) on ``micro_batches`` (already on the device).

    The row holds ``step``, ``loss`` (the step's mean loss at the point the gradient was taken),
    ``loss_clean``, ``lr`` (used by this step), ``grad_norm`` (before clipping), the perturbation's
    numbers, with ``cfg.instrument`` the update / parameter / momentum norms, and ``step_time_s``,
    ``peak_mem_mb`` (this process's) and ``tokens_per_s`` (all processes' tokens) of this call.
    With ``layer_metrics`` the per-layer gradient norms (before clipping) and the perturbation's
    per-layer numbers.
    """
    cfg, model, perturbation, world = state.cfg, state.model, state.perturbation, state.world
    device = micro_batches[0]["input_ids"].device
    started = time.perf_counter()
    reset_peak_memory(device)
    lr = state.scheduler.get_last_lr()[0]

    n_terms, tokens = world.sum_ints([sum(n_loss_terms(b, cfg.task_kind) for b in micro_batches),
                                      sum(int(b["attention_mask"].sum()) for b in micro_batches)])
    loss_fn = step_loss_fn(cfg.task_kind, n_terms, autocast=device.type if cfg.autocast else None)
    loss = sum(perturbation.forward_backward(model, batch, loss_fn) for batch in micro_batches)
    world.sum_gradients(state.params)
    perturbation.on_accumulated_grad(model, state.optimizer)
    state.hooks.before_optimizer_step(model)
    layer_rows = _layer_rows(state.layers, perturbation, step) if layer_metrics else []
    grad_norm = clip_gradients(state.params, cfg.max_grad_norm)
    loss_value, grad_norm_value = torch.stack([loss.float(), grad_norm.float()]).tolist()  # one host sync

    numbers = perturbation.step_metrics()
    # each process's losses are its share of the step's (divided by the global term count): summed.
    # No loss_clean key: the loss is clean; a None value: not measured this step (null).
    loss_value, loss_clean = world.sum_floats([loss_value, numbers.pop("loss_clean", loss_value)])
    row: dict[str, Any] = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm_value,
                           "loss_clean": loss_clean, **numbers}
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
        state.optimizer.zero_grad(set_to_none=True)
        row["step_time_s"] = time.perf_counter() - started
        return StepResult(row, layer_rows, applied=False, tokens=tokens)

    before = [p.detach().clone() for p in state.params] if cfg.instrument else None  # for update_norm
    state.optimizer.step()
    state.scheduler.step()
    state.hooks.after_optimizer_step(model, step - 1)
    state.optimizer.zero_grad(set_to_none=True)
    perturbation.after_optimizer_step(model, state.optimizer)
    if before is not None:
        row.update(step_norms(state.params, before, state.optimizer))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    row["step_time_s"] = time.perf_counter() - started
    row["peak_mem_mb"] = peak_memory_mb(device)
    row["tokens_per_s"] = tokens / row["step_time_s"]
    return StepResult(row, layer_rows, applied=True, tokens=tokens)


def clip_gradients(params: Sequence[torch.Tensor], max_grad_norm: float) -> torch.Tensor:
    """The global gradient norm before clipping (0-d); clips to ``max_grad_norm`` when it is > 0."""
    if max_grad_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    return global_norm([p.grad for p in params if p.grad is not None])


# --- instrumentation -------------------------------------------------------------------------------
def momentum_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [s["exp_avg"] for s in optimizer.state.values() if "exp_avg" in s]


def step_norms(params: Sequence[torch.Tensor], before: Sequence[torch.Tensor], optimizer) -> dict[str, float]:
    """``update_norm`` = ||theta_t - theta_{t-1}||, ``param_norm`` = ||theta_t||, ``momentum_norm``
    = ||exp_avg|| (AdamW's first moment), global L2 norms over the trainable parameters; one sync."""
    deltas = torch._foreach_sub(list(before), [p.detach() for p in params])
    norms = torch.stack([global_norm(deltas), global_norm(params), global_norm(momentum_tensors(optimizer))]).tolist()
    return dict(zip(("update_norm", "param_norm", "momentum_norm"), norms))


def _layer_rows(layers: dict[str, list[torch.Tensor]], perturbation: Perturbation, step: int) -> list[dict[str, Any]]:
    per_layer_perturbation = perturbation.layer_metrics()  # keyed by the same layer_name
    names = list(layers)
    grad_norms = torch.stack([
        global_norm([p.grad for p in layers[name] if p.grad is not None] or [torch.zeros(1)]) for name in names
    ]).tolist()
    return [{"step": step, "layer": name, "grad_norm": norm, **per_layer_perturbation.get(name, {})}
            for name, norm in zip(names, grad_norms)]


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's allocator statistics, or on Linux the process's
    resident-set high-water mark (``/proc/self/clear_refs``, value 5)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then covers the whole process lifetime


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since ``reset_peak_memory``: CUDA allocations on a GPU, resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
