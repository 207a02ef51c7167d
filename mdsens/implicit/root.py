"""Implicit differentiation of roots and fixed points (Blondel et al., NeurIPS 2022).

Let ``x*(θ)`` satisfy the optimality condition ``F(x*(θ), θ) = 0`` (paper eq. 1). The
implicit function theorem gives the Jacobian from a linear system (paper eq. 2)::

    −∂₁F(x*, θ) · ∂x*(θ) = ∂₂F(x*, θ)          i.e.   A J = B

with ``A = −∂₁F`` and ``B = ∂₂F``. mdsens never forms ``A``: it solves with
matrix-free products ``v ↦ ∂₁F v`` (a JVP of ``F``), so

* forward mode (JVP, paper eq. 3): ``J v = A⁻¹ (B v)``, one linear solve per tangent;
* reverse mode (VJP, paper eq. 4): ``uᵀ J = (A⁻ᵀ u)ᵀ B``, one transposed solve per
  cotangent.

Both come from one ``jax.custom_jvp`` whose tangent is a ``lax.custom_linear_solve``: JAX
transposes it for reverse mode, and everything composes with ``jit``, ``vmap`` and
higher-order differentiation. The solver that produced ``x*`` is never unrolled, and its
``init`` argument gets no derivative.

**Gauge freedom.** When ``∂₁F`` is singular with a known null space ``N`` (a basis from
``nullspace``; translations of a periodic crystal, rotations of a cluster), the
derivative returned is the minimum-norm one, ``J v = −(∂₁F)⁺ (∂₂F v)``. mdsens solves the
deflated, non-singular system ``(∂₁F + L Nᵀ) y = P_L b``, with ``L`` the left null space
(``= N`` when ``∂₁F`` is symmetric) and ``P_L = I − L Lᵀ``; its solution is exactly
``(∂₁F)⁺ b`` (it lies in ``N⊥`` and solves the projected system). The projections are
ordinary linear maps, so forward and reverse mode stay transposes of each other.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from mdsens.implicit import linear_solve as _ls

__all__ = [
    "custom_root",
    "custom_fixed_point",
    "root_jvp",
    "root_vjp",
    "LinearSolveError",
    "LinearSolveWarning",
    "OptimalityStructureError",
]


class LinearSolveError(RuntimeError):
    """The implicit-differentiation linear solve did not reach its tolerance."""


class LinearSolveWarning(RuntimeWarning):
    """Issued instead of `LinearSolveError` when ``on_solve_failure="warn"``."""


class OptimalityStructureError(TypeError):
    """``F(x, θ)`` does not have the pytree structure, shapes and dtypes of ``x``."""


_FAILURE_POLICIES = ("raise", "warn", "ignore")


# ----------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------


def _is_array_leaf(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, float, int, complex, bool)) or hasattr(
        leaf, "__jax_array__"
    )


def _check_structure(F, sol, theta):
    """Raise `OptimalityStructureError` unless ``F(sol, theta)`` is shaped exactly like ``sol``."""
    out = jax.eval_shape(lambda s: F(s, theta), sol)
    sol_struct = jax.tree_util.tree_structure(sol)
    out_struct = jax.tree_util.tree_structure(out)
    sol_shapes = [(jnp.shape(l), jnp.result_type(l)) for l in jax.tree_util.tree_leaves(sol)]
    out_shapes = [(l.shape, l.dtype) for l in jax.tree_util.tree_leaves(out)]
    if sol_struct != out_struct or [s for s, _ in sol_shapes] != [s for s, _ in out_shapes]:
        raise OptimalityStructureError(
            "The optimality function must return a pytree with the same structure and leaf "
            f"shapes as the solution x.\n  x:       {sol_struct} with shapes "
            f"{[s for s, _ in sol_shapes]}\n  F(x, θ): {out_struct} with shapes "
            f"{[s for s, _ in out_shapes]}\nFor a minimization, F is the gradient "
            "(jax.grad(f)), not f itself; for a fixed point T(x) = x use custom_fixed_point."
        )


def _report_failure(policy, residual, b_norm, iterations, breakdown, converged):
    converged = np.asarray(converged)
    if policy == "ignore" or bool(np.all(converged)):
        return
    residual, b_norm = np.atleast_1d(residual), np.atleast_1d(b_norm)
    bad = ~np.atleast_1d(converged)
    rel = float(np.max(residual[bad] / np.where(b_norm[bad] > 0, b_norm[bad], 1.0)))
    why = "broke down (non-positive curvature or a vanishing pivot)" if bool(np.any(breakdown)) else (
        f"stopped after {int(np.max(iterations))} iterations"
    )
    message = (
        f"the implicit-differentiation linear solve {why} with relative residual {rel:.3e}, "
        "above its tolerance. The derivative is not trustworthy. Fixes: if ∂F/∂x is singular "
        "(translations, rotations, gauge freedom) declare its zero modes with nullspace=...; "
        "if it is symmetric indefinite use linear_solve.minres, if non-symmetric gmres or "
        "bicgstab; otherwise raise maxiter, add a preconditioner, or a small ridge. "
        "Inspect the solve with root_jvp(..., return_info=True)."
    )
    if policy == "raise":
        raise LinearSolveError(message)
    warnings.warn(message, LinearSolveWarning, stacklevel=2)


def _checked_zero(policy, dtype, residual, b_norm, iterations, breakdown, converged):
    _report_failure(policy, residual, b_norm, iterations, breakdown, converged)
    return np.zeros(np.shape(converged), dtype)


def _orthonormal_basis(basis_fn, sol, theta, dim):
    """Orthonormal ``(n, k)`` basis (flattened like ``sol``) from a user ``nullspace``."""
    basis = basis_fn(sol, theta)
    leaves = jax.tree_util.tree_leaves(basis)
    if not leaves:
        return None
    k = leaves[0].shape[0]
    flat = jax.vmap(lambda mode: ravel_pytree(mode)[0])(basis)
    if flat.shape != (k, dim):
        raise ValueError(
            "nullspace(x, *args) must return a pytree like x with a leading axis of k modes "
            f"(each leaf of shape (k, *leaf.shape)); got flattened shape {flat.shape}, "
            f"expected (k, {dim})."
        )
    q, _ = jnp.linalg.qr(flat.T)
    return q


def _call_solver(solve, matvec, b):
    out = solve(matvec, b)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], _ls.SolveInfo):
        return out
    return out, None


def _projected_solve(matvec, b, *, solve, right_basis, left_basis, symmetric, on_failure):
    """``A⁺ b`` for flat vectors, with ``A`` singular on the declared null spaces.

    ``matvec`` is flat ``v ↦ A v``. Without a basis this is a plain (transposable)
    ``custom_linear_solve``.
    """
    if right_basis is not None:
        left = right_basis if left_basis is None else left_basis

        def deflated(v):
            return matvec(v) + left @ (right_basis.T @ v)

        rhs = b - left @ (left.T @ b)
    else:
        deflated, rhs = matvec, b

    def run(mv, r):
        x, info = _call_solver(solve, mv, r)
        if info is not None and on_failure != "ignore":
            # One host check per solve, batched: jax.debug.callback would be unrolled once
            # per vmap element (jacrev vmaps over outputs), inflating compile time. The
            # zero it returns is added to x so the check cannot be dead-code eliminated.
            zero = jax.pure_callback(
                functools.partial(_checked_zero, on_failure, np.dtype(x.dtype)),
                jax.ShapeDtypeStruct((), x.dtype),
                info.residual_norm, info.b_norm, info.iterations, info.breakdown, info.converged,
                vmap_method="broadcast_all",
            )
            x = x + zero
        return x, info

    x, info = lax.custom_linear_solve(deflated, rhs, solve=run, transpose_solve=run,
                                      symmetric=symmetric, has_aux=True)
    if right_basis is not None:
        x = x - right_basis @ (right_basis.T @ x)
    return x, info


def _default_solve(matvec, b):
    return _ls.gmres(matvec, b, tol=1e-10)


def _solution_tangent(F, sol, theta, t_theta, *, solve, nullspace, left_nullspace, symmetric,
                      on_failure):
    """``−(∂₁F)⁺ ∂₂F t_theta`` at ``(sol, theta)``; ``F(x, theta)`` with ``theta`` all arrays."""
    sol_flat, unravel = ravel_pytree(sol)

    def matvec(v):
        _, out = jax.jvp(lambda s: F(s, theta), (sol,), (unravel(v),))
        return ravel_pytree(out)[0]

    _, b = jax.jvp(lambda th: F(sol, th), (theta,), (t_theta,))
    right = None if nullspace is None else _orthonormal_basis(nullspace, sol, theta, sol_flat.size)
    left = None if left_nullspace is None else _orthonormal_basis(left_nullspace, sol, theta, sol_flat.size)
    x, info = _projected_solve(matvec, -ravel_pytree(b)[0], solve=solve, right_basis=right,
                               left_basis=left, symmetric=symmetric, on_failure=on_failure)
    return unravel(x), info


def _packed(fun):
    """``fun(x, *args, **kwargs)`` as ``fun(x, (args, kwargs))``; ``None`` stays ``None``."""
    if fun is None:
        return None
    return lambda x, theta: fun(x, *theta[0], **theta[1])


# ----------------------------------------------------------------------------------
# Public plain functions
# ----------------------------------------------------------------------------------


def root_jvp(optimality_fun: Callable, sol, args: tuple, tangents: tuple, *, solve: Callable = None,
             nullspace: Optional[Callable] = None, left_nullspace: Optional[Callable] = None,
             symmetric: bool = False, kwargs: Optional[dict] = None, kwargs_tangents: Optional[dict] = None,
             on_solve_failure: str = "raise", return_info: bool = False):
    """Forward mode: ``J v = −(∂₁F)⁺ ∂₂F v`` at a root ``sol`` of ``F`` (paper eq. 3).

    Args:
      optimality_fun: ``F(x, *args, **kwargs)``, a pytree shaped like ``x``.
      sol: the root ``x*`` (a pytree).
      args: the positional arguments ``θ`` of ``F`` after ``x`` (pytrees of arrays).
      tangents: tangents ``v`` for each of ``args`` (same structure).
      solve: linear solver ``solve(matvec, b) -> x`` or ``(x, SolveInfo)``; default
        restarted GMRES with tolerance 1e-10.
      nullspace, left_nullspace, symmetric, on_solve_failure: see :func:`custom_root`.
      kwargs, kwargs_tangents: keyword arguments of ``F`` and their tangents (default zero).
      return_info: also return the :class:`~mdsens.linear_solve.SolveInfo` of the solve.

    Returns:
      The tangent of the solution (shaped like ``sol``); with ``return_info``, a pair
      ``(tangent, SolveInfo or None)``.
    """
    kwargs = {} if kwargs is None else dict(kwargs)
    if kwargs_tangents is None:
        kwargs_tangents = jax.tree_util.tree_map(jnp.zeros_like, kwargs)
    theta, t_theta = (tuple(args), kwargs), (tuple(tangents), kwargs_tangents)
    F = _packed(optimality_fun)
    _check_structure(F, sol, theta)
    out, info = _solution_tangent(
        F, sol, theta, t_theta, solve=solve or _default_solve, nullspace=_packed(nullspace),
        left_nullspace=_packed(left_nullspace), symmetric=symmetric, on_failure=on_solve_failure,
    )
    return (out, info) if return_info else out


def root_vjp(optimality_fun: Callable, sol, args: tuple, cotangent, *, solve: Callable = None,
             nullspace: Optional[Callable] = None, left_nullspace: Optional[Callable] = None,
             symmetric: bool = False, kwargs: Optional[dict] = None, on_solve_failure: str = "raise"):
    """Reverse mode: ``uᵀ J = −((∂₁F)⁺ᵀ u)ᵀ ∂₂F`` at a root ``sol`` (paper eq. 4).

    One transposed linear solve, whatever the number of parameters.

    Args: as :func:`root_jvp`, with ``cotangent`` ``u`` shaped like ``sol``.

    Returns:
      A tuple with one cotangent per element of ``args``; when ``kwargs`` is given, the
      pair ``(args_cotangents, kwargs_cotangents)``.
    """
    has_kwargs = bool(kwargs)
    kwargs = {} if kwargs is None else dict(kwargs)
    theta = (tuple(args), kwargs)
    F = _packed(optimality_fun)
    _check_structure(F, sol, theta)

    def tangent_map(t_theta):
        return _solution_tangent(
            F, sol, theta, t_theta, solve=solve or _default_solve, nullspace=_packed(nullspace),
            left_nullspace=_packed(left_nullspace), symmetric=symmetric, on_failure=on_solve_failure,
        )[0]

    # The tangent map is linear, so its VJP at any point (zeros) is its transpose.
    zeros = jax.tree_util.tree_map(jnp.zeros_like, theta)
    _, pullback = jax.vjp(tangent_map, zeros)
    (cot_args, cot_kwargs), = pullback(cotangent)
    return (cot_args, cot_kwargs) if has_kwargs else cot_args


# ----------------------------------------------------------------------------------
# Decorators
# ----------------------------------------------------------------------------------


def custom_root(optimality_fun: Callable, *, solve: Callable = None, has_aux: bool = False,
                nullspace: Optional[Callable] = None, left_nullspace: Optional[Callable] = None,
                symmetric: bool = False, on_solve_failure: str = "raise"):
    """Make ``solver(init, *args, **kwargs)`` differentiable by implicit differentiation.

    ``solver`` returns ``x*`` with ``optimality_fun(x*, *args, **kwargs) ≈ 0`` (or
    ``(x*, aux)`` with ``has_aux=True``). The decorated solver keeps its primal behaviour
    and gains derivatives w.r.t. ``args`` and ``kwargs`` in forward mode (``jax.jvp``,
    ``jax.jacfwd``) and reverse mode (``jax.vjp``, ``jax.grad``, ``jax.jacrev``), under
    ``jax.jit`` and ``jax.vmap``, and to higher order (e.g. ``jax.hessian`` of an outer
    loss), for arbitrary pytrees ``x`` and ``θ``. ``solver`` itself is never
    differentiated (never unrolled) and ``init`` gets a zero derivative.

    Args:
      optimality_fun: ``F(x, *args, **kwargs)`` returning a pytree with the structure,
        shapes and dtypes of ``x`` (for minimization: the gradient of the objective).
      solve: linear solver ``solve(matvec, b) -> x`` or ``(x, SolveInfo)``, e.g.
        ``mdsens.linear_solve.cg`` (symmetric positive definite ``∂₁F``), ``minres``
        (symmetric indefinite), ``gmres`` / ``bicgstab`` (general), or the dense ``lu``,
        ``cholesky``, ``lstsq``; use ``functools.partial`` to set ``tol`` etc. Default:
        GMRES with relative tolerance 1e-10.
      has_aux: ``solver`` returns ``(x*, aux)``; ``aux`` passes through with a **zero**
        derivative (it is not the solution of the optimality condition).
      nullspace: ``nullspace(x*, *args, **kwargs)`` returning a basis of the known zero
        modes of ``∂₁F`` (its right null space), as a pytree like ``x`` whose leaves carry
        a leading axis of ``k`` modes. Need not be orthonormal. The derivative returned is
        then the minimum-norm (pseudo-inverse) one.
      left_nullspace: the null space of ``∂₁Fᵀ`` when it differs from ``nullspace``
        (non-symmetric ``∂₁F``); default: the same as ``nullspace``.
      symmetric: ``∂₁F`` is symmetric (true when ``F`` is a gradient); lets reverse mode
        reuse the forward solve instead of transposing the matvec.
      on_solve_failure: what a non-converged linear solve (per its ``SolveInfo``) does:
        ``"raise"`` a :class:`LinearSolveError` (default; it is raised on the host from
        inside the computation, so JAX re-raises it as a ``JaxRuntimeError`` whose
        message carries ``LinearSolveError: ...`` and the advice), ``"warn"`` with a
        :class:`LinearSolveWarning` and return the approximate derivative, or
        ``"ignore"``.

    Returns:
      A decorator. Arguments of the decorated solver are pytrees; leaves that are not
      arrays or numbers (strings, callables) are static and not differentiated.

    Raises:
      OptimalityStructureError: when differentiating, if ``F(x*, θ)`` is not shaped like
        ``x*``.
      LinearSolveError: when the linear solve fails (see ``on_solve_failure``).
    """
    if on_solve_failure not in _FAILURE_POLICIES:
        raise ValueError(f"on_solve_failure must be one of {_FAILURE_POLICIES}; got {on_solve_failure!r}.")
    linear_solver = solve or _default_solve

    def decorator(solver: Callable):
        @functools.wraps(solver)
        def wrapped(init, *args, **kwargs):
            leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
            is_dynamic = [_is_array_leaf(l) for l in leaves]
            static = [l for l, d in zip(leaves, is_dynamic) if not d]
            dynamic = tuple(l for l, d in zip(leaves, is_dynamic) if d)

            def rebuild(dynamic_leaves):
                dyn, sta = iter(dynamic_leaves), iter(static)
                merged = [next(dyn) if d else next(sta) for d in is_dynamic]
                return jax.tree_util.tree_unflatten(treedef, merged)

            def on_dynamic(fun):
                # F and nullspace seen as functions of (x, dynamic leaves) only.
                if fun is None:
                    return None
                return lambda x, dyn: (lambda a, kw: fun(x, *a, **kw))(*rebuild(dyn))

            @jax.custom_jvp
            def solve_root(init, dynamic_leaves):
                a, kw = rebuild(dynamic_leaves)
                return solver(init, *a, **kw)

            @solve_root.defjvp
            def solve_root_jvp(primals, tangents):
                init, dynamic_leaves = primals
                _, t_dynamic = tangents
                out = solve_root(init, dynamic_leaves)
                sol = out[0] if has_aux else out
                F = on_dynamic(optimality_fun)
                _check_structure(F, sol, dynamic_leaves)
                t_sol, _ = _solution_tangent(
                    F, sol, dynamic_leaves, t_dynamic, solve=linear_solver,
                    nullspace=on_dynamic(nullspace), left_nullspace=on_dynamic(left_nullspace),
                    symmetric=symmetric, on_failure=on_solve_failure,
                )
                if has_aux:
                    return out, (t_sol, jax.tree_util.tree_map(_zero_tangent, out[1]))
                return out, t_sol

            return solve_root(init, dynamic)

        wrapped.optimality_fun = optimality_fun
        return wrapped

    return decorator


def _zero_tangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def custom_fixed_point(fixed_point_fun: Callable, *, solve: Callable = None, has_aux: bool = False,
                       nullspace: Optional[Callable] = None, left_nullspace: Optional[Callable] = None,
                       symmetric: bool = False, on_solve_failure: str = "raise"):
    """Like :func:`custom_root` for a fixed point ``x* = T(x*, θ)``.

    The optimality condition is ``F(x, θ) = T(x, θ) − x`` (paper §2.2), so
    ``∂₁F = ∂₁T − I``. For gradient descent, ``T(x) = x − η ∇f(x)``, this is
    ``−η ∇²f``: symmetric, so pass ``symmetric=True`` and a solver suited to a negative
    definite matrix (``minres``, ``gmres``; not ``cg``).
    """

    def optimality_fun(x, *args, **kwargs):
        return jax.tree_util.tree_map(lambda t, xi: t - xi, fixed_point_fun(x, *args, **kwargs), x)

    return custom_root(optimality_fun, solve=solve, has_aux=has_aux, nullspace=nullspace,
                       left_nullspace=left_nullspace, symmetric=symmetric,
                       on_solve_failure=on_solve_failure)
