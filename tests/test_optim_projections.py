"""Projections and proximal operators of ``mdsens.optim`` against independent truths.

Truths: each operator's defining optimization problem solved by SciPy (SLSQP, bounded
Brent), closed forms written here in NumPy (the Jacobians of the simplex, l1/l2-ball,
hyperplane, affine-set and box-section projections), and central finite differences of
the primal for the iterative KL projections (whose primal is checked against SLSQP).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize as so

import mdsens as ms
from mdsens import optim

#: The test programs are tiny and run once: compile them without LLVM optimization.
QUICK_COMPILE = {"xla_backend_optimization_level": 0}
rng = np.random.default_rng(7)
X = rng.normal(size=6) * 1.5


def both_modes(fun, x):
    """``(jacfwd, jacrev)`` of ``fun`` at ``x``, compiled as one program."""
    return jax.jit(lambda x: (jax.jacfwd(fun)(x), jax.jacrev(fun)(x)), compiler_options=QUICK_COMPILE)(x)


def slsqp_projection(x, constraints=(), bounds=None, objective=None):
    """argmin ½‖p − x‖² (or ``objective``) under SciPy constraints, to ~1e-10."""
    x = np.asarray(x, float)
    objective = objective or (lambda p: (0.5 * np.sum((p - x) ** 2), p - x))
    res = so.minimize(objective, np.clip(x, -0.1, 0.1) if bounds is None else np.zeros_like(x), jac=True,
                      bounds=bounds, constraints=constraints, method="SLSQP",
                      options={"ftol": 1e-15, "maxiter": 1000})
    # status 8: the line search stalled at round-off, i.e. converged as far as it can
    assert res.status in (0, 8), res.message
    return res.x


def l1_ball_by_splitting(x, r):
    """‖p‖₁ ≤ r as p = u − v, u, v ≥ 0, Σ(u + v) ≤ r: a smooth QP for SLSQP."""
    n = x.size

    def objective(uv):
        d = uv[:n] - uv[n:] - x
        return 0.5 * d @ d, np.concatenate([d, -d])

    cons = [{"type": "ineq", "fun": lambda uv: r - uv.sum(), "jac": lambda uv: -np.ones(2 * n)}]
    res = so.minimize(objective, np.zeros(2 * n), jac=True, bounds=[(0, None)] * (2 * n), constraints=cons,
                      method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
    return res.x[:n] - res.x[n:]


A_AFF = rng.normal(size=(2, 6))
B_AFF = rng.normal(size=2)
A_PLANE = rng.normal(size=6)
W_SEC = rng.uniform(0.5, 2.0, size=6)

# name -> (our projection of X, SciPy's solution of the defining problem)
CASES = {
    "non_negative": (lambda x: optim.projection_non_negative(x),
                     lambda x: slsqp_projection(x, bounds=[(0, None)] * 6)),
    "box": (lambda x: optim.projection_box(x, (-0.5, np.linspace(0.2, 1.0, 6))),
            lambda x: slsqp_projection(x, bounds=list(zip([-0.5] * 6, np.linspace(0.2, 1.0, 6))))),
    "hypercube": (lambda x: optim.projection_hypercube(x, 0.7), lambda x: slsqp_projection(x, bounds=[(0, 0.7)] * 6)),
    "simplex": (lambda x: optim.projection_simplex(x, 2.0),
                lambda x: slsqp_projection(x, bounds=[(0, None)] * 6, constraints=[
                    {"type": "eq", "fun": lambda p: p.sum() - 2.0}])),
    "l1_ball": (lambda x: optim.projection_l1_ball(x, 1.5), lambda x: l1_ball_by_splitting(x, 1.5)),
    "l1_sphere": (lambda x: optim.projection_l1_sphere(x, 1.5), lambda x: l1_ball_by_splitting(x, 1.5)),
    "l2_ball": (lambda x: optim.projection_l2_ball(x, 1.2), lambda x: slsqp_projection(x, constraints=[
        {"type": "ineq", "fun": lambda p: 1.44 - p @ p, "jac": lambda p: -2 * p}])),
    "linf_ball": (lambda x: optim.projection_linf_ball(x, 0.4),
                  lambda x: slsqp_projection(x, bounds=[(-0.4, 0.4)] * 6)),
    "hyperplane": (lambda x: optim.projection_hyperplane(x, (A_PLANE, 0.3)), lambda x: slsqp_projection(x, constraints=[
        {"type": "eq", "fun": lambda p: A_PLANE @ p - 0.3, "jac": lambda p: A_PLANE}])),
    "halfspace": (lambda x: optim.projection_halfspace(x, (A_PLANE, -1.0)), lambda x: slsqp_projection(x, constraints=[
        {"type": "ineq", "fun": lambda p: -1.0 - A_PLANE @ p, "jac": lambda p: -A_PLANE}])),
    "affine_set": (lambda x: optim.projection_affine_set(x, (A_AFF, B_AFF)), lambda x: slsqp_projection(
        x, constraints=[{"type": "eq", "fun": lambda p: A_AFF @ p - B_AFF, "jac": lambda p: A_AFF}])),
    "box_section": (lambda x: optim.projection_box_section(x, (0.0, 0.8, W_SEC, 1.3)),
                    lambda x: slsqp_projection(x, bounds=[(0, 0.8)] * 6, constraints=[
                        {"type": "eq", "fun": lambda p: W_SEC @ p - 1.3, "jac": lambda p: W_SEC}])),
    "second_order_cone": (lambda x: optim.projection_second_order_cone(x), lambda x: slsqp_projection(
        x, bounds=[(0, None)] + [(None, None)] * 5, constraints=[
            {"type": "ineq", "fun": lambda p: p[0] ** 2 - p[1:] @ p[1:]}])),
    "kl_simplex": (lambda x: optim.kl_projection_simplex(x, 1.0), lambda x: slsqp_projection(
        x, bounds=[(1e-12, None)] * 6, constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1.0}],
        objective=lambda p: (np.sum(p * np.log(p) - p * x), np.log(p) + 1 - x))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_projection_solves_its_defining_problem(name):
    ours, truth = CASES[name]
    points = (X,) if name == "l1_sphere" else (X, 0.2 * X + 0.05)  # outside and inside the balls
    for x in points:
        np.testing.assert_allclose(ours(jnp.asarray(x)), truth(x), atol=2e-7, err_msg=name)


def test_projections_accept_pytrees_and_batches():
    tree = {"a": jnp.asarray(X[:3]), "b": jnp.asarray(X[3:])}
    flat = np.asarray(optim.projection_l2_ball(jnp.asarray(X), 1.2))
    out = optim.projection_l2_ball(tree, 1.2)
    np.testing.assert_allclose(np.concatenate([out["a"], out["b"]]), flat, rtol=1e-14)
    out = optim.projection_box(tree, (-0.5, {"a": jnp.ones(3), "b": 0.2 * jnp.ones(3)}))
    np.testing.assert_allclose(out["b"], np.clip(X[3:], -0.5, 0.2))
    rows = jnp.asarray(rng.normal(size=(3, 5)))
    batched = optim.projection_simplex(rows)
    for row, got in zip(np.asarray(rows), np.asarray(batched)):
        np.testing.assert_allclose(got, optim.projection_simplex(jnp.asarray(row)), rtol=1e-14)


# ------------------------------------------------------------------ closed-form Jacobians
def simplex_jacobian(p):
    s = (p > 0).astype(float)
    return np.diag(s) - np.outer(s, s) / s.sum()


def l1_ball_jacobian(p):
    s = np.sign(p)
    return np.diag(np.abs(s)) - np.outer(s, s) / np.abs(s).sum()


def l2_ball_jacobian(x, r):
    norm = np.linalg.norm(x)
    return r / norm * (np.eye(x.size) - np.outer(x, x) / norm ** 2)


def box_section_jacobian(p, alpha, beta, w):
    # On the free coordinates F the projection moves along w within the hyperplane.
    free = (p > alpha + 1e-12) & (p < beta - 1e-12)
    J = np.zeros((p.size, p.size))
    wf = w[free]
    J[np.ix_(free, free)] = np.eye(free.sum()) - np.outer(wf, wf) / (wf @ wf)
    return J


JACOBIAN_CASES = {
    "simplex": (lambda x: optim.projection_simplex(x, 2.0), lambda x, p: simplex_jacobian(p)),
    "l1_ball": (lambda x: optim.projection_l1_ball(x, 1.5), lambda x, p: l1_ball_jacobian(p)),
    "l2_ball": (lambda x: optim.projection_l2_ball(x, 1.2), lambda x, p: l2_ball_jacobian(x, 1.2)),
    "hyperplane": (lambda x: optim.projection_hyperplane(x, (A_PLANE, 0.3)),
                   lambda x, p: np.eye(6) - np.outer(A_PLANE, A_PLANE) / (A_PLANE @ A_PLANE)),
    "affine_set": (lambda x: optim.projection_affine_set(x, (A_AFF, B_AFF)),
                   lambda x, p: np.eye(6) - A_AFF.T @ np.linalg.solve(A_AFF @ A_AFF.T, A_AFF)),
    "box_section": (lambda x: optim.projection_box_section(x, (0.0, 0.8, W_SEC, 1.3)),
                    lambda x, p: box_section_jacobian(p, 0.0, 0.8, W_SEC)),
}


@pytest.mark.parametrize("name", sorted(JACOBIAN_CASES))
def test_projection_jacobians_match_closed_forms_in_both_modes(name):
    ours, truth = JACOBIAN_CASES[name]
    x = jnp.asarray(X)
    expected = truth(X, np.asarray(ours(x)))
    forward, reverse = both_modes(ours, x)
    np.testing.assert_allclose(forward, expected, atol=1e-12)
    np.testing.assert_allclose(reverse, expected, atol=1e-12)


def test_box_section_jacobian_in_its_hyperparameters_against_finite_differences():
    # The SVM-dual use: the derivative w.r.t. the box and the hyperplane, through the
    # closed-form root on the bisection's piece.
    def proj(theta):
        beta, c = theta[0], theta[1]
        return optim.projection_box_section(jnp.asarray(X), (0.0, beta, W_SEC, c))

    theta = np.array([0.8, 1.3])
    h = 1e-6
    fd = np.stack([(np.asarray(proj(theta + h * e)) - np.asarray(proj(theta - h * e))) / (2 * h) for e in np.eye(2)], 1)
    forward, reverse = both_modes(proj, theta)
    np.testing.assert_allclose(forward, fd, atol=1e-8)
    np.testing.assert_allclose(reverse, fd, atol=1e-8)


def test_second_order_cone_jacobian_against_finite_differences():
    x = jnp.asarray(X)  # X[0] < ‖X[1:]‖: on the boundary branch
    h = 1e-6
    fd = np.stack([(np.asarray(optim.projection_second_order_cone(x + h * e)) -
                    np.asarray(optim.projection_second_order_cone(x - h * e))) / (2 * h) for e in np.eye(6)], 1)
    forward, reverse = both_modes(optim.projection_second_order_cone, x)
    np.testing.assert_allclose(forward, fd, atol=1e-8)
    np.testing.assert_allclose(reverse, fd, atol=1e-8)


# ------------------------------------------------------------------ KL transport (Sinkhorn)
SIM = rng.normal(size=(3, 4))
MARG_A = np.array([0.2, 0.3, 0.5])
MARG_B = np.array([0.1, 0.2, 0.3, 0.4])


def kl_transport_by_slsqp(S, a, b):
    m, n = S.shape

    def objective(p):
        P = p.reshape(m, n)
        return np.sum(P * np.log(P) - P - P * S), (np.log(P) - S).ravel()

    cons = [{"type": "eq", "fun": lambda p: p.reshape(m, n).sum(1) - a},
            {"type": "eq", "fun": lambda p: p.reshape(m, n).sum(0)[:-1] - b[:-1]}]
    res = so.minimize(objective, np.outer(a, b).ravel(), jac=True, bounds=[(1e-12, None)] * (m * n),
                      constraints=cons, method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
    return res.x.reshape(m, n)


def test_kl_transport_and_birkhoff_solve_their_problems():
    P = optim.kl_projection_transport(SIM, (MARG_A, MARG_B))
    np.testing.assert_allclose(P, kl_transport_by_slsqp(SIM, MARG_A, MARG_B), atol=1e-7)
    S = rng.normal(size=(4, 4))
    B = optim.kl_projection_birkhoff(S)
    np.testing.assert_allclose(B, kl_transport_by_slsqp(S, np.ones(4), np.ones(4)), atol=1e-7)
    # and the Sinkhorn form of a KL projection: P = diag(u) exp(S) diag(v)
    ratio = np.asarray(B) / np.exp(S)
    np.testing.assert_allclose(ratio / ratio[:, :1], np.ones((4, 1)) * (ratio[0] / ratio[0, 0]), rtol=1e-9)


def test_kl_transport_derivative_through_the_sinkhorn_condition_matches_finite_differences():
    # implicit differentiation through the marginal condition (CG with the gauge null
    # space), w.r.t. the similarity matrix and the marginals, in both modes
    def plan(S, a):
        return optim.kl_projection_transport(S, (a, MARG_B * a.sum()))

    h = 1e-6
    E = np.zeros_like(SIM)
    E[1, 2] = 1.0
    fd_S = (np.asarray(plan(SIM + h * E, MARG_A)) - np.asarray(plan(SIM - h * E, MARG_A))) / (2 * h)
    e = np.array([0.0, 1.0, 0.0])
    fd_a = (np.asarray(plan(SIM, MARG_A + h * e)) - np.asarray(plan(SIM, MARG_A - h * e))) / (2 * h)
    u = rng.normal(size=(3, 4))

    def derivatives(S, a):
        grads = jax.grad(lambda S, a: jnp.sum(u * plan(S, a)), argnums=(0, 1))(S, a)
        return jax.jacfwd(plan, argnums=(0, 1))(S, a), grads

    (jac_S, jac_a), (grad_S, grad_a) = jax.jit(derivatives, compiler_options=QUICK_COMPILE)(SIM, MARG_A)
    np.testing.assert_allclose(jac_S[:, :, 1, 2], fd_S, atol=1e-8)
    np.testing.assert_allclose(jac_a[:, :, 1], fd_a, atol=1e-8)
    np.testing.assert_allclose(grad_S, np.einsum("ij,ijkl->kl", u, jac_S), atol=1e-10)
    np.testing.assert_allclose(grad_a, np.einsum("ij,ijk->k", u, jac_a), atol=1e-10)


# ------------------------------------------------------------------ proximal operators
def scalar_prox(u, penalty, lower=-np.inf):
    """argmin_y ½(y − u)² + penalty(y) (y ≥ lower) by bounded Brent, to ~1e-11."""
    lo = max(lower, -abs(u) - 10.0)
    res = so.minimize_scalar(lambda y: 0.5 * (y - u) ** 2 + penalty(y), bounds=(lo, abs(u) + 10.0),
                             method="bounded", options={"xatol": 1e-12})
    return res.x


@pytest.mark.parametrize("name, ours, penalty, lower", [
    ("lasso", lambda x: optim.prox_lasso(x, 0.7, 0.5), lambda y: 0.35 * abs(y), -np.inf),
    ("non_negative_lasso", lambda x: optim.prox_non_negative_lasso(x, 0.7, 0.5), lambda y: 0.35 * abs(y), 0.0),
    ("elastic_net", lambda x: optim.prox_elastic_net(x, (0.7, 2.0), 0.5),
     lambda y: 0.35 * (abs(y) + 2.0 * 0.5 * y * y), -np.inf),
    ("ridge", lambda x: optim.prox_ridge(x, 0.7, 0.5), lambda y: 0.35 * 0.5 * y * y, -np.inf),
    ("non_negative_ridge", lambda x: optim.prox_non_negative_ridge(x, 0.7, 0.5), lambda y: 0.35 * 0.5 * y * y, 0.0),
])
def test_elementwise_prox_solves_its_defining_problem(name, ours, penalty, lower):
    got = np.asarray(ours(jnp.asarray(X)))
    truth = np.array([scalar_prox(u, penalty, lower) for u in X])
    np.testing.assert_allclose(got, truth, atol=1e-8, err_msg=name)


def test_group_lasso_prox_solves_its_defining_problem():
    # epigraph form: min ½‖y − x‖² + λ t  s.t. t² ≥ ‖y‖², t ≥ 0
    for lam in (0.8, 10.0):  # shrinks, then zeroes the group
        def objective(yt):
            d = yt[:-1] - X
            return 0.5 * d @ d + lam * yt[-1], np.concatenate([d, [lam]])

        cons = [{"type": "ineq", "fun": lambda yt: yt[-1] ** 2 - yt[:-1] @ yt[:-1]}]
        res = so.minimize(objective, np.concatenate([X, [np.abs(X).sum()]]), jac=True, constraints=cons,
                          bounds=[(None, None)] * 6 + [(0, None)], method="SLSQP", options={"ftol": 1e-15})
        np.testing.assert_allclose(optim.prox_group_lasso(jnp.asarray(X), lam), res.x[:-1], atol=1e-7)


def test_prox_from_projection_and_identity():
    prox = optim.make_prox_from_projection(optim.projection_box)
    np.testing.assert_allclose(prox(jnp.asarray(X), (-0.2, 0.3), 5.0), np.clip(X, -0.2, 0.3))
    np.testing.assert_array_equal(optim.prox_none(X, None, 3.0), X)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, match", [
    (lambda: optim.projection_l2_ball(X, -1.0), "max_value"),
    (lambda: optim.projection_l1_ball(X, -1.0), "max_value"),
    (lambda: optim.projection_linf_ball(X, -0.1), "max_value"),
    (lambda: optim.projection_simplex(X, -2.0), "value"),
    (lambda: optim.projection_simplex(3.0), "at least one axis"),
    (lambda: optim.projection_box(X, (1.0, 0.0)), "upper - lower"),
    (lambda: optim.projection_box(X, (np.zeros(4), 1.0)), "does not broadcast"),
    (lambda: optim.projection_hyperplane(X, (np.zeros(6), 1.0)), "not identically zero"),
    (lambda: optim.projection_hyperplane(X, (np.ones(5), 1.0)), "shapes of x"),
    (lambda: optim.projection_affine_set(X, (np.ones((2, 5)), np.ones(2))), r"A of shape \(m, 6\)"),
    (lambda: optim.projection_box_section(X, (0.0, 1.0, W_SEC, 100.0), check_feasible=True), "no p with"),
    (lambda: optim.kl_projection_transport(SIM, (MARG_A, MARG_B[:3])), "shapes"),
    (lambda: optim.kl_projection_transport(SIM, (MARG_A, 2 * MARG_B)), "same total mass"),
    (lambda: optim.kl_projection_transport(SIM, (-MARG_A, MARG_B)), "positive"),
    (lambda: optim.kl_projection_birkhoff(SIM), "square"),
    (lambda: optim.prox_lasso(X, -0.1), "l1reg"),
    (lambda: optim.prox_elastic_net(X, (0.1, -1.0)), "l2reg"),
    (lambda: optim.prox_group_lasso(X, -1.0), "l2reg"),
])
def test_bad_input_raises_an_option_error(call, match):
    with pytest.raises(ms.OptionError, match=match):
        call()
    assert issubclass(ms.OptionError, ms.MdsensError)


# ----------------------------------------------- Euclidean transport and polyhedra
# Truths: the defining QPs solved by SLSQP; the closed-form Jacobian of a projection on
# its active set, I − Cᵀ(CCᵀ)⁻¹C; central finite differences (the projections are
# piecewise linear, so a step inside one piece is exact up to the solver's tolerance).
rng_qp = np.random.default_rng(12)
SIM_L2 = 0.3 * rng_qp.normal(size=(3, 4))
MARG_A_L2 = np.array([0.3, 0.3, 0.4])
MARG_B_L2 = np.array([0.2, 0.3, 0.25, 0.25])


def l2_transport_by_slsqp(S, a, b):
    """argmin_{P ≥ 0} ½‖P − S‖², P1 = a, Pᵀ1 = b (one column sum is implied by the rest)."""
    m, n = S.shape
    cons = [{"type": "eq", "fun": lambda p: p.reshape(m, n).sum(1) - a},
            {"type": "eq", "fun": lambda p: p.reshape(m, n).sum(0)[:-1] - b[:-1]}]
    return slsqp_projection(S.ravel(), constraints=cons, bounds=[(0, None)] * (m * n)).reshape(m, n)


def test_euclidean_transport_and_birkhoff_solve_their_problems():
    P = np.asarray(optim.projection_transport(SIM_L2, (MARG_A_L2, MARG_B_L2)))
    np.testing.assert_allclose(P, l2_transport_by_slsqp(SIM_L2, MARG_A_L2, MARG_B_L2), atol=1e-7)
    assert P.min() >= 0.0 and (P == 0).any() and (P > 0).sum() > 6  # sparse, but not a vertex
    np.testing.assert_allclose(P.sum(1), MARG_A_L2, atol=1e-13)
    np.testing.assert_allclose(P.sum(0), MARG_B_L2, atol=1e-13)
    S = rng_qp.normal(size=(4, 4))
    B = np.asarray(optim.projection_birkhoff(S))
    np.testing.assert_allclose(B, l2_transport_by_slsqp(S, np.ones(4), np.ones(4)), atol=1e-7)
    np.testing.assert_allclose(B.sum(0), np.ones(4), atol=1e-13)
    np.testing.assert_allclose(B.sum(1), np.ones(4), atol=1e-13)


def test_euclidean_transport_derivative_through_the_dual_condition_in_both_modes():
    # implicit differentiation of the dual's marginal condition (CG with the gauge), w.r.t.
    # the similarity matrix and the marginals (b rescaled so that the masses agree)
    def plan(S, a):
        return optim.projection_transport(S, (a, MARG_B_L2 * a.sum()))

    h = 1e-6
    fd_S = np.stack([(np.asarray(plan(SIM_L2 + h * E, MARG_A_L2)) - np.asarray(plan(SIM_L2 - h * E, MARG_A_L2)))
                     / (2 * h) for E in np.eye(12).reshape(12, 3, 4)], axis=-1).reshape(3, 4, 3, 4)
    fd_a = np.stack([(np.asarray(plan(SIM_L2, MARG_A_L2 + h * e)) - np.asarray(plan(SIM_L2, MARG_A_L2 - h * e)))
                     / (2 * h) for e in np.eye(3)], axis=-1)
    u, v_S, v_a = rng_qp.normal(size=(3, 4)), rng_qp.normal(size=(3, 4)), rng_qp.normal(size=3)

    def derivatives(S, a):
        jac = jax.jacfwd(plan, argnums=(0, 1))(S, a)
        jvp = jax.jvp(plan, (S, a), (v_S, v_a))[1]
        vjp = jax.vjp(plan, S, a)[1](u)
        return jac, jvp, vjp

    (jac_S, jac_a), jvp, (vjp_S, vjp_a) = jax.jit(derivatives, compiler_options=QUICK_COMPILE)(SIM_L2, MARG_A_L2)
    np.testing.assert_allclose(jac_S, fd_S, atol=1e-8)
    np.testing.assert_allclose(jac_a, fd_a, atol=1e-8)
    # ⟨u, J v⟩ = ⟨Jᵀu, v⟩: forward and reverse are adjoint, and reverse matches the FD too
    np.testing.assert_allclose(np.sum(u * jvp), np.sum(vjp_S * v_S) + vjp_a @ v_a, rtol=1e-10)
    np.testing.assert_allclose(vjp_S, np.einsum("ij,ijkl->kl", u, fd_S), atol=1e-8)
    np.testing.assert_allclose(vjp_a, np.einsum("ij,ijk->k", u, fd_a), atol=1e-8)


X_POLY = np.array([0.9, -0.4, 1.3, 0.2, -1.1])
A_POLY = np.array([[1.0, 1.0, 1.0, 1.0, 1.0]])
B_POLY = np.array([1.0])
G_POLY = np.vstack([-np.eye(5)[:2], rng_qp.normal(size=(2, 5))])
H_POLY = np.array([0.0, 0.0, 0.5, 0.5])


def test_polyhedron_projection_solves_its_defining_problem():
    hyper = (A_POLY, B_POLY, G_POLY, H_POLY)
    p = np.asarray(optim.projection_polyhedron(X_POLY, hyper))
    cons = [{"type": "eq", "fun": lambda p: A_POLY @ p - B_POLY, "jac": lambda p: A_POLY},
            {"type": "ineq", "fun": lambda p: H_POLY - G_POLY @ p, "jac": lambda p: -G_POLY}]
    np.testing.assert_allclose(p, slsqp_projection(X_POLY, constraints=cons), atol=1e-7)
    np.testing.assert_allclose(A_POLY @ p, B_POLY, atol=1e-10)
    assert np.all(G_POLY @ p <= H_POLY + 1e-10)
    # the probability simplex as a polyhedron: the sort-based closed form
    simplex = (np.ones((1, 5)), np.ones(1), -np.eye(5), np.zeros(5))
    np.testing.assert_allclose(optim.projection_polyhedron(X_POLY, simplex), optim.projection_simplex(X_POLY),
                               atol=1e-9)
    # only equalities: the affine-set closed form; no constraints: x itself
    np.testing.assert_allclose(optim.projection_polyhedron(X_POLY, (A_AFF[:, :5], B_AFF, None, None)),
                               optim.projection_affine_set(X_POLY, (A_AFF[:, :5], B_AFF)), atol=1e-9)
    np.testing.assert_allclose(optim.projection_polyhedron(X_POLY, (None, None, None, None)), X_POLY)


def test_polyhedron_projection_jacobian_in_both_modes():
    # on the active set C = [A; G_act]: p = x − Cᵀ(CCᵀ)⁻¹(Cx − d), so ∂p/∂x = I − Cᵀ(CCᵀ)⁻¹C
    # and ∂p/∂h_act = Cᵀ(CCᵀ)⁻¹ restricted to the active rows
    def proj(x, h):
        return optim.projection_polyhedron(x, (A_POLY, B_POLY, G_POLY, h), check_feasible=False)

    p = np.asarray(proj(X_POLY, H_POLY))
    active = np.abs(G_POLY @ p - H_POLY) < 1e-8
    assert 0 < active.sum() < 4  # a face, not a vertex: the Jacobian is not trivial
    C = np.vstack([A_POLY, G_POLY[active]])
    K = C.T @ np.linalg.inv(C @ C.T)
    closed_x = np.eye(5) - K @ C
    closed_h = np.zeros((5, 4))
    closed_h[:, active] = K[:, 1:]
    step = 1e-4  # exact inside the piece; large enough that the 1e-12 solve tolerance is invisible
    fd_x = np.stack([(np.asarray(proj(X_POLY + step * e, H_POLY)) - np.asarray(proj(X_POLY - step * e, H_POLY)))
                     / (2 * step) for e in np.eye(5)], axis=1)
    fd_h = np.stack([(np.asarray(proj(X_POLY, H_POLY + step * e)) - np.asarray(proj(X_POLY, H_POLY - step * e)))
                     / (2 * step) for e in np.eye(4)], axis=1)
    np.testing.assert_allclose(fd_x, closed_x, atol=1e-7)
    np.testing.assert_allclose(fd_h, closed_h, atol=1e-7)
    u, v = rng_qp.normal(size=5), rng_qp.normal(size=5)

    def derivatives(x, h):
        return (jax.jacfwd(proj, argnums=(0, 1))(x, h), jax.jacrev(proj, argnums=(0, 1))(x, h),
                jax.jvp(lambda x: proj(x, h), (x,), (v,))[1], jax.vjp(lambda x: proj(x, h), x)[1](u)[0])

    (fwd_x, fwd_h), (rev_x, rev_h), jvp, vjp = jax.jit(derivatives, compiler_options=QUICK_COMPILE)(X_POLY, H_POLY)
    for jac_x, jac_h in ((fwd_x, fwd_h), (rev_x, rev_h)):
        np.testing.assert_allclose(jac_x, closed_x, atol=1e-9)
        np.testing.assert_allclose(jac_h, closed_h, atol=1e-9)
    np.testing.assert_allclose(u @ jvp, vjp @ v, rtol=1e-10)


def test_polyhedron_projection_reports_an_empty_polyhedron():
    # x1 + x2 = 1 with x1 + x2 <= 0: a Farkas certificate, not a silently wrong point
    hyper = (np.array([[1.0, 1.0]]), np.array([1.0]), np.array([[1.0, 1.0]]), np.array([0.0]))
    with pytest.raises(optim.InfeasibleProblemError, match="projection_polyhedron.*primal infeasible"):
        optim.projection_polyhedron(np.zeros(2), hyper)
    assert isinstance(optim.InfeasibleProblemError("x"), ms.RootError)
    optim.projection_polyhedron(np.zeros(2), hyper, check_feasible=False)  # no check asked: no error
