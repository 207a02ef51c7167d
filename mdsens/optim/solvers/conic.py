"""Cone programs (LP, QP, SOCP) by Douglas–Rachford splitting of the self-dual embedding.

``ConicSolver(cone).run(init, P, c, A, b)`` solves, in SCS's standard form,
``min ½xᵀPx + cᵀx`` s.t. ``Ax + s = b``, ``s ∈ K`` (``P = None`` for an LP) and returns
the root ``z = (x, y − s)`` of the :func:`~mdsens.optim.conic` residual map;
:func:`~mdsens.optim.conic_solution` recovers ``(x, y, s)``. The iteration is SCS's
(O'Donoghue et al. 2016) at ``τ = 1``::

    u = Π(z),   ũ = (I + M)⁻¹ (2u − z − q),   z ← z + ũ − u

with ``M = [[P, Aᵀ], [−A, 0]]`` monotone, so it converges for any feasible, bounded
problem (no infeasibility detection: an infeasible problem runs to ``maxiter``). ``I + M``
is factorized once per run (dense: small problems). ``ConicQP`` is the same solver with
JAXopt's QP calling convention and a :class:`~mdsens.optim.KKTSolution` result. Both
differentiate through the conic residual map (GMRES), w.r.t. ``P, c, A, b``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax.numpy as jnp
import jax.scipy.linalg as jsl

from mdsens import errors
from mdsens.optim.solvers import base
from mdsens.optim.conditions import Cone, KKTSolution, conic, conic_solution

__all__ = ["ConicState", "ConicSolver", "ConicQP"]


class ConicState(NamedTuple):
    """``iter_num``; ``error = ‖F(z)‖``, the residual of the conic map (primal and dual
    infeasibility, complementarity) at ``params``."""

    iter_num: Any
    error: Any


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


@dataclasses.dataclass(frozen=True, eq=False)
class ConicSolver:
    """Douglas–Rachford (SCS-type) solver of ``min ½xᵀPx + cᵀx`` s.t. ``Ax + s = b, s ∈ K``.

    Attributes:
      cone: a :class:`~mdsens.optim.Cone` (rows of ``A``: zero, non-negative, SOC).
      maxiter, tol: stop when ``‖F(z)‖ ≤ tol``.
      implicit_diff, solve / implicit_diff_solve, jit, on_failure: as
        :class:`~mdsens.optim.ProximalGradient` (default linear solver GMRES).

    ``run(init_params, P, c, A, b) -> OptStep(z, state)`` with ``z = (x, w)`` (``init_params``
    such a pair, or ``None`` for zeros).
    """

    cone: Cone
    maxiter: int = 20000
    tol: float = 1e-10
    implicit_diff: bool = True
    solve: Optional[Callable] = None
    implicit_diff_solve: Optional[Callable] = None
    jit: bool = True
    on_failure: str = "raise"

    def __post_init__(self):
        base.check_common_options(self)
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

        def update(z, state):
            u = project(z)
            u_tilde = jsl.lu_solve(factor, 2 * u - z - q)
            nxt = z + u_tilde - u
            return nxt, ConicState(state.iter_num + 1, residual_norm(nxt))

        z0 = jnp.concatenate([jnp.asarray(init_params[0], dtype), jnp.asarray(init_params[1], dtype)])
        init = base.OptStep(z0, ConicState(jnp.asarray(0), jnp.asarray(jnp.inf, dtype)))
        z, state = base.iterate(update, init, self.maxiter, self.tol, unroll)
        return base.OptStep((z[:n], z[n:]), state)

    def run(self, init_params, P, c, A, b) -> base.OptStep:
        """Solve; ``params`` is the root ``z = (x, w)`` (see :func:`~mdsens.optim.conic_solution`)."""
        c, A, b = _check_problem(self.cone, P, c, A, b)
        if init_params is None:
            init_params = (jnp.zeros_like(c), jnp.zeros_like(b))
        return self._run(init_params, P, c, A, b)


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
    implicit_diff: bool = True
    solve: Optional[Callable] = None
    implicit_diff_solve: Optional[Callable] = None
    jit: bool = True
    on_failure: str = "raise"

    def __post_init__(self):
        base.check_common_options(self)
        base.set_attribute(self, "_solvers", {})

    def _solver(self, cone):
        if cone not in self._solvers:
            self._solvers[cone] = ConicSolver(cone, maxiter=self.maxiter, tol=self.tol,
                                              implicit_diff=self.implicit_diff, solve=self.solve,
                                              implicit_diff_solve=self.implicit_diff_solve, jit=self.jit,
                                              on_failure=self.on_failure)
        return self._solvers[cone]

    def run(self, init_params=None, params_obj=None, params_eq=None, params_ineq=None) -> base.OptStep:
        """Solve the QP; ``init_params`` is ignored unless a :class:`KKTSolution` (warm start)."""
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
        z, state = self._solver(cone).run(init, Q, c, A, b)
        x, y, _ = conic_solution(z, cone)
        solution = KKTSolution(x, y[:p_eq] if params_eq is not None else None,
                               y[p_eq:] if params_ineq is not None else None)
        return base.OptStep(solution, state)
