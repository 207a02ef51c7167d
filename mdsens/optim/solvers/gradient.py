"""Proximal gradient (ISTA/FISTA) and its special cases, projected and plain gradient descent.

JAXopt's classes and calling conventions: ``ProximalGradient(fun, prox).run(init_params,
hyperparams_prox, *args, **kwargs)``, ``ProjectedGradient(fun, projection).run(
init_params, hyperparams_proj, *args, **kwargs)``, ``GradientDescent(fun).run(init_params,
*args, **kwargs)``. ``stepsize <= 0`` selects a backtracking line search (sufficient
decrease of the smooth part, Beck & Teboulle 2009, plus a curvature test that stays
exact at round-off); ``acceleration=True`` is FISTA.

Implicit differentiation (the default): gradient descent through the stationarity
condition ``∇₁f = 0`` (CG on the Hessian), the others through the proximal / projected
gradient fixed point (GMRES), with the solver's last step size as ``η``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mdsens import errors
from mdsens.optim import conditions, validation
from mdsens.optim.solvers import base
from mdsens.optim.proximal import make_prox_from_projection, prox_none
from mdsens.optim.tree_util import tree_add_scalar_mul, tree_l2_norm, tree_sub, tree_vdot

__all__ = ["ProxGradState", "ProximalGradient", "ProjectedGradient", "GradientDescent"]


class ProxGradState(NamedTuple):
    """State of (accelerated) proximal gradient.

    Attributes:
      iter_num: iterations done.
      error: ``‖x − prox_{ηg}(x − η∇f(x))‖ / η`` at ``params`` (the gradient mapping; ``‖∇f‖``
        for gradient descent).
      stepsize: the last step size ``η``.
      velocity: FISTA's extrapolated point ``y`` (``params`` without acceleration).
      t: FISTA's momentum scalar.
      aux: ``fun``'s aux output at ``params`` (``has_aux=True``), else ``None``.
    """

    iter_num: Any
    error: Any
    stepsize: Any
    velocity: Any
    t: Any
    aux: Any = None


def _proximal_gradient_loop(fun, prox, *, stepsize, maxiter, maxls, tol, acceleration, decrease_factor,
                            has_aux):
    """``loop(init_params, (hyperparams_prox, *args), kwargs, unroll)`` for (accelerated) proximal gradient."""
    value = base.value_fun(fun, has_aux)

    def loop(init_params, args, kwargs, unroll):
        hp, args = args[0], args[1:]
        f = lambda x: value(x, *args, **kwargs)  # noqa: E731
        value_and_grad, grad = jax.value_and_grad(f), jax.grad(f)

        def prox_step(x, g, eta):
            return prox(tree_add_scalar_mul(x, -eta, g), hp, eta)

        def step_from(y, eta):
            """One prox-gradient step from ``y``; backtracking when ``stepsize <= 0``."""
            fy, gy = value_and_grad(y)
            if stepsize > 0:
                return prox_step(y, gy, stepsize), jnp.asarray(stepsize, eta.dtype)
            eps = jnp.finfo(fy.dtype).eps

            def insufficient(carry):
                nxt, eta = carry
                diff = tree_sub(nxt, y)
                sq = tree_l2_norm(diff, squared=True)
                # Sufficient decrease f(next) ≤ f(y) + ⟨∇f(y), d⟩ + ‖d‖²/(2η), within round-off;
                # near convergence round-off accepts any step, so the curvature along d must
                # also be at most 1/η: ⟨∇f(next) − ∇f(y), d⟩ ≤ ‖d‖²/η (exact on quadratics).
                too_high = f(nxt) > fy + tree_vdot(gy, diff) + 0.5 * sq / eta + 8 * eps * jnp.abs(fy)
                too_curved = tree_vdot(tree_sub(grad(nxt), gy), diff) > sq / eta
                return too_high | too_curved

            def shrink(carry):
                eta = carry[1] * decrease_factor
                return prox_step(y, gy, eta), eta

            return base.line_search_loop(insufficient, shrink, (prox_step(y, gy, eta), eta), maxls, unroll)

        def update(x, state):
            start = state.velocity if acceleration else x
            nxt, eta = step_from(start, state.stepsize)
            if acceleration:
                t = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * state.t ** 2))
                velocity = tree_add_scalar_mul(nxt, (state.t - 1.0) / t, tree_sub(nxt, x))
            else:
                t, velocity = state.t, nxt
            # the gradient mapping ‖x − prox_{ηg}(x − η∇f(x))‖/η at the new point
            err = tree_l2_norm(tree_sub(nxt, prox_step(nxt, grad(nxt), eta))) / eta
            if stepsize <= 0:
                # Try a longer step next time (JAXopt's rule): the line search only shrinks.
                eta = jnp.where(eta <= 1e-6, 1.0, eta / decrease_factor)
            return nxt, ProxGradState(state.iter_num + 1, err, eta, velocity, t)

        dtype = jnp.result_type(*jax.tree_util.tree_leaves(init_params))
        state = ProxGradState(iter_num=jnp.asarray(0), error=jnp.asarray(jnp.inf, dtype),
                              stepsize=jnp.asarray(stepsize if stepsize > 0 else 1.0, dtype),
                              velocity=init_params, t=jnp.asarray(1.0, dtype))
        params, state = base.iterate(update, base.OptStep(init_params, state), maxiter, tol, unroll)
        return base.OptStep(params, state._replace(aux=base.final_aux(fun, has_aux, params, args, kwargs)))

    return loop


def _check(solver):
    base.check_common_options(solver)
    validation.check_positive_int(solver.maxls, "maxls")
    validation.check_stepsize(solver.stepsize, allow_line_search=True)
    if not 0 < solver.decrease_factor < 1:
        raise errors.OptionError(f"decrease_factor must be in (0, 1); got {solver.decrease_factor!r}.")
    if not callable(solver.fun):
        raise errors.OptionError(f"fun must be a function fun(params, *args); got {solver.fun!r}.")


@dataclasses.dataclass(frozen=True, eq=False)
class ProximalGradient:
    """Proximal gradient (ISTA, or FISTA) for ``min f(x, *args) + g(x, hyperparams_prox)``.

    Attributes:
      fun: smooth part ``f(params, *args)`` (``(value, aux)`` with ``has_aux``).
      prox: ``prox(x, hyperparams_prox, scaling)`` of ``g`` (default: ``g = 0``).
      stepsize: ``η > 0``, or ``<= 0`` for a backtracking line search starting at 1.
      maxiter, maxls: iteration and line-search caps.
      tol: stop when the gradient mapping ``‖x − prox_{ηg}(x − η∇f)‖/η ≤ tol``
        (JAXopt's default is 1e-3; the derivative is only as good as the solution).
      acceleration: FISTA.
      decrease_factor: line-search shrink factor.
      has_aux: ``fun`` returns ``(value, aux)``; ``state.aux`` holds it at the solution.
      implicit_diff: differentiate by the implicit function theorem (default) or, with
        ``False``, by unrolling ``maxiter`` iterations (each with ``maxls`` line-search
        trials: a fixed-length loop, for comparisons).
      solve, implicit_diff_solve: the linear solver of the implicit derivative (same
        thing, mdsens's and JAXopt's name); default GMRES at 1e-10.
      jit: compile the loop.
      on_failure: ``custom_root``'s policy for a failed root / linear-solve check.

    ``run(init_params, hyperparams_prox, *args, **kwargs) -> OptStep(params, state)``;
    ``params`` is differentiable w.r.t. ``hyperparams_prox``, ``args`` and ``kwargs``.
    """

    fun: Callable
    prox: Callable = prox_none
    stepsize: float = 0.0
    maxiter: int = 500
    maxls: int = 15
    tol: float = 1e-8
    acceleration: bool = True
    decrease_factor: float = 0.5
    has_aux: bool = False
    implicit_diff: bool = True
    solve: Optional[Callable] = None
    implicit_diff_solve: Optional[Callable] = None
    jit: bool = True
    on_failure: str = "raise"

    def __post_init__(self):
        _check(self)
        loop = _proximal_gradient_loop(
            self.fun, self.prox, stepsize=float(self.stepsize), maxiter=self.maxiter, maxls=self.maxls,
            tol=float(self.tol), acceleration=self.acceleration, decrease_factor=self.decrease_factor,
            has_aux=self.has_aux)
        run = base.build_run(loop, implicit_diff=self.implicit_diff, optimality_fun=self._condition,
                             solve=base.resolve_solve(self.solve, self.implicit_diff_solve, "general"),
                             symmetric=False, jit=self.jit, on_failure=self.on_failure,
                             optimality_takes_state=True)
        base.set_attribute(self, "_run", run)

    def _fixed_point(self, step):
        return conditions.proximal_gradient(base.value_fun(self.fun, self.has_aux), self.prox, step)

    def _condition(self, x, state, hyperparams_prox, *args, **kwargs):
        T = self._fixed_point(state.stepsize)
        return tree_sub(T(x, hyperparams_prox, *args, **kwargs), x)

    def optimality_fun(self, params, hyperparams_prox, *args, **kwargs):
        """``T(x) − x`` with ``T`` the proximal-gradient map (step ``stepsize``, or 1 with line search)."""
        T = self._fixed_point(self.stepsize if self.stepsize > 0 else 1.0)
        return tree_sub(T(params, hyperparams_prox, *args, **kwargs), params)

    def run(self, init_params, hyperparams_prox=None, *args, **kwargs) -> base.OptStep:
        """Minimize from ``init_params``; returns ``OptStep(params, state)``."""
        return self._run(init_params, hyperparams_prox, *args, **kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class ProjectedGradient:
    """Projected gradient for ``min_{x ∈ C(hyperparams_proj)} f(x, *args)``.

    :class:`ProximalGradient` with ``prox = make_prox_from_projection(projection)``;
    the implicit derivative uses the projected-gradient fixed point
    ``T(x) = proj_C(x − η∇f(x), θC)``. Attributes as :class:`ProximalGradient`, with
    ``projection(x, hyperparams_proj)`` instead of ``prox``.

    ``run(init_params, hyperparams_proj, *args) -> OptStep(params, state)``.
    """

    fun: Callable
    projection: Callable = None
    stepsize: float = 0.0
    maxiter: int = 500
    maxls: int = 15
    tol: float = 1e-8
    acceleration: bool = True
    decrease_factor: float = 0.5
    has_aux: bool = False
    implicit_diff: bool = True
    solve: Optional[Callable] = None
    implicit_diff_solve: Optional[Callable] = None
    jit: bool = True
    on_failure: str = "raise"

    def __post_init__(self):
        if not callable(self.projection):
            raise errors.OptionError("ProjectedGradient needs projection=projection(x, hyperparams_proj), e.g. "
                                     "mdsens.optim.projection_box.")
        _check(self)
        loop = _proximal_gradient_loop(
            self.fun, make_prox_from_projection(self.projection), stepsize=float(self.stepsize),
            maxiter=self.maxiter, maxls=self.maxls, tol=float(self.tol), acceleration=self.acceleration,
            decrease_factor=self.decrease_factor, has_aux=self.has_aux)
        run = base.build_run(loop, implicit_diff=self.implicit_diff, optimality_fun=self._condition,
                             solve=base.resolve_solve(self.solve, self.implicit_diff_solve, "general"),
                             symmetric=False, jit=self.jit, on_failure=self.on_failure,
                             optimality_takes_state=True)
        base.set_attribute(self, "_run", run)

    def _fixed_point(self, step):
        return conditions.projected_gradient(base.value_fun(self.fun, self.has_aux), self.projection, step)

    def _condition(self, x, state, hyperparams_proj, *args, **kwargs):
        return tree_sub(self._fixed_point(state.stepsize)(x, hyperparams_proj, *args, **kwargs), x)

    def optimality_fun(self, params, hyperparams_proj, *args, **kwargs):
        """``T(x) − x`` with ``T`` the projected-gradient map."""
        T = self._fixed_point(self.stepsize if self.stepsize > 0 else 1.0)
        return tree_sub(T(params, hyperparams_proj, *args, **kwargs), params)

    def run(self, init_params, hyperparams_proj=None, *args, **kwargs) -> base.OptStep:
        """Minimize over the set from ``init_params``; returns ``OptStep(params, state)``."""
        return self._run(init_params, hyperparams_proj, *args, **kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class GradientDescent:
    """Gradient descent (Nesterov-accelerated by default) for ``min f(x, *args)``.

    :class:`ProximalGradient` with ``g = 0``. The implicit derivative uses stationarity,
    ``∇₁f(x*, θ) = 0``, solved with CG on the (symmetric positive definite) Hessian.
    Attributes as :class:`ProximalGradient`, and

    Attributes:
      nullspace: ``nullspace(x, *args, **kwargs)``, the known zero modes of ``∂₁F`` (a
        gauge freedom, such as a translation) as a pytree like ``x`` with a leading axis of
        modes; the derivative is then the minimum-norm one (see :func:`mdsens.custom_root`).

    ``run(init_params, *args) -> OptStep(params, state)``.
    """

    fun: Callable
    stepsize: float = 0.0
    maxiter: int = 500
    maxls: int = 15
    tol: float = 1e-8
    acceleration: bool = True
    decrease_factor: float = 0.5
    has_aux: bool = False
    implicit_diff: bool = True
    solve: Optional[Callable] = None
    implicit_diff_solve: Optional[Callable] = None
    jit: bool = True
    on_failure: str = "raise"
    nullspace: Optional[Callable] = None

    def __post_init__(self):
        _check(self)
        loop = _proximal_gradient_loop(
            self.fun, prox_none, stepsize=float(self.stepsize), maxiter=self.maxiter, maxls=self.maxls,
            tol=float(self.tol), acceleration=self.acceleration, decrease_factor=self.decrease_factor,
            has_aux=self.has_aux)

        def loop_without_prox(init_params, args, kwargs, unroll):
            return loop(init_params, (None,) + tuple(args), kwargs, unroll)

        run = base.build_run(loop_without_prox, implicit_diff=self.implicit_diff,
                             optimality_fun=self.optimality_fun,
                             solve=base.resolve_solve(self.solve, self.implicit_diff_solve, "symmetric"),
                             symmetric=True, jit=self.jit, on_failure=self.on_failure,
                             nullspace=self.nullspace)
        base.set_attribute(self, "_run", run)

    def optimality_fun(self, params, *args, **kwargs):
        """``∇₁f(params, *args, **kwargs)``."""
        return conditions.stationary(base.value_fun(self.fun, self.has_aux))(params, *args, **kwargs)

    def run(self, init_params, *args, **kwargs) -> base.OptStep:
        """Minimize from ``init_params``; returns ``OptStep(params, state)``."""
        return self._run(init_params, *args, **kwargs)
