"""What a run needs before its first step: torch's threads, the model, task and device of its
config (``build_run``, everything that can fail on bad input, before the run folder is touched),
LoRA-GA's gradient estimate, and the ``runtime`` facts config.json records.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from dynamics import runs
from dynamics.adapters import LoraGASource
from dynamics.config import ConfigError, RunConfig
from dynamics.data import TaskData, load_task, n_loss_terms
from dynamics.distributed import ONE_PROCESS, World
from dynamics.files import first_line
from dynamics.loss import loss_sum, to_device
from dynamics.models import build_model, load_tokenizer, resolve_device, resolve_dtype
from dynamics.training.data_order import DataOrder


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` (0: leave torch's default) and restored after."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_run(cfg: RunConfig, plan: runs.RunPlan, world: World = ONE_PROCESS
           ) -> tuple[nn.Module, TaskData, torch.device, dict[str, float]]:
    """Model, task and device of ``cfg`` (a new run's folder is created only once they all load),
    and the seconds of one-off set-up worth recording (LoRA-GA's initialisation). In a
    data-parallel run each process builds the same model (LoRA-GA's gradient estimate included)
    and then takes process 0's weights, as DDP does, so they start bit-identical."""
    device = resolve_device(cfg)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    try:
        tokenizer = load_tokenizer(cfg)
    except (OSError, ValueError) as error:  # not found locally or on the hub, no network, no tokenizer files
        raise ConfigError(f"--model {cfg.model}: cannot load its tokenizer ({first_line(error)})") from error
    task = load_task(cfg, tokenizer)
    if not task.train:
        raise ConfigError(f"--seq-len {cfg.seq_len}: no --task {cfg.task} training example fits; raise it")
    loraga, estimate = None, None
    if cfg.adapter == "loraga" and plan.mode == "resume":
        try:
            loraga = runs.stored_initial_adapter(plan.run_dir, cfg)
        except runs.DamagedCheckpoint as error:
            raise ConfigError(f"--resume {plan.run_dir.name}: {error}; start the run again with --overwrite") from None
    elif cfg.adapter == "loraga":
        estimate = GradientEstimate(task, cfg, device)
        loraga = LoraGASource(gradient_step=estimate)
    try:
        model = build_model(cfg, num_labels=len(task.label_names) or None, loraga=loraga)
    except ConfigError:
        raise
    except (OSError, ValueError) as error:
        raise ConfigError(f"--model {cfg.model}: cannot load it ({first_line(error)})") from error
    world.broadcast_tensors([*model.parameters(), *model.buffers()])
    if estimate is None:
        return model, task, device, {}
    # the estimate's forward/backward passes, then peft's SVDs and offsets (until build_model returned)
    svd_s = time.perf_counter() - estimate.finished
    return model, task, device, {"loraga_gradient_s": round(estimate.seconds, 3), "loraga_svd_s": round(svd_s, 3),
                                 "adapter_init_s": round(estimate.seconds + svd_s, 3)}


class GradientEstimate:
    """LoRA-GA's gradient batches: the first ``loraga_batches`` batches of ``batch_size`` training
    examples in the run's own order (``DataOrder``; the batches steps 1, 2, ... then train on).
    Called with the base model, it runs forward and backward over each, the task loss as in
    training (mean per target token / example of the batch); peft sums the gradients of the
    target weights and divides by the number of batches. Records its wall time."""

    def __init__(self, task: TaskData, cfg: RunConfig, device: torch.device) -> None:
        self.task, self.cfg, self.device = task, cfg, device
        self.seconds = 0.0
        self.finished: float | None = None  # perf_counter() when the last backward returned

    def __call__(self, model: nn.Module) -> None:
        started = time.perf_counter()
        order = DataOrder(len(self.task.train), self.cfg.seed)
        kind = self.cfg.task_kind
        for k in range(self.cfg.loraga_batches):
            indices = order.indices(k * self.cfg.batch_size, self.cfg.batch_size)
            batch = to_device(self.task.collate([self.task.train[i] for i in indices]), self.device)
            with warnings.catch_warnings():  # peft's counting hooks on layers whose inputs need no grad: harmless
                warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
                (loss_sum(model, batch, kind) / max(n_loss_terms(batch, kind), 1)).backward()
        self.finished = time.perf_counter()
        self.seconds = self.finished - started


def runtime_info(cfg: RunConfig, model: nn.Module, task: TaskData, device: torch.device,
             world: World = ONE_PROCESS) -> dict[str, Any]:
    """Where and on what a new run trains (config.json's ``runtime``)."""
    dtype = resolve_dtype(cfg, device)
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "processes": world.size,
            "n_train": len(task.train), "n_eval": len(task.eval),
            # parameters of the model as trained (base + adapter; tied weights once)
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters()),
            **({"data": task.info} if task.info else {})}
