"""Cone programs (LP, QP, SOCP) by Douglas–Rachford splitting of the self-dual embedding.

``ConicSolver(cone).run(init, P, c, A, b)`` solves, in SCS's standard form,
``min ½xᵀPx + cᵀx`` s.t. ``Ax + s = b``, ``s ∈ K`` (``P = None`` for an LP) and returns
the root ``z = (x, y − s)`` of the :func:`~mdsens.optim.conic` residual map;
:func:`~mdsens.optim.conic_solution` recovers ``(x, y, s)``. The iteration is SCS's
(O'Donoghue et al. 2016) at ``τ = 1``::

    u = Π(z),   ũ = (I + M)⁻¹ (2u − z − q),   z ← z + ũ − u

with ``M = [[P, Aᵀ], [−A, 0]]`` monotone, so it converges for any feasible, bounded
problem. ``I + M`` is factorized once per run (dense: small problems).

**Infeasibility.** When no solution exists, Douglas–Rachford iterates diverge linearly
and the step ``δz = z_{k+1} − z_k`` converges to the minimal displacement vector, whose
parts are certificates (Banjac, Goulart, Stellato & Boyd, JOTA 2019; in the homogeneous
self-dual embedding of SCS these are the rays with ``τ → 0``, ``κ > 0``)::

    primal infeasible (Farkas):   δy ∈ K*,  Aᵀδy = 0,  bᵀδy < 0
    dual infeasible (unbounded):  Pδx = 0,  −Aδx ∈ K,  cᵀδx < 0

with ``δy`` the step of ``y = Π_K*(w)`` and ``δx`` that of ``x``. Each iteration tests
both, relative to ``‖δy‖∞`` (or ``‖δx‖∞``) at ``infeasibility_tol``; a certificate stops
the loop with ``state.status`` 1 or 2 (names in :data:`STATUS`) and, with concrete
values, :class:`InfeasibleProblemError` (``on_failure="raise"``) or its warning. Inside
``jit`` read ``state.status``. The residual map itself stays the ``τ = 1`` one, the
condition the solution is differentiated through. ``ConicQP`` is the same solver with
JAXopt's QP calling convention and a :class:`~mdsens.optim.KKTSolution` result. Both
differentiate through the conic residual map (GMRES), w.r.t. ``P, c, A, b``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax import lax

from mdsens import errors
from mdsens.optim import validation
from mdsens.optim.solvers import base
from mdsens.optim.tree_util import tree_where
from mdsens.optim.conditions import Cone, KKTSolution, conic, conic_solution

__all__ = ["ConicState", "ConicSolver", "ConicQP", "InfeasibleProblemError", "InfeasibleProblemWarning",
           "STATUS"]

#: ``state.status`` → its meaning. 0 also while the loop runs; 3: ``maxiter`` reached
#: without a solution or a certificate (not reported: the root check of the
#: derivative refuses such a point).
STATUS = ("solved", "primal infeasible", "dual infeasible", "maxiter reached")
_RUNNING, _PRIMAL_INFEASIBLE, _DUAL_INFEASIBLE, _MAXITER = range(4)


# Defined with the other errors, so that ``ms.InfeasibleProblemError`` is flat like them.
InfeasibleProblemError = errors.InfeasibleProblemError
InfeasibleProblemWarning = errors.InfeasibleProblemWarning


class ConicState(NamedTuple):
    """``iter_num``; ``error = ‖F(z)‖``, the residual of the conic map (primal and dual
    infeasibility, complementarity) at ``params``; ``status``, an index into
    :data:`STATUS`; ``certificate``, the last ``(δx, δy)`` (at ``status`` 1 the Farkas
    ray ``δy``, at 2 the unbounded direction ``δx``)."""

    iter_num: Any
    error: Any
    status: Any = 0
    certificate: Any = None


def _check_problem(cone, P, c, A, b):
    c, A, b = jnp.asarray(c), jnp.asarray(A), jnp.asarray(b)
    n, m = c.shape[0] if c.ndim == 1 else -1, cone.size
    problems = []
    if c.ndim != 1:
        problems.append(f"c must be a vector, got shape {c.shape}")
    if A.shape != (m, n):
        problems.append(f"A must have shape (cone.size, n) = ({m}, {n}), got {A.shape}")
    if b.shape != (m,):
        problems.append(f"b must have shape ({m},), got {b.shape}")
    if P is not None and jnp.shape(P) != (n, n):
        problems.append(f"P must have shape ({n}, {n}) or be None, got {jnp.shape(P)}")
    if problems:
        raise errors.OptionError("cone program: " + "; ".join(problems) + ".")
    return c, A, b


def _max_abs(v):
    return jnp.max(jnp.abs(v), initial=0.0)


def _project_cone(cone, s):
    """``Π_K(s)``: ``0`` on the zero cone, ``max(s, 0)`` on the orthant, the SOC projection."""
    return jnp.concatenate([jnp.zeros_like(s[: cone.zero]), cone.project_dual(s)[cone.zero:]])


def _iterate(update, init, maxiter, tol, unroll):
    """:func:`base.iterate`, also stopped by an infeasibility certificate (``status ≠ 0``)."""

    def running(step):
        return (step.state.error > tol) & (step.state.iter_num < maxiter) & (step.state.status == _RUNNING)

    if unroll:
        def body(_, step):
            return tree_where(running(step), base.OptStep(*update(*step)), step)

        return lax.fori_loop(0, maxiter, body, init)
    return lax.while_loop(running, lambda step: base.OptStep(*update(*step)), init)


def report_status(state, policy: str, what: str = "the cone program") -> None:
    """Raise (warn, ignore: ``policy``) if ``state.status`` names a certificate of infeasibility.

    Concrete states only (a traced status is left to the caller: read ``state.status``).
    """
    if not validation.is_concrete(state.status) or jnp.ndim(state.status) != 0:
        return
    status = int(state.status)
    if status == _PRIMAL_INFEASIBLE:
        dy = np.asarray(state.certificate[1])
        message = (f"{what} is primal infeasible: no x satisfies its constraints (Ax + s = b, s in K; for a QP "
                   f"Ax = b, Gx <= h). Certificate: y in K* with A^T y = 0 and b.y < 0, y = "
                   f"{np.array2string(dy / np.max(np.abs(dy)), precision=3)} (scaled to max|y| = 1). Change b (h) "
                   "or drop a constraint.")
    elif status == _DUAL_INFEASIBLE:
        dx = np.asarray(state.certificate[0])
        message = (f"{what} is dual infeasible: its objective is unbounded below along the feasible direction "
                   f"d = {np.array2string(dx / np.max(np.abs(dx)), precision=3)} (Pd = 0, -Ad in K, c.d < 0; "
                   "scaled to max|d| = 1). Bound the variables or add a constraint.")
    else:
        return
    errors.report(policy, message, InfeasibleProblemError, InfeasibleProblemWarning, stacklevel=4)


@dataclasses.dataclass(frozen=True, eq=False)
class ConicSolver:
    """Douglas–Rachford (SCS-type) solver of ``min ½xᵀPx + cᵀx`` s.t. ``Ax + s = b, s ∈ K``.

    Attributes:
      cone: a :class:`~mdsens.optim.Cone` (rows of ``A``: zero, non-negative, SOC).
      maxiter, tol: stop when ``‖F(z)‖ ≤ tol``.
      infeasibility_tol: relative tolerance of the certificate tests (module docstring).
      implicit_diff, solve / implicit_diff_solve, jit, on_failure: as
        :class:`~mdsens.optim.ProximalGradient` (default linear solver GMRES).

    ``run(init_params, P, c, A, b) -> OptStep(z, state)`` with ``z = (x, w)`` (``init_params``
    such a pair, or ``None`` for zeros).
    """

    cone: Cone
    maxiter: int = 20000
    tol: float = 1e-10
    infeasibility_tol: float = 1e-7
    implicit_diff: bool = True
    solve: Optional[Callable] = None
    implicit_diff_solve: Optional[Callable] = None
    jit: bool = True
    on_failure: str = "raise"

    def __post_init__(self):
        base.check_common_options(self)
        validation.check_tolerance(self.infeasibility_tol, "infeasibility_tol")
        base.set_attribute(self, "_F", conic(self.cone))
        run = base.build_run(self._loop, implicit_diff=self.implicit_diff, optimality_fun=self._F,
                             solve=base.resolve_solve(self.solve, self.implicit_diff_solve, "general"),
                             symmetric=False, jit=self.jit, on_failure=self.on_failure)
        base.set_attribute(self, "_run", run)

    def _loop(self, init_params, args, kwargs, unroll):
        del kwargs
        P, c, A, b = args
        n, m = c.shape[0], b.shape[0]
        dtype = jnp.result_type(c, A, b)
        top = jnp.concatenate([jnp.zeros((n, n), dtype) if P is None else P, A.T], axis=1)
        M = jnp.concatenate([top, jnp.concatenate([-A, jnp.zeros((m, m), dtype)], axis=1)], axis=0)
        factor = jsl.lu_factor(jnp.eye(n + m, dtype=dtype) + M)
        q = jnp.concatenate([c, b])

        def project(z):
            return jnp.concatenate([z[:n], self.cone.project_dual(z[n:])])

        def residual_norm(z):
            dual, primal = self._F((z[:n], z[n:]), P, c, A, b)
            return jnp.sqrt(jnp.sum(dual ** 2) + jnp.sum(primal ** 2))

        def certificate_status(dx, dy):
            # The steps of x and y = Π_K*(w) tend to the minimal displacement: test them
            # as a Farkas ray (primal) and as an unbounded direction (dual), relative to
            # their size and the data's, so that the tests do not depend on scaling.
            eps = self.infeasibility_tol
            size_y = _max_abs(dy)
            primal = ((_max_abs(A.T @ dy) <= eps * a_scale * size_y)
                      & (_max_abs(dy - self.cone.project_dual(dy)) <= eps * size_y)
                      & (b @ dy < -eps * b_scale * size_y))
            size_x = _max_abs(dx)
            s_ray = -A @ dx  # the slack of an unbounded direction, in K
            flat = True if P is None else _max_abs(P @ dx) <= eps * p_scale * size_x
            dual = (flat
                    & (_max_abs(s_ray - _project_cone(self.cone, s_ray)) <= eps * a_scale * size_x)
                    & (c @ dx < -eps * c_scale * size_x))
            return jnp.where(primal, _PRIMAL_INFEASIBLE, jnp.where(dual, _DUAL_INFEASIBLE, _RUNNING))

        def update(z, state):
            u = project(z)
            u_tilde = jsl.lu_solve(factor, 2 * u - z - q)
            nxt = z + u_tilde - u
            dx, dy = nxt[:n] - z[:n], self.cone.project_dual(nxt[n:]) - u[n:]
            return nxt, ConicState(state.iter_num + 1, residual_norm(nxt), certificate_status(dx, dy), (dx, dy))

        a_scale = jnp.maximum(_max_abs(A), 1e-300)
        b_scale = jnp.maximum(_max_abs(b), 1e-300)
        c_scale = jnp.maximum(_max_abs(c), 1e-300)
        p_scale = 1.0 if P is None else jnp.maximum(_max_abs(P), 1e-300)
        z0 = jnp.concatenate([jnp.asarray(init_params[0], dtype), jnp.asarray(init_params[1], dtype)])
        init = base.OptStep(z0, ConicState(jnp.asarray(0), jnp.asarray(jnp.inf, dtype), jnp.asarray(_RUNNING),
                                           (jnp.zeros(n, dtype), jnp.zeros(m, dtype))))
        z, state = _iterate(update, init, self.maxiter, self.tol, unroll)
        unfinished = (state.status == _RUNNING) & ~(state.error <= self.tol)
        state = state._replace(status=jnp.where(unfinished, _MAXITER, state.status))
        return base.OptStep((z[:n], z[n:]), state)

    def run(self, init_params, P, c, A, b) -> base.OptStep:
        """Solve; ``params`` is the root ``z = (x, w)`` (see :func:`~mdsens.optim.conic_solution`)."""
        c, A, b = _check_problem(self.cone, P, c, A, b)
        if init_params is None:
            init_params = (jnp.zeros_like(c), jnp.zeros_like(b))
        step = self._run(init_params, P, c, A, b)
        report_status(step.state, self.on_failure)
        return step


@dataclasses.dataclass(frozen=True, eq=False)
class ConicQP:
    """``min ½xᵀQx + cᵀx`` s.t. ``Ax = b``, ``Gx ≤ h`` with JAXopt's QP calling convention.

    ``run(init_params=None, params_obj=(Q, c), params_eq=(A, b), params_ineq=(G, h))``
    returns ``OptStep(KKTSolution(primal, dual_eq, dual_ineq), state)``: the multipliers
    satisfy ``Qx + c + Aᵀν + Gᵀλ = 0``, ``λ ≥ 0`` (JAXopt's signs). ``Q = None`` is an LP;
    ``params_eq`` or ``params_ineq`` may be ``None``. Solved by :class:`ConicSolver` on the
    zero and non-negative cones; differentiable w.r.t. ``Q, c, A, b, G, h`` in both modes.

    Attributes: as :class:`ConicSolver` (without ``cone``).
    """

    maxiter: int = 20000
    tol: float = 1e-10
    infeasibility_tol: float = 1e-7
    implicit_diff: bool = True
    solve: Optional[Callable] = None
    implicit_diff_solve: Optional[Callable] = None
    jit: bool = True
    on_failure: str = "raise"

    def __post_init__(self):
        base.check_common_options(self)
        validation.check_tolerance(self.infeasibility_tol, "infeasibility_tol")
        base.set_attribute(self, "_solvers", {})

    def _solver(self, cone):
        if cone not in self._solvers:
            self._solvers[cone] = ConicSolver(cone, maxiter=self.maxiter, tol=self.tol,
                                              infeasibility_tol=self.infeasibility_tol,
                                              implicit_diff=self.implicit_diff, solve=self.solve,
                                              implicit_diff_solve=self.implicit_diff_solve, jit=self.jit,
                                              on_failure=self.on_failure)
        return self._solvers[cone]

    def run(self, init_params=None, params_obj=None, params_eq=None, params_ineq=None) -> base.OptStep:
        """Solve the QP; ``init_params`` is ignored unless a :class:`KKTSolution` (warm start).

        Raises :class:`InfeasibleProblemError` (per ``on_failure``, concrete values) when
        a certificate shows the constraints empty or the objective unbounded below.
        """
        step = self.solve_unchecked(init_params, params_obj, params_eq, params_ineq)
        report_status(step.state, self.on_failure, "the QP")
        return step

    def solve_unchecked(self, init_params=None, params_obj=None, params_eq=None, params_ineq=None) -> base.OptStep:
        """:meth:`run` without the infeasibility report: the caller reads ``state.status``."""
        if params_obj is None:
            raise errors.OptionError("ConicQP.run needs params_obj=(Q, c) (Q may be None for an LP).")
        Q, c = params_obj
        c = jnp.asarray(c)
        n = c.shape[0] if c.ndim == 1 else -1
        rows, rhs = [], []
        for name, params in (("params_eq", params_eq), ("params_ineq", params_ineq)):
            if params is None:
                rows.append(jnp.zeros((0, max(n, 0)), c.dtype))
                rhs.append(jnp.zeros((0,), c.dtype))
                continue
            matrix, vector = (jnp.asarray(p, c.dtype) for p in params)
            if matrix.ndim != 2 or matrix.shape[1] != n or vector.shape != (matrix.shape[0],):
                raise errors.OptionError(f"{name} must be (matrix (k, {n}), vector (k,)) for c of shape "
                                         f"{c.shape}; got shapes {matrix.shape} and {vector.shape}.")
            rows.append(matrix)
            rhs.append(vector)
        p_eq, p_ineq = rhs[0].shape[0], rhs[1].shape[0]
        cone = Cone(zero=p_eq, nonnegative=p_ineq)
        A = jnp.concatenate(rows, axis=0)
        b = jnp.concatenate(rhs)
        init = None
        if isinstance(init_params, KKTSolution):
            duals = [d for d in (init_params.dual_eq, init_params.dual_ineq) if d is not None]
            w = jnp.concatenate(duals) if duals else jnp.zeros((0,), c.dtype)
            init = (jnp.asarray(init_params.primal, c.dtype), w)
        solver = self._solver(cone)
        c, A, b = _check_problem(cone, Q, c, A, b)
        z, state = solver._run((jnp.zeros_like(c), jnp.zeros_like(b)) if init is None else init, Q, c, A, b)
        x, y, _ = conic_solution(z, cone)
        solution = KKTSolution(x, y[:p_eq] if params_eq is not None else None,
                               y[p_eq:] if params_ineq is not None else None)
        return base.OptStep(solution, state)
