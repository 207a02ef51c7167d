"""Zero modes (gauge freedoms) and the stability of a relaxed structure.

The Hessian ``H = ∂²E/∂R²`` of a relaxed structure is singular along

* **rigid translations**: ``d`` modes, for periodic systems and free clusters alike;
* **rigid rotations** of a free cluster: 3 in 3D (2 for a linear molecule, whose
  rotation about its own axis moves nothing), 1 in 2D; a periodic cell breaks them;
* **soft modes found numerically**: rattlers of a jammed packing (particles with no
  contacts), or any other direction along which the energy is flat to round-off.

Implicit differentiation solves ``H dR = −b`` on the orthogonal complement of these
modes (the core's ``nullspace=``), which returns the minimum-norm (pseudo-inverse)
derivative. That fixes the **gauge**: the derivative mdsens reports has no net
translation (``Σ_i dR_i = 0``), and for clusters no net rotation about the centroid
(``Σ_i (R_i − R̄) × dR_i = 0``), and no component along a rattler's free motion.

**Thresholds.** With ``λ_max`` the largest Hessian eigenvalue (orthogonal to the rigid
modes) and ``λ_min`` the smallest:

* ``λ < −SADDLE_RTOL · λ_max`` → :class:`SaddlePointError` (the structure is not a
  minimum; its derivative would describe a saddle that a relaxation cannot reach);
* ``|λ| ≤ SOFT_MODE_RTOL · λ_max`` → the eigenvector is a soft mode, added to the null
  space (a rattler's eigenvalues are exactly zero up to round-off, ~1e-16 λ_max);
* ``λ_min ≤ NEAR_SINGULAR_RTOL · λ_max`` beyond the declared modes →
  :class:`NearSingularWarning` with the smallest eigenvalue (derivatives are then
  amplified by ``1/λ_min`` and sensitive to the relaxation's residual).

Eigenvalues come from a dense ``eigh`` of the projected Hessian up to
``DENSE_MAX_DOF`` degrees of freedom (built from ``n`` Hessian-vector products), and
above that from LOBPCG on Hessian-vector products of the shifted, projected operator
``P (σ I − H) P`` (whose largest eigenvalues are ``σ − λ_min``, ...), so the Hessian
is never stored.

Units: eigenvalues in energy/length² (eV/Å²); modes are dimensionless unit vectors.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SaddlePointError",
    "NearSingularWarning",
    "StabilityReport",
    "rigid_modes",
    "hessian_vector_product",
    "stability",
    "null_space",
    "SADDLE_RTOL",
    "SOFT_MODE_RTOL",
    "NEAR_SINGULAR_RTOL",
    "DENSE_MAX_DOF",
]

#: Relative negative curvature (``λ / λ_max``) below which a structure is a saddle.
SADDLE_RTOL = 1e-7
#: Relative eigenvalue (``|λ| / λ_max``) at or below which a mode counts as a zero mode.
SOFT_MODE_RTOL = 1e-10
#: Relative smallest eigenvalue below which a (non-zero) mode triggers a warning.
NEAR_SINGULAR_RTOL = 1e-7
#: Largest number of degrees of freedom ``N·d`` handled by a dense eigendecomposition.
DENSE_MAX_DOF = 2000
#: Number of lowest eigenpairs LOBPCG looks for above ``DENSE_MAX_DOF``.
LOBPCG_MODES = 8
#: LOBPCG iteration cap.
LOBPCG_MAXITER = 400


class SaddlePointError(RuntimeError):
    """The 'relaxed' structure has a direction of negative curvature: it is a saddle."""


class NearSingularWarning(RuntimeWarning):
    """The Hessian is nearly singular beyond the declared zero modes."""


# ----------------------------------------------------------------------------- rigid
def rigid_modes(positions, pbc: bool, *, rtol: float = 1e-8) -> np.ndarray:
    """Orthonormal rigid-body modes, ``(k, N, d)`` (host, float64).

    Args:
      positions: ``(N, d)`` Cartesian positions (length units).
      pbc: periodic (translations only) or free (translations and rotations).
      rtol: a rotation whose norm is below ``rtol`` times the largest is degenerate
        and dropped (the axis of a linear molecule, a single atom).

    Returns:
      ``k = d`` for periodic systems; for free clusters ``d`` translations plus the
      independent rotations about the centroid (3 in 3D, 2 for a linear molecule,
      1 in 2D, 0 for a single atom). Rows are orthonormal in the flattened ``N·d`` space.
    """
    R = np.asarray(positions, dtype=np.float64)
    n, d = R.shape
    modes = [np.broadcast_to(np.eye(d)[a], (n, d)).copy() for a in range(d)]
    if not pbc:
        X = R - R.mean(axis=0)
        if d == 2:
            rot = [np.stack([-X[:, 1], X[:, 0]], axis=1)]
        else:
            rot = [np.cross(np.eye(3)[a], X) for a in range(3)]
        modes.extend(rot)
    M = np.stack([m.ravel() for m in modes], axis=1)  # (N d, k)
    # SVD keeps only independent directions (drops a linear molecule's axial rotation).
    u, s, _ = np.linalg.svd(M, full_matrices=False)
    keep = s > rtol * max(s.max(), 1e-300)
    return u[:, keep].T.reshape(-1, n, d)


def hessian_vector_product(energy: Callable, positions) -> Callable:
    """``v ↦ H v`` with ``H = ∂²E/∂R²`` at ``positions``; ``energy(R) -> scalar``.

    ``v`` and the result are ``(N, d)`` (energy/length²·length).
    """
    grad = jax.grad(energy)
    return lambda v: jax.jvp(grad, (positions,), (v,))[1]


# ------------------------------------------------------------------------- stability
@dataclasses.dataclass(frozen=True)
class StabilityReport:
    """Curvature of a relaxed structure beyond its rigid modes.

    Attributes:
      eigenvalues: lowest eigenvalues found (ascending), energy/length². Dense: all
        ``N·d − k_rigid`` of them; LOBPCG: the lowest ``LOBPCG_MODES``.
      lambda_min: smallest eigenvalue that is not a declared zero mode (energy/length²).
      lambda_max: largest eigenvalue (energy/length²).
      rigid: ``(k, N, d)`` orthonormal rigid modes.
      soft: ``(s, N, d)`` orthonormal soft modes found numerically (rattlers).
      method: ``"dense"`` or ``"lobpcg"``.
      converged: the eigen-solver converged (always True for dense).
    """

    eigenvalues: np.ndarray
    lambda_min: float
    lambda_max: float
    rigid: np.ndarray
    soft: np.ndarray
    method: str
    converged: bool = True

    @property
    def basis(self) -> np.ndarray:
        """All declared zero modes, rigid then soft, ``(k + s, N, d)``."""
        return np.concatenate([self.rigid, self.soft], axis=0)

    @property
    def n_soft(self) -> int:
        return int(self.soft.shape[0])

    @property
    def condition_number(self) -> float:
        """``λ_max / λ_min`` on the complement of the zero modes."""
        return float(self.lambda_max / self.lambda_min) if self.lambda_min > 0 else float("inf")


def _power_lambda_max(matvec, n, iterations=50):
    v = jax.random.normal(jax.random.PRNGKey(1), (n,), jnp.float64)
    v = v / jnp.linalg.norm(v)

    def body(_, carry):
        v, _ = carry
        w = matvec(v)
        nw = jnp.linalg.norm(w)
        return w / jnp.maximum(nw, 1e-300), nw

    _, lam = jax.lax.fori_loop(0, iterations, body, (v, jnp.zeros((), jnp.float64)))
    return float(lam)


def stability(
    energy: Callable,
    positions,
    pbc: bool,
    *,
    method: str = "auto",
    soft_mode_rtol: float = SOFT_MODE_RTOL,
    saddle_rtol: float = SADDLE_RTOL,
    near_singular_rtol: float = NEAR_SINGULAR_RTOL,
    raise_on_saddle: bool = True,
    warn: bool = True,
) -> StabilityReport:
    """Check that ``positions`` is a minimum of ``energy`` and find its zero modes.

    Args:
      energy: ``E(R) -> scalar`` (eV), with ``R`` of shape ``(N, d)`` (Å); params,
        cell and neighbor list closed over.
      positions: ``(N, d)`` relaxed positions.
      pbc: periodic system (rigid modes: translations only) or free cluster.
      method: ``"dense"`` (eigh of the projected Hessian), ``"lobpcg"``, or ``"auto"``
        (dense up to ``DENSE_MAX_DOF`` degrees of freedom).
      soft_mode_rtol, saddle_rtol, near_singular_rtol: see the module docstring.
      raise_on_saddle: raise :class:`SaddlePointError` on negative curvature (else only
        report it in ``lambda_min``).
      warn: issue :class:`NearSingularWarning` for a nearly singular Hessian.

    Returns:
      :class:`StabilityReport`.

    Raises:
      SaddlePointError: the most negative eigenvalue is below ``−saddle_rtol·λ_max``.
    """
    R = jnp.asarray(positions, jnp.float64)
    n, d = R.shape
    dof = n * d
    rigid = rigid_modes(R, pbc)
    Q = jnp.asarray(rigid.reshape(rigid.shape[0], -1).T)  # (dof, k) orthonormal
    hvp = hessian_vector_product(energy, R)

    def project(v):
        return v - Q @ (Q.T @ v)

    @jax.jit
    def projected_matvec(v):
        return project(hvp(project(v).reshape(n, d)).ravel())

    if method == "auto":
        method = "dense" if dof <= DENSE_MAX_DOF else "lobpcg"
    if method not in ("dense", "lobpcg"):
        raise ValueError(f"method must be 'auto', 'dense' or 'lobpcg'; got {method!r}.")

    k_rigid = rigid.shape[0]
    converged = True
    if method == "dense":
        H = jax.jit(jax.vmap(projected_matvec))(jnp.eye(dof, dtype=jnp.float64))
        H = np.asarray(0.5 * (H + H.T))
        w, V = np.linalg.eigh(H)
        # The k rigid directions are exact zeros of the projected H: remove the k
        # eigenpairs with the largest overlap with them, not merely the k smallest.
        overlap = np.sum((np.asarray(Q).T @ V) ** 2, axis=0)
        drop = np.argsort(-overlap)[:k_rigid]
        keep = np.setdiff1d(np.arange(dof), drop)
        w, V = w[keep], V[:, keep]
        lam_max = float(max(abs(w).max(), 1e-300)) if w.size else 1.0
    else:
        from jax.experimental.sparse.linalg import lobpcg_standard

        lam_max = _power_lambda_max(projected_matvec, dof)
        shift = 1.05 * lam_max
        shifted = jax.jit(jax.vmap(lambda v: shift * project(v) - projected_matvec(v), in_axes=1, out_axes=1))
        m = min(LOBPCG_MODES, max(1, dof // 5 - k_rigid))
        X0 = jax.random.normal(jax.random.PRNGKey(2), (dof, m), jnp.float64)
        X0 = X0 - Q @ (Q.T @ X0)
        theta, U, iters = lobpcg_standard(shifted, X0, m=LOBPCG_MAXITER, tol=1e-10)
        w = np.asarray(shift - theta)
        V = np.asarray(U)
        order = np.argsort(w)
        w, V = w[order], V[:, order]
        converged = int(iters) < LOBPCG_MAXITER
        lam_max = max(lam_max, float(np.abs(w).max()))

    soft_mask = np.abs(w) <= soft_mode_rtol * lam_max
    soft = V[:, soft_mask].T.reshape(-1, n, d) if soft_mask.any() else np.zeros((0, n, d))
    rest = w[~soft_mask]
    lam_min = float(rest.min()) if rest.size else float("inf")
    report = StabilityReport(
        eigenvalues=w, lambda_min=lam_min, lambda_max=lam_max, rigid=rigid, soft=soft,
        method=method, converged=converged,
    )
    if lam_min < -saddle_rtol * lam_max and raise_on_saddle:
        n_neg = int(np.sum(rest < -saddle_rtol * lam_max))
        raise SaddlePointError(
            f"the structure is a saddle point, not a minimum: the Hessian has {n_neg} "
            f"negative eigenvalue(s) beyond the rigid modes, the most negative "
            f"λ_min = {lam_min:.6g} energy/length² (λ_max = {lam_max:.6g}). A derivative "
            "of a saddle is not what a relaxation follows. Fix: perturb the positions "
            "(break the symmetry, e.g. add a small random displacement) and relax again, "
            "or relax the cell if the instability is elastic."
        )
    if warn and 0 <= lam_min <= near_singular_rtol * lam_max:
        warnings.warn(
            f"the Hessian is nearly singular beyond the declared zero modes: smallest "
            f"eigenvalue {lam_min:.6g} (λ_min/λ_max = {lam_min / lam_max:.3g}). Derivatives "
            "are amplified by 1/λ_min and are only as accurate as the relaxation; relax to a "
            "smaller fmax, or declare the mode a zero mode (soft_mode_rtol).",
            NearSingularWarning,
            stacklevel=2,
        )
    if not converged and warn:
        warnings.warn(
            f"LOBPCG did not converge in {LOBPCG_MAXITER} iterations; the smallest "
            f"eigenvalue estimate {lam_min:.6g} is an upper bound.",
            NearSingularWarning,
            stacklevel=2,
        )
    return report


def null_space(energy: Callable, positions, pbc: bool, **kwargs) -> np.ndarray:
    """Orthonormal null-space basis ``(k, N, d)``: rigid modes plus soft modes found.

    Convenience for ``stability(...).basis``; ``kwargs`` go to :func:`stability`.
    """
    return stability(energy, positions, pbc, **kwargs).basis
