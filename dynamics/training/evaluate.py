"""Held-out evaluation during training: the eval loss (training's units), accuracy and macro-F1
for classification, exact match by greedy decoding for the generation tasks.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from dynamics.config import RunConfig
from dynamics.data import Example, TaskData, n_loss_terms
from dynamics.loss import cross_entropy_sum, forward_logits, mixed_precision, to_device


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
    with eval_mode(model), mixed_precision(device.type if cfg.autocast else None):
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
    rows = generations(model, task, examples, device, cfg.max_new_tokens, cfg.batch_size)
    return sum(row["correct"] for row in rows) / len(examples)


def generations(model, task: TaskData, examples: Sequence[Example], device, max_new_tokens: int,
                batch_size: int) -> list[dict[str, Any]]:
    """Greedy continuations of ``examples`` (``batch_size`` prompts at a time), one dict each in
    order: ``problem`` (position in ``examples``), ``reference`` (the scored answer as text),
    ``text`` (``task.decode``; the token ids where the task has no decoder), ``correct``
    (``task.score_generation``), ``n_new_tokens`` (EOS included) and ``stopped`` (ended with EOS)."""
    rows = []
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            prompts = to_device(task.collate_prompts(chunk), device)
            continuations = greedy_decode(model, prompts, max_new_tokens, task.eos_token_id)
            for offset, (example, ids) in enumerate(zip(chunk, continuations, strict=True)):
                answer = example.get("answer")  # gsm: the number as text; tiny: the token ids
                if isinstance(answer, list):
                    answer = " ".join(map(str, answer))
                rows.append({"problem": start + offset,
                             "reference": None if answer is None else str(answer),
                             "text": task.decode(ids) if task.decode else " ".join(map(str, ids)),
                             "correct": bool(task.score_generation(example, ids)),
                             "n_new_tokens": len(ids),
                             "stopped": bool(ids) and ids[-1] == task.eos_token_id})
    return rows


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
