import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import assert_expected

import dynamics
from dynamics import runs
from dynamics.adapters import layer_name
from dynamics.config import ConfigError, RunConfig
from dynamics.data import TaskData
from dynamics.models import tiny_llama
from dynamics.training.data_order import DataOrder
from dynamics.training.evaluate import eval_mode, greedy_decode, macro_f1

METRIC_COLUMNS = ["step", "epoch", "tokens", "loss", "loss_clean", "lr", "grad_norm", "param_norm", "update_norm",
                  "momentum_norm", "grad_ema", "apn_scale", "perturb_norm", "step_time_s", "peak_mem_mb",
                  "tokens_per_s"]


def assert_same_losses(a: pd.DataFrame, b: pd.DataFrame) -> None:
    np.testing.assert_array_equal(a["step"].to_numpy(), b["step"].to_numpy())
    np.testing.assert_array_equal(a["loss"].to_numpy(), b["loss"].to_numpy())  # bit-identical


def test_run_folder_holds_every_file_and_column(tiny):
    run = dynamics.train(tiny(method="lora", steps=12))
    assert run.summary["status"] == "completed" and run.summary["steps_done"] == 12
    assert list(run.metrics.columns) == METRIC_COLUMNS
    assert run.metrics["step"].tolist() == list(range(1, 13))
    assert run.metrics[["loss", "grad_norm", "param_norm", "update_norm", "momentum_norm"]].notna().all().all()
    assert run.metrics[["grad_ema", "apn_scale", "perturb_norm"]].isna().all().all()  # no perturbation
    assert (run.metrics["loss_clean"] == run.metrics["loss"]).all()
    assert run.metrics["tokens"].is_monotonic_increasing and run.metrics["epoch"].iloc[-1] == 12 * 4 / 64
    assert run.evals["step"].tolist() == [0, 6, 12]
    assert run.evals["exact_match"].between(0, 1).all() and run.evals["accuracy"].isna().all()
    assert set(run.layers["step"]) == {3, 6, 9, 12}
    assert run.layers["layer"].iloc[0] == "model.layers.0.self_attn.q_proj"
    assert [p.name for p in run.checkpoints] == ["step_6", "step_12"]
    assert (run.checkpoints[-1] / "adapter_model.safetensors").exists()
    stored = json.loads((run.path / "config.json").read_text())
    assert stored["config"]["mu"] == 0.8 and stored["config"]["rank"] == 8  # resolved settings
    assert {"python", "torch", "transformers", "peft", "dynamics"} <= set(stored["versions"])
    assert {"git_commit", "host", "started_at", "runtime", "cpu"} <= set(stored)
    assert stored["cpu"]["torch_capability"] and stored["cpu"]["cores"] >= 1
    assert stored["runtime"]["device"] == "cpu"
    # LoRA r = 8 on tiny-llama's 7 linear layers x 2 blocks: r (in + out) each, 4096 per block
    assert stored["runtime"]["trainable_params"] == 8192
    assert stored["runtime"]["total_params"] == sum(p.numel() for p in tiny_llama().parameters()) + 8192


def test_first_step_has_warmup_lr_and_schedule_is_cosine(tiny):
    run = dynamics.train(tiny(steps=100, eval_every=0, checkpoint_every=0, layer_metrics_every=0, n_eval=0))
    lr = run.metrics["lr"].to_numpy()
    warmup = math.ceil(0.03 * 100)
    assert lr[0] == 0.0
    assert_expected(lr[warmup], 3e-3, rtol=1e-6, atol=1e-12)
    progress = (np.arange(100) - warmup) / (100 - warmup)
    expected = 3e-3 * 0.5 * (1 + np.cos(np.pi * progress))
    assert_expected(lr[warmup:], expected[warmup:], rtol=1e-9, atol=0)


@pytest.mark.parametrize(("method", "lr"), [("full", 3e-3), ("lora", 3e-2)])
def test_loss_goes_down_on_the_tiny_task(tiny, method, lr):
    run = dynamics.train(tiny(method=method, lr=lr, steps=60, batch_size=16, n_train=512, eval_every=0))
    loss = run.metrics["loss"]
    assert loss.tail(10).mean() < 0.85 * loss.head(5).mean()
    assert run.evals["loss"].iloc[-1] < run.evals["loss"].iloc[0]


def test_gradient_accumulation_equals_one_big_batch(tiny):
    big = dynamics.train(tiny(batch_size=8, grad_accum=1, run_id="big", eval_every=0))
    accumulated = dynamics.train(tiny(batch_size=4, grad_accum=2, run_id="acc", eval_every=0))
    assert_expected(accumulated.metrics["loss"], big.metrics["loss"], rtol=2e-5, atol=1e-6)
    assert accumulated.metrics["tokens"].tolist() == big.metrics["tokens"].tolist()


def test_resume_after_a_crash_reproduces_every_loss(tiny, tmp_path):
    settings = tiny(method="lora", lr=3e-2, steps=12, checkpoint_every=4, keep_checkpoints=0, eval_every=4)
    reference = dynamics.train(settings)
    crashed = dynamics.train({**settings, "runs_dir": str(tmp_path / "crashed")})
    # As if killed at step 10: rows up to 12 had been flushed, the last checkpoint is step 4 ...
    for step in (8, 12):
        shutil.rmtree(runs.checkpoint_dir(crashed.path, step))
    runs.update_summary(crashed.path, status="running")
    resumed = dynamics.train({**settings, "runs_dir": str(tmp_path / "crashed"), "resume": True})
    assert resumed.summary["status"] == "completed"
    assert_same_losses(resumed.metrics, reference.metrics)  # ... no duplicate or missing step
    without_times = [c for c in reference.evals.columns if c != "eval_time_s"]
    pd.testing.assert_frame_equal(resumed.evals[without_times], reference.evals[without_times])
    assert resumed.layers["step"].value_counts().eq(resumed.layers["layer"].nunique()).all()


def test_a_run_killed_before_its_first_checkpoint_resumes_without_a_second_step_0_eval(tiny, tmp_path):
    settings = tiny(method="lora", lr=3e-2, steps=12, checkpoint_every=4, keep_checkpoints=0, eval_every=4)
    reference = dynamics.train(settings)
    crashed = dynamics.train({**settings, "runs_dir": str(tmp_path / "crashed")})
    # As if killed at step 3: every row flushed so far, no checkpoint yet
    for step in (4, 8, 12):
        shutil.rmtree(runs.checkpoint_dir(crashed.path, step))
    runs.update_summary(crashed.path, status="running")
    resumed = dynamics.train({**settings, "runs_dir": str(tmp_path / "crashed"), "resume": True})
    assert resumed.evals["step"].tolist() == [0, 4, 8, 12] == reference.evals["step"].tolist()
    assert_same_losses(resumed.metrics, reference.metrics)


def test_a_resume_cleans_what_a_killed_writer_left_and_nothing_else(tiny, tmp_path):
    settings = tiny(method="lora", lr=3e-2, steps=12, checkpoint_every=4, keep_checkpoints=0, eval_every=4)
    reference = dynamics.train(settings)
    crashed = dynamics.train({**settings, "runs_dir": str(tmp_path / "crashed")})
    path = crashed.path
    shutil.rmtree(runs.checkpoint_dir(path, 12))  # as if killed at step 11, with its litter:
    (path / ".summary.json.4242.0badcafe.tmp").write_text("{")  # half-written atomic writes
    (path / ".metrics.parquet.4242.deadbeef.tmp").write_bytes(b"PAR1")
    (path / "checkpoints" / ".step_12.ab_cd123").mkdir()  # a checkpoint being staged
    (path / "checkpoints" / "step_12").mkdir()  # a torn one: weights, no trainer state
    shutil.copy(runs.checkpoint_dir(path, 8) / "adapter_model.safetensors", path / "checkpoints" / "step_12")
    (path / "notes.txt").write_text("mine")  # not ours to remove
    runs.update_summary(path, status="running")
    resumed = dynamics.train({**settings, "runs_dir": str(tmp_path / "crashed"), "resume": True})
    assert_same_losses(resumed.metrics, reference.metrics)
    left = sorted(p.name for p in path.iterdir() if p.name.startswith("."))
    assert left == [".lock"] and (path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (path / "checkpoints").iterdir()) == ["step_12", "step_4", "step_8"]
    assert runs.checkpoint_steps(path) == [4, 8, 12]  # (a link among the litter: refused, test_hostile_files)


def test_resuming_a_finished_run_does_nothing(tiny):
    run = dynamics.train(tiny())
    before = run.metrics
    again = dynamics.train(tiny(resume=True))
    assert again.path == run.path
    pd.testing.assert_frame_equal(again.metrics, before)


def test_resume_refuses_different_settings(tiny):
    dynamics.train(tiny(run_id="fixed"))
    with pytest.raises(ConfigError, match=r"--resume fixed: settings differ from the stored run: --lr 0.003 -> 0.001"):
        dynamics.train(tiny(run_id="fixed", lr=1e-3, resume=True))


def test_existing_run_is_never_overwritten_silently(tiny):
    first = dynamics.train(tiny())
    stamp = (first.path / "metrics.parquet").stat().st_mtime_ns
    with pytest.raises(ConfigError, match="exists \\(status completed\\); pass --resume .* or --overwrite"):
        dynamics.train(tiny())
    assert (first.path / "metrics.parquet").stat().st_mtime_ns == stamp
    replaced = dynamics.train(tiny(overwrite=True, steps=6))
    assert replaced.summary["steps_done"] == 6 and len(replaced.metrics) == 6


def test_bad_input_writes_nothing(tmp_path):
    with pytest.raises(ConfigError):
        dynamics.train(dict(model="tiny-llama", task="tiny", rank=0, runs_dir=str(tmp_path / "runs")))
    with pytest.raises(ConfigError, match="--model no/such-model"):
        dynamics.train(dict(model="no/such-model", task="tiny", runs_dir=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()


def test_a_non_finite_loss_marks_the_run_diverged_and_keeps_the_log(tiny):
    run = dynamics.train(tiny(lr=1e5, max_grad_norm=0, steps=50, eval_every=0, checkpoint_every=0))
    metrics = run.metrics
    assert run.summary["status"] == "diverged"
    assert 1 < len(metrics) < 50 and metrics["step"].tolist() == list(range(1, len(metrics) + 1))
    last = metrics.iloc[-1]
    assert not (math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"]))
    assert metrics.iloc[:-1]["loss"].map(math.isfinite).all()


def test_an_error_mid_run_marks_it_failed_with_the_error_and_keeps_the_log(tiny, monkeypatch):
    import dynamics.training.step

    real_clip = dynamics.training.step.clip_gradients
    calls = []

    def clip_then_fail(params, max_grad_norm):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected failure")
        return real_clip(params, max_grad_norm)

    monkeypatch.setattr(dynamics.training.step, "clip_gradients", clip_then_fail)
    cfg = tiny(steps=10, eval_every=0, checkpoint_every=0)
    with pytest.raises(RuntimeError, match="injected failure"):
        dynamics.train(cfg)
    table = dynamics.load_runs(cfg["runs_dir"])
    assert table["status"].tolist() == ["failed"]
    (run_dir,) = Path(cfg["runs_dir"]).iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["error"] == "RuntimeError: injected failure" and summary["steps_done"] == 3
    assert pd.read_parquet(run_dir / "metrics.parquet")["step"].tolist() == [1, 2, 3]


def test_a_locked_run_cannot_be_trained_twice(tiny):
    run = dynamics.train(tiny(steps=6))
    runs.update_summary(run.path, status="interrupted")
    in_use = r"the run is in use by another process \(pid \d+ on "
    with runs.RunLock(run.path), pytest.raises(ConfigError, match=in_use):
        dynamics.train(tiny(steps=6, resume=True))


def test_keep_checkpoints_prunes_old_ones(tiny):
    run = dynamics.train(tiny(steps=12, checkpoint_every=2, keep_checkpoints=2))
    assert [p.name for p in run.checkpoints] == ["step_10", "step_12"]


def test_instrumentation_can_be_switched_off(tiny):
    run = dynamics.train(tiny(instrument=False))
    assert run.metrics[["update_norm", "param_norm", "momentum_norm"]].isna().all().all()
    assert run.metrics["grad_norm"].notna().all()


def test_update_norm_is_the_parameter_change(tiny):
    run = dynamics.train(tiny(steps=1, warmup_ratio=0.0, eval_every=0))
    initial = dynamics.models.tiny_llama(seed=0)
    after = dynamics.models.tiny_llama(seed=0)
    runs.load_weights(after, run.checkpoints[-1])
    with torch.no_grad():
        change = torch.cat([(a - b).double().flatten() for a, b in zip(after.parameters(), initial.parameters())])
        weights = torch.cat([p.double().flatten() for p in after.parameters()])
    # float32 norms of ~5e4 entries: agreement to 1e-4 relative
    assert_expected(run.metrics["update_norm"].iloc[0], float(change.norm()), rtol=1e-4, atol=1e-12)
    assert_expected(run.metrics["param_norm"].iloc[0], float(weights.norm()), rtol=1e-4, atol=1e-12)


def test_training_leaves_the_callers_rng_alone(tiny):
    state = torch.get_rng_state()
    dynamics.train(tiny(method="lora", lora_dropout=0.1, steps=4))
    assert torch.equal(torch.get_rng_state(), state)


def test_hugging_face_path_trains_from_a_local_folder(tmp_path, local_model_folder):
    run = dynamics.train(dict(model=str(local_model_folder), task="gsm", method="lora", steps=3, batch_size=2,
                              seq_len=512, n_train=8, n_eval=4, n_eval_generate=2, max_new_tokens=4,
                              eval_every=0, runs_dir=str(tmp_path / "runs"), progress=False))
    assert run.summary["status"] == "completed"
    assert run.evals["exact_match"].notna().all() and run.metrics["loss"].map(math.isfinite).all()


def test_data_order_is_stateless_and_covers_each_epoch():
    order = DataOrder(n_examples=10, seed=3)
    stream = order.indices(0, 30)
    assert DataOrder(10, 3).indices(7, 9) == stream[7:16]
    for epoch in range(3):
        assert sorted(stream[10 * epoch : 10 * epoch + 10]) == list(range(10))
    assert stream[:10] != stream[10:20]


def test_layer_names_strip_peft_wrappers():
    name = "base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"
    assert layer_name(name) == "model.layers.0.mlp.up_proj"
    assert layer_name("model.layers.1.self_attn.q_proj.weight") == "model.layers.1.self_attn.q_proj"
    assert layer_name("base_model.model.classifier.modules_to_save.default.bias") == "classifier"


def test_macro_f1_against_hand_computed_values():
    labels, predictions = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 2 fp 1 fn 0 -> 0.8; class 2: tp 0 fn 1 -> 0
    assert_expected(macro_f1(labels, predictions, 3), (0.5 + 0.8 + 0.0) / 3, rtol=1e-6, atol=1e-12)


def test_eval_mode_restores_training_flag():
    module = torch.nn.Linear(2, 2)
    with eval_mode(module):
        assert not module.training
    assert module.training


def test_load_runs_tables_every_run(tiny, tmp_path):
    dynamics.train(tiny(run_id="a"))
    dynamics.train(tiny(run_id="b", lr=1e-3))
    table = dynamics.load_runs(tmp_path / "runs")
    assert sorted(table["run_id"]) == ["a", "b"]
    assert set(table["status"]) == {"completed"} and table["final_loss"].notna().all()
    assert dynamics.load_runs(tmp_path / "nothing-here").empty


def test_config_object_and_dict_train_the_same_run(tiny, tmp_path):
    """``dynamics.train`` takes a RunConfig or a mapping (dashed keys too): the same settings give
    the same run id and the same numbers, bit for bit (a momentum method: every norm is logged)."""
    settings = tiny(method="lora+mgpo", steps=6, eval_every=3, runs_dir=str(tmp_path / "from_object"))
    from_object = dynamics.train(RunConfig(**settings))
    dashed = {key.replace("_", "-"): value for key, value in settings.items()}
    from_dict = dynamics.train({**dashed, "runs-dir": str(tmp_path / "from_dict")})
    assert from_object.summary["status"] == from_dict.summary["status"] == "completed"
    assert from_object.run_id == from_dict.run_id == RunConfig(**settings).default_run_id()
    assert from_dict.config == from_object.config | {"runs_dir": str(tmp_path / "from_dict")}
    numbers = ["step", "epoch", "tokens", "loss", "loss_clean", "lr", "grad_norm", "param_norm", "update_norm",
               "momentum_norm", "grad_ema", "apn_scale", "perturb_norm"]
    pd.testing.assert_frame_equal(from_dict.metrics[numbers], from_object.metrics[numbers], check_exact=True)
    without_times = [c for c in from_object.evals.columns if c != "eval_time_s"]
    pd.testing.assert_frame_equal(from_dict.evals[without_times], from_object.evals[without_times], check_exact=True)
    pd.testing.assert_frame_equal(from_dict.layers, from_object.layers, check_exact=True)


def test_bf16_keeps_base_weights_in_bf16_and_lora_in_fp32(tiny):
    from dynamics.models import build_model

    model = build_model(RunConfig(**tiny(method="lora", dtype="bf16")))
    assert {p.dtype for _, p in model.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for _, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    run = dynamics.train(tiny(method="lora", dtype="bf16", steps=4))
    assert run.summary["status"] == "completed" and run.info["runtime"]["dtype"] == "bfloat16"


def _prompts_of_different_lengths() -> dict[str, torch.Tensor]:
    """Four left-padded prompts of 2 to 9 token ids (3..127, never pad 0 or EOS 2)."""
    rng = torch.Generator().manual_seed(5)
    examples = [{"prompt_ids": torch.randint(3, 128, (n,), generator=rng).tolist()} for n in (9, 2, 5, 7)]
    return TaskData(name="t", kind="causal_lm", train=[], eval=[], pad_token_id=0).collate_prompts(examples)


def _greedy_without_cache(model, prompt_ids: list[int], n_tokens: int) -> list[int]:
    """Greedy decoding by definition: the whole unpadded sequence through the model at every step."""
    ids = list(prompt_ids)
    for _ in range(n_tokens):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


@torch.no_grad()
def test_batched_cached_greedy_decoding_equals_decoding_each_prompt_alone():
    model = tiny_llama(seed=0).double().eval()  # float64: padding and cache cannot flip an argmax
    prompts = _prompts_of_different_lengths()
    batched = greedy_decode(model, prompts, max_new_tokens=12, eos_token_id=None)
    for row, continuation in enumerate(batched):
        prompt_ids = prompts["input_ids"][row][prompts["attention_mask"][row].bool()].tolist()
        alone = {k: v[row : row + 1, -len(prompt_ids):] for k, v in prompts.items()}  # no padding
        assert continuation == greedy_decode(model, alone, 12, None)[0]
        assert continuation == _greedy_without_cache(model, prompt_ids, 12)


@torch.no_grad()
def test_greedy_decoding_stops_each_row_at_eos_and_ends_when_every_row_has():
    model = tiny_llama(seed=0).double().eval()
    prompts = _prompts_of_different_lengths()
    free = greedy_decode(model, prompts, max_new_tokens=12, eos_token_id=None)
    eos = max(range(128), key=lambda token: sum(token in row for row in free))  # emitted in the most rows
    finishing = [row for row, continuation in enumerate(free) if eos in continuation]
    assert 1 < len(finishing) < len(free)
    forwards = []
    handle = model.register_forward_hook(lambda module, args, output: forwards.append(1))
    try:
        stopped = greedy_decode(model, prompts, max_new_tokens=12, eos_token_id=eos)
        calls_all = len(forwards)
        only_finishing = greedy_decode(model, {k: v[finishing] for k, v in prompts.items()}, 12, eos)
        calls_finishing = len(forwards) - calls_all
    finally:
        handle.remove()
    for row, continuation in zip(free, stopped):
        assert continuation == (row[: row.index(eos) + 1] if eos in row else row)
    assert only_finishing == [stopped[row] for row in finishing]
    assert calls_all == 12  # a row without EOS runs to the budget: the prefill, then 11 steps
    assert calls_finishing == max(len(c) for c in only_finishing) < 12  # stops once every row has emitted EOS
