"""The implicit-differentiation core against independent truths.

Truths used: the closed-form ridge-regression Jacobian, dense NumPy solves and
pseudo-inverses, and central finite differences of the solver output.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import mdsens as ms
from mdsens import linear_solve

RTOL = 1e-10


# --------------------------------------------------------------------------------------
# Ridge regression: x*(λ) = argmin ½‖Xw − y‖² + ½λ‖w‖²,  dx*/dλ = −(XᵀX + λI)⁻¹ x*
# --------------------------------------------------------------------------------------

rng = np.random.default_rng(0)
X = rng.normal(size=(40, 8))
Y = rng.normal(size=40)


def ridge_closed_form(lam):
    A = X.T @ X + lam * np.eye(X.shape[1])
    return np.linalg.solve(A, X.T @ Y)


def ridge_jacobian_closed_form(lam):
    A = X.T @ X + lam * np.eye(X.shape[1])
    return -np.linalg.solve(A, ridge_closed_form(lam))


def ridge_optimality(w, lam):
    return X.T @ (X @ w - Y) + lam * w


def gradient_descent_ridge(init, lam, iterations=3000):
    """An iterative solver with a while_loop: reverse-mode autodiff cannot unroll it."""
    step = 1.0 / (np.linalg.eigvalsh(X.T @ X).max() + 10.0)

    def cond(state):
        w, k = state
        return (jnp.linalg.norm(ridge_optimality(w, lam)) > 1e-13) & (k < iterations)

    def body(state):
        w, k = state
        return w - step * ridge_optimality(w, lam), k + 1

    return lax.while_loop(cond, body, (init, 0))[0]


cg_tight = functools.partial(linear_solve.cg, tol=1e-13)
ridge_solver = ms.custom_root(ridge_optimality, solve=cg_tight, symmetric=True)(gradient_descent_ridge)


def test_ridge_forward_and_reverse_match_closed_form():
    lam = 3.0
    init = jnp.zeros(X.shape[1])
    truth = ridge_jacobian_closed_form(lam)
    forward = jax.jacfwd(ridge_solver, argnums=1)(init, lam)
    reverse = jax.jacrev(ridge_solver, argnums=1)(init, lam)
    np.testing.assert_allclose(forward, truth, rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(reverse, truth, rtol=RTOL, atol=1e-12)
    # and the primal is untouched by the decoration
    np.testing.assert_allclose(ridge_solver(init, lam), ridge_closed_form(lam), rtol=1e-10)


def test_init_gets_no_gradient_and_solver_is_not_unrolled():
    # init depends on λ: the implicit derivative must ignore that path, with no
    # stop_gradient from the user, and the while_loop solver must not be differentiated.
    lam = 2.0

    def loss(lam):
        init = lam * jnp.ones(X.shape[1])
        return jnp.sum(ridge_solver(init, lam))

    expected = ridge_jacobian_closed_form(lam).sum()
    np.testing.assert_allclose(jax.grad(loss)(lam), expected, rtol=RTOL)
    np.testing.assert_allclose(jax.jvp(loss, (lam,), (1.0,))[1], expected, rtol=RTOL)


def test_jit_and_vmap_over_theta():
    lams = jnp.array([0.5, 1.0, 4.0])
    init = jnp.zeros(X.shape[1])
    jac = jax.jit(jax.vmap(jax.jacfwd(ridge_solver, argnums=1), in_axes=(None, 0)))(init, lams)
    grads = jax.jit(jax.vmap(jax.grad(lambda i, l: jnp.sum(ridge_solver(i, l) ** 2), argnums=1),
                             in_axes=(None, 0)))(init, lams)
    for k, lam in enumerate(np.asarray(lams)):
        truth = ridge_jacobian_closed_form(lam)
        np.testing.assert_allclose(jac[k], truth, rtol=RTOL, atol=1e-12)
        np.testing.assert_allclose(grads[k], 2 * ridge_closed_form(lam) @ truth, rtol=1e-9)


def test_composition_with_pre_and_post_processing():
    # θ → λ = exp θ → x*(λ) → loss (paper §2.4): chain rule through the implicit layer.
    def loss(theta):
        return 0.5 * jnp.sum(ridge_solver(jnp.zeros(X.shape[1]), jnp.exp(theta)) ** 2)

    theta = 0.3
    lam = np.exp(theta)
    expected = ridge_closed_form(lam) @ ridge_jacobian_closed_form(lam) * lam
    np.testing.assert_allclose(jax.grad(loss)(theta), expected, rtol=RTOL)
    # second order: the Hessian of the outer loss, against central differences of the gradient
    h = 1e-4
    fd = (jax.grad(loss)(theta + h) - jax.grad(loss)(theta - h)) / (2 * h)
    np.testing.assert_allclose(jax.hessian(loss)(theta), fd, rtol=1e-6)


def test_finite_differences_of_solver_output():
    lam, h = 1.5, 1e-5
    fd = (ridge_closed_form(lam + h) - ridge_closed_form(lam - h)) / (2 * h)
    np.testing.assert_allclose(jax.jacfwd(ridge_solver, argnums=1)(jnp.zeros(8), lam), fd, rtol=1e-7)


# --------------------------------------------------------------------------------------
# Pytrees, keyword arguments and jvp/vjp consistency
# --------------------------------------------------------------------------------------


def dict_optimality(x, params, *, shift):
    w, b = x["w"], x["b"]
    return {
        "w": X.T @ (X @ w + b - Y) + params["lam"] * w * params["scale"],
        "b": jnp.sum(X @ w + b - Y) + params["mu"] * (b - shift),
    }


@ms.custom_root(dict_optimality, solve=functools.partial(linear_solve.cg, tol=1e-13), symmetric=True)
def dict_solver(init, params, *, shift):
    # closed-form solve of the same linear system: an "external" solver
    n = X.shape[1]
    A = jnp.zeros((n + 1, n + 1))
    A = A.at[:n, :n].set(X.T @ X + params["lam"] * params["scale"] * jnp.eye(n))
    A = A.at[:n, n].set(X.sum(0)).at[n, :n].set(X.sum(0)).at[n, n].set(X.shape[0] + params["mu"])
    rhs = jnp.concatenate([X.T @ Y, jnp.array([Y.sum() + params["mu"] * shift])])
    sol = jnp.linalg.solve(A, rhs)
    return {"w": sol[:n], "b": sol[n]}


PARAMS = {"lam": jnp.asarray(2.0), "mu": jnp.asarray(0.7), "scale": jnp.asarray(1.3)}
INIT = {"w": jnp.zeros(8), "b": jnp.asarray(0.0)}


def _flat_solution(params_vec, shift):
    params = dict(zip(["lam", "mu", "scale"], params_vec))
    out = dict_solver(INIT, params, shift=shift)
    return np.concatenate([np.asarray(out["w"]), [float(out["b"])]])


def test_pytree_params_and_kwargs_against_finite_differences():
    shift = 0.4
    jac = jax.jacfwd(lambda p, s: dict_solver(INIT, p, shift=s), argnums=(0, 1))(PARAMS, shift)
    base = np.array([2.0, 0.7, 1.3])
    h = 1e-6
    for i, name in enumerate(["lam", "mu", "scale"]):
        e = np.eye(3)[i] * h
        fd = (_flat_solution(base + e, shift) - _flat_solution(base - e, shift)) / (2 * h)
        got = np.concatenate([np.asarray(jac["w"][0][name]), [float(jac["b"][0][name])]])
        np.testing.assert_allclose(got, fd, rtol=1e-7, atol=1e-9)
    fd_shift = (_flat_solution(base, shift + h) - _flat_solution(base, shift - h)) / (2 * h)
    got_shift = np.concatenate([np.asarray(jac["w"][1]), [float(jac["b"][1])]])
    np.testing.assert_allclose(got_shift, fd_shift, rtol=1e-7, atol=1e-9)


def test_jvp_vjp_consistency_on_pytrees():
    shift = jnp.asarray(0.4)
    f = lambda p: dict_solver(INIT, p, shift=shift)  # noqa: E731
    v = {"lam": jnp.asarray(0.3), "mu": jnp.asarray(-1.1), "scale": jnp.asarray(0.6)}
    u = {"w": jnp.asarray(np.random.default_rng(3).normal(size=8)), "b": jnp.asarray(0.9)}
    _, jv = jax.jvp(f, (PARAMS,), (v,))
    _, pullback = jax.vjp(f, PARAMS)
    (ju,) = pullback(u)
    lhs = jnp.vdot(u["w"], jv["w"]) + u["b"] * jv["b"]
    rhs = sum(ju[k] * v[k] for k in v)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-11)


def test_root_jvp_and_root_vjp_plain_functions():
    lam = 1.7
    sol = jnp.asarray(ridge_closed_form(lam))
    tangent, info = ms.root_jvp(ridge_optimality, sol, (lam,), (1.0,), solve=cg_tight,
                                symmetric=True, return_info=True)
    np.testing.assert_allclose(tangent, ridge_jacobian_closed_form(lam), rtol=RTOL)
    assert bool(info.converged) and float(info.residual_norm) < 1e-11
    u = jnp.asarray(np.random.default_rng(1).normal(size=8))
    (cot,) = ms.root_vjp(ridge_optimality, sol, (lam,), u, solve=cg_tight, symmetric=True)
    np.testing.assert_allclose(cot, u @ ridge_jacobian_closed_form(lam), rtol=RTOL)


# --------------------------------------------------------------------------------------
# A non-symmetric fixed point: x = T(x, θ) = ½ tanh(W x) + θ
# --------------------------------------------------------------------------------------

W = np.random.default_rng(5).normal(size=(6, 6)) / 3.0


def contraction(x, theta):
    return 0.5 * jnp.tanh(W @ x) + theta


def iterate_to_fixed_point(init, theta):
    return lax.fori_loop(0, 200, lambda _, x: contraction(x, theta), init)


def fixed_point_jacobian_dense(x, theta):
    dT_dx = np.asarray(jax.jacfwd(contraction)(x, theta))
    return np.linalg.solve(np.eye(6) - dT_dx, np.eye(6))


@pytest.mark.parametrize("solver", [linear_solve.gmres, linear_solve.bicgstab, linear_solve.lu])
def test_nonsymmetric_fixed_point_both_modes(solver):
    theta = jnp.asarray(np.linspace(-0.5, 0.5, 6))
    fp = ms.custom_fixed_point(contraction, solve=functools.partial(solver, tol=1e-12))(iterate_to_fixed_point)
    x = fp(jnp.zeros(6), theta)
    np.testing.assert_allclose(x, contraction(x, theta), atol=1e-14)
    truth = fixed_point_jacobian_dense(x, theta)
    np.testing.assert_allclose(jax.jacfwd(fp, argnums=1)(jnp.zeros(6), theta), truth, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(jax.jacrev(fp, argnums=1)(jnp.zeros(6), theta), truth, rtol=1e-9, atol=1e-12)
    h = 1e-6
    fd = np.stack([(iterate_to_fixed_point(jnp.zeros(6), theta + h * e) -
                    iterate_to_fixed_point(jnp.zeros(6), theta - h * e)) / (2 * h) for e in np.eye(6)], 1)
    np.testing.assert_allclose(truth, fd, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------------------
# Singular systems: a periodic ring of anharmonic springs has a translation zero mode
# --------------------------------------------------------------------------------------

N_RING = 24
K_RING = np.random.default_rng(2).uniform(1.0, 2.0, N_RING)


def ring_energy(x, rest):
    d = jnp.roll(x, -1) - x
    d = d.at[-1].add(float(N_RING))  # periodic box of length N
    return 0.5 * jnp.sum(K_RING * (d - rest) ** 2) + 0.5 * jnp.sum(K_RING * (d - rest) ** 4)


ring_force = jax.grad(ring_energy)
REST = jnp.ones(N_RING) + 0.05 * np.random.default_rng(4).normal(size=N_RING)


def newton_ring(init, rest):
    def step(_, x):
        H = jax.hessian(ring_energy)(x, rest)
        return x - jnp.linalg.pinv(H) @ ring_force(x, rest)

    return lax.fori_loop(0, 40, step, init)


def translations(x, rest):
    return jnp.ones((1, N_RING))


def ring_pinv_jacobian(rest):
    x = newton_ring(jnp.arange(N_RING, dtype=float), rest)
    H = np.asarray(jax.hessian(ring_energy)(x, rest))
    B = np.asarray(jax.jacfwd(ring_force, argnums=1)(x, rest))
    return -np.linalg.pinv(H) @ B


@pytest.mark.parametrize("solver", [linear_solve.cg, linear_solve.minres, linear_solve.gmres])
def test_declared_nullspace_gives_pseudo_inverse_in_both_modes(solver):
    root = ms.custom_root(ring_force, solve=functools.partial(solver, tol=1e-13),
                          nullspace=translations, symmetric=True)(newton_ring)
    init = jnp.arange(N_RING, dtype=float)
    truth = ring_pinv_jacobian(REST)
    scale = np.abs(truth).max()
    forward = jax.jacfwd(root, argnums=1)(init, REST)
    reverse = jax.jacrev(root, argnums=1)(init, REST)
    np.testing.assert_allclose(forward / scale, truth / scale, atol=1e-8)
    np.testing.assert_allclose(reverse / scale, truth / scale, atol=1e-8)
    # the gauge: no net translation
    np.testing.assert_allclose(forward.sum(0), 0.0, atol=1e-10)


def test_singular_system_without_nullspace_is_an_error_not_a_number():
    root = ms.custom_root(ring_force, solve=cg_tight, symmetric=True)(newton_ring)
    init = jnp.arange(N_RING, dtype=float)
    # raised on the host inside the computation: JAX re-raises it as a JaxRuntimeError
    # whose message carries the LinearSolveError and its advice
    with pytest.raises(Exception, match="LinearSolveError: .*declare its zero modes with nullspace="):
        jax.jacrev(root, argnums=1)(init, REST)


def test_nonconverged_solve_raises_under_jit_and_warns_on_request():
    init = jnp.arange(N_RING, dtype=float)
    starved = functools.partial(linear_solve.cg, tol=1e-13, maxiter=2)
    root = ms.custom_root(ring_force, solve=starved, nullspace=translations, symmetric=True)(newton_ring)
    with pytest.raises(Exception, match="LinearSolveError: .*stopped after 2 iterations"):
        jax.block_until_ready(jax.jit(jax.jacfwd(root, argnums=1))(init, REST))
    root_warn = ms.custom_root(ring_force, solve=starved, nullspace=translations, symmetric=True,
                               on_failure="warn")(newton_ring)
    with pytest.warns(ms.LinearSolveWarning, match="stopped after 2 iterations"):
        jax.block_until_ready(jax.jacfwd(root_warn, argnums=1)(init, REST))
    # the flag itself is inspectable through root_jvp
    x = newton_ring(init, REST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info = ms.root_jvp(ring_force, x, (REST,), (jnp.ones(N_RING),), solve=starved,
                              nullspace=translations, symmetric=True, on_failure="ignore",
                              return_info=True)
    assert not bool(info.converged) and int(info.iterations) == 2


def test_optimality_structure_mismatch_names_both_structures():
    # a classic mistake: passing the objective instead of its gradient
    root = ms.custom_root(lambda x, rest: ring_energy(x, rest))(newton_ring)
    with pytest.raises(ms.OptimalityStructureError, match="shapes"):
        jax.jacfwd(root, argnums=1)(jnp.arange(N_RING, dtype=float), REST)


# --------------------------------------------------------------------------------------
# The linear solvers themselves
# --------------------------------------------------------------------------------------


def _spd(n, seed):
    a = np.random.default_rng(seed).normal(size=(n, n))
    return a @ a.T + n * np.eye(n)


@pytest.mark.parametrize("name", ["cg", "minres", "gmres", "bicgstab", "lu", "cholesky", "lstsq"])
def test_linear_solvers_match_numpy_with_ridge_and_preconditioner(name):
    solver = getattr(linear_solve, name)
    A = _spd(30, 0)
    b = np.random.default_rng(1).normal(size=30)
    diag = np.diag(A)
    x, info = solver(lambda v: A @ v, b, tol=1e-12, ridge=0.5, precond=lambda v: v / (diag + 0.5))
    np.testing.assert_allclose(x, np.linalg.solve(A + 0.5 * np.eye(30), b), rtol=1e-9)
    assert bool(info.converged)
    np.testing.assert_allclose(info.residual_norm, np.linalg.norm((A + 0.5 * np.eye(30)) @ x - b), atol=1e-12)


def test_cg_absolute_floor_stops_each_lane_at_its_own_residual():
    """``atol`` ends CG once ``‖A x − b‖ ≤ max(tol ‖b‖, atol)``, per vmapped lane, and
    ``converged`` uses the same test; 0 is the relative tolerance alone (numpy's solve)."""
    A = _spd(60, 5) / 60 + np.diag(np.geomspace(1e-3, 1.0, 60))
    B = np.random.default_rng(6).normal(size=(3, 60))
    floors = np.array([0.0, 1e-3, 1e-1]) * np.linalg.norm(B, axis=1)
    solve = jax.vmap(lambda b, f: linear_solve.cg(lambda v: A @ v, b, tol=1e-12, atol=f))
    X, info = solve(jnp.asarray(B), jnp.asarray(floors))
    residual = np.linalg.norm(X @ A.T - B, axis=1)
    np.testing.assert_allclose(X[0], np.linalg.solve(A, B[0]), rtol=1e-8)
    assert residual[0] <= 1e-11 * np.linalg.norm(B[0])
    assert np.all(residual[1:] <= 1.01 * floors[1:]) and np.all(np.asarray(info.converged))
    its = np.asarray(info.iterations)
    assert its[0] > its[1] > its[2] > 0


def test_each_column_solves_every_column_and_each_stops_at_its_own_count():
    """``each_column`` returns what ``vmap`` would (numpy's solves, stacked), under ``jit``
    too; on the CPU each column's CG runs as many steps as a solve of its own."""
    A = _spd(60, 5) / 60 + np.diag(np.geomspace(1e-3, 1.0, 60))
    B = np.random.default_rng(7).normal(size=(3, 60))
    B[1] = np.linalg.eigh(A)[1][:, -1]  # an eigenvector: one step
    solve = lambda b: linear_solve.cg(lambda v: A @ v, b, tol=1e-12)  # noqa: E731
    X, info = jax.jit(lambda B: linear_solve.each_column(solve, B))(jnp.asarray(B))
    np.testing.assert_allclose(X, np.linalg.solve(A, B.T).T, rtol=1e-8, atol=1e-12)
    own = [int(solve(jnp.asarray(b))[1].iterations) for b in B]
    assert own[1] == 1 and np.asarray(info.iterations).tolist() == own
    # several arguments and pytree outputs slice together, as with vmap
    pairs = linear_solve.each_column(lambda b, s: {"x": s * b, "n": jnp.sum(b)}, jnp.asarray(B), jnp.arange(3.0))
    np.testing.assert_allclose(pairs["x"], B * np.arange(3.0)[:, None])
    np.testing.assert_allclose(pairs["n"], B.sum(axis=1))


def test_minres_and_gmres_handle_symmetric_indefinite_where_cg_reports_breakdown():
    A = _spd(20, 2) - 30.0 * np.eye(20)
    assert np.linalg.eigvalsh(A).min() < 0 < np.linalg.eigvalsh(A).max()
    b = np.random.default_rng(3).normal(size=20)
    for solver in (linear_solve.minres, linear_solve.gmres):
        x, info = solver(lambda v: A @ v, b, tol=1e-11)
        np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-8)
        assert bool(info.converged)
    _, info = linear_solve.cg(lambda v: A @ v, b, tol=1e-11)
    assert not bool(info.converged)


def test_cg_lanczos_tridiagonal_has_the_extreme_eigenvalues():
    """CG's Lanczos tridiagonal: its Ritz values span the spectrum of A (numpy eigvalsh)
    once CG has converged, its first k × k block is the Lanczos matrix of A on the
    Krylov space of b (Ritz values equal those of the explicit orthonormal basis), and
    the solution is CG's."""
    import scipy.linalg

    rng = np.random.default_rng(4)
    Q, _ = np.linalg.qr(rng.normal(size=(80, 80)))
    w = np.geomspace(0.05, 40.0, 80)
    A = (Q * w) @ Q.T
    b = rng.normal(size=80)
    x, info, T = linear_solve.cg_lanczos(lambda v: A @ v, b, steps=200, tol=1e-12)
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-9)
    x_cg, _ = linear_solve.cg(lambda v: A @ v, b, tol=1e-12)
    np.testing.assert_array_equal(x, x_cg)
    k = int(T.steps)
    assert k == int(info.iterations) and bool(info.converged)
    ritz = scipy.linalg.eigh_tridiagonal(np.asarray(T.diagonal)[:k], np.asarray(T.off_diagonal)[:k - 1],
                                         eigvals_only=True)
    np.testing.assert_allclose([ritz.min(), ritz.max()], [w[0], w[-1]], rtol=1e-8)
    # the 6-step block against Lanczos by hand: Rayleigh–Ritz on the orthonormalized Krylov basis
    K = np.linalg.qr(np.stack([np.linalg.matrix_power(A, j) @ b for j in range(6)], axis=1))[0]
    ritz6 = scipy.linalg.eigh_tridiagonal(np.asarray(T.diagonal)[:6], np.asarray(T.off_diagonal)[:5],
                                          eigvals_only=True)
    np.testing.assert_allclose(ritz6, np.linalg.eigvalsh(K.T @ A @ K), rtol=1e-9)


def test_cholesky_flags_indefinite_matrix():
    A = np.diag([1.0, -1.0, 2.0])
    _, info = linear_solve.cholesky(lambda v: A @ v, np.ones(3))
    assert bool(info.breakdown) and not bool(info.converged)


def test_lstsq_gives_minimum_norm_solution_of_consistent_singular_system():
    B = np.random.default_rng(7).normal(size=(10, 4))
    A = B @ B.T  # rank 4
    b = A @ np.random.default_rng(8).normal(size=10)
    x, info = linear_solve.lstsq(lambda v: A @ v, b)
    np.testing.assert_allclose(x, np.linalg.pinv(A) @ b, rtol=1e-8, atol=1e-10)
    assert bool(info.converged)
