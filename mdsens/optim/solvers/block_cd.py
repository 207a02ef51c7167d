"""Block coordinate descent (cyclic block proximal gradient), JAXopt's class name.

``BlockCoordinateDescent(fun, block_prox).run(init_params, hyperparams_prox, *args)``
minimizes ``f(x, *args) + Σ_j g(x_j, hyperparams_prox)`` over the rows ``x_j`` of an
array ``x`` (each coordinate of a vector). Unlike JAXopt's, ``fun`` is any smooth
function (not only a composite linear one): block gradients come from ``jax.grad``, so an
epoch costs ``n_blocks`` gradients, fine for the small problems this is meant for. The
implicit derivative uses the block proximal-gradient fixed point (paper §2.3) with the
solver's per-block steps, GMRES.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from mdsens import errors
from mdsens.optim import conditions
from mdsens.optim.solvers import base
from mdsens.optim.tree_util import tree_sub

__all__ = ["BlockCDState", "BlockCoordinateDescent"]


class BlockCDState(NamedTuple):
    """``iter_num`` (epochs); ``error``: ``‖Δx‖`` over the last epoch; ``stepsize``: the
    per-block steps ``η_j``, shape ``(n_blocks,)``; ``aux``."""

    iter_num: Any
    error: Any
    stepsize: Any
    aux: Any = None


@dataclasses.dataclass(frozen=True, eq=False)
class BlockCoordinateDescent:
    """Cyclic block coordinate proximal gradient.

    Attributes:
      fun: smooth ``f(params, *args)`` with ``params`` an array (blocks = rows).
      block_prox: ``block_prox(x_j, hyperparams_prox, scaling)``, e.g. ``prox_lasso``
        (coordinates) or ``prox_group_lasso`` (rows).
      stepsize: ``η_j``: a positive scalar, an array ``(n_blocks,)``, or ``None`` for
        ``1/L_j`` with ``L_j`` the largest eigenvalue of the diagonal Hessian block at
        ``init_params`` (exact coordinate minimization for a quadratic ``f``; give steps
        for a strongly non-quadratic ``f``).
      maxiter: epochs at most; tol: stop when an epoch moves ``x`` by ``≤ tol``.
      has_aux, implicit_diff, solve / implicit_diff_solve, jit, on_failure: as
        :class:`~mdsens.optim.ProximalGradient`.

    ``run(init_params, hyperparams_prox, *args) -> OptStep(params, state)``.
    """

    fun: Callable
    block_prox: Callable
    stepsize: Any = None
    maxiter: int = 500
    tol: float = 1e-8
    has_aux: bool = False
    implicit_diff: bool = True
    solve: Optional[Callable] = None
    implicit_diff_solve: Optional[Callable] = None
    jit: bool = True
    on_failure: str = "raise"

    def __post_init__(self):
        base.check_common_options(self)
        if not callable(self.block_prox):
            raise errors.OptionError("block_prox must be block_prox(x_j, hyperparams_prox, scaling), e.g. "
                                     "mdsens.optim.prox_lasso.")
        base.set_attribute(self, "_value", base.value_fun(self.fun, self.has_aux))
        run = base.build_run(self._loop, implicit_diff=self.implicit_diff, optimality_fun=self._condition,
                             solve=base.resolve_solve(self.solve, self.implicit_diff_solve, "general"),
                             symmetric=False, jit=self.jit, on_failure=self.on_failure,
                             optimality_takes_state=True)
        base.set_attribute(self, "_run", run)

    def _block_steps(self, x, f):
        n_blocks = x.shape[0]
        if self.stepsize is not None:
            return jnp.broadcast_to(jnp.asarray(self.stepsize, x.dtype), (n_blocks,))
        flat, unravel = ravel_pytree(x)
        hessian = jax.hessian(lambda v: f(unravel(v)))(flat)
        size = flat.size // n_blocks
        blocks = hessian.reshape(n_blocks, size, n_blocks, size)[jnp.arange(n_blocks), :, jnp.arange(n_blocks), :]
        lipschitz = jnp.max(jnp.linalg.eigvalsh(blocks), axis=-1)
        # A flat direction (L_j = 0) gets a unit step rather than an infinite one.
        return lax.stop_gradient(jnp.where(lipschitz > 0, 1.0 / jnp.where(lipschitz > 0, lipschitz, 1.0), 1.0))

    def _loop(self, init_params, args, kwargs, unroll):
        hyperparams_prox, args = args[0], args[1:]
        x0 = jnp.asarray(init_params)
        if x0.ndim == 0:
            raise errors.OptionError("BlockCoordinateDescent needs params with at least one axis (blocks are rows).")
        f = lambda x: self._value(x, *args, **kwargs)  # noqa: E731
        grad = jax.grad(f)
        steps = self._block_steps(x0, f)

        def epoch(x, state):
            def one_block(j, x):
                new_j = self.block_prox(x[j] - steps[j] * grad(x)[j], hyperparams_prox, steps[j])
                return x.at[j].set(new_j)

            nxt = lax.fori_loop(0, x.shape[0], one_block, x)
            return nxt, BlockCDState(state.iter_num + 1, jnp.linalg.norm((nxt - x).ravel()), steps)

        init = base.OptStep(x0, BlockCDState(jnp.asarray(0), jnp.asarray(jnp.inf, x0.dtype), steps))
        params, state = base.iterate(epoch, init, self.maxiter, self.tol, unroll)
        return base.OptStep(params, state._replace(aux=base.final_aux(self.fun, self.has_aux, params, args, kwargs)))

    def _condition(self, x, state, hyperparams_prox, *args, **kwargs):
        T = conditions.block_proximal_gradient(self._value, self.block_prox, state.stepsize)
        return tree_sub(T(x, hyperparams_prox, *args, **kwargs), x)

    def optimality_fun(self, params, hyperparams_prox, *args, **kwargs):
        """``T(x) − x`` with the block proximal-gradient map (steps: ``stepsize``, or 1)."""
        step = 1.0 if self.stepsize is None else self.stepsize
        T = conditions.block_proximal_gradient(self._value, self.block_prox, step)
        return tree_sub(T(params, hyperparams_prox, *args, **kwargs), params)

    def run(self, init_params, hyperparams_prox=None, *args, **kwargs) -> base.OptStep:
        """Minimize from ``init_params``; returns ``OptStep(params, state)``."""
        return self._run(init_params, hyperparams_prox, *args, **kwargs)
