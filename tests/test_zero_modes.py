"""Rigid modes, numerically found soft modes (rattlers), saddles and near-singular warnings."""

import jax.numpy as jnp
import numpy as np
import pytest

import mdsens  # noqa: F401  (float64)
from mdsens import NearSingularWarning, SaddlePointError, StabilityOptions
from mdsens.md.zero_modes import rigid_modes, stability


@pytest.mark.parametrize(
    "positions, pbc, k",
    [
        (np.random.default_rng(0).normal(size=(5, 3)), True, 3),
        (np.random.default_rng(0).normal(size=(5, 3)), False, 6),
        (np.random.default_rng(0).normal(size=(5, 2)), False, 3),
        (np.random.default_rng(0).normal(size=(5, 2)), True, 2),
        (np.array([[0.0, 0, 0], [1, 0, 0], [2.5, 0, 0]]), False, 5),  # linear molecule
        (np.array([[0.3, 0.1, 0.2]]), False, 3),  # single atom: no rotation
    ],
)
def test_rigid_mode_counts_and_orthonormality(positions, pbc, k):
    B = rigid_modes(positions, pbc)
    assert B.shape == (k,) + positions.shape
    Q = B.reshape(k, -1)
    np.testing.assert_allclose(Q @ Q.T, np.eye(k), atol=1e-12)


def test_rigid_modes_are_zero_modes_of_a_pair_energy():
    R = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3)))

    d0 = R[:, None] - R[None]
    target = jnp.sum(d0 * d0, -1)

    def E(R):  # minimum (E = 0, zero gradient) at R: rotations are exact zero modes there
        d = R[:, None] - R[None]
        return jnp.sum((jnp.sum(d * d, -1) - target) ** 2)

    import jax

    H = jax.hessian(E)(R).reshape(18, 18)
    B = rigid_modes(R, False).reshape(6, -1)
    np.testing.assert_allclose(np.asarray(H) @ B.T, 0.0, atol=1e-9 * np.abs(H).max())


def test_rattler_is_found_as_soft_mode():
    # three bonded particles and one with no interactions at all (a rattler), periodic
    def E(R):
        return jnp.sum((R[0] - R[1]) ** 2) + jnp.sum((R[1] - R[2]) ** 2) + jnp.sum((R[0] - R[2]) ** 2)

    R = jnp.asarray([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    rep = stability(E, R, True)
    assert rep.n_soft == 2
    np.testing.assert_array_equal(rep.isolated_dofs, [6, 7])
    np.testing.assert_array_equal(rep.rattlers, [3])
    assert rep.basis.shape[0] == 4
    # basis: orthonormal, spans the translations and the rattler's unit vectors; the
    # soft part is orthogonal to the rigid modes (so it also moves atoms 0-2)
    B = rep.basis.reshape(4, -1)
    np.testing.assert_allclose(B @ B.T, np.eye(4), atol=1e-12)
    expected = np.concatenate([rigid_modes(R, True).reshape(2, -1), np.eye(8)[[6, 7]]])
    np.testing.assert_allclose(B.T @ (B @ expected.T), expected.T, atol=1e-12)
    assert rep.lambda_min > 0


def test_saddle_raises_with_most_negative_eigenvalue():
    def E(R):
        dx, dy = R[0] - R[1]
        return -0.5 * dx**2 + 2.0 * dy**2

    with pytest.raises(SaddlePointError, match=r"saddle point.*λ_min = -2 "):
        stability(E, jnp.zeros((2, 2)), True)


def test_near_singular_warning_reports_smallest_eigenvalue():
    def E(R):
        dx, dy = R[0] - R[1]
        return 0.5 * dx**2 + 0.5e-8 * dy**2

    with pytest.warns(NearSingularWarning, match="smallest eigenvalue 2e-08"):
        rep = stability(E, jnp.zeros((2, 2)), True)
    np.testing.assert_allclose(rep.lambda_min, 2e-8, rtol=1e-6)


@pytest.mark.parametrize("method", ["lobpcg", "lanczos"])
def test_iterative_methods_agree_with_dense(method):
    rng = np.random.default_rng(5)
    k = jnp.asarray(rng.uniform(0.5, 2.0, size=(40,)))

    def E(R):  # a ring of springs with random stiffnesses (periodic-like, translation invariant)
        d = R - jnp.roll(R, 1, axis=0)
        return 0.5 * jnp.sum(k[:, None] * d * d)

    R = jnp.asarray(rng.normal(size=(40, 2)))
    dense = stability(E, R, True, StabilityOptions(method="dense"))
    lob = stability(E, R, True, StabilityOptions(method=method, warn=False))
    assert lob.method == method
    np.testing.assert_allclose(lob.lambda_min, dense.lambda_min, rtol=1e-5)
    np.testing.assert_allclose(lob.lambda_max, dense.lambda_max, rtol=1e-2)
    if method == "lobpcg":
        np.testing.assert_allclose(lob.eigenvalues[:3], dense.eigenvalues[:3], rtol=1e-5)
    else:  # one Lanczos vector sees one copy of each (here doubly degenerate) eigenvalue
        nearest = np.abs(lob.eigenvalues[:, None] - dense.eigenvalues[None]).min(axis=1)
        assert np.all(nearest <= 1e-2 * np.abs(lob.eigenvalues) + 1e-8 * dense.lambda_max)


# ------------------------------------------------------------- rattlers, LOBPCG rounds
import jax  # noqa: E402
import scipy.optimize  # noqa: E402

from mdsens.md import zero_modes as zm  # noqa: E402


def _harmonic_overlap_energy(radii, L):
    """Periodic soft discs, ½ (1 − r/σ_ij)² per overlapping pair, σ_ij = r_i + r_j; 0 beyond."""
    radii = jnp.asarray(radii)
    sigma = radii[:, None] + radii[None]
    off_diagonal = ~np.eye(len(radii), dtype=bool)

    def E(R):
        dR = R[:, None] - R[None]
        dR = dR - L * jnp.round(dR / L)
        r2 = jnp.sum(dR * dR, -1)
        contact = (r2 < sigma**2) & off_diagonal
        r = jnp.sqrt(jnp.where(contact, r2, 1.0))
        return 0.25 * jnp.sum(jnp.where(contact, (1.0 - r / sigma) ** 2, 0.0))

    return E


N_BIG, N_TINY, R_TINY = 40, 10, 0.005


@pytest.fixture(scope="module")
def rattler_packing():
    """A relaxed jammed binary packing (φ = 0.88) plus N_TINY tiny discs put in its voids.

    The tiny discs touch nobody: exact rattlers, 2·N_TINY = 20 zero modes (> LOBPCG_MODES),
    added without disturbing the force balance. Returns ``(E, R, L, radii, truth)`` with
    ``truth = _dense_truth(E, R)``.
    """
    rng = np.random.default_rng(0)
    radii = np.where(np.arange(N_BIG) < N_BIG // 2, 0.5, 0.7)
    L = float(np.sqrt(np.sum(np.pi * radii**2) / 0.88))
    E = _harmonic_overlap_energy(radii, L)
    value_and_grad = jax.jit(jax.value_and_grad(lambda x: E(x.reshape(N_BIG, 2))))
    fun = lambda x: tuple(np.asarray(a, dtype=float) for a in value_and_grad(jnp.asarray(x)))  # noqa: E731
    res = scipy.optimize.minimize(fun, rng.uniform(0, L, 2 * N_BIG), jac=True, method="L-BFGS-B",
                                  options=dict(maxiter=20000, gtol=1e-13, ftol=0.0, maxcor=30))
    R = res.x.reshape(N_BIG, 2) % L
    assert np.abs(res.jac).max() < 1e-7
    # voids: grid points farthest from every disc surface, at least 0.3 apart
    g = np.arange(0, L, 0.04) + 0.02
    P = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    dP = P[:, None] - R[None]
    dP -= L * np.round(dP / L)
    gap = (np.linalg.norm(dP, axis=-1) - radii).min(axis=1)
    voids = []
    for i in np.argsort(-gap):
        if len(voids) == N_TINY or gap[i] < R_TINY + 0.01:
            break
        dq = P[i] - np.reshape(voids, (-1, 2))
        dq -= L * np.round(dq / L)
        if np.all(np.linalg.norm(dq, axis=-1) > 0.3):
            voids.append(P[i])
    assert len(voids) == N_TINY
    R_all = np.concatenate([R, voids])
    radii_all = np.concatenate([radii, np.full(N_TINY, R_TINY)])
    E_all, R_all = _harmonic_overlap_energy(radii_all, L), jnp.asarray(R_all)
    return E_all, R_all, L, radii_all, _dense_truth(E_all, R_all)


def _dense_truth(E, R, rtol=1e-10):
    """Independent truth: full jax Hessian, numpy eigh; (zero rows, null-space projector, λ_min)."""
    dof = R.size
    H = np.asarray(jax.hessian(E)(R)).reshape(dof, dof)
    zero_rows = np.flatnonzero(np.all(H == 0.0, axis=1))
    w, V = np.linalg.eigh(0.5 * (H + H.T))
    null = np.abs(w) <= rtol * np.abs(w).max()
    return zero_rows, V[:, null] @ V[:, null].T, w[~null].min(), int(null.sum())


def _check_basis(rep, projector, k_null):
    B = rep.basis.reshape(rep.basis.shape[0], -1)
    assert B.shape[0] == k_null
    np.testing.assert_allclose(B @ B.T, np.eye(k_null), atol=1e-10)  # orthonormal
    np.testing.assert_allclose(B.T @ B, projector, atol=1e-8)  # spans the null space


@pytest.mark.parametrize("method", ["dense", "lobpcg", "lanczos"])
def test_rattlers_found_by_probing_match_dense_eigh(rattler_packing, method):
    E, R, _, _, (zero_rows, projector, lam_min, k_null) = rattler_packing
    tiny_dofs = np.arange(2 * N_BIG, 2 * (N_BIG + N_TINY))
    assert set(tiny_dofs) <= set(zero_rows)  # the tiny discs touch nobody

    rep = stability(E, R, True, StabilityOptions(method=method))
    assert rep.method == method and rep.converged
    np.testing.assert_array_equal(rep.isolated_dofs, zero_rows)
    np.testing.assert_array_equal(rep.rattlers, np.unique(zero_rows // 2))
    # rigid modes unchanged, the soft part orthogonal to them
    np.testing.assert_allclose(rep.rigid, rigid_modes(R, True), atol=1e-14)
    np.testing.assert_allclose(rep.soft.reshape(rep.n_soft, -1) @ rep.rigid.reshape(2, -1).T, 0.0, atol=1e-12)
    _check_basis(rep, projector, k_null)
    assert k_null == 2 + zero_rows.size  # translations + one per rattler dof, nothing else
    np.testing.assert_allclose(rep.lambda_min, lam_min, rtol=1e-6)


def test_isolated_dofs_probing_edge_cases(rattler_packing):
    E, R, _, _, (_, projector, lam_min, k_null) = rattler_packing
    # a zero Hessian: every dof is isolated
    np.testing.assert_array_equal(zm.find_isolated_dofs(lambda R: 0.0 * jnp.sum(R**2), R), np.arange(R.size))
    # weak but non-zero rows are not isolated: only the exact zeros are
    weak = lambda R: E(R) + 1e-9 * jnp.sum(R**2)  # noqa: E731
    assert zm.find_isolated_dofs(weak, R).size == 0
    # deterministic
    np.testing.assert_array_equal(zm.find_isolated_dofs(E, R), zm.find_isolated_dofs(E, R))
    # without probing, the dense eigen-analysis still finds the same null space
    rep = stability(E, R, True, StabilityOptions(method="dense", isolated_dof_rtol=None))
    assert rep.isolated_dofs.size == 0
    _check_basis(rep, projector, k_null)
    np.testing.assert_allclose(rep.lambda_min, lam_min, rtol=1e-10)


def test_rattlers_of_soft_sphere_potential_are_exact(rattler_packing):
    import mdsens as ms
    from mdsens.md.potentials import SoftSphere

    E_ref, R, L, radii, (zero_rows, _, _, _) = rattler_packing
    species = np.select([radii == 0.5, radii == 0.7], [0, 1], 2)
    system = ms.System(np.asarray(R), cell=np.eye(2) * L, species=species, symbols=("A", "B", "C"), pbc=True)
    pot = SoftSphere(sigma={"A": 1.0, "B": 1.4, "C": 2 * R_TINY})
    E = pot.energy_fn(system, neighbor_list=True)
    nb = pot.neighbor_list(system)
    energy = lambda R: E(R, pot.params, system.cell, nb)  # noqa: E731
    np.testing.assert_allclose(energy(R), E_ref(R), rtol=1e-12)
    rep = stability(energy, R, True, StabilityOptions(method="dense"))
    np.testing.assert_array_equal(rep.isolated_dofs, zero_rows)


def _ring_and_dimers(n_ring=40, n_dimers=6, seed=5):
    """A ring of zero-rest-length springs (2 zero modes) plus free dimers at rest length.

    Each dimer (random orientation, so no Hessian row vanishes) has 3 zero modes, two
    translations and a rotation, that probing cannot see: 3·n_dimers soft modes for the
    eigen-analysis, more than LOBPCG_MODES.
    """
    rng = np.random.default_rng(seed)
    k = jnp.asarray(rng.uniform(0.5, 2.0, size=(n_ring,)))
    R_ring = rng.normal(size=(n_ring, 2))
    centers = rng.uniform(-5, 5, size=(n_dimers, 2))
    theta = rng.uniform(0.2, 1.3, size=n_dimers)
    half = 0.5 * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    R = jnp.asarray(np.concatenate([R_ring, centers - half, centers + half]))

    def E(R):
        d = R[:n_ring] - jnp.roll(R[:n_ring], 1, axis=0)
        a, b = R[n_ring:n_ring + n_dimers], R[n_ring + n_dimers:]
        return 0.5 * jnp.sum(k[:, None] * d * d) + 0.5 * jnp.sum((jnp.linalg.norm(a - b, axis=1) - 1.0) ** 2)

    return E, R


@pytest.mark.slow  # two LOBPCG rounds to convergence: ~16 s
def test_lobpcg_rounds_find_more_soft_modes_than_its_block():
    E, R = _ring_and_dimers()
    zero_rows, projector, lam_min, k_null = _dense_truth(E, R)
    assert zero_rows.size == 0 and k_null == 2 + 18 > StabilityOptions().lobpcg_modes
    rep = stability(E, R, True, StabilityOptions(method="lobpcg"))  # two rounds: 8 soft, then 16 (10 soft)
    assert rep.converged and rep.isolated_dofs.size == 0 and rep.n_soft == 18
    _check_basis(rep, projector, k_null)
    np.testing.assert_allclose(rep.lambda_min, lam_min, rtol=1e-6)
    # one Lanczos vector cannot resolve 18 degenerate soft modes: LOBPCG takes over
    handed = stability(E, R, True, StabilityOptions(method="lanczos"))
    assert handed.method == "lanczos+lobpcg" and handed.n_soft == 18
    _check_basis(handed, projector, k_null)
    dense = stability(E, R, True, StabilityOptions(method="dense"))
    _check_basis(dense, projector, k_null)
    np.testing.assert_allclose(dense.lambda_min, lam_min, rtol=1e-10)


def test_lobpcg_out_of_rounds_warns():
    E, R = _ring_and_dimers()
    with pytest.warns(NearSingularWarning, match="only soft modes in 1 rounds"):
        rep = stability(E, R, True, StabilityOptions(method="lobpcg", rounds=1))
    assert np.isnan(rep.lambda_min) and not rep.converged and rep.n_soft == StabilityOptions().lobpcg_modes


@pytest.mark.parametrize("method", ["lobpcg", "lanczos"])
def test_saddle_raises_with_iterative_methods(method):
    rng = np.random.default_rng(5)
    k = jnp.asarray(rng.uniform(0.5, 2.0, size=(40,)))

    def E(R):  # ring of springs plus an unstable pair term: one negative eigenvalue
        d = R - jnp.roll(R, 1, axis=0)
        return 0.5 * jnp.sum(k[:, None] * d * d) - 2.0 * (R[0, 0] - R[20, 0]) ** 2

    R = jnp.asarray(rng.normal(size=(40, 2)))
    w = np.linalg.eigvalsh(np.asarray(jax.hessian(E)(R)).reshape(80, 80))
    assert w[0] < -0.1
    with pytest.raises(SaddlePointError, match="saddle point") as info:
        stability(E, R, True, StabilityOptions(method=method))
    reported = float(str(info.value).split("λ_min = ")[1].split()[0])
    np.testing.assert_allclose(reported, w[0], rtol=1e-5)  # printed with 6 digits


def test_isolated_atom_of_a_free_cluster():
    # a 6-atom cluster at its minimum (rotations are exact zero modes) plus a 7th atom
    # that does not interact: rigid modes (about the 7-atom centroid) and the isolated
    # atom's unit vectors span the 6 + 3 dimensional null space together
    R6 = np.random.default_rng(1).normal(size=(6, 3))
    d0 = R6[:, None] - R6[None]
    target = jnp.asarray(np.sum(d0 * d0, -1))

    def E(R):
        d = R[:6, None] - R[None, :6]
        return jnp.sum((jnp.sum(d * d, -1) - target) ** 2)

    R = jnp.asarray(np.concatenate([R6, [[2.0, -1.0, 0.5]]]))
    zero_rows, projector, lam_min, k_null = _dense_truth(E, R, rtol=1e-9)
    assert k_null == 9 and list(zero_rows) == [18, 19, 20]
    rep = stability(E, R, False, StabilityOptions(method="dense"))
    assert rep.rigid.shape[0] == 6 and rep.n_soft == 3
    np.testing.assert_array_equal(rep.rattlers, [6])
    np.testing.assert_allclose(rep.soft.reshape(3, -1) @ rep.rigid.reshape(6, -1).T, 0.0, atol=1e-12)
    _check_basis(rep, projector, k_null)
    np.testing.assert_allclose(rep.lambda_min, lam_min, rtol=1e-8)
