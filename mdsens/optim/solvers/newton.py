"""Newton's method for minimization and Gauss–Newton for nonlinear least squares.

``Newton(fun).run(init_params, *args)``: damped Newton steps ``d = −[∇²f]⁻¹ ∇f`` with an
Armijo backtracking line search (a gradient step where ``d`` is not a descent
direction), the Hessian solved densely or matrix-free (``inner_solve=``).
``GaussNewton(residual_fun).run(init_params, *args)`` (JAXopt's name): undamped
``d = −(JᵀJ)⁻¹ Jᵀ r``. Both differentiate through stationarity of the objective
(``∇f = 0``, resp. ``Jᵀr = 0``) with CG, the cheapest condition; their fixed-point forms
are :func:`~mdsens.optim.newton` and :func:`~mdsens.optim.gauss_newton` in the catalog.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from mdsens import errors
from mdsens.optim import conditions, validation
from mdsens.optim.solvers import base
from mdsens.optim.tree_util import tree_l2_norm

__all__ = ["NewtonState", "Newton", "GaussNewtonState", "GaussNewton"]


class NewtonState(NamedTuple):
    """``iter_num``; ``error = ‖∇f(params)‖``; ``stepsize``: the last line-search step; ``aux``."""

    iter_num: Any
    error: Any
    stepsize: Any
    aux: Any = None


def _flat_problem(fun, params, args, kwargs):
    flat, unravel = ravel_pytree(params)
    return flat, unravel, (lambda v: fun(unravel(v), *args, **kwargs))


@dataclasses.dataclass(frozen=True, eq=False)
class Newton:
    """Damped Newton's method for ``min f(x, *args)`` (small, smooth problems).

    Attributes:
      fun: ``f(params, *args)`` (``(value, aux)`` with ``has_aux``).
      inner_solve: ``None``: dense ``jnp.linalg.solve`` of the Hessian; or an
        :mod:`mdsens.linear_solve` solver (``cg`` for a convex ``f``) on
        Hessian-vector products.
      maxiter, tol: stop when ``‖∇f‖ ≤ tol``.
      maxls, decrease_factor: Armijo backtracking (sufficient decrease ``1e-4``).
      has_aux, implicit_diff, solve / implicit_diff_solve, jit, on_failure, nullspace: as
        :class:`~mdsens.optim.GradientDescent` (default linear solver CG).

    ``run(init_params, *args) -> OptStep(params, state)``.
    """

    fun: Callable
    inner_solve: Optional[Callable] = None
    maxiter: int = 50
    tol: float = 1e-10
    maxls: int = 30
    decrease_factor: float = 0.5
    has_aux: bool = False
    implicit_diff: bool = True
    solve: Optional[Callable] = None
    implicit_diff_solve: Optional[Callable] = None
    jit: bool = True
    on_failure: str = "raise"
    nullspace: Optional[Callable] = None

    def __post_init__(self):
        base.check_common_options(self)
        validation.check_positive_int(self.maxls, "maxls")
        if not 0 < self.decrease_factor < 1:
            raise errors.OptionError(f"decrease_factor must be in (0, 1); got {self.decrease_factor!r}.")
        base.set_attribute(self, "_value", base.value_fun(self.fun, self.has_aux))
        run = base.build_run(self._loop, implicit_diff=self.implicit_diff, optimality_fun=self.optimality_fun,
                             solve=base.resolve_solve(self.solve, self.implicit_diff_solve, "symmetric"),
                             symmetric=True, jit=self.jit, on_failure=self.on_failure,
                             nullspace=self.nullspace)
        base.set_attribute(self, "_run", run)

    def _direction(self, f, v, g):
        if self.inner_solve is None:
            return -jnp.linalg.solve(jax.hessian(f)(v), g)
        hvp = lambda u: jax.jvp(jax.grad(f), (v,), (u,))[1]  # noqa: E731
        out = self.inner_solve(hvp, g)
        return -(out[0] if isinstance(out, tuple) else out)

    def _loop(self, init_params, args, kwargs, unroll):
        v0, unravel, f = _flat_problem(self._value, init_params, args, kwargs)
        value_and_grad = jax.value_and_grad(f)

        def update(v, state):
            fv, g = value_and_grad(v)
            d = self._direction(f, v, g)
            slope = jnp.vdot(g, d)
            descent = jnp.isfinite(slope) & (slope < 0)
            d = jnp.where(descent, d, -g)
            slope = jnp.where(descent, slope, -jnp.vdot(g, g))
            eps = jnp.finfo(v.dtype).eps

            def insufficient(eta):
                return f(v + eta * d) > fv + 1e-4 * eta * slope + 8 * eps * jnp.abs(fv)

            eta = base.line_search_loop(insufficient, lambda eta: eta * self.decrease_factor,
                                        jnp.asarray(1.0, v.dtype), self.maxls, unroll)
            nxt = v + eta * d
            return nxt, NewtonState(state.iter_num + 1, jnp.linalg.norm(jax.grad(f)(nxt)), eta)

        init = base.OptStep(v0, NewtonState(jnp.asarray(0), jnp.asarray(jnp.inf, v0.dtype), jnp.asarray(1.0, v0.dtype)))
        flat, state = base.iterate(update, init, self.maxiter, self.tol, unroll)
        params = unravel(flat)
        return base.OptStep(params, state._replace(aux=base.final_aux(self.fun, self.has_aux, params, args, kwargs)))

    def optimality_fun(self, params, *args, **kwargs):
        """``∇₁f(params, *args, **kwargs)``."""
        return conditions.stationary(self._value)(params, *args, **kwargs)

    def run(self, init_params, *args, **kwargs) -> base.OptStep:
        """Minimize from ``init_params``; returns ``OptStep(params, state)``."""
        return self._run(init_params, *args, **kwargs)


class GaussNewtonState(NamedTuple):
    """``iter_num``; ``error = ‖Jᵀr‖`` (the gradient of ``½‖r‖²``); ``aux`` (``None``)."""

    iter_num: Any
    error: Any
    aux: Any = None


@dataclasses.dataclass(frozen=True, eq=False)
class GaussNewton:
    """Gauss–Newton for ``min ½‖r(x, *args)‖²`` (JAXopt's class name).

    Attributes:
      residual_fun: ``r(params, *args)``, an array; ``J = ∂r/∂x`` (dense) needs full
        column rank near the solution.
      maxiter, tol: stop when ``‖Jᵀr‖ ≤ tol``.
      implicit_diff, solve / implicit_diff_solve, jit, on_failure, nullspace: as
        :class:`~mdsens.optim.GradientDescent`.

    ``run(init_params, *args) -> OptStep(params, state)``.
    """

    residual_fun: Callable
    maxiter: int = 50
    tol: float = 1e-10
    implicit_diff: bool = True
    solve: Optional[Callable] = None
    implicit_diff_solve: Optional[Callable] = None
    jit: bool = True
    on_failure: str = "raise"
    nullspace: Optional[Callable] = None

    def __post_init__(self):
        base.check_common_options(self)
        run = base.build_run(self._loop, implicit_diff=self.implicit_diff, optimality_fun=self.optimality_fun,
                             solve=base.resolve_solve(self.solve, self.implicit_diff_solve, "symmetric"),
                             symmetric=True, jit=self.jit, on_failure=self.on_failure,
                             nullspace=self.nullspace)
        base.set_attribute(self, "_run", run)

    def _objective(self, params, *args, **kwargs):
        return 0.5 * tree_l2_norm(self.residual_fun(params, *args, **kwargs), squared=True)

    def _loop(self, init_params, args, kwargs, unroll):
        v0, unravel, r = _flat_problem(lambda p, *a, **k: ravel_pytree(self.residual_fun(p, *a, **k))[0],
                                       init_params, args, kwargs)

        def update(v, state):
            J, res = jax.jacfwd(r)(v), r(v)
            nxt = v - jnp.linalg.solve(J.T @ J, J.T @ res)
            J1, r1 = jax.jacfwd(r)(nxt), r(nxt)
            return nxt, GaussNewtonState(state.iter_num + 1, jnp.linalg.norm(J1.T @ r1))

        init = base.OptStep(v0, GaussNewtonState(jnp.asarray(0), jnp.asarray(jnp.inf, v0.dtype)))
        flat, state = base.iterate(update, init, self.maxiter, self.tol, unroll)
        return base.OptStep(unravel(flat), state)

    def optimality_fun(self, params, *args, **kwargs):
        """``∇₁(½‖r‖²) = Jᵀ r`` at ``params``."""
        return conditions.stationary(self._objective)(params, *args, **kwargs)

    def run(self, init_params, *args, **kwargs) -> base.OptStep:
        """Solve from ``init_params``; returns ``OptStep(params, state)``."""
        return self._run(init_params, *args, **kwargs)
