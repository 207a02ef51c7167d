"""Lennard-Jones against ASE, the shared Potential machinery, and its error messages.

Independent truths used here: ASE's ``LennardJones(smooth=True)`` calculator (energies,
forces, stress; its own neighbor list and periodic images), and central finite
differences of the energy (forces; stress as (1/V) dE/dε).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.lj import LennardJones as AseLJ

import mdsens as ms
from mdsens.md.potentials import (
    CutoffError,
    LennardJones,
    ParameterError,
    SpeciesError,
)

SIGMA, EPS = 3.4, 0.0104  # argon, Å / eV
A_AR = 5.26  # Å, fcc argon lattice constant (roughly the LJ minimum)


def fcc_ar_vacancy(repeat=4, rattle=0.05, seed=1):
    atoms = bulk("Ar", "fcc", a=A_AR, cubic=True).repeat(repeat)
    del atoms[0]
    atoms.rattle(rattle, seed=seed)
    return atoms


def fd5(f, h):
    """Five-point central difference of a scalar function of one variable at 0 (O(h⁴))."""
    return (-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h)


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def ase_results(atoms, **kw):
    atoms = atoms.copy()
    atoms.calc = AseLJ(smooth=True, **kw)
    stress = atoms.get_stress() if atoms.pbc.all() else None
    return atoms.get_potential_energy(), atoms.get_forces(), stress


@pytest.fixture(scope="module")
def ar():
    atoms = fcc_ar_vacancy()
    return atoms, ase_results(atoms, sigma=SIGMA, epsilon=EPS)


# -- against ASE ----------------------------------------------------------------------
def test_lj_matches_ase_fcc_ar_vacancy(ar):
    atoms, (e_ase, f_ase, s_ase) = ar
    system = ms.System.from_ase(atoms)
    pot = LennardJones(sigma=SIGMA, epsilon=EPS)  # ASE defaults: rc = 3σ, ro = 0.66 rc
    assert pot.cutoff() == pytest.approx(3 * SIGMA)
    assert abs(float(pot.energy(system)) - e_ase) / abs(e_ase) < 1e-10
    assert rel(pot.forces(system), f_ase) < 1e-10
    assert rel(pot.stress(system), s_ase) < 1e-10


def test_lj_matches_ase_explicit_cutoffs_triclinic_rotated():
    # Sheared and then rotated cell: exercises general (non-upper-triangular) boxes.
    atoms = bulk("Ar", "fcc", a=A_AR, cubic=True).repeat(3)
    cell = atoms.cell.array.copy()
    cell[1] += 0.3 * cell[0]
    cell[2] += -0.2 * cell[0] + 0.15 * cell[1]
    atoms.set_cell(cell, scale_atoms=True)
    atoms.rotate(37.0, (1.0, 2.0, 0.5), rotate_cell=True)
    atoms.rattle(0.1, seed=3)
    rc, ro = 6.0, 4.5
    e_ase, f_ase, s_ase = ase_results(atoms, sigma=SIGMA, epsilon=EPS, rc=rc, ro=ro)
    system = ms.System.from_ase(atoms)
    pot = LennardJones(SIGMA, EPS, r_cutoff=rc, r_onset=ro)
    assert set(pot.params) == {"sigma", "epsilon", "r_cutoff", "r_onset"}
    assert abs(float(pot.energy(system)) - e_ase) / abs(e_ase) < 1e-10
    assert rel(pot.forces(system), f_ase) < 1e-10
    assert rel(pot.stress(system), s_ase) < 1e-10
    # the same through a neighbor list (forced on a small system)
    E = jax.jit(pot.energy_fn(system, neighbor_list=True))
    nbrs = pot.neighbor_list(system)
    assert abs(float(E(system.positions, pot.params, system.cell, nbrs)) - e_ase) / abs(e_ase) < 1e-10


def test_lj_matches_ase_free_cluster():
    from ase.cluster import Icosahedron

    atoms = Icosahedron("Ar", noshells=3, latticeconstant=A_AR)  # 55 atoms
    atoms.rattle(0.05, seed=2)
    atoms.pbc = False
    e_ase, f_ase, _ = ase_results(atoms, sigma=SIGMA, epsilon=EPS)
    system = ms.System.from_ase(atoms)
    pot = LennardJones(SIGMA, EPS)
    assert abs(float(pot.energy(system)) - e_ase) / abs(e_ase) < 1e-10
    assert rel(pot.forces(system), f_ase) < 1e-10


def test_lj_pair_function_is_ase_cutoff_function():
    from ase.calculators.lj import cutoff_function

    pot = LennardJones(1.0, 1.0)  # rc = 3, ro = 1.98
    r = np.linspace(0.9, 3.2, 47)
    want = 4 * (r**-12 - r**-6) * cutoff_function(r**2, 9.0, 1.98**2)
    np.testing.assert_allclose(pot.pair_values(r), want, rtol=1e-13, atol=1e-15)


# -- finite differences -----------------------------------------------------------------
def test_lj_forces_and_stress_match_finite_differences():
    atoms = bulk("Ar", "fcc", a=A_AR, cubic=True).repeat(3)
    atoms.set_cell(atoms.cell.array + np.array([[0, 0, 0], [0.8, 0, 0], [0.3, -0.5, 0]]), scale_atoms=True)
    atoms.rattle(0.08, seed=4)
    system = ms.System.from_ase(atoms)
    pot = LennardJones(SIGMA, EPS, r_cutoff=7.0)
    E = jax.jit(pot.energy_fn(system))
    R, C, p = np.asarray(system.positions), np.asarray(system.cell), pot.params
    h = 1e-4
    f = np.asarray(pot.forces(system))
    for i, a in [(0, 0), (5, 1), (17, 2), (40, 0)]:
        def e_shift(t):
            Rt = R.copy()
            Rt[i, a] += t
            return float(E(Rt, p, C))
        assert abs(-fd5(e_shift, h) - f[i, a]) < 1e-9 * np.abs(f).max()
    s = np.asarray(pot.stress(system))
    V = abs(np.linalg.det(C))
    voigt = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    for k, (a, b) in enumerate(voigt):
        def e_strain(t):
            eps = np.zeros((3, 3))
            eps[a, b] = eps[b, a] = t  # symmetric strain
            F = np.eye(3) + eps
            return float(E(R @ F, p, C @ F))
        fd = fd5(e_strain, h) / V
        if a != b:
            fd /= 2.0  # ε_ab = ε_ba = t moves both off-diagonal components
        assert abs(fd - s[k]) < 1e-9 * max(1e-3, np.abs(s).max())


# -- species, symmetry, differentiability ---------------------------------------------------
def binary_system(n=40, seed=0, box=9.0):
    rng = np.random.default_rng(seed)
    # jittered simple-cubic arrangement: no overlaps
    g = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    pos = (g + 0.5 + 0.1 * rng.standard_normal(g.shape)) * box / 4
    species = np.array([0, 1] * (n // 2), np.int32)
    return ms.System(positions=pos, cell=np.eye(3) * box, species=species, symbols=("Ar", "Kr"), pbc=True)


def test_mixing_rule_and_numpy_reference():
    system = binary_system()
    pot = LennardJones(sigma={"Ar": 1.0, "Kr": 1.2}, epsilon={"Ar": 1.0, "Kr": 1.5}, r_cutoff=4.0, r_onset=3.0)
    assert pot.symbols == ("Ar", "Kr")
    np.testing.assert_allclose(pot.params["sigma"], [[1.0, 1.1], [1.1, 1.2]], rtol=1e-15)
    np.testing.assert_allclose(pot.params["epsilon"], [[1.0, np.sqrt(1.5)], [np.sqrt(1.5), 1.5]], rtol=1e-15)
    # independent NumPy double loop over minimum images (orthorhombic box)
    R = np.asarray(system.positions)
    L = 9.0
    s = system.species
    e = 0.0
    for i in range(len(R)):
        for j in range(i + 1, len(R)):
            d = R[i] - R[j]
            d -= L * np.round(d / L)
            r2 = d @ d
            sig = [[1.0, 1.1], [1.1, 1.2]][s[i]][s[j]]
            ep = [[1.0, np.sqrt(1.5)], [np.sqrt(1.5), 1.5]][s[i]][s[j]]
            if r2 < 16.0:
                fc = 1.0 if r2 < 9.0 else (16 - r2) ** 2 * (16 + 2 * r2 - 27) / 7**3
                e += 4 * ep * ((sig**2 / r2) ** 6 - (sig**2 / r2) ** 3) * fc
    assert abs(float(pot.energy(system)) - e) < 1e-12 * abs(e)


def test_gradient_wrt_pair_matrix_is_symmetric():
    system = binary_system()
    pot = LennardJones(sigma=[[1.0, 1.1], [1.1, 1.2]], epsilon=[[1.0, 0.8], [0.8, 1.5]], symbols=("Ar", "Kr"))
    E = jax.jit(pot.energy_fn(system))
    g = jax.jit(jax.grad(E, argnums=1))(system.positions, pot.params, system.cell)
    for k in ("sigma", "epsilon"):
        gk = np.asarray(g[k])
        assert np.all(np.isfinite(gk))
        np.testing.assert_allclose(gk, gk.T, rtol=0, atol=1e-14 * np.abs(gk).max())
        assert abs(gk[0, 1]) > 0
    # dE/dε_ij: cross-check the off-diagonal entry by a symmetric finite difference
    h = 1e-6
    def e_at(delta):
        m = np.array([[1.0, 0.8 + delta], [0.8 + delta, 1.5]])
        return float(E(system.positions, dict(pot.params, epsilon=jnp.asarray(m)), system.cell))
    fd = (e_at(h) - e_at(-h)) / (2 * h)
    assert abs(fd - 2 * float(g["epsilon"][0, 1])) < 1e-7 * abs(fd)


def test_exact_scaling_with_tied_cutoff():
    # E(λR, σλ, ε) = E(R, σ, ε) when r_c = 3σ moves with σ; so dE/dσ·σ = -R·dE/dR.
    atoms = fcc_ar_vacancy(repeat=3, rattle=0.1)
    system = ms.System.from_ase(atoms)
    pot = LennardJones(SIGMA * 0.6, EPS)
    E = pot.energy_fn(system)
    gR, gp, gC = jax.jit(jax.grad(E, argnums=(0, 1, 2)))(system.positions, pot.params, system.cell)
    lhs = float(gp["sigma"]) * SIGMA * 0.6
    rhs = -float(jnp.sum(gR * system.positions) + jnp.sum(gC * system.cell))
    assert abs(lhs - rhs) < 1e-10 * abs(lhs)
    assert abs(float(gp["epsilon"]) * EPS - float(pot.energy(system))) < 1e-12 * abs(float(pot.energy(system)))


def test_jit_and_params_at_call_time():
    atoms = fcc_ar_vacancy(repeat=3)
    system = ms.System.from_ase(atoms)
    pot = LennardJones(SIGMA * 0.6, EPS)
    E = jax.jit(pot.energy_fn(system))
    p2 = {"sigma": jnp.asarray(SIGMA * 0.55), "epsilon": jnp.asarray(2 * EPS)}
    e_ase, _, _ = ase_results(atoms, sigma=SIGMA * 0.55, epsilon=2 * EPS)
    assert abs(float(E(system.positions, p2, system.cell)) - e_ase) < 1e-10 * abs(e_ase)
    for v in pot.params.values():
        assert v.dtype == jnp.float64


# -- errors ----------------------------------------------------------------------------
def test_error_missing_species():
    system = binary_system()
    pot = LennardJones(sigma={"Ar": 1.0}, epsilon={"Ar": 1.0})
    with pytest.raises(SpeciesError, match="Kr"):
        pot.energy(system)
    three = ms.System(positions=np.eye(3) * 2.0, species=[0, 1, 2], symbols=("A", "B", "C"))
    with pytest.raises(SpeciesError, match="2 species"):
        LennardJones(sigma=np.ones((2, 2)), epsilon=np.ones((2, 2))).energy(three)
    cu = ms.System(positions=np.eye(3) * 2.0, species=[0, 0, 1], symbols=("Ar", "Cu"))
    with pytest.raises(SpeciesError, match="Cu"):
        LennardJones(sigma={"Ar": 3.4}, epsilon={"Ar": 0.01}).forces(cu)


def test_error_cutoff_larger_than_half_cell():
    atoms = bulk("Ar", "fcc", a=A_AR, cubic=True).repeat(2)  # 10.52 Å cube
    system = ms.System.from_ase(atoms)
    with pytest.raises(CutoffError, match=r"repeat\(\(2, 2, 2\)\)"):
        LennardJones(SIGMA, EPS).energy(system)  # rc = 10.2 > 5.26
    with pytest.raises(CutoffError):
        LennardJones(SIGMA, EPS).energy_fn(system)


def test_error_nan_and_bad_params():
    with pytest.raises(ParameterError, match="NaN"):
        LennardJones(sigma=np.nan, epsilon=1.0)
    system = binary_system()
    pot = LennardJones(1.0, 1.0)
    with pytest.raises(ParameterError, match="NaN"):
        pot.energy(system, params={"sigma": 1.0, "epsilon": np.nan})
    with pytest.raises(ParameterError, match="expects parameters"):
        pot.energy(system, params={"sigma": 1.0})
    with pytest.raises(ParameterError, match="symmetric"):
        LennardJones(sigma=[[1.0, 1.1], [1.2, 1.0]], epsilon=1.0)
    with pytest.raises(ParameterError, match="r_onset < r_cutoff"):
        LennardJones(1.0, 1.0, r_cutoff=2.0, r_onset=2.5)
