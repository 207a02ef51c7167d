"""SoftSphere, Morse, Stillinger-Weber and Tersoff against independent truths.

* SoftSphere: a NumPy double loop (2D binary mixture) and finite differences.
* Morse: ASE's ``MorsePotential`` (energies, forces, stress).
* Stillinger-Weber: the published diamond-Si energy, −4.3366 eV/atom at a = 5.431 Å
  (= −2ε with ε = 2.1683 eV; Stillinger & Weber, PRB 31, 5262 (1985)), and a NumPy
  triple loop written here from the paper's formulas.
* Tersoff: ASE's ``Tersoff.from_lammps`` on the shipped file, and the published
  diamond-Si energy −4.63 eV/atom at a = 5.432 Å (Tersoff, PRB 38, 9902 (1988)).
* All: forces and stress against 5-point finite differences of the energy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk

import mdsens as ms
from mdsens.md.potentials import Morse, SoftSphere, SpeciesError, StillingerWeber, Tersoff
from conftest import data_file


def fd5(f, h):
    return (-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h)


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def check_forces_and_stress_fd(pot, system, h=1e-4, tol=1e-8, atoms=((0, 0), (3, 1), (7, 2))):
    """Forces and stress of ``pot`` against 5-point finite differences of its energy."""
    # dense energy differenced against pot.forces (which may use a neighbor list)
    E = jax.jit(pot.energy_fn(system, neighbor_list=False))
    R, C, p = np.asarray(system.positions), np.asarray(system.cell), pot.params
    d = R.shape[1]
    f = np.asarray(pot.forces(system))
    for i, a in atoms:
        a = a % d

        def e_shift(t):
            Rt = R.copy()
            Rt[i, a] += t
            return float(E(Rt, p, C))

        assert abs(-fd5(e_shift, h) - f[i, a]) < tol * np.abs(f).max()
    s = np.asarray(pot.stress(system))
    V = abs(np.linalg.det(C))
    comps = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)] if d == 3 else [(0, 0), (1, 1), (0, 1)]
    for k, (a, b) in enumerate(comps):

        def e_strain(t):
            eps = np.zeros((d, d))
            eps[a, b] = eps[b, a] = t
            F = np.eye(d) + eps
            return float(E(R @ F, p, C @ F))

        fd = fd5(e_strain, h) / V / (1.0 if a == b else 2.0)
        assert abs(fd - s[k]) < tol * np.abs(s).max()


# -- SoftSphere --------------------------------------------------------------------------
def soft_sphere_packing_2d(n_side=6, seed=0):
    rng = np.random.default_rng(seed)
    L = 1.05 * n_side
    g = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij"), -1).reshape(-1, 2)
    pos = (g + 0.5 + 0.15 * rng.standard_normal(g.shape)) * L / n_side
    species = (np.arange(len(pos)) % 2).astype(np.int32)
    cell = np.array([[L, 0.0], [0.3, L]])  # slightly sheared
    return ms.System(positions=pos, cell=cell, species=species, symbols=("A", "B"), pbc=True)


def test_soft_sphere_binary_2d_against_numpy():
    system = soft_sphere_packing_2d()
    sig = np.array([[1.0, 1.2], [1.2, 1.4]])
    pot = SoftSphere(sigma=sig, epsilon=1.0, alpha=2.5)
    R, C, s = np.asarray(system.positions), np.asarray(system.cell), system.species
    inv = np.linalg.inv(C)
    e = 0.0
    for i in range(len(R)):
        for j in range(i + 1, len(R)):
            ds = (R[i] - R[j]) @ inv
            ds -= np.round(ds)
            r = np.linalg.norm(ds @ C)
            sg = sig[s[i], s[j]]
            if r < sg:
                e += (1 - r / sg) ** 2.5 / 2.5
    assert e > 0.1  # there are overlaps to test
    assert abs(float(pot.energy(system)) - e) < 1e-12 * e
    stress = pot.stress(system)
    assert stress.shape == (3,)
    check_forces_and_stress_fd(pot, system, h=1e-5)


def test_soft_sphere_params_gradients_finite_and_symmetric():
    system = soft_sphere_packing_2d()
    pot = SoftSphere(sigma={"A": 1.0, "B": 1.4}, epsilon=1.0, alpha=2.0)
    np.testing.assert_allclose(pot.params["sigma"], [[1.0, 1.2], [1.2, 1.4]])
    g = jax.jit(jax.grad(pot.energy_fn(system), argnums=1))(system.positions, pot.params, system.cell)
    for k, v in g.items():
        assert np.all(np.isfinite(v)), k
    gs = np.asarray(g["sigma"])
    np.testing.assert_allclose(gs, gs.T, rtol=0, atol=1e-14 * np.abs(gs).max())
    # 3 species in the system, 2 in the potential
    three = system.replace(species=(np.arange(system.n_atoms) % 3).astype(np.int32), symbols=("A", "B", "C"))
    with pytest.raises(SpeciesError, match="C"):
        pot.energy(three)
    with pytest.raises(SpeciesError, match="2 species"):
        SoftSphere(sigma=np.ones((2, 2))).energy(three.replace(symbols=("x", "y", "z")))


# -- Morse --------------------------------------------------------------------------------
def test_morse_matches_ase():
    from ase.calculators.morse import MorsePotential

    atoms = bulk("Cu", "fcc", a=np.sqrt(2) * 1.02, cubic=True).repeat(4)  # ASE units r0 = 1
    atoms.rattle(0.03, seed=5)
    kw = dict(epsilon=0.7, r0=1.0, rho0=5.5, rcut1=1.9, rcut2=2.6)
    ref = atoms.copy()
    ref.calc = MorsePotential(**kw)
    system = ms.System.from_ase(atoms)
    pot = Morse(**kw)
    e_ase = ref.get_potential_energy()
    assert abs(float(pot.energy(system)) - e_ase) < 1e-10 * abs(e_ase)
    assert rel(pot.forces(system), ref.get_forces()) < 1e-10
    assert rel(pot.stress(system), ref.get_stress()) < 1e-10


def test_morse_finite_differences_triclinic():
    atoms = bulk("Cu", "fcc", a=3.0).repeat((5, 5, 5))  # primitive (rhombohedral) cell
    atoms.rattle(0.05, seed=6)
    system = ms.System.from_ase(atoms)
    pot = Morse(epsilon=0.3429, r0=2.2, rho0=3.0, rcut1=1.4, rcut2=1.7)
    check_forces_and_stress_fd(pot, system)


# -- Stillinger-Weber -----------------------------------------------------------------------
def sw_numpy(R, L, p):
    """Independent SW energy: explicit pair and triple loops, cubic box of side L."""
    eps, sig, a, lam, gam, c0, A, B, P, Q = (
        p[k] for k in ("epsilon", "sigma", "a", "lam", "gamma", "costheta0", "A", "B", "p", "q")
    )
    rc = a * sig
    n = len(R)
    nbr = [[] for _ in range(n)]
    e = 0.0
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            d = R[j] - R[i]
            d -= L * np.round(d / L)
            r = np.linalg.norm(d)
            if r < rc:
                nbr[i].append((d, r))
                if j > i:
                    e += A * eps * (B * (sig / r) ** P - (sig / r) ** Q) * np.exp(sig / (r - rc))
    for i in range(n):
        for x in range(len(nbr[i])):
            for y in range(x + 1, len(nbr[i])):
                (dj, rj), (dk, rk) = nbr[i][x], nbr[i][y]
                cos = dj @ dk / (rj * rk)
                e += lam * eps * (cos - c0) ** 2 * np.exp(gam * sig / (rj - rc)) * np.exp(gam * sig / (rk - rc))
    return e


def test_stillinger_weber_published_diamond_energy():
    # Stillinger & Weber (1985): diamond Si, a = 5.431 Å, E = -2ε = -4.3366 eV/atom.
    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat(2)
    e = float(StillingerWeber().energy(ms.System.from_ase(atoms))) / len(atoms)
    assert abs(e - (-4.3366)) < 1e-4


def test_stillinger_weber_against_numpy_and_fd():
    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat(2)
    atoms.rattle(0.1, seed=7)
    system = ms.System.from_ase(atoms)
    pot = StillingerWeber(lam=23.0)  # a non-default value flows through params
    ref = sw_numpy(atoms.positions, 2 * 5.431, {k: float(v) for k, v in pot.params.items()})
    assert abs(float(pot.energy(system)) - ref) < 1e-11 * abs(ref)  # 64 atoms: neighbor list
    dense = pot.energy_fn(system, neighbor_list=False)
    assert abs(float(dense(system.positions, pot.params, system.cell)) - ref) < 1e-11 * abs(ref)
    check_forces_and_stress_fd(pot, system)
    # every parameter differentiable and finite
    g = jax.jit(jax.grad(dense, argnums=1))(system.positions, pot.params, system.cell)
    assert all(np.isfinite(float(v)) for v in g.values())
    with pytest.raises(SpeciesError, match="Ge"):
        pot.energy(ms.System.from_ase(bulk("Ge", "diamond", a=5.658, cubic=True).repeat(2)))


# -- Tersoff ---------------------------------------------------------------------------------
def test_tersoff_published_diamond_energy():
    # Tersoff, PRB 38, 9902 (1988), Si(C): diamond a = 5.432 Å, E_c = 4.63 eV/atom.
    atoms = bulk("Si", "diamond", a=5.432, cubic=True).repeat(2)
    e = float(Tersoff.silicon().energy(ms.System.from_ase(atoms))) / len(atoms)
    assert abs(e - (-4.63)) < 5e-3


def test_tersoff_matches_ase_tersoff():
    from ase.calculators.tersoff import Tersoff as AseTersoff

    atoms = bulk("Si", "diamond", a=5.432).repeat(2)  # 16 atoms, primitive (fcc) cell
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.02, 0.0], [0.0, 0.99, 0.03], [0.0, 0.0, 1.01]]), scale_atoms=True)
    atoms.rattle(0.12, seed=8)  # rattled so that r_ij != r_ik and the λ3 term is active
    ref = atoms.copy()
    ref.calc = AseTersoff.from_lammps(data_file("potentials/Si.tersoff"))
    system = ms.System.from_ase(atoms)
    pot = Tersoff.silicon()
    e_ase = ref.get_potential_energy()
    assert abs(float(pot.energy(system)) - e_ase) < 1e-10 * abs(e_ase)
    assert rel(pot.forces(system), ref.get_forces()) < 1e-10
    assert rel(pot.stress(system), ref.get_stress()) < 1e-10
    # neighbor-list path = dense path
    E = jax.jit(pot.energy_fn(system, neighbor_list=True))
    nbrs = pot.neighbor_list(system)
    assert abs(float(E(system.positions, pot.params, system.cell, nbrs)) - e_ase) < 1e-12 * abs(e_ase)


def test_tersoff_fd_and_param_gradients():
    atoms = bulk("Si", "diamond", a=5.432).repeat(2)  # 16 atoms, primitive (fcc) cell
    atoms.rattle(0.1, seed=9)
    system = ms.System.from_ase(atoms)
    pot = Tersoff.silicon()
    check_forces_and_stress_fd(pot, system)
    g = jax.jit(jax.grad(pot.energy_fn(system), argnums=1))(system.positions, pot.params, system.cell)
    assert all(np.all(np.isfinite(v)) for v in g.values())
    # dE/dA by finite differences of the parameter (an independent check of params at call time)
    E = jax.jit(pot.energy_fn(system))

    def e_A(t):
        return float(E(system.positions, dict(pot.params, A=pot.params["A"] + t), system.cell))

    assert abs(fd5(e_A, 1e-2) - float(g["A"][0, 0, 0])) < 1e-9 * abs(float(g["A"][0, 0, 0]))


def test_tersoff_file_errors(tmp_path):
    from mdsens.md.potentials import ParameterError

    bad = tmp_path / "bad.tersoff"
    bad.write_text("Si Si Si 3.0 1.0 0.0\n")
    with pytest.raises(ParameterError, match="17 entries"):
        Tersoff.from_lammps(bad)
    with pytest.raises(ParameterError, match="triple"):
        Tersoff.from_lammps(data_file("potentials/Si.tersoff"), symbols=("Si", "C"))
