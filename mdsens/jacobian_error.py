"""How wrong is an implicit Jacobian taken at an approximate solution? (Theorem 1)

Blondel et al., "Efficient and Modular Implicit Differentiation" (NeurIPS 2022),
Theorem 1. Let ``F(x, θ) = 0`` define ``x*(θ)`` and write

    A(x) = −∂₁F(x, θ)   (n × n),     B(x) = ∂₂F(x, θ)   (n × p),     J(x) = A(x)⁻¹ B(x).

``J(x*)`` is the true Jacobian ``∂x*(θ)``; ``J(x̂)`` is what implicit differentiation
returns when the solver stopped at ``x̂``. If ``‖A(x̂) v‖ ≥ α ‖v‖``, ``‖B(x̂) − B(x*)‖ ≤
β ‖x̂ − x*‖``, ``‖A(x̂) − A(x*)‖ ≤ γ ‖x̂ − x*‖`` and ``‖B(x*)‖ ≤ R``, then

    ‖J(x̂) − J(x*)‖ ≤ C ‖x̂ − x*‖,        C = β/α + γR/α².

(The proof gives the sharper ``C = (β + γ_J)/α`` with ``γ_J`` the Lipschitz constant of
``x ↦ A(x) J(x*)``, ``γ_J ≤ γ ‖J(x*)‖ ≤ γR/α``; :func:`theorem1_constant_local`.)

Norms: Euclidean for vectors, spectral (operator 2-norm) for matrices, everywhere here.
``x`` and ``θ`` may be pytrees; matrices are over ``ravel_pytree`` order (rows ``x``,
columns ``θ``). A declared ``nullspace`` (zero modes of ``∂₁F`` that do not depend on
``x``, e.g. rigid translations) is handled as in the core: ``A⁻¹`` becomes the
pseudo-inverse, ``α`` the smallest singular value on the complement, and distances and
residuals are measured on the complement.

Three layers, one implementation of the formulas:

* pure functions (:func:`theorem1_constant`, :func:`theorem1_constant_local`,
  :func:`theorem1_bound`, :func:`distance_from_residual`): numbers in, numbers out, jittable;
* estimators on any ``F``: :func:`implicit_jacobian`, :func:`bound_constants`,
  :func:`error_estimate` (a-posteriori, from ``F`` at ``x̂`` alone: the Theorem-1 form,
  or the first-order error along the Newton step);
* jittable first-order pieces for callers that own their solves: :func:`newton_step`,
  :func:`first_order_error` (forward mode), :func:`adjoint` and
  :func:`first_order_gradient_error` (reverse mode), :func:`newton_linearity`,
  :func:`first_order_estimate`;
* the experiment of the paper's Figure: :func:`error_curve` (implicit vs unrolled).

This module knows no physics; ``mdsens.md`` reports the first-order estimates of its
sensitivities, observable gradients and elastic constants through these functions.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mdsens import errors
from mdsens.implicit import linear_solve, root_jvp, root_vjp

__all__ = [
    "theorem1_constant",
    "theorem1_constant_local",
    "theorem1_bound",
    "distance_from_residual",
    "implicit_jacobian",
    "JacobianOperator",
    "bound_constants",
    "BoundConstants",
    "error_estimate",
    "ErrorEstimate",
    "newton_step",
    "first_order_error",
    "first_order_rhs",
    "linearized_solve",
    "rhs_variation",
    "first_order_estimate",
    "newton_linearity",
    "adjoint",
    "first_order_gradient_error",
    "error_curve",
    "ErrorCurve",
    "DENSE_MAX_DIM",
    "SINGULAR_RTOL",
]

#: Problems with at most this many unknowns (and parameters) are handled densely by
#: default: ``jacfwd`` of ``F`` and an SVD. Larger ones go matrix-free.
DENSE_MAX_DIM = 500
#: ``α ≤ SINGULAR_RTOL · ‖A‖`` (beyond the declared null space) is a singular ``A``.
SINGULAR_RTOL = 1e-10
#: Singular values of a declared null-space basis below this fraction of the largest
#: are dropped (a dependent or zero-length mode), as in the core.
BASIS_RANK_RTOL = 1e-8
#: Largest ``‖A n‖ / ‖A‖`` accepted for a declared zero mode ``n`` (as the core's default).
NULLSPACE_TOL = 1e-3
#: Lanczos (matrix-free α): iteration cap and the Ritz residual, relative to the largest
#: Ritz value, at which the smallest one counts as converged.
LANCZOS_MAX_STEPS = 300
LANCZOS_RTOL = 1e-10
#: Power iterations for a matrix-free spectral norm (a lower estimate that converges
#: like ``(σ₂/σ₁)^(2k)``).
POWER_ITERATIONS = 50


# ------------------------------------------------------------------------ pure formulas
def _xp(*values):
    """``jax.numpy`` inside a trace, else ``numpy``: the formulas below run on host values
    too (the physics layer's reports), where each eager jax operation would compile."""
    return jnp if any(isinstance(v, jax.core.Tracer) for v in values) else np


def _positive(alpha):
    """``(ok, safe)``: where ``α`` is a positive finite number, and ``α`` with 1 elsewhere."""
    xp = _xp(alpha)
    alpha = xp.asarray(alpha)
    ok = xp.isfinite(alpha) & (alpha > 0)
    return ok, xp.where(ok, alpha, 1.0)


def theorem1_constant_local(alpha, beta, gamma_jacobian):
    """``C = (β + γ_J) / α``: Theorem 1's constant in the sharper form of its proof.

    ``γ_J`` is a Lipschitz constant of ``x ↦ A(x) J(x*)`` (or its directional version
    ``‖∂ₓ(A J*)[û]‖`` along a unit direction ``û``); ``γ_J ≤ γ ‖J(x*)‖ ≤ γR/α``.
    Broadcasts over arrays (e.g. one ``β_j, γ_J,j`` per parameter ``j``); jittable.
    Returns NaN where ``α`` is not a positive finite number (no bound exists there).
    """
    ok, safe = _positive(alpha)
    return _xp(alpha, beta, gamma_jacobian).where(ok, (beta + gamma_jacobian) / safe, np.nan)


def theorem1_constant(alpha, beta, gamma, R):
    """``C = β/α + γR/α²`` (Theorem 1). NaN where ``α`` is not positive; broadcasts.

    Args:
      alpha: lower bound of ``‖A v‖ / ‖v‖`` (smallest singular value of ``A = −∂₁F``).
      beta, gamma: Lipschitz constants in ``x`` of ``B = ∂₂F`` and ``A``.
      R: ``‖B(x*)‖``.
    """
    ok, safe = _positive(alpha)
    return theorem1_constant_local(_xp(alpha).where(ok, alpha, np.nan), beta, gamma * R / safe)


def theorem1_bound(alpha, beta, gamma, R, distance):
    """``C ‖x̂ − x*‖`` with ``C`` from :func:`theorem1_constant`: the Jacobian-error bound."""
    return theorem1_constant(alpha, beta, gamma, R) * distance


def distance_from_residual(residual_norm, alpha):
    """``‖F(x̂)‖ / α``: the a-posteriori distance ``‖x̂ − x*‖`` (NaN where ``α ≤ 0``).

    Exact as a bound when ``A`` is symmetric definite with ``|λ| ≥ α`` on the segment
    from ``x̂`` to ``x*`` (then ``‖F(x̂)‖ = ‖Ā (x̂ − x*)‖ ≥ α ‖x̂ − x*‖``, ``Ā`` the mean of
    ``A`` on the segment); to first order in ``‖x̂ − x*‖`` otherwise.
    """
    ok, safe = _positive(alpha)
    return _xp(alpha, residual_norm).where(ok, residual_norm / safe, np.nan)


# ------------------------------------------------------------------------ the problem
@dataclasses.dataclass(frozen=True)
class _Problem:
    """``F`` on flat vectors at one point, with the orthonormal null basis ``N`` (n, k)."""

    F: Callable          # F(x_flat, theta_flat) -> flat
    user_F: Callable     # F(x, θ) on pytrees, as given
    x: jnp.ndarray
    theta: jnp.ndarray
    unravel_x: Callable
    unravel_theta: Callable
    N: Optional[np.ndarray]
    residual: np.ndarray  # F(x, θ), flat

    @property
    def n(self) -> int:
        return int(self.x.size)

    @property
    def p(self) -> int:
        return int(self.theta.size)

    def project(self, v):
        """``P v``: the component of ``v`` (or of the columns of ``v``) off the null space."""
        if self.N is None:
            return v
        return v - self.N @ (self.N.T @ v)

    def complement(self) -> Optional[np.ndarray]:
        """``Q`` (n, n − k): an orthonormal basis of the complement, or ``None``."""
        if self.N is None:
            return None
        u = np.linalg.svd(self.N, full_matrices=True)[0]
        return u[:, self.N.shape[1]:]

    def dense_parts(self, x_flat=None):
        """``(A, B)`` as NumPy arrays at ``x_flat`` (default the problem's point)."""
        x_flat = self.x if x_flat is None else jnp.asarray(x_flat, self.x.dtype)
        A, B = _dense_parts(self.user_F, self.unravel_x(x_flat), self.unravel_theta(self.theta))
        return np.asarray(A), np.asarray(B)

    def nullspace_fn(self) -> Optional[Callable]:
        """The basis as the core's ``nullspace(x, θ)`` (a pytree like ``x``, leading axis k)."""
        if self.N is None:
            return None
        modes = jax.vmap(self.unravel_x)(jnp.asarray(self.N.T))
        return lambda x, theta: modes


def _require_finite(name: str, flat) -> None:
    if not np.all(np.isfinite(np.asarray(flat))):
        raise errors.NonFiniteError(
            f"{name} contains NaN or inf. Pass finite values: a solver that diverged, or an "
            "optimality condition evaluated outside its domain, has no Jacobian to bound."
        )


def _floating(tree):
    """``tree`` with integer leaves as float64 (they are differentiated)."""
    def leaf(value):
        return value if jnp.issubdtype(jnp.result_type(value), jnp.inexact) else jnp.asarray(value, jnp.float64)

    return jax.tree_util.tree_map(leaf, tree)


class _ByIdentity:
    """A hashable stand-in for an unhashable callable (``jax.jit`` static arguments)."""

    def __init__(self, fun):
        self.fun = fun

    def __call__(self, *args):
        return self.fun(*args)


def _hashable(fun):
    try:
        hash(fun)
        return fun
    except TypeError:
        return _ByIdentity(fun)


def _problem(F, x, theta, nullspace, *, x_name="x") -> _Problem:
    """Flatten ``F``, ``x``, ``θ``; refuse non-finite values and a mis-shaped ``F``."""
    x, theta, F = _floating(x), _floating(theta), _hashable(F)
    x_flat, unravel_x = ravel_pytree(x)
    theta_flat, unravel_theta = ravel_pytree(theta)
    _require_finite(x_name, x_flat)
    _require_finite("theta", theta_flat)

    def F_flat(xf, tf):
        return ravel_pytree(F(unravel_x(xf), unravel_theta(tf)))[0]

    residual = _flat_residual(F, unravel_x(x_flat), unravel_theta(theta_flat))
    if residual.shape != x_flat.shape:
        raise errors.OptimalityStructureError(
            f"F(x, θ) must return a pytree shaped like x ({x_flat.size} numbers); got "
            f"{residual.size}. For a minimization, F is the gradient jax.grad(f), not f."
        )
    _require_finite(f"F({x_name}, theta)", residual)
    N = _null_basis(nullspace, x, theta, x_flat.size)
    return _Problem(F_flat, F, x_flat, theta_flat, unravel_x, unravel_theta, N, np.asarray(residual))


@functools.partial(jax.jit, static_argnums=0)
def _flat_residual(F, x, theta):
    """``ravel(F(x, θ))``, compiled once per ``F`` and shapes (op-by-op evaluation of a
    user's ``F`` would compile each of its primitives instead)."""
    return ravel_pytree(F(x, theta))[0]


def _null_basis(nullspace, x, theta, n) -> Optional[np.ndarray]:
    """Orthonormal ``(n, k)`` columns spanning ``nullspace`` (a callable ``(x, θ)`` or a basis)."""
    if nullspace is None:
        return None
    basis = nullspace(x, theta) if callable(nullspace) else nullspace
    leaves = jax.tree_util.tree_leaves(basis)
    same_tree = jax.tree_util.tree_structure(basis) == jax.tree_util.tree_structure(x)
    if not (same_tree and leaves and all(np.ndim(l) >= 1 for l in leaves)):
        raise errors.NullSpaceError(
            "nullspace must be a basis (or nullspace(x, θ) returning one) shaped like x with a "
            f"leading axis of k modes; got {jax.tree_util.tree_structure(basis)} for x of "
            f"structure {jax.tree_util.tree_structure(x)}."
        )
    k = np.shape(leaves[0])[0]
    # mode i is the concatenation of each leaf's row i, raveled: ravel_pytree's order
    flat = np.concatenate([np.reshape(np.asarray(l, np.float64), (k, -1)) for l in leaves], axis=1)
    if flat.shape[1] != n:
        raise errors.NullSpaceError(
            f"nullspace modes must each be shaped like x ({n} numbers); got flattened shape "
            f"{flat.shape}. Stack k modes along a leading axis."
        )
    u, s, _ = np.linalg.svd(flat.T, full_matrices=False)
    keep = s > BASIS_RANK_RTOL * (s.max() if s.size else 0.0)
    if not keep.any():
        raise errors.NullSpaceError(
            "nullspace contains only zero vectors; give the zero modes of ∂₁F (e.g. rigid "
            "translations), or drop nullspace= if ∂₁F is non-singular."
        )
    return u[:, keep]


def _use_dense(dense, prob: _Problem) -> bool:
    if dense is None:
        return prob.n <= DENSE_MAX_DIM and prob.p <= DENSE_MAX_DIM
    return bool(dense)


# ------------------------------------------------------------------------ dense linear algebra
def _dense_A_B(F, x, theta):
    """``A = −∂₁F`` (n, n) and ``B = ∂₂F`` (n, p) of a flat ``F``, by forward mode (jittable)."""
    return -jax.jacfwd(F, 0)(x, theta), jax.jacfwd(F, 1)(x, theta)


@functools.partial(jax.jit, static_argnums=0)
def _dense_parts(F, x, theta):
    """:func:`_dense_A_B` of the user's ``F`` at pytrees ``x``, ``θ``: compiled once per
    ``F`` and shapes (JAX's own cache), however many calls and displacements use it."""
    x_flat, unravel_x = ravel_pytree(x)
    theta_flat, unravel_theta = ravel_pytree(theta)
    return _dense_A_B(lambda a, b: ravel_pytree(F(unravel_x(a), unravel_theta(b)))[0], x_flat, theta_flat)


def _dense_jacobian(A, B, Q, xp=jnp):
    """``(A⁺B, s)``: the minimum-norm Jacobian and the singular values of ``A`` on the
    complement ``Q`` (descending; all of ``A``'s when ``Q`` is ``None``). ``xp``: ``jnp``
    (jittable, in scans) or ``np`` (on the host: no compilation)."""
    AQ = A if Q is None else A @ Q
    U, s, Vt = xp.linalg.svd(AQ, full_matrices=False)
    s_safe = xp.where(s > 0, s, 1.0)
    J = Vt.T @ ((U.T @ B) / s_safe[:, None])
    return (J if Q is None else Q @ J), s


def _check_singular(alpha: float, scale: float, prob: _Problem, where: str) -> None:
    if not alpha > SINGULAR_RTOL * scale:
        modes = "beyond the declared null space" if prob.N is not None else "and no null space was declared"
        raise errors.SingularJacobianError(
            f"A = −∂₁F is singular at {where} {modes}: its smallest singular value α = {alpha:.3e} "
            f"is at most {SINGULAR_RTOL:g} × ‖A‖ = {scale:.3e}. Neither the implicit Jacobian nor "
            "Theorem 1's bound (∝ 1/α) exists. Declare the zero modes with nullspace=... "
            "(translations, rotations, gauge freedoms), regularize the problem (e.g. a ridge "
            "term), or check that the point is a non-degenerate solution."
        )


def _check_nullspace(prob: _Problem, A_times, scale: float) -> None:
    """Refuse a declared mode that ``A`` does not annihilate (it would change the answer)."""
    if prob.N is None:
        return
    leak = float(np.linalg.norm(A_times(prob.N), 2)) / (scale if scale > 0 else 1.0)
    if not leak <= NULLSPACE_TOL:
        raise errors.NullSpaceError(
            f"the declared null space is not a null space of ∂₁F: ‖A N‖ / ‖A‖ = {leak:.3e} "
            f"(tolerance {NULLSPACE_TOL:g}). Declare only exact zero modes."
        )


# ------------------------------------------------------------------------ implicit Jacobian
@dataclasses.dataclass(frozen=True)
class JacobianOperator:
    """The implicit Jacobian ``J = A⁺ B`` at a point, applied without forming it.

    Each product is one linear solve of the core (:func:`mdsens.root_jvp` /
    :func:`mdsens.root_vjp`), with the root check off: the point may be approximate.

    * ``J.jvp(t)``: ``J t`` for a θ-shaped pytree ``t`` (a pytree shaped like ``x``);
    * ``J.vjp(u)``: ``uᵀ J`` for an x-shaped pytree ``u`` (a pytree shaped like ``θ``);
    * ``J @ v`` / ``u @ J`` on flat arrays (``(p,)`` or ``(p, m)``; ``(n,)`` or ``(m, n)``),
      in ``ravel_pytree`` order, exactly like the dense ``(n, p)`` matrix;
    * ``J.todense()``: the ``(n, p)`` matrix (``p`` solves).
    """

    F: Callable
    x: Any
    theta: Any
    nullspace: Optional[Callable]
    solve: Optional[Callable]
    symmetric: bool
    shape: tuple

    # NumPy arrays defer ``u @ J`` to ``J.__rmatmul__`` instead of treating J as a scalar.
    __array_ufunc__ = None

    @functools.cached_property
    def _unravel(self):
        return ravel_pytree(self.x)[1], ravel_pytree(self.theta)[1]

    @functools.cached_property
    def _forward(self):
        """Jitted flat ``t ↦ J t`` (compiled once: an eager solve costs about a second of
        tracing per call)."""
        unravel_x, unravel_theta = self._unravel

        def column(t):
            out = root_jvp(self.F, self.x, (self.theta,), (unravel_theta(t),), solve=self.solve,
                           nullspace=self.nullspace, symmetric=self.symmetric, root_tol=None)
            return ravel_pytree(out)[0]

        return jax.jit(column)

    @functools.cached_property
    def _reverse(self):
        """Jitted flat ``u ↦ uᵀ J``."""
        unravel_x, unravel_theta = self._unravel

        def row(u):
            out = root_vjp(self.F, self.x, (self.theta,), unravel_x(u), solve=self.solve,
                           nullspace=self.nullspace, symmetric=self.symmetric, root_tol=None)[0]
            return ravel_pytree(out)[0]

        return jax.jit(row)

    def jvp(self, theta_tangent):
        """``J t`` (shaped like ``x``) for a tangent ``t`` shaped like ``θ``."""
        return self._unravel[0](self._forward(jnp.asarray(ravel_pytree(theta_tangent)[0], jnp.float64)))

    def vjp(self, x_cotangent):
        """``uᵀ J`` (shaped like ``θ``) for a cotangent ``u`` shaped like ``x``."""
        return self._unravel[1](self._reverse(jnp.asarray(ravel_pytree(x_cotangent)[0], jnp.float64)))

    def __matmul__(self, v):
        # One compiled solve reused per column (a vmapped solve would compile again).
        v = np.asarray(v, np.float64)
        if v.ndim == 1:
            return np.asarray(self._forward(jnp.asarray(v)))
        return np.stack([np.asarray(self._forward(jnp.asarray(c))) for c in v.T], axis=1)

    def __rmatmul__(self, u):
        u = np.asarray(u, np.float64)
        if u.ndim == 1:
            return np.asarray(self._reverse(jnp.asarray(u)))
        return np.stack([np.asarray(self._reverse(jnp.asarray(r))) for r in u])

    def todense(self) -> np.ndarray:
        """The ``(n, p)`` matrix, one forward solve per column."""
        return self @ np.eye(self.shape[1])


def implicit_jacobian(F: Callable, x_hat, theta, *, nullspace=None, dense: Optional[bool] = None,
                      solve: Optional[Callable] = None, symmetric: bool = False):
    """``J(x̂, θ) = A(x̂)⁺ B(x̂)`` with ``A = −∂₁F``, ``B = ∂₂F``: the implicit Jacobian at ``x̂``.

    Args:
      F: the optimality condition ``F(x, θ)``, a pytree shaped like ``x``.
      x_hat: the (approximate) solution, a pytree.
      theta: the parameters, a pytree.
      nullspace: zero modes of ``∂₁F``: a basis shaped like ``x`` with a leading axis of
        ``k`` modes, or ``nullspace(x, θ)`` returning one. The result is then the
        minimum-norm Jacobian (columns orthogonal to the modes).
      dense: ``True``: build ``A`` and ``B`` with ``jax.jacfwd`` and use an SVD on the
        complement of the null space (O(n³)); ``False``: matrix-free; ``None``: dense when
        ``n`` and ``p`` are at most :data:`DENSE_MAX_DIM`.
      solve, symmetric: the core's linear solver and symmetry flag (matrix-free only; see
        :func:`mdsens.custom_root`). Default GMRES.

    Returns:
      dense: the ``(n, p)`` NumPy array (rows ``ravel_pytree(x)``, columns
      ``ravel_pytree(θ)``); matrix-free: a :class:`JacobianOperator`, which supports the same
      ``J @ v``, ``u @ J`` and ``shape``.

    Raises:
      NonFiniteError: ``x_hat``, ``theta`` or ``F(x_hat, theta)`` has NaN or inf.
      SingularJacobianError: (dense) ``A`` is singular beyond the declared null space.
      NullSpaceError: a declared mode is not a zero mode of ``∂₁F``.
      LinearSolveError: (matrix-free, on use) a solve missed its tolerance; the products
        are compiled, so JAX re-raises it as ``JaxRuntimeError`` carrying the class name and
        the core's advice.
    """
    prob = _problem(F, x_hat, theta, nullspace, x_name="x_hat")
    if not _use_dense(dense, prob):
        return JacobianOperator(F, prob.unravel_x(prob.x), prob.unravel_theta(prob.theta), prob.nullspace_fn(),
                                solve, symmetric, (prob.n, prob.p))
    A, B = prob.dense_parts()
    J, s = _dense_jacobian(A, B, prob.complement(), np)
    s = np.asarray(s)
    _check_singular(float(s[-1]), float(s[0]), prob, "x_hat")
    _check_nullspace(prob, lambda N: A @ N, float(s[0]))
    return np.asarray(J)


# ------------------------------------------------------------------------ constants
@dataclasses.dataclass(frozen=True)
class BoundConstants:
    """The constants of Theorem 1 near ``x*`` (spectral norms), and how they were found.

    Attributes:
      alpha: smallest singular value of ``A = −∂₁F`` at ``x*`` on the complement of the null
        space (units of ``F`` per unit of ``x``).
      beta: sampled Lipschitz constant of ``B = ∂₂F`` in ``x`` (``F`` per ``x`` per ``θ``).
      gamma: sampled Lipschitz constant of ``A`` in ``x`` (``F`` per ``x``²).
      R: ``‖B(x*)‖`` (``F`` per ``θ``).
      C: ``β/α + γR/α²``, so that ``‖J(x̂) − J(x*)‖ ≤ C ‖x̂ − x*‖`` (``x`` per ``θ`` per ``x``).
      radius: the radius of the sampled ball around ``x*`` (units of ``x``).
      displacements: ``(S, n)`` the sampled displacements ``d_i`` (flat, ``ravel_pytree``
        order); the constants are reproducible from them.
      beta_samples, gamma_samples: ``(S,)`` ratios ``‖P ΔB‖/‖d_i‖`` and ``‖ΔA‖/‖d_i‖``.
      sampling: a sentence saying how each constant was obtained.
    """

    alpha: float
    beta: float
    gamma: float
    R: float
    C: float
    radius: float
    displacements: np.ndarray
    beta_samples: np.ndarray
    gamma_samples: np.ndarray
    sampling: str


def _check_options(radius, n_samples) -> None:
    real = isinstance(radius, numbers.Real) or (np.ndim(radius) == 0 and hasattr(radius, "dtype")
                                                and np.issubdtype(np.asarray(radius).dtype, np.floating))
    if not (real and not isinstance(radius, bool) and np.isfinite(float(radius)) and float(radius) > 0):
        raise errors.OptionError(f"radius must be a positive number (a distance in x's units); got {radius!r}.")
    if not (isinstance(n_samples, (int, np.integer)) and not isinstance(n_samples, bool) and n_samples >= 1):
        raise errors.OptionError(f"n_samples must be a positive integer; got {n_samples!r}.")


def _displacements(prob: _Problem, radius: float, n_samples: int, seed: int, extra_directions=()):
    """``(S, n)`` displacements: random unit directions of the complement at lengths
    ``radius · 2^-(i mod 4)``, then ``± each extra direction`` at length ``radius``."""
    rng = np.random.default_rng(seed)
    u = prob.project(rng.standard_normal((prob.n, n_samples)))
    u /= np.maximum(np.linalg.norm(u, axis=0), np.finfo(float).tiny)
    lengths = radius * 2.0 ** -(np.arange(n_samples) % 4)
    rows = list((u * lengths).T)
    for v in extra_directions:
        v = np.asarray(v, float) / np.linalg.norm(v)
        rows += [radius * v, -radius * v]
    return np.stack(rows)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _flat_product(F, which, x_tree, theta_tree, x, w):
    """One product of the user's ``F`` at flat ``x`` (θ fixed at ``theta_tree``):
    ``∂₁F w``, ``∂₁Fᵀ w``, ``∂₂F w`` or ``∂₂Fᵀ w``. Compiled once per ``F``, product and shapes."""
    _, unravel_x = ravel_pytree(x_tree)
    theta, unravel_theta = ravel_pytree(theta_tree)

    def F_flat(a, b):
        return ravel_pytree(F(unravel_x(a), unravel_theta(b)))[0]

    if which == "jvp_x":
        return jax.jvp(lambda y: F_flat(y, theta), (x,), (w,))[1]
    if which == "vjp_x":
        return jax.vjp(lambda y: F_flat(y, theta), x)[1](w)[0]
    if which == "jvp_theta":
        return jax.jvp(lambda s: F_flat(x, s), (theta,), (w,))[1]
    return jax.vjp(lambda s: F_flat(x, s), theta)[1](w)[0]


def _products(prob: _Problem):
    """``∂₁F v``, ``∂₁Fᵀ u``, ``∂₂F t``, ``∂₂Fᵀ u`` as functions ``(x_flat, w) -> flat``."""
    trees = (prob.unravel_x(prob.x), prob.unravel_theta(prob.theta))

    def product(which):
        return lambda x, w: _flat_product(prob.user_F, which, *trees, jnp.asarray(x), jnp.asarray(w))

    return tuple(product(which) for which in ("jvp_x", "vjp_x", "jvp_theta", "vjp_theta"))


def _spectral_norm(matvec, rmatvec, dim: int, seed: int) -> float:
    """``‖M‖₂`` by power iteration on ``MᵀM`` (a lower estimate; exact for rank one)."""
    v = np.random.default_rng(seed).standard_normal(dim)
    v /= np.linalg.norm(v)
    sigma = 0.0
    for _ in range(POWER_ITERATIONS):
        w = np.asarray(matvec(v))
        sigma = float(np.linalg.norm(w))
        if sigma == 0.0:
            return 0.0
        v = np.array(rmatvec(w / sigma), dtype=float)
        norm = np.linalg.norm(v)
        if norm == 0.0:
            return sigma
        v /= norm
    return max(sigma, float(np.linalg.norm(np.asarray(matvec(v)))))


def _lanczos(matvec, v0, steps: int, project):
    """Ritz values, residuals and vectors of a symmetric operator after ``≤ steps`` Lanczos
    steps with full reorthogonalization, stopping when the smallest-magnitude Ritz pair
    has a residual below ``LANCZOS_RTOL ·`` the largest Ritz value, or the Krylov space
    is invariant."""
    V = [v0 / np.linalg.norm(v0)]
    diag, off = [], []
    while True:
        w = project(np.asarray(matvec(V[-1]), float))
        diag.append(float(V[-1] @ w))
        basis = np.stack(V)
        for _ in range(2):  # twice is enough (Kahan): orthogonal to working precision
            w = w - basis.T @ (basis @ w)
        b = float(np.linalg.norm(w))
        T = np.diag(diag) + np.diag(off, 1) + np.diag(off, -1)
        ritz, vecs = np.linalg.eigh(T)
        residuals = b * np.abs(vecs[-1])
        i = int(np.argmin(np.abs(ritz)))
        scale = float(np.max(np.abs(ritz)))
        invariant = b <= np.finfo(float).eps * max(scale, np.finfo(float).tiny) * 10
        if invariant or residuals[i] <= LANCZOS_RTOL * scale or len(V) >= steps:
            return ritz, residuals, basis.T @ vecs
        off.append(b)
        V.append(w / b)


def _alpha_matrix_free(prob: _Problem, products, symmetric: bool, seed: int):
    """``(α, (slowest, stiffest) Ritz vectors, description)`` by Lanczos on ``A`` restricted
    to the complement (``symmetric``, definite) or on ``AᵀA`` (general, or ``A`` indefinite)."""
    jvp_x, vjp_x, _, _ = products
    x = prob.x
    dim = prob.n - (0 if prob.N is None else prob.N.shape[1])
    steps = min(dim, LANCZOS_MAX_STEPS)
    v0 = prob.project(np.random.default_rng(seed).standard_normal(prob.n))
    if symmetric:
        ritz, res, vecs = _lanczos(lambda v: -jvp_x(x, prob.project(v)), v0, steps, prob.project)
        if np.all(ritz > 0) or np.all(ritz < 0):
            i, j = int(np.argmin(np.abs(ritz))), int(np.argmax(np.abs(ritz)))
            return float(abs(ritz[i])), (vecs[:, i], vecs[:, j]), (
                f"α: Lanczos on A restricted to the complement ({len(ritz)} steps, Ritz residual "
                f"{res[i]:.1e})")
    normal = lambda v: vjp_x(x, jvp_x(x, prob.project(v)))  # noqa: E731  AᵀA = ∂₁Fᵀ∂₁F
    ritz, res, vecs = _lanczos(normal, v0, steps, prob.project)
    i, j = int(np.argmin(ritz)), int(np.argmax(ritz))
    return float(np.sqrt(max(ritz[i], 0.0))), (vecs[:, i], vecs[:, j]), (
        f"α: Lanczos on AᵀA restricted to the complement ({len(ritz)} steps, Ritz residual {res[i]:.1e})")


def _dense_constants(prob: _Problem, radius, n_samples, seed):
    A0, B0 = prob.dense_parts()
    Q = prob.complement()
    AQ = A0 if Q is None else A0 @ Q
    _, s, Vt = np.linalg.svd(AQ, full_matrices=False)
    _check_singular(float(s[-1]), float(s[0]), prob, "x_star")
    _check_nullspace(prob, lambda N: A0 @ N, float(s[0]))
    lift = (lambda v: v) if Q is None else (lambda v: Q @ v)
    extremes = (lift(Vt[-1]), lift(Vt[0]))  # where iterative solvers' errors linger, and the stiffest
    D = _displacements(prob, radius, n_samples, seed, extremes)
    betas, gammas = [], []
    for d in D:
        A1, B1 = prob.dense_parts(prob.x + d)
        length = np.linalg.norm(d)
        betas.append(np.linalg.norm(prob.project(B1 - B0), 2) / length)
        gammas.append(np.linalg.norm(A1 - A0, 2) / length)
    R = float(np.linalg.norm(prob.project(B0), 2))
    how = "α: dense SVD of A on the complement; R, ‖ΔA‖, ‖ΔB‖: dense spectral norms"
    return float(s[-1]), R, D, np.array(betas), np.array(gammas), how


def _matrix_free_constants(prob: _Problem, radius, n_samples, seed, symmetric):
    products = _products(prob)
    jvp_x, vjp_x, jvp_th, vjp_th = products
    alpha, extremes, how_alpha = _alpha_matrix_free(prob, products, symmetric, seed)
    x0, P = prob.x, prob.project
    _check_singular(alpha, _spectral_norm(lambda v: jvp_x(x0, v), lambda u: vjp_x(x0, u), prob.n, seed),
                    prob, "x_star")
    D = _displacements(prob, radius, n_samples, seed, extremes)
    R = _spectral_norm(lambda t: P(np.asarray(jvp_th(x0, t))), lambda u: vjp_th(x0, P(u)), prob.p, seed)
    betas, gammas = [], []
    for i, d in enumerate(D):
        x1 = x0 + d
        length = np.linalg.norm(d)
        dB = _spectral_norm(lambda t: P(np.asarray(jvp_th(x1, t) - jvp_th(x0, t))),
                            lambda u: vjp_th(x1, P(u)) - vjp_th(x0, P(u)), prob.p, seed + i)
        dA = _spectral_norm(lambda v: jvp_x(x1, v) - jvp_x(x0, v),
                            lambda u: vjp_x(x1, u) - vjp_x(x0, u), prob.n, seed + i)
        betas.append(dB / length)
        gammas.append(dA / length)
    how = f"{how_alpha}; R, ‖ΔA‖, ‖ΔB‖: {POWER_ITERATIONS} power iterations (lower estimates)"
    return alpha, R, D, np.array(betas), np.array(gammas), how


def bound_constants(F: Callable, x_star, theta, radius: float, *, nullspace=None, n_samples: int = 16,
                    seed: int = 0, dense: Optional[bool] = None, symmetric: bool = False) -> BoundConstants:
    """Estimate Theorem 1's ``α, β, γ, R`` and ``C = β/α + γR/α²`` near ``x*``.

    * ``α``: smallest singular value of ``A = −∂₁F(x*)`` on the complement of the null space:
      a dense SVD, or matrix-free Lanczos (full reorthogonalization) on ``A`` itself when
      ``symmetric`` and ``A`` is definite, else on ``AᵀA``.
    * ``R = ‖P B(x*)‖`` (``P`` projects off the null space, ``= I`` without one).
    * ``β = max_i ‖P (B(x*+d_i) − B(x*))‖ / ‖d_i‖`` and
      ``γ = max_i ‖A(x*+d_i) − A(x*)‖ / ‖d_i‖``, spectral norms. Theorem 1 only needs
      them for pairs ``(x̂, x*)``, so the displacements ``d_i`` all start at ``x*``:
      ``n_samples`` uniformly random unit directions of the complement at lengths
      ``radius, radius/2, radius/4, radius/8`` (cycling), plus ``±radius`` times the
      singular vectors of ``A`` for its smallest and largest singular values (dense; the
      extreme Lanczos vectors matrix-free): the slowest direction is where an iterative
      solver's error lingers. A sampled maximum is a lower estimate of the supremum: for
      smooth ``F`` and a small ball it is close; raise ``n_samples`` for more confidence.

    ``α`` is taken at ``x*``; the theorem's ``α`` bounds ``A(x̂)``, which differs by at most
    ``γ ‖x̂ − x*‖`` (negligible when ``γ · radius ≪ α``).

    Args:
      F: the optimality condition ``F(x, θ)``.
      x_star: the solution (or the best available approximation), a pytree.
      theta: the parameters, a pytree.
      radius: radius of the ball around ``x*`` where the bound is to hold (units of
        ``x``), e.g. the largest ``‖x̂ − x*‖`` of interest.
      nullspace: zero modes of ``∂₁F`` that do not depend on ``x`` (see
        :func:`implicit_jacobian`).
      n_samples: random directions sampled.
      seed: NumPy seed of the directions (and of the Lanczos and power-iteration starts).
      dense: as in :func:`implicit_jacobian`.
      symmetric: ``∂₁F`` is symmetric (``F`` a gradient): lets matrix-free Lanczos work on
        ``A`` instead of ``AᵀA`` (better conditioned).

    Returns:
      :class:`BoundConstants`.

    Raises:
      OptionError: ``radius`` not positive, ``n_samples`` not a positive integer.
      NonFiniteError, SingularJacobianError, NullSpaceError: as :func:`implicit_jacobian`.
    """
    _check_options(radius, n_samples)
    prob = _problem(F, x_star, theta, nullspace, x_name="x_star")
    radius = float(radius)
    if _use_dense(dense, prob):
        alpha, R, D, betas, gammas, how = _dense_constants(prob, radius, n_samples, seed)
    else:
        alpha, R, D, betas, gammas, how = _matrix_free_constants(prob, radius, n_samples, seed, symmetric)
    beta, gamma = float(np.max(betas)), float(np.max(gammas))
    C = float(theorem1_constant(alpha, beta, gamma, R))
    sampling = (
        f"{how}; β, γ: maxima over {len(D)} displacements from x* ({n_samples} random directions "
        f"of the complement at lengths radius·2^-(i mod 4), radius = {radius:g}, seed {seed}, "
        f"plus ±radius along the 2 extreme singular directions of A)"
    )
    return BoundConstants(alpha, beta, gamma, R, C, float(radius), np.asarray(D), betas, gammas, sampling)


# ------------------------------------------------------------------------ a-posteriori estimate
class ErrorEstimate(NamedTuple):
    """An a-posteriori Jacobian-error estimate at ``x̂`` (no ``x*`` needed).

    Attributes:
      estimate: the estimated ``‖J(x̂) − J(x*)‖`` (x per θ; spectral norm).
      distance: the estimated ``‖x̂ − x*‖`` (units of x): ``‖P F(x̂)‖ / α`` for
        ``"theorem1"``, the Newton step's length ``‖δ‖`` for ``"first_order"``.
      residual_norm: ``‖P F(x̂)‖`` (units of F).
      alpha: the ``α`` used.
      C: ``estimate / distance``.
      constants: the :class:`BoundConstants` that ``β, γ, R`` come from (``None`` for a
        first-order estimate that did not need them).
      method: ``"theorem1"`` or ``"first_order"``.
      linearity: ``‖P F(x̂ − δ)‖ / ‖P F(x̂)‖`` after the Newton step (first order only).
    """

    estimate: float
    distance: float
    residual_norm: float
    alpha: float
    C: float
    constants: Optional[BoundConstants]
    method: str = "theorem1"
    linearity: float = float("nan")


def error_estimate(F: Callable, x_hat, theta, *, alpha: Optional[float] = None,
                   constants: Optional[BoundConstants] = None, nullspace=None, n_samples: int = 16,
                   seed: int = 0, dense: Optional[bool] = None, symmetric: bool = False,
                   method: str = "theorem1") -> ErrorEstimate:
    """A-posteriori estimate of ``‖J(x̂) − J(x*)‖`` from ``F`` at ``x̂`` alone (no ``x*``).

    ``method="theorem1"``: ``distance = ‖P F(x̂)‖ / α`` (:func:`distance_from_residual`)
    and ``estimate = C · distance`` (Theorem 1). Assumptions, which make it an upper
    bound: ``A`` symmetric definite with ``|λ| ≥ α`` between ``x̂`` and ``x*`` (a strict
    minimum nearby; otherwise the distance holds to first order), and ``β, γ, R`` valid
    on the ball of radius ``distance`` around ``x̂``, which contains ``x*``. It can
    overestimate by orders of magnitude (``‖F‖/α`` and the Lipschitz constants are worst
    cases).

    ``method="first_order"``: the error itself to first order in ``δ = x̂ − x*``, with
    ``δ`` the Newton step (:func:`newton_step`) and each column's error from
    :func:`first_order_error`; ``estimate = FIRST_ORDER_SAFETY · ‖E‖``
    (:func:`first_order_estimate`), ``E`` the ``(n, p)`` matrix of column errors. Within
    a factor of a few of the truth and above it while the Newton model holds
    (``linearity`` ≤ :data:`LINEARITY_MAX`); beyond, the Theorem-1 estimate is returned
    (its constants are sampled over the ball, not taken at ``x̂``). One solve per
    parameter plus one: for moderate ``p``.

    Args:
      F, x_hat, theta, nullspace, dense, symmetric: as :func:`implicit_jacobian`.
      alpha: ``α`` if known (e.g. ``λ_min`` of a Hessian from a stability analysis);
        default ``constants.alpha``, else estimated at ``x̂``.
      constants: :class:`BoundConstants` to take ``β, γ, R`` from (e.g. from
        :func:`bound_constants` at a converged reference); default: estimated at ``x̂``
        with ``radius = distance`` (``n_samples``, ``seed``).

    Returns:
      :class:`ErrorEstimate`.

    Raises:
      NonFiniteError, SingularJacobianError, NullSpaceError: as :func:`implicit_jacobian`.
      OptionError: ``alpha`` given but not a positive number, or an unknown ``method``.
    """
    if method not in ("theorem1", "first_order"):
        raise errors.OptionError(f"method must be 'theorem1' or 'first_order'; got {method!r}.")
    prob = _problem(F, x_hat, theta, nullspace, x_name="x_hat")
    residual = float(np.linalg.norm(prob.project(prob.residual)))
    if alpha is not None and not (np.isfinite(alpha) and alpha > 0):
        raise errors.OptionError(
            f"alpha must be a positive number (smallest singular value of −∂₁F); got {alpha!r}.")
    if alpha is None:
        alpha = constants.alpha if constants is not None else _alpha_at(prob, dense, symmetric, seed)
    distance = float(distance_from_residual(residual, alpha))
    if method == "first_order":
        first, newton, linearity = _first_order(prob, symmetric)
        if linearity <= LINEARITY_MAX or residual == 0:
            return ErrorEstimate(first, newton, residual, float(alpha), first / newton if newton > 0 else 0.0,
                                 constants, method, linearity)
    if constants is None:
        # The ball of radius `distance` around x̂ contains x*: estimate the constants there.
        radius = distance if distance > 0 else float(np.sqrt(np.finfo(float).eps) * (1 + np.linalg.norm(prob.x)))
        constants = bound_constants(F, x_hat, theta, radius, nullspace=nullspace, n_samples=n_samples, seed=seed,
                                    dense=dense, symmetric=symmetric)
    C = float(theorem1_constant(alpha, constants.beta, constants.gamma, constants.R))
    if method == "first_order":  # outside the Newton model's reach
        return ErrorEstimate(C * distance, distance, residual, float(alpha), C, constants, method, linearity)
    return ErrorEstimate(C * distance, distance, residual, float(alpha), C, constants)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _first_order_columns(F, x, theta, symmetric, null_modes):
    """``(E (p, n), δ, ‖P F(x − δ)‖)`` for :func:`_first_order`."""
    solve = functools.partial(linear_solve.cg if symmetric else linear_solve.gmres, tol=1e-10)
    nullspace = None if null_modes is None else (lambda x, th: null_modes)
    options = dict(solve=solve, nullspace=nullspace, symmetric=symmetric)
    project = (lambda v: v) if null_modes is None else (lambda v: v - null_modes.T @ (null_modes @ v))
    delta, _ = newton_step(F, x, theta, **options)

    def column(t):
        dx = root_jvp(F, x, (theta,), (t,), on_failure="ignore", root_tol=None, nullspace_tol=None, **options)
        return project(first_order_error(F, x, theta, delta, dx, t, **options)[0])

    E = jax.vmap(column)(jnp.eye(theta.size, dtype=theta.dtype))
    return E, delta, jnp.linalg.norm(project(F(x - delta, theta)))


def _first_order(prob: _Problem, symmetric: bool):
    """``(estimate, ‖δ‖, linearity)``: the first-order estimate of :func:`error_estimate`."""
    modes = None if prob.N is None else jnp.asarray(prob.N.T)
    E, delta, after = (np.asarray(v) for v in
                       _first_order_columns(prob.F, prob.x, prob.theta, bool(symmetric), modes))
    linearity = float(newton_linearity(float(np.linalg.norm(prob.project(prob.residual))), float(after)))
    estimate = float(first_order_estimate(np.linalg.norm(E.T, 2), linearity))
    return estimate, float(np.linalg.norm(prob.project(delta))), linearity


def _alpha_at(prob: _Problem, dense, symmetric, seed) -> float:
    if _use_dense(dense, prob):
        A = prob.dense_parts()[0]
        Q = prob.complement()
        s = np.linalg.svd(A if Q is None else A @ Q, compute_uv=False)
        _check_singular(float(s[-1]), float(s[0]), prob, "x_hat")
        return float(s[-1])
    alpha = _alpha_matrix_free(prob, _products(prob), symmetric, seed)[0]
    if not alpha > 0:
        _check_singular(alpha, 1.0, prob, "x_hat")
    return alpha


# ------------------------------------------------------------------------ first-order estimate
#: Length (units of x) of the one-sided difference along the Newton step that gives the
#: directional derivative of ``∂F·(ẋ, θ̇)``: second derivatives only (exact third
#: derivatives tripled the compile time of three-body potentials). Small, so that the
#: difference does not reach across a kink of ``∂F`` (a soft-sphere contact that is about
#: to open); its rounding error, ``eps·‖∂F·(ẋ, θ̇)‖/step``, stays ~1e-10 relative.
FIRST_ORDER_STEP = 1e-6
#: The first-order estimate is multiplied by this, so that the second-order remainder
#: and the loose solves cannot make it fall below the error it estimates.
FIRST_ORDER_SAFETY = 2.0
#: ``‖P F(x̂ − δ)‖ / ‖P F(x̂)‖`` above this: the Newton model of ``F`` is too poor at
#: ``x̂`` for a first-order estimate: ``x̂`` is outside the quadratic basin of ``x*``, or
#: ``∂F`` jumps between them (a contact that opens); near a smooth minimum it is
#: ``O(‖δ‖)``, ~1e-4 to 1e-2 in the tests.
LINEARITY_MAX = 0.1


#: ``‖P F(x̂ − δ)‖`` below this many rounding units ``eps · scale`` counts as zero in the
#: linearity test: an ``F`` evaluated at its rounding level cannot show the Newton model
#: failing (at fmax ~1e-14 the ratio is noise between 0.2 and 0.7).
ROUNDING_UNITS = 64.0


def newton_linearity(before, after, scale=0.0):
    """``linearity = ‖P F(x̂ − δ)‖ / ‖P F(x̂)‖`` (``after / before``) after the Newton step.

    ``O(‖δ‖)`` near a smooth root; 0 where ``before`` is 0 or ``after`` is at the rounding
    level ``ROUNDING_UNITS · eps · scale`` of ``F`` (``scale``: e.g. ``‖∂₁F‖ ‖x‖``; NaN
    counts as 0). Broadcasts; numpy on host values, ``jax.numpy`` under a trace.
    """
    xp = _xp(before, after, scale)
    scale = xp.nan_to_num(xp.asarray(scale, dtype=float), nan=0.0)
    noise = ROUNDING_UNITS * np.finfo(np.float64).eps * scale
    before = xp.asarray(before, dtype=float)
    return xp.where((after <= noise) | (before <= 0), 0.0, after / xp.where(before > 0, before, 1.0))


def linearized_solve(F: Callable, x, theta, rhs, **solve_options):
    """``((∂₁F)⁺ rhs, SolveInfo)`` at ``(x, θ)`` (jittable), through the core's forward
    solve: the tangent of ``F(x, θ) − s·rhs`` along ``s`` alone is ``−rhs``. ``θ`` is
    closed over, not an argument, so that no derivative of ``F`` in ``θ`` is traced.
    ``solve_options``: ``solve``, ``nullspace`` (a callable ``(x, θ)``), ``symmetric``
    and ``operator``, as :func:`newton_step`'s."""
    if solve_options.get("operator") is None:
        def augmented(x, s, r):
            return jax.tree_util.tree_map(lambda f, v: f - s * v, F(x, theta), r)
    else:
        # ∂₁F comes from the operator and the core differentiates in (s, r) only, so
        # F itself need not be traced (and compiled) once more
        def augmented(x, s, r):
            return jax.tree_util.tree_map(lambda v: -s * v, r)

    nullspace = solve_options.pop("nullspace", None)
    dtype = jax.tree_util.tree_leaves(x)[0].dtype
    return root_jvp(augmented, x, (jnp.zeros((), dtype), rhs),
                    (jnp.ones((), dtype), jax.tree_util.tree_map(jnp.zeros_like, rhs)),
                    nullspace=None if nullspace is None else (lambda x, *_: nullspace(x, theta)),
                    on_failure="ignore", root_tol=None, nullspace_tol=None, return_info=True, **solve_options)


def newton_step(F: Callable, x_hat, theta, *, solve: Callable, nullspace=None, symmetric: bool = False,
                operator: Optional[Callable] = None):
    """``δ = (∂₁F)⁺ F(x̂, θ)``: the displacement ``x̂ − x*`` to first order (one solve).

    Jittable. ``solve``, ``nullspace`` (a callable ``(x, θ)``), ``symmetric`` and
    ``operator`` are the core's (:func:`~mdsens.implicit.root_jvp`); ``F(x̂, θ)`` is
    projected off the null space as every right-hand side is.

    Returns:
      ``(δ, SolveInfo)``, ``δ`` shaped like ``x_hat`` (units of x).
    """
    return linearized_solve(F, x_hat, theta, F(x_hat, theta), solve=solve, nullspace=nullspace, symmetric=symmetric,
                      operator=operator)


def rhs_variation(F: Callable, x_hat, theta, delta, theta_tangent, *, step: float = FIRST_ORDER_STEP):
    """``(b, ∂ₓb[δ̂])``: the right-hand side ``b = ∂₂F(x̂, θ) θ̇`` of one implicit-Jacobian
    column and its derivative along ``δ̂ = δ/‖δ‖`` (a one-sided difference over ``step``).

    ``‖∂ₓb[δ̂]‖ ‖δ‖`` is how much of ``b`` an inexact root leaves undetermined (the first
    term of Theorem 1), the residual below which a solve for this column gains nothing
    (``atol`` of :func:`mdsens.linear_solve.cg`). Both are shaped like ``x_hat``; pass them
    to :func:`first_order_error` as ``rhs_terms`` so that it does not compute them again.
    Jittable.
    """
    unit, _ = _unit(delta)
    shifted = jax.tree_util.tree_map(lambda a, u: a + step * u, x_hat, unit)
    b0, b1 = _at_both(lambda x: jax.jvp(lambda th: F(x, th), (theta,), (theta_tangent,))[1], x_hat, shifted)
    return b0, jax.tree_util.tree_map(lambda p, q: (q - p) / step, b0, b1)


def _unit(delta):
    d_flat, unravel = ravel_pytree(delta)
    length = jnp.linalg.norm(d_flat)
    return unravel(d_flat / jnp.where(length > 0, length, 1.0)), length


def _at_both(f, x, shifted):
    """``f(x)``, ``f(shifted)``: one copy of ``f``'s program, vmapped over the two points.
    Each tangent in one argument only, so that no mixed term is traced."""
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), x, shifted)
    out = jax.vmap(f)(stacked)
    return tuple(jax.tree_util.tree_map(lambda v, i=i: v[i], out) for i in range(2))


def first_order_rhs(F: Callable, x_hat, theta, delta, x_tangent, theta_tangent, *,
                    operator: Optional[Callable] = None, step: float = FIRST_ORDER_STEP, rhs_terms=None):
    """The right-hand side whose solve is :func:`first_order_error`'s ``e``, without the solve.

    ``rhs = residual − ∂ₓ[∂F·(ẋ, θ̇)][δ]`` with ``residual = ∂F(x̂)·(ẋ, θ̇)``; the
    directional derivative is a one-sided difference over ``step`` along ``δ/‖δ‖``: one
    ``jax.jvp`` of ``F`` in ``(x, θ)`` at the shifted point, less the same at ``x̂``
    (``∂₂F θ̇`` from ``rhs_terms``, :func:`rhs_variation`'s output for this column, else
    computed; ``∂₁F ẋ`` from ``operator`` when given, the Hessian products of the solves).
    Batches of columns can then map this with ``jax.vmap`` and their solves one by one
    (:func:`mdsens.linear_solve.each_column`). Jittable.

    Returns:
      ``(rhs, residual, (β, γ_J))`` as :func:`first_order_error`'s.
    """
    unit, length = _unit(delta)
    shifted = jax.tree_util.tree_map(lambda a, u: a + step * u, x_hat, unit)
    if rhs_terms is None:
        rhs_terms = rhs_variation(F, x_hat, theta, delta, theta_tangent, step=step)
    b0, d_b = rhs_terms
    a0 = (jax.jvp(lambda y: F(y, theta), (x_hat,), (x_tangent,))[1] if operator is None
          else operator(x_tangent))
    both1 = jax.jvp(F, (shifted, theta), (x_tangent, theta_tangent))[1]  # ∂₁F ẋ + ∂₂F θ̇ there
    # ∂₂F θ̇ at the shifted point is b0 + step·∂ₓb[δ̂]: what is left is ∂₁F ẋ there
    d_a = jax.tree_util.tree_map(lambda c, b, db, a: (c - (b + step * db) - a) / step, both1, b0, d_b, a0)
    norm = lambda tree: jnp.linalg.norm(ravel_pytree(tree)[0])  # noqa: E731
    residual = jax.tree_util.tree_map(jnp.add, b0, a0)
    rhs = jax.tree_util.tree_map(lambda r, u, v: r - (u + v) * length, residual, d_b, d_a)
    return rhs, residual, (norm(d_b), norm(d_a))


def first_order_error(F: Callable, x_hat, theta, delta, x_tangent, theta_tangent, *, solve: Callable,
                      nullspace=None, symmetric: bool = False, operator: Optional[Callable] = None,
                      step: float = FIRST_ORDER_STEP, rhs_terms=None):
    """The error of one implicit-Jacobian column at ``x̂``, to first order in ``δ = x̂ − x*``.

    With ``ẋ = J(x̂) θ̇`` (``x_tangent``, a solution of ``∂F(x̂)·(ẋ, θ̇) = 0``),
    differentiating ``∂F(x)·(ẋ(x), θ̇) = 0`` along ``δ`` gives

        ``J(x̂) θ̇ − J(x*) θ̇ ≈ −(∂₁F)⁺ ∂ₓ[B θ̇ + A ẋ][δ]``,

    the derivative of ``J`` along ``δ``: Theorem 1's two terms, with the directional
    derivatives of ``A`` and ``B`` along the actual error in place of Lipschitz constants
    over a ball. They are one-sided differences over :data:`FIRST_ORDER_STEP` (``step``)
    along ``δ/‖δ‖`` (:func:`first_order_rhs`; pass ``rhs_terms``, :func:`rhs_variation`'s
    output for this column, when it is at hand). Jittable.

    Returns:
      ``(e, residual, (β, γ_J), SolveInfo)``: ``e`` shaped like ``x_hat`` (x per unit
      ``θ̇``), the error of ``x_tangent`` against ``J(x*) θ̇`` including its own
      inexactness: with ``residual = ∂F(x̂)·(ẋ, θ̇)`` (units of F), ``ẋ`` is off the exact
      ``J(x̂) θ̇`` by ``(∂₁F)⁺ residual``, so the one solve is of ``residual −
      ∂ₓ[∂F·(ẋ, θ̇)][δ]``; ``β = ‖∂ₓ[B θ̇][δ̂]‖`` and ``γ_J = ‖∂ₓ[A ẋ][δ̂]‖``, the
      theorem's constants along the unit direction ``δ̂`` (for
      :func:`theorem1_constant_local`).
    """
    rhs, residual, constants = first_order_rhs(F, x_hat, theta, delta, x_tangent, theta_tangent, operator=operator,
                                               step=step, rhs_terms=rhs_terms)
    e, info = linearized_solve(F, x_hat, theta, rhs, solve=solve, nullspace=nullspace, symmetric=symmetric,
                         operator=operator)
    return e, residual, constants, info


def adjoint(F: Callable, x_hat, theta, cotangent, *, solve: Callable, nullspace=None, symmetric: bool = False,
            operator: Optional[Callable] = None):
    """``w = (∂₁F)⁻ᵀ u`` at ``(x̂, θ)`` (``u = cotangent``, shaped like ``x``): the adjoint
    of a reverse-mode gradient, through the core's transposed solve (jittable).

    The gradient of ``O(x*(θ), θ)`` is then ``∂θO − (∂θF)ᵀ w`` (paper eq. 4). Options as
    :func:`newton_step`. Returns ``w`` shaped like ``x_hat``.
    """
    if operator is None:
        def augmented(x, r):
            return jax.tree_util.tree_map(jnp.subtract, F(x, theta), r)
    else:  # as in linearized_solve: ∂₁F from the operator, F never traced
        def augmented(x, r):
            return jax.tree_util.tree_map(jnp.negative, r)
    zero = jax.tree_util.tree_map(jnp.zeros_like, x_hat)
    (w,) = root_vjp(augmented, x_hat, (zero,), cotangent, solve=solve,
                    nullspace=None if nullspace is None else (lambda x, *_: nullspace(x, theta)),
                    symmetric=symmetric, on_failure="ignore", root_tol=None, nullspace_tol=None, operator=operator)
    return w


def first_order_gradient_error(F: Callable, O: Callable, x_hat, theta, delta, w, *, solve: Callable,
                               nullspace=None, symmetric: bool = False, operator: Optional[Callable] = None,
                               step: float = FIRST_ORDER_STEP):
    """The error of a reverse-mode gradient ``dO(x*(θ), θ)/dθ`` taken at ``x̂``, to first
    order in ``δ = x̂ − x*`` (the adjoint form of :func:`first_order_error`).

    With the adjoint ``w`` (:func:`adjoint` of ``∂ₓO``) and ``L(x, θ) = O(x, θ) −
    ⟨w, F(x, θ)⟩`` (``w`` held fixed), the gradient at ``x̂`` is ``∂θL`` and
    ``ρ = ∂ₓL(x̂)`` is the adjoint solve's residual. Moving to ``x*`` changes ``∂θL`` by
    ``−∂ₓ(∂θL)[δ]`` and the adjoint by ``(∂₁F)⁻ᵀ(ρ − ∂ₓ(∂ₓL)[δ])``, so

        ``∇(x̂) − ∇(x*) ≈ e = ∂ₓ(∂θL)[δ] + (∂θF)ᵀ (∂₁F)⁻ᵀ (ρ − ∂ₓ(∂ₓL)[δ])``.

    The directional derivatives are a one-sided difference of ``∇L`` over ``step`` along
    ``δ/‖δ‖``; the last term is one transposed solve. Jittable.

    Returns:
      ``e`` shaped like ``theta`` (units of O per unit θ); it includes the adjoint's own
      inexactness (the ``ρ`` term).
    """
    def gradients(x):
        return jax.grad(lambda y, th: O(y, th) - jnp.vdot(ravel_pytree(w)[0], ravel_pytree(F(y, th))[0]),
                        argnums=(0, 1))(x, theta)

    d_flat, unravel = ravel_pytree(delta)
    length = jnp.linalg.norm(d_flat)
    unit = unravel(d_flat / jnp.where(length > 0, length, 1.0))
    points = jax.tree_util.tree_map(lambda a, u: jnp.stack([a, a + step * u]), x_hat, unit)
    g_x, g_theta = jax.vmap(gradients)(points)
    pick = lambda tree, i: jax.tree_util.tree_map(lambda v: v[i], tree)  # noqa: E731
    rho = pick(g_x, 0)
    p = jax.tree_util.tree_map(lambda v: (v[1] - v[0]) * (length / step), g_theta)
    q = jax.tree_util.tree_map(lambda v: (v[1] - v[0]) * (length / step), g_x)
    # root_vjp(c) = −(∂θF)ᵀ(∂₁F)⁻ᵀ c, so the last term is root_vjp(q − ρ)
    (z,) = root_vjp(F, x_hat, (theta,), jax.tree_util.tree_map(jnp.subtract, q, rho), solve=solve,
                    nullspace=nullspace, symmetric=symmetric, on_failure="ignore", root_tol=None,
                    nullspace_tol=None, operator=operator)
    return jax.tree_util.tree_map(jnp.add, p, z)


def first_order_estimate(error_norm, linearity):
    """``FIRST_ORDER_SAFETY · ‖e‖`` where the Newton model holds (``linearity`` ≤
    :data:`LINEARITY_MAX`), ``inf`` elsewhere: the reported error estimate.

    ``error_norm``: ``‖e‖`` from :func:`first_order_error` (or the gradient's from
    :func:`first_order_gradient_error`); ``linearity``: ``‖P F(x̂ − δ)‖ / ‖P F(x̂)‖``.
    Outside the Newton basin no local estimate is reliable (a kink of ``∂F`` between
    ``x̂`` and ``x*`` is invisible from ``x̂``), so none is given: relax tighter.
    Broadcasts; jittable.
    """
    xp = _xp(error_norm, linearity)
    return xp.where(xp.asarray(linearity) <= LINEARITY_MAX, FIRST_ORDER_SAFETY * xp.asarray(error_norm), np.inf)


# ------------------------------------------------------------------------ error curve
class ErrorCurve(NamedTuple):
    """Errors along a solver's iterates ``x_0 … x_K`` (arrays of length ``K + 1``).

    Attributes:
      step: ``k = 0 … K``.
      iterate_error: ``‖P (x_k − x*)‖`` (units of x).
      implicit_error: ``‖J(x_k) − J*‖`` with ``J(x_k) = A(x_k)⁺ B(x_k)`` (x per θ).
      unrolled_error: ``‖P ∂x_k/∂θ − J*‖``, ``∂x_k/∂θ`` by forward mode through the
        ``k`` solver steps (``x_0`` independent of θ).
      bound: ``C ‖x_k − x*‖``, Theorem 1's bound on ``implicit_error``.
      residual_norm: ``‖P F(x_k)‖`` (units of F).
      estimate: ``C ‖P F(x_k)‖ / α``, the a-posteriori estimate (:func:`error_estimate`
        with the reference constants).
      constants: the :class:`BoundConstants` used.
      x_star: the reference solution (flat, ``ravel_pytree`` order).
      jac_star: the reference Jacobian ``J*`` (n, p).
    """

    step: np.ndarray
    iterate_error: np.ndarray
    implicit_error: np.ndarray
    unrolled_error: np.ndarray
    bound: np.ndarray
    residual_norm: np.ndarray
    estimate: np.ndarray
    constants: BoundConstants
    x_star: np.ndarray
    jac_star: np.ndarray


def _flat_step(solver_step, prob: _Problem):
    def step(x, th):
        return ravel_pytree(solver_step(prob.unravel_x(x), prob.unravel_theta(th)))[0].astype(x.dtype)

    return step


def _scan_errors(F, step, theta, n_steps, x0, x_star, J_star, Q, N):
    """Per iterate: ``(‖P(x−x*)‖, ‖J(x)−J*‖, ‖P T−J*‖, ‖P F(x)‖)``, ``T = ∂x_k/∂θ`` pushed
    forward alongside ``x`` (memory independent of the number of steps). Jittable."""
    project = (lambda v: v) if N is None else (lambda v: v - N @ (N.T @ v))
    eye = jnp.eye(theta.size, dtype=x0.dtype)

    def record(x, T):
        A, B = _dense_A_B(F, x, theta)
        J = _dense_jacobian(A, B, Q)[0]
        return (jnp.linalg.norm(project(x - x_star)), jnp.linalg.norm(J - J_star, 2),
                jnp.linalg.norm(project(T) - J_star, 2), jnp.linalg.norm(project(F(x, theta))))

    def body(carry, _):
        x, T = carry
        out = record(x, T)
        x_next, push = jax.linearize(step, x, theta)
        T_next = jax.vmap(push, in_axes=(1, 1), out_axes=1)(T, eye)
        return (x_next, T_next), out

    T0 = jnp.zeros((x0.size, theta.size), x0.dtype)
    return jax.lax.scan(body, (x0, T0), None, length=n_steps + 1)[1]


def _iterate(step, x0, theta, n_steps):
    return jax.lax.fori_loop(0, n_steps, lambda _, x: step(x, theta), x0)


def error_curve(F: Callable, solver_step: Callable, x0, theta, n_steps: int, *, x_star=None, jac_star=None,
                constants: Optional[BoundConstants] = None, nullspace=None, reference_steps: Optional[int] = None,
                n_samples: int = 16, seed: int = 0) -> ErrorCurve:
    """Implicit vs unrolled Jacobian error along the iterates of a solver, with Theorem 1's bound.

    Runs ``x_{k+1} = solver_step(x_k, θ)`` from ``x_0`` for ``n_steps`` steps and records,
    at every iterate, the errors listed in :class:`ErrorCurve`. The unrolled Jacobian
    ``∂x_k/∂θ`` is pushed forward with the iterates (``jax.linearize`` of each step inside
    one ``lax.scan``), so memory does not grow with ``n_steps``. Dense: ``A`` and ``B`` are
    formed at every iterate, for problems up to a few thousand unknowns.

    Args:
      F: the optimality condition ``F(x, θ)`` whose root the solver approaches.
      solver_step: one step ``x ↦ x'`` of the solver, ``solver_step(x, θ)``; jittable.
      x0: the first iterate (treated as independent of θ).
      theta: the parameters.
      n_steps: steps ``K`` (the curve has ``K + 1`` points).
      x_star: the exact solution; default: the iterate after ``reference_steps`` more steps
        from ``x_K`` (default ``10 K``) — make sure the solver has converged by then.
      jac_star: the exact Jacobian ``(n, p)`` in ``ravel_pytree`` order; default the dense
        implicit Jacobian at ``x_star`` (exact there, by the implicit function theorem).
      constants: :class:`BoundConstants` for the bound; default :func:`bound_constants` at
        ``x_star`` with ``radius`` the largest iterate error (the ball holding every
        iterate), ``n_samples`` and ``seed``.
      nullspace: constant zero modes of ``∂₁F`` (see :func:`implicit_jacobian`): errors
        are measured off them.

    Returns:
      :class:`ErrorCurve` (NumPy arrays).

    Raises:
      OptionError: ``n_steps`` or ``reference_steps`` not a non-negative integer.
      NonFiniteError, SingularJacobianError, NullSpaceError: as :func:`implicit_jacobian`
        (checked at ``x0`` and ``x_star``).
    """
    for name, value in (("n_steps", n_steps), ("reference_steps", reference_steps)):
        if value is not None and not (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                                      and value >= 0):
            raise errors.OptionError(f"{name} must be a non-negative integer; got {value!r}.")
    start = _problem(F, x0, theta, nullspace, x_name="x0")
    step = _flat_step(solver_step, start)
    if x_star is None:
        more = 10 * n_steps if reference_steps is None else reference_steps
        x_star = start.unravel_x(jax.jit(_iterate, static_argnums=(0, 3))(step, start.x, start.theta, n_steps + more))
    ref = _problem(F, x_star, theta, nullspace, x_name="x_star")
    Q = ref.complement()
    if jac_star is None:
        A, B = ref.dense_parts()
        J_star, s = (np.asarray(m) for m in _dense_jacobian(A, B, Q, np))
        _check_singular(float(s[-1]), float(s[0]), ref, "x_star")
    else:
        J_star = np.asarray(jac_star, dtype=np.float64)
        if J_star.size != ref.n * ref.p:
            raise errors.OptionError(
                f"jac_star must be the ({ref.n}, {ref.p}) Jacobian in ravel_pytree order (as "
                f"implicit_jacobian returns it); got shape {J_star.shape}.")
        J_star = J_star.reshape(ref.n, ref.p)
        _require_finite("jac_star", J_star)
    scan = jax.jit(lambda *arrays: _scan_errors(ref.F, step, ref.theta, n_steps, *arrays))
    outputs = scan(start.x, ref.x, jnp.asarray(J_star), None if Q is None else jnp.asarray(Q),
                   None if ref.N is None else jnp.asarray(ref.N))
    iterate, implicit, unrolled, residual = (np.asarray(o) for o in outputs)
    if constants is None:
        radius = float(np.max(iterate))
        radius = radius if radius > 0 else float(np.sqrt(np.finfo(float).eps) * (1 + np.linalg.norm(ref.x)))
        constants = bound_constants(F, x_star, theta, radius, nullspace=nullspace, n_samples=n_samples, seed=seed,
                                    dense=True)
    estimate = constants.C * np.asarray(distance_from_residual(residual, constants.alpha))
    return ErrorCurve(np.arange(n_steps + 1), iterate, implicit, unrolled, constants.C * iterate, residual, estimate,
                      constants, np.asarray(ref.x), J_star)
