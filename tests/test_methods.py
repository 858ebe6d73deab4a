"""Perturbation methods and peft adapters: formulas against numpy, exactness, and behaviour."""

import itertools
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import assert_expected
from torch import nn

import dynamics
from dynamics import runs
from dynamics.adapters.layers import AdapterGroup, adapter_layers, group_layers
from dynamics.config import ConfigError, RunConfig
from dynamics.loss import step_loss_fn
from dynamics.models import build_model
from dynamics.perturbations import make_perturbation
from dynamics.perturbations.base import check_first_moment
from dynamics.perturbations.lora_fused import BACKWARD_WAYS, FORWARD_WAYS, cheapest_ways, fusable, perturbed_lora_layers
from dynamics.perturbations.mgpo import MGPO
from dynamics.perturbations.noise import NoiseDelta, ramp
from dynamics.perturbations.sam import SAM
from dynamics.perturbations.weight_space import LowRankDelta, LowRankSum, perturbed_base_layers
from dynamics.training.optim import make_optimizer

PERTURBED = ["lora+mgpo", "lora+mgpo-noapn", "lora+msam", "lora+sam", "lora+noise", "full+msam", "full+sam",
             "full+noise"]


def tiny_run(tiny, method, **overrides):
    lr = 3e-3 if method.startswith("full") else 3e-2
    return dynamics.train(tiny(method=method, lr=lr, rho=0.05, **overrides))


class SmallMLP(nn.Module):
    """Hand-sized model for formula checks: four Linear layers, two of one shape (so layers are
    grouped and share workspaces), (..., 5) -> (..., 3)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(5, 4)
        self.mid = nn.Linear(4, 4)
        self.mid2 = nn.Linear(4, 4)
        self.down = nn.Linear(4, 3)

    def forward(self, x):
        return self.down(torch.tanh(self.mid2(torch.tanh(self.mid(torch.tanh(self.up(x)))))))


def peft_model(adapter="lora", r=2, alpha=3.0, dtype=torch.float64):
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = SmallMLP().to(dtype)
    targets = ["up", "mid", "mid2", "down"]
    if adapter == "adalora":
        config = AdaLoraConfig(init_r=r, target_r=r, lora_alpha=alpha, target_modules=targets, total_step=10)
    else:
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=adapter == "rslora")
    model = get_peft_model(base, config)
    with torch.no_grad():  # non-zero B and E so that every term of the formulas is exercised
        for name, p in model.named_parameters():
            if any(f".lora_{role}." in name for role in "ABE"):
                p.copy_(torch.randn_like(p))
    return model


def numpy_params(layer):
    return {k: v.detach().numpy() for k, v in layer.parameters().items()}


def dense(delta: LowRankSum) -> torch.Tensor:
    """The (m, n) matrix a LowRankSum stands for."""
    return delta.scale * sum(U @ V for U, V in delta.pairs)


def change_along(layer, tangent) -> LowRankSum:
    """The layer's first-order change of DeltaW along ``tangent``, with its scale."""
    pairs = layer.change_pairs(tangent)
    return LowRankSum(pairs, AdapterGroup((layer,)).scales(pairs[0][0])[0])


@pytest.mark.parametrize("adapter", ["lora", "rslora", "adalora"])
def test_change_along_a_tangent_matches_numpy(adapter):
    model = peft_model(adapter)
    layer = adapter_layers(model)[0]
    p = numpy_params(layer)
    rng = np.random.default_rng(0)
    tangent = {k: rng.standard_normal(v.shape) for k, v in p.items()}
    change = change_along(layer, {k: torch.tensor(v) for k, v in tangent.items()})
    if adapter == "adalora":
        k = 3.0 / (2 + 1e-5)  # scaling alpha / (ranknum + 1e-5)
        expected = k * (tangent["B"] @ (p["A"] * p["E"]) + p["B"] @ (tangent["A"] * p["E"] + p["A"] * tangent["E"]))
    else:
        s = 3.0 / 2 if adapter == "lora" else 3.0 / math.sqrt(2)
        expected = s * (tangent["B"] @ p["A"] + p["B"] @ tangent["A"])
    assert_expected(dense(change).numpy(), expected, rtol=1e-12)  # float64 model: float64 factors
    norm, _ = AdapterGroup((layer,)).change_norms({k: torch.tensor(v)[None] for k, v in tangent.items()})
    assert_expected(float(norm[0]), np.linalg.norm(expected), rtol=1e-12)


@pytest.mark.parametrize("adapter", ["lora", "adalora"])
def test_group_change_norms_match_the_dense_changes_with_and_without_shared_grams(adapter):
    model = peft_model(adapter)
    group = max(group_layers(adapter_layers(model)), key=lambda g: len(g.layers))  # two layers of one shape
    generator = torch.Generator().manual_seed(0)
    tangents = [{role: torch.randn(t.shape, generator=generator, dtype=t.dtype)
                 for role, t in layer.parameters().items()} for layer in group.layers]
    expected = [np.linalg.norm(dense(change_along(layer, t)).numpy()) for layer, t in zip(group.layers, tangents)]

    norms, grams = group.change_norms(group.stacked(tangents))
    assert_expected(norms.numpy(), expected, rtol=1e-12)
    for _ in range(2):  # the returned grams serve any number of tangents at these parameters
        assert_expected(group.change_norms(group.stacked(tangents), grams)[0].numpy(), expected, rtol=1e-12)


def test_mgpo_perturbation_and_apn_match_the_equations():
    model = peft_model()
    layers = adapter_layers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.8, 0.999))
    mgpo = MGPO(layers, optimizer, rho=0.05, beta=0.8, apn=True, apn_cap=10.0, eps=1e-12, clean_loss_every=0)
    rng = np.random.default_rng(1)
    grads_by_step = []
    for _ in range(2):  # two accumulated gradients: g_ema takes the first as is, then the EMA
        grads = {id(p): rng.standard_normal(tuple(p.shape)) for p in params}
        for p in params:
            p.grad = torch.tensor(grads[id(p)])
        mgpo.on_accumulated_grad(model, optimizer)
        grads_by_step.append(grads)
    for layer in layers:
        p = numpy_params(layer)
        ids = {role: id(t) for role, t in layer.parameters().items()}
        norms = [np.linalg.norm(1.5 * (g[ids["B"]] @ p["A"] + p["B"] @ g[ids["A"]])) for g in grads_by_step]
        assert_expected(float(mgpo.grad_ema_by_layer()[layer.name]), 0.8 * norms[0] + 0.2 * norms[1],
                        rtol=1e-12, atol=0)
    optimizer.step()  # creates exp_avg
    mgpo.after_optimizer_step(model, optimizer)
    deltas = mgpo.step_deltas()
    for layer in layers:
        p = numpy_params(layer)
        m = {role: optimizer.state[t]["exp_avg"].numpy() for role, t in layer.parameters().items()}
        d = 1.5 * (m["B"] @ p["A"] + p["B"] @ m["A"])
        c = min(1 / (float(mgpo.grad_ema_by_layer()[layer.name]) + 1e-12), 10.0)
        expected = -0.05 * c * d / (np.linalg.norm(d) + 1e-12)
        assert_expected(dense(deltas[layer.name]).numpy(), expected, rtol=1e-10, atol=1e-14)
        assert_expected(np.linalg.norm(dense(deltas[layer.name]).numpy()), 0.05 * c, rtol=1e-10)
        row = mgpo.layer_metrics()[layer.name]  # the logged numbers are the ones applied
        assert_expected([row["apn_scale"], row["perturb_norm"]], [c, 0.05 * c], rtol=1e-10)


def test_apn_scale_is_capped():
    model = peft_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    mgpo = MGPO(adapter_layers(model), optimizer, rho=0.1, beta=0.9, apn=True, apn_cap=10.0, eps=1e-12,
                clean_loss_every=0)
    for p in params:
        p.grad = torch.full_like(p, 1e-6)  # tiny gradients: 1 / g_ema would be huge
    mgpo.on_accumulated_grad(model, optimizer)
    optimizer.step()
    mgpo.after_optimizer_step(model, optimizer)
    norms = [float(torch.linalg.matrix_norm(dense(d))) for d in mgpo.step_deltas().values()]
    assert_expected(norms, [0.1 * 10.0] * len(norms), rtol=1e-5)  # eps / ||d|| ~ 1e-6 here


def test_an_optimizer_without_first_moment_is_refused():
    with pytest.raises(ValueError, match="keeps no first moment"):
        check_first_moment(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), "lora+mgpo")
    with pytest.raises(ValueError, match="keeps no first moment"):
        check_first_moment(torch.optim.Adagrad([nn.Parameter(torch.zeros(1))]), "lora+mgpo")
    check_first_moment(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9), "lora+mgpo")


@pytest.mark.parametrize("form", ["thin", "sum"])
@pytest.mark.parametrize("application", ["dense", "lowrank", "auto"])
def test_perturbed_forward_and_backward_equal_the_materialised_weights(application, form):
    model = peft_model()
    layers = adapter_layers(model)
    rng = torch.Generator().manual_seed(3)

    def factors(layer, k):
        return (torch.randn(layer.base.out_features, k, generator=rng, dtype=torch.float64),
                torch.randn(k, layer.base.in_features, generator=rng, dtype=torch.float64))

    if form == "thin":
        deltas = {layer.name: LowRankSum((factors(layer, 4),), 0.1) for layer in layers}
    else:  # MGPO's form: two pairs and a 0-d tensor scale
        scale = torch.tensor(-0.1, dtype=torch.float64)
        deltas = {layer.name: LowRankSum((factors(layer, 2), factors(layer, 3)), scale) for layer in layers}
    x = torch.randn(2, 7, 5, generator=rng, dtype=torch.float64)
    weights_before = [layer.base.weight.clone() for layer in layers]

    with perturbed_base_layers({layer.base: LowRankDelta(deltas[layer.name]) for layer in layers}, application):
        out = model(x)
    grads = torch.autograd.grad(out.square().sum(), [p for p in model.parameters() if p.requires_grad])

    materialised = {f"{layer.name}.base_layer.weight".replace("base_model.model.", ""): layer.base.weight + dense(
        deltas[layer.name]) for layer in layers}
    inner = model.base_model.model
    expected_out = torch.func.functional_call(inner, materialised, (x,), strict=False)
    expected = torch.autograd.grad(expected_out.square().sum(), [p for p in model.parameters() if p.requires_grad])
    assert_expected(out, expected_out, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected):
        assert_expected(got, want, rtol=1e-12, atol=1e-12)
    for layer, before in zip(layers, weights_before):
        assert torch.equal(layer.base.weight, before)
        assert "forward" not in layer.base.__dict__


@pytest.mark.parametrize("ways", [None, *itertools.product(FORWARD_WAYS, BACKWARD_WAYS)])
def test_fused_lora_forward_and_gradients_equal_the_materialised_weights(ways):
    model = peft_model()
    layers = adapter_layers(model)
    rng = torch.Generator().manual_seed(4)
    deltas = {}
    for layer in layers:
        tangent = {role: torch.randn(p.shape, generator=rng, dtype=torch.float64)
                   for role, p in layer.parameters().items()}
        deltas[layer] = LowRankSum(layer.change_pairs(tangent), torch.tensor(-0.3, dtype=torch.float64))
    assert all(fusable(layer) for layer in layers)
    x = torch.randn(2, 7, 5, generator=rng, dtype=torch.float64)
    trainable = [p for p in model.parameters() if p.requires_grad]

    with perturbed_lora_layers(deltas, ways):
        out = model(x)
    grads = torch.autograd.grad(out.square().sum(), trainable)

    materialised = {f"{layer.name}.base_layer.weight": layer.base.weight + dense(delta)
                    for layer, delta in deltas.items()}
    expected_out = torch.func.functional_call(model.base_model.model, materialised, (x,), strict=False)
    expected = torch.autograd.grad(expected_out.square().sum(), trainable)
    assert_expected(out, expected_out, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected):
        assert_expected(got, want, rtol=1e-12, atol=1e-12)
    assert all("forward" not in layer.module.__dict__ for layer in layers)


def test_fused_ways_follow_the_multiply_add_count_on_smollm2_shapes():
    tokens = 8 * 128
    for m, n in [(576, 576), (192, 576), (1536, 576), (576, 1536)]:  # q/o, k/v, gate/up, down
        assert cheapest_ways(m, n, 8, tokens) == ("lowrank", "lowrank")
    assert cheapest_ways(576, 576, 128, tokens) == ("dense", "dense")  # 2mnr < T r (m + n)
    assert cheapest_ways(576, 1536, 128, tokens) == ("dense", "half")  # T m r < m n r when n > T


def test_fused_application_refuses_layers_it_cannot_fold():
    model = peft_model("adalora")
    layer = adapter_layers(model)[0]
    assert not fusable(layer)
    delta = LowRankSum(((torch.zeros(4, 2, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64)),) * 2)
    with pytest.raises(ValueError, match="not a plain LoRA layer"), perturbed_lora_layers({layer: delta}):
        pass
    assert "forward" not in layer.module.__dict__


def test_the_original_forward_comes_back_after_an_exception():
    model = peft_model()
    layer = adapter_layers(model)[0]
    zeros = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(1, 5, dtype=torch.float64))
    delta = LowRankDelta(LowRankSum((zeros,)))
    with pytest.raises(RuntimeError, match="boom"), perturbed_base_layers({layer.base: delta}):
        raise RuntimeError("boom")
    assert "forward" not in layer.base.__dict__


def test_sam_gradient_on_a_quadratic_is_the_closed_form():
    # L(theta) = 1/2 theta^T H theta - b^T theta;  SAM: g = H theta - b, e = rho g/||g||, grad at theta + e
    rng = np.random.default_rng(0)
    M = rng.standard_normal((6, 6))
    H, b, theta0 = M @ M.T + np.eye(6), rng.standard_normal(6), rng.standard_normal(6)
    theta = nn.Parameter(torch.tensor(theta0))
    H_t, b_t = torch.tensor(H), torch.tensor(b)

    def loss_fn(model, batch):
        return 0.5 * theta @ H_t @ theta - b_t @ theta

    sam = SAM([theta], rho=0.3)
    loss = sam.forward_backward(None, None, loss_fn)
    g = H @ theta0 - b
    e = 0.3 * g / np.linalg.norm(g)
    assert_expected(theta.grad.numpy(), H @ (theta0 + e) - b, rtol=1e-12)
    assert_expected(float(loss), 0.5 * (theta0 + e) @ H @ (theta0 + e) - b @ (theta0 + e), rtol=1e-12)
    assert_expected(sam.step_metrics()["loss_clean"], 0.5 * theta0 @ H @ theta0 - b @ theta0, rtol=1e-12)
    assert np.array_equal(theta.detach().numpy(), theta0)  # restored exactly


def test_sam_with_accumulation_adds_each_micro_batch_gradient():
    theta = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    targets = [torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([3.0, 1.0], dtype=torch.float64)]
    sam = SAM([theta], rho=0.0)
    for target in targets:
        sam.forward_backward(None, target, lambda model, t: ((theta - t) ** 2).sum())
    expected = sum(2 * (theta.detach() - t) for t in targets)
    assert_expected(theta.grad, expected, rtol=0, atol=0)


def test_noise_has_the_flat_lora_row_scale():
    weight = torch.randn(300, 50, dtype=torch.float64)
    sigma = 0.4 * 0.05 / math.sqrt(50) * torch.linalg.vector_norm(weight, dim=1)
    delta = NoiseDelta(sigma, seed=7)
    noise = delta.noise(torch.zeros(300, 50, dtype=torch.float64, requires_grad=False))
    assert_expected(noise, delta.noise(torch.zeros(300, 50, dtype=torch.float64)), rtol=0, atol=0)
    empirical = noise.std(dim=1) / sigma
    assert abs(float(empirical.mean()) - 1) < 0.03  # 300 rows x 50 draws
    assert ramp(0, 100) == 0
    assert ramp(100, 100) == 1
    assert_expected(ramp(50, 100), 0.5, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("method", ["lora+mgpo", "lora+mgpo-noapn", "lora+msam", "lora+sam", "lora+noise", "full+msam",
                                    "full+sam", "full+noise"])
def test_rho_zero_reproduces_the_unperturbed_losses_exactly(tiny, method):
    """At rho = 0 only SAM still takes its two passes; MGPO, Momentum-SAM and the noise return to
    the plain pass (nothing to perturb with): the tiny-rho test below runs their perturbed pass."""
    adapter = method.split("+")[0]
    plain = dynamics.train(tiny(method=adapter, lr=3e-2 if adapter == "lora" else 3e-3, run_id="plain"))
    zero = dynamics.train(tiny(method=method, lr=3e-2 if adapter == "lora" else 3e-3, rho=0.0, run_id="zero"))
    np.testing.assert_array_equal(zero.metrics["loss"].to_numpy(), plain.metrics["loss"].to_numpy())


TINY_RHO = 1e-12


@pytest.mark.parametrize("method", ["lora+mgpo", "lora+mgpo-noapn", "lora+msam", "lora+noise", "full+msam",
                                    "full+noise"])
def test_a_tiny_rho_runs_the_perturbed_pass_and_reproduces_the_unperturbed_losses(tiny, method):
    """rho = 1e-12 takes the perturbed pass from step 2 on (step 1: no momentum yet, the noise ramps
    up from 0) with a perturbation ~1e-12 of the weights, which moves the loss by ~1e-12 relative,
    far below float32's 6e-8: the other code path's float32 round-off is what is left (measured:
    at most 2e-7 relative over the 12 steps, 0 where the tiny step rounds away). rtol 1e-5 leaves
    50x of that; a perturbed pass that is wrong whatever rho is far off (measured: a clean-loss pass
    that leaks its gradient doubles grad_norm, as AdamW's losses hardly notice; a perturbed forward
    that drops one layer's adapter moves the loss by 3 %)."""
    adapter = method.split("+")[0]
    lr = 3e-2 if adapter == "lora" else 3e-3
    plain = dynamics.train(tiny(method=adapter, lr=lr, run_id="plain"))
    perturbed = dynamics.train(tiny(method=method, lr=lr, rho=TINY_RHO, run_id="tiny-rho"))
    perturb_norm = perturbed.metrics["perturb_norm"].iloc[1:]
    assert (perturb_norm > 0).all() and (perturb_norm < 100 * TINY_RHO).all()  # the perturbed pass ran
    for column in ("loss", "grad_norm"):
        assert_expected(perturbed.metrics[column], plain.metrics[column], rtol=1e-5, atol=0, msg=column)
    assert_expected(perturbed.evals["loss"], plain.evals["loss"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_mgpo_never_changes_the_frozen_weights(tiny, dtype):
    cfg = RunConfig(**tiny(method="lora+mgpo", rho=0.5, dtype=dtype))
    model = build_model(cfg)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    from dynamics.data import load_task

    task = load_task(cfg)
    optimizer = make_optimizer(cfg, model)
    mgpo = make_perturbation(cfg, model, optimizer)
    perturb_norms = []
    for step in range(100):
        batch = task.collate(task.train[(4 * step) % 60 : (4 * step) % 60 + 4])
        mgpo.forward_backward(model, batch, step_loss_fn("causal_lm", 20))
        mgpo.on_accumulated_grad(model, optimizer)
        perturb_norms.append(mgpo.step_metrics().get("perturb_norm"))
        optimizer.step()
        optimizer.zero_grad()
        mgpo.after_optimizer_step(model, optimizer)
    assert perturb_norms[0] is None and all(n > 0 for n in perturb_norms[1:])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name


@pytest.mark.parametrize("method", PERTURBED)
def test_every_perturbation_logs_its_quantities(tiny, method):
    run = tiny_run(tiny, method, steps=12, clean_loss_every=5)
    metrics = run.metrics
    assert run.summary["status"] == "completed"
    assert (metrics["perturb_norm"].iloc[1:] > 0).all()  # step 1 of mgpo/msam has no momentum yet
    perturbation = method.split("+")[1]
    if perturbation == "sam":
        assert metrics["loss_clean"].notna().all()  # free from the first pass
    else:
        assert metrics.loc[metrics["step"].isin([1, 6, 11]), "loss_clean"].notna().all()
        assert metrics.loc[metrics["step"].isin([3, 4, 8]), "loss_clean"].isna().all()
    if perturbation in ("mgpo", "mgpo-noapn"):
        assert metrics[["grad_ema", "apn_scale"]].iloc[1:].notna().all().all()
        assert (metrics["apn_scale"].iloc[1:] == 1.0).all() == (perturbation == "mgpo-noapn")
        layers = run.layers
        assert layers[["grad_ema", "apn_scale", "perturb_norm"]].notna().all().all()
        # the global norm is the root sum of squares of the per-layer norms
        last = layers[layers["step"] == 12]
        assert_expected(metrics["perturb_norm"].iloc[-1], float(np.sqrt((last["perturb_norm"] ** 2).sum())),
                        rtol=1e-6, atol=1e-12)
    else:
        assert metrics[["grad_ema", "apn_scale"]].isna().all().all()


@pytest.mark.parametrize("method", PERTURBED + ["adalora+mgpo", "dora+mgpo", "loraplus+noise", "rslora+msam",
                                                "pissa+sam", "adalora"])
def test_resume_is_bit_identical_for_every_method(tiny, tmp_path, method):
    settings = tiny(method=method, lr=3e-3 if method.startswith("full") else 3e-2, rho=0.05, steps=12,
                    checkpoint_every=4, keep_checkpoints=0, eval_every=0)
    resume_from = 4
    if method.startswith("adalora"):
        # resume after AdaLoRA's final rank allocation (step 24 of 30), when its pattern is fixed
        settings.update(steps=30, checkpoint_every=9)
        resume_from = 27
    reference = dynamics.train(settings)
    crashed = dynamics.train({**settings, "runs_dir": str(tmp_path / "crashed")})
    for step in runs.checkpoint_steps(crashed.path):
        if step > resume_from:
            shutil.rmtree(runs.checkpoint_dir(crashed.path, step))
    runs.update_summary(crashed.path, status="failed")
    resumed = dynamics.train({**settings, "runs_dir": str(tmp_path / "crashed"), "resume": True})
    columns = ["step", "loss", "loss_clean", "grad_norm", "perturb_norm", "grad_ema", "apn_scale"]
    pd.testing.assert_frame_equal(resumed.metrics[columns], reference.metrics[columns], check_exact=True)


@pytest.mark.parametrize("adapter", ["lora", "rslora", "dora", "pissa", "loraplus", "adalora"])
def test_each_adapter_trains_and_its_checkpoint_loads_in_peft(tiny, adapter):
    run = dynamics.train(tiny(method=adapter, lr=3e-2, steps=40, batch_size=16, n_train=256, eval_every=0))
    loss = run.metrics["loss"]
    assert loss.tail(5).mean() < 0.9 * loss.head(5).mean()
    cfg = RunConfig(**tiny(method=adapter))
    ours = build_model(cfg)
    runs.load_weights(ours, run.checkpoints[-1])
    x = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        logits = ours(input_ids=x).logits
    if adapter != "pissa":  # a PiSSA adapter is relative to the SVD residual of W0, which build_model recomputes
        from peft import PeftModel

        theirs = PeftModel.from_pretrained(dynamics.models.tiny_llama(seed=0), run.checkpoints[-1])
        with torch.no_grad():
            assert_expected(theirs(input_ids=x).logits, logits, rtol=1e-5, atol=1e-5)
    merged = build_model(cfg)  # peft's own merged forward of the same adapter
    runs.load_weights(merged, run.checkpoints[-1])
    with torch.no_grad():
        assert_expected(merged.merge_and_unload()(input_ids=x).logits, logits, rtol=1e-4, atol=1e-4)


def test_adalora_layers_are_perturbed_not_skipped(tiny):
    model = build_model(RunConfig(**tiny(method="adalora+mgpo")))
    layers = adapter_layers(model)
    assert layers and all(layer.is_adalora for layer in layers)
    assert len(layers) == 2 * 7  # every linear layer of the two blocks
    # ... and a run perturbs them: from step 2 on (step 1 has no momentum yet), every layer, every step
    run = tiny_run(tiny, "adalora+mgpo", steps=12)
    metrics = run.metrics
    assert run.summary["status"] == "completed"
    assert np.isnan(metrics["perturb_norm"].iloc[0]) and (metrics["perturb_norm"].iloc[1:] > 0).all()
    assert metrics[["grad_ema", "apn_scale"]].iloc[1:].notna().all().all()
    logged = run.layers[run.layers["step"] > 1]
    assert sorted(set(logged["step"])) == [3, 6, 9, 12]
    assert (logged.groupby("step")["layer"].nunique() == len(layers)).all()
    assert (logged["perturb_norm"] > 0).all() and logged[["grad_ema", "apn_scale"]].notna().all().all()
    last = logged[logged["step"] == 12]  # the global norm is the root sum of squares of the per-layer norms
    assert_expected(metrics["perturb_norm"].iloc[-1], float(np.sqrt((last["perturb_norm"] ** 2).sum())),
                    rtol=1e-6, atol=1e-12)


def test_lora_plus_gives_b_a_larger_learning_rate(tiny):
    cfg = RunConfig(**tiny(method="loraplus", loraplus_ratio=8))
    model = build_model(cfg)
    optimizer = make_optimizer(cfg, model)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            assert_expected(lr_of[id(p)], 8 * cfg.lr, rtol=1e-6, atol=1e-12)
        elif ".lora_A." in name:
            assert_expected(lr_of[id(p)], cfg.lr, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(("method", "message"), [
    ("full+mgpo", "--method full+mgpo: adapter full has no low-rank merged weight space for mgpo; use full+msam"),
    ("lora+magic", "--method lora+magic: perturbation must be one of mgpo, mgpo-noapn, msam, sam, noise"),
    ("qlora+mgpo", "--method qlora+mgpo: adapter must be one of full, lora, rslora, dora, pissa, loraplus, adalora"),
])
def test_combinations_that_make_no_sense_are_refused(method, message):
    with pytest.raises(ConfigError) as info:
        RunConfig(method=method)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("overrides", [dict(method="dora+mgpo"), dict(method="adalora+mgpo"),
                                       dict(method="lora+mgpo", lora_dropout=0.1)])
def test_fused_application_is_refused_where_it_cannot_fold(overrides):
    with pytest.raises(ConfigError, match="^--perturb-application fused: needs plain LoRA layers without dropout"):
        RunConfig(perturb_application="fused", **overrides)
    RunConfig(perturb_application="fused", method="rslora+mgpo")  # allowed
