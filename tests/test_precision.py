"""Numerics and memory options: bf16 autocast (fp32 trainable weights), gradient checkpointing
(same numbers, fewer activations kept), and the step's throughput column."""

import numpy as np
import pytest
import torch
from helpers import assert_expected

import dynamics
from dynamics.config import RunConfig
from dynamics.data import load_task
from dynamics.training.data_order import DataOrder


@pytest.mark.parametrize("method", ["lora", "lora+mgpo", "lora+sam", "lora+noise", "full"])
def test_gradient_checkpointing_changes_no_number(tiny, method):
    plain = dynamics.train(tiny(method=method, run_id="plain", steps=6))
    recomputed = dynamics.train(tiny(method=method, run_id="checkpointed", steps=6, gradient_checkpointing=True))
    for column in ("loss", "loss_clean", "grad_norm", "perturb_norm"):
        assert_expected(recomputed.metrics[column].to_numpy(float), plain.metrics[column].to_numpy(float),
                        rtol=1e-6, atol=1e-9, equal_nan=True, msg=column)
    # a run-control setting: the same experiment, the same default run id
    assert RunConfig(**tiny(method=method, gradient_checkpointing=True)).default_run_id() == \
        RunConfig(**tiny(method=method)).default_run_id()


def test_gradient_checkpointing_is_on_in_the_model(tiny):
    from dynamics.models import build_model

    model = build_model(RunConfig(**tiny(method="lora", gradient_checkpointing=True)))
    assert model.get_base_model().is_activation_checkpointing


def test_autocast_runs_matmuls_in_bf16_and_keeps_fp32_weights(tiny):
    plain = dynamics.train(tiny(method="lora", run_id="fp32", steps=6))
    mixed = dynamics.train(tiny(method="lora", run_id="mixed", steps=6, autocast=True))
    assert mixed.summary["status"] == "completed"
    a, b = mixed.metrics["loss"].to_numpy(), plain.metrics["loss"].to_numpy()
    assert np.isfinite(a).all()
    assert not np.array_equal(a, b)  # bf16 matmuls really ran
    assert_expected(a, b, rtol=2e-2, atol=0)  # ... and round to about bf16's 3 significant digits
    assert mixed.info["runtime"]["dtype"] == "float32"
    cfg = RunConfig(**tiny(method="lora", autocast=True))
    assert cfg.default_run_id() != RunConfig(**tiny(method="lora")).default_run_id()  # a different experiment


def test_autocast_forward_is_bf16_and_trainable_weights_fp32(tiny):
    from dynamics.loss import mixed_precision
    from dynamics.models import build_model

    model = build_model(RunConfig(**tiny(method="lora")))
    seen = []
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    with mixed_precision("cpu"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long))
    assert seen and seen[0] == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_tokens_per_s_is_the_steps_tokens_over_its_time(tiny):
    """The step's non-padding tokens, counted here from the examples it drew (their unpadded
    lengths: no collate, no attention mask), over its time; ``tokens`` is their running sum.
    16 examples and 6 steps of 4: the stream crosses into a second epoch."""
    settings = tiny(method="lora", steps=6, n_train=16)
    run = dynamics.train(settings)
    cfg = RunConfig(**settings)
    task = load_task(cfg)
    order = DataOrder(len(task.train), cfg.seed)
    per_step = cfg.batch_size * cfg.grad_accum
    step_tokens = np.array([sum(len(task.train[i]["input_ids"]) for i in order.indices(k * per_step, per_step))
                            for k in range(cfg.steps)])
    assert len(set(len(example["input_ids"]) for example in task.train)) > 1  # padding exists to be left out
    metrics = run.metrics
    np.testing.assert_array_equal(metrics["step"].to_numpy(), np.arange(1, cfg.steps + 1))
    np.testing.assert_array_equal(metrics["tokens"].to_numpy(), np.cumsum(step_tokens))
    assert_expected(metrics["tokens_per_s"], step_tokens / metrics["step_time_s"].to_numpy(), rtol=1e-9, atol=0)
