"""Sharpness: Hessian-vector products, warm-started power iteration and stability thresholds.

Pure module (no Lightning import). Every function takes a closure ``loss_fn(params) -> Tensor``
that returns a scalar loss at the parameters ``params`` (a ``dict[str, Tensor]``); in the package
it is ``lambda p: probe.loss(batch, p, create_graph=True)``.

- :func:`hessian_vector_product`: ``H v`` by double backward, or by a central difference of
  gradients where double backward is unavailable.
- :func:`top_hessian_eigenvalue`: the dominant Hessian eigenvalue by power iteration, warm-started
  from the previous call's vector so successive calls converge in a few iterations.
- :func:`preconditioned_sharpness` and :func:`adam_preconditioner`: the same for Adam's
  preconditioned Hessian ``P^{-1/2} H P^{-1/2}`` (Cohen et al. 2022).
- :func:`stability_threshold` and :func:`optimizer_stability_threshold`: the sharpness above
  which the optimizer diverges on a quadratic.

The caller's tensors and their ``.grad`` are never touched, and the global RNG is never consumed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_stablelr._hessian import METHODS, HessianOperator, LossFn, dot, norm, scaled
from lightning_stablelr.validation import (
    check_choice,
    check_finite_positive,
    check_in_range,
    check_int_at_least,
    check_non_negative,
)

__all__ = [
    "OptimizerThreshold",
    "SharpnessEstimate",
    "adam_preconditioner",
    "hessian_vector_product",
    "optimizer_stability_threshold",
    "preconditioned_sharpness",
    "stability_threshold",
    "top_hessian_eigenvalue",
]


@dataclass(frozen=True)
class SharpnessEstimate:
    """Result of power iteration on a symmetric operator (the Hessian, or Adam's preconditioned one).

    Attributes:
        value: Rayleigh quotient ``v_k^T H v_k`` of the last unit iterate ``v_k``: the estimate of the
            eigenvalue of largest *magnitude*. It is negative when that eigenvalue is negative; then
            the largest algebraic eigenvalue is at most ``|value|``. NaN if a product was non-finite.
        vector: unit vector ``H v_k / ||H v_k||`` (one more power step), detached, on the parameters'
            devices: pass it as ``init`` to the next call to warm-start.
        iterations: number of operator products performed.
        method: ``"autograd"`` or ``"finite_difference"``: how the products were computed.
        converged: whether the stopping rule (see :func:`top_hessian_eigenvalue`) was met.
    """

    value: float
    vector: dict[str, Tensor]
    iterations: int
    method: str
    converged: bool


@dataclass(frozen=True)
class OptimizerThreshold:
    """What :func:`optimizer_stability_threshold` read from an optimizer.

    Attributes:
        kind: ``"sgd"``, ``"heavy_ball"``, ``"nesterov"``, ``"adam"`` or ``"unknown"``.
        threshold: the stability threshold; NaN for ``"unknown"``.
        lr: the param group's learning rate.
        momentum: SGD momentum, or Adam's ``beta1``; 0 for plain SGD.
        preconditioned: True when the threshold applies to the preconditioned sharpness
            (:func:`preconditioned_sharpness`, Adam) rather than to the plain Hessian.
    """

    kind: str
    threshold: float
    lr: float
    momentum: float
    preconditioned: bool


# ----------------------------------------------------------------------------- checks
def _check_like(name: str, tensors: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    if set(tensors) != set(params):
        raise ValueError(
            f"`{name}` must have the same keys as `params`, got missing={sorted(set(params) - set(tensors))} "
            f"extra={sorted(set(tensors) - set(params))}."
        )
    for key, p in params.items():
        if tensors[key].shape != p.shape:
            raise ValueError(
                f"`{name}[{key!r}]` must have shape {tuple(p.shape)} like `params`, got {tuple(tensors[key].shape)}."
            )


def _check_params(params: Mapping[str, Tensor]) -> None:
    if not params:
        raise ValueError("`params` must be a non-empty dict of floating-point tensors, got an empty one.")
    for key, p in params.items():
        if not torch.is_floating_point(p):
            raise ValueError(f"`params[{key!r}]` must be a floating-point tensor, got dtype {p.dtype}.")


def hessian_vector_product(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    vector: Mapping[str, Tensor],
    *,
    method: str = "auto",
) -> dict[str, Tensor]:
    """Return ``H v``, with ``H = ∇²L(θ)`` at ``θ = params``, as a dict of detached tensors.

    ``method="autograd"`` differentiates ``g(θ)·v`` once more (double backward, ``create_graph``) on
    detached leaf copies of ``params``. ``method="finite_difference"`` uses
    ``(g(θ + εv) - g(θ - εv)) / (2ε)`` (step documented in ``_hessian.FiniteDifferenceHessian``: exact up to
    rounding on a quadratic, O(ε²) otherwise). ``method="auto"`` (default) uses autograd and falls
    back to finite differences when double backward raises or a gradient carries no graph.
    Finite differences are accurate for smooth losses only: across ReLU kinks they are not (measured
    in ``_hessian.FiniteDifferenceHessian``). ``params`` and their ``.grad`` are never modified.
    Raises ``ValueError`` for bad arguments.
    """
    check_choice("method", method, METHODS)
    _check_params(params)
    _check_like("vector", vector, params)
    return HessianOperator(loss_fn, params, method)(vector)


# ----------------------------------------------------------------------------- power iteration
def _start_vector(
    params: Mapping[str, Tensor], init: Mapping[str, Tensor] | None, generator: torch.Generator | None
) -> dict[str, Tensor]:
    if init is not None:
        _check_like("init", init, params)
        start = {k: init[k].detach().to(device=p.device, dtype=p.dtype) for k, p in params.items()}
        length = norm(start)
        if math.isfinite(length) and length > 0.0:
            return scaled(start, 1.0 / length)
    if generator is None:
        # A private generator: a probe must never advance the training's global random stream.
        generator = torch.Generator().manual_seed(0)
    start = {
        k: torch.randn(p.shape, generator=generator, dtype=p.dtype, device=generator.device).to(p.device)
        for k, p in params.items()
    }
    return scaled(start, 1.0 / norm(start))


def _check_iteration_args(iters: int, tol: float) -> None:
    check_int_at_least("iters", iters, 1)
    check_non_negative("tol", tol, hint="It is a relative tolerance on the eigenvalue, e.g. 1e-3.")


def _power_iteration(operator, start: dict[str, Tensor], iters: int, tol: float) -> SharpnessEstimate:
    v, previous = start, None
    for k in range(1, iters + 1):
        w = operator(v)
        value, w_norm = dot(v, w), norm(w)
        if not (math.isfinite(value) and math.isfinite(w_norm)):
            return SharpnessEstimate(math.nan, v, k, operator.method, False)
        if w_norm == 0.0:  # v lies in the null space: H v = 0 v exactly.
            return SharpnessEstimate(0.0, v, k, operator.method, True)
        residual = norm({key: w[key] - value * v[key] for key in v})
        converged = residual <= tol * abs(value) or (
            previous is not None and abs(value - previous) <= tol * abs(value)
        )
        v, previous = scaled(w, 1.0 / w_norm), value
        if converged:
            return SharpnessEstimate(value, v, k, operator.method, True)
    return SharpnessEstimate(previous, v, iters, operator.method, False)


def top_hessian_eigenvalue(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    *,
    iters: int = 20,
    tol: float = 1e-3,
    init: Mapping[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    method: str = "auto",
) -> SharpnessEstimate:
    """Estimate the dominant Hessian eigenvalue at ``params`` by power iteration on ``H v``.

    ``v_0 = init / ||init||`` (warm start; the previous estimate's ``vector``) or a Gaussian draw from
    ``generator`` (a private generator seeded with 0 when None, so the global RNG is untouched). Then
    ``w = H v_k``, ``λ_k = v_k^T w`` (Rayleigh quotient), ``v_{k+1} = w / ||w||``, stopping after
    ``iters`` products or when ``||w - λ_k v_k|| <= tol |λ_k|`` (possible after one product from a good
    warm start) or ``|λ_k - λ_{k-1}| <= tol |λ_k|``.

    Power iteration converges to the eigenvalue of largest *magnitude*, at rate ``|λ_2/λ_1|`` per
    step. When that eigenvalue is negative (a strongly non-convex point) the returned value is that
    negative Rayleigh quotient, reported as is: it is not λ_max, which is then at most ``|value|``.
    With two dominant eigenvalues of equal magnitude and opposite sign, it does not converge and
    says so. See :func:`hessian_vector_product` for ``method``.
    """
    check_choice("method", method, METHODS)
    _check_params(params)
    _check_iteration_args(iters, tol)
    start = _start_vector(params, init, generator)
    return _power_iteration(HessianOperator(loss_fn, params, method), start, iters, tol)


# ----------------------------------------------------------------------------- Adam
def adam_preconditioner(
    optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor]
) -> dict[str, Tensor] | None:
    """Adam's diagonal preconditioner ``P = sqrt(v̂) + eps``, ``v̂ = exp_avg_sq / (1 - beta2^step)``.

    ``params`` maps names to the *parameter objects the optimizer holds* (e.g.
    ``dict(module.named_parameters())``; the optimizer's state is keyed by identity, so detached
    copies will not do). With ``amsgrad`` the running maximum ``max_exp_avg_sq`` is used, as
    ``torch.optim.Adam`` does. Returns None before the first step (no state yet). Raises
    ``ValueError`` when a parameter is not in the optimizer.
    """
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    preconditioner = {}
    for name, p in params.items():
        if id(p) not in groups:
            raise ValueError(
                f"`params[{name!r}]` is not a parameter of the optimizer; pass the module's own "
                "parameters (dict(module.named_parameters())), not copies."
            )
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            return None
        group = groups[id(p)]
        second_moment = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        bias_correction = 1.0 - group["betas"][1] ** float(state["step"])
        preconditioner[name] = (second_moment.detach() / bias_correction).sqrt() + group["eps"]
    return preconditioner


def preconditioned_sharpness(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    preconditioner: Mapping[str, Tensor],
    *,
    iters: int = 20,
    tol: float = 1e-3,
    init: Mapping[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    method: str = "auto",
) -> SharpnessEstimate:
    """Dominant eigenvalue of ``P^{-1/2} H P^{-1/2}`` (same spectrum as ``P^{-1} H``), P diagonal > 0.

    This is the "preconditioned sharpness" of Cohen et al. 2022 ("Adaptive gradient methods at the
    edge of stability"), to compare with ``(2 + 2 beta1) / ((1 - beta1) lr)``. Power iteration as in
    :func:`top_hessian_eigenvalue`; ``vector`` lives in the scaled coordinates ``u = P^{1/2} v``, so
    warm-start only from a previous call of this function.
    """
    check_choice("method", method, METHODS)
    _check_params(params)
    _check_iteration_args(iters, tol)
    _check_like("preconditioner", preconditioner, params)
    inv_sqrt = {}
    for key, p in params.items():
        diag = preconditioner[key].detach().to(device=p.device, dtype=p.dtype)
        if not bool(torch.isfinite(diag).all()) or bool((diag <= 0).any()):
            raise ValueError(f"`preconditioner[{key!r}]` must be finite and > 0 everywhere, got {diag}.")
        inv_sqrt[key] = diag.rsqrt()
    hessian = HessianOperator(loss_fn, params, method)

    class _Scaled:
        @property
        def method(self) -> str:
            return hessian.method

        def __call__(self, u: Mapping[str, Tensor]) -> dict[str, Tensor]:
            hv = hessian({k: inv_sqrt[k] * t for k, t in u.items()})
            return {k: inv_sqrt[k] * t for k, t in hv.items()}

    return _power_iteration(_Scaled(), _start_vector(params, init, generator), iters, tol)


# ----------------------------------------------------------------------------- thresholds
def stability_threshold(
    lr: float, momentum: float = 0.0, nesterov: bool = False, dampening: float = 0.0
) -> float:
    """Sharpness above which (momentum) gradient descent diverges on a quadratic, for ``torch.optim.SGD``.

    - SGD: ``2 / lr``.
    - Heavy ball (``v <- beta v + (1 - dampening) g``, ``θ <- θ - lr v``):
      ``(2 + 2 beta) / ((1 - dampening) lr)``. With ``dampening = beta`` this is the EMA momentum
      of Adam, ``(2 + 2 beta1) / ((1 - beta1) lr)`` (Cohen et al. 2022).
    - Nesterov (``θ <- θ - lr (g + beta v)``): ``(2 + 2 beta) / ((1 + 2 beta) lr)``. Derived here: on
      ``L = λθ²/2`` with ``h = lr λ`` the update is linear with characteristic polynomial
      ``z² - (1 + beta - h(1 + beta)) z + beta (1 - h)``, whose roots lie in the unit disc (Jury
      criterion) iff ``0 < h < (2 + 2 beta) / (1 + 2 beta)``. ``tests/test_sharpness.py`` checks it
      against ``torch.optim.SGD``.
    """
    lr = check_finite_positive("lr", lr)
    momentum = check_in_range("momentum", momentum, 0.0, 1.0, high_inclusive=False)
    dampening = check_in_range("dampening", dampening, 0.0, 1.0, high_inclusive=False)
    if nesterov and (momentum == 0.0 or dampening != 0.0):
        raise ValueError(
            f"`nesterov=True` needs `momentum` > 0 and `dampening` == 0 (as torch.optim.SGD), "
            f"got momentum={momentum!r}, dampening={dampening!r}."
        )
    if nesterov:
        return (2.0 + 2.0 * momentum) / ((1.0 + 2.0 * momentum) * lr)
    return (2.0 + 2.0 * momentum) / ((1.0 - dampening) * lr)


def optimizer_stability_threshold(
    optimizer: torch.optim.Optimizer, param_group: int = 0
) -> OptimizerThreshold:
    """Read lr, momentum and betas of one param group and return its :class:`OptimizerThreshold`.

    - ``torch.optim.SGD``: kind ``"sgd"``, ``"heavy_ball"`` or ``"nesterov"``, threshold from
      :func:`stability_threshold` (dampening included), compared with the Hessian sharpness.
      Coupled ``weight_decay`` adds ``weight_decay`` to every Hessian eigenvalue of the loss;
      it is not folded in (negligible at usual values).
    - ``torch.optim.Adam``/``AdamW``: kind ``"adam"``, threshold ``(2 + 2 beta1) / ((1 - beta1) lr)``,
      to compare with :func:`preconditioned_sharpness` (``preconditioned=True``). Bias correction of
      the first moment is ignored (it tends to 1).
    - Anything else: kind ``"unknown"``, threshold NaN.
    """
    groups = optimizer.param_groups
    if (
        isinstance(param_group, bool)
        or not isinstance(param_group, int)
        or not 0 <= param_group < len(groups)
    ):
        raise ValueError(f"`param_group` must be an index in [0, {len(groups) - 1}], got {param_group!r}.")
    group = groups[param_group]
    lr = float(group["lr"])
    if isinstance(optimizer, torch.optim.SGD):
        momentum, nesterov = float(group.get("momentum", 0.0)), bool(group.get("nesterov", False))
        kind = "nesterov" if nesterov else ("heavy_ball" if momentum > 0 else "sgd")
        threshold = stability_threshold(lr, momentum, nesterov, float(group.get("dampening", 0.0)))
        return OptimizerThreshold(kind, threshold, lr, momentum, preconditioned=False)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1 = float(group["betas"][0])
        threshold = stability_threshold(lr, beta1, dampening=beta1)
        return OptimizerThreshold("adam", threshold, lr, beta1, preconditioned=True)
    return OptimizerThreshold(
        "unknown", math.nan, lr, float(group.get("momentum", 0.0)), preconditioned=False
    )
