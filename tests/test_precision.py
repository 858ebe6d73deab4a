"""Numerics and memory options: bf16 autocast (fp32 trainable weights), gradient checkpointing
(same numbers, fewer activations kept), and the step's throughput column."""

import numpy as np
import pytest
import torch

import dynamics
from dynamics.config import RunConfig


@pytest.mark.parametrize("method", ["lora", "lora+mgpo", "lora+sam", "lora+noise", "full"])
def test_gradient_checkpointing_changes_no_number(tiny, method):
    plain = dynamics.train(tiny(method=method, run_id="plain", steps=6))
    recomputed = dynamics.train(tiny(method=method, run_id="checkpointed", steps=6, gradient_checkpointing=True))
    for column in ("loss", "loss_clean", "grad_norm", "perturb_norm"):
        np.testing.assert_allclose(recomputed.metrics[column].to_numpy(float), plain.metrics[column].to_numpy(float),
                                   rtol=1e-6, atol=1e-9, err_msg=column)
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
    np.testing.assert_allclose(a, b, rtol=2e-2)  # ... and round to about bf16's 3 significant digits
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
    run = dynamics.train(tiny(method="lora", steps=4))
    metrics = run.metrics
    step_tokens = metrics["tokens"].diff().fillna(metrics["tokens"].iloc[0])
    np.testing.assert_allclose(metrics["tokens_per_s"], step_tokens / metrics["step_time_s"], rtol=1e-9)
