"""The optimization catalog's conditions and solvers against independent truths.

Every optimality condition of ``mdsens.optim.conditions`` differentiates a small problem
with a known or independently computed solution, in forward (``jacfwd``) and reverse
(``jacrev``) mode. Truths: closed forms written here in NumPy (ridge; the lasso on its
support; the box-QP on its free set; the simplex projection's Jacobian; the implicit
formula of a contraction), SciPy solutions of the primal (L-BFGS-B, SLSQP, ``linprog``,
``least_squares``) and central finite differences of SciPy re-solves. Two solvers with
different conditions on one problem must give the same Jacobian, fixed-point and root
forms must agree, and unrolled differentiation must converge to the implicit result.

Compilation dominates the runtime, so each test compiles its derivatives once
(``both_modes``) and most use ``FAST`` options (see there). Second solvers of a problem
already covered in the default suite are marked ``slow``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize as so

import mdsens as ms
from mdsens import linear_solve, optim

lu = functools.partial(linear_solve.lu, tol=1e-10)
#: Dense LU for the implicit solve and no host-side root / linear-solve checks: these
#: halve the compile time of a derivative. The defaults (CG, the checks) run in the
#: ridge and root-check tests, GMRES in the slow LP test; the core's own tests cover them.
FAST = {"solve": lu, "on_failure": "ignore"}
#: The test programs are tiny and run once: compile them without LLVM optimization.
QUICK_COMPILE = {"xla_backend_optimization_level": 0}
rng = np.random.default_rng(11)


def both_modes(fun, *theta, argnums=0):
    """``(jacfwd, jacrev)`` of ``fun`` at ``theta``, compiled as one program.

    Compiling is what these tests spend their time on (a few seconds per solver and
    derivative); eager evaluation would re-trace the solvers' loops op by op, slower still.
    """
    def both(*t):
        return jax.jacfwd(fun, argnums=argnums)(*t), jax.jacrev(fun, argnums=argnums)(*t)

    return jax.jit(both, compiler_options=QUICK_COMPILE)(*theta)


def assert_both(pair, truth, **tol):
    for got in pair:
        np.testing.assert_allclose(got, truth, **tol)


# --------------------------------------------------------------------------------------
# Stationarity: ridge regression by gradient descent and Newton (closed form)
# --------------------------------------------------------------------------------------
XR = rng.normal(size=(20, 5))
YR = rng.normal(size=20)


def ridge_objective(w, lam):
    return 0.5 * jnp.sum((XR @ w - YR) ** 2) + 0.5 * lam * jnp.sum(w ** 2)


def ridge_jacobian(lam):
    A = XR.T @ XR + lam * np.eye(5)
    return -np.linalg.solve(A, np.linalg.solve(A, XR.T @ YR))


def test_stationary_condition_ridge_by_gradient_descent_with_defaults_under_jit_and_vmap():
    # the defaults: CG on the Hessian and the core's root and linear-solve checks, here
    # in reverse mode (hyperparameter gradients); forward mode of the same condition is
    # in the Gauss–Newton test
    gd = optim.GradientDescent(ridge_objective, tol=1e-12, maxiter=2000)
    lams = jnp.array([0.5, 3.0])
    rev = jax.jit(jax.vmap(jax.jacrev(lambda lam: gd.run(jnp.zeros(5), lam).params)),
                  compiler_options=QUICK_COMPILE)(lams)
    for k, lam in enumerate(np.asarray(lams)):
        np.testing.assert_allclose(rev[k], ridge_jacobian(lam), rtol=1e-9, atol=1e-12)


DIFF = np.diff(np.eye(5), axis=0)  # (4, 5): d = D x, blind to a common shift of x


def chain_energy(x, theta):
    d = DIFF @ x
    return 0.5 * jnp.sum((d - theta) ** 2) + 0.25 * jnp.sum(d ** 4)


def test_a_declared_gauge_gives_the_minimum_norm_jacobian():
    # f(x + c1) = f(x): ∇²f is singular along 1. The derivative is defined up to that
    # gauge; with nullspace= the solver returns the minimum-norm one, −(∇²f)⁺ ∂θ∇f.
    theta = np.array([0.3, -0.8, 1.1, 0.2])
    gd = optim.GradientDescent(chain_energy, tol=1e-12, maxiter=5000,
                               nullspace=lambda x, theta: jnp.ones((1, 5)), **FAST)
    # each difference solves d + d³ = θ (a monotone scalar equation), and x = D⁺d has mean 0
    d = np.array([so.brentq(lambda v: v + v ** 3 - t, -5, 5, xtol=1e-15) for t in theta])
    x = np.linalg.pinv(DIFF) @ d
    np.testing.assert_allclose(gd.run(jnp.zeros(5), theta).params, x, atol=1e-9)
    hessian = DIFF.T @ np.diag(1 + 3 * d ** 2) @ DIFF
    truth = np.linalg.pinv(hessian) @ DIFF.T  # ∂θ∇f = −Dᵀ
    assert_both(both_modes(lambda t: gd.run(jnp.zeros(5), t).params, theta), truth, atol=1e-10)


@pytest.mark.slow
def test_stationary_condition_ridge_by_newton():
    newton = optim.Newton(ridge_objective, **FAST)
    assert_both(both_modes(lambda lam: newton.run(jnp.zeros(5), lam).params, 3.0), ridge_jacobian(3.0),
                rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------
# Proximal gradient and block proximal gradient: the lasso (closed form on its support)
# --------------------------------------------------------------------------------------
XL = rng.normal(size=(25, 8))
YL = XL @ np.array([1.5, 0, 0, -2.0, 0, 0.7, 0, 0]) + 0.3 * rng.normal(size=25)
LAM = 8.0


def lasso_loss(w, y):
    return 0.5 * jnp.sum((XL @ w - y) ** 2)


def lasso_by_scipy(lam, y):
    """argmin ½‖Xw − y‖² + λ‖w‖₁ as a bound-constrained smooth problem in (u, v), w = u − v."""
    def objective(uv):
        r = XL @ (uv[:8] - uv[8:]) - y
        g = XL.T @ r
        return 0.5 * r @ r + lam * uv.sum(), np.concatenate([g + lam, -g + lam])

    res = so.minimize(objective, np.zeros(16), jac=True, method="L-BFGS-B", bounds=[(0, None)] * 16,
                      options={"ftol": 1e-16, "gtol": 1e-12, "maxiter": 10000})
    return res.x[:8] - res.x[8:]


def lasso_jacobians(w):
    """On the support S (signs s): w_S = H_SS⁻¹ (X_Sᵀ y − λ s), zero elsewhere."""
    S = np.abs(w) > 1e-6
    H = XL[:, S].T @ XL[:, S]
    d_lam, d_y = np.zeros(8), np.zeros((8, 25))
    d_lam[S] = -np.linalg.solve(H, np.sign(w[S]))
    d_y[S] = np.linalg.solve(H, XL[:, S].T)
    return d_lam, d_y


@functools.lru_cache(maxsize=None)
def lasso_truth():
    w = lasso_by_scipy(LAM, YL)
    return w, lasso_jacobians(w)


@pytest.mark.parametrize("solver", [
    # FISTA with line search, dense LU for the implicit solve
    optim.ProximalGradient(lasso_loss, optim.prox_lasso, tol=1e-12, maxiter=5000, **FAST),
    # coordinate descent
    optim.BlockCoordinateDescent(lasso_loss, optim.prox_lasso, tol=1e-13, maxiter=2000, **FAST),
], ids=["proximal_gradient", "block_coordinate_descent"])
def test_lasso_jacobian_matches_closed_form_on_support(solver):
    w_truth, (d_lam, d_y) = lasso_truth()
    params, state = solver.run(jnp.zeros(8), LAM, YL)
    np.testing.assert_allclose(params, w_truth, atol=1e-8)
    assert int(state.iter_num) < solver.maxiter
    # JAXopt's keyword style; derivatives flow into keyword arguments too
    sol = lambda lam, y: solver.run(jnp.zeros(8), hyperparams_prox=lam, y=y).params  # noqa: E731
    (fwd_lam, fwd_y), (rev_lam, rev_y) = both_modes(sol, LAM, YL, argnums=(0, 1))
    assert_both((fwd_lam, rev_lam), d_lam, atol=1e-9)
    assert_both((fwd_y, rev_y), d_y, atol=1e-9)


@pytest.mark.slow
def test_unrolled_proximal_gradient_converges_to_the_implicit_jacobian():
    _, (d_lam, _) = lasso_truth()
    step = 1.0 / np.linalg.eigvalsh(XL.T @ XL).max()

    def unrolled(maxiter):
        solver = optim.ProximalGradient(lasso_loss, optim.prox_lasso, stepsize=step, acceleration=False,
                                        tol=0.0, maxiter=maxiter, implicit_diff=False)
        return lambda lam: solver.run(jnp.zeros(8), lam, YL).params

    fwd, rev = both_modes(unrolled(400), LAM)
    assert_both((fwd, rev), d_lam, atol=1e-8)
    # and the unrolled derivative is the limit, not the value, after few iterations
    early = jax.jit(jax.jacrev(unrolled(5)), compiler_options=QUICK_COMPILE)(LAM)
    assert np.abs(np.asarray(early) - d_lam).max() > 1e-3


# --------------------------------------------------------------------------------------
# Projected gradient, conic residual map and KKT: a box-constrained QP
# --------------------------------------------------------------------------------------
NQ = 6
_M = rng.normal(size=(NQ, NQ))
QQ = _M @ _M.T + np.eye(NQ)
QV = 3.0 * rng.normal(size=NQ)
LOWER, UPPER = -0.5 * np.ones(NQ), 0.5 * np.ones(NQ)


def qp_objective(x, q):
    return 0.5 * x @ QQ @ x + q @ x


@functools.lru_cache(maxsize=None)
def box_qp_truth():
    res = so.minimize(lambda x: (0.5 * x @ QQ @ x + QV @ x, QQ @ x + QV), np.zeros(NQ), jac=True,
                      method="L-BFGS-B", bounds=list(zip(LOWER, UPPER)),
                      options={"ftol": 1e-16, "gtol": 1e-12})
    x = res.x
    free = (x > LOWER + 1e-7) & (x < UPPER - 1e-7)
    assert 0 < free.sum() < NQ  # both kinds of coordinates are exercised
    # on the free set F: Q_FF x_F = −q_F − Q_FA x_A, the active coordinates stay at their bounds
    dq, du = np.zeros((NQ, NQ)), np.zeros((NQ, NQ))
    inv = np.linalg.inv(QQ[np.ix_(free, free)])
    dq[np.ix_(free, free)] = -inv
    upper_active = x >= UPPER - 1e-7
    du[upper_active, upper_active] = 1.0
    du[np.ix_(free, upper_active)] = -inv @ QQ[np.ix_(free, upper_active)]
    return x, dq, du


G_BOX = np.vstack([np.eye(NQ), -np.eye(NQ)])


BOX_PG = optim.ProjectedGradient(qp_objective, optim.projection_box, tol=1e-12, maxiter=5000, **FAST)
BOX_CONIC = optim.ConicQP(tol=1e-12, **FAST)


def box_qp_by_projected_gradient(q, upper):
    return BOX_PG.run(jnp.zeros(NQ), (LOWER, upper), q).params


def box_qp_by_conic(q, upper):
    return BOX_CONIC.run(None, (QQ, q), None, (G_BOX, jnp.concatenate([upper, -LOWER]))).params.primal


@pytest.mark.parametrize("solve", [
    box_qp_by_projected_gradient,
    pytest.param(box_qp_by_conic, marks=pytest.mark.slow),
], ids=["projected_gradient", "conic"])
def test_box_qp_jacobian_matches_closed_form_on_the_free_set(solve):
    x_truth, dq, du = box_qp_truth()
    np.testing.assert_allclose(solve(QV, UPPER), x_truth, atol=1e-8)
    (fq, fu), (rq, ru) = both_modes(solve, QV, UPPER, argnums=(0, 1))
    assert_both((fq, rq), dq, atol=1e-9)
    assert_both((fu, ru), du, atol=1e-9)


# min ½‖x − θ‖²  s.t.  1ᵀx = 1 (ν),  −x ≤ 0 (λ): its solution is the simplex projection
NS = 6
THETA_S = rng.normal(size=NS) * 0.6
ONES_S = np.ones((1, NS))


SIMPLEX_CONIC = optim.ConicQP(tol=1e-12, **FAST)


def simplex_qp_primal_dual(_, theta):
    sol = SIMPLEX_CONIC.run(None, (np.eye(NS), -theta), (ONES_S, np.ones(1)), (-np.eye(NS), np.zeros(NS))).params
    return optim.KKTSolution(sol.primal, sol.dual_eq, sol.dual_ineq)


def simplex_jacobian_truth(theta):
    # the simplex projection by sorting (Held et al.), written here in NumPy
    u = np.sort(theta)[::-1]
    k = np.arange(1, NS + 1)
    rho = k[u - (np.cumsum(u) - 1) / k > 0][-1]
    x = np.maximum(theta - (np.cumsum(u)[rho - 1] - 1) / rho, 0)
    s = (x > 0).astype(float)
    return x, np.diag(s) - np.outer(s, s) / s.sum()


def test_kkt_condition_on_the_simplex_qp_matches_the_simplex_projection_jacobian():
    F = optim.kkt(lambda x, th: 0.5 * jnp.sum((x - th) ** 2), eq=lambda x, _: ONES_S @ x - 1.0,
                  ineq=lambda x, _: -x)
    kkt_solver = ms.custom_root(lambda z, th: F(z, th, None, None), **FAST)(simplex_qp_primal_dual)
    init = optim.KKTSolution(jnp.zeros(NS), jnp.zeros(1), jnp.zeros(NS))
    x, truth = simplex_jacobian_truth(THETA_S)
    z = kkt_solver(init, THETA_S)
    np.testing.assert_allclose(z.primal, x, atol=1e-9)
    assert float(jnp.min(z.dual_ineq)) > -1e-9  # dual feasibility, delivered by the solver
    assert_both(both_modes(lambda th: kkt_solver(init, th).primal, THETA_S), truth, atol=1e-9)


@pytest.mark.slow
def test_conic_condition_with_a_zero_cone_matches_the_simplex_projection_jacobian():
    _, truth = simplex_jacobian_truth(THETA_S)
    assert_both(both_modes(lambda th: simplex_qp_primal_dual(None, th).primal, THETA_S), truth, atol=1e-9)


@pytest.mark.slow
def test_lp_vertex_derivative_by_the_conic_condition_matches_linprog_finite_differences():
    # min cᵀx s.t. Gx ≤ h: a non-degenerate vertex, so x* is locally A_act⁻¹ h_act
    c = np.array([-1.0, -2.0])
    G = np.array([[1.0, 1.0], [1.0, 3.0], [-1.0, 0.0], [0.0, -1.0]])
    h = np.array([4.0, 6.0, 0.0, 0.0])

    def linprog(c, h):
        res = so.linprog(c, A_ub=G, b_ub=h, bounds=[(None, None)] * 2, method="highs")
        assert res.status == 0
        return res.x

    cqp = optim.ConicQP()  # default GMRES

    def by_conic(c, h):
        return cqp.run(None, (None, c), None, (G, h)).params.primal

    np.testing.assert_allclose(by_conic(c, h), linprog(c, h), atol=1e-8)
    eps = 1e-5
    fd_h = np.stack([(linprog(c, h + eps * e) - linprog(c, h - eps * e)) / (2 * eps) for e in np.eye(4)], 1)
    (fc, fh), (rc, rh) = both_modes(by_conic, c, h, argnums=(0, 1))
    assert_both((fh, rh), fd_h, atol=1e-8)
    assert_both((fc, rc), np.zeros((2, 2)), atol=1e-8)  # a vertex does not move with c


# Infeasibility: the Douglas–Rachford step tends to the minimal displacement, whose parts
# are certificates (a Farkas ray for an empty feasible set, a descent ray when unbounded).
# SciPy's linprog (HiGHS) is the independent verdict.
G_LP = np.array([[1.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
LP_CONE = optim.Cone(nonnegative=3)


def test_conic_solver_reports_a_primal_infeasible_lp_with_a_farkas_certificate():
    # x ≥ 0 and x1 + x2 ≤ −1: empty
    c, h = np.array([1.0, 1.0]), np.array([-1.0, 0.0, 0.0])
    assert so.linprog(c, A_ub=G_LP, b_ub=h, bounds=[(None, None)] * 2, method="highs").status == 2
    solver = optim.ConicSolver(LP_CONE, on_failure="ignore")
    state = solver.run(None, None, c, G_LP, h).state
    assert optim.solvers.conic.STATUS[int(state.status)] == "primal infeasible"
    assert int(state.iter_num) < 1000  # stopped by the certificate, not by maxiter
    y = np.asarray(state.certificate[1]) / np.max(np.abs(state.certificate[1]))
    assert np.all(y >= -1e-12) and h @ y < -1e-3  # y ∈ K*, bᵀy < 0 ...
    # ... and Aᵀy = 0 (to infeasibility_tol · max|A|): no x is feasible
    assert np.max(np.abs(G_LP.T @ y)) <= solver.infeasibility_tol
    with pytest.raises(optim.InfeasibleProblemError, match="primal infeasible.*Change b"):
        optim.ConicSolver(LP_CONE).run(None, None, c, G_LP, h)
    with pytest.warns(optim.InfeasibleProblemWarning, match="primal infeasible"):
        optim.ConicSolver(LP_CONE, on_failure="warn").run(None, None, c, G_LP, h)


def test_conic_qp_reports_an_unbounded_lp_with_a_descent_ray():
    # min −x1 − x2 s.t. x ≥ 0, x1 − x2 ≤ 1: unbounded along (1, 1)
    c, G, h = np.array([-1.0, -1.0]), np.array([[-1.0, 0.0], [0.0, -1.0], [1.0, -1.0]]), np.array([0.0, 0.0, 1.0])
    assert so.linprog(c, A_ub=G, b_ub=h, bounds=[(None, None)] * 2, method="highs").status == 3
    qp = optim.ConicQP(on_failure="ignore")
    state = qp.run(None, (None, c), None, (G, h)).state
    assert optim.solvers.conic.STATUS[int(state.status)] == "dual infeasible"
    d = np.asarray(state.certificate[0]) / np.max(np.abs(state.certificate[0]))
    assert c @ d < -1e-3 and np.all(G @ d <= 1e-9)  # a feasible direction of descent
    with pytest.raises(optim.InfeasibleProblemError, match="QP is dual infeasible.*unbounded"):
        optim.ConicQP().run(None, (None, c), None, (G, h))
    # inside jit nothing can be raised: the status says it
    status = jax.jit(lambda c: qp.run(None, (None, c), None, (G, h)).state.status)(c)
    assert int(status) == 2
    # a bounded, feasible neighbour (x1 + x2 ≤ 3 added) is solved, status 0
    G3, h3 = np.vstack([G, [1.0, 1.0]]), np.append(h, 3.0)
    step = qp.run(None, (None, c), None, (G3, h3))
    assert int(step.state.status) == 0
    np.testing.assert_allclose(c @ np.asarray(step.params.primal), -3.0, atol=1e-8)


# --------------------------------------------------------------------------------------
# Mirror descent: KL geometry on the simplex (closed-form KKT Jacobian)
# --------------------------------------------------------------------------------------
def test_mirror_descent_on_the_simplex_matches_the_kkt_closed_form():
    t = np.array([0.5, 0.1, 0.3, 0.2, -0.1])

    def f(x, t):
        return 0.5 * jnp.sum((x - t) ** 2) + 0.1 * jnp.sum(x * jnp.log(x))

    res = so.minimize(lambda x: (0.5 * np.sum((x - t) ** 2) + 0.1 * np.sum(x * np.log(x)),
                                 x - t + 0.1 * (np.log(x) + 1)), np.full(5, 0.2), jac=True, method="SLSQP",
                      bounds=[(1e-12, 1)] * 5, constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
                      options={"ftol": 1e-15})
    md = optim.MirrorDescent(f, tol=1e-12, maxiter=5000, **FAST)
    sol = lambda t: md.run(jnp.full(5, 0.2), None, t).params  # noqa: E731
    x = np.asarray(sol(t))
    np.testing.assert_allclose(x, res.x, atol=1e-7)
    # interior KKT: ∇f(x) + μ1 = 0, 1ᵀx = 1  ⇒  dx/dt = H⁻¹ − H⁻¹11ᵀH⁻¹/(1ᵀH⁻¹1), H = I + 0.1/x
    Hinv = np.diag(1.0 / (1.0 + 0.1 / x))
    one = np.ones(5)
    truth = Hinv - np.outer(Hinv @ one, one @ Hinv) / (one @ Hinv @ one)
    assert_both(both_modes(sol, t), truth, atol=1e-9)


# --------------------------------------------------------------------------------------
# Newton and Gauss–Newton: fixed-point and root forms agree
# --------------------------------------------------------------------------------------
KN = np.array([[2.0, 0.5, 0.0], [0.5, 1.5, 0.3], [0.0, 0.3, 1.0]])


def cosh_objective(x, t):
    return jnp.sum(jnp.cosh(x - t)) + 0.5 * x @ KN @ x


def newton_truth(t):
    res = so.minimize(lambda x: np.sum(np.cosh(x - t)) + 0.5 * x @ KN @ x, np.zeros(3),
                      jac=lambda x: np.sinh(x - t) + KN @ x, method="BFGS", options={"gtol": 1e-12})
    D = np.diag(np.cosh(res.x - t))
    return res.x, np.linalg.solve(D + KN, D)  # −(∇²f)⁻¹ ∂t∇f with ∂t∇f = −D


T_NEWTON = np.array([0.4, -0.3, 1.1])


NEWTON = optim.Newton(cosh_objective, **FAST)


def newton_primal(_, t):
    return NEWTON.run(jnp.zeros(3), t).params


def test_newton_fixed_point_matches_closed_form():
    fixed_point = ms.custom_fixed_point(optim.newton(jax.grad(cosh_objective)), **FAST)(newton_primal)
    x, truth = newton_truth(T_NEWTON)
    np.testing.assert_allclose(newton_primal(None, T_NEWTON), x, atol=1e-9)
    assert_both(both_modes(lambda t: fixed_point(jnp.zeros(3), t), T_NEWTON), truth, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_newton_solver_root_form_and_matrix_free_fixed_point_agree_with_closed_form():
    cg = functools.partial(linear_solve.cg, tol=1e-13)
    newton = optim.Newton(cosh_objective, inner_solve=cg, **FAST)  # root form: stationarity
    primal = lambda _, t: newton.run(jnp.zeros(3), t).params  # noqa: E731
    fixed_point = ms.custom_fixed_point(optim.newton(jax.grad(cosh_objective), step=0.5, solve=cg),
                                        **FAST)(primal)
    _, truth = newton_truth(T_NEWTON)
    fwd, rev = both_modes(lambda t: (primal(None, t), fixed_point(jnp.zeros(3), t)), T_NEWTON)
    assert_both(fwd + rev, truth, rtol=1e-9, atol=1e-12)


S_GN = np.linspace(0.0, 1.0, 7)
DATA_GN = 1.3 * np.exp(-0.8 * S_GN) + 0.05 * np.sin(9 * S_GN)  # not an exact fit: r ≠ 0


def exp_residual(x, shift):
    return x[0] * jnp.exp(x[1] * S_GN) - (DATA_GN + shift)


def test_gauss_newton_solver_and_fixed_point_match_the_least_squares_jacobian():
    def scipy_fit(shift):
        res = so.least_squares(lambda x: x[0] * np.exp(x[1] * S_GN) - (DATA_GN + shift), np.array([1.0, -1.0]),
                               jac=lambda x: np.stack([np.exp(x[1] * S_GN), x[0] * S_GN * np.exp(x[1] * S_GN)], 1),
                               method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15)
        return res.x

    shift = 0.1 * np.cos(3 * S_GN)
    x = scipy_fit(shift)
    # ½‖r‖² with r = x₀ e^{x₁ s} − d − shift: dx/dshift = H⁻¹ Jᵀ, H = JᵀJ + Σ rᵢ ∇²rᵢ (r ≠ 0 here)
    e = np.exp(x[1] * S_GN)
    r = x[0] * e - DATA_GN - shift
    J = np.stack([e, x[0] * S_GN * e], 1)
    cross = np.sum(r * S_GN * e)
    H = J.T @ J + np.array([[0.0, cross], [cross, np.sum(r * x[0] * S_GN ** 2 * e)]])
    truth = np.linalg.solve(H, J.T)
    h = 1e-3  # and finite differences of SciPy's re-solves agree (Richardson, O(h⁴))
    central = [np.stack([(scipy_fit(shift + k * e) - scipy_fit(shift - k * e)) / (2 * k) for e in np.eye(7)], 1)
               for k in (h, h / 2)]
    np.testing.assert_allclose((4 * central[1] - central[0]) / 3, truth, atol=2e-6)

    gn = optim.GaussNewton(exp_residual, tol=1e-12, **FAST)  # root form: stationarity of ½‖r‖²
    primal = lambda _, s: gn.run(jnp.array([1.0, -1.0]), s).params  # noqa: E731
    fixed_point = ms.custom_fixed_point(optim.gauss_newton(exp_residual), **FAST)(primal)
    np.testing.assert_allclose(primal(None, shift), x, atol=1e-9)
    fwd, rev = both_modes(lambda s: (primal(None, s), fixed_point(jnp.ones(2), s)), shift)
    assert_both(fwd + rev, truth, rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------------------
# Fixed points: plain iteration, Anderson acceleration, unrolled
# --------------------------------------------------------------------------------------
WF = rng.normal(size=(6, 6)) / 3.0


def contraction(x, theta):
    return 0.5 * jnp.tanh(WF @ x) + theta


THETA_FP = np.linspace(-0.5, 0.5, 6)


def contraction_truth(theta):
    x = np.asarray(optim.FixedPointIteration(contraction, tol=1e-14).run(jnp.zeros(6), theta).params)
    np.testing.assert_allclose(x, 0.5 * np.tanh(WF @ x) + theta, atol=1e-13)
    # x = T(x, θ):  dx/dθ = (I − ∂T/∂x)⁻¹,  ∂T/∂x = ½ diag(1 − tanh²(Wx)) W
    return np.linalg.inv(np.eye(6) - 0.5 * (1 - np.tanh(WF @ x) ** 2)[:, None] * WF)


@pytest.mark.parametrize("solver", [
    optim.FixedPointIteration(contraction, tol=1e-13, **FAST),
    optim.FixedPointIteration(contraction, tol=0.0, maxiter=80, implicit_diff=False),
    pytest.param(optim.AndersonAcceleration(contraction, history_size=4, tol=1e-13, **FAST),
                 marks=pytest.mark.slow),
], ids=["implicit", "unrolled", "anderson"])
def test_fixed_point_jacobian_matches_the_implicit_formula(solver):
    sol = lambda th: solver.run(jnp.zeros(6), th).params  # noqa: E731
    assert_both(both_modes(sol, THETA_FP), contraction_truth(THETA_FP), rtol=1e-9, atol=1e-11)


def test_anderson_acceleration_needs_fewer_iterations():
    fpi = optim.FixedPointIteration(contraction, tol=1e-12)
    anderson = optim.AndersonAcceleration(contraction, history_size=4, tol=1e-12)
    x_fpi, s_fpi = fpi.run(jnp.zeros(6), THETA_FP)
    x_and, s_and = anderson.run(jnp.zeros(6), THETA_FP)
    np.testing.assert_allclose(x_and, x_fpi, atol=1e-11)
    assert int(s_and.iter_num) < int(s_fpi.iter_num)


# --------------------------------------------------------------------------------------
# Bad input and failed checks
# --------------------------------------------------------------------------------------
def _f(x, *args):
    return jnp.sum(x ** 2)


@pytest.mark.parametrize("build, match", [
    (lambda: optim.GradientDescent(_f, maxiter=0), "maxiter"),
    (lambda: optim.ProximalGradient(_f, tol=-1.0), "tol"),
    (lambda: optim.ProximalGradient(_f, stepsize=float("nan")), "stepsize"),
    (lambda: optim.ProximalGradient(_f, decrease_factor=1.5), "decrease_factor"),
    (lambda: optim.GradientDescent(_f, solve=lu, implicit_diff_solve=linear_solve.gmres), "once"),
    (lambda: optim.GradientDescent(_f, implicit_diff="yes"), "implicit_diff"),
    (lambda: optim.GradientDescent(_f, on_failure="wran"), "on_failure"),
    (lambda: optim.ProjectedGradient(_f), "projection"),
    (lambda: optim.MirrorDescent(_f, stepsize=0.0), "stepsize"),
    (lambda: optim.AndersonAcceleration(_f, history_size=0), "history_size"),
    (lambda: optim.BlockCoordinateDescent(_f, None), "block_prox"),
    (lambda: optim.BlockCoordinateDescent(_f, optim.prox_lasso).run(jnp.asarray(1.0), 0.1), "at least one axis"),
    (lambda: optim.proximal_gradient(_f, optim.prox_lasso, step=-1.0), "step"),
    (lambda: optim.mirror_descent(_f, projection=optim.kl_projection_simplex), "both"),
    (lambda: optim.conic(optim.Cone(zero=-1)), "Cone.zero"),
    (lambda: optim.ConicSolver(optim.Cone(nonnegative=2)).run(None, None, np.ones(2), np.ones((3, 2)), np.ones(3)),
     r"A must have shape \(cone.size, n\) = \(2, 2\)"),
    (lambda: optim.ConicQP().run(None, (None, np.ones(2)), None, (np.ones((3, 5)), np.ones(3))), "params_ineq"),
])
def test_bad_solver_input_raises_an_option_error(build, match):
    with pytest.raises(ms.OptionError, match=match):
        build()


@pytest.mark.slow
def test_a_solver_stopped_far_from_the_solution_is_refused_by_the_root_check():
    # Theorem 1: the implicit derivative is only as good as the solution. Two iterations
    # of gradient descent on the ridge problem are far from a root: RootError, not a
    # silently wrong derivative.
    gd = optim.GradientDescent(ridge_objective, maxiter=2, stepsize=1e-3, acceleration=False)
    with pytest.raises(ms.RootError, match="not a root"):
        jax.jacfwd(lambda lam: gd.run(jnp.zeros(5), lam).params)(1.0)


def test_mirror_descent_jacobian_is_finite_where_entries_reach_zero():
    """Exponentiated gradient drives inactive entries to exactly 0; the default KL step
    must keep the implicit Jacobian finite there. Closed form on the support {0, 1} of
    min_{x ∈ Δ} x·c + ½|x|², c = (0, 0, 1000): x* = (½, ½, 0), dx*/dc = [[−½, ½, 0], [½, −½, 0], 0]."""
    f = lambda x, c: jnp.vdot(x, c) + 0.5 * jnp.vdot(x, x)  # noqa: E731
    c = jnp.array([0.0, 0.0, 1000.0])
    solver = optim.MirrorDescent(f, stepsize=1.0, maxiter=2000, tol=1e-12)
    x = solver.run(jnp.ones(3) / 3, None, c).params
    assert float(x[2]) == 0.0  # underflowed: the case log 0 made NaN
    expected = np.array([[-0.5, 0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.0, 0.0]])
    forward = jax.jacfwd(lambda c: solver.run(jnp.ones(3) / 3, None, c).params)(c)
    reverse = jax.jacrev(lambda c: solver.run(jnp.ones(3) / 3, None, c).params)(c)
    np.testing.assert_allclose(forward, expected, atol=1e-8)
    np.testing.assert_allclose(reverse, expected, atol=1e-8)
    T = optim.mirror_descent(f)
    assert np.all(np.isfinite(jax.jacfwd(T)(jnp.array([0.5, 0.5, 0.0]), None, c)))
    # the product form is the softmax form wherever that one is defined
    y, g = jnp.array([0.2, 0.3, 0.5]), jnp.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(optim.kl_mirror_step(y, g, 0.7), optim.kl_projection_simplex(jnp.log(y) - 0.7 * g),
                               rtol=1e-14)
