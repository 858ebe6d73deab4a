"""The training loop: one readable function, no Trainer subclass.

    config -> model + data -> loop (perturbation hooks) -> runs/<run_id>/*.parquet

Each optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` examples. The loss is the
mean over every target token of the whole step (causal LM) or every example (classification), so a
step with accumulation equals one big batch. Data order is a pure function of (seed, epoch), so a
resumed run draws exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import resource
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynamics import runs
from dynamics.config import ConfigError, RunConfig, as_config, warn_ineffective
from dynamics.data import IGNORE_INDEX, Example, TaskData, load_task, n_loss_terms
from dynamics.methods import make_perturbation
from dynamics.methods.adapters import adapter_hooks, make_optimizer
from dynamics.methods.base import global_norm
from dynamics.metrics import EVAL_SCHEMA, LAYERS_SCHEMA, METRICS_SCHEMA, SHARPNESS_SCHEMA, ParquetLog
from dynamics.models import build_model, load_tokenizer, resolve_device, resolve_dtype, trainable_parameters


# --- data order ----------------------------------------------------------------------------------
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


# --- loss ----------------------------------------------------------------------------------------
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


def step_loss_fn(kind: str, n_terms: int):
    """``loss_fn(model, micro_batch)``: that micro-batch's share of the step's mean loss."""

    def loss_fn(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return loss_sum(model, batch, kind) / n_terms

    return loss_fn


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# --- evaluation ------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, task: TaskData, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """Held-out loss (same units as training), plus accuracy and macro-F1 (classification) or
    exact-match by greedy decoding of the first ``n_eval_generate`` problems (causal LM)."""
    started = time.perf_counter()
    total, terms, predictions, labels = 0.0, 0, [], []
    with eval_mode(model):
        for start in range(0, len(task.eval), cfg.batch_size):
            batch = to_device(task.collate(task.eval[start : start + cfg.batch_size]), device)
            logits = forward_logits(model, batch, task.kind)  # one forward for the loss and the predictions
            total += float(cross_entropy_sum(logits, batch["labels"], task.kind))
            terms += n_loss_terms(batch, task.kind)
            if task.kind == "classification":
                predictions += logits.argmax(-1).tolist()
                labels += batch["labels"].tolist()
        row: dict[str, Any] = {"split": "eval", "loss": total / max(terms, 1), "n_examples": len(task.eval)}
        if task.kind == "classification":
            row["accuracy"] = float(np.mean(np.equal(predictions, labels)))
            row["macro_f1"] = macro_f1(labels, predictions, len(task.label_names))
        elif cfg.n_eval_generate and task.score_generation is not None:
            row["exact_match"] = exact_match(model, task, task.eval[: cfg.n_eval_generate], cfg, device)
    row["eval_time_s"] = time.perf_counter() - started
    return row


def macro_f1(labels: Sequence[int], predictions: Sequence[int], n_classes: int) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN); a class absent from both labels
    and predictions is skipped. (Five lines here rather than a scikit-learn dependency.)"""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    scores = []
    for c in range(n_classes):
        tp = np.sum((predictions == c) & (labels == c))
        denominator = 2 * tp + np.sum((predictions == c) & (labels != c)) + np.sum((predictions != c) & (labels == c))
        if denominator:
            scores.append(2 * tp / denominator)
    return float(np.mean(scores)) if scores else float("nan")


def exact_match(model, task: TaskData, examples: Sequence[Example], cfg: RunConfig, device) -> float:
    """Fraction of ``examples`` whose greedy continuation (at most ``max_new_tokens``, through the
    first EOS) ``task.score_generation`` accepts; prompts are decoded ``batch_size`` at a time."""
    correct = 0
    for start in range(0, len(examples), cfg.batch_size):
        chunk = examples[start : start + cfg.batch_size]
        prompts = to_device(task.collate_prompts(chunk), device)
        continuations = greedy_decode(model, prompts, cfg.max_new_tokens, task.eos_token_id)
        correct += sum(task.score_generation(ex, ids) for ex, ids in zip(chunk, continuations))
    return correct / len(examples)


@torch.no_grad()
def greedy_decode(model: nn.Module, prompts: Mapping[str, torch.Tensor], max_new_tokens: int,
                  eos_token_id: int | None) -> list[list[int]]:
    """Greedy (argmax) continuations of a batch of left-padded prompts, ``input_ids`` and
    ``attention_mask`` (B, T) as ``TaskData.collate_prompts`` makes them: for each row, the new
    token ids up to and including its first ``eos_token_id``, at most ``max_new_tokens`` of them.

    One forward over the prompts fills the KV cache (logits of the last position only), then each
    step feeds the B' unfinished rows' last token, (B', 1). Positions count real tokens only
    (``cumsum(mask) - 1``), so a row decodes as it would alone whatever its padding; a row that
    emits EOS leaves the batch with its cache rows, and decoding stops when no row is left. Plain
    argmax: nothing of the model's ``generation_config`` (repetition penalty, sampling) applies.
    """
    input_ids, attention_mask = prompts["input_ids"], prompts["attention_mask"]
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T); padding gets 0, masked anyway
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = inspect.signature(base.forward).parameters
    cache_name = "cache" if "cache" in accepted else "past_key_values"  # transformers >= 5.x renamed it
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                    **last_only)
    cache = outputs[cache_name]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)  # (B',): each batch row's prompt
    next_positions = positions[:, -1:] + 1  # (B', 1)
    continuations: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    for step in range(max_new_tokens):
        next_tokens = outputs.logits[:, -1, :].argmax(-1)  # (B',)
        for row, token in zip(rows.tolist(), next_tokens.tolist()):
            continuations[row].append(token)
        if step == max_new_tokens - 1:
            break
        if eos_token_id is not None:
            unfinished = (next_tokens != eos_token_id).nonzero().squeeze(1)
            if len(unfinished) == 0:
                break
            if len(unfinished) < len(rows):
                cache.batch_select_indices(unfinished)
                rows, next_tokens = rows[unfinished], next_tokens[unfinished]
                attention_mask, next_positions = attention_mask[unfinished], next_positions[unfinished]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)  # (B', T + step + 1)
        outputs = model(input_ids=next_tokens[:, None], attention_mask=attention_mask, position_ids=next_positions,
                        use_cache=True, **{cache_name: cache})
        next_positions = next_positions + 1
    return continuations


# --- instrumentation -------------------------------------------------------------------------------
def layer_name(param_name: str) -> str:
    """The module a trainable parameter belongs to, without peft's wrapper prefixes/suffixes:
    ``base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight`` -> ``model.layers.0.mlp.up_proj``."""
    name = param_name.removeprefix("base_model.model.")
    for marker in (".lora_A.", ".lora_B.", ".lora_magnitude_vector.", ".lora_E.", ".modules_to_save."):
        name = name.split(marker)[0]
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


def momentum_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [s["exp_avg"] for s in optimizer.state.values() if "exp_avg" in s]


def snapshot(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of the trainable parameters before the optimizer step (for ``update_norm``)."""
    return [p.detach().clone() for p in params]


def step_norms(params: Sequence[torch.Tensor], before: Sequence[torch.Tensor], optimizer) -> dict[str, float]:
    """``update_norm`` = ||theta_t - theta_{t-1}||, ``param_norm`` = ||theta_t||, ``momentum_norm``
    = ||exp_avg|| (AdamW's first moment), global L2 norms over the trainable parameters; one sync."""
    deltas = torch._foreach_sub(list(before), [p.detach() for p in params])
    norms = torch.stack([global_norm(deltas), global_norm(params), global_norm(momentum_tensors(optimizer))]).tolist()
    return dict(zip(("update_norm", "param_norm", "momentum_norm"), norms))


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


# --- interruption ------------------------------------------------------------------------------------
class StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks after each step (it then checkpoints and stops);
    a second Ctrl-C interrupts at once. Only installed in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# --- one optimizer step --------------------------------------------------------------------------
def accumulate_gradients(model: nn.Module, micro_batches: Sequence[dict[str, torch.Tensor]], kind: str,
                         perturbation, hooks, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Forward/backward over one step's micro-batches through the perturbation, then the per-step
    perturbation and adapter hooks. Returns the step's loss (0-d, detached); ``.grad`` holds the
    gradient of the step's mean loss."""
    loss_fn = step_loss_fn(kind, sum(n_loss_terms(b, kind) for b in micro_batches))
    loss = sum(perturbation.forward_backward(model, batch, loss_fn) for batch in micro_batches)
    perturbation.on_accumulated_grad(model, optimizer)
    hooks.before_optimizer_step(model)
    return loss


def clip_gradients(params: Sequence[torch.Tensor], max_grad_norm: float) -> torch.Tensor:
    """The global gradient norm before clipping (0-d); clips to ``max_grad_norm`` when it is > 0."""
    if max_grad_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    return global_norm([p.grad for p in params if p.grad is not None])


# --- setup -------------------------------------------------------------------------------------------
@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # non-padding input tokens seen
    examples: int = 0  # training examples seen
    wall_time_s: float = 0.0  # over all sessions of this run


def make_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    warmup_steps = math.ceil(cfg.warmup_ratio * cfg.steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=cfg.steps)


def checkpoint_state(progress: Progress, model, optimizer, scheduler, perturbation, hooks, device) -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {"progress": vars(progress).copy(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": rng, "perturbation": perturbation.state_dict(), "adapter": hooks.state_dict(model)}


def restore_state(state: dict[str, Any], model, optimizer, scheduler, perturbation, hooks, device) -> Progress:
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    perturbation.load_state_dict(state["perturbation"])
    hooks.load_state_dict(model, state["adapter"])
    return Progress(**state["progress"])


def _summary_numbers(metrics: ParquetLog, evals: ParquetLog) -> dict[str, Any]:
    numbers: dict[str, Any] = {}
    if len(metrics):
        last = metrics.table().slice(len(metrics) - 1).to_pylist()[0]
        numbers.update(final_loss=last["loss"], final_loss_clean=last["loss_clean"])
    if len(evals):
        rows = evals.table().to_pylist()
        keep = ("step", "loss", "accuracy", "macro_f1", "exact_match")
        numbers["final_eval"] = {k: rows[-1][k] for k in keep if rows[-1][k] is not None}
        best = min(rows, key=lambda r: r["loss"] if r["loss"] is not None and math.isfinite(r["loss"]) else math.inf)
        numbers["best_eval"] = {k: best[k] for k in keep if best[k] is not None}
    return numbers


# --- the loop ------------------------------------------------------------------------------------------
def train(config: RunConfig | Mapping[str, Any]) -> runs.Run:
    """Run (or resume) one instrumented training; returns the run folder as a ``Run``.

    The run ends ``completed``, ``diverged`` (non-finite loss or gradient: the step is not applied,
    everything logged so far is kept), ``interrupted`` (SIGINT/SIGTERM: a checkpoint is written) or
    ``failed`` (an exception, re-raised after the status is recorded). Bad settings raise
    ``ConfigError`` before anything is written.
    """
    requested = as_config(config)
    warn_ineffective(requested)
    cfg = requested.resolved()
    plan = runs.plan_run(cfg)
    if plan.mode == "done":
        return runs.load_run(plan.run_dir)

    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        # Everything that can fail on bad input happens before the run folder exists.
        device = resolve_device(cfg)
        dtype = resolve_dtype(cfg, device)
        try:
            tokenizer = load_tokenizer(cfg)
        except OSError as error:  # not found locally or on the hub, no network, no tokenizer files
            raise ConfigError(f"--model {cfg.model}: cannot load its tokenizer ({_first_line(error)})") from error
        task = load_task(cfg, tokenizer)
        if not task.train:
            raise ConfigError(f"--seq-len {cfg.seq_len}: no --task {cfg.task} training example fits; raise it")
        try:
            model = build_model(cfg, num_labels=len(task.label_names) or None)
        except OSError as error:
            raise ConfigError(f"--model {cfg.model}: cannot load it ({_first_line(error)})") from error
        if plan.mode == "new":
            runtime = {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
                       "threads": torch.get_num_threads(), "n_train": len(task.train), "n_eval": len(task.eval),
                       # parameters of the model as trained (base + adapter; tied weights once)
                       "trainable_params": sum(p.numel() for _, p in trainable_parameters(model)),
                       "total_params": sum(p.numel() for p in model.parameters())}
            runs.create_run_dir(cfg, runtime)
        with runs.RunLock(plan.run_dir):
            return _train_loop(cfg, plan, model, task, device)
    finally:
        torch.set_num_threads(previous_threads)


def _train_loop(cfg: RunConfig, plan: runs.RunPlan, model: nn.Module, task: TaskData, device) -> runs.Run:
    # Draws during training (dropout, noise) come from a fork of torch's RNG seeded by cfg.seed (or
    # restored from the checkpoint): reproducible, and the caller's RNG state is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        return _train_steps(cfg, plan, model, task, device)


def _train_steps(cfg: RunConfig, plan: runs.RunPlan, model: nn.Module, task: TaskData, device) -> runs.Run:
    from tqdm.auto import tqdm

    run_dir = plan.run_dir
    named_params = trainable_parameters(model)
    params = [p for _, p in named_params]
    layers: dict[str, list[torch.Tensor]] = {}
    for name, p in named_params:
        layers.setdefault(layer_name(name), []).append(p)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)
    perturbation = make_perturbation(cfg, model, optimizer)
    hooks = adapter_hooks(cfg)
    metrics = ParquetLog(run_dir / "metrics.parquet", METRICS_SCHEMA)
    layer_log = ParquetLog(run_dir / "layers.parquet", LAYERS_SCHEMA)
    evals = ParquetLog(run_dir / "eval.parquet", EVAL_SCHEMA)
    sharpness = ParquetLog(run_dir / "sharpness.parquet", SHARPNESS_SCHEMA)
    logs = (metrics, layer_log, evals, sharpness)

    progress = Progress()
    resume_from = runs.checkpoint_steps(run_dir)[-1] if plan.mode == "resume" and runs.checkpoint_steps(run_dir) else 0
    if resume_from:
        folder = runs.checkpoint_dir(run_dir, resume_from)
        runs.load_weights(model, folder)
        progress = restore_state(runs.load_trainer_state(folder), model, optimizer, scheduler, perturbation, hooks,
                                 device)
    for log in logs:
        log.load(keep_through_step=progress.step)  # drop rows logged after the checkpoint

    examples_per_step = cfg.batch_size * cfg.grad_accum
    order = DataOrder(len(task.train), cfg.seed)
    session_start = time.perf_counter()
    wall_before = progress.wall_time_s

    def save(status: str, **extra: Any) -> None:
        progress.wall_time_s = wall_before + time.perf_counter() - session_start
        for log in logs:
            log.flush()
        fields = {"error": None, **_summary_numbers(metrics, evals), **extra}  # extra may set the error
        runs.update_summary(run_dir, status=status, steps_done=progress.step, steps_total=cfg.steps,
                            wall_time_s=round(progress.wall_time_s, 3), **fields)

    def checkpoint() -> None:
        save("running")  # logs on disk cover every step up to the checkpoint before it exists
        with perturbation.unperturbed(model):
            state = checkpoint_state(progress, model, optimizer, scheduler, perturbation, hooks, device)
            runs.save_checkpoint(run_dir, progress.step, model, state, keep=cfg.keep_checkpoints)

    def run_eval() -> None:
        if cfg.n_eval and task.eval:
            bar.set_postfix_str("evaluating", refresh=True)
            with perturbation.unperturbed(model):
                evals.append({"step": progress.step, **evaluate(model, task, cfg, device)})

    def measure_sharpness() -> None:
        from dynamics.analyze import measure_sharpness as top_eigenvalues

        bar.set_postfix_str("sharpness", refresh=True)
        with perturbation.unperturbed(model):
            rows = top_eigenvalues(model, task, cfg, device, k=cfg.sharpness_k, n_batches=cfg.sharpness_batches,
                                   seed=cfg.seed, step=progress.step, source="training")
        for row in rows:
            sharpness.append(row)

    status = "running"
    model.train()
    bar = tqdm(total=cfg.steps, initial=progress.step, disable=not cfg.progress, unit="step",
               desc=run_dir.name, dynamic_ncols=True)
    try:
        with StopRequest() as stop:
            if progress.step == 0:
                run_eval()
                save("running")
            while progress.step < cfg.steps:
                step_started = time.perf_counter()
                reset_peak_memory(device)
                indices = order.indices(progress.examples, examples_per_step)
                micro_batches = [
                    to_device(task.collate([task.train[i] for i in indices[k : k + cfg.batch_size]]), device)
                    for k in range(0, examples_per_step, cfg.batch_size)
                ]
                lr = scheduler.get_last_lr()[0]
                loss = accumulate_gradients(model, micro_batches, task.kind, perturbation, hooks, optimizer)
                layer_rows = []
                if cfg.layer_metrics_every and (progress.step + 1) % cfg.layer_metrics_every == 0:
                    layer_rows = _layer_rows(layers, perturbation, progress.step + 1)  # before clipping
                grad_norm = clip_gradients(params, cfg.max_grad_norm)
                loss_value, grad_norm_value = torch.stack([loss.float(), grad_norm.float()]).tolist()

                row: dict[str, Any] = {"step": progress.step + 1, "loss": loss_value, "lr": lr,
                                       "grad_norm": grad_norm_value}
                pert_numbers = perturbation.step_metrics()
                row["loss_clean"] = pert_numbers.pop("loss_clean", loss_value)
                row.update(pert_numbers)
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
                    optimizer.zero_grad(set_to_none=True)
                    metrics.append({**row, "step_time_s": time.perf_counter() - step_started})
                    status = "diverged"
                    break

                before = snapshot(params) if cfg.instrument else None
                optimizer.step()
                scheduler.step()
                hooks.after_optimizer_step(model, progress.step)
                optimizer.zero_grad(set_to_none=True)
                perturbation.after_optimizer_step(model, optimizer)
                if cfg.instrument:
                    row.update(step_norms(params, before, optimizer))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                row["step_time_s"] = time.perf_counter() - step_started
                row["peak_mem_mb"] = peak_memory_mb(device)

                progress.step += 1
                progress.examples += examples_per_step
                progress.tokens += sum(int(b["attention_mask"].sum()) for b in micro_batches)
                row["tokens"] = progress.tokens
                row["epoch"] = progress.examples / len(task.train)
                metrics.append(row)
                for layer_row in layer_rows:
                    layer_log.append(layer_row)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)

                last_step = progress.step == cfg.steps
                if last_step or (cfg.eval_every and progress.step % cfg.eval_every == 0):
                    run_eval()
                if cfg.sharpness_every and progress.step % cfg.sharpness_every == 0:
                    measure_sharpness()
                if last_step or (cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0) or stop.requested:
                    checkpoint()
                if stop.requested and not last_step:
                    status = "interrupted"
                    break
            else:
                status = "completed"
    except KeyboardInterrupt:
        save("interrupted")
        raise
    except BaseException as error:
        save("failed", error=f"{type(error).__name__}: {error}")
        raise
    finally:
        bar.close()
    save(status)
    return runs.load_run(run_dir)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _layer_rows(layers: dict[str, list[torch.Tensor]], perturbation, step: int) -> list[dict[str, Any]]:
    per_layer_perturbation = perturbation.layer_metrics()
    names = list(layers)
    grad_norms = torch.stack([
        global_norm([p.grad for p in layers[name] if p.grad is not None] or [torch.zeros(1)]) for name in names
    ]).tolist()
    return [{"step": step, "layer": name, "grad_norm": norm, **per_layer_perturbation.get(name, {})}
            for name, norm in zip(names, grad_norms)]
