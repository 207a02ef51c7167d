"""Fixed-point solvers for ``x = T(x, *args)``: plain iteration and Anderson acceleration.

JAXopt's classes: ``FixedPointIteration(fixed_point_fun).run(init_params, *args)`` and
``AndersonAcceleration(fixed_point_fun, history_size, ...)``. Both differentiate through
the fixed point of ``T`` itself (:func:`mdsens.custom_fixed_point`, paper §2.2): an
accelerated iteration has the fixed points of the map it accelerates, so its implicit
derivative is that of ``T``. ``∂₁T − I`` is non-symmetric: GMRES by default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from mdsens import errors
from mdsens.optim import validation
from mdsens.optim.solvers import base
from mdsens.optim.tree_util import tree_l2_norm, tree_sub

__all__ = ["FixedPointState", "FixedPointIteration", "AndersonState", "AndersonAcceleration"]


class FixedPointState(NamedTuple):
    """``iter_num``; ``error = ‖T(x) − x‖`` at the previous iterate; ``aux`` of ``T`` (``has_aux``)."""

    iter_num: Any
    error: Any
    aux: Any = None


def _split(fixed_point_fun, has_aux):
    if not has_aux:
        return fixed_point_fun
    return lambda x, *args, **kwargs: fixed_point_fun(x, *args, **kwargs)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class FixedPointIteration:
    """Picard iteration ``x ← T(x, *args)`` for a contraction ``T``.

    Attributes:
      fixed_point_fun: ``T(params, *args)`` shaped like ``params`` (``(x, aux)`` with
        ``has_aux``).
      maxiter, tol: stop when ``‖T(x) − x‖ ≤ tol``.
      has_aux, implicit_diff, solve / implicit_diff_solve, jit, on_failure: as
        :class:`~mdsens.optim.ProximalGradient`.
      nullspace: ``nullspace(x, *args, **kwargs)``, the known zero modes of ``∂₁F`` (a
        gauge freedom, such as a translation) as a pytree like ``x`` with a leading axis of
        modes; the derivative is then the minimum-norm one (see :func:`mdsens.custom_root`).

    ``run(init_params, *args) -> OptStep(params, state)``.
    """

    fixed_point_fun: Callable
    maxiter: int = 1000
    tol: float = 1e-10
    has_aux: bool = False
    implicit_diff: bool = True
    solve: Optional[Callable] = None
    implicit_diff_solve: Optional[Callable] = None
    jit: bool = True
    on_failure: str = "raise"
    nullspace: Optional[Callable] = None

    def __post_init__(self):
        base.check_common_options(self)
        base.set_attribute(self, "_T", _split(self.fixed_point_fun, self.has_aux))
        run = base.build_run(self._loop, implicit_diff=self.implicit_diff, optimality_fun=self.optimality_fun,
                             solve=base.resolve_solve(self.solve, self.implicit_diff_solve, "general"),
                             symmetric=False, jit=self.jit, on_failure=self.on_failure,
                             nullspace=self.nullspace)
        base.set_attribute(self, "_run", run)

    def _loop(self, init_params, args, kwargs, unroll):
        def update(x, state):
            nxt = self._T(x, *args, **kwargs)
            return nxt, FixedPointState(state.iter_num + 1, tree_l2_norm(tree_sub(nxt, x)))

        dtype = jnp.result_type(*jax.tree_util.tree_leaves(init_params))
        init = base.OptStep(init_params, FixedPointState(jnp.asarray(0), jnp.asarray(jnp.inf, dtype)))
        params, state = base.iterate(update, init, self.maxiter, self.tol, unroll)
        return base.OptStep(params, state._replace(aux=base.final_aux(self.fixed_point_fun, self.has_aux,
                                                                      params, args, kwargs)))

    def optimality_fun(self, params, *args, **kwargs):
        """``T(params, *args, **kwargs) − params``."""
        return tree_sub(self._T(params, *args, **kwargs), params)

    def run(self, init_params, *args, **kwargs) -> base.OptStep:
        """Iterate from ``init_params``; returns ``OptStep(params, state)``."""
        return self._run(init_params, *args, **kwargs)


class AndersonState(NamedTuple):
    """``iter_num``; ``error = ‖T(x) − x‖``; the last ``history_size`` iterates and their
    residuals ``T(x) − x`` (flattened, rows); ``aux``."""

    iter_num: Any
    error: Any
    params_history: Any
    residuals_history: Any
    aux: Any = None


@dataclasses.dataclass(frozen=True, eq=False)
class AndersonAcceleration:
    """Anderson acceleration (type II) of ``x ← T(x, *args)``.

    The first ``history_size`` iterations are plain iterations that fill the history;
    afterwards, every ``mixing_frequency`` iterations, ``x ← Σ_i α_i ((1−β) x_i + β T(x_i))``
    with ``α = argmin ‖Σ α_i g_i‖² + ridge ‖α‖²`` s.t. ``Σ α_i = 1`` over the history
    (``g_i = T(x_i) − x_i``).

    Attributes:
      fixed_point_fun: ``T(params, *args)`` (``(x, aux)`` with ``has_aux``).
      history_size: ``m ≥ 1``; mixing_frequency: ``≥ 1``; beta: mixing ``β > 0``;
      ridge: ``≥ 0`` regularization of the small least-squares problem, relative to
        the mean squared residual in the history.
      maxiter, tol: stop when ``‖T(x) − x‖ ≤ tol``.
      has_aux, implicit_diff, solve / implicit_diff_solve, jit, on_failure, nullspace: as
        :class:`FixedPointIteration`.

    ``run(init_params, *args) -> OptStep(params, state)``.
    """

    fixed_point_fun: Callable
    history_size: int = 5
    mixing_frequency: int = 1
    beta: float = 1.0
    maxiter: int = 1000
    tol: float = 1e-10
    ridge: float = 1e-10
    has_aux: bool = False
    implicit_diff: bool = True
    solve: Optional[Callable] = None
    implicit_diff_solve: Optional[Callable] = None
    jit: bool = True
    on_failure: str = "raise"
    nullspace: Optional[Callable] = None

    def __post_init__(self):
        base.check_common_options(self)
        validation.check_positive_int(self.history_size, "history_size")
        validation.check_positive_int(self.mixing_frequency, "mixing_frequency")
        validation.check_tolerance(self.ridge, "ridge")
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise errors.OptionError(f"beta must be a positive number; got {self.beta!r}.")
        base.set_attribute(self, "_T", _split(self.fixed_point_fun, self.has_aux))
        run = base.build_run(self._loop, implicit_diff=self.implicit_diff, optimality_fun=self.optimality_fun,
                             solve=base.resolve_solve(self.solve, self.implicit_diff_solve, "general"),
                             symmetric=False, jit=self.jit, on_failure=self.on_failure,
                             nullspace=self.nullspace)
        base.set_attribute(self, "_run", run)

    def _loop(self, init_params, args, kwargs, unroll):
        x0, unravel = ravel_pytree(init_params)
        m = self.history_size

        def T(v):
            return ravel_pytree(self._T(unravel(v), *args, **kwargs))[0]

        def mix(X, G):
            gram = G @ G.T
            # A scale-free ridge, relative to the Gram matrix (residuals shrink to ~tol).
            scale = jnp.trace(gram) / m + jnp.finfo(G.dtype).tiny
            gram = gram + self.ridge * scale * jnp.eye(m, dtype=G.dtype)
            w = jnp.linalg.solve(gram, jnp.ones(m, G.dtype))
            alpha = w / jnp.sum(w)
            return alpha @ (X + self.beta * G)

        def update(v, state):
            g = T(v) - v
            slot = state.iter_num % m
            X = state.params_history.at[slot].set(v)
            G = state.residuals_history.at[slot].set(g)
            k = state.iter_num
            anderson = (k >= m - 1) & (k % self.mixing_frequency == 0)
            nxt = jnp.where(anderson, mix(X, G), v + self.beta * g)
            return nxt, AndersonState(k + 1, jnp.linalg.norm(g), X, G)

        zeros = jnp.zeros((m, x0.size), x0.dtype)
        init = base.OptStep(x0, AndersonState(jnp.asarray(0), jnp.asarray(jnp.inf, x0.dtype), zeros, zeros))
        flat, state = base.iterate(update, init, self.maxiter, self.tol, unroll)
        params = unravel(flat)
        return base.OptStep(params, state._replace(aux=base.final_aux(self.fixed_point_fun, self.has_aux,
                                                                      params, args, kwargs)))

    def optimality_fun(self, params, *args, **kwargs):
        """``T(params, *args, **kwargs) − params``."""
        return tree_sub(self._T(params, *args, **kwargs), params)

    def run(self, init_params, *args, **kwargs) -> base.OptStep:
        """Iterate from ``init_params``; returns ``OptStep(params, state)``."""
        return self._run(init_params, *args, **kwargs)
