"""Theorem 1 tooling (``mdsens.jacobian_error``) against independent truths.

Truths used: closed-form ridge regression on the bundled diabetes data (w* = H⁻¹Xᵀy/n,
J* = −H⁻¹w*, α = λ_min(H), β = 1, γ = 0, R = ‖w*‖, H = XᵀX/n + λI); logistic-regression
Hessians written out in NumPy (γ ≠ 0) and the analytic bound |σ''| ≤ 1/(6√3); a
translation-invariant chain of springs whose minimum-norm Jacobian is known in closed
form; the published diabetes table and scikit-learn's standardized first row.
Norms are spectral, as in the module.
"""

import functools
import os
import pathlib
import re
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens as ms
from mdsens import errors
from mdsens import jacobian_error as je

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
#: Rounding allowance (relative to ‖J*‖) when an error is compared with a bound it attains.
ROUNDING = 1e-12
#: The matrix-free operator's solver in these tests (symmetric positive-definite ∂₁F):
#: CG compiles in half the time of the default GMRES.
CG = functools.partial(ms.linear_solve.cg, tol=1e-12)


# --------------------------------------------------------------------------- the data
def test_diabetes_is_the_published_table():
    X, y = ms.data.diabetes()
    assert X.shape == (442, 10) and y.shape == (442,) and X.dtype == y.dtype == np.float64
    np.testing.assert_array_equal(np.append(X[0], y[0]), [59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.8598, 87, 151])
    np.testing.assert_array_equal(np.append(X[-1], y[-1]), [36, 1, 19.6, 71, 250, 133.2, 97, 3, 4.5951, 92, 57])
    assert abs(y.mean() - 152.133484162896) < 1e-9
    # scikit-learn's load_diabetes(): columns centred and scaled to unit sum of squares
    scaled = (X - X.mean(0)) / (X.std(0) * np.sqrt(len(X)))
    np.testing.assert_allclose(scaled[0], [0.03807591, 0.05068012, 0.06169621, 0.02187239, -0.0442235,
                                           -0.03482076, -0.04340085, -0.00259226, 0.01990749, -0.01764613],
                               atol=1e-8)
    assert ms.data.DIABETES_COLUMNS[-1] == "Y" and len(ms.data.DIABETES_COLUMNS) == 11


# ----------------------------------------------------------------- ridge on diabetes
LAM = 0.1


@functools.lru_cache(maxsize=None)
def ridge():
    """Standardized diabetes ridge: ``(F, step, H, w*, J*)`` (all closed form)."""
    X, y = ms.data.diabetes()
    X, y = (X - X.mean(0)) / X.std(0), (y - y.mean()) / y.std()
    n = len(X)
    gram, rhs = X.T @ X / n, X.T @ y / n
    H = gram + LAM * np.eye(10)
    w_star = np.linalg.solve(H, rhs)
    J_star = -np.linalg.solve(H, w_star)[:, None]

    def F(w, lam):
        return jnp.asarray(gram) @ w - jnp.asarray(rhs) + lam * w

    eta = 1.0 / np.linalg.eigvalsh(H).max()
    return F, (lambda w, lam: w - eta * F(w, lam)), H, w_star, J_star


@functools.lru_cache(maxsize=None)
def ridge_curve():
    """400 gradient-descent steps from 0; the reference w*, J* from 4000 more (the default)."""
    F, step, _, _, _ = ridge()
    return je.error_curve(F, step, jnp.zeros(10), LAM, 400)


def test_pure_functions_state_theorem_1():
    assert float(je.theorem1_constant(2.0, 1.0, 3.0, 4.0)) == pytest.approx(1 / 2 + 3 * 4 / 4)
    assert float(je.theorem1_bound(2.0, 1.0, 3.0, 4.0, 0.1)) == pytest.approx(0.35)
    assert float(je.distance_from_residual(3.0, 2.0)) == 1.5
    # the sharper form of the proof: γ_J = γ R / α reproduces the paper's constant
    assert float(je.theorem1_constant_local(2.0, 1.0, 3.0 * 4.0 / 2.0)) == pytest.approx(3.5)
    # broadcast over parameters; no bound where α is not positive
    C = np.asarray(je.theorem1_constant(np.array([1.0, 0.0, -1.0, np.nan]), 1.0, 0.0, 1.0))
    assert C[0] == 1.0 and np.all(np.isnan(C[1:]))
    assert np.isnan(float(je.distance_from_residual(1.0, 0.0)))
    jitted = jax.jit(je.theorem1_constant_local)(jnp.array([0.5, 2.0]), jnp.array([1.0, 1.0]), 1.0)
    np.testing.assert_allclose(jitted, [4.0, 1.0])


def test_implicit_jacobian_at_an_approximate_point_dense_matrix_free_both_modes():
    F, _, H, w_star, _ = ridge()
    w_hat = w_star + 0.05 * np.random.default_rng(1).normal(size=10)
    truth = -np.linalg.solve(H, w_hat)[:, None]  # B(ŵ) = ŵ: J(ŵ) = −H⁻¹ ŵ
    dense = je.implicit_jacobian(F, w_hat, LAM)
    assert dense.shape == (10, 1)
    np.testing.assert_allclose(dense, truth, rtol=1e-11, atol=1e-13)
    op = je.implicit_jacobian(F, w_hat, LAM, dense=False, solve=CG, symmetric=True)
    assert isinstance(op, je.JacobianOperator) and op.shape == (10, 1)
    np.testing.assert_allclose(op.todense(), truth, rtol=1e-9, atol=1e-11)
    u = np.random.default_rng(2).normal(size=10)
    forward = u @ (op @ np.ones(1))
    reverse = (u @ op) @ np.ones(1)
    assert forward == pytest.approx(reverse, rel=1e-10)
    assert forward == pytest.approx(float(u @ truth[:, 0]), rel=1e-9)
    np.testing.assert_allclose(op.jvp(1.0), truth[:, 0], rtol=1e-9)


@pytest.mark.parametrize("mode", ["dense", "lanczos symmetric", "lanczos normal"])
def test_bound_constants_for_ridge_are_the_exact_ones(mode):
    F, _, H, w_star, _ = ridge()
    kw = {"dense": {}, "lanczos symmetric": dict(dense=False, symmetric=True),
          "lanczos normal": dict(dense=False)}[mode]
    c = je.bound_constants(F, w_star, LAM, radius=0.5, n_samples=8, **kw)
    alpha = np.linalg.eigvalsh(H).min()
    R = np.linalg.norm(w_star)
    # the brief's acceptance: within a factor 2; in fact exact to rounding
    for got, exact in ((c.alpha, alpha), (c.beta, 1.0), (c.R, R)):
        assert 0.5 * exact <= got <= 2 * exact
        assert got == pytest.approx(exact, rel=1e-8)
    assert c.gamma <= 1e-12  # A = −H does not depend on w
    assert c.C == pytest.approx(1 / alpha, rel=1e-8)
    assert c.displacements.shape[1] == 10 and len(c.beta_samples) == len(c.displacements)
    assert np.max(np.linalg.norm(c.displacements, axis=1)) == pytest.approx(0.5)
    assert "radius = 0.5" in c.sampling and ("Lanczos" in c.sampling) == (mode != "dense")


def _slope(x, y):
    return np.polyfit(np.log(x), np.log(y), 1)[0]


def test_error_curve_on_ridge_follows_theorem_1():
    F, _, H, w_star, J_star = ridge()
    curve = ridge_curve()
    # the default reference (4000 more steps, implicit Jacobian there) is the closed form
    np.testing.assert_allclose(curve.x_star, w_star, atol=1e-13)
    np.testing.assert_allclose(curve.jac_star, J_star, atol=1e-12)
    assert curve.constants.radius == pytest.approx(np.linalg.norm(w_star), rel=1e-10)
    assert len(curve.step) == 401 and curve.iterate_error[0] == pytest.approx(np.linalg.norm(w_star))
    # the bound holds at every iterate (it is attained along the slowest eigenvector)
    slack = ROUNDING * np.linalg.norm(J_star, 2)
    assert np.all(curve.implicit_error <= curve.bound + slack)
    np.testing.assert_allclose(curve.bound, curve.iterate_error / np.linalg.eigvalsh(H).min(), rtol=1e-8)
    # the implicit error is linear in the iterate error over > 2 decades
    window = (curve.iterate_error < 1e-1) & (curve.iterate_error > 1e-7)
    decades = np.log10(curve.iterate_error[window].max() / curve.iterate_error[window].min())
    assert decades > 2
    assert abs(_slope(curve.iterate_error[window], curve.implicit_error[window]) - 1) < 0.1
    # unrolled differentiation lags behind at the same iterate
    late = curve.iterate_error < 1e-3
    assert np.all(curve.unrolled_error[late] > 3 * curve.implicit_error[late])
    # the a-posteriori estimate (no w*) bounds the error, and is within 10x of it once the
    # iterates are close (‖F‖/α overestimates the distance by up to κ ≈ 37 far out)
    assert np.all(curve.estimate >= curve.implicit_error - slack)
    close = curve.iterate_error < 1e-2
    assert close.sum() > 100 and np.all(curve.estimate[close] <= 10 * curve.implicit_error[close])
    # at w_0 = 0, J(w_0) = −H⁻¹ w_0 = 0: the implicit error is ‖J*‖
    assert curve.implicit_error[0] == pytest.approx(np.linalg.norm(J_star), rel=1e-10)


def test_error_estimate_from_the_residual_alone():
    F, step, H, w_star, J_star = ridge()
    alpha = np.linalg.eigvalsh(H).min()
    curve = ridge_curve()
    reference = curve.constants
    for k in (100, 300):
        w_k = np.asarray(jax.lax.fori_loop(0, k, lambda _, w: step(w, LAM), jnp.zeros(10)))
        truth = np.linalg.norm(-np.linalg.solve(H, w_k)[:, None] - J_star, 2)
        local = je.error_estimate(F, w_k, LAM)  # α and C estimated at w_k
        given = je.error_estimate(F, w_k, LAM, alpha=alpha, constants=reference)  # a caller's λ_min
        for est in (local, given):
            assert truth <= est.estimate <= 10 * truth, (k, truth, est)
            assert est.distance >= np.linalg.norm(w_k - w_star)
        assert local.alpha == pytest.approx(alpha, rel=1e-10)
        assert given.residual_norm == pytest.approx(np.linalg.norm(H @ (w_k - w_star)), rel=1e-8)
        assert local.constants.radius == pytest.approx(local.distance)


# ------------------------------------------------------------- logistic regression: γ ≠ 0
@functools.lru_cache(maxsize=None)
def logistic():
    X, y = ms.data.diabetes()
    X = (X - X.mean(0)) / X.std(0)
    labels = (y > np.median(y)).astype(float)
    n, lam = len(X), 0.05

    def F(w, lam):
        return jnp.asarray(X.T) @ (jax.nn.sigmoid(jnp.asarray(X) @ w) - labels) / n + lam * w

    def hessian(w):  # written out: Xᵀ diag(p(1 − p)) X / n + λI
        p = 1 / (1 + np.exp(-X @ w))
        return X.T @ (X * (p * (1 - p))[:, None]) / n + lam * np.eye(X.shape[1])

    eta = 1.0 / (np.linalg.eigvalsh(X.T @ X / n).max() / 4 + lam)
    curve = je.error_curve(F, lambda w, lam: w - eta * F(w, lam), jnp.zeros(10), lam, 300, reference_steps=8000)
    return X, lam, F, hessian, curve


def test_logistic_constants_against_numpy_hessians():
    X, lam, F, hessian, curve = logistic()
    w_star, c = curve.x_star, curve.constants
    assert np.linalg.norm(F(w_star, lam)) < 1e-14
    np.testing.assert_allclose(curve.jac_star[:, 0], -np.linalg.solve(hessian(w_star), w_star), rtol=1e-10)
    assert c.alpha == pytest.approx(np.linalg.eigvalsh(hessian(w_star)).min(), rel=1e-10)
    assert c.R == pytest.approx(np.linalg.norm(w_star), rel=1e-10) and c.beta == pytest.approx(1.0)
    # every γ sample is a NumPy Hessian difference; the maximum is γ
    H0 = hessian(w_star)
    by_numpy = [np.linalg.norm(hessian(w_star + d) - H0, 2) / np.linalg.norm(d) for d in c.displacements]
    np.testing.assert_allclose(c.gamma_samples, by_numpy, rtol=1e-8)
    # and below the analytic Lipschitz constant, |σ''| ≤ 1/(6√3): γ ≤ max‖x_i‖ ‖X‖²/(6√3 n)
    analytic = np.linalg.norm(X, axis=1).max() * np.linalg.norm(X, 2) ** 2 / (6 * np.sqrt(3) * len(X))
    assert 0.05 * analytic < c.gamma <= analytic


def test_logistic_bound_holds_at_every_iterate():
    X, lam, F, hessian, curve = logistic()
    # the γR/α² term dominates C here (γ ≈ 0.7, α ≈ 0.05), so the bound really tests γ
    assert curve.constants.gamma * curve.constants.R / curve.constants.alpha ** 2 > 1 / curve.constants.alpha
    assert np.all(curve.implicit_error <= curve.bound + ROUNDING * np.linalg.norm(curve.jac_star))
    assert np.all(curve.implicit_error <= curve.estimate + ROUNDING * np.linalg.norm(curve.jac_star))
    window = (curve.iterate_error < 1e-2) & (curve.iterate_error > 1e-8)
    assert abs(_slope(curve.iterate_error[window], curve.implicit_error[window]) - 1) < 0.1
    assert np.all(curve.unrolled_error[window] > curve.implicit_error[window])


def test_first_order_estimate_on_ridge_is_twice_the_exact_error():
    # J(w) = −H⁻¹ w is linear in w, so the first-order error is exact and the estimate
    # is FIRST_ORDER_SAFETY times the truth (plus the solves' rounding)
    F, step, H, w_star, J_star = ridge()
    for k in (10, 100, 300):
        w_k = np.asarray(jax.lax.fori_loop(0, k, lambda _, w: step(w, LAM), jnp.zeros(10)))
        truth = np.linalg.norm(-np.linalg.solve(H, w_k)[:, None] - J_star, 2)
        est = je.error_estimate(F, w_k, LAM, method="first_order", symmetric=True)
        assert est.method == "first_order" and est.linearity < 1e-6
        assert est.estimate == pytest.approx(je.FIRST_ORDER_SAFETY * truth, rel=1e-5)
        assert est.distance == pytest.approx(np.linalg.norm(w_k - w_star), rel=1e-6)  # the Newton step


def test_first_order_estimate_bounds_logistic_errors_within_a_factor_10():
    X, lam, F, hessian, curve = logistic()
    rng = np.random.default_rng(5)
    for scale in (1e-1, 1e-2, 1e-4):
        w_hat = curve.x_star + scale * rng.normal(size=10)
        truth = np.linalg.norm(-np.linalg.solve(hessian(w_hat), w_hat) - curve.jac_star[:, 0])
        est = je.error_estimate(F, w_hat, lam, method="first_order", symmetric=True)
        assert est.linearity <= je.LINEARITY_MAX
        assert truth <= est.estimate <= 10 * truth, (scale, truth, est.estimate)
        # the Theorem-1 form bounds it too, but loosely (γ and ‖F‖/α are worst cases)
        assert je.error_estimate(F, w_hat, lam).estimate > est.estimate


def test_rhs_variation_is_the_closed_form_and_first_order_error_takes_it():
    # logistic F: ∂λF = w, so b = w_hat and ∂ₓb[δ̂] = δ̂ (exact for a linear b)
    X, lam, F, hessian, curve = logistic()
    w_hat = jnp.asarray(curve.x_star + 1e-2 * np.random.default_rng(8).normal(size=10))
    delta, _ = je.newton_step(F, w_hat, lam, solve=CG, symmetric=True)
    b, d_b = je.rhs_variation(F, w_hat, lam, delta, 1.0)
    np.testing.assert_allclose(b, w_hat, rtol=1e-14)
    np.testing.assert_allclose(d_b, delta / np.linalg.norm(delta), atol=1e-8)
    dx = -np.linalg.solve(hessian(np.asarray(w_hat)), np.asarray(w_hat))
    given = je.first_order_error(F, w_hat, lam, delta, jnp.asarray(dx), 1.0, solve=CG, symmetric=True,
                                 rhs_terms=(b, d_b))
    own = je.first_order_error(F, w_hat, lam, delta, jnp.asarray(dx), 1.0, solve=CG, symmetric=True)
    np.testing.assert_allclose(given[0], own[0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(given[2], own[2], rtol=1e-12)


def test_first_order_rhs_is_the_numpy_hessian_difference_with_or_without_the_operator():
    # rhs = residual − (∂ₓb[δ̂] + ∂ₓ[H ẋ][δ̂]) ‖δ‖, residual = b + H ẋ, with b = w_hat
    # (∂λF = w) and the Hessian's directional derivative a central NumPy difference
    X, lam, F, hessian, curve = logistic()
    w_hat = curve.x_star + 1e-2 * np.random.default_rng(9).normal(size=10)
    delta, _ = je.newton_step(F, jnp.asarray(w_hat), lam, solve=CG, symmetric=True)
    unit = np.asarray(delta) / np.linalg.norm(delta)
    dx = -np.linalg.solve(hessian(w_hat), w_hat) + 1e-3 * np.random.default_rng(10).normal(size=10)
    h = 1e-4
    d_a = (hessian(w_hat + h * unit) @ dx - hessian(w_hat - h * unit) @ dx) / (2 * h)
    residual = w_hat + hessian(w_hat) @ dx
    truth = residual - (unit + d_a) * np.linalg.norm(delta)
    H_hat = jnp.asarray(hessian(w_hat))
    for operator in (None, lambda v: H_hat @ v):
        rhs, res, (beta, gamma) = je.first_order_rhs(F, jnp.asarray(w_hat), lam, delta, jnp.asarray(dx), 1.0,
                                                     operator=operator)
        np.testing.assert_allclose(res, residual, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(rhs, truth, rtol=1e-6, atol=1e-7 * np.linalg.norm(truth))
        assert float(beta) == pytest.approx(1.0, rel=1e-8)
        assert float(gamma) == pytest.approx(np.linalg.norm(d_a), rel=1e-5)
        # first_order_error solves exactly this right-hand side
        e = je.first_order_error(F, jnp.asarray(w_hat), lam, delta, jnp.asarray(dx), 1.0, solve=CG, symmetric=True,
                                 operator=operator)[0]
        np.testing.assert_allclose(e, np.linalg.solve(hessian(w_hat), truth), rtol=1e-5,
                                   atol=1e-6 * np.linalg.norm(e))


def test_first_order_gradient_error_of_a_reverse_mode_gradient():
    # o(λ) = O(w*(λ), λ), O = Σw³/3 + λΣw; closed form at any w with NumPy Hessians:
    # ∇o(w) = Σw − wᵀ H(w)⁻¹ (w² + λ)   (∂λF = w, ∂wO = w² + λ)
    X, lam, F, hessian, curve = logistic()
    O = lambda w, lam: jnp.sum(w ** 3) / 3 + lam * jnp.sum(w)  # noqa: E731

    def gradient(w):
        return np.sum(w) - w @ np.linalg.solve(hessian(w), w ** 2 + lam)

    @jax.jit
    def estimate(w_hat):
        options = dict(solve=CG, symmetric=True)
        delta, _ = je.newton_step(F, w_hat, lam, **options)
        adj = je.adjoint(F, w_hat, lam, jax.grad(O)(w_hat, lam), **options)
        e = je.first_order_gradient_error(F, O, w_hat, lam, delta, adj, **options)
        return je.FIRST_ORDER_SAFETY * jnp.abs(e)

    rng = np.random.default_rng(7)
    for scale in (1e-1, 1e-2, 1e-4):
        w_hat = curve.x_star + scale * rng.normal(size=10)
        truth = abs(gradient(w_hat) - gradient(curve.x_star))
        assert truth <= float(estimate(jnp.asarray(w_hat))) <= 10 * truth, (scale, truth, estimate(w_hat))


def test_first_order_falls_back_to_theorem_1_outside_the_newton_basin():
    # F = arctan(x) − θ at x̂ = 2, θ = 0: the Newton step overshoots to x ≈ −3.5, where
    # |F| is larger than at x̂ (linearity ≈ 1.2)
    F = lambda x, th: jnp.arctan(x) - th  # noqa: E731
    x_hat, theta = jnp.array([2.0]), jnp.array(0.0)
    est = je.error_estimate(F, x_hat, theta, method="first_order", symmetric=True)
    theorem1 = je.error_estimate(F, x_hat, theta)
    assert est.linearity > je.LINEARITY_MAX and est.constants is not None
    assert est.estimate >= theorem1.estimate
    with pytest.raises(errors.OptionError, match="method"):
        je.error_estimate(F, x_hat, theta, method="newton")


def test_logistic_implicit_jacobian_at_iterates_matches_numpy():
    X, lam, F, hessian, curve = logistic()
    rng = np.random.default_rng(3)
    for scale in (1e-1, 1e-3):
        w_hat = curve.x_star + scale * rng.normal(size=10)
        J = je.implicit_jacobian(F, w_hat, lam)
        np.testing.assert_allclose(J[:, 0], -np.linalg.solve(hessian(w_hat), w_hat), rtol=1e-10)
        error = np.linalg.norm(J - curve.jac_star, 2)
        assert error <= curve.constants.C * np.linalg.norm(w_hat - curve.x_star)


# --------------------------------------------------- a null space: a chain of springs
M = 6


def chain_F(x, rest):
    """Gradient of Σ_i k_i (u_i²/2 + u_i⁴/4), u_i = x_{i+1} − x_i − rest_i: invariant under
    translation (null space: the constant vector), non-quadratic."""
    k = jnp.arange(1.0, M)
    u = jnp.diff(x) - rest
    g = k * (u + u ** 3)
    return jnp.concatenate([-g[:1], g[:-1] - g[1:], g[-1:]])


def chain_truth(rest):
    """Zero-mean minimum x* (x_{i+1} − x_i = rest_i), J* = d x*/d rest (minimum norm) and α."""
    x = np.concatenate([[0.0], np.cumsum(rest)])
    x -= x.mean()
    J = np.array([[float(i < j) for i in range(M - 1)] for j in range(M)])
    J -= J.mean(axis=0)
    D = np.diff(np.eye(M), axis=0)
    alpha = np.sort(np.linalg.eigvalsh(D.T @ np.diag(np.arange(1.0, M)) @ D))[1]  # beyond the zero mode
    return x, J, alpha


TRANSLATION = np.ones((1, M))


def test_declared_nullspace_gives_the_minimum_norm_jacobian_and_alpha():
    rest = np.linspace(1.0, 2.0, M - 1)
    x_star, J_star, alpha = chain_truth(rest)
    np.testing.assert_allclose(je.implicit_jacobian(chain_F, x_star, rest, nullspace=TRANSLATION), J_star,
                               atol=1e-12)
    op = je.implicit_jacobian(chain_F, x_star, rest, nullspace=lambda x, r: TRANSLATION, dense=False,
                              solve=CG, symmetric=True)
    np.testing.assert_allclose(op.todense(), J_star, atol=1e-9)
    dense = je.bound_constants(chain_F, x_star, rest, 0.1, nullspace=TRANSLATION, n_samples=8)
    lanczos = je.bound_constants(chain_F, x_star, rest, 0.1, nullspace=TRANSLATION, n_samples=8, dense=False,
                                 symmetric=True)
    assert dense.alpha == pytest.approx(alpha, rel=1e-10) and lanczos.alpha == pytest.approx(alpha, rel=1e-8)
    # same random directions, same extreme directions (up to sign); power iteration vs SVD
    assert dense.gamma > 0 and lanczos.gamma == pytest.approx(dense.gamma, rel=1e-3)
    # displacements stay off the null space: no net translation
    np.testing.assert_allclose(dense.displacements.sum(axis=1), 0, atol=1e-12)
    with pytest.raises(errors.SingularJacobianError, match="nullspace="):
        je.implicit_jacobian(chain_F, x_star, rest)
    with pytest.raises(errors.SingularJacobianError, match="nullspace="):
        je.bound_constants(chain_F, x_star, rest, 0.1)


def test_translation_drift_does_not_count_as_error():
    rest = np.linspace(1.0, 2.0, M - 1)
    x_star, J_star, _ = chain_truth(rest)

    def drifting_step(x, r):  # gradient descent plus a net translation: a zero mode
        return x - 0.08 * chain_F(x, r) + 0.01

    x0 = x_star + 0.05 * np.sin(np.arange(M))
    curve = je.error_curve(chain_F, drifting_step, x0, rest, 300, x_star=x_star, jac_star=J_star,
                           nullspace=TRANSLATION)
    assert curve.iterate_error[-1] < 1e-6  # despite a drift of 3 units
    assert np.all(curve.implicit_error <= curve.bound + ROUNDING)


# ----------------------------------------------------------------------------- pytrees
def test_pytree_unknowns_and_parameters():
    F_flat, _, H, w_star, _ = ridge()

    def F(x, theta):  # x = {"w": (10,), "b": ()}, θ = {"lam": ()}; b is unpenalized
        g = F_flat(x["w"], theta["lam"])
        return {"w": g, "b": x["b"] - 0.5}

    x = {"w": jnp.asarray(w_star), "b": jnp.asarray(0.5)}
    J = je.implicit_jacobian(F, x, {"lam": LAM})
    # ravel_pytree order: "b" then "w"
    np.testing.assert_allclose(J[:, 0], np.concatenate([[0.0], -np.linalg.solve(H, w_star)]), atol=1e-12)
    op = je.implicit_jacobian(F, x, {"lam": LAM}, dense=False, solve=CG, symmetric=True)
    tangent = op.jvp({"lam": 1.0})
    assert set(tangent) == {"w", "b"}
    np.testing.assert_allclose(tangent["w"], J[1:, 0], rtol=1e-9)
    assert float((np.ones(11) @ op)[0]) == pytest.approx(float(np.sum(J)), rel=1e-9)
    c = je.bound_constants(F, x, {"lam": LAM}, radius=0.1, n_samples=4)
    assert c.alpha == pytest.approx(min(1.0, np.linalg.eigvalsh(H).min()), rel=1e-10)


# ------------------------------------------------------------------------------ errors
def test_non_finite_inputs_are_refused():
    F, _, _, w_star, _ = ridge()
    bad = w_star.copy()
    bad[3] = np.nan
    with pytest.raises(errors.NonFiniteError, match="x_hat contains NaN"):
        je.implicit_jacobian(F, bad, LAM)
    with pytest.raises(errors.NonFiniteError, match="theta"):
        je.bound_constants(F, w_star, np.inf, 0.1)
    with pytest.raises(errors.NonFiniteError, match=r"F\(x_hat, theta\)"):
        je.error_estimate(lambda w, lam: w * jnp.log(lam - 1.0), w_star, 0.5)
    with pytest.raises(errors.NonFiniteError):
        je.error_curve(F, lambda w, lam: w, jnp.zeros(10), LAM, 3, x_star=w_star, jac_star=np.full(10, np.inf))
    assert issubclass(errors.NonFiniteError, ms.MdsensError) and issubclass(errors.NonFiniteError, ValueError)


def test_singular_and_invalid_options_are_refused_with_the_fix():
    def F(x, theta):  # ∂₁F = diag(1, 0): singular, and nothing declared
        return jnp.stack([x[0] - theta, 0.0 * x[1]])

    with pytest.raises(errors.SingularJacobianError, match="nullspace=") as info:
        je.implicit_jacobian(F, jnp.array([1.0, 2.0]), 1.0)
    assert isinstance(info.value, ms.MdsensError)
    with pytest.raises(errors.SingularJacobianError):
        je.error_estimate(F, jnp.array([1.0, 2.0]), 1.0)
    # declaring the zero mode fixes it: J = (1, 0)
    np.testing.assert_allclose(je.implicit_jacobian(F, jnp.array([1.0, 2.0]), 1.0, nullspace=np.array([[0.0, 1.0]])),
                               [[1.0], [0.0]], atol=1e-15)
    ridge_F, _, _, w_star, _ = ridge()
    with pytest.raises(ms.NullSpaceError, match="not a null space"):
        je.implicit_jacobian(ridge_F, w_star, LAM, nullspace=np.eye(10)[:1])
    for bad in (0.0, -1.0, np.nan, "1"):
        with pytest.raises(ms.OptionError, match="radius"):
            je.bound_constants(ridge_F, w_star, LAM, bad)
    with pytest.raises(ms.OptionError, match="n_samples"):
        je.bound_constants(ridge_F, w_star, LAM, 0.1, n_samples=0)
    with pytest.raises(ms.OptionError, match="alpha"):
        je.error_estimate(ridge_F, w_star, LAM, alpha=-1.0)
    with pytest.raises(ms.OptionError, match="n_steps"):
        je.error_curve(ridge_F, lambda w, lam: w, w_star, LAM, -1)


# ----------------------------------------------------------------------------- example
def test_jacobian_precision_example_runs_in_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = runpy.run_path(str(EXAMPLES / "jacobian_precision.py"), run_name="jacobian_precision_example")
    slope = module["main"](["--out", str(tmp_path), "--steps", "300"])
    out = capsys.readouterr().out
    assert abs(slope - 1) < 0.1, out
    assert "bound holds at every iterate" in out and ": True" in out.split("bound holds")[1].splitlines()[0]
    assert (tmp_path / "jacobian_precision.png").stat().st_size > 10_000
    rows = (tmp_path / "jacobian_precision.csv").read_text().splitlines()
    assert rows[0].startswith("step,iterate_error,implicit_error,unrolled_error,bound") and len(rows) == 302


@pytest.mark.slow  # ~25 s: a fresh interpreter imports mdsens (~12 s) and compiles
def test_jacobian_precision_example_runs_as_a_script(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "jacobian_precision.py"), "--out", str(tmp_path),
                           "--per-feature"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    slope = float(re.search(r"log\(iterate error\): ([-0-9.]+)", proc.stdout).group(1))
    assert abs(slope - 1) < 0.1, proc.stdout
    assert (tmp_path / "jacobian_precision.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
