"""Hessian eigenvalues, trace and spectral density against exact answers: quadratics whose
Hessian is a known matrix, a tiny MLP whose Hessian torch computes densely, finite differences
of the gradient, and PyHessian."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_expected

from dynamics.analysis import (
    HessianVectorProduct,
    gaussian_density,
    hessian_eigenvalues,
    hessian_trace,
    model_loss_fn,
    spectral_density,
)


def wishart(n, seed):
    """Seeded Wishart matrix G G^T / 2n, (n, n) float64; spectrum about (0.09, 2.9)."""
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(n, 2 * n, generator=generator, dtype=torch.float64)
    return factor @ factor.T / (2 * n)


def quadratic(matrix, seed=0, n_pieces=1):
    """loss_fn = 0.5 x^T M x with x split into ``n_pieces`` tensors; the Hessian is M."""
    generator = torch.Generator().manual_seed(seed)
    point = torch.randn(matrix.shape[0], generator=generator, dtype=torch.float64)
    pieces = [piece.clone().requires_grad_() for piece in point.chunk(n_pieces)]

    def loss_fn():
        x = torch.cat(pieces)
        return 0.5 * x @ matrix @ x

    return loss_fn, pieces


def exact_top(matrix, k):
    return np.linalg.eigvalsh(matrix.numpy())[::-1][:k].copy()


SIZES = [6 * 4, 6, 3 * 6, 3]


class TinyMLP:
    """4 -> 6 (tanh) -> 3 classifier on 16 fixed points; 51 parameters, deterministic."""

    def __init__(self, dtype=torch.float64, seed=0):
        generator = torch.Generator().manual_seed(seed)
        shapes = [(6, 4), (6,), (3, 6), (3,)]
        self.params = [
            (0.8 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype).requires_grad_()
            for shape in shapes
        ]
        self.inputs = torch.randn(16, 4, generator=generator, dtype=torch.float64).to(dtype)
        self.targets = torch.randint(0, 3, (16,), generator=generator)

    def loss_of(self, w1, b1, w2, b2):
        hidden = torch.tanh(self.inputs @ w1.T + b1)  # (16, 6)
        return F.cross_entropy(hidden @ w2.T + b2, self.targets)

    def loss_fn(self):
        return self.loss_of(*self.params)

    def exact_hessian(self):
        """(51, 51) float64 from torch.autograd.functional.hessian on the flat parameters."""
        sizes = [param.numel() for param in self.params]
        shapes = [param.shape for param in self.params]

        def flat_loss(flat):
            pieces = flat.split(sizes)
            return self.loss_of(*[piece.reshape(shape) for piece, shape in zip(pieces, shapes, strict=True)])

        flat = torch.cat([param.detach().reshape(-1) for param in self.params]).double()
        return torch.autograd.functional.hessian(flat_loss, flat)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_of_a_well_separated_quadratic(k):
    eigenvalues = torch.linspace(1.0, 10.0, 40, dtype=torch.float64) ** 2
    rotation, _ = torch.linalg.qr(torch.randn(40, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    matrix = rotation @ torch.diag(eigenvalues) @ rotation.T
    loss_fn, params = quadratic(matrix, n_pieces=3)

    result = hessian_eigenvalues(loss_fn, params, k=k)

    assert result.converged
    assert_expected(result.eigenvalues, exact_top(matrix, k), rtol=1e-3)
    assert np.all(np.diff(result.eigenvalues) <= 0)


def test_top_k_of_wishart_quadratics_over_start_seeds():
    """Krylov methods can converge late on an eigenvector nearly orthogonal to the start
    vector: measured on these matrices with k=3, tol=1e-3, 0-6 % of start seeds return
    lambda_4 in place of lambda_3 (it shows up 4-9 HVPs later). So: top-1 always, top-3 in
    at least 90 % of seeds, and with tol=1e-8 every seed to 1e-10."""
    matrix = wishart(60, seed=0)
    loss_fn, params = quadratic(matrix)
    exact = exact_top(matrix, 3)
    top3_accurate = []
    for seed in range(20):
        top1 = hessian_eigenvalues(loss_fn, params, k=1, seed=seed)
        assert_expected(top1.eigenvalues, exact[:1], rtol=1e-3)
        top3 = hessian_eigenvalues(loss_fn, params, k=3, seed=seed)
        top3_accurate.append(bool(np.all(np.abs(top3.eigenvalues - exact) <= 1e-3 * np.abs(exact))))
        tight = hessian_eigenvalues(loss_fn, params, k=3, tol=1e-8, seed=seed)
        assert tight.converged
        assert_expected(tight.eigenvalues, exact, rtol=1e-10)
    assert np.mean(top3_accurate) >= 0.9


def test_tolerance_bounds_the_ritz_residual_and_the_eigenvector():
    matrix = wishart(60, seed=2)
    loss_fn, params = quadratic(matrix)

    result = hessian_eigenvalues(loss_fn, params, k=2, tol=1e-6)

    assert np.all(result.residuals <= 1e-6 * np.abs(result.eigenvalues))
    for eigenvalue, eigenvector, residual in zip(
        result.eigenvalues, result.eigenvectors, result.residuals, strict=True
    ):
        true_residual = torch.linalg.vector_norm(matrix @ eigenvector - eigenvalue * eigenvector)
        assert_expected(true_residual, residual, rtol=1e-3, atol=1e-12)
        assert_expected(torch.linalg.vector_norm(eigenvector), 1.0, rtol=1e-12)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-3), (torch.float32, 1e-3)])
def test_top_k_of_a_tiny_mlp_against_its_dense_hessian(dtype, rtol):
    mlp = TinyMLP(dtype=dtype)
    exact = exact_top(TinyMLP(dtype=torch.float64).exact_hessian(), 3)

    result = hessian_eigenvalues(mlp.loss_fn, mlp.params, k=3)

    assert result.converged
    assert_expected(result.eigenvalues, exact, rtol=rtol)
    assert result.eigenvectors.dtype == torch.float64
    assert [piece.shape for piece in result.eigenvector_by_param(0)] == [param.shape for param in mlp.params]


def test_tiny_mlp_to_tight_tolerance_and_full_spectrum():
    mlp = TinyMLP()
    exact = np.linalg.eigvalsh(mlp.exact_hessian().numpy())[::-1]

    tight = hessian_eigenvalues(mlp.loss_fn, mlp.params, k=3, tol=1e-8)
    everything = hessian_eigenvalues(mlp.loss_fn, mlp.params, k=51, max_iter=51)

    assert_expected(tight.eigenvalues, exact[:3], rtol=1e-9)
    assert everything.converged and everything.n_hvp <= 51
    assert_expected(everything.eigenvalues, exact, rtol=1e-8, atol=1e-10)


def test_hessian_vector_product_matches_finite_differences_of_the_gradient():
    mlp = TinyMLP()
    direction = torch.randn(51, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    epsilon = 1e-5

    def gradient_at(shift):
        shifted = [
            (param.detach() + shift * piece.reshape(param.shape)).requires_grad_()
            for param, piece in zip(mlp.params, direction.split(SIZES), strict=True)
        ]
        gradients = torch.autograd.grad(mlp.loss_of(*shifted), shifted)
        return torch.cat([gradient.reshape(-1) for gradient in gradients])

    finite_difference = (gradient_at(epsilon) - gradient_at(-epsilon)) / (2 * epsilon)
    product = HessianVectorProduct(mlp.loss_fn, mlp.params)(direction)

    assert_expected(product, finite_difference, rtol=1e-6, atol=1e-9)


def test_repeated_eigenvalues_restart_the_krylov_space():
    loss_fn, params = quadratic(3.0 * torch.eye(10, dtype=torch.float64))

    result = hessian_eigenvalues(loss_fn, params, k=3)

    assert result.converged and result.n_hvp == 3
    assert_expected(result.eigenvalues, [3.0, 3.0, 3.0], rtol=1e-12)
    assert_expected(result.eigenvectors @ result.eigenvectors.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_parameters_the_loss_ignores_and_a_linear_loss_have_zero_curvature():
    weight = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    unused = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    curvature = torch.tensor([2.0, 6.0], dtype=torch.float64)

    linear = hessian_eigenvalues(lambda: weight.sum(), [weight], k=2)
    partial = hessian_eigenvalues(lambda: 0.5 * (curvature * weight**2).sum(), [weight, unused], k=3)

    assert_expected(linear.eigenvalues, [0.0, 0.0], rtol=0, atol=0)
    assert_expected(partial.eigenvalues, [6.0, 2.0, 0.0], rtol=1e-12, atol=1e-12)
    assert_expected(partial.eigenvectors[:2, 2:], torch.zeros(2, 3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_same_seed_same_answer_and_the_global_generator_is_untouched():
    mlp = TinyMLP()
    global_state = torch.random.get_rng_state()

    first = hessian_eigenvalues(mlp.loss_fn, mlp.params, k=2, seed=7)
    again = hessian_eigenvalues(mlp.loss_fn, mlp.params, k=2, seed=7)
    other = hessian_eigenvalues(mlp.loss_fn, mlp.params, k=2, seed=8)

    assert torch.equal(torch.random.get_rng_state(), global_state)
    np.testing.assert_array_equal(first.eigenvalues, again.eigenvalues)
    assert first.n_hvp == again.n_hvp
    assert not np.array_equal(first.eigenvalues, other.eigenvalues)
    assert_expected(first.eigenvalues, other.eigenvalues, rtol=1e-3)


class Interrupted(RuntimeError):
    pass


def test_parameters_and_grads_are_restored_after_an_exception_mid_run():
    mlp = TinyMLP()
    for param in mlp.params:
        param.grad = torch.full_like(param, 0.5)
    grads_before = [param.grad for param in mlp.params]
    values_before = [param.detach().clone() for param in mlp.params]
    backward_calls = []

    def interrupt_on_the_fourth_backward(gradient):
        backward_calls.append(1)
        if len(backward_calls) == 4:  # the gradient, then the third HVP
            raise Interrupted
        return gradient

    def loss_fn():
        hidden = mlp.params[0] * 1.0
        hidden.register_hook(interrupt_on_the_fourth_backward)
        mlp.params[1].grad.add_(1.0)  # a loss_fn that scribbles on .grad
        return mlp.loss_of(hidden, *mlp.params[1:])

    with pytest.raises(Interrupted):
        hessian_eigenvalues(loss_fn, mlp.params, k=2)

    assert len(backward_calls) == 4
    for param, value, grad in zip(mlp.params, values_before, grads_before, strict=True):
        assert torch.equal(param, value)
        assert param.grad is grad
        assert torch.equal(grad, torch.full_like(param, 0.5))


def test_parameters_are_restored_when_loss_fn_changes_them_and_raises():
    mlp = TinyMLP()
    values_before = [param.detach().clone() for param in mlp.params]

    def loss_fn():
        with torch.no_grad():
            mlp.params[2].mul_(3.0)
        raise Interrupted

    for estimate in (hessian_eigenvalues, hessian_trace, spectral_density):
        with pytest.raises(Interrupted):
            estimate(loss_fn, mlp.params)
        for param, value in zip(mlp.params, values_before, strict=True):
            assert torch.equal(param, value)
            assert param.grad is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 52}, "k=52: must be between 1 and the number of parameters, 51"),
        ({"k": 0}, "k=0"),
        ({"k": 3, "max_iter": 2}, "max_iter=2: must be at least k=3"),
        ({"tol": 0.0}, "tol=0.0: must be positive"),
    ],
)
def test_bad_settings_raise_one_line_value_errors(kwargs, message):
    mlp = TinyMLP()
    with pytest.raises(ValueError, match=message):
        hessian_eigenvalues(mlp.loss_fn, mlp.params, **kwargs)


def test_bad_params_and_losses_raise_one_line_value_errors():
    weight = torch.ones(3, requires_grad=True)
    frozen = torch.ones(2)
    with pytest.raises(ValueError, match=r"params\[1\] \(shape \(2,\)\) does not require grad"):
        hessian_eigenvalues(lambda: (weight**2).sum(), [weight, frozen])
    with pytest.raises(ValueError, match="params is empty"):
        hessian_eigenvalues(lambda: (weight**2).sum(), [])
    with pytest.raises(ValueError, match=r"non-finite loss \(nan\)"):
        hessian_eigenvalues(lambda: (weight**2).sum() * float("nan"), [weight])
    with pytest.raises(ValueError, match="scalar tensor, got a tensor of shape"):
        hessian_eigenvalues(lambda: weight**2, [weight])
    with pytest.raises(ValueError, match="does not depend on params"):
        hessian_eigenvalues(lambda: torch.ones(()), [weight])
    at_zero = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"gradient of loss_fn\(\) is not finite"):
        hessian_eigenvalues(lambda: at_zero.sqrt().sum(), [at_zero])  # infinite slope at 0
    with pytest.raises(ValueError, match="Hessian-vector product 1 is not finite"):
        hessian_eigenvalues(lambda: (at_zero.abs() ** 1.5).sum(), [at_zero])  # ... curvature


def test_hutchinson_trace_against_the_exact_trace():
    matrix = wishart(60, seed=4)
    loss_fn, params = quadratic(matrix)

    result = hessian_trace(loss_fn, params, n_samples=200, tol=0.0, seed=1)

    assert result.n_hvp == 200 and not result.converged
    assert abs(result.estimate - torch.trace(matrix).item()) <= 3 * result.standard_error
    # Rademacher variance: 2 sum_{i != j} M_ij^2 per sample.
    off_diagonal = matrix - torch.diag(torch.diag(matrix))
    expected_error = (2 * (off_diagonal**2).sum().item() / 200) ** 0.5
    assert_expected(result.standard_error, expected_error, rtol=0.2)


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_stops_early():
    diagonal = torch.linspace(-1.0, 4.0, 30, dtype=torch.float64)
    loss_fn, params = quadratic(torch.diag(diagonal))

    result = hessian_trace(loss_fn, params, n_samples=100, tol=1e-2)

    assert result.converged and result.n_hvp == 10
    assert_expected(result.estimate, diagonal.sum(), rtol=1e-12)
    assert result.standard_error == 0.0


def test_spectral_density_weights_nodes_and_first_moment():
    matrix = wishart(60, seed=5)
    loss_fn, params = quadratic(matrix)
    exact = np.linalg.eigvalsh(matrix.numpy())

    density = spectral_density(loss_fn, params, n_runs=8, n_steps=20, seed=2)

    assert density.n_hvp == 8 * 20 and density.nodes.shape == (160,)
    assert_expected(density.weights.sum(), 1.0, rtol=1e-12)
    assert np.all(density.weights >= 0)
    assert density.nodes.min() >= exact[0] - 1e-9 and density.nodes.max() <= exact[-1] + 1e-9
    # sum_j w_j theta_j averages v^T M v over the runs: about tr(M) / n.
    assert_expected(density.weights @ density.nodes, exact.mean(), rtol=0.05)


def test_spectral_density_with_a_full_krylov_space_is_the_exact_spectrum():
    matrix = wishart(12, seed=6)
    loss_fn, params = quadratic(matrix)
    exact = np.linalg.eigvalsh(matrix.numpy())

    density = spectral_density(loss_fn, params, n_runs=1, n_steps=50)
    grid = np.linspace(exact[0] - 1.0, exact[-1] + 1.0, 4001)
    smoothed = gaussian_density(density.nodes, density.weights, grid, sigma=0.05)

    assert density.n_hvp == 12
    assert_expected(np.sort(density.nodes), exact, rtol=1e-9, atol=1e-12)
    assert_expected(np.trapezoid(smoothed, grid), 1.0, rtol=1e-6)


def test_model_loss_fn_averages_batches_in_eval_mode_and_restores_modes():
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1)).double()
    model.train()
    model[2].eval()  # a mixed state that must survive
    batches = [torch.randn(5, 4, generator=generator, dtype=torch.float64) for _ in range(3)]

    loss_fn = model_loss_fn(model, iter(batches), lambda module, batch: module(batch).square().mean())
    first, second = loss_fn(), loss_fn()

    assert torch.equal(first, second)  # no dropout, same batches each call
    with torch.no_grad():
        model.eval()
        expected = torch.stack([model(batch).square().mean() for batch in batches]).mean()
    model.train()
    model[2].eval()
    assert_expected(first, expected, rtol=1e-14)
    assert [module.training for module in model] == [True, True, False]
    with pytest.raises(ValueError, match="batches is empty"):
        model_loss_fn(model, [], lambda module, batch: module(batch).sum())


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")  # PyHessian's
def test_top_eigenvalues_agree_with_pyhessian_on_a_tiny_model():
    from pyhessian import hessian as PyHessian

    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    inputs = torch.randn(64, 10, generator=generator)
    targets = torch.randint(0, 3, (64,), generator=generator)
    params = list(model.parameters())

    ours = hessian_eigenvalues(lambda: F.cross_entropy(model(inputs), targets), params, k=2)
    with torch.random.fork_rng():  # PyHessian draws from the global generator
        torch.manual_seed(0)
        analysis = PyHessian(model, torch.nn.CrossEntropyLoss(), data=(inputs, targets), cuda=False)
        theirs, _ = analysis.eigenvalues(top_n=2, tol=1e-6)
    for param in params:
        param.grad = None  # PyHessian leaves a gradient (with its graph) behind

    print("ours", ours.eigenvalues, ours.n_hvp, "PyHessian", theirs)
    assert_expected(ours.eigenvalues, sorted(theirs, reverse=True), rtol=0.01)
