"""Elastic constants against independent truths: jax-md's athermal_moduli, published
Stillinger-Weber constants, centrosymmetry (relaxed == clamped), finite-strain
re-relaxation (slow)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk
from ase.units import GPa

import mdsens as ms
from mdsens.md.elastic import elastic_constants
from mdsens.md.potentials import LennardJones, StillingerWeber
from mdsens import relax

VOIGT = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]


def athermal_voigt(pot, system, params):
    """jax-md elasticity.athermal_moduli on the same structure, as a Voigt matrix.

    jax-md wants E(fractional positions, perturbation=P) with the strained Cartesian
    displacement P·(box s); box (columns = lattice vectors) = cell.T.
    """
    from jax_md import elasticity

    E = pot.energy_fn(system, neighbor_list=False)
    cell = jnp.asarray(system.cell)

    def energy_fn(s, perturbation=None, **kwargs):
        R = s @ cell
        if perturbation is None:
            return E(R, params, cell)
        return E(R @ perturbation.T, params, cell @ perturbation.T)

    s = jnp.asarray(np.asarray(system.fractional_positions))
    C4 = elasticity.athermal_moduli(energy_fn, tether_strength=1e-12, cg_tol=1e-12)(s, cell.T)
    return np.array([[C4[a, b, c, d] for (c, d) in VOIGT] for (a, b) in VOIGT])


@pytest.fixture(scope="module")
def lj_fcc():
    pot = LennardJones(sigma=1.0, epsilon=1.0, r_cutoff=2.0, r_onset=1.8)
    atoms = bulk("Ar", "fcc", a=1.55, cubic=True).repeat((3, 3, 3))
    res = relax(ms.System.from_ase(atoms), pot, fmax=1e-10)
    assert res.converged
    return pot, res


@pytest.fixture(scope="module")
def si_diamond():
    pot = StillingerWeber()
    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat((2, 2, 2))
    res = relax(ms.System.from_ase(atoms), pot, fmax=1e-10)
    assert res.converged
    return pot, res


def test_fcc_lj_centrosymmetric_relaxed_equals_clamped_and_matches_jaxmd(lj_fcc):
    pot, res = lj_fcc
    C = elastic_constants(res, pot)
    scale = np.abs(C.clamped).max()
    # every atom is an inversion centre: no internal strain, relaxed == clamped
    np.testing.assert_allclose(C.relaxed, C.clamped, atol=1e-10 * scale)
    np.testing.assert_allclose(C.internal_strain, 0.0, atol=1e-10)
    # cubic symmetry
    assert abs(C.relaxed[0, 0] - C.relaxed[2, 2]) < 1e-10 * scale
    assert abs(C.relaxed[3, 3] - C.relaxed[5, 5]) < 1e-10 * scale
    # jax-md's athermal moduli (same strain definition, F = I + ε)
    ref = athermal_voigt(pot, res.system, pot.params)
    np.testing.assert_allclose(C.relaxed, ref, atol=1e-8 * scale)


def test_stillinger_weber_silicon_published_constants(si_diamond):
    pot, res = si_diamond
    C = elastic_constants(res, pot).to_gpa()
    assert C.unit == "GPa"
    # Published SW silicon (Stillinger & Weber 1985 parameters; e.g. Cowley, PRB 1988;
    # Balamane et al., PRB 46, 2250 (1992)): C11 ≈ 151.4, C12 ≈ 76.4, C44 ≈ 56.4 GPa.
    np.testing.assert_allclose(C.relaxed[0, 0], 151.4, rtol=2e-3)
    np.testing.assert_allclose(C.relaxed[0, 1], 76.4, rtol=2e-3)
    np.testing.assert_allclose(C.relaxed[3, 3], 56.4, rtol=2e-3)
    # internal strain softens the shear modulus only (diamond: C11, C12 unaffected)
    assert C.clamped[3, 3] > 1.5 * C.relaxed[3, 3]
    np.testing.assert_allclose(C.clamped[:3, :3], C.relaxed[:3, :3], rtol=1e-9)
    assert np.all(C.solve_residual < 1e-9)
    # internal strain of a shear: the two fcc sublattices move against each other
    dU = C.internal_strain[3]
    assert np.abs(dU).max() > 0.1
    np.testing.assert_allclose(dU.sum(0), 0.0, atol=1e-9)


@pytest.mark.slow
def test_stillinger_weber_matches_jaxmd_athermal_moduli(si_diamond):
    pot, res = si_diamond
    C = elastic_constants(res, pot)
    ref = athermal_voigt(pot, res.system, pot.params)
    np.testing.assert_allclose(C.relaxed, ref, atol=1e-7 * np.abs(ref).max())


@pytest.mark.slow
def test_stillinger_weber_finite_strain_rerelaxation(si_diamond):
    """Central difference of the stress of re-relaxed ±strained crystals (zero-stress state)."""
    pot, res = si_diamond
    res = relax(res.system, pot, fmax=1e-10, relax_cell=True, stress_tol=1e-10)
    C = elastic_constants(res, pot)
    h = 1e-4
    for J in (0, 3):  # ε_xx and γ_yz
        stresses = []
        for sgn in (+1, -1):
            eps_v = np.zeros(6)
            eps_v[J] = sgn * h
            a, b = VOIGT[J]
            eps = np.zeros((3, 3))
            eps[a, b] += eps_v[J] if a == b else 0.5 * eps_v[J]
            if a != b:
                eps[b, a] += 0.5 * eps_v[J]
            Fm = np.eye(3) + eps
            s = res.system.replace(positions=np.asarray(res.system.positions) @ Fm,
                                   cell=np.asarray(res.system.cell) @ Fm)
            r = relax(s, pot, fmax=1e-11)
            stresses.append(np.asarray(pot.stress(r.system)))
        fd = (stresses[0] - stresses[1]) / (2 * h)
        np.testing.assert_allclose(fd, C.relaxed[:, J], atol=1e-5 * np.abs(C.relaxed).max())


@pytest.mark.slow  # ~40 s; the simple call reuses compilation through the cache (test_cache)
def test_make_elastic_constants_reuses_compilation_and_obeys_scaling(si_diamond):
    """One compiled make_elastic_constants for three parameter sets, each against the
    exact scaling of Stillinger-Weber: every length scales with σ and every energy with
    ε, so at the scaled minimum C(sσ, kε) = k C(σ, ε) / s³."""
    from mdsens.md.elastic import make_elastic_constants

    pot, res = si_diamond
    fn = make_elastic_constants(pot, res.system)
    C1 = fn(res).relaxed
    s, k = 1.05, 2.0
    scaled = res.system.replace(positions=res.system.positions * s, cell=res.system.cell * s)
    p_sigma = dict(pot.params, sigma=pot.params["sigma"] * s)
    p_eps = dict(pot.params, epsilon=pot.params["epsilon"] * k)
    np.testing.assert_allclose(fn(scaled, params=p_sigma).relaxed, C1 / s**3, rtol=1e-8, atol=1e-10 * np.abs(C1).max())
    np.testing.assert_allclose(fn(res, params=p_eps).relaxed, k * C1, rtol=1e-8, atol=1e-10 * np.abs(C1).max())
    assert len(fn._compiled) == 1  # the same layout never recompiles


@pytest.mark.slow  # ~1.5 min on a shared 2-core CPU (jax-md's athermal_moduli compiles)
@pytest.mark.filterwarnings("ignore::mdsens.NotConvergedWarning")  # loose relaxations on purpose
def test_error_estimate_bounds_the_error_of_loosely_relaxed_constants():
    """An fcc LJ vacancy cell (internal relaxation matters) relaxed to fmax 1e-3..1e-9:
    the reported estimate is above ‖C(R) − C(R*)‖₂, with C(R*) from jax-md's
    athermal_moduli at the tightly relaxed structure, and within a factor 10 of it."""
    pot = LennardJones(sigma=1.0, epsilon=1.0, r_cutoff=2.0, r_onset=1.8)
    atoms = bulk("Ar", "fcc", a=1.55, cubic=True).repeat((3, 3, 3))
    del atoms[0]
    atoms.positions += 0.03 * np.random.default_rng(1).normal(size=atoms.positions.shape)
    start = ms.System.from_ase(atoms)
    exact = relax(start, pot, fmax=1e-12, max_steps=100_000)
    truth_C = athermal_voigt(pot, exact.system, pot.params)
    fn = ms.make_elastic_constants(pot, start)
    previous = np.inf
    for fmax in (1e-3, 1e-5, 1e-7, 1e-9):
        C = fn(relax(start, pot, fmax=fmax, max_steps=100_000))
        truth = np.linalg.norm(C.relaxed - truth_C, 2)
        assert C.linearity <= ms.jacobian_error.LINEARITY_MAX
        assert truth <= C.error_estimate <= 10 * truth + 1e-9, (fmax, truth, C.error_estimate)
        assert C.error_estimate < previous
        previous = C.error_estimate
