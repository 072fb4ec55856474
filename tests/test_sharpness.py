"""Sharpness instruments against closed-form answers: quadratics, a tiny ReLU MLP, torch optimizers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.function import once_differentiable

from lightning_stablelr.sharpness import (
    adam_preconditioner,
    hessian_vector_product,
    optimizer_stability_threshold,
    preconditioned_sharpness,
    stability_threshold,
    top_hessian_eigenvalue,
)

SHAPES = {"w": (2, 2), "b": (2,)}  # 6 coordinates split over two tensors, like a real module


def _split(flat: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"w": flat[:4].reshape(2, 2), "b": flat[4:]}


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors["w"].reshape(-1), tensors["b"].reshape(-1)])


def _symmetric(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(
        torch.randn(len(eigenvalues), len(eigenvalues), generator=generator, dtype=torch.float64)
    )
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def _quadratic(a: torch.Tensor, b: torch.Tensor):
    """L(θ) = ½ θᵀAθ + bᵀθ, whose Hessian is A everywhere."""

    def loss_fn(params):
        theta = _flat(params)
        return 0.5 * theta @ a @ theta + b @ theta

    return loss_fn


@pytest.fixture
def quadratic():
    a = _symmetric([5.0, 3.0, 2.0, 1.0, 0.5, -1.0])
    b = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)
    theta = _split(torch.tensor([0.3, -0.2, 0.5, 1.0, -0.7, 0.1], dtype=torch.float64))
    return a, _quadratic(a, b), theta


def _rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize(
    ("method", "bound"), [("autograd", 1e-8), ("finite_difference", 1e-4), ("auto", 1e-8)]
)
def test_hvp_of_quadratic_is_a_times_v(quadratic, method, bound):
    a, loss_fn, theta = quadratic
    v = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0], dtype=torch.float64)
    hv = hessian_vector_product(loss_fn, theta, _split(v), method=method)
    assert set(hv) == {"w", "b"} and hv["w"].shape == (2, 2)
    assert _rel_err(_flat(hv), a @ v) < bound


def test_finite_difference_step_is_exact_to_rounding_on_a_quadratic(quadratic):
    # Central differences have no truncation error on a quadratic: only rounding is left (fp64).
    a, loss_fn, theta = quadratic
    v = torch.arange(1.0, 7.0, dtype=torch.float64)
    hv = hessian_vector_product(loss_fn, theta, _split(v), method="finite_difference")
    assert _rel_err(_flat(hv), a @ v) < 1e-8


def test_caller_tensors_and_grads_are_untouched(quadratic):
    _, loss_fn, theta = quadratic
    params = {k: t.clone().requires_grad_(True) for k, t in theta.items()}
    for k, p in params.items():
        p.grad = torch.full_like(p, 7.0) if k == "w" else None
    before = {k: p.detach().clone() for k, p in params.items()}
    v = _split(torch.ones(6, dtype=torch.float64))
    for method in ("autograd", "finite_difference"):
        hessian_vector_product(loss_fn, params, v, method=method)
        top_hessian_eigenvalue(loss_fn, params, iters=3, method=method)
    assert all(torch.equal(params[k].detach(), before[k]) for k in params)
    assert torch.equal(params["w"].grad, torch.full((2, 2), 7.0, dtype=torch.float64))
    assert params["b"].grad is None
    assert all(p.is_leaf and p.requires_grad for p in params.values())


def test_top_eigenvalue_matches_eigvalsh(quadratic):
    a, loss_fn, theta = quadratic
    estimate = top_hessian_eigenvalue(loss_fn, theta, iters=100, tol=1e-6)
    expected = float(torch.linalg.eigvalsh(a).max())
    assert expected == pytest.approx(5.0)
    assert estimate.value == pytest.approx(expected, rel=1e-2)
    assert estimate.converged and estimate.method == "autograd"
    eigenvector = torch.linalg.eigh(a).eigenvectors[:, -1]
    assert abs(float(_flat(estimate.vector) @ eigenvector)) > 0.999
    assert float(_flat(estimate.vector).norm()) == pytest.approx(1.0, abs=1e-12)


def test_warm_start_converges_in_fewer_iterations(quadratic):
    a, _, theta = quadratic
    b = torch.zeros(6, dtype=torch.float64)
    first = top_hessian_eigenvalue(_quadratic(a, b), theta, iters=100, tol=1e-4)
    # The next probe sees a slightly different Hessian, as after some training steps.
    moved = a + 0.05 * _symmetric([1.0, -1.0, 0.5, 0.2, -0.3, 0.8], seed=1)
    cold = top_hessian_eigenvalue(_quadratic(moved, b), theta, iters=100, tol=1e-4)
    warm = top_hessian_eigenvalue(_quadratic(moved, b), theta, iters=100, tol=1e-4, init=first.vector)
    expected = float(torch.linalg.eigvalsh(moved).max())
    assert cold.value == pytest.approx(expected, rel=1e-2)
    assert warm.value == pytest.approx(expected, rel=1e-2)
    assert cold.converged and warm.converged
    assert warm.iterations < cold.iterations
    assert warm.iterations <= 3 < cold.iterations


def test_exact_eigenvector_warm_start_stops_after_one_product(quadratic):
    a, loss_fn, theta = quadratic
    eigenvector = torch.linalg.eigh(a).eigenvectors[:, -1]
    estimate = top_hessian_eigenvalue(loss_fn, theta, init=_split(eigenvector))
    assert estimate.iterations == 1 and estimate.converged
    assert estimate.value == pytest.approx(5.0, rel=1e-10)


def test_negative_dominant_eigenvalue_is_reported_as_is():
    a = _symmetric([-6.0, 2.0, 1.0, 0.5, 0.1, -0.2], seed=3)
    theta = _split(torch.zeros(6, dtype=torch.float64))
    estimate = top_hessian_eigenvalue(
        _quadratic(a, torch.zeros(6, dtype=torch.float64)), theta, iters=200, tol=1e-8
    )
    assert estimate.converged
    assert estimate.value == pytest.approx(-6.0, rel=1e-4)


def test_no_global_rng_is_consumed_and_results_are_reproducible(quadratic):
    _, loss_fn, theta = quadratic
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = top_hessian_eigenvalue(loss_fn, theta, iters=4, tol=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    second = top_hessian_eigenvalue(loss_fn, theta, iters=4, tol=0.0)
    assert first.value == second.value and first.iterations == second.iterations == 4
    assert not first.converged
    seeded = top_hessian_eigenvalue(
        loss_fn, theta, iters=4, tol=0.0, generator=torch.Generator().manual_seed(9)
    )
    assert seeded.value != first.value


class _SquareOnceDifferentiable(torch.autograd.Function):
    """x², whose backward is once_differentiable: double backward silently loses the graph."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2.0 * x * grad


class _TwiceRaises(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grad):
        ctx.save_for_backward(x)
        return 2.0 * x * grad

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("double backward is not implemented for this op")


class _SquareRaising(torch.autograd.Function):
    """x², whose backward is itself an op that raises when differentiated."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _TwiceRaises.apply(x, grad)


@pytest.mark.parametrize("square", [_SquareOnceDifferentiable, _SquareRaising])
def test_auto_falls_back_to_finite_differences(square):
    # L = ½ Σ c_i θ_i², so H = diag(c) and λ_max = 4.
    c = torch.tensor([4.0, 1.0, 2.5, 0.5, 3.0, 1.5], dtype=torch.float64)

    def loss_fn(params):
        return 0.5 * (c * square.apply(_flat(params))).sum()

    theta = _split(torch.tensor([0.3, -0.2, 0.5, 1.0, -0.7, 0.1], dtype=torch.float64))
    v = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0], dtype=torch.float64)
    hv = hessian_vector_product(loss_fn, theta, _split(v))
    assert _rel_err(_flat(hv), c * v) < 1e-4
    estimate = top_hessian_eigenvalue(loss_fn, theta, iters=100, tol=1e-6)
    assert estimate.method == "finite_difference"
    assert estimate.value == pytest.approx(4.0, rel=1e-2)
    if square is _SquareRaising:
        with pytest.raises(RuntimeError, match="double backward is not implemented"):
            hessian_vector_product(loss_fn, theta, _split(v), method="autograd")


def test_relu_mlp_hvp_and_sharpness_match_the_full_hessian():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def loss_fn(params):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    def unflatten(flat):
        return {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}

    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    flat_theta = torch.cat([t.reshape(-1) for t in theta.values()])
    hessian = torch.autograd.functional.hessian(lambda f: loss_fn(unflatten(f)), flat_theta)
    v = torch.randn(flat_theta.numel(), dtype=torch.float64)
    expected = hessian @ v
    for method, bound in (("autograd", 1e-8), ("finite_difference", 1e-4)):
        hv = hessian_vector_product(loss_fn, theta, unflatten(v), method=method)
        assert _rel_err(torch.cat([hv[n].reshape(-1) for n in names]), expected) < bound
    eigenvalues = torch.linalg.eigvalsh(hessian)
    dominant = float(eigenvalues[eigenvalues.abs().argmax()])
    estimate = top_hessian_eigenvalue(loss_fn, theta, iters=300, tol=1e-7)
    assert estimate.method == "autograd" and estimate.converged
    assert estimate.value == pytest.approx(dominant, rel=1e-2)


def test_float32_finite_difference_on_mlp_is_close_to_autograd():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)

    def loss_fn(params):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    theta = dict(model.named_parameters())
    exact = top_hessian_eigenvalue(loss_fn, theta, iters=200, tol=1e-6, method="autograd")
    approx = top_hessian_eigenvalue(loss_fn, theta, iters=200, tol=1e-6, method="finite_difference")
    assert approx.value == pytest.approx(exact.value, rel=1e-2)
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- thresholds
def test_stability_threshold_numbers():
    assert stability_threshold(0.1) == pytest.approx(20.0)
    assert stability_threshold(0.1, momentum=0.9) == pytest.approx(38.0)
    assert stability_threshold(0.1, momentum=0.9, nesterov=True) == pytest.approx(3.8 / 0.28)
    assert stability_threshold(0.1, momentum=0.9, dampening=0.5) == pytest.approx(76.0)
    # Adam's EMA momentum (dampening = beta1): (2 + 2 beta1) / ((1 - beta1) lr) = 3800 at lr 1e-2.
    assert stability_threshold(1e-2, momentum=0.9, dampening=0.9) == pytest.approx(3800.0)


def _sgd_final_distance(curvature: float, **sgd_kwargs) -> float:
    theta = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    optimizer = torch.optim.SGD([theta], **sgd_kwargs)
    for _ in range(400):
        optimizer.zero_grad()
        (0.5 * curvature * theta.pow(2).sum()).backward()
        optimizer.step()
    return abs(float(theta.detach()))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
        {"lr": 0.05, "momentum": 0.5, "dampening": 0.3},
    ],
)
def test_threshold_separates_convergence_from_divergence_for_torch_sgd(kwargs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    threshold = optimizer_stability_threshold(optimizer).threshold
    assert _sgd_final_distance(0.97 * threshold, **kwargs) < 1e-3
    assert _sgd_final_distance(1.03 * threshold, **kwargs) > 1e3


def test_adam_threshold_separates_convergence_with_a_frozen_preconditioner():
    # Cohen et al. 2022: with P frozen, Adam is EMA heavy ball on P^{-1} H.
    lr, beta1, p = 1e-2, 0.9, 0.25
    threshold = stability_threshold(lr, momentum=beta1, dampening=beta1)

    def final_distance(preconditioned_curvature: float) -> float:
        theta, m = 1.0, 0.0
        for _ in range(2000):
            m = beta1 * m + (1.0 - beta1) * (preconditioned_curvature * p) * theta
            theta -= lr * m / p
        return abs(theta)

    assert final_distance(0.97 * threshold) < 1e-3
    assert final_distance(1.03 * threshold) > 1e3


def test_optimizer_stability_threshold_reads_kind_and_numbers():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = optimizer_stability_threshold(torch.optim.SGD(params, lr=0.5))
    assert (sgd.kind, sgd.threshold, sgd.momentum, sgd.preconditioned) == ("sgd", 4.0, 0.0, False)
    heavy = optimizer_stability_threshold(torch.optim.SGD(params, lr=0.1, momentum=0.9))
    assert heavy.kind == "heavy_ball" and heavy.threshold == pytest.approx(38.0)
    nesterov = optimizer_stability_threshold(torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True))
    assert nesterov.kind == "nesterov" and nesterov.threshold == pytest.approx(3.8 / 0.28)
    for adam_class in (torch.optim.Adam, torch.optim.AdamW):
        adam = optimizer_stability_threshold(adam_class(params, lr=1e-3, betas=(0.9, 0.999)))
        assert adam.kind == "adam" and adam.preconditioned
        assert adam.threshold == pytest.approx(38000.0) and adam.momentum == 0.9
    unknown = optimizer_stability_threshold(torch.optim.RMSprop(params, lr=1e-2))
    assert unknown.kind == "unknown" and math.isnan(unknown.threshold) and unknown.lr == 1e-2
    two_groups = torch.optim.SGD(
        [{"params": params}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 2.0}], lr=1.0
    )
    assert optimizer_stability_threshold(two_groups, param_group=1).threshold == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"`param_group` must be an index in \[0, 1\], got 2"):
        optimizer_stability_threshold(two_groups, param_group=2)


# ----------------------------------------------------------------------------- Adam preconditioning
def test_preconditioned_sharpness_diagonal_and_dense_cases():
    theta = _split(torch.zeros(6, dtype=torch.float64))
    h = torch.tensor([4.0, 1.0, 9.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    p = torch.tensor([1.0, 0.1, 6.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    zero = torch.zeros(6, dtype=torch.float64)
    diagonal = preconditioned_sharpness(
        _quadratic(torch.diag(h), zero), theta, _split(p), iters=200, tol=1e-8
    )
    assert diagonal.value == pytest.approx(10.0, rel=1e-6)  # max(h / p) = 1 / 0.1
    a = _symmetric([5.0, 3.0, 2.0, 1.0, 0.5, 0.2], seed=4)
    dense = preconditioned_sharpness(_quadratic(a, zero), theta, _split(p), iters=500, tol=1e-8)
    scale = p.rsqrt()
    expected = float(torch.linalg.eigvalsh(scale[:, None] * a * scale[None, :]).max())
    assert dense.value == pytest.approx(expected, rel=1e-2)
    with pytest.raises(ValueError, match=r"`preconditioner\['b'\]` must be finite and > 0"):
        preconditioned_sharpness(_quadratic(a, zero), theta, {"w": p[:4].reshape(2, 2), "b": torch.zeros(2)})


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_preconditioner_matches_the_bias_corrected_second_moment(amsgrad):
    # A constant gradient c gives v_t = (1 - beta2^t) c², so v̂_t = c² and P = |c| + eps exactly.
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    c = torch.tensor([0.5, -2.0, 0.0], dtype=torch.float64)
    optimizer = torch.optim.Adam([w], lr=1e-3, betas=(0.9, 0.99), eps=1e-8, amsgrad=amsgrad)
    assert adam_preconditioner(optimizer, {"w": w}) is None
    for _ in range(3):
        optimizer.zero_grad()
        (c @ w).backward()
        optimizer.step()
    preconditioner = adam_preconditioner(optimizer, {"w": w})
    assert torch.allclose(preconditioner["w"], c.abs() + 1e-8, rtol=1e-12, atol=0.0)
    with pytest.raises(ValueError, match=r"`params\['copy'\]` is not a parameter of the optimizer"):
        adam_preconditioner(optimizer, {"copy": w.detach()})


# ----------------------------------------------------------------------------- argument errors
def test_bad_arguments_raise_value_errors_that_name_them(quadratic):
    _, loss_fn, theta = quadratic
    v = _split(torch.ones(6, dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"`method` must be one of 'auto', 'autograd', 'finite_difference', got 'exact'"
    ):
        hessian_vector_product(loss_fn, theta, v, method="exact")
    with pytest.raises(ValueError, match=r"`iters` must be an integer >= 1, got 0"):
        top_hessian_eigenvalue(loss_fn, theta, iters=0)
    with pytest.raises(ValueError, match=r"`tol` must be a finite number >= 0, got -1"):
        top_hessian_eigenvalue(loss_fn, theta, tol=-1)
    with pytest.raises(
        ValueError, match=r"`vector` must have the same keys as `params`, got missing=\['b'\]"
    ):
        hessian_vector_product(loss_fn, theta, {"w": v["w"]})
    with pytest.raises(ValueError, match=r"`init\['w'\]` must have shape \(2, 2\)"):
        top_hessian_eigenvalue(loss_fn, theta, init={"w": torch.ones(4), "b": torch.ones(2)})
    with pytest.raises(ValueError, match="loss_fn must return a scalar Tensor, got \\(6,\\)"):
        hessian_vector_product(lambda p: _flat(p), theta, v)
    with pytest.raises(ValueError, match="does not depend differentiably on params"):
        hessian_vector_product(lambda p: _flat(p).detach().sum(), theta, v)
    with pytest.raises(ValueError, match=r"`lr` must be a finite number > 0, got 0"):
        stability_threshold(0)
    with pytest.raises(ValueError, match=r"`momentum` must be a finite number in \[0, 1\), got 1.0"):
        stability_threshold(0.1, momentum=1.0)
    with pytest.raises(ValueError, match="`nesterov=True` needs `momentum` > 0"):
        stability_threshold(0.1, nesterov=True)


def test_preconditioned_sharpness_from_a_real_adam_state(quadratic):
    a, loss_fn, theta = quadratic
    params = {k: torch.nn.Parameter(t.clone()) for k, t in theta.items()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        loss_fn(params).backward()
        optimizer.step()
    preconditioner = adam_preconditioner(optimizer, params)
    estimate = preconditioned_sharpness(loss_fn, params, preconditioner, iters=500, tol=1e-9)
    scale = _flat(preconditioner).rsqrt()
    eigenvalues = torch.linalg.eigvalsh(scale[:, None] * a * scale[None, :])
    assert estimate.value == pytest.approx(float(eigenvalues[eigenvalues.abs().argmax()]), rel=1e-2)
    threshold = optimizer_stability_threshold(optimizer)
    assert threshold.preconditioned and threshold.threshold == pytest.approx(3.8 / (0.1 * 1e-2))
