"""Linear solvers for the implicit function theorem's linear system ``A x = b``.

Every solver here has the same signature and the same contract::

    x, info = solver(matvec, b, *, tol=1e-10, maxiter=None, precond=None, ridge=0.0, x0=None)

* ``matvec``: the linear map ``v -> A v`` on pytrees shaped like ``b`` (never materialized
  by the matrix-free solvers; the dense ones build ``A`` with ``n`` matvecs).
* ``b``: a pytree of arrays.
* ``tol``: relative tolerance on the **true** residual, ``‖A x − b‖ ≤ tol · ‖b‖``.
* ``maxiter``: iteration cap (default: ``10 n`` for CG/MINRES/BiCGSTAB, ``n`` restarts
  for GMRES).
* ``precond``: optional map ``v -> M v`` with ``M ≈ A⁻¹`` (SPD for CG and MINRES).
* ``ridge``: solve ``(A + ridge I) x = b`` instead, a Tikhonov regularization.
* ``x0``: initial guess (default zeros).

:func:`cg` also takes ``atol``: it then stops at ``‖A x − b‖ ≤ max(tol · ‖b‖, atol)``.

``info`` is a :class:`SolveInfo`: final true residual norm, ``‖b‖``, iteration count, a
``converged`` flag and a ``breakdown`` flag (e.g. CG met non-positive curvature: the
matrix is singular or indefinite). The solvers never raise inside ``jit``: inspect
``info``, or let :func:`mdsens.custom_root` turn a failure into a clear error.

All solvers work under ``jit`` and ``vmap`` and compute in the dtype of ``b``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

__all__ = [
    "SolveInfo",
    "each_column",
    "cg",
    "cg_lanczos",
    "LanczosTridiagonal",
    "minres",
    "gmres",
    "bicgstab",
    "lu",
    "cholesky",
    "lstsq",
]


class SolveInfo(NamedTuple):
    """Diagnostics of a linear solve ``A x = b``.

    Attributes:
      residual_norm: ``‖A x − b‖`` recomputed from the returned ``x`` (not a recurrence).
      b_norm: ``‖b‖``.
      iterations: iterations (matrix-free) or 0 (dense).
      converged: ``residual_norm <= tol * b_norm`` (and no breakdown).
      breakdown: the method could not continue (non-positive curvature in CG, a zero
        pivot in BiCGSTAB, a failed Cholesky factorization, ...).
    """

    residual_norm: jnp.ndarray
    b_norm: jnp.ndarray
    iterations: jnp.ndarray
    converged: jnp.ndarray
    breakdown: jnp.ndarray

    @property
    def relative_residual(self):
        """``‖A x − b‖ / ‖b‖`` (0 when ``b = 0``)."""
        traced = isinstance(self.b_norm, jax.core.Tracer) or isinstance(self.residual_norm, jax.core.Tracer)
        xp = jnp if traced else np  # on the host, numpy: no one-off compilations
        b_norm, residual_norm = xp.asarray(self.b_norm), xp.asarray(self.residual_norm)
        return xp.where(b_norm > 0, residual_norm / xp.where(b_norm > 0, b_norm, 1), 0.0)


def _flatten_problem(matvec, b, precond, ridge, x0):
    """Vectorize a pytree problem: flat ``b``, flat matvec (with ridge), flat precond."""
    b_flat, unravel = ravel_pytree(b)

    def flat_matvec(v):
        out = ravel_pytree(matvec(unravel(v)))[0]
        return out + ridge * v if ridge else out

    if precond is None:
        flat_precond = lambda v: v  # noqa: E731
    else:
        flat_precond = lambda v: ravel_pytree(precond(unravel(v)))[0]  # noqa: E731
    x0_flat = jnp.zeros_like(b_flat) if x0 is None else ravel_pytree(x0)[0].astype(b_flat.dtype)
    return b_flat, unravel, flat_matvec, flat_precond, x0_flat


def _finish(x, flat_matvec, b, tol, iterations, breakdown, unravel, atol=0.0):
    residual = jnp.linalg.norm(flat_matvec(x) - b)
    b_norm = jnp.linalg.norm(b)
    finite = jnp.all(jnp.isfinite(x))
    converged = (residual <= jnp.maximum(tol * b_norm, atol)) & finite & ~breakdown
    # b = 0 has the exact answer x = 0 whatever happened inside.
    converged = converged | ((b_norm == 0) & (residual == 0))
    info = SolveInfo(residual, b_norm, jnp.asarray(iterations), converged, jnp.asarray(breakdown))
    return unravel(x), info


def _default_maxiter(n, maxiter, factor=10):
    return factor * n if maxiter is None else maxiter


def _tiny(dtype):
    return jnp.finfo(dtype).tiny ** 0.5


# ----------------------------------------------------------------------------------
# Matrix-free Krylov solvers
# ----------------------------------------------------------------------------------


def cg(matvec: Callable, b, *, tol: float = 1e-10, maxiter: Optional[int] = None,
       precond: Optional[Callable] = None, ridge: float = 0.0, x0=None, atol=0.0):
    """Preconditioned conjugate gradient for symmetric positive-definite ``A``.

    Stops when the recurrence residual reaches ``max(tol · ‖b‖, atol)``, or at
    non-positive curvature ``pᵀ A p <= 0`` (``info.breakdown``): the matrix is singular or
    indefinite there. ``atol`` (units of ``b``, may be traced) is the accuracy beyond
    which ``b`` itself is not known, such as the part of ``b`` that an inexact root
    leaves (docs/design.md §13); ``info.converged`` uses the same test. For a Hessian with
    zero modes, declare them with ``custom_root(nullspace=...)``; for an indefinite
    matrix use :func:`minres`.
    """
    x, info, _ = _cg(matvec, b, tol, maxiter, precond, ridge, x0, record=0, atol=atol)
    return x, info


def each_column(fn: Callable, *columns):
    """``fn`` of each slice of ``columns`` (pytrees) along their leading axis, stacked as
    ``jax.vmap(fn)(*columns)`` stacks them: a loop (``jax.lax.map``) on the CPU, ``vmap``
    on accelerators. Jittable.

    For independent solves, one per right-hand side. A vmapped Krylov solve runs every
    lane until the slowest has converged, and on the CPU a lane costs what a solve of its
    own does (a CG step on 2 columns 2.3x one column at LJ N = 499, on 10 columns 10x at
    Stillinger–Weber N = 999): one after another, each stops at its own iteration count.
    Accelerators run lanes side by side. docs/design.md §14.
    """
    if jax.default_backend() == "cpu":
        return lax.map(lambda sliced: fn(*sliced), columns)
    return jax.vmap(fn)(*columns)


class LanczosTridiagonal(NamedTuple):
    """The Lanczos tridiagonal ``T`` that a CG run builds (Golub & Van Loan §11.3.5).

    Attributes:
      diagonal: ``(m,)`` ``T_ii = 1/α_i + β_{i−1}/α_{i−1}``; rows ``≥ steps`` are zero.
      off_diagonal: ``(m,)`` ``T_{i,i+1} = √β_i / α_i``; entry ``steps − 1`` couples ``T``
        to the next Lanczos vector (the Ritz residuals' factor).
      steps: rows of ``T`` that are valid (CG iterations, at most ``m``).
    """

    diagonal: jnp.ndarray
    off_diagonal: jnp.ndarray
    steps: jnp.ndarray


def cg_lanczos(matvec: Callable, b, *, steps: int, tol: float = 1e-10, maxiter: Optional[int] = None,
               ridge: float = 0.0, x0=None):
    """:func:`cg` that also returns the Lanczos tridiagonal of its first ``steps`` iterations.

    CG's step lengths ``α`` and ``β`` are the Lanczos coefficients of ``A`` on the Krylov
    space of ``b``, so the eigenvalues of the returned ``T`` (Ritz values) estimate the
    extreme eigenvalues of ``A`` for free; without reorthogonalization a converged one may
    repeat, but none lies outside ``A``'s spectrum. Unpreconditioned.

    Returns:
      ``(x, SolveInfo, LanczosTridiagonal)``.
    """
    return _cg(matvec, b, tol, maxiter, None, ridge, x0, record=int(steps))


def _cg(matvec, b, tol, maxiter, precond, ridge, x0, *, record, atol=0.0):
    b, unravel, A, M, x = _flatten_problem(matvec, b, precond, ridge, x0)
    maxiter = _default_maxiter(b.size, maxiter)
    threshold = jnp.maximum(tol * jnp.linalg.norm(b), atol) ** 2

    r = b - A(x)
    z = M(r)
    coefficients = jnp.zeros((2, record), b.dtype)  # α_k, β_k of the first `record` iterations
    state = (x, r, z, z, jnp.vdot(r, z), jnp.asarray(0), jnp.asarray(False), coefficients)

    def cond(state):
        _, r, _, _, _, k, broke, _ = state
        return (jnp.vdot(r, r) > threshold) & (k < maxiter) & ~broke

    def body(state):
        x, r, z, p, rz, k, _, coefficients = state
        Ap = A(p)
        curvature = jnp.vdot(p, Ap)
        broke = curvature <= 0
        alpha = jnp.where(broke, 0.0, rz / jnp.where(broke, 1.0, curvature))
        x = x + alpha * p
        r = r - alpha * Ap
        z = M(r)
        rz_new = jnp.vdot(r, z)
        beta = rz_new / jnp.where(rz == 0, 1.0, rz)
        p = z + beta * p
        if record:
            coefficients = coefficients.at[:, jnp.minimum(k, record - 1)].set(
                jnp.where(k < record, jnp.stack([alpha, beta]), coefficients[:, record - 1]))
        return x, r, z, p, rz_new, k + 1, broke, coefficients

    x, _, _, _, _, k, broke, coefficients = lax.while_loop(cond, body, state)
    x, info = _finish(x, A, b, tol, k, broke, unravel, atol)
    return x, info, _tridiagonal(coefficients, jnp.minimum(k, record)) if record else None


def _tridiagonal(coefficients, steps):
    alpha, beta = coefficients
    valid = jnp.arange(alpha.size) < steps
    safe = jnp.where(valid & (alpha != 0), alpha, 1.0)
    previous = jnp.concatenate([jnp.zeros(1, alpha.dtype), beta[:-1] / safe[:-1]])
    diagonal = jnp.where(valid, 1.0 / safe + previous, 0.0)
    off_diagonal = jnp.where(valid, jnp.sqrt(jnp.maximum(beta, 0.0)) / safe, 0.0)
    return LanczosTridiagonal(diagonal, off_diagonal, steps)


def minres(matvec: Callable, b, *, tol: float = 1e-10, maxiter: Optional[int] = None,
           precond: Optional[Callable] = None, ridge: float = 0.0, x0=None):
    """MINRES (Paige & Saunders, 1975) for symmetric, possibly indefinite ``A``.

    Minimizes ``‖A x − b‖`` over the Krylov space; converges on symmetric indefinite and
    on consistent singular systems. ``precond`` must be symmetric positive definite.
    """
    b, unravel, A, M, x = _flatten_problem(matvec, b, precond, ridge, x0)
    dtype = b.dtype
    maxiter = _default_maxiter(b.size, maxiter)
    eps = jnp.finfo(dtype).eps

    r1 = b - A(x)
    y = M(r1)
    beta1 = jnp.sqrt(jnp.maximum(jnp.vdot(r1, y), 0.0))
    zeros = jnp.zeros_like(b)
    one, zero = jnp.asarray(1.0, dtype), jnp.asarray(0.0, dtype)
    # state: x, r1, r2, y, w, w2, oldb, beta, dbar, epsln, phibar, cs, sn, k
    state = (x, r1, r1, y, zeros, zeros, zero, beta1, zero, zero, beta1, -one, zero,
             jnp.asarray(0))

    def cond(state):
        phibar, k = state[10], state[13]
        return (phibar > tol * beta1) & (k < maxiter) & (beta1 > 0)

    def body(state):
        x, r1, r2, y, w, w2, oldb, beta, dbar, epsln, phibar, cs, sn, k = state
        v = y / jnp.where(beta == 0, 1.0, beta)
        y = A(v)
        y = jnp.where(k >= 1, y - (beta / jnp.where(oldb == 0, 1.0, oldb)) * r1, y)
        alfa = jnp.vdot(v, y)
        y = y - (alfa / jnp.where(beta == 0, 1.0, beta)) * r2
        r1, r2 = r2, y
        y = M(r2)
        oldb, beta = beta, jnp.sqrt(jnp.maximum(jnp.vdot(r2, y), 0.0))
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = jnp.maximum(jnp.hypot(gbar, beta), eps)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        x = x + phi * w
        return x, r1, r2, y, w, w2, oldb, beta, dbar, epsln, phibar, cs, sn, k + 1

    final = lax.while_loop(cond, body, state)
    return _finish(final[0], A, b, tol, final[13], jnp.asarray(False), unravel)


def bicgstab(matvec: Callable, b, *, tol: float = 1e-10, maxiter: Optional[int] = None,
             precond: Optional[Callable] = None, ridge: float = 0.0, x0=None):
    """BiCGSTAB (van der Vorst, 1992) for general non-symmetric ``A``, right-preconditioned.

    ``info.breakdown`` is set when a pivot (``ρ`` or ``ω``) vanishes.
    """
    b, unravel, A, M, x = _flatten_problem(matvec, b, precond, ridge, x0)
    dtype = b.dtype
    maxiter = _default_maxiter(b.size, maxiter)
    threshold = tol * jnp.linalg.norm(b)
    tiny = _tiny(dtype)

    r = b - A(x)
    one = jnp.asarray(1.0, dtype)
    zeros = jnp.zeros_like(b)
    state = (x, r, r, zeros, zeros, one, one, one, jnp.asarray(0), jnp.asarray(False))

    def cond(state):
        _, r, _, _, _, _, _, _, k, broke = state
        return (jnp.linalg.norm(r) > threshold) & (k < maxiter) & ~broke

    def body(state):
        x, r, rhat, p, v, rho, alpha, omega, k, _ = state
        rho_new = jnp.vdot(rhat, r)
        broke = jnp.abs(rho_new) < tiny
        beta = (rho_new / jnp.where(rho == 0, 1.0, rho)) * (alpha / jnp.where(omega == 0, 1.0, omega))
        p = r + beta * (p - omega * v)
        phat = M(p)
        v = A(phat)
        rv = jnp.vdot(rhat, v)
        broke = broke | (jnp.abs(rv) < tiny)
        alpha = rho_new / jnp.where(rv == 0, 1.0, rv)
        s = r - alpha * v
        shat = M(s)
        t = A(shat)
        tt = jnp.vdot(t, t)
        omega = jnp.where(tt > 0, jnp.vdot(t, s) / jnp.where(tt > 0, tt, 1.0), 0.0)
        # A vanishing omega after an exact half step is convergence, not breakdown.
        step_done = jnp.linalg.norm(s) <= threshold
        x_new = x + alpha * phat + omega * shat
        r_new = s - omega * t
        broke = broke | ((omega == 0) & ~step_done)
        x = jnp.where(broke, x, x_new)
        r = jnp.where(broke, r, r_new)
        return x, r, rhat, p, v, rho_new, alpha, omega, k + 1, broke

    final = lax.while_loop(cond, body, state)
    return _finish(final[0], A, b, tol, final[8], final[9], unravel)


def gmres(matvec: Callable, b, *, tol: float = 1e-10, maxiter: Optional[int] = None,
          precond: Optional[Callable] = None, ridge: float = 0.0, x0=None, restart: int = 30):
    """Restarted GMRES(m) (Saad & Schultz, 1986) for general ``A``, right-preconditioned.

    Each cycle builds an Arnoldi basis of ``restart`` vectors (modified Gram-Schmidt,
    stopping early on lucky breakdown), solves the small least-squares problem and
    restarts from the true residual. ``maxiter`` counts restarts (default ``n``).
    """
    b, unravel, A, M, x = _flatten_problem(matvec, b, precond, ridge, x0)
    dtype = b.dtype
    n = b.size
    m = max(1, min(restart, n))
    maxiter = n if maxiter is None else maxiter
    b_norm = jnp.linalg.norm(b)
    tiny = _tiny(dtype)

    def cycle(x):
        r = b - A(x)
        r_norm = jnp.linalg.norm(r)
        V = jnp.zeros((m + 1, n), dtype).at[0].set(r / jnp.where(r_norm > 0, r_norm, 1.0))
        H = jnp.zeros((m + 1, m), dtype)

        def arnoldi(j, VH):
            V, H = VH
            w = A(M(V[j]))

            def orthogonalize(i, wh):
                w, h = wh
                # rows > j are zero, so projecting on them is a no-op; kept branch-free.
                hij = jnp.vdot(V[i], w)
                return w - hij * V[i], h.at[i].set(hij)

            w, h = lax.fori_loop(0, m + 1, orthogonalize, (w, jnp.zeros((m + 1,), dtype)))
            h_next = jnp.linalg.norm(w)
            h = h.at[j + 1].set(h_next)
            V = V.at[j + 1].set(jnp.where(h_next > tiny, w / jnp.where(h_next > tiny, h_next, 1.0), 0.0))
            return V, H.at[:, j].set(h)

        V, H = lax.fori_loop(0, m, arnoldi, (V, H))
        e1 = jnp.zeros((m + 1,), dtype).at[0].set(r_norm)
        y = jnp.linalg.lstsq(H, e1)[0]
        return x + M(V[:m].T @ y)

    def cond(state):
        x, k = state
        return (jnp.linalg.norm(b - A(x)) > tol * b_norm) & (k < maxiter)

    def body(state):
        x, k = state
        return cycle(x), k + 1

    x, k = lax.while_loop(cond, body, (x, jnp.asarray(0)))
    return _finish(x, A, b, tol, k, jnp.asarray(False), unravel)


# ----------------------------------------------------------------------------------
# Dense solvers: small problems, and references for the matrix-free ones
# ----------------------------------------------------------------------------------


def _dense(solve_dense, matvec, b, tol, precond, ridge, x0):
    del precond, x0  # a direct solve needs neither
    b_flat, unravel, A, _, _ = _flatten_problem(matvec, b, None, ridge, None)
    matrix = jax.vmap(A)(jnp.eye(b_flat.size, dtype=b_flat.dtype)).T
    x, broke = solve_dense(matrix, b_flat)
    return _finish(x, A, b_flat, tol, 0, broke, unravel)


def lu(matvec: Callable, b, *, tol: float = 1e-10, maxiter=None, precond=None,
       ridge: float = 0.0, x0=None):
    """Dense LU solve (``jnp.linalg.solve``) of the materialized matrix; O(n³)."""
    del maxiter
    return _dense(lambda A, b: (jnp.linalg.solve(A, b), jnp.asarray(False)), matvec, b, tol, precond, ridge, x0)


def cholesky(matvec: Callable, b, *, tol: float = 1e-10, maxiter=None, precond=None,
             ridge: float = 0.0, x0=None):
    """Dense Cholesky solve for SPD ``A``; ``info.breakdown`` if ``A`` is not positive definite."""
    del maxiter

    def solve(A, b):
        factor = jnp.linalg.cholesky(A)
        failed = ~jnp.all(jnp.isfinite(factor))
        x = jax.scipy.linalg.cho_solve((factor, True), b)
        return x, failed

    return _dense(solve, matvec, b, tol, precond, ridge, x0)


def lstsq(matvec: Callable, b, *, tol: float = 1e-10, maxiter=None, precond=None,
          ridge: float = 0.0, x0=None, rcond: Optional[float] = None):
    """Minimum-norm least-squares solution ``A⁺ b`` through a dense pseudo-inverse.

    ``converged`` then means the system was consistent to ``tol``; for a singular but
    consistent system this is the reference answer that null-space handling must match.
    """
    del maxiter

    def solve(A, b):
        return jnp.linalg.pinv(A, rtol=rcond) @ b, jnp.asarray(False)

    return _dense(solve, matvec, b, tol, precond, ridge, x0)
