"""Implicit differentiation of roots and fixed points (Blondel et al., NeurIPS 2022).

Let ``x*(θ)`` satisfy the optimality condition ``F(x*(θ), θ) = 0`` (paper eq. 1). The
implicit function theorem gives the Jacobian from a linear system (paper eq. 2)::

    −∂₁F(x*, θ) · ∂x*(θ) = ∂₂F(x*, θ)          i.e.   A J = B

with ``A = −∂₁F`` and ``B = ∂₂F``. mdsens never forms ``A``: forward mode (paper eq. 3)
solves ``J v = A⁻¹ (B v)`` with matrix-free products ``v ↦ ∂₁F v``, and reverse mode
(paper eq. 4) is JAX's transpose of that solve, ``uᵀ J = (A⁻ᵀ u)ᵀ B``. Both come from
one ``jax.custom_jvp`` whose tangent is a ``lax.custom_linear_solve``, so everything
composes with ``jit``, ``vmap`` and higher-order differentiation. The solver is never
unrolled and ``init`` gets no derivative.

Gauge freedom (a declared null space), the checks made before each solve, and the
channel that carries a solver's by-products to ``F`` are described in ``docs/design.md``
("The implicit core"); the docstrings below state the contract.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from mdsens import errors
from mdsens.implicit import linear_solve

__all__ = [
    "custom_root",
    "custom_fixed_point",
    "root_jvp",
    "root_vjp",
    "DEFAULT_ROOT_TOL",
    "DEFAULT_NULLSPACE_TOL",
]

#: Default relative residual ``‖F(x̂, θ)‖ / (‖∂₁F‖ ‖x̂‖)`` above which ``x̂`` is not a root.
DEFAULT_ROOT_TOL = 1e-3
#: Default relative residual ``‖∂₁F n‖ / ‖∂₁F‖`` above which a declared mode ``n`` is
#: not in the null space.
DEFAULT_NULLSPACE_TOL = 1e-3
#: Singular values of a declared basis below this fraction of the largest are dropped
#: (a dependent or zero-length mode, such as the axial rotation of a linear molecule).
BASIS_RANK_RTOL = 1e-8
#: Random combinations of the declared modes probed for the null-space check.
NULLSPACE_PROBES = 2
_PROBE_SEED = 20221107


# ----------------------------------------------------------------------------------
# Structure of the problem
# ----------------------------------------------------------------------------------


def _is_array_leaf(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, float, int, complex, bool)) or hasattr(
        leaf, "__jax_array__"
    )


def _describe(tree) -> str:
    leaves = jax.tree_util.tree_leaves(tree)
    shapes = ", ".join(f"{tuple(jnp.shape(l))} {jnp.result_type(l)}" for l in leaves)
    return f"{jax.tree_util.tree_structure(tree)} with leaves [{shapes}]"


def _check_structure(F, sol, theta):
    """Raise `OptimalityStructureError` unless ``F(sol, theta)`` is shaped and typed like ``sol``."""
    try:
        out = jax.eval_shape(lambda s: F(s, theta), sol)
    except errors.MdsensError:
        raise
    except Exception as err:
        raise errors.OptimalityStructureError(
            "the optimality function F(x, θ) could not be evaluated at the solver's output "
            f"x = {_describe(sol)}: {type(err).__name__}: {err}\nThe solver must return x "
            "with the shapes and dtypes of the problem's variable (for a minimization, F is "
            "jax.grad(f))."
        ) from None
    sol_struct = jax.tree_util.tree_structure(sol)
    out_struct = jax.tree_util.tree_structure(out)
    sol_meta = [(tuple(jnp.shape(l)), jnp.result_type(l)) for l in jax.tree_util.tree_leaves(sol)]
    out_meta = [(tuple(l.shape), l.dtype) for l in jax.tree_util.tree_leaves(out)]
    if sol_struct != out_struct or [s for s, _ in sol_meta] != [s for s, _ in out_meta]:
        raise errors.OptimalityStructureError(
            "The optimality function must return a pytree with the same structure and leaf "
            f"shapes as the solution x.\n  x:       {_describe(sol)}\n  F(x, θ): {out_struct} "
            f"with shapes {[s for s, _ in out_meta]}\nFor a minimization, F is the gradient "
            "(jax.grad(f)), not f itself; for a fixed point T(x) = x use custom_fixed_point."
        )
    if [d for _, d in sol_meta] != [d for _, d in out_meta]:
        raise errors.OptimalityStructureError(
            f"x has dtypes {[str(d) for _, d in sol_meta]} but F(x, θ) returns "
            f"{[str(d) for _, d in out_meta]}. Return x from the solver in the dtype of the "
            "problem (e.g. jnp.float64 when θ is float64); a float32 solution loses the "
            "digits the derivative needs."
        )


def _packed(fun):
    """``fun(x, *args, **kwargs)`` as ``fun(x, (args, kwargs))``; ``None`` stays ``None``."""
    if fun is None:
        return None
    return lambda x, theta: fun(x, *theta[0], **theta[1])


# ----------------------------------------------------------------------------------
# Null spaces and the checks made before a solve
# ----------------------------------------------------------------------------------


def _orthonormal_basis(basis_fn, sol, theta, dim):
    """``(Q (n, k), s_max)``: orthonormal columns spanning the modes of ``basis_fn``.

    SVD, not QR: a dependent or zero-length mode (singular value below
    ``BASIS_RANK_RTOL`` of the largest) becomes a zero column, which leaves every
    projection exact and keeps the shape static under ``jit``.
    """
    basis = basis_fn(sol, theta)
    leaves = jax.tree_util.tree_leaves(basis)
    if not leaves:
        return None, None
    k = leaves[0].shape[0]
    try:
        flat = jax.vmap(lambda mode: ravel_pytree(mode)[0])(basis)
    except Exception as err:
        raise errors.NullSpaceError(
            "nullspace(x, *args) must return a pytree like x whose leaves carry a leading axis "
            f"of k modes; got {_describe(basis)} ({type(err).__name__}: {err})."
        ) from None
    if flat.shape != (k, dim):
        raise errors.NullSpaceError(
            "nullspace(x, *args) must return a pytree like x with a leading axis of k modes "
            f"(each leaf of shape (k, *leaf.shape)); got flattened shape {flat.shape}, "
            f"expected (k, {dim})."
        )
    u, s, _ = jnp.linalg.svd(flat.T.astype(_sol_dtype(sol)), full_matrices=False)
    s_max = jnp.max(s, initial=0.0)
    keep = s > BASIS_RANK_RTOL * s_max
    return u * keep[None, :], s_max


def _sol_dtype(sol):
    leaves = jax.tree_util.tree_leaves(sol)
    return jnp.result_type(*leaves) if leaves else jnp.float64


def _diagnostics(F, sol_flat, unravel, theta, right, left, operator=None):
    """Relative root residual, null-space residuals and operator mismatch at ``sol``.

    ``scale = ‖∂₁F z‖ / ‖z‖`` for a fixed random ``z`` off the null space estimates
    ``‖∂₁F‖``; the root residual is ``‖F‖ / (scale ‖x‖)`` and the null-space residual
    ``max_p ‖∂₁F Q c_p‖ / scale`` over random unit combinations ``c_p`` of the modes
    (and ``‖∂₁Fᵀ L c_p‖`` for a separate left null space). A user ``operator`` (flat) is
    compared with autodiff on the same ``z``: ``‖op z − ∂₁F z‖ / ‖∂₁F z‖``.
    """
    def F_flat(v):
        return ravel_pytree(F(unravel(v), theta))[0]

    residual, jvp_at = jax.linearize(F_flat, sol_flat)
    n = sol_flat.size
    dtype = sol_flat.dtype
    keys = jax.random.split(jax.random.PRNGKey(_PROBE_SEED), NULLSPACE_PROBES + 1)
    z = jax.random.normal(keys[0], (n,), dtype)
    if right is not None:
        z = z - right @ (right.T @ z)
    z_norm = jnp.linalg.norm(z)
    Az = jvp_at(z)
    scale = jnp.linalg.norm(Az) / jnp.where(z_norm > 0, z_norm, 1.0)
    safe_scale = jnp.where(scale > 0, scale, 1.0)
    root = jnp.linalg.norm(residual) / (safe_scale * jnp.linalg.norm(sol_flat) + jnp.finfo(dtype).tiny)
    root = jnp.where(jnp.linalg.norm(residual) == 0, 0.0, root)
    null = jnp.zeros((), dtype)
    if right is not None:
        k = right.shape[1]
        for key in keys[1:]:
            c = jax.random.normal(key, (k,), dtype)
            c = c / jnp.maximum(jnp.linalg.norm(c), jnp.finfo(dtype).tiny)
            null = jnp.maximum(null, jnp.linalg.norm(jvp_at(right @ c)) / safe_scale)
            if left is not None:
                (back,) = jax.linear_transpose(jvp_at, sol_flat)(left @ c)
                null = jnp.maximum(null, jnp.linalg.norm(back) / safe_scale)
    mismatch = jnp.zeros((), dtype)
    if operator is not None:
        mismatch = jnp.linalg.norm(operator(z) - Az) / jnp.maximum(jnp.linalg.norm(Az), jnp.finfo(dtype).tiny)
    return root, null, mismatch


#: Largest accepted ``‖op z − ∂₁F z‖ / ‖∂₁F z‖`` for a user-supplied ``operator``.
OPERATOR_RTOL = 1e-6


def _diagnostic_message(root, null, basis_norm, root_tol, nullspace_tol, mismatch=0.0):
    """``(error, warning, message)`` for the first failed check, or ``None`` (NaN fails)."""
    if not float(mismatch) <= OPERATOR_RTOL:
        return (errors.LinearSolveError, errors.LinearSolveWarning,
                f"operator= does not apply ∂₁F: on a random vector z, ‖op z − ∂₁F z‖ / ‖∂₁F z‖ = "
                f"{float(mismatch):.3e} (tolerance {OPERATOR_RTOL:g}), so the derivative would be wrong. "
                "Build the operator at the same solution and arguments as F, or drop operator= "
                "(autodiff of F).")
    null_failed = nullspace_tol is not None and not float(null) <= nullspace_tol
    root_failed = root_tol is not None and not float(root) <= root_tol
    if basis_norm is not None and not float(basis_norm) > 0:
        problem = ("nullspace(...) returned only zero vectors: a null space must contain at least one "
                   "non-zero mode of ∂₁F. Return the zero modes (e.g. rigid translations), or drop "
                   "nullspace= if ∂₁F is non-singular.")
    elif null_failed:
        problem = (f"the declared null space is not a null space of ∂₁F: ‖∂₁F n‖ / ‖∂₁F‖ = {float(null):.3e} "
                   f"for a combination n of its modes (tolerance {nullspace_tol:g}). Projecting out a mode "
                   "that is not a zero mode changes the derivative. Declare only exact zero modes "
                   "(translations, rotations, gauge freedoms), or raise nullspace_tol if they are approximate.")
    elif root_failed:
        return (errors.RootError, errors.RootWarning,
                f"the solver's output is not a root of the optimality condition: ‖F(x, θ)‖ / (‖∂₁F‖ ‖x‖) = "
                f"{float(root):.3e} (tolerance {root_tol:g}). The implicit derivative is only as accurate "
                "as the root (Theorem 1 of Blondel et al.). Solve to a tighter tolerance, check that F is "
                "the optimality condition of what the solver computes, or raise root_tol.")
    else:
        return None
    return errors.NullSpaceError, errors.NullSpaceWarning, problem


def _check_diagnostics(policy, root_tol, nullspace_tol, root, null, basis_norm, mismatch=0.0, stacklevel=4):
    found = _diagnostic_message(np.max(root), np.max(null), None if basis_norm is None else np.min(basis_norm),
                                root_tol, nullspace_tol, np.max(mismatch))
    if found is not None:
        error, warning, message = found
        errors.report(policy, message, error, warning, stacklevel=stacklevel)


def _is_concrete(*trees) -> bool:
    return not any(isinstance(l, jax.core.Tracer) for t in trees for l in jax.tree_util.tree_leaves(t))


def _run_checks(policy, root_tol, nullspace_tol, F, sol, theta, right, left, basis_norm, operator=None):
    """The root, null-space and operator checks, on the host when the values are concrete,
    else in a callback. Returns a zero scalar to add to the tangent (so that the callback
    cannot be dead-code eliminated), or ``None``."""
    if policy == "ignore" or (root_tol is None and nullspace_tol is None and right is None and operator is None):
        return None
    sol_flat, unravel = ravel_pytree(sol)
    root, null, mismatch = _diagnostics(F, sol_flat, unravel, theta, right, left, operator)
    if _is_concrete(root, null, basis_norm, mismatch):
        _check_diagnostics(policy, root_tol, nullspace_tol, root, null, basis_norm, mismatch, stacklevel=6)
        return None
    dtype = sol_flat.dtype

    def host(root, null, basis_norm, mismatch):
        _check_diagnostics(policy, root_tol, nullspace_tol, root, null, basis_norm, mismatch, stacklevel=2)
        return np.zeros(np.shape(root), dtype)  # batched under vmap (broadcast_all)

    norm = jnp.ones((), dtype) if basis_norm is None else basis_norm
    # No derivative flows into the check: higher-order differentiation sees a constant.
    root, null, norm, mismatch = lax.stop_gradient((root, null, norm, mismatch))
    return jax.pure_callback(host, jax.ShapeDtypeStruct((), dtype), root, null, norm, mismatch,
                             vmap_method="broadcast_all")


# ----------------------------------------------------------------------------------
# The linear solve
# ----------------------------------------------------------------------------------


def _solve_failure(policy, dtype, residual, b_norm, iterations, breakdown, converged):
    converged = np.asarray(converged)
    if policy != "ignore" and not bool(np.all(converged)):
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
        errors.report(policy, message, errors.LinearSolveError, errors.LinearSolveWarning, stacklevel=2)
    return np.zeros(np.shape(converged), dtype)


def _call_solver(solve, matvec, b):
    out = solve(matvec, b)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], linear_solve.SolveInfo):
        return out
    return out, None


def _projected_solve(matvec, b, *, solve, right_basis, left_basis, symmetric, on_failure):
    """``A⁺ b`` for flat vectors, with ``A`` singular on the declared null spaces.

    The deflated system ``(A + L Nᵀ) y = P_L b`` (``L`` the left null space, ``= N`` when
    ``A`` is symmetric) is non-singular and its solution, projected on ``N⊥``, is
    ``A⁺ b``. Without a basis this is a plain (transposable) ``custom_linear_solve``.
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
                functools.partial(_solve_failure, on_failure, np.dtype(x.dtype)),
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
    return linear_solve.gmres(matvec, b, tol=1e-10)


def _solution_tangent(F, sol, theta, t_theta, *, solve, nullspace, left_nullspace, symmetric,
                      on_failure, root_tol, nullspace_tol, operator=None, checks=True):
    """``−(∂₁F)⁺ ∂₂F t_theta`` at ``(sol, theta)``, after the root and null-space checks
    (``checks=False``: the caller made them)."""
    sol_flat, unravel = ravel_pytree(sol)

    if operator is None:
        def matvec(v):
            _, out = jax.jvp(lambda s: F(s, theta), (sol,), (unravel(v),))
            return ravel_pytree(out)[0]
    else:
        def matvec(v):
            return ravel_pytree(operator(unravel(v)))[0]

    _, b = jax.jvp(lambda th: F(sol, th), (theta,), (t_theta,))
    right, basis_norm = (None, None) if nullspace is None else _orthonormal_basis(nullspace, sol, theta, sol_flat.size)
    left = None if left_nullspace is None else _orthonormal_basis(left_nullspace, sol, theta, sol_flat.size)[0]
    check = None
    if checks:
        check = _run_checks(on_failure, root_tol, nullspace_tol, F, sol, theta, right, left, basis_norm,
                            None if operator is None else matvec)
    x, info = _projected_solve(matvec, -ravel_pytree(b)[0], solve=solve, right_basis=right,
                               left_basis=left, symmetric=symmetric, on_failure=on_failure)
    if check is not None:
        x = x + check
    return unravel(x), info


def _validated(on_failure, root_tol, nullspace_tol):
    errors.check_policy(on_failure)
    for name, value in (("root_tol", root_tol), ("nullspace_tol", nullspace_tol)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise errors.OptionError(f"{name} must be a positive number or None (no check); got {value!r}.")


# ----------------------------------------------------------------------------------
# Public plain functions
# ----------------------------------------------------------------------------------


def root_jvp(optimality_fun: Callable, sol, args: tuple, tangents: tuple, *, solve: Callable = None,
             nullspace: Optional[Callable] = None, left_nullspace: Optional[Callable] = None,
             symmetric: bool = False, kwargs: Optional[dict] = None, kwargs_tangents: Optional[dict] = None,
             on_failure: str = "raise", root_tol: Optional[float] = DEFAULT_ROOT_TOL,
             nullspace_tol: Optional[float] = DEFAULT_NULLSPACE_TOL, return_info: bool = False,
             operator: Optional[Callable] = None):
    """Forward mode: ``J v = −(∂₁F)⁺ ∂₂F v`` at a root ``sol`` of ``F`` (paper eq. 3).

    Args:
      optimality_fun: ``F(x, *args, **kwargs)``, a pytree shaped like ``x``.
      sol: the root ``x*`` (a pytree).
      args: the positional arguments ``θ`` of ``F`` after ``x`` (pytrees of arrays).
      tangents: tangents ``v`` for each of ``args`` (same structure).
      solve: linear solver ``solve(matvec, b) -> x`` or ``(x, SolveInfo)``; default
        restarted GMRES with tolerance 1e-10.
      nullspace, left_nullspace, symmetric, on_failure, root_tol, nullspace_tol: see
        :func:`custom_root`.
      kwargs, kwargs_tangents: keyword arguments of ``F`` and their tangents (default zero).
      return_info: also return the :class:`~mdsens.linear_solve.SolveInfo` of the solve.
      operator: ``v ↦ ∂₁F(sol, θ) v`` on pytrees shaped like ``sol``, when it has a cheaper
        form than autodiff of ``F`` (an assembled sparse Jacobian, a Hessian built from
        blocks). Checked against autodiff on one random vector (relative
        :data:`OPERATOR_RTOL`, under ``on_failure``). Default: ``jax.jvp`` of ``F``.

    Returns:
      The tangent of the solution (shaped like ``sol``); with ``return_info``, a pair
      ``(tangent, SolveInfo or None)``.
    """
    _validated(on_failure, root_tol, nullspace_tol)
    kwargs = {} if kwargs is None else dict(kwargs)
    if kwargs_tangents is None:
        kwargs_tangents = jax.tree_util.tree_map(jnp.zeros_like, kwargs)
    theta, t_theta = (tuple(args), kwargs), (tuple(tangents), kwargs_tangents)
    F = _packed(optimality_fun)
    _check_structure(F, sol, theta)
    out, info = _solution_tangent(
        F, sol, theta, t_theta, solve=solve or _default_solve, nullspace=_packed(nullspace),
        left_nullspace=_packed(left_nullspace), symmetric=symmetric, on_failure=on_failure,
        root_tol=root_tol, nullspace_tol=nullspace_tol, operator=operator,
    )
    return (out, info) if return_info else out


def root_vjp(optimality_fun: Callable, sol, args: tuple, cotangent, *, solve: Callable = None,
             nullspace: Optional[Callable] = None, left_nullspace: Optional[Callable] = None,
             symmetric: bool = False, kwargs: Optional[dict] = None, on_failure: str = "raise",
             root_tol: Optional[float] = DEFAULT_ROOT_TOL,
             nullspace_tol: Optional[float] = DEFAULT_NULLSPACE_TOL, operator: Optional[Callable] = None):
    """Reverse mode: ``uᵀ J = −((∂₁F)⁺ᵀ u)ᵀ ∂₂F`` at a root ``sol`` (paper eq. 4).

    One transposed linear solve, whatever the number of parameters.

    Args: as :func:`root_jvp`, with ``cotangent`` ``u`` shaped like ``sol`` (``operator``
    must then be linear and transposable by JAX: built from JAX operations).

    Returns:
      A tuple with one cotangent per element of ``args``; when ``kwargs`` is given, the
      pair ``(args_cotangents, kwargs_cotangents)``.
    """
    _validated(on_failure, root_tol, nullspace_tol)
    has_kwargs = bool(kwargs)
    kwargs = {} if kwargs is None else dict(kwargs)
    theta = (tuple(args), kwargs)
    F = _packed(optimality_fun)
    _check_structure(F, sol, theta)

    def tangent_map(t_theta):
        return _solution_tangent(
            F, sol, theta, t_theta, solve=solve or _default_solve, nullspace=_packed(nullspace),
            left_nullspace=_packed(left_nullspace), symmetric=symmetric, on_failure=on_failure,
            root_tol=root_tol, nullspace_tol=nullspace_tol, operator=operator,
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
                optimality_takes_aux: bool = False, nullspace: Optional[Callable] = None,
                left_nullspace: Optional[Callable] = None, symmetric: bool = False,
                on_failure: str = "raise", root_tol: Optional[float] = DEFAULT_ROOT_TOL,
                nullspace_tol: Optional[float] = DEFAULT_NULLSPACE_TOL):
    """Make ``solver(init, *args, **kwargs)`` differentiable by implicit differentiation.

    ``solver`` returns ``x*`` with ``optimality_fun(x*, *args, **kwargs) ≈ 0`` (or
    ``(x*, aux)`` with ``has_aux=True``). The decorated solver keeps its primal behaviour
    and gains derivatives w.r.t. ``args`` and ``kwargs`` in forward mode (``jax.jvp``,
    ``jax.jacfwd``) and reverse mode (``jax.vjp``, ``jax.grad``, ``jax.jacrev``), under
    ``jax.jit`` and ``jax.vmap``, and to higher order, for arbitrary pytrees ``x`` and
    ``θ``. ``solver`` itself is never differentiated (never unrolled) and ``init`` gets
    a zero derivative.

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
      optimality_takes_aux: the channel for the solver's by-products (needs
        ``has_aux``): ``F`` and the null-space functions are called as
        ``F(x, aux, *args, **kwargs)``, with the ``aux`` the solver returned, e.g. a
        neighbor list built at ``x*`` or a null-space basis found by an eigen-analysis
        of the solution. ``aux`` enters them as a constant.
      nullspace: ``nullspace(x*, *args, **kwargs)`` returning a basis of the known zero
        modes of ``∂₁F`` (its right null space), as a pytree like ``x`` whose leaves carry
        a leading axis of ``k`` modes. Need not be orthonormal; dependent or zero-length
        modes are dropped (all-zero is refused). The derivative returned is then the
        minimum-norm (pseudo-inverse) one.
      left_nullspace: the null space of ``∂₁Fᵀ`` when it differs from ``nullspace``
        (non-symmetric ``∂₁F``); default: the same as ``nullspace``.
      symmetric: ``∂₁F`` is symmetric (true when ``F`` is a gradient); lets reverse mode
        reuse the forward solve instead of transposing the matvec.
      on_failure: what a failed check does: a linear solve that misses its tolerance
        (per its ``SolveInfo``), a solver output that is not a root (``root_tol``), a
        declared null space that is empty or not null (``nullspace_tol``).
        ``"raise"`` (default), ``"warn"`` (return the approximate derivative with a
        warning) or ``"ignore"``.
      root_tol: largest accepted ``‖F(x*, θ)‖ / (‖∂₁F‖ ‖x*‖)``, with ``‖∂₁F‖`` estimated
        from one random product; ``None`` skips the check.
      nullspace_tol: largest accepted ``‖∂₁F n‖ / ‖∂₁F‖`` over random unit combinations
        ``n`` of the declared modes (two products); ``None`` skips the check.

    Returns:
      A decorator. Arguments of the decorated solver are pytrees; leaves that are not
      arrays or numbers (strings, callables) are static and not differentiated.

    Raises:
      OptimalityStructureError: if ``F(x*, θ)`` is not shaped and typed like ``x*``, or
        ``has_aux=True`` and the solver does not return a pair.
      LinearSolveError, RootError, NullSpaceError: a failed check (see ``on_failure``).
        Inside a traced computation they are raised from a host callback, and JAX
        re-raises them as ``JaxRuntimeError`` carrying the class name and the message.
    """
    _validated(on_failure, root_tol, nullspace_tol)
    if optimality_takes_aux and not has_aux:
        raise errors.OptionError("optimality_takes_aux=True needs has_aux=True: the aux the solver "
                                 "returns is what F receives.")
    options = dict(solve=solve or _default_solve, symmetric=symmetric, on_failure=on_failure,
                   root_tol=root_tol, nullspace_tol=nullspace_tol)
    functions = _RootFunctions(optimality_fun, nullspace, left_nullspace, optimality_takes_aux)

    def decorator(solver: Callable):
        compiled = _CompiledTangent(functions, options)

        @functools.wraps(solver)
        def wrapped(init, *args, **kwargs):
            leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
            is_dynamic = tuple(_is_array_leaf(l) for l in leaves)
            layout = _ArgumentLayout(treedef, tuple(l for l, d in zip(leaves, is_dynamic) if not d), is_dynamic)
            dynamic = tuple(l for l, d in zip(leaves, is_dynamic) if d)

            @jax.custom_jvp
            def solve_root(init, dynamic_leaves):
                a, kw = layout.rebuild(dynamic_leaves)
                out = solver(init, *a, **kw)
                if has_aux and not (isinstance(out, tuple) and len(out) == 2):
                    raise errors.OptimalityStructureError(
                        f"has_aux=True, but the solver returned {type(out).__name__}, not a pair "
                        "(x, aux). Return (x, aux), or decorate with has_aux=False."
                    )
                return out

            @solve_root.defjvp
            def solve_root_jvp(primals, tangents):
                init, dynamic_leaves = primals
                _, t_dynamic = tangents
                out = solve_root(init, dynamic_leaves)
                sol, aux = out if has_aux else (out, None)
                t_sol = compiled(layout, sol, aux, dynamic_leaves, t_dynamic)
                if has_aux:
                    return out, (t_sol, jax.tree_util.tree_map(_zero_tangent, aux))
                return out, t_sol

            return solve_root(init, dynamic)

        wrapped.optimality_fun = optimality_fun
        return wrapped

    return decorator


class _ArgumentLayout(NamedTuple):
    """How a call's ``(args, kwargs)`` split into array leaves (differentiated) and the
    rest (static: strings, callables); hashable when the static leaves are."""

    treedef: Any
    static: tuple
    is_dynamic: tuple

    def rebuild(self, dynamic_leaves):
        dyn, sta = iter(dynamic_leaves), iter(self.static)
        merged = [next(dyn) if d else next(sta) for d in self.is_dynamic]
        return jax.tree_util.tree_unflatten(self.treedef, merged)


class _RootFunctions(NamedTuple):
    """The user's ``F`` and null-space functions, and whether they take the solver's aux."""

    optimality_fun: Callable
    nullspace: Optional[Callable]
    left_nullspace: Optional[Callable]
    takes_aux: bool

    def on_dynamic(self, fun, layout, aux):
        """``fun`` as a function ``(x, dynamic leaves)``."""
        if fun is None:
            return None
        if self.takes_aux:
            return lambda x, dyn: (lambda a, kw: fun(x, aux, *a, **kw))(*layout.rebuild(dyn))
        return lambda x, dyn: (lambda a, kw: fun(x, *a, **kw))(*layout.rebuild(dyn))

    def bound(self, layout, aux):
        """``(F, nullspace, left_nullspace)`` of ``(x, dynamic leaves)``."""
        return tuple(self.on_dynamic(f, layout, aux) for f in self[:3])


class _CompiledTangent:
    """The tangent rule of one decorated solver: ``−(∂₁F)⁺ ∂₂F t`` at ``(x*, θ)``.

    Outside ``jit`` (``jax.grad(loss)(θ)`` around a host solver), JAX would run the
    tangent eagerly and compile the linear solve's loop afresh on every call, because
    each call stages a new jaxpr; seconds per gradient. When the primal values are
    concrete and the argument layout and aux structure hashable, the tangent is instead
    a ``jax.jit`` function kept here, so its linearization and transpose are cached with
    it; the root and null-space checks then run from a compiled diagnostics function and
    raise on the host with their own types. Otherwise (under ``jit``/``vmap``, or with
    unhashable static arguments) the tangent is traced inline, checks in callbacks.
    """

    def __init__(self, functions: _RootFunctions, options: dict):
        self.functions, self.options = functions, options
        self._tangent = jax.jit(self._traced_tangent, static_argnums=(0, 1), static_argnames="checks")
        self._diagnostics = jax.jit(self._traced_diagnostics, static_argnums=0)

    def __call__(self, layout, sol, aux, dynamic_leaves, t_dynamic):
        nonzero = tuple(not _is_float0(t) for t in t_dynamic)
        if not (_is_concrete(sol, aux, dynamic_leaves) and _jittable(layout, aux)):
            return self._traced_tangent(layout, nonzero, sol, aux, dynamic_leaves, t_dynamic)
        options = self.options
        if options["on_failure"] != "ignore":
            root, null, basis_norm = self._diagnostics(layout, sol, aux, dynamic_leaves)
            _check_diagnostics(options["on_failure"], options["root_tol"], options["nullspace_tol"], root, null,
                               basis_norm, stacklevel=5)
        t_nonzero = tuple(t for t, nz in zip(t_dynamic, nonzero) if nz)
        return self._tangent(layout, nonzero, sol, aux, dynamic_leaves, t_nonzero, checks=False)

    def _traced_tangent(self, layout, nonzero, sol, aux, dynamic_leaves, t_dynamic, checks=True):
        if len(t_dynamic) != len(nonzero):  # float0 tangents (integer leaves) were left out
            it = iter(t_dynamic)
            t_dynamic = tuple(next(it) if nz else _zero_tangent(l) for l, nz in zip(dynamic_leaves, nonzero))
        F, nullspace, left_nullspace = self.functions.bound(layout, aux)
        _check_structure(F, sol, dynamic_leaves)
        t_sol, _ = _solution_tangent(F, sol, dynamic_leaves, t_dynamic, nullspace=nullspace,
                                     left_nullspace=left_nullspace, checks=checks, **self.options)
        return t_sol

    def _traced_diagnostics(self, layout, sol, aux, dynamic_leaves):
        F, nullspace, left_nullspace = self.functions.bound(layout, aux)
        _check_structure(F, sol, dynamic_leaves)
        sol_flat, unravel = ravel_pytree(sol)
        right, basis_norm = (None, None) if nullspace is None else _orthonormal_basis(
            nullspace, sol, dynamic_leaves, sol_flat.size)
        left = None if left_nullspace is None else _orthonormal_basis(
            left_nullspace, sol, dynamic_leaves, sol_flat.size)[0]
        root, null, _ = _diagnostics(F, sol_flat, unravel, dynamic_leaves, right, left)
        return root, null, basis_norm


def _is_float0(x) -> bool:
    return getattr(x, "dtype", None) == jax.dtypes.float0


def _jittable(layout, aux) -> bool:
    """Whether ``layout`` and ``aux``'s structure can key a ``jax.jit`` cache."""
    try:
        hash((layout, jax.tree_util.tree_structure(aux)))
    except TypeError:
        return False
    return all(_is_array_leaf(l) for l in jax.tree_util.tree_leaves(aux))


def _zero_tangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def custom_fixed_point(fixed_point_fun: Callable, *, solve: Callable = None, has_aux: bool = False,
                       optimality_takes_aux: bool = False, nullspace: Optional[Callable] = None,
                       left_nullspace: Optional[Callable] = None, symmetric: bool = False,
                       on_failure: str = "raise", root_tol: Optional[float] = DEFAULT_ROOT_TOL,
                       nullspace_tol: Optional[float] = DEFAULT_NULLSPACE_TOL):
    """Like :func:`custom_root` for a fixed point ``x* = T(x*, θ)``.

    The optimality condition is ``F(x, θ) = T(x, θ) − x`` (paper §2.2), so
    ``∂₁F = ∂₁T − I``. For gradient descent, ``T(x) = x − η ∇f(x)``, this is
    ``−η ∇²f``: symmetric, so pass ``symmetric=True`` and a solver suited to a negative
    definite matrix (``minres``, ``gmres``; not ``cg``). With ``optimality_takes_aux``,
    ``T`` is called as ``T(x, aux, *args, **kwargs)``.
    """

    def optimality_fun(x, *args, **kwargs):
        return jax.tree_util.tree_map(lambda t, xi: t - xi, fixed_point_fun(x, *args, **kwargs), x)

    return custom_root(optimality_fun, solve=solve, has_aux=has_aux,
                       optimality_takes_aux=optimality_takes_aux, nullspace=nullspace,
                       left_nullspace=left_nullspace, symmetric=symmetric, on_failure=on_failure,
                       root_tol=root_tol, nullspace_tol=nullspace_tol)
