"""Zero modes (gauge freedoms) and the stability of a relaxed structure.

The Hessian ``H = ∂²E/∂R²`` of a relaxed structure is singular along

* **rigid translations**: ``d`` modes, for periodic systems and free clusters alike;
* **rigid rotations** of a free cluster: 3 in 3D (2 for a linear molecule, whose
  rotation about its own axis moves nothing), 1 in 2D; a periodic cell breaks them;
* **isolated degrees of freedom**: a coordinate ``k`` whose row of ``H`` is identically
  zero, e.g. the rattlers of a jammed packing (particles with no contacts: a
  finite-range pair energy is exactly 0 beyond contact, so their rows are exact
  zeros). For symmetric ``H`` each is the exact null vector ``e_k``. They are found
  directly by random probing (below), at the cost of two Hessian-vector products
  however many there are;
* **soft modes found numerically**: any other direction along which the energy is
  flat to round-off (a floppy cluster of particles touching only each other, a
  rattler of an energy that is not exactly flat, ...).

**Probing for isolated degrees of freedom.** For a Gaussian random ``z``,
``(H z)_k = Σ_j H_kj z_j`` is a Gaussian of standard deviation ``‖H_k‖`` (the norm of
row ``k``): it is zero, with probability one, only if row ``k`` is. With
``ISOLATED_DOF_PROBES = 2`` independent probes (fixed PRNG keys, so the result is
deterministic), degree of freedom ``k`` is isolated when

    max_p |(H z_p)_k|  ≤  ISOLATED_DOF_RTOL · max_{p,j} |(H z_p)_j|,

``ISOLATED_DOF_RTOL = 1e-12``. Rattlers of a finite-range energy give exact zeros, so
any positive threshold finds them; a row that is not zero passes only if both probes
land within ``≈ 1e-12·scale/‖H_k‖`` of zero (probability ``~(1e-12·scale/‖H_k‖)²``),
negligible unless ``‖H_k‖ = ‖H e_k‖`` is itself ≲ 1e-11 of the largest row, i.e. unless
``e_k`` is a zero mode at the ``SOFT_MODE_RTOL`` level anyway. Round-off in a coupled
row is relative to its own terms (~1e-16), far below the threshold. Pass
``isolated_dof_rtol=None`` to :func:`stability` to skip the probing.

**Gauge.** Implicit differentiation solves ``H dR = −b`` on the orthogonal complement
of all these modes (the core's ``nullspace=``), which returns the minimum-norm
(pseudo-inverse) derivative. That fixes the gauge: the derivative mdsens reports has
no component on isolated degrees of freedom (rattlers do not move), no net
translation (``Σ_i dR_i = 0``), for clusters no net rotation about the centroid
(``Σ_i (R_i − R̄) × dR_i = 0``), and no component along a numerically found soft mode.

**Eigen-analysis on the complement.** Rigid modes and isolated degrees of freedom are
projected out before the eigen-analysis, as ``P v = m ⊙ v − Q_f Q_fᵀ v`` with ``m`` the
0/1 mask of the non-isolated degrees of freedom and ``Q_f`` the rigid modes restricted
to them and re-orthonormalized: ``span(Q_f) ⊕ span{e_k} = span(rigid) ⊕ span{e_k}``
and the two parts have disjoint supports, so ``P`` is the exact orthogonal projector
without ever storing the unit vectors. Eigenvalues come from a dense ``eigh`` of the
Hessian restricted to an orthonormal basis of the complement up to ``DENSE_MAX_DOF``
degrees of freedom (built from Hessian-vector products), and above that from LOBPCG on
Hessian-vector products of the shifted, projected operator ``P (σ I − H) P`` (whose
largest eigenvalues are ``σ − λ_min``, ...), so the Hessian is never stored. If every
eigenvalue LOBPCG returns is soft, its block was too small to reach ``λ_min``: the soft
modes join the projected-out modes and LOBPCG runs again with a doubled block, at most
``LOBPCG_ROUNDS`` times (then ``lambda_min`` is ``nan``, with a warning). LOBPCG
iterates until its block's residuals are below ``LOBPCG_TOL·λ_max``, at most
``LOBPCG_MAXITER`` times; at the cap the result still counts as converged if the
eigenpairs it depends on (soft modes, ``λ_min``) have residuals
``≤ LOBPCG_RESIDUAL_RTOL·λ_max`` (a Ritz value lies within its residual of an
eigenvalue), else :class:`NearSingularWarning`. LOBPCG runs in chunks of
``LOBPCG_CHUNK`` iterations, restarted from its Ritz vectors, and stops early once the
soft modes' residuals are below ``LOBPCG_RESIDUAL_RTOL·λ_max`` and ``λ_min``'s below
``max(LOBPCG_RESIDUAL_RTOL·λ_max, LAMBDA_MIN_RTOL·|λ_min|)``: on ill-conditioned
packings the whole block needs ~30 % more iterations than ``λ_min`` alone (the other
eigenvalues of the block are then Ritz values, upper bounds good to their residuals).
The compiled LOBPCG and power iteration are cached on the energy function, like the
Hessian-vector products (see ``args`` of :func:`stability`).

**Thresholds.** With ``λ_max`` the largest Hessian eigenvalue on that complement and
``λ_min`` the smallest:

* ``λ < −SADDLE_RTOL · λ_max`` → :class:`SaddlePointError` (the structure is not a
  minimum; its derivative would describe a saddle that a relaxation cannot reach);
* ``|λ| ≤ SOFT_MODE_RTOL · λ_max`` → the eigenvector is a soft mode, added to the null
  space (a flat direction's eigenvalues are zero up to round-off, ~1e-16 λ_max);
* ``λ_min ≤ NEAR_SINGULAR_RTOL · λ_max`` beyond the declared modes →
  :class:`NearSingularWarning` with the smallest eigenvalue (derivatives are then
  amplified by ``1/λ_min`` and sensitive to the relaxation's residual).

Units: eigenvalues in energy/length² (eV/Å²); modes are dimensionless unit vectors.
"""

from __future__ import annotations

import dataclasses
import functools
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
    "find_isolated_dofs",
    "stability",
    "null_space",
    "SADDLE_RTOL",
    "SOFT_MODE_RTOL",
    "NEAR_SINGULAR_RTOL",
    "ISOLATED_DOF_RTOL",
    "DENSE_MAX_DOF",
]

#: Relative negative curvature (``λ / λ_max``) below which a structure is a saddle.
SADDLE_RTOL = 1e-7
#: Relative eigenvalue (``|λ| / λ_max``) at or below which a mode counts as a zero mode.
SOFT_MODE_RTOL = 1e-10
#: Relative smallest eigenvalue below which a (non-zero) mode triggers a warning.
NEAR_SINGULAR_RTOL = 1e-7
#: Relative probe response (``|(Hz)_k| / max_j |(Hz)_j|``, over all probes) at or below
#: which degree of freedom ``k`` is isolated (its Hessian row is zero); see the module
#: docstring.
ISOLATED_DOF_RTOL = 1e-12
#: Number of random probes (one Hessian-vector product each) for isolated dofs.
ISOLATED_DOF_PROBES = 2
#: Largest number of degrees of freedom ``N·d`` handled by a dense eigendecomposition.
DENSE_MAX_DOF = 2000
#: Number of lowest eigenpairs LOBPCG looks for above ``DENSE_MAX_DOF`` (first round).
LOBPCG_MODES = 8
#: LOBPCG iteration cap (per round).
LOBPCG_MAXITER = 400
#: LOBPCG runs in chunks of this many iterations, restarted from its Ritz vectors, so
#: that it can stop as soon as the eigenpairs the report depends on have converged.
LOBPCG_CHUNK = 100
#: Relative accuracy ``‖P H P u − λ u‖ / |λ|`` at which the ``λ_min`` eigenpair stops
#: LOBPCG (besides ``LOBPCG_RESIDUAL_RTOL·λ_max``): ``λ_min`` is then known to ~1 % (a
#: Ritz value lies within its residual of an eigenvalue), enough for its sign (saddle)
#: and for the near-singular warning.
LAMBDA_MIN_RTOL = 1e-2
#: Relative residual ``‖P H P u − λ u‖ / λ_max`` LOBPCG iterates for (whole block).
LOBPCG_TOL = 1e-12
#: Relative residual ``‖P H P u − λ u‖ / λ_max`` under which an eigenpair LOBPCG left
#: unconverged at ``LOBPCG_MAXITER`` is accepted (soft modes and the ``λ_min`` pair).
LOBPCG_RESIDUAL_RTOL = 1e-8
#: Largest number of LOBPCG rounds (block doubled each time) to get past soft modes.
LOBPCG_ROUNDS = 4
#: A rigid mode whose norm on the non-isolated dofs is below this lies on isolated
#: dofs only (e.g. every atom rattles) and adds nothing beyond their unit vectors.
_RANK_TOL = 1e-8

_PROBE_SEED = 20240611
_LOBPCG_SEED = 2


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


@functools.partial(jax.jit, static_argnums=0)
def _batched_hvp(energy, positions, args, V):
    """``H v`` for each ``v`` of ``V (m, N, d)``, with ``H`` the Hessian of ``energy(R, *args)``.

    Jitted with ``energy`` static: a caller that passes the same energy function (the
    ``make_*`` callables do) reuses the compiled products across calls and structures.
    """
    grad = jax.grad(energy)
    return jax.vmap(lambda v: jax.jvp(lambda x: grad(x, *args), (positions,), (v,))[1])(V)


def find_isolated_dofs(
    energy: Callable, positions, *, rtol: float = ISOLATED_DOF_RTOL, args: tuple = ()
) -> np.ndarray:
    """Degrees of freedom whose Hessian row is zero (rattlers), by random probing.

    Two Hessian-vector products with Gaussian probes (fixed keys: deterministic); see
    the module docstring for the test and its threshold.

    Args:
      energy: ``E(R, *args) -> scalar`` with ``R`` of shape ``(N, d)``.
      positions: ``(N, d)`` positions.
      rtol: relative threshold (``ISOLATED_DOF_RTOL``).
      args: further arguments of ``energy`` (see :func:`stability`).

    Returns:
      Sorted indices into the flattened ``N·d`` coordinates (atom ``k // d``,
      component ``k % d``). All of them if the Hessian is zero; none if it is not finite.
    """
    R = jnp.asarray(positions, jnp.float64)
    keys = jax.random.split(jax.random.PRNGKey(_PROBE_SEED), ISOLATED_DOF_PROBES)
    Z = jnp.stack([jax.random.normal(k, R.shape, jnp.float64) for k in keys])
    HZ = np.asarray(_batched_hvp(energy, R, tuple(args), Z)).reshape(ISOLATED_DOF_PROBES, -1)
    response = np.abs(HZ).max(axis=0)
    scale = response.max()  # NaN if the Hessian is not finite: nothing is flagged
    return np.flatnonzero(response <= rtol * scale)


# ------------------------------------------------------------------------- stability
@dataclasses.dataclass(frozen=True)
class StabilityReport:
    """Curvature of a relaxed structure beyond its zero modes.

    Attributes:
      eigenvalues: lowest eigenvalues found (ascending), energy/length², on the
        orthogonal complement of the rigid modes and isolated dofs. Dense: all of them
        (soft ones included); LOBPCG: the soft ones found plus the last block of
        (at least ``LOBPCG_MODES``) lowest.
      lambda_min: smallest eigenvalue that is not a declared zero mode (energy/length²);
        ``inf`` if there is none, ``nan`` if LOBPCG ran out of rounds before reaching it.
      lambda_max: largest eigenvalue (energy/length²).
      rigid: ``(k, N, d)`` orthonormal rigid modes.
      soft: ``(s, N, d)`` orthonormal further zero modes, orthogonal to ``rigid``: first
        an orthonormal basis of the isolated dofs' unit vectors orthogonalized against
        the rigid modes, then the soft modes found by the eigen-analysis.
      method: ``"dense"`` or ``"lobpcg"``.
      converged: the eigen-solver converged and reached ``lambda_min`` (always True for
        dense; LOBPCG: its whole block converged, or at least the eigenpairs of the soft
        modes have residuals ``≤ LOBPCG_RESIDUAL_RTOL·λ_max`` and that of
        ``lambda_min`` ``≤ max(LOBPCG_RESIDUAL_RTOL·λ_max, LAMBDA_MIN_RTOL·|λ_min|)``).
      isolated_dofs: sorted indices into the flattened ``N·d`` coordinates whose Hessian
        row is zero (rattlers; atom ``k // d``, component ``k % d``); see
        :attr:`rattlers` for the atoms.
    """

    eigenvalues: np.ndarray
    lambda_min: float
    lambda_max: float
    rigid: np.ndarray
    soft: np.ndarray
    method: str
    converged: bool = True
    isolated_dofs: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def basis(self) -> np.ndarray:
        """All declared zero modes, rigid then soft, ``(k + s, N, d)``, orthonormal."""
        return np.concatenate([self.rigid, self.soft], axis=0)

    @property
    def n_soft(self) -> int:
        return int(self.soft.shape[0])

    @property
    def rattlers(self) -> np.ndarray:
        """Atoms all of whose coordinates are isolated dofs (no contacts), sorted."""
        n, d = self.rigid.shape[1:]
        counts = np.bincount(np.asarray(self.isolated_dofs, dtype=np.int64) // d, minlength=n)
        return np.flatnonzero(counts == d)

    @property
    def condition_number(self) -> float:
        """``λ_max / λ_min`` on the complement of the zero modes."""
        return float(self.lambda_max / self.lambda_min) if self.lambda_min > 0 else float("inf")


#: Power iterations for ``λ_max`` (an estimate: it only scales the relative thresholds).
_POWER_ITERATIONS = 50


def _project(V, known, free):
    """``V (dof, m)`` onto the complement of the isolated dofs (``free`` mask) and ``known``."""
    V = V * free[:, None]
    return V - known @ (known.T @ V)


def _projected_hvp(energy, positions, args, known, free, PV):
    """``P H PV`` for an already projected ``PV (dof, m)``: the Hessian on the complement
    of the known modes."""
    n, d = positions.shape
    HV = _batched_hvp(energy, positions, args, PV.T.reshape(-1, n, d)).reshape(-1, n * d).T
    return _project(HV, known, free)


@functools.partial(jax.jit, static_argnums=0)
def _projected_lambda_max(energy, positions, args, known, free):
    """Power-iteration estimate of ``λ_max`` of ``P H P`` (jitted, cached on ``energy``)."""
    dof = positions.size
    v = _project(jax.random.normal(jax.random.PRNGKey(1), (dof, 1), jnp.float64), known, free)
    v = v / jnp.linalg.norm(v)

    def body(_, carry):
        v, _ = carry
        w = _projected_hvp(energy, positions, args, known, free, v)  # v stays projected
        nw = jnp.linalg.norm(w)
        return w / jnp.maximum(nw, 1e-300), nw

    _, lam = jax.lax.fori_loop(0, _POWER_ITERATIONS, body, (v, jnp.zeros((), jnp.float64)))
    return lam


@functools.partial(jax.jit, static_argnums=(0, 7))
def _lobpcg_lowest(energy, positions, args, known, free, shift, X, iterations, tol):
    """``iterations`` of LOBPCG for the lowest eigenpairs of ``P H P``, from block ``X``.

    LOBPCG finds the largest eigenpairs of ``P (shift·I − H) P``; returns the
    eigenvalues of ``H`` (``shift − θ``), the vectors ``U (dof, m)``, the iterations
    done, and each pair's residual ``‖P H P u − λ u‖``. Jitted with ``energy`` static,
    so repeated calls (chunks, structures, parameters) reuse one compilation.
    """
    from jax.experimental.sparse.linalg import lobpcg_standard

    def shifted(V):
        PV = _project(V, known, free)
        return shift * PV - _projected_hvp(energy, positions, args, known, free, PV)

    theta, U, iters = lobpcg_standard(shifted, X, m=iterations, tol=tol)
    w = shift - theta
    PU = _project(U, known, free)
    resid = jnp.linalg.norm(_projected_hvp(energy, positions, args, known, free, PU) - PU * w, axis=0)
    return w, U, iters, resid


def _free_rigid_modes(Q: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Orthonormal basis ``(dof, k_f)`` of the rigid modes ``Q`` restricted to ``free`` dofs.

    ``span(Q_f) ⊕ span{e_k : k isolated} = span(Q) ⊕ span{e_k}``: a rigid mode is its
    free part plus a combination of isolated unit vectors. Directions whose free part
    is below ``_RANK_TOL`` (a rigid mode carried by isolated dofs alone) are dropped.
    """
    QN = Q * free[:, None]
    if QN.shape[1] == 0:
        return QN
    u, s, _ = np.linalg.svd(QN, full_matrices=False)
    return u[:, s > _RANK_TOL]


def _isolated_modes(Q: np.ndarray, Qf: np.ndarray, iso: np.ndarray) -> np.ndarray:
    """Orthonormal basis ``(m, dof)`` of ``span(Q ∪ {e_k : k ∈ iso}) ⊖ span(Q)``.

    ``X = [Q_f | E]`` (``E`` the unit vectors of ``iso``) is an orthonormal basis of the
    known space and ``Q = X C`` with ``C = Xᵀ Q``; the complement of ``range(C)`` from a
    complete QR of ``C``, ``Z``, gives ``X Z``: orthonormal and exactly orthogonal to
    ``Q`` (``Zᵀ C = 0``). Cost ``O((k_f + r)² k + m·dof)``, ``r = len(iso)``; ``E`` is
    never formed.
    """
    dof, k = Q.shape
    if iso.size == 0:
        return np.zeros((0, dof))
    kf = Qf.shape[1]
    C = np.concatenate([Qf.T @ Q, Q[iso]], axis=0)  # (kf + r, k)
    Z = np.linalg.qr(C, mode="complete")[0][:, k:]  # (kf + r, kf + r - k)
    out = Z[:kf].T @ Qf.T  # (m, dof)
    out[:, iso] += Z[kf:].T
    return out


def _orthonormal_columns(V: np.ndarray) -> np.ndarray:
    if V.shape[1] == 0:
        return V
    u, s, _ = np.linalg.svd(V, full_matrices=False)
    return u[:, s > _RANK_TOL * max(s.max(), 1e-300)]


def stability(
    energy: Callable,
    positions,
    pbc: bool,
    *,
    method: str = "auto",
    soft_mode_rtol: float = SOFT_MODE_RTOL,
    saddle_rtol: float = SADDLE_RTOL,
    near_singular_rtol: float = NEAR_SINGULAR_RTOL,
    isolated_dof_rtol: Optional[float] = ISOLATED_DOF_RTOL,
    raise_on_saddle: bool = True,
    warn: bool = True,
    args: tuple = (),
) -> StabilityReport:
    """Check that ``positions`` is a minimum of ``energy`` and find its zero modes.

    Args:
      energy: ``E(R, *args) -> scalar`` (eV), with ``R`` of shape ``(N, d)`` (Å); params,
        cell and neighbor list closed over or passed in ``args``.
      positions: ``(N, d)`` relaxed positions.
      pbc: periodic system (rigid modes: translations only) or free cluster.
      method: ``"dense"`` (eigh on the complement of the known modes), ``"lobpcg"``, or
        ``"auto"`` (dense up to ``DENSE_MAX_DOF`` degrees of freedom).
      soft_mode_rtol, saddle_rtol, near_singular_rtol: see the module docstring.
      isolated_dof_rtol: threshold of the random probing for isolated dofs
        (rattlers), see the module docstring; ``None`` skips the probing (rattlers are
        then left to the eigen-analysis, which LOBPCG cannot do for many of them).
      raise_on_saddle: raise :class:`SaddlePointError` on negative curvature (else only
        report it in ``lambda_min``).
      warn: issue :class:`NearSingularWarning` for a nearly singular Hessian, and when
        LOBPCG did not converge or ran out of rounds.
      args: further arguments of ``energy``, called as ``energy(R, *args)`` (e.g.
        ``(params, cell, neighbor)``). Passing the same ``energy`` function with
        changing ``args`` reuses the compiled Hessian-vector products across calls; a
        fresh closure recompiles them every time.

    Returns:
      :class:`StabilityReport`.

    Raises:
      SaddlePointError: the most negative eigenvalue is below ``−saddle_rtol·λ_max``.
    """
    R = jnp.asarray(positions, jnp.float64)
    n, d = R.shape
    dof = n * d
    if method == "auto":
        method = "dense" if dof <= DENSE_MAX_DOF else "lobpcg"
    if method not in ("dense", "lobpcg"):
        raise ValueError(f"method must be 'auto', 'dense' or 'lobpcg'; got {method!r}.")

    rigid = rigid_modes(R, pbc)
    Q = rigid.reshape(rigid.shape[0], -1).T  # (dof, k) orthonormal, host
    args = tuple(args)
    if isolated_dof_rtol is None:
        iso = np.zeros(0, dtype=np.int64)
    else:
        iso = find_isolated_dofs(energy, R, rtol=isolated_dof_rtol, args=args)
    free = np.ones(dof, dtype=bool)
    free[iso] = False
    # Known modes as a mask plus a few dense vectors (see the module docstring): the
    # rigid modes restricted to the free dofs, re-orthonormalized, span together with
    # the isolated unit vectors exactly what rigid ∪ isolated span, and are orthogonal
    # to them (disjoint supports), so projecting onto the complement is "zero the
    # isolated dofs, then subtract the Q_f components": O(dof·k), and no (r, dof) matrix
    # of unit vectors, however many rattlers there are.
    Qf = _free_rigid_modes(Q, free)
    iso_modes = _isolated_modes(Q, Qf, iso)  # (m, dof): the report's basis needs them
    n_free = int(free.sum())

    converged = True
    exhausted = False
    if method == "dense":
        free_idx = np.flatnonzero(free)
        kf = Qf.shape[1]
        # Orthonormal basis of the complement within the free dofs: no eigenpairs of
        # the known modes to identify and drop (they are never in the problem).
        Cf = np.linalg.qr(Qf[free_idx], mode="complete")[0][:, kf:] if kf else np.eye(n_free)
        if Cf.shape[1]:
            units = jnp.zeros((n_free, dof), jnp.float64).at[np.arange(n_free), free_idx].set(1.0)
            H = np.asarray(_batched_hvp(energy, R, args, units.reshape(n_free, n, d)))
            H = H.reshape(n_free, dof)[:, free_idx]  # (n_free, n_free)
            H = 0.5 * (H + H.T)
            w, U = np.linalg.eigh(Cf.T @ H @ Cf)
        else:
            w, U = np.zeros(0), np.zeros((0, 0))
        V = np.zeros((dof, w.size))
        V[free_idx] = Cf @ U
        lam_max = float(max(abs(w).max(), 1e-300)) if w.size else 0.0
        soft_mask = np.abs(w) <= soft_mode_rtol * lam_max
        soft_found = V[:, soft_mask]
        rest = w[~soft_mask]
        eigenvalues = w
    else:
        free_j = jnp.asarray(free, jnp.float64)
        lam_max = float(_projected_lambda_max(energy, R, args, jnp.asarray(Qf), free_j))
        shift = 1.05 * lam_max
        known = Qf  # grows by the soft modes of rounds that found nothing else
        soft_found = np.zeros((dof, 0))
        soft_w = np.zeros(0)
        block = LOBPCG_MODES
        for round_ in range(LOBPCG_ROUNDS):
            n_comp = n_free - known.shape[1]
            if n_comp <= 0:
                w, rest = np.zeros(0), np.zeros(0)
                break
            m = max(1, min(block, (dof - 1) // 5, n_comp // 3))
            known_j = jnp.asarray(known)
            X = _project(jax.random.normal(jax.random.PRNGKey(_LOBPCG_SEED + round_), (dof, m), jnp.float64),
                         known_j, free_j)
            # jax's criterion is ‖r‖ < tol·10·n·(θ + ‖A u‖) with θ ≈ ‖A u‖ ≤ 1.05 λ_max:
            # ask for ‖r‖ ≲ LOBPCG_TOL·λ_max, whatever n (soft modes' directions are only
            # accurate to ~‖r‖/λ_min, and they go into the null-space basis).
            tol = LOBPCG_TOL / (21.0 * dof)
            done = 0
            while True:
                chunk = min(LOBPCG_CHUNK, LOBPCG_MAXITER - done)
                w, U, iters, resid = _lobpcg_lowest(energy, R, args, known_j, free_j, shift, X, chunk, tol)
                done += int(iters)
                w, U, resid = np.asarray(w), np.asarray(U), np.asarray(resid)
                lam_max = max(lam_max, float(np.abs(w).max()))
                soft_mask = np.abs(w) <= soft_mode_rtol * lam_max
                # The pairs the report depends on: the soft modes and the lowest other
                # one (λ_min). LOBPCG stops only when its whole block has converged, and
                # the last pairs of a block lag far behind the first.
                needed_ok = resid[soft_mask] <= LOBPCG_RESIDUAL_RTOL * lam_max
                others = np.flatnonzero(~soft_mask)
                if others.size:
                    j_min = others[np.argmin(w[others])]
                    bound = max(LOBPCG_RESIDUAL_RTOL * lam_max, LAMBDA_MIN_RTOL * abs(w[j_min]))
                    needed_ok = np.append(needed_ok, resid[j_min] <= bound)
                reported_ok = bool(np.all(needed_ok))
                if int(iters) < chunk or reported_ok or done >= LOBPCG_MAXITER:
                    break
                X = jnp.asarray(U)  # restart from the Ritz vectors
            if int(iters) >= chunk:  # stopped on the reported pairs, or at the cap
                converged = converged and reported_ok
            order = np.argsort(w)
            w, U, soft_mask = w[order], U[:, order], soft_mask[order]
            new_soft = _orthonormal_columns(np.asarray(_project(jnp.asarray(U[:, soft_mask]), known_j, free_j)))
            soft_found = np.concatenate([soft_found, new_soft], axis=1)
            rest = w[~soft_mask]
            if rest.size or m >= n_comp:
                break  # λ_min reached (or the whole complement is soft)
            # Only soft modes: project them out too and look further with a larger block.
            soft_w = np.concatenate([soft_w, w])
            known = np.concatenate([known, new_soft], axis=1)
            block *= 2
        else:
            exhausted = True
            converged = False
        eigenvalues = np.sort(np.concatenate([soft_w, w])) if not exhausted else np.sort(soft_w)

    soft_all = np.concatenate([iso_modes, soft_found.T], axis=0)
    soft = soft_all.reshape(-1, n, d)
    if exhausted:
        lam_min = float("nan")
    else:
        lam_min = float(rest.min()) if rest.size else float("inf")
    report = StabilityReport(
        eigenvalues=eigenvalues, lambda_min=lam_min, lambda_max=lam_max, rigid=rigid, soft=soft,
        method=method, converged=converged, isolated_dofs=iso,
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
    if exhausted and warn:
        warnings.warn(
            f"LOBPCG found only soft modes in {LOBPCG_ROUNDS} rounds ({soft_found.shape[1]} "
            "of them, besides the rigid modes and isolated dofs) and did not reach the "
            "smallest non-zero eigenvalue (lambda_min = nan). The soft modes found are "
            "declared, but there may be more; use method='dense' if the system is small "
            "enough, or check the structure for a floppy region.",
            NearSingularWarning,
            stacklevel=2,
        )
    elif not converged and warn:
        warnings.warn(
            f"LOBPCG did not converge in {LOBPCG_MAXITER} iterations (the residuals of the "
            "soft-mode or smallest eigenpairs exceed LOBPCG_RESIDUAL_RTOL·λ_max, and "
            "LAMBDA_MIN_RTOL·|λ_min| for the smallest); the "
            f"smallest eigenvalue estimate {lam_min:.6g} is an upper bound.",
            NearSingularWarning,
            stacklevel=2,
        )
    return report


def null_space(energy: Callable, positions, pbc: bool, **kwargs) -> np.ndarray:
    """Orthonormal null-space basis ``(k, N, d)``: rigid modes, isolated dofs, soft modes.

    Convenience for ``stability(...).basis``; ``kwargs`` go to :func:`stability`.
    """
    return stability(energy, positions, pbc, **kwargs).basis
