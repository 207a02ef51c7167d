"""Zero modes (gauge freedoms) and the stability of a relaxed structure.

The Hessian ``H = ∂²E/∂R²`` of a relaxed structure is singular along rigid translations
(``d`` modes), rigid rotations of a free cluster (3 in 3D, 2 for a linear molecule, 1 in
2D), isolated degrees of freedom (rattlers: a row of ``H`` that is exactly zero, found by
random probing) and soft modes found numerically. :func:`stability` finds them all,
refuses a saddle (:class:`~mdsens.SaddlePointError`), warns for a nearly singular
Hessian (:class:`~mdsens.NearSingularWarning`), and returns the orthonormal basis that
implicit differentiation declares as its null space: the derivative is then the
minimum-norm one (no net translation, no net rotation for clusters, no motion along a
rattler's free directions).

Eigenvalues come from a dense ``eigh`` of the Hessian on the complement of the known
modes up to ``StabilityOptions.dense_max_dof`` degrees of freedom, and above that from
Lanczos on Hessian-vector products, with LOBPCG taking over when soft modes appear. The
thresholds, the probing test for rattlers and the stopping rule are stated once, in
``docs/design.md`` ("Zero modes and stability"); every knob is a field of
:class:`~mdsens.md.options.StabilityOptions`.

Units: eigenvalues in energy/length² (eV/Å²); modes are dimensionless unit vectors.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from mdsens.md.hessian import hessian_products
from mdsens.md.errors import NearSingularWarning, SaddlePointError
from mdsens.md.options import StabilityOptions

__all__ = [
    "StabilityReport",
    "rigid_modes",
    "find_isolated_dofs",
    "stability",
    "known_modes",
    "KnownModes",
    "stability_from_lanczos",
    "check_spectrum",
    "ISOLATED_DOF_PROBES",
]

#: Random probes (one Hessian-vector product each) for isolated dofs.
ISOLATED_DOF_PROBES = 2
#: A mode whose norm is below this fraction of the largest is dependent (or zero) and
#: dropped: a linear molecule's axial rotation, a rigid mode carried by rattlers alone.
_RANK_TOL = 1e-8

_PROBE_SEED = 20240611
_LOBPCG_SEED = 2


# ----------------------------------------------------------------------------- rigid
def rigid_modes(positions, pbc: bool):
    """Orthonormal rigid-body modes ``(k, N, d)``: the one builder, host or traced.

    ``d`` translations; for a free cluster also the rotations about the centroid (3 in
    3D, 1 in 2D). Dependent directions (a linear molecule's rotation about its own axis,
    any rotation of a single atom) have a singular value below ``_RANK_TOL`` of the
    largest. With concrete ``positions`` they are dropped (a numpy array; ``k`` = 3, 5
    or 6 in 3D); under ``jit``/``vmap`` they become exact zero rows, so that the shape
    stays static (``k`` = 3 or 6) and every projection stays exact.
    """
    traced = isinstance(positions, jax.core.Tracer)
    xp = jnp if traced else np
    R = xp.asarray(positions, dtype=xp.float64)
    n, d = R.shape
    modes = [xp.broadcast_to(xp.eye(d)[a], (n, d)) for a in range(d)]
    if not pbc:
        X = R - R.mean(axis=0)
        if d == 2:
            modes.append(xp.stack([-X[:, 1], X[:, 0]], axis=1))
        else:
            modes.extend(xp.cross(xp.eye(3)[a], X) for a in range(3))
    M = xp.stack([m.reshape(-1) for m in modes], axis=1)  # (N d, k)
    u, s, _ = xp.linalg.svd(M, full_matrices=False)
    keep = s > _RANK_TOL * s.max()
    if traced:
        return (u * keep[None, :]).T.reshape(-1, n, d)
    return u[:, keep].T.reshape(-1, n, d)


def check_spectrum(rest, lam_max: float, o: StabilityOptions, subject: str, beyond: str, stacklevel: int = 2):
    """The verdict on the eigenvalues ``rest`` that are not zero modes (``λ_max`` scale):
    :class:`SaddlePointError` below ``−saddle_rtol·λ_max``, :class:`NearSingularWarning` at
    or below ``near_singular_rtol·λ_max`` (the thresholds of ``docs/design.md`` §5)."""
    rest = np.asarray(rest)
    if not rest.size:
        return
    lam_min = float(rest.min())
    if lam_min < -o.saddle_rtol * lam_max and o.raise_on_saddle:
        n_neg = int(np.sum(rest < -o.saddle_rtol * lam_max))
        raise SaddlePointError(
            f"{subject} is a saddle point, not a minimum: the Hessian has {n_neg} negative "
            f"eigenvalue(s) beyond {beyond}, the most negative λ_min = {lam_min:.6g} energy/length² "
            f"(λ_max = {lam_max:.6g}). A derivative of a saddle is not what a relaxation follows. "
            "Fix: perturb the positions (break the symmetry, e.g. add a small random "
            "displacement) and relax again, or relax the cell if the instability is elastic."
        )
    if o.warn and 0 <= lam_min <= o.near_singular_rtol * lam_max:
        warnings.warn(
            f"the Hessian of {subject} is nearly singular beyond the declared zero modes: smallest "
            f"eigenvalue {lam_min:.6g} (λ_min/λ_max = {lam_min / lam_max:.3g}). Derivatives are "
            "amplified by 1/λ_min and are only as accurate as the relaxation; relax to a smaller "
            "fmax, or declare the mode a zero mode (StabilityOptions.soft_mode_rtol).",
            NearSingularWarning,
            stacklevel=stacklevel + 1,
        )


@functools.partial(jax.jit, static_argnums=0)
def _batched_hvp(energy, positions, args, blocks, V):
    """``H v`` for each ``v`` of ``V (m, N, d)``, with ``H`` the Hessian of ``energy(R, *args)``.

    Jitted with ``energy`` static: a caller that passes the same energy function (the
    ``make_*`` callables do) reuses the compiled products across calls and structures.
    ``blocks``: from :func:`~mdsens.md.hessian.gradient_and_blocks`, or ``None``.
    """
    return jax.vmap(hessian_products(energy, positions, *args, blocks=blocks))(V)


def find_isolated_dofs(energy: Callable, positions, *, rtol: float = 1e-12, args: tuple = (),
                       blocks=None) -> np.ndarray:
    """Degrees of freedom whose Hessian row is zero (rattlers), by random probing.

    ``ISOLATED_DOF_PROBES`` Hessian-vector products with Gaussian probes (fixed keys:
    deterministic); the test and its threshold are in ``docs/design.md``.

    Args:
      energy: ``E(R, *args) -> scalar`` with ``R`` of shape ``(N, d)``.
      positions: ``(N, d)`` positions.
      rtol: relative threshold (``StabilityOptions.isolated_dof_rtol``).
      args: further arguments of ``energy`` (see :func:`stability`).

    Returns:
      Sorted indices into the flattened ``N·d`` coordinates (atom ``k // d``,
      component ``k % d``). All of them if the Hessian is zero; none if it is not finite.
    """
    R = jnp.asarray(positions, jnp.float64)
    Z = np.random.default_rng(_PROBE_SEED).standard_normal((ISOLATED_DOF_PROBES, *R.shape))
    HZ = np.asarray(_batched_hvp(energy, R, tuple(args), blocks, Z)).reshape(ISOLATED_DOF_PROBES, -1)
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
        (soft ones included); Lanczos: the converged Ritz values; LOBPCG: the soft ones
        found plus the last block of (at least ``lobpcg_modes``) lowest.
      lambda_min: smallest eigenvalue that is not a declared zero mode (energy/length²);
        ``inf`` if there is none, ``nan`` if LOBPCG ran out of rounds before reaching it.
      lambda_max: largest eigenvalue (energy/length²).
      rigid: ``(k, N, d)`` orthonormal rigid modes.
      soft: ``(s, N, d)`` orthonormal further zero modes, orthogonal to ``rigid``: first
        an orthonormal basis of the isolated dofs' unit vectors orthogonalized against
        the rigid modes, then the soft modes found by the eigen-analysis.
      method: ``"dense"``, ``"lanczos"``, ``"lanczos+lobpcg"`` (Lanczos met a soft mode
        or did not converge, LOBPCG took over) or ``"lobpcg"``.
      converged: the eigen-solver reached ``lambda_min`` by the stopping rule of
        ``docs/design.md`` §5 (always True for dense).
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


def _projected_hvp(product, shape, known, free, PV):
    """``P H PV`` for an already projected ``PV (dof, m)``: the Hessian on the complement
    of the known modes. ``product``: from :func:`hessian_products`, built outside loops."""
    n, d = shape
    HV = jax.vmap(product)(PV.T.reshape(-1, n, d)).reshape(-1, n * d).T
    return _project(HV, known, free)


@functools.partial(jax.jit, static_argnums=0)
def _projected_lambda_max(energy, positions, args, blocks, known, free):
    """Power-iteration estimate of ``λ_max`` of ``P H P`` (jitted, cached on ``energy``)."""
    dof = positions.size
    v = _project(jax.random.normal(jax.random.PRNGKey(1), (dof, 1), jnp.float64), known, free)
    v = v / jnp.linalg.norm(v)
    product = hessian_products(energy, positions, *args, blocks=blocks)

    def body(_, carry):
        v, _ = carry
        w = _projected_hvp(product, positions.shape, known, free, v)  # v stays projected
        nw = jnp.linalg.norm(w)
        return w / jnp.maximum(nw, 1e-300), nw

    _, lam = jax.lax.fori_loop(0, _POWER_ITERATIONS, body, (v, jnp.zeros((), jnp.float64)))
    return lam


@functools.partial(jax.jit, static_argnums=(0, 8))
def _lobpcg_lowest(energy, positions, args, blocks, known, free, shift, X, iterations, tol):
    """``iterations`` of LOBPCG for the lowest eigenpairs of ``P H P``, from block ``X``.

    LOBPCG finds the largest eigenpairs of ``P (shift·I − H) P``; returns the
    eigenvalues of ``H`` (``shift − θ``), the vectors ``U (dof, m)``, the iterations
    done, and each pair's residual ``‖P H P u − λ u‖``. Jitted with ``energy`` static,
    so repeated calls (chunks, structures, parameters) reuse one compilation.
    """
    from jax.experimental.sparse.linalg import lobpcg_standard

    product = hessian_products(energy, positions, *args, blocks=blocks)

    def shifted(V):
        PV = _project(V, known, free)
        return shift * PV - _projected_hvp(product, positions.shape, known, free, PV)

    theta, U, iters = lobpcg_standard(shifted, X, m=iterations, tol=tol)
    w = shift - theta
    PU = _project(U, known, free)
    resid = jnp.linalg.norm(_projected_hvp(product, positions.shape, known, free, PU) - PU * w, axis=0)
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


class _Spectrum(NamedTuple):
    """What an eigen-solver found on the complement of the known modes."""

    eigenvalues: np.ndarray  # reported eigenvalues (ascending)
    rest: np.ndarray  # eigenvalues that are not soft (λ_min is their minimum)
    soft: np.ndarray  # (dof, s) orthonormal soft modes found
    lam_max: float
    converged: bool
    exhausted: bool  # LOBPCG ran out of rounds before reaching λ_min
    method: str


def _dense_spectrum(energy, R, args, blocks, Qf, free, o) -> _Spectrum:
    n, d = R.shape
    dof, n_free = R.size, int(free.sum())
    free_idx = np.flatnonzero(free)
    kf = Qf.shape[1]
    # Orthonormal basis of the complement within the free dofs: no eigenpairs of the known
    # modes to identify and drop (they are never in the problem).
    Cf = np.linalg.qr(Qf[free_idx], mode="complete")[0][:, kf:] if kf else np.eye(n_free)
    if Cf.shape[1]:
        units = np.zeros((n_free, dof))
        units[np.arange(n_free), free_idx] = 1.0
        H = np.asarray(_batched_hvp(energy, R, args, blocks, jnp.asarray(units.reshape(n_free, n, d))))
        H = H.reshape(n_free, dof)[:, free_idx]  # (n_free, n_free)
        H = 0.5 * (H + H.T)
        w, U = np.linalg.eigh(Cf.T @ H @ Cf)
    else:
        w, U = np.zeros(0), np.zeros((0, 0))
    V = np.zeros((dof, w.size))
    V[free_idx] = Cf @ U
    lam_max = float(max(abs(w).max(), 1e-300)) if w.size else 0.0
    soft_mask = np.abs(w) <= o.soft_mode_rtol * lam_max
    return _Spectrum(w, w[~soft_mask], V[:, soft_mask], lam_max, True, False, "dense")


@functools.partial(jax.jit, static_argnums=(0, 10))
def _lanczos_steps(energy, positions, args, blocks, known, free, V, alpha, beta, k0, steps):
    """``steps`` Lanczos iterations on ``P H P`` from iteration ``k0``, with full
    reorthogonalization. ``V (m + 1, dof)`` holds the Lanczos vectors as rows (row ``k0``
    is the current one), ``alpha`` and ``beta (m,)`` the tridiagonal. Jitted with
    ``energy`` static, like the other Hessian products."""
    tiny = jnp.finfo(V.dtype).tiny ** 0.5
    product = hessian_products(energy, positions, *args, blocks=blocks)

    def body(i, carry):
        V, alpha, beta = carry
        k = k0 + i
        v = V[k]
        w = _projected_hvp(product, positions.shape, known, free, v[:, None])[:, 0]
        a = jnp.vdot(v, w)
        w = w - a * v - jnp.where(k > 0, beta[jnp.maximum(k - 1, 0)], 0.0) * V[jnp.maximum(k - 1, 0)]
        # Rows past k are still zero, so the whole V reorthogonalizes against the built
        # vectors only (no masked copy of V per step).
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            w = w - (V @ w) @ V
        b = jnp.linalg.norm(w)
        V = V.at[k + 1].set(jnp.where(b > tiny, w / jnp.where(b > tiny, b, 1.0), 0.0))
        return V, alpha.at[k].set(a), beta.at[k].set(b)

    return jax.lax.fori_loop(0, steps, body, (V, alpha, beta))


#: Lanczos iterations between convergence checks on the host.
_LANCZOS_CHUNK = 20


def _lanczos_spectrum(energy, R, args, blocks, Qf, free, o) -> Optional[_Spectrum]:
    """The low spectrum by Lanczos from one random vector (the common case: no soft mode
    beyond the known ones). ``None`` when a converged soft Ritz pair appears (one vector
    cannot resolve a degenerate zero eigenspace) or Lanczos does not converge within
    ``o.maxiter``: the caller then runs LOBPCG. The stopping rule is LOBPCG's."""
    dof = R.size
    n_comp = int(free.sum()) - Qf.shape[1]
    if n_comp <= 0:
        return _Spectrum(np.zeros(0), np.zeros(0), np.zeros((dof, 0)), 0.0, True, False, "lanczos")
    m = int(min(o.maxiter, n_comp))
    m = _LANCZOS_CHUNK * -(-m // _LANCZOS_CHUNK)  # whole chunks (extra rows stay unused)
    # Host arrays for the set-up: eager jax operations would each compile once.
    known, free_j = jnp.asarray(Qf), jnp.asarray(free.astype(np.float64))
    v0 = _project(np.random.default_rng(_LOBPCG_SEED).standard_normal((dof, 1)), Qf, free.astype(float))[:, 0]
    V = np.zeros((m + 1, dof))
    V[0] = v0 / np.linalg.norm(v0)
    V, alpha, beta = jnp.asarray(V), jnp.asarray(np.zeros(m)), jnp.asarray(np.zeros(m))
    k = 0
    while k < m:
        V, alpha, beta = _lanczos_steps(energy, R, args, blocks, known, free_j, V, alpha, beta, k, _LANCZOS_CHUNK)
        k += _LANCZOS_CHUNK
        verdict, invariant = _ritz_verdict(np.asarray(alpha)[:k], np.asarray(beta)[:k], dof, o)
        if verdict is not _UNDECIDED:
            return verdict
        if invariant or k >= n_comp:
            break
    return None


_UNDECIDED = object()


def _ritz_verdict(diagonal, off_diagonal, dof, o, method="lanczos"):
    """``(verdict, invariant)`` from a Lanczos tridiagonal (``off_diagonal[-1]`` couples it
    to the next vector): the :class:`_Spectrum` once ``λ_min`` has converged by the
    stopping rule, ``None`` on a converged soft Ritz pair (one start vector cannot resolve
    a degenerate zero eigenspace: LOBPCG's job), else ``_UNDECIDED``; ``invariant`` when
    the Krylov space stopped growing (its Ritz values are exact)."""
    a, b = diagonal, off_diagonal
    broke = np.flatnonzero(b <= 1e-12 * max(np.abs(a).max(), 1e-300))
    size = int(broke[0]) + 1 if broke.size else a.size
    theta, S = scipy.linalg.eigh_tridiagonal(a[:size], b[:size - 1])
    resid = np.abs(b[size - 1] * S[-1]) if not broke.size else np.zeros(size)
    lam_max = float(max(np.abs(theta).max(), 1e-300))
    soft = np.abs(theta) <= o.soft_mode_rtol * lam_max
    if np.any(soft & (resid <= o.residual_rtol * lam_max)):
        return None, bool(broke.size)
    j = int(np.argmin(theta))
    bound = max(o.residual_rtol * lam_max, o.lambda_min_rtol * abs(theta[j]))
    if not soft[j] and resid[j] <= bound:
        good = resid <= np.maximum(o.residual_rtol * lam_max, o.lambda_min_rtol * np.abs(theta))
        return _Spectrum(theta[good], theta[good], np.zeros((dof, 0)), lam_max, True, False, method), bool(broke.size)
    return _UNDECIDED, bool(broke.size)


def _lobpcg_spectrum(energy, R, args, blocks, Qf, free, o) -> _Spectrum:
    dof, n_free = R.size, int(free.sum())
    free_j = jnp.asarray(free.astype(np.float64))
    lam_max = float(_projected_lambda_max(energy, R, args, blocks, jnp.asarray(Qf), free_j))
    shift = 1.05 * lam_max
    known = Qf  # grows by the soft modes of rounds that found nothing else
    soft_found = np.zeros((dof, 0))
    soft_w = np.zeros(0)
    block = o.lobpcg_modes
    converged, exhausted = True, False
    w, rest = np.zeros(0), np.zeros(0)
    for round_ in range(o.rounds):
        n_comp = n_free - known.shape[1]
        if n_comp <= 0:
            w, rest = np.zeros(0), np.zeros(0)
            break
        m = max(1, min(block, (dof - 1) // 5, n_comp // 3))
        known_j = jnp.asarray(known)
        X = jnp.asarray(_project(np.random.default_rng(_LOBPCG_SEED + round_).standard_normal((dof, m)),
                                 known, free.astype(float)))
        # jax's criterion is ‖r‖ < tol·10·n·(θ + ‖A u‖) with θ ≈ ‖A u‖ ≤ 1.05 λ_max: ask for
        # ‖r‖ ≲ lobpcg_tol·λ_max, whatever n (soft modes' directions are only accurate to
        # ~‖r‖/λ_min, and they go into the null-space basis).
        tol = o.lobpcg_tol / (21.0 * dof)
        done = 0
        while True:
            chunk = min(o.lobpcg_chunk, o.maxiter - done)
            w, U, iters, resid = _lobpcg_lowest(energy, R, args, blocks, known_j, free_j, shift, X, chunk, tol)
            done += int(iters)
            w, U, resid = np.asarray(w), np.asarray(U), np.asarray(resid)
            lam_max = max(lam_max, float(np.abs(w).max()))
            soft_mask = np.abs(w) <= o.soft_mode_rtol * lam_max
            # The pairs the report depends on: the soft modes and the lowest other one
            # (λ_min). LOBPCG stops only when its whole block has converged, and the last
            # pairs of a block lag far behind the first.
            needed_ok = resid[soft_mask] <= o.residual_rtol * lam_max
            others = np.flatnonzero(~soft_mask)
            if others.size:
                j_min = others[np.argmin(w[others])]
                bound = max(o.residual_rtol * lam_max, o.lambda_min_rtol * abs(w[j_min]))
                needed_ok = np.append(needed_ok, resid[j_min] <= bound)
            reported_ok = bool(np.all(needed_ok))
            if int(iters) < chunk or reported_ok or done >= o.maxiter:
                break
            X = jnp.asarray(U)  # restart from the Ritz vectors
        if int(iters) >= chunk:  # stopped on the reported pairs, or at the cap
            converged = converged and reported_ok
        order = np.argsort(w)
        w, U, soft_mask = w[order], U[:, order], soft_mask[order]
        new_soft = _orthonormal_columns(_project(U[:, soft_mask], known, free.astype(float)))
        soft_found = np.concatenate([soft_found, new_soft], axis=1)
        rest = w[~soft_mask]
        if rest.size or m >= n_comp:
            break  # λ_min reached (or the whole complement is soft)
        # Only soft modes: project them out too and look further with a larger block.
        soft_w = np.concatenate([soft_w, w])
        known = np.concatenate([known, new_soft], axis=1)
        block *= 2
    else:
        exhausted, converged = True, False
    eigenvalues = np.sort(soft_w) if exhausted else np.sort(np.concatenate([soft_w, w]))
    return _Spectrum(eigenvalues, rest, soft_found, lam_max, converged, exhausted, "lobpcg")


def stability(energy: Callable, positions, pbc: bool, options: Optional[StabilityOptions] = None, *,
              args: tuple = (), blocks=None) -> StabilityReport:
    """Check that ``positions`` is a minimum of ``energy`` and find its zero modes.

    Args:
      energy: ``E(R, *args) -> scalar`` (eV), with ``R`` of shape ``(N, d)`` (Å).
      positions: ``(N, d)`` relaxed positions.
      pbc: periodic system (rigid modes: translations only) or free cluster.
      options: :class:`~mdsens.md.options.StabilityOptions` (default thresholds).
      args: further arguments of ``energy``, called as ``energy(R, *args)`` (e.g.
        ``(params, cell, neighbor)``). Passing the same ``energy`` function with
        changing ``args`` reuses the compiled Hessian-vector products across calls; a
        fresh closure recompiles them every time.
      blocks: Hessian blocks of ``energy`` at ``(positions, *args)`` from
        :func:`~mdsens.md.hessian.gradient_and_blocks`, built once by the caller; each
        product program then compiles only their cheap application.

    Returns:
      :class:`StabilityReport`.

    Raises:
      SaddlePointError: the most negative eigenvalue is below ``−saddle_rtol·λ_max``
        (unless ``options.raise_on_saddle`` is False).

    Warns:
      NearSingularWarning: ``λ_min ≤ near_singular_rtol·λ_max``, or LOBPCG did not
        converge or ran out of rounds (unless ``options.warn`` is False).
    """
    o = StabilityOptions() if options is None else options
    R = jnp.asarray(positions, jnp.float64)
    method = o.method
    if method == "auto":
        method = "dense" if R.size <= o.dense_max_dof else "lanczos"

    known = known_modes(energy, R, pbc, o, args=args, blocks=blocks)
    args = tuple(args)
    if method == "dense":
        found = _dense_spectrum(energy, R, args, blocks, known.Qf, known.free, o)
    else:
        found = _lanczos_spectrum(energy, R, args, blocks, known.Qf, known.free, o) if method == "lanczos" else None
        if found is None:  # soft modes, an unconverged Lanczos, or method="lobpcg"
            found = _lobpcg_spectrum(energy, R, args, blocks, known.Qf, known.free, o)
            if method == "lanczos":
                found = found._replace(method="lanczos+lobpcg")
    return _report(known, found, o)


class KnownModes(NamedTuple):
    """The zero modes known before any eigen-analysis: rigid modes and isolated dofs.

    Attributes:
      rigid: ``(k, N, d)`` orthonormal rigid modes.
      isolated_dofs: indices of the flattened coordinates whose Hessian row is zero.
      free: ``(N·d,)`` bool, False at the isolated dofs.
      Qf: ``(N·d, k')`` the rigid modes restricted to the free dofs, orthonormal.
      isolated_modes: ``(m, N·d)`` orthonormal basis of the isolated dofs' unit vectors,
        orthogonal to ``rigid``.
    """

    rigid: np.ndarray
    isolated_dofs: np.ndarray
    free: np.ndarray
    Qf: np.ndarray
    isolated_modes: np.ndarray

    @property
    def basis(self) -> np.ndarray:
        """``(k + m, N, d)``: what a stability report's basis is when there is no soft mode."""
        n, d = self.rigid.shape[1:]
        return np.concatenate([self.rigid, self.isolated_modes.reshape(-1, n, d)], axis=0)


def known_modes(energy: Callable, positions, pbc: bool, options: Optional[StabilityOptions] = None, *,
                args: tuple = (), blocks=None) -> KnownModes:
    """The rigid modes and the isolated dofs (two Hessian-vector products) of ``positions``."""
    o = StabilityOptions() if options is None else options
    R = jnp.asarray(positions, jnp.float64)
    dof = R.size
    rigid = rigid_modes(R, pbc)
    Q = rigid.reshape(rigid.shape[0], -1).T  # (dof, k) orthonormal, host
    if o.isolated_dof_rtol is None:
        iso = np.zeros(0, dtype=np.int64)
    else:
        iso = find_isolated_dofs(energy, R, rtol=o.isolated_dof_rtol, args=tuple(args), blocks=blocks)
    free = np.ones(dof, dtype=bool)
    free[iso] = False
    # Known modes as a mask plus a few dense vectors: the rigid modes restricted to the
    # free dofs, re-orthonormalized, span together with the isolated unit vectors exactly
    # what rigid ∪ isolated span, and are orthogonal to them (disjoint supports), so the
    # projection is "zero the isolated dofs, then subtract the Q_f components": O(dof·k),
    # with no (r, dof) matrix of unit vectors however many rattlers there are.
    Qf = _free_rigid_modes(Q, free)
    return KnownModes(rigid, iso, free, Qf, _isolated_modes(Q, Qf, iso))


def stability_from_lanczos(known: KnownModes, tridiagonal, options: Optional[StabilityOptions] = None
                           ) -> Optional[StabilityReport]:
    """The stability report from a Lanczos tridiagonal of the Hessian on the complement of
    ``known`` (e.g. :func:`mdsens.linear_solve.cg_lanczos` of a random right-hand side),
    by :func:`stability`'s stopping rule and thresholds; ``None`` when it cannot decide
    (a soft Ritz pair, or ``λ_min`` not converged): run :func:`stability` then.

    Raises and warns as :func:`stability`.
    """
    o = StabilityOptions() if options is None else options
    steps = int(tridiagonal.steps)
    diagonal = np.asarray(tridiagonal.diagonal)[:steps]
    off_diagonal = np.asarray(tridiagonal.off_diagonal)[:steps]
    # Every leading block T_k is the Lanczos matrix of step k. Without reorthogonalization
    # a converged pair's ghost copy can inflate the last step's residuals, so earlier
    # blocks are tried too; any one that meets the stopping rule certifies λ_min.
    for size in range(steps, 1, -_PREFIX_STRIDE):
        found, _ = _ritz_verdict(diagonal[:size], off_diagonal[:size], known.free.size, o, method="cg-lanczos")
        if found is None:
            return None
        if found is not _UNDECIDED:
            return _report(known, found, o)
    return None


#: Step between the leading blocks of a CG-Lanczos tridiagonal that are tried.
_PREFIX_STRIDE = 5


def _report(known: KnownModes, found: _Spectrum, o: StabilityOptions) -> StabilityReport:
    """The report of a spectrum, after its checks (saddle, near-singular) and warnings."""
    n, d = known.rigid.shape[1:]
    soft = np.concatenate([known.isolated_modes, found.soft.T], axis=0).reshape(-1, n, d)
    if found.exhausted:
        lam_min = float("nan")
    else:
        lam_min = float(found.rest.min()) if found.rest.size else float("inf")
    report = StabilityReport(
        eigenvalues=found.eigenvalues, lambda_min=lam_min, lambda_max=found.lam_max, rigid=known.rigid, soft=soft,
        method=found.method, converged=found.converged, isolated_dofs=known.isolated_dofs,
    )
    check_spectrum(found.rest, found.lam_max, o, "the structure", "the rigid modes", stacklevel=4)
    if found.exhausted and o.warn:
        warnings.warn(
            f"LOBPCG found only soft modes in {o.rounds} rounds ({found.soft.shape[1]} of them, "
            "besides the rigid modes and isolated dofs) and did not reach the smallest non-zero "
            "eigenvalue (lambda_min = nan). The soft modes found are declared, but there may be "
            "more; use StabilityOptions(method='dense') if the system is small enough, or check "
            "the structure for a floppy region.",
            NearSingularWarning,
            stacklevel=3,
        )
    elif not found.converged and o.warn:
        warnings.warn(
            f"LOBPCG did not converge in {o.maxiter} iterations (the residuals of the soft-mode or "
            "smallest eigenpairs exceed residual_rtol·λ_max, and lambda_min_rtol·|λ_min| for the "
            f"smallest); the smallest eigenvalue estimate {lam_min:.6g} is an upper bound.",
            NearSingularWarning,
            stacklevel=3,
        )
    return report
