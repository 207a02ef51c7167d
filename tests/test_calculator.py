"""``Calculator``: mdsens potentials inside ASE workflows.

Independent truths used here:

* ASE's own ``LennardJones(smooth=True)`` calculator: NumPy, ASE's neighbor list and
  periodic images, its own pair virial for the stress. mdsens's ``LennardJones`` is the
  same function by construction (ASE's multiplicative cutoff with the same ``rc`` and
  ``ro``), so every number must agree to round-off; nothing of the code is shared.
* The published LJ13 global minimum, −44.326801 ε (Cambridge Cluster Database), reached
  by ASE's BFGS with a cutoff beyond the cluster's diameter (exact LJ).
* ``ms.relax`` (mdsens's own L-BFGS and cell relaxation): the same minimum reached by
  another optimizer.
* The zero-stress fcc crystal with nearest-neighbor interactions only, in closed form.
* Exact LJ scaling laws (no cutoff inside the cluster): ``dE*/dε = E*/ε``,
  ``dR*/dσ = (R* − centroid)/σ``.
* Energy conservation of velocity Verlet, and the trajectory ASE LJ itself drives.
"""

import warnings

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.lj import LennardJones as AseLJ
from ase.filters import FrechetCellFilter
from ase.io import read
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

import mdsens as ms
from mdsens.md.calculator import Calculator, StressUnavailableError

SIGMA, EPS = 3.4, 0.0104  # argon, Å / eV
LJ13_MINIMUM = -44.326801  # ε, Wales & Doye (1997)
# A cutoff past the LJ13 diameter (~7.6 Å): exact LJ, and the scaling laws hold.
FAR = dict(r_cutoff=34.0, r_onset=30.0)
# fcc argon, 3x3x3 conventional cells (108 atoms, half-width 7.9 Å): the cutoff is
# below it, and the third and fourth neighbor shells lie in the smooth cutoff region.
CRYSTAL_CUT = dict(r_cutoff=7.5, r_onset=6.0)
# fcc argon, 2x2x2 conventional cells (32 atoms): nearest neighbors only (the second
# shell, ~5.3 Å, is beyond r_cutoff), so the zero-stress crystal is known in closed
# form: every nearest-neighbor pair at the LJ minimum 2^(1/6) σ, a0 = 2^(2/3) σ,
# E = −6 ε per atom.
NEAREST_CUT = dict(r_cutoff=5.0, r_onset=4.5)
A0_NEAREST = 2 ** (2 / 3) * SIGMA


def lj13():
    return read(ms.data.path("lj13_ar.xyz"))


def ar_crystal(a=5.26, rattle=0.05, strain=None, seed=3, repeat=3):
    atoms = bulk("Ar", "fcc", a=a, cubic=True).repeat(repeat)
    if strain is not None:
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + np.asarray(strain)), scale_atoms=True)
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


def ase_lj(cut):
    return AseLJ(sigma=SIGMA, epsilon=EPS, rc=cut["r_cutoff"], ro=cut["r_onset"], smooth=True)


def aligned_difference(A, B):
    """``max |A − B|`` after the rigid motion (Kabsch) that best maps ``B`` onto ``A``."""
    A0, B0 = A - A.mean(0), B - B.mean(0)
    u, _, vt = np.linalg.svd(B0.T @ A0)
    d = np.sign(np.linalg.det(u @ vt))
    rotation = u @ np.diag([1.0, 1.0, d]) @ vt
    return float(np.max(np.linalg.norm(B0 @ rotation - A0, axis=1)))


# --------------------------------------------------------------- (a) optimizer minimum
def bfgs_relaxed_lj13(pot, fmax=1e-6):
    atoms = lj13()
    atoms.calc = Calculator(pot)
    BFGS(atoms, logfile=None).run(fmax=fmax, steps=500)
    assert np.max(np.linalg.norm(atoms.get_forces(), axis=1)) < fmax
    return atoms


def test_ase_bfgs_reaches_the_published_lj13_minimum():
    atoms = bfgs_relaxed_lj13(ms.potentials.LennardJones(sigma=SIGMA, epsilon=EPS, **FAR))
    # measured 4e-7 ε (4e-9 eV); the published value has 6 decimals
    assert abs(atoms.get_potential_energy() / EPS - LJ13_MINIMUM) < 2e-6


@pytest.mark.slow
def test_ase_bfgs_reaches_the_minimum_of_ms_relax():
    pot = ms.potentials.LennardJones(sigma=SIGMA, epsilon=EPS, **FAR)
    atoms = bfgs_relaxed_lj13(pot)
    res = ms.relax(ms.System.from_ase(lj13()), pot, fmax=1e-6)
    assert res.converged
    assert abs(atoms.get_potential_energy() - float(res.energy)) < 1e-8  # measured 1.4e-11 eV
    # positions, up to a rigid motion (a force residual of 1e-6 eV/Å allows ~1e-5 Å)
    assert aligned_difference(atoms.positions, np.asarray(res.system.positions)) < 5e-5  # 7e-6 Å


# ---------------------------------------------------------------- (b) ASE's own numbers
def test_energy_forces_stress_equal_ase_lennard_jones_on_a_strained_rattled_crystal():
    strain = [[0.01, 0.02, 0.0], [0.0, -0.01, 0.015], [0.005, 0.0, 0.02]]  # triclinic cell
    atoms = ar_crystal(strain=strain)
    reference = atoms.copy()
    reference.calc = ase_lj(CRYSTAL_CUT)
    pot = ms.potentials.LennardJones(sigma=SIGMA, epsilon=EPS, **CRYSTAL_CUT)
    atoms.calc = Calculator(pot)

    e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    e_ase, f_ase, s_ase = (reference.get_potential_energy(), reference.get_forces(),
                           reference.get_stress())
    assert abs(e - e_ase) < 1e-10 * abs(e_ase)
    assert np.max(np.abs(f - f_ase)) < 1e-10 * np.max(np.abs(f_ase))
    assert np.max(np.abs(s - s_ase)) < 1e-10 * np.max(np.abs(s_ase))
    assert np.min(np.abs(s_ase[3:])) > 1e-6  # shear components are really there
    assert atoms.get_potential_energy(force_consistent=True) == e  # free_energy
    # the calculator's stress is pot.stress's (ASE sign and Voigt order)
    np.testing.assert_allclose(s, np.asarray(pot.stress(ms.System.from_ase(atoms))), rtol=0, atol=1e-14)


# ---------------------------------------------------------------------- (c) NVE dynamics
def test_nve_conserves_energy_and_follows_the_ase_lj_trajectory():
    """100 velocity-Verlet steps of 5 fs at 40 K on 32 atoms. The calculator uses a
    neighbor list with a 0.3 Å skin, so it is rebuilt during the run; ASE LJ drives the
    same run from the same velocities."""
    start = ar_crystal(rattle=0.0, repeat=2)
    start.set_momenta(np.random.default_rng(0).normal(0.0, 1.0, (len(start), 3)))
    start.set_momenta(start.get_momenta() * np.sqrt(  # 40 K, no net momentum
        1.5 * len(start) * units.kB * 40 / start.get_kinetic_energy()))
    start.set_momenta(start.get_momenta() - start.get_momenta().mean(0))
    pot = ms.potentials.LennardJones(sigma=SIGMA, epsilon=EPS, **NEAREST_CUT)

    def run(calc):
        atoms = start.copy()
        atoms.calc = calc
        dyn = VelocityVerlet(atoms, timestep=5 * units.fs, logfile=None)
        totals = []
        dyn.attach(lambda: totals.append(atoms.get_total_energy()), interval=1)
        dyn.run(100)
        return atoms, np.asarray(totals)

    calc = Calculator(pot, neighbor_list=ms.NeighborListOptions(enabled=True, skin=0.3))
    atoms, totals = run(calc)
    reference, _ = run(ase_lj(NEAREST_CUT))

    kinetic = start.get_kinetic_energy()
    assert np.ptp(totals) < 2e-3 * kinetic  # measured 4.1e-4 (6.5e-5 eV), as ASE LJ's
    assert calc.neighbor_builds > 1  # the list was rebuilt on the way
    assert np.max(np.abs(atoms.positions - reference.positions)) < 1e-9  # measured 2.7e-15 Å


# ------------------------------------------------------------------- (d) cell relaxation
def strained_small_crystal(rattle=0.0):
    return ar_crystal(a=5.3, rattle=rattle, strain=np.diag([0.01, -0.01, 0.0]), repeat=2)


def relax_cell_with_ase(atoms):
    BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=1e-6, steps=500)
    return atoms


def test_frechet_cell_filter_reaches_zero_stress_at_the_closed_form_lattice():
    """A perfect crystal strained anisotropically: only the cell moves (31 steps)."""
    pot = ms.potentials.LennardJones(sigma=SIGMA, epsilon=EPS, **NEAREST_CUT)
    atoms = strained_small_crystal()
    atoms.calc = Calculator(pot)
    relax_cell_with_ase(atoms)
    assert np.max(np.abs(atoms.get_stress())) < 1e-7  # eV/Å³; measured 3.4e-9
    lengths, angles = atoms.cell.cellpar()[:3], atoms.cell.cellpar()[3:]
    np.testing.assert_allclose(lengths, 2 * A0_NEAREST, rtol=0, atol=1e-5)  # measured 2.5e-6 Å
    np.testing.assert_allclose(angles, 90.0, rtol=0, atol=1e-6)  # degrees; measured 1.6e-10
    np.testing.assert_allclose(atoms.get_potential_energy(), -6 * EPS * len(atoms), rtol=1e-9)


@pytest.mark.slow
def test_frechet_cell_filter_agrees_with_ms_relax_cell():
    pot = ms.potentials.LennardJones(sigma=SIGMA, epsilon=EPS, **NEAREST_CUT)
    atoms = strained_small_crystal(rattle=0.02)  # atoms and cell relax together
    atoms.calc = Calculator(pot)
    relax_cell_with_ase(atoms)
    res = ms.relax(ms.System.from_ase(strained_small_crystal(rattle=0.02)), pot, fmax=1e-6, relax_cell=True)
    assert res.converged
    assert abs(atoms.get_potential_energy() - float(res.energy)) < 1e-8  # measured 1.3e-11 eV
    # lengths (Å) and angles (degrees); measured 4.5e-5
    np.testing.assert_allclose(atoms.cell.cellpar(), res.system.to_ase().cell.cellpar(), atol=1e-4)


# ----------------------------------------------------------------------- (e) caching
class TracedLJ(ms.potentials.LennardJones):
    """Counts how often its pair energy is traced, i.e. how often a program is compiled
    (its own class: nothing compiled for other tests is reused)."""

    traces = []

    def pair_energy(self, r, pp, params):
        TracedLJ.traces.append(r.shape)
        return super().pair_energy(r, pp, params)


def test_results_are_cached_and_programs_compiled_once_per_layout():
    pot = TracedLJ(sigma=SIGMA, epsilon=EPS, **FAR)
    atoms = lj13()
    calc = atoms.calc = Calculator(pot)
    energy = atoms.get_potential_energy()
    results = calc.results
    traced = len(TracedLJ.traces)
    assert traced >= 1
    # the same atoms: nothing is computed again, forces came with the energy
    assert atoms.get_potential_energy() == energy and calc.results is results
    atoms.get_forces()
    assert calc.results is results

    # moved atoms, new parameter values (E ∝ ε exactly), a new calculator on another
    # structure of the same layout: new numbers, no new trace
    atoms.positions[0] += 0.05
    moved = atoms.get_potential_energy()
    assert moved != energy
    calc.set(params={**pot.params, "epsilon": 2 * EPS})
    assert calc.results == {}
    assert atoms.get_potential_energy() == pytest.approx(2 * moved, rel=1e-14)
    other = lj13()
    other.rattle(0.05, seed=7)
    other.calc = Calculator(pot)
    other.get_forces()
    assert len(TracedLJ.traces) == traced

    # another layout compiles once
    del other[0]
    other.get_forces()
    other.positions[1] += 0.01
    other.get_forces()
    assert len(TracedLJ.traces) == traced + 1


# ---------------------------------------------------------------- neighbor-list policy
def test_neighbor_list_path_equals_the_dense_path_under_motion_and_cell_change():
    pot = ms.potentials.LennardJones(sigma=SIGMA, epsilon=EPS, **NEAREST_CUT)
    # the skin of the NVE test: the same list capacity, the same compiled program
    listed = Calculator(pot, neighbor_list=ms.NeighborListOptions(enabled=True, skin=0.3))
    dense = Calculator(pot, neighbor_list=False)
    atoms = ar_crystal(repeat=2)
    rng = np.random.default_rng(5)
    builds = []
    # (rms displacement Å, isotropic strain): small motion, large motion, strain, compression
    for move, strain in [(0.0, 0.0), (0.03, 0.0), (0.3, 0.0), (0.01, 0.03), (0.0, -0.04)]:
        atoms.positions += rng.normal(0.0, move / np.sqrt(3), atoms.positions.shape)
        atoms.set_cell(atoms.cell.array * (1 + strain), scale_atoms=True)
        listed.calculate(atoms, ["energy", "forces", "stress"])
        dense.calculate(atoms, ["energy", "forces", "stress"])
        for key in ("energy", "forces", "stress"):
            np.testing.assert_allclose(listed.results[key], dense.results[key], rtol=1e-12, atol=1e-14)
        builds.append(listed.neighbor_builds)
    # kept while atoms move less than skin/2 = 0.15 Å; rebuilt after a larger motion and
    # after each deformation of the box beyond the list's margin
    assert builds == [1, 1, 2, 3, 4]


# ----------------------------------------------------------------------- (f) bad input
def test_bad_input_gives_mdsens_errors_that_name_the_problem():
    argon_only = ms.potentials.LennardJones(sigma={"Ar": SIGMA}, epsilon={"Ar": EPS})
    atoms = lj13()
    atoms.symbols[3] = "Kr"
    atoms.calc = Calculator(argon_only)
    with pytest.raises(ms.SpeciesError, match="Kr"):
        atoms.get_potential_energy()

    atoms = lj13()
    atoms.calc = Calculator(ms.potentials.LennardJones(sigma=SIGMA, epsilon=EPS))
    atoms.positions[2, 1] = np.nan
    with pytest.raises(ms.StructureError, match="NaN"):
        atoms.get_forces()

    atoms = lj13()
    atoms.calc = Calculator(ms.potentials.LennardJones(sigma=SIGMA, epsilon=EPS))
    atoms.positions[1] = atoms.positions[0]  # overlapping atoms: an infinite energy
    with pytest.raises(ms.PotentialError, match="same position"):
        atoms.get_potential_energy()

    atoms = lj13()
    atoms.calc = Calculator(ms.potentials.LennardJones(sigma=SIGMA, epsilon=EPS))
    with pytest.raises(StressUnavailableError, match="periodic") as caught:
        atoms.get_stress()
    assert isinstance(caught.value, ms.MdsensError) and isinstance(caught.value, PropertyNotImplementedError)

    small = bulk("Ar", "fcc", a=5.26, cubic=True)  # 5.26 Å wide: a 10.2 Å cutoff misses images
    small.calc = Calculator(ms.potentials.LennardJones(sigma=SIGMA, epsilon=EPS))
    with pytest.raises(ms.CutoffError, match="repeat"):
        small.get_potential_energy()

    mixed = ar_crystal()
    mixed.pbc = (True, True, False)
    mixed.calc = Calculator(ms.potentials.LennardJones(sigma=SIGMA, epsilon=EPS, **CRYSTAL_CUT))
    with pytest.raises(ms.StructureError, match="mixed periodic"):
        mixed.get_potential_energy()


# ------------------------------------------------------------------- sensitivity offered
@pytest.mark.slow
def test_sensitivity_of_the_ase_relaxed_cluster_follows_the_scaling_laws():
    pot = ms.potentials.LennardJones(sigma=SIGMA, epsilon=EPS, **FAR)
    with pytest.raises(ms.StructureError, match="no structure"):
        Calculator(pot).sensitivity()
    atoms = bfgs_relaxed_lj13(pot)
    sens = atoms.calc.sensitivity(wrt=["sigma", "epsilon"])
    energy = atoms.get_potential_energy()
    np.testing.assert_allclose(sens.denergy[1], energy / EPS, rtol=1e-9)  # measured 9e-11
    scaled = (atoms.positions - atoms.positions.mean(0)) / SIGMA
    assert np.max(np.abs(sens.dpositions[0] - scaled)) < 1e-5 * np.max(np.abs(scaled))  # measured 2.8e-6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        atoms.calc.sensitivity(lj13(), wrt=["epsilon"], stability=False)
    assert any(issubclass(w.category, ms.NotConvergedWarning) for w in caught)
