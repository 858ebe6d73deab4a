"""Hessian sharpness of a loss from Hessian-vector products (HVPs): top eigenvalues (Lanczos),
trace (Hutchinson) and spectral density (stochastic Lanczos quadrature).

Everything works on any scalar ``loss_fn()`` that is twice differentiable in ``params`` (a
sequence of tensors), e.g. the mean loss of a LoRA model over fixed evaluation batches w.r.t.
its trainable A/B matrices (:func:`model_loss_fn` builds that ``loss_fn``).

The gradient ``g = dL/dparams`` is taken once with ``create_graph=True``; each HVP is then one
more backward pass, ``H v = d(g . v)/dparams`` (``torch.autograd.grad(g, params, v,
retain_graph=True)``). HVPs run on the parameters' device and dtype; the Lanczos and
quadrature arithmetic is float64. Random vectors come from a ``torch.Generator`` seeded with
``seed`` (on the CPU, so a seed gives the same vectors on every device), never from the
global generator. Parameter values and ``.grad`` are the same afterwards as before, even when
``loss_fn`` or a backward pass raises.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from dynamics.analysis.density import gaussian_density  # noqa: F401  (re-exported; numpy-only home)

LossFn = Callable[[], torch.Tensor]

# An exhausted Krylov space shows as a new Lanczos vector whose norm is at rounding level
# relative to the operator norm; float64 rounding is ~1e-16, so 1e-10 leaves room for noise.
BREAKDOWN_RELATIVE_NORM = 1e-10
# Hutchinson's standard error needs a few samples before it can be trusted as a stopping rule.
MIN_TRACE_SAMPLES = 10


@dataclass(frozen=True)
class HessianEigenResult:
    """Top-k Hessian eigenpairs from :func:`hessian_eigenvalues`.

    Vectors are flattened: parameter ``i`` occupies the next ``params[i].numel()`` entries, in
    the order of ``params``; :meth:`eigenvector_by_param` splits one back into their shapes.
    """

    eigenvalues: np.ndarray  # (k,) float64, largest first (algebraically)
    eigenvectors: torch.Tensor  # (k, n) float64 on the params' device, unit norm
    residuals: np.ndarray  # (k,) float64, ||H y_i - theta_i y_i||, in eigenvalue units
    n_hvp: int  # Hessian-vector products used (the one gradient not counted)
    converged: bool  # every residual <= tol * |eigenvalue|
    param_shapes: tuple[torch.Size, ...]

    def eigenvector_by_param(self, index: int) -> list[torch.Tensor]:
        """Eigenvector ``index`` split into tensors shaped like ``params``."""
        sizes = [math.prod(shape) for shape in self.param_shapes]
        pieces = self.eigenvectors[index].split(sizes)
        return [piece.reshape(shape) for piece, shape in zip(pieces, self.param_shapes, strict=True)]


@dataclass(frozen=True)
class HessianTraceResult:
    """Hutchinson estimate of ``tr(H)`` from :func:`hessian_trace`."""

    estimate: float  # mean of z^T H z over the samples
    standard_error: float  # std(z^T H z) / sqrt(n_samples); nan with one sample
    n_hvp: int  # one per sample
    converged: bool  # standard_error <= tol * |estimate| before running out of samples


@dataclass(frozen=True)
class SpectralDensityResult:
    """Eigenvalue density of H as a weighted set of nodes, from :func:`spectral_density`.

    ``density(lambda) ~= sum_j weights[j] * delta(lambda - nodes[j])``; the weights sum to 1.
    :func:`gaussian_density` smooths it onto a grid.
    """

    nodes: np.ndarray  # (n_runs * n_steps,) float64, Ritz values of every run
    weights: np.ndarray  # (n_runs * n_steps,) float64, >= 0, sum 1 (1 / n_runs per run)
    n_hvp: int
    probes: np.ndarray | None = None  # (n_runs * n_steps,) int64, the run (start vector) of each node


def hessian_eigenvalues(
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
) -> HessianEigenResult:
    """Top-k eigenvalues (largest algebraic) of the Hessian of ``loss_fn()`` w.r.t. ``params``.

    Lanczos with full re-orthogonalisation (Golub & Van Loan, *Matrix Computations*, sec. 10.1):
    from a seeded Gaussian ``q_1``, each iteration takes one HVP and extends an orthonormal
    basis ``Q_m = [q_1 .. q_m]`` and the tridiagonal ``T_m = Q_m^T H Q_m``::

        beta_j q_{j+1} = H q_j - alpha_j q_j - beta_{j-1} q_{j-1},   alpha_j = q_j^T H q_j,

    with ``q_{j+1}`` orthogonalised against all of ``Q_m`` twice (rounding otherwise brings
    back copies of converged eigenvalues). The Ritz pairs ``T_m s_i = theta_i s_i``,
    ``y_i = Q_m s_i`` have residual ``||H y_i - theta_i y_i|| = beta_m |s_i[m]|``; iteration
    stops once ``beta_m |s_i[m]| <= tol * |theta_i|`` for the top k, or after ``max_iter``
    HVPs. The eigenvalue error is then about ``residual^2 / gap`` (gap to the next eigenvalue),
    far below ``tol * |theta|`` when the top eigenvalues are separated. If the Krylov space
    closes before k Ritz values exist (fewer than k distinct eigenvalues in reach), it restarts
    from a new seeded vector orthogonal to ``Q_m``.

    :class:`LanczosIteration` says what no residual test can see (an eigenvector nearly orthogonal to
    the start vector shows late; a repeated eigenvalue shows once).

    Parameters
    ----------
    loss_fn : callable () -> torch.Tensor
        Returns a finite scalar, twice differentiable in ``params``. Called once.
    params : sequence of torch.Tensor
        Tensors with ``requires_grad=True``, on one device, floating dtype; ``n`` entries in
        all. Entries the loss does not depend on have zero Hessian rows.
    k : int
        Number of eigenvalues, ``1 <= k <= n``.
    tol : float
        Relative Ritz residual at which an eigenpair counts as converged. With float32
        parameters, HVP rounding (~1e-7 relative) bounds what can be reached.
    max_iter : int
        Most Lanczos iterations (= HVPs), ``>= k``; at most ``n`` are ever needed. Memory:
        the basis holds up to ``max_iter x n`` float64 numbers.
    seed : int
        Seeds the start vector (and restart vectors).

    Returns
    -------
    HessianEigenResult
        ``converged`` is False when ``max_iter`` ran out first; the values are then the best
        Ritz values found.

    Raises
    ------
    ValueError
        One line: bad ``k``/``tol``/``max_iter``, a parameter without ``requires_grad``, a loss
        that is not a finite scalar depending on ``params``, or a non-finite HVP.
    """
    params = _checked_params(params)
    n_entries = sum(param.numel() for param in params)
    _check_eigen_request(k, tol, max_iter, n_entries)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with preserved_params(params):
        hessian = HessianVectorProduct(loss_fn, params)
        start = _gaussian(n_entries, generator, hessian.device)
        lanczos = LanczosIteration(hessian, start, generator, max_size=min(max_iter, n_entries))
        ritz_values, ritz_coefficients, top, residuals, converged = _iterate_to_top(lanczos, k, tol)
        eigenvectors = torch.from_numpy(ritz_coefficients[:, top].T.copy()).to(hessian.device)
        return HessianEigenResult(
            eigenvalues=ritz_values[top],
            eigenvectors=eigenvectors @ lanczos.basis,
            residuals=residuals,
            n_hvp=hessian.n_hvp,
            converged=converged,
            param_shapes=tuple(param.shape for param in params),
        )


def _iterate_to_top(lanczos: LanczosIteration, k: int, tol: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """Lanczos steps until the top ``k`` Ritz pairs have relative residual ``<= tol`` or the basis
    is full: (Ritz values (m,), their coefficients (m, m), the top k indices, their residuals (k,),
    converged)."""
    while True:
        lanczos.step()
        ritz_values, ritz_coefficients = lanczos.ritz()
        top = np.argsort(ritz_values)[::-1][:k]
        residuals = lanczos.last_beta * np.abs(ritz_coefficients[-1, top])
        converged = top.size == k and bool(np.all(residuals <= tol * np.abs(ritz_values[top])))
        if converged or lanczos.size >= lanczos.max_size:
            return ritz_values, ritz_coefficients, top, residuals, converged


def _check_eigen_request(k: int, tol: float, max_iter: int, n_entries: int) -> None:
    """One-line ValueErrors for a request :func:`hessian_eigenvalues` cannot serve."""
    if not 1 <= k <= n_entries:
        raise ValueError(f"k={k}: must be between 1 and the number of parameters, {n_entries}")
    if max_iter < k:
        raise ValueError(f"max_iter={max_iter}: must be at least k={k}")
    if not tol > 0:
        raise ValueError(f"tol={tol}: must be positive")


def hessian_trace(
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    n_samples: int = 100,
    seed: int = 0,
    tol: float = 1e-2,
) -> HessianTraceResult:
    """Hutchinson's estimate of ``tr(H)``: the mean of ``z^T H z`` over Rademacher ``z``.

    ``E[z^T H z] = tr(H)`` for ``z`` with independent +-1 entries (Hutchinson 1990); its
    variance is ``2 sum_{i != j} H_ij^2``, so a diagonal H is exact from one sample.

    Parameters
    ----------
    loss_fn, params
        As in :func:`hessian_eigenvalues`.
    n_samples : int
        Most samples (= HVPs).
    seed : int
        Seeds the Rademacher vectors.
    tol : float
        Stop once ``standard_error <= tol * |estimate|`` (after at least 10 samples); 0 runs
        all ``n_samples``.

    Returns
    -------
    HessianTraceResult
    """
    params = _checked_params(params)
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples}: must be at least 1")
    if tol < 0:
        raise ValueError(f"tol={tol}: must be zero or positive")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    quadratic_forms: list[float] = []
    converged = False
    with preserved_params(params):
        hessian = HessianVectorProduct(loss_fn, params)
        while len(quadratic_forms) < n_samples:
            probe = _rademacher(hessian.size, generator, hessian.device)
            quadratic_forms.append(float(probe @ hessian(probe)))
            estimate = float(np.mean(quadratic_forms))
            standard_error = _standard_error(quadratic_forms)
            if len(quadratic_forms) >= MIN_TRACE_SAMPLES and standard_error <= tol * abs(estimate):
                converged = True
                break
    return HessianTraceResult(estimate, standard_error, hessian.n_hvp, converged)


def spectral_density(
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    n_runs: int = 10,
    n_steps: int = 50,
    seed: int = 0,
) -> SpectralDensityResult:
    """Eigenvalue density of H by stochastic Lanczos quadrature (Ghorbani et al., ICML 2019).

    For a unit vector ``v``, ``v^T f(H) v = sum_i (v^T u_i)^2 f(lambda_i)``, and ``n_steps``
    Lanczos steps from ``v`` give the Gauss quadrature of that sum: nodes ``theta_j`` (Ritz
    values of ``T``) and weights ``tau_j = s_j[1]^2`` (first components of its eigenvectors).
    Averaging over ``n_runs`` normalised Rademacher ``v`` (``E[v v^T] = I / n``) gives the
    density ``(1/n) sum_i delta(lambda - lambda_i) ~= (1/n_runs) sum_runs sum_j tau_j
    delta(lambda - theta_j)``. Costs ``n_runs * n_steps`` HVPs; a run stops early, exactly,
    when its Krylov space closes.

    Parameters
    ----------
    loss_fn, params
        As in :func:`hessian_eigenvalues`.
    n_runs : int
        Random start vectors.
    n_steps : int
        Lanczos steps (= quadrature nodes) per run; capped at the number of parameters.
    seed : int
        Seeds the start vectors.

    Returns
    -------
    SpectralDensityResult
        Nodes lie within ``[lambda_min, lambda_max]`` of H.
    """
    params = _checked_params(params)
    if n_runs < 1 or n_steps < 1:
        raise ValueError(f"n_runs={n_runs}, n_steps={n_steps}: both must be at least 1")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    nodes, weights, probes = [], [], []
    with preserved_params(params):
        hessian = HessianVectorProduct(loss_fn, params)
        for probe in range(n_runs):
            start = _rademacher(hessian.size, generator, hessian.device)
            lanczos = LanczosIteration(hessian, start, generator, max_size=min(n_steps, hessian.size))
            while lanczos.size < min(n_steps, hessian.size) and not lanczos.exhausted:
                lanczos.step()
            ritz_values, ritz_coefficients = lanczos.ritz()
            nodes.append(ritz_values)
            weights.append(ritz_coefficients[0] ** 2 / n_runs)
            probes.append(np.full(ritz_values.size, probe, dtype=np.int64))
    return SpectralDensityResult(np.concatenate(nodes), np.concatenate(weights), hessian.n_hvp, np.concatenate(probes))


def model_loss_fn(
    model: torch.nn.Module,
    batches: Iterable[Any],
    compute_loss: Callable[[torch.nn.Module, Any], torch.Tensor],
) -> LossFn:
    """A ``loss_fn`` for the functions above: the mean of ``compute_loss(model, batch)``.

    The batches are fixed (kept in a list), so every call sees the same data, and the model
    runs in eval mode (no dropout); each module's train/eval mode is restored afterwards.
    Pair it with the trainable parameters, e.g.
    ``params = [p for p in model.parameters() if p.requires_grad]`` (LoRA A/B under peft).
    All batches' activations stay in memory while the HVPs reuse the gradient graph.
    """
    fixed_batches = list(batches)
    if not fixed_batches:
        raise ValueError("batches is empty: need at least one batch to evaluate the loss on")

    def loss_fn() -> torch.Tensor:
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            return torch.stack([compute_loss(model, batch) for batch in fixed_batches]).mean()
        finally:
            for module, training in modes:
                module.training = training

    return loss_fn


class HessianVectorProduct:
    """The matrix-free Hessian operator ``v -> H v`` of ``loss_fn()`` w.r.t. ``params``, on flat
    float64 vectors of length ``size`` (the parameters' entries in order, each flattened),
    counting calls in ``n_hvp``. ``loss_fn`` is called once, here; the parameters must stay as
    they are while the operator is used (wrap it in :func:`preserved_params` to be safe).

    The gradient graph is built once; each product is one more backward pass through it.
    Measured against rebuilding it (forward + backward + double backward) per product in
    ``benchmarks/sharpness.py``: reusing is faster on both the tiny MLP and SmolLM2-LoRA.
    """

    def __init__(self, loss_fn: LossFn, params: list[torch.Tensor]) -> None:
        loss = loss_fn()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn() must return a scalar tensor, got {_describe(loss)}")
        if not torch.isfinite(loss):
            raise ValueError(f"loss_fn() returned a non-finite loss ({loss.item()})")
        if not loss.requires_grad:
            raise ValueError("loss_fn() returned a loss that does not depend on params")
        gradients = torch.autograd.grad(loss.reshape(()), params, create_graph=True, allow_unused=True)
        if all(gradient is None for gradient in gradients):
            raise ValueError("loss_fn() returned a loss that does not depend on params")
        if not all(torch.isfinite(gradient).all() for gradient in gradients if gradient is not None):
            raise ValueError("the gradient of loss_fn() is not finite")
        # A gradient without a graph is constant in params: its Hessian block is zero.
        self._differentiable = [
            index for index, gradient in enumerate(gradients) if gradient is not None and gradient.requires_grad
        ]
        self._gradients = [gradients[index] for index in self._differentiable]
        self._params = params
        self._sizes = [param.numel() for param in params]
        self.size = sum(self._sizes)
        self.device = params[0].device
        self.n_hvp = 0

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        self.n_hvp += 1
        if not self._gradients:
            return torch.zeros_like(vector)
        pieces = vector.split(self._sizes)
        directions = [
            pieces[index].reshape(self._params[index].shape).to(self._params[index].dtype)
            for index in self._differentiable
        ]
        products = torch.autograd.grad(
            self._gradients,
            self._params,
            grad_outputs=directions,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        flat = torch.cat([product.reshape(-1).to(torch.float64) for product in products])
        if not torch.isfinite(flat).all():
            raise ValueError(f"Hessian-vector product {self.n_hvp} is not finite")
        return flat


class LanczosIteration:
    """Lanczos tridiagonalisation with full re-orthogonalisation, float64, one HVP per step.

    Two limits of any single-vector Krylov method, which no residual test can see: an
    eigenvector almost orthogonal to the start vector shows up late, so a Ritz value may settle
    on ``lambda_{i+1}`` before ``lambda_i`` appears (measured on 60 x 60 Wishart matrices, k=3,
    tol=1e-3: in 0-6 % of seeds, fixed 4-9 HVPs later; a smaller ``tol`` or a second ``seed``
    guards against it); and an exactly repeated eigenvalue appears once unless the space closes
    before k values are found.
    """

    def __init__(
        self,
        hessian: HessianVectorProduct,
        start: torch.Tensor,
        generator: torch.Generator,
        max_size: int,
    ) -> None:
        self._hessian = hessian
        self._generator = generator
        self.max_size = max_size  # most basis vectors ever needed: caps the doubling below
        self._basis = torch.empty(
            (min(16, max_size), hessian.size), dtype=torch.float64, device=hessian.device
        )  # rows q_1 .. q_m, grown by doubling
        self._n_vectors = 0
        self._alphas: list[float] = []
        self._betas: list[float] = []  # beta_j couples q_j and q_{j+1}; the last is the residual
        self._next = start / torch.linalg.vector_norm(start)
        self.exhausted = False  # the last step closed the Krylov space (beta ~ 0)

    @property
    def size(self) -> int:
        return len(self._alphas)

    @property
    def basis(self) -> torch.Tensor:
        """(m, n) orthonormal rows."""
        return self._basis[: self._n_vectors]

    @property
    def last_beta(self) -> float:
        return self._betas[-1]

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenpairs of T_m: values (m,) ascending, vectors (m, m) as columns, float64."""
        return eigh_tridiagonal(np.array(self._alphas), np.array(self._betas[:-1]))

    def step(self) -> None:
        if self.exhausted:  # restart: a fresh direction orthogonal to the basis, coupling 0
            fresh = self._orthogonalised(_gaussian(self._hessian.size, self._generator, self._hessian.device))
            self._next = fresh / torch.linalg.vector_norm(fresh)
        self._append(self._next)
        current = self.basis[-1]
        product = self._hessian(current)
        alpha = float(current @ product)
        residual = product - alpha * current
        if self.size > 1:
            residual -= self._betas[-1] * self.basis[-2]
        residual = self._orthogonalised(residual)
        beta = float(torch.linalg.vector_norm(residual))
        self._alphas.append(alpha)
        operator_scale = max(abs(value) for value in self._alphas) + max(self._betas, default=0.0)
        self.exhausted = beta <= BREAKDOWN_RELATIVE_NORM * operator_scale or self.size == self._hessian.size
        self._betas.append(0.0 if self.exhausted else beta)
        if not self.exhausted:
            self._next = residual / beta

    def _orthogonalised(self, vector: torch.Tensor) -> torch.Tensor:
        """``vector`` minus its projection on the basis, twice ("twice is enough", Parlett)."""
        for _ in range(2):
            vector = vector - self.basis.T @ (self.basis @ vector)
        return vector

    def _append(self, vector: torch.Tensor) -> None:
        if self._n_vectors == len(self._basis):
            grown = torch.empty(
                (min(2 * len(self._basis), self.max_size), self._hessian.size),
                dtype=torch.float64,
                device=self._hessian.device,
            )
            grown[: self._n_vectors] = self._basis
            self._basis = grown
        self._basis[self._n_vectors] = vector
        self._n_vectors += 1


@contextlib.contextmanager
def preserved_params(params: list[torch.Tensor]) -> Iterator[None]:
    """Restore the values and ``.grad`` of ``params`` on exit, also after an exception."""
    saved_values = [param.detach().clone() for param in params]
    saved_grads = [
        (param.grad, None if param.grad is None else param.grad.detach().clone()) if param.is_leaf else (None, None)
        for param in params
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value, (grad, grad_value) in zip(params, saved_values, saved_grads, strict=True):
                if not torch.equal(param, value):
                    param.copy_(value)
                if param.is_leaf:
                    if grad is not None and not torch.equal(grad, grad_value):
                        grad.copy_(grad_value)
                    param.grad = grad


def _checked_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params is empty: need at least one tensor")
    for index, param in enumerate(params):
        if not isinstance(param, torch.Tensor):
            raise ValueError(f"params[{index}] is a {type(param).__name__}, not a torch.Tensor")
        if not param.requires_grad:
            raise ValueError(
                f"params[{index}] (shape {tuple(param.shape)}) does not require grad; pass only "
                f"tensors with requires_grad=True"
            )
        if param.device != params[0].device:
            raise ValueError(f"params[{index}] is on {param.device}, params[0] on {params[0].device}: need one device")
    return params


def _gaussian(size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(size, dtype=torch.float64, generator=generator).to(device)


def _rademacher(size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    signs = torch.randint(0, 2, (size,), generator=generator, dtype=torch.int8)
    return (2.0 * signs.to(torch.float64) - 1.0).to(device)


def _standard_error(samples: list[float]) -> float:
    if len(samples) < 2:
        return float("nan")
    return float(np.std(samples, ddof=1) / math.sqrt(len(samples)))


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
