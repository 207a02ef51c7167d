"""What every solver of :mod:`mdsens.optim` shares: results, loops, implicit wrapping.

A solver's ``run(init_params, *args, **kwargs)`` returns an :class:`OptStep` ``(params, state)``,
JAXopt's result. With ``implicit_diff=True`` (the default) ``run`` is the primal of
:func:`mdsens.custom_root` on the solver's optimality condition: ``params`` is
differentiable w.r.t. every array in ``args`` in forward and reverse mode, the loop is
a ``lax.while_loop`` that stops at ``tol`` and is never differentiated, and ``state``
(with ``init_params``) gets a zero derivative. With ``implicit_diff=False`` the loop is a
fixed-length ``lax.fori_loop`` of ``maxiter`` iterations that freezes once ``tol`` is
met, and autodiff unrolls it (forward and reverse): the reference the paper compares
implicit differentiation with.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mdsens import errors
from mdsens.implicit import custom_root, linear_solve
from mdsens.optim import validation
from mdsens.optim.tree_util import tree_where

__all__ = [
    "OptStep",
    "iterate",
    "build_run",
    "jit_with_static",
    "default_solve",
    "resolve_solve",
    "check_common_options",
]

#: Relative tolerance of the implicit-differentiation linear solves made by the solvers.
IMPLICIT_SOLVE_TOL = 1e-10


class OptStep(NamedTuple):
    """The result of ``run`` (and of one ``update``): ``params`` and the solver's ``state``."""

    params: Any
    state: Any


def default_solve(kind: str) -> Callable:
    """The linear solver used for ``∂₁F`` of a given kind.

    ``"symmetric"`` (a Hessian, PD at a strict minimum): CG. ``"general"`` (fixed-point,
    KKT and conic maps: non-symmetric): restarted GMRES. Both at relative tolerance
    ``IMPLICIT_SOLVE_TOL``, with the core's convergence check (no silent failures).
    """
    solver = linear_solve.cg if kind == "symmetric" else linear_solve.gmres
    return functools.partial(solver, tol=IMPLICIT_SOLVE_TOL)


def resolve_solve(solve, implicit_diff_solve, kind: str) -> Callable:
    """``solve=`` (mdsens) or ``implicit_diff_solve=`` (JAXopt's name), else the default."""
    if solve is not None and implicit_diff_solve is not None and solve is not implicit_diff_solve:
        raise errors.OptionError("give the implicit-differentiation linear solver once: solve= or its "
                                 "JAXopt name implicit_diff_solve=, not both.")
    chosen = solve if solve is not None else implicit_diff_solve
    if chosen is not None and not callable(chosen):
        raise errors.OptionError(f"solve must be a linear solver solve(matvec, b), e.g. "
                                 f"mdsens.linear_solve.gmres; got {chosen!r}.")
    return default_solve(kind) if chosen is None else chosen


def check_common_options(solver) -> None:
    """Validate ``maxiter``, ``tol``, ``implicit_diff``, ``jit`` and ``on_failure`` of a solver."""
    validation.check_positive_int(solver.maxiter, "maxiter")
    validation.check_tolerance(solver.tol, "tol")
    for name in ("implicit_diff", "jit", "has_aux"):
        if hasattr(solver, name) and not isinstance(getattr(solver, name), bool):
            raise errors.OptionError(f"{name} must be True or False; got {getattr(solver, name)!r}.")
    errors.check_policy(solver.on_failure)


def iterate(update: Callable, init: OptStep, maxiter: int, tol: float, unroll: bool) -> OptStep:
    """Iterate ``update(params, state) -> OptStep`` while ``state.error > tol`` and
    ``state.iter_num < maxiter``.

    ``unroll=False``: a ``lax.while_loop`` (stops early; not reverse-differentiable).
    ``unroll=True``: a ``lax.fori_loop`` of exactly ``maxiter`` steps, each masked once
    converged, so reverse-mode autodiff can differentiate through it. ``state`` must have
    ``iter_num`` and ``error`` (NaN stops the loop).
    """

    def running(step):
        return (step.state.error > tol) & (step.state.iter_num < maxiter)

    if unroll:
        def body(_, step):
            return tree_where(running(step), OptStep(*update(*step)), step)

        return lax.fori_loop(0, maxiter, body, init)
    return lax.while_loop(running, lambda step: OptStep(*update(*step)), init)


def _is_array_leaf(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, float, int, complex, bool)) or hasattr(
        leaf, "__jax_array__")


def jit_with_static(fun: Callable) -> Callable:
    """``jax.jit(fun)`` where non-array leaves of the arguments (callables, strings) are
    static; like ``custom_root``'s own split, so both accept the same arguments."""

    def call(dynamic, bundle):
        treedef, mask, static = bundle
        dyn, sta = iter(dynamic), iter(static)
        args, kwargs = jax.tree_util.tree_unflatten(treedef, [next(dyn) if m else next(sta) for m in mask])
        return fun(*args, **kwargs)

    jitted = jax.jit(call, static_argnums=1)

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        mask = tuple(_is_array_leaf(leaf) for leaf in leaves)
        dynamic = [leaf for leaf, m in zip(leaves, mask) if m]
        static = tuple(leaf for leaf, m in zip(leaves, mask) if not m)
        return jitted(dynamic, (treedef, mask, static))

    return wrapped


def build_run(loop: Callable, *, implicit_diff: bool, optimality_fun: Callable, solve: Callable,
              symmetric: bool, jit: bool, on_failure: str, optimality_takes_state: bool = False,
              nullspace: Optional[Callable] = None) -> Callable:
    """``run(init_params, *args, **kwargs) -> OptStep`` from ``loop(init_params, args, kwargs, unroll)``.

    ``optimality_fun(x, *args, **kwargs)`` (or ``(x, state, *args, **kwargs)`` with
    ``optimality_takes_state``: the state's by-products, such as the step sizes the solver
    used, reach the condition as constants through the core's aux channel).
    ``nullspace(x, *args, **kwargs)``: zero modes of ``∂₁F`` (see :func:`mdsens.custom_root`).
    """
    unroll = not implicit_diff

    def primal(init_params, *args, **kwargs):
        # A plain pair for the core: its tangent rule returns (t_params, t_state) as a
        # tuple, and custom_jvp wants the primal and tangent containers to match.
        return tuple(loop(init_params, args, kwargs, unroll))

    inner = jit_with_static(primal) if jit else primal
    if implicit_diff:
        inner = custom_root(optimality_fun, solve=solve, has_aux=True, optimality_takes_aux=optimality_takes_state,
                            symmetric=symmetric, on_failure=on_failure, nullspace=nullspace)(inner)

    @functools.wraps(loop)
    def run(init_params, *args, **kwargs):
        return OptStep(*inner(init_params, *args, **kwargs))

    return run


def line_search_loop(cond: Callable, body: Callable, init, maxls: int, unroll: bool):
    """``while cond(carry) and k < maxls: carry = body(carry)``; masked fixed-length when unrolled."""
    if unroll:
        return lax.fori_loop(0, maxls, lambda _, c: tree_where(cond(c), body(c), c), init)
    counted = lax.while_loop(lambda ck: cond(ck[0]) & (ck[1] < maxls), lambda ck: (body(ck[0]), ck[1] + 1),
                             (init, jnp.asarray(0)))
    return counted[0]


def value_fun(fun: Callable, has_aux: bool) -> Callable:
    """``fun`` without its aux output (``fun(x, ...) -> (value, aux)`` with ``has_aux``)."""
    if not has_aux:
        return fun
    return lambda x, *args, **kwargs: fun(x, *args, **kwargs)[0]


def final_aux(fun: Optional[Callable], has_aux: bool, params, args, kwargs):
    """The aux output of ``fun`` at the final ``params`` (``None`` without ``has_aux``)."""
    return fun(params, *args, **kwargs)[1] if has_aux else None


def set_attribute(solver, name: str, value) -> None:
    """Set a derived attribute of a frozen solver in its ``__post_init__`` (what it builds
    from its validated options: the compiled ``run``, the aux-free ``fun``)."""
    object.__setattr__(solver, name, value)
