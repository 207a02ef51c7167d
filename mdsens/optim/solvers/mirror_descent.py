"""Mirror descent (Nemirovski & Yudin 1983), JAXopt's class and conventions.

``MirrorDescent(fun, projection_grad, stepsize).run(init_params, hyperparams_proj, *args)``
with ``projection_grad(x, g, stepsize, hyperparams_proj)`` the update; build it from a
Bregman projection and a mirror map with :meth:`MirrorDescent.make_projection_grad`.
Without ``projection_grad`` the geometry is the entropy on the simplex (last axis):
exponentiated gradient, ``x ← softmax(log x − η ∇f(x))``. The implicit derivative uses
the mirror-descent fixed point (paper §2.3) with GMRES.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from mdsens import errors
from mdsens.optim import validation
from mdsens.optim.solvers import base
from mdsens.optim.projections import kl_mirror_step
from mdsens.optim.tree_util import tree_add_scalar_mul, tree_l2_norm, tree_map, tree_sub

__all__ = ["MirrorDescentState", "MirrorDescent"]


class MirrorDescentState(NamedTuple):
    """``iter_num``; ``error = ‖x − projection_grad(x, ∇f(x), 1, θ)‖`` (JAXopt's); ``aux``."""

    iter_num: Any
    error: Any
    aux: Any = None


def _kl_projection_grad(x, x_fun_grad, stepsize, hyperparams_proj):
    # kl_projection_simplex(log x − η g) without the log: finite Jacobians at zero entries
    value = 1.0 if hyperparams_proj is None else hyperparams_proj
    return tree_map(lambda xi, gi: kl_mirror_step(xi, gi, stepsize, value), x, x_fun_grad)


@dataclasses.dataclass(frozen=True, eq=False)
class MirrorDescent:
    """Mirror descent for ``min_{x ∈ C} f(x, *args)``.

    Attributes:
      fun: ``f(params, *args)`` (``(value, aux)`` with ``has_aux``).
      projection_grad: ``projection_grad(x, g, stepsize, hyperparams_proj)``; ``None``
        for the KL geometry of the simplex (``hyperparams_proj`` its sum, ``None`` = 1).
      stepsize: ``η > 0``, or a function of the iteration number.
      maxiter, tol: stop when ``‖x − projection_grad(x, ∇f(x), 1, θ)‖ ≤ tol``.
      has_aux, implicit_diff, solve / implicit_diff_solve, jit, on_failure: as
        :class:`~mdsens.optim.ProximalGradient` (default linear solver GMRES).

    ``run(init_params, hyperparams_proj, *args) -> OptStep(params, state)``.
    """

    fun: Callable
    projection_grad: Optional[Callable] = None
    stepsize: Union[float, Callable] = 1.0
    maxiter: int = 500
    tol: float = 1e-8
    has_aux: bool = False
    implicit_diff: bool = True
    solve: Optional[Callable] = None
    implicit_diff_solve: Optional[Callable] = None
    jit: bool = True
    on_failure: str = "raise"

    @staticmethod
    def make_projection_grad(projection: Callable, mapping_fun: Callable) -> Callable:
        """``projection_grad(x, g, η, θ) = projection(mapping_fun(x) − η g, θ)`` (JAXopt's helper).

        ``mapping_fun`` is the mirror map ``∇φ``; ``projection(y, θ)`` the Bregman projection
        ``argmin_{p ∈ C} D_φ(p, ∇φ*(y))``.
        """

        def projection_grad(x, x_fun_grad, stepsize, hyperparams_proj):
            return projection(tree_add_scalar_mul(mapping_fun(x), -stepsize, x_fun_grad), hyperparams_proj)

        return projection_grad

    def __post_init__(self):
        base.check_common_options(self)
        validation.check_stepsize(self.stepsize, allow_line_search=False)
        if self.projection_grad is None:
            base.set_attribute(self, "projection_grad", _kl_projection_grad)
        if not callable(self.projection_grad):
            raise errors.OptionError("projection_grad must be projection_grad(x, g, stepsize, hyperparams_proj).")
        base.set_attribute(self, "_value", base.value_fun(self.fun, self.has_aux))
        run = base.build_run(self._loop, implicit_diff=self.implicit_diff, optimality_fun=self.optimality_fun,
                             solve=base.resolve_solve(self.solve, self.implicit_diff_solve, "general"),
                             symmetric=False, jit=self.jit, on_failure=self.on_failure)
        base.set_attribute(self, "_run", run)

    def _step(self, iter_num):
        return self.stepsize(iter_num) if callable(self.stepsize) else self.stepsize

    def _loop(self, init_params, args, kwargs, unroll):
        hyperparams_proj, args = args[0], args[1:]
        grad = jax.grad(lambda x: self._value(x, *args, **kwargs))

        def update(x, state):
            nxt = self.projection_grad(x, grad(x), self._step(state.iter_num), hyperparams_proj)
            error = tree_l2_norm(tree_sub(nxt, self.projection_grad(nxt, grad(nxt), 1.0, hyperparams_proj)))
            return nxt, MirrorDescentState(state.iter_num + 1, error)

        dtype = jnp.result_type(*jax.tree_util.tree_leaves(init_params))
        init = base.OptStep(init_params, MirrorDescentState(jnp.asarray(0), jnp.asarray(jnp.inf, dtype)))
        params, state = base.iterate(update, init, self.maxiter, self.tol, unroll)
        return base.OptStep(params, state._replace(aux=base.final_aux(self.fun, self.has_aux, params, args, kwargs)))

    def optimality_fun(self, params, hyperparams_proj, *args, **kwargs):
        """``T(x) − x`` with the mirror-descent map ``T(x) = projection_grad(x, ∇f(x), η, θ)``.

        ``η`` is ``stepsize`` (1 for a schedule): any ``η > 0`` has the same fixed points.
        """
        step = 1.0 if callable(self.stepsize) else self.stepsize
        g = jax.grad(self._value)(params, *args, **kwargs)
        return tree_sub(self.projection_grad(params, g, step, hyperparams_proj), params)

    def run(self, init_params, hyperparams_proj=None, *args, **kwargs) -> base.OptStep:
        """Minimize from ``init_params`` (inside the domain of the mirror map)."""
        return self._run(init_params, hyperparams_proj, *args, **kwargs)
