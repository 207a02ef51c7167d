"""Relaxation against independent truths: the published LJ13 minimum, ASE's own optimizers
and calculator, a scalar minimization of the fcc lattice constant, the SW silicon crystal,
and the exact scaling law of untruncated-range Lennard-Jones."""

import os
import warnings

import ase
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.lj import LennardJones as AseLJ
from ase.optimize import BFGS
from scipy.optimize import minimize_scalar

import mdsens as ms
from mdsens import NotConvergedWarning, OptionError, RelaxError, System, make_relax, read, relax
from mdsens.md.minimize import (
    fire_minimize,
    gradient_descent_map,
    gradient_descent_minimize,
    lbfgs,
    lbfgs_minimize,
    positions_problem,
    run,
)
from mdsens.md.potentials import LennardJones
from conftest import DATA


# Global minimum of the 13-atom LJ cluster, in units of epsilon (icosahedron):
# Wales & Doye, J. Phys. Chem. A 101, 5111 (1997); Cambridge Cluster Database.
LJ13_MINIMUM = -44.326801

SIGMA, EPS = 3.4, 0.0104  # argon, Å and eV


def _lj13_start():
    return read(os.path.join(DATA, "lj13_ar.xyz"))


def _exact_lj(sigma=SIGMA, epsilon=1.0):
    """LJ whose smoothing starts beyond every distance in a 13-atom cluster: exact 12-6."""
    return LennardJones(sigma=sigma, epsilon=epsilon, r_cutoff=12 * sigma, r_onset=10 * sigma)


def _min_image(d, cell):
    frac = np.linalg.solve(cell.T, d.T).T
    return (frac - np.round(frac)) @ cell


def _smallest_nonzero_curvature(atoms, n_zero, h=1e-4):
    """Smallest non-zero Hessian eigenvalue (eV/Å²) by central differences of ASE forces."""
    x0 = atoms.positions.copy()

    def forces_at(k, step):
        x = x0.copy()
        x.flat[k] += step
        atoms.positions = x
        return atoms.get_forces().ravel()

    H = np.array([-(forces_at(k, h) - forces_at(k, -h)) / (2 * h) for k in range(x0.size)])
    atoms.positions = x0
    return np.linalg.eigvalsh(0.5 * (H + H.T))[n_zero]


@pytest.fixture(scope="module")
def lj13_relax():
    """One compiled FIRE relaxation for the exact-LJ 13-atom cluster, shared by tests."""
    return make_relax(_exact_lj(), _lj13_start())


# ------------------------------------------------------------------- published minimum
@pytest.mark.parametrize("method", ["fire", "lbfgs", "gradient_descent"])
def test_lj13_reaches_the_icosahedral_global_minimum(method):
    res = relax(_lj13_start(), _exact_lj(), fmax=1e-8, minimizer=method)
    assert res.converged and res.fmax < 1e-8 and res.steps > 0
    assert abs(float(res.energy) - LJ13_MINIMUM) < 1e-6
    # The structure is the icosahedron: 12 equal centre-vertex distances.
    R = np.asarray(res.system.positions)
    d = np.linalg.norm(R - R.mean(axis=0), axis=1)
    assert np.sort(d)[0] < 1e-6 and np.ptp(np.sort(d)[1:]) < 1e-6


# --------------------------------------------------------------------- ASE as the peer
@pytest.mark.parametrize(
    "reps, rc, ro",
    [
        (2, 5.2, 4.5),  # 31 atoms; the cutoff must stay below the half-width 5.26 Å
        pytest.param(3, 7.5, 6.0, marks=pytest.mark.slow),  # 107 atoms
    ],
)
def test_fcc_vacancy_agrees_with_ase_bfgs(reps, rc, ro):
    """Perturbed fcc Ar with a vacancy: same energy and positions as ASE's BFGS with ASE's
    own smooth LJ, to the precision the force criterion allows."""
    fmax = 1e-6
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(reps)
    del atoms[0]
    atoms.positions += np.random.default_rng(3).normal(scale=0.05, size=atoms.positions.shape)
    start = System.from_ase(atoms)

    res = relax(start, LennardJones(sigma=SIGMA, epsilon=EPS, r_cutoff=rc, r_onset=ro), fmax=fmax)
    assert res.converged

    ase_atoms = atoms.copy()
    ase_atoms.calc = AseLJ(sigma=SIGMA, epsilon=EPS, rc=rc, ro=ro, smooth=True)
    assert BFGS(ase_atoms, logfile=None).run(fmax=fmax, steps=2000)
    e_ase = ase_atoms.get_potential_energy()

    # ASE's calculator, on mdsens' relaxed structure, confirms convergence independently.
    check = res.system.to_ase()
    check.calc = AseLJ(sigma=SIGMA, epsilon=EPS, rc=rc, ro=ro, smooth=True)
    assert np.linalg.norm(check.get_forces(), axis=1).max() < fmax
    assert float(res.energy) == pytest.approx(check.get_potential_energy(), rel=1e-12, abs=0)

    # Two points with |F| < fmax on the same basin differ by at most ~|ΔF| / λ_min.
    lam = _smallest_nonzero_curvature(check, n_zero=3)
    dx_bound = 2 * fmax * np.sqrt(len(atoms)) / lam
    dx = _min_image(np.asarray(res.system.positions) - ase_atoms.positions, ase_atoms.cell.array)
    assert np.abs(dx).max() < dx_bound
    assert abs(float(res.energy) - e_ase) < 2 * len(atoms) * fmax**2 / lam


def test_lj13_agrees_with_ase_bfgs_in_ev_units():
    start = _lj13_start()
    rc, ro, fmax = 8.5, 6.8, 1e-6
    res = relax(start, LennardJones(sigma=SIGMA, epsilon=EPS, r_cutoff=rc, r_onset=ro), fmax=fmax)
    atoms = start.to_ase()
    atoms.calc = AseLJ(sigma=SIGMA, epsilon=EPS, rc=rc, ro=ro, smooth=True)
    assert BFGS(atoms, logfile=None).run(fmax=fmax, steps=2000)
    assert float(res.energy) == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
    # Free cluster: compare rotation-invariant geometry (all pair distances).
    pd = lambda R: np.sort(np.linalg.norm(R[:, None] - R[None], axis=-1).ravel())  # noqa: E731
    np.testing.assert_allclose(pd(np.asarray(res.system.positions)), pd(atoms.positions), atol=1e-4)


# ----------------------------------------------------------------- cell relaxation
@pytest.mark.parametrize("minimizer", ["fire", "lbfgs"])
def test_relax_cell_fcc_lattice_constant_matches_scalar_minimization(minimizer):
    rc, ro, fmax = 7.5, 6.0, 1e-7
    calc = AseLJ(sigma=SIGMA, epsilon=EPS, rc=rc, ro=ro, smooth=True)

    def e_of_a(a):  # independent truth: ASE energies of the perfect crystal vs a
        at = bulk("Ar", "fcc", a=a, cubic=True).repeat(3)
        at.calc = calc
        return at.get_potential_energy()

    a_ref = minimize_scalar(e_of_a, bracket=(5.1, 5.2, 5.4), tol=1e-10).x

    atoms = bulk("Ar", "fcc", a=5.40, cubic=True).repeat(3)
    atoms.positions += np.random.default_rng(0).normal(scale=0.02, size=atoms.positions.shape)
    res = relax(System.from_ase(atoms), LennardJones(sigma=SIGMA, epsilon=EPS, r_cutoff=rc, r_onset=ro),
                fmax=fmax, relax_cell=True, minimizer=minimizer)
    assert res.converged
    cell = np.asarray(res.system.cell)
    # The stress criterion (~3e-9 eV/Å³ here) against moduli ~1e-2 eV/Å³ leaves strains
    # of a few 1e-7: a to 1e-5 Å with a margin (at fmax = 1e-6 L-BFGS stopped at 1.07e-5),
    # shear components of the 15.8 Å cell to 1e-4 Å.
    np.testing.assert_allclose(np.diag(cell) / 3, a_ref, atol=1e-5)
    assert np.abs(cell - np.diag(np.diag(cell))).max() < 1e-4
    # ASE's stress (its own sign convention) confirms a stress-free cell.
    check = res.system.to_ase()
    check.calc = calc
    stress_tol = fmax * len(atoms) / check.get_volume()
    assert np.abs(check.get_stress()).max() < stress_tol
    np.testing.assert_allclose(np.asarray(res.stress), check.get_stress(), atol=1e-12)


def test_stillinger_weber_silicon_relaxes_to_published_crystal():
    """SW Si from a strained, sheared, rattled cell: a = 5.431 Å, E = -4.3366 eV/atom
    (Stillinger & Weber, Phys. Rev. B 31, 5262 (1985): E = -2ε with ε = 2.1683 eV)."""
    potentials = pytest.importorskip("mdsens.md.potentials")
    if not hasattr(potentials, "StillingerWeber"):
        pytest.skip("StillingerWeber not available yet")
    start = read(os.path.join(DATA, "si_diamond_2x2x2.vasp"))
    strain = np.array([[1.03, 0.01, 0.0], [0.01, 0.98, 0.0], [0.0, 0.0, 1.02]])
    start = start.replace(positions=start.positions @ strain, cell=start.cell @ strain)
    res = relax(start, potentials.StillingerWeber(), fmax=1e-5, relax_cell=True)
    assert res.converged
    cell = np.asarray(res.system.cell)
    np.testing.assert_allclose(cell, 2 * 5.431 * np.eye(3), atol=2 * 5e-4)
    assert float(res.energy) / start.n_atoms == pytest.approx(-4.3366, abs=1e-4)


# ------------------------------------------------------------------ failure modes
def test_not_converging_warns_and_says_so(lj13_relax):
    with pytest.warns(NotConvergedWarning, match="did not converge in 3 steps"):
        res = lj13_relax(_lj13_start(), fmax=1e-8, max_steps=3)
    assert res.converged is False and res.steps == 3 and res.fmax > 1e-8


def test_nan_forces_are_an_error():
    s = System(positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.8, 0.0, 0.0]], symbols=("Ar",))
    with pytest.raises(RelaxError, match="NaN"):
        relax(s, _exact_lj(), fmax=1e-6)


def test_bad_options_are_errors():
    with pytest.raises(OptionError, match="unknown minimizer"):
        relax(_lj13_start(), _exact_lj(), minimizer="bfgs")
    with pytest.raises(RelaxError, match="periodic"):
        relax(_lj13_start(), _exact_lj(), relax_cell=True)
    with pytest.raises(RelaxError, match="fmax"):
        relax(_lj13_start(), _exact_lj(), fmax=-1.0)
    with pytest.raises(OptionError, match="memory"):
        ms.LBFGS(memory=0)
    with pytest.raises(OptionError, match="armijo"):
        ms.LBFGS(armijo=0.7)


def test_already_relaxed_takes_zero_steps(lj13_relax):
    first = lj13_relax(_lj13_start(), fmax=1e-7)
    again = lj13_relax(first.system, fmax=1e-6)
    assert again.converged and again.steps == 0


# ------------------------------------------------------------------- neighbor lists
def test_neighbor_list_overflow_is_reallocated_not_truncated():
    """An expanded cluster contracts, so neighbor counts grow past a tight list."""
    from ase.cluster import Icosahedron

    atoms = Icosahedron("Ar", 3)  # 55 atoms
    atoms.positions *= 1.5
    atoms.positions += np.random.default_rng(1).normal(scale=0.1, size=atoms.positions.shape)
    s = System.from_ase(atoms)
    pot = LennardJones(sigma=SIGMA, epsilon=EPS, r_cutoff=8.5, r_onset=6.8)
    fn = make_relax(pot, s, neighbor_list=ms.NeighborListOptions(enabled=True, capacity_multiplier=1.0))
    res = fn(s, fmax=1e-6)
    assert fn.host.reallocations >= 1 and res.converged
    # Independent check of the final state: ASE's calculator (all pairs) agrees.
    check = res.system.to_ase()
    check.calc = AseLJ(sigma=SIGMA, epsilon=EPS, rc=8.5, ro=6.8, smooth=True)
    assert np.linalg.norm(check.get_forces(), axis=1).max() < 1e-6
    assert float(res.energy) == pytest.approx(check.get_potential_energy(), rel=1e-12)


def test_reuse_compiled_relax_with_new_params(lj13_relax):
    s = _lj13_start()
    fn = lj13_relax
    a = fn(s, fmax=1e-8)
    b = fn(s, params={**_exact_lj().params, "epsilon": jnp.asarray(2.0)}, fmax=1e-8)
    # E* is proportional to epsilon (exact scaling), positions unchanged.
    assert float(b.energy) == pytest.approx(2 * float(a.energy), rel=1e-10)


def test_progress_bar_can_be_forced_on(capsys, lj13_relax):
    lj13_relax(_lj13_start(), fmax=1e-6, progress=True)
    assert "relax N=13" in capsys.readouterr().err


# ------------------------------------------------------- pure, traceable minimizers
def test_pure_minimizers_jit_vmap_and_scaling_law():
    """With the cutoff tied to sigma, LJ is exactly scale invariant: x*(σ) = σ x*(1)
    and E*(ε) = ε E*(1). vmap over parameter sets under jit must reproduce that."""
    s = _lj13_start()
    pot = LennardJones(sigma=1.0, epsilon=1.0)  # r_cutoff = 3 sigma, tied
    E = pot.energy_fn(s, neighbor_list=False)
    sig = jnp.array([3.2, 3.4, 3.7])
    eps = jnp.array([0.5, 1.0, 2.0])
    x0 = s.positions / SIGMA

    for minimize in (fire_minimize, lbfgs_minimize, gradient_descent_minimize):

        @jax.jit
        def run(sigma, epsilon):
            params = {**pot.params, "sigma": sigma, "epsilon": epsilon}
            out = minimize(E, x0 * sigma, params, None, fmax=1e-9, max_steps=5000)
            return out, E(out.positions, params, None)

        out, energy = jax.vmap(run)(sig, eps)
        assert np.all(np.asarray(out.fmax) < 1e-9) and np.all(np.asarray(out.steps) > 0)
        np.testing.assert_allclose(np.asarray(energy / eps), float(energy[1] / eps[1]), rtol=1e-11)
        pd = lambda R: np.sort(np.linalg.norm(R[:, None] - R[None], axis=-1).ravel())  # noqa: E731
        ref = pd(np.asarray(out.positions[1])) / 3.4
        for k in (0, 2):
            np.testing.assert_allclose(pd(np.asarray(out.positions[k])) / float(sig[k]), ref, atol=1e-8)


def test_lbfgs_line_search_on_rosenbrock():
    """Rosenbrock's valley (minimum (1, 1), closed form) needs backtracking and skipped
    curvature pairs; L-BFGS must still land on the minimum, and count its trials."""
    def rosenbrock(X, params, cell=None, neighbor=None):
        x, y = X[0]
        return (params["a"] - x) ** 2 + params["b"] * (y - x**2) ** 2

    params = {"a": jnp.asarray(1.0), "b": jnp.asarray(100.0)}
    X0 = jnp.array([[-1.2, 1.0]])
    out = jax.jit(lambda X: lbfgs_minimize(rosenbrock, X, params, fmax=1e-10, max_steps=500,
                                           options=ms.LBFGS(maxstep=1.0)))(X0)
    assert float(out.fmax) < 1e-10 and 10 < int(out.steps) < 200
    np.testing.assert_allclose(np.asarray(out.positions), [[1.0, 1.0]], atol=1e-9)

    init, step = lbfgs(positions_problem(rosenbrock, periodic=False), ms.LBFGS(maxstep=1.0))
    state = run(step, init(X0, params, None, None), params, None, 1e-10, jnp.inf, 500)
    # one evaluation at the start, at least one per step, and some backtracks on the valley
    assert int(state.inner.evaluations) > int(state.step) + 1


def test_lbfgs_needs_fewer_force_calls_than_fire_on_a_crystal():
    """The reason L-BFGS exists here: on a perturbed fcc vacancy it converges to the same
    minimum (energies equal to round-off) with several times fewer force evaluations."""
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(2)
    del atoms[0]
    atoms.positions += np.random.default_rng(3).normal(scale=0.05, size=atoms.positions.shape)
    s = System.from_ase(atoms)
    pot = LennardJones(sigma=SIGMA, epsilon=EPS, r_cutoff=5.2, r_onset=4.5)
    fire = relax(s, pot, fmax=1e-9, minimizer="fire")
    quasi_newton = relax(s, pot, fmax=1e-9, minimizer=ms.LBFGS(memory=20))
    assert fire.converged and quasi_newton.converged
    assert float(quasi_newton.energy) == pytest.approx(float(fire.energy), abs=1e-12)
    assert 3 * quasi_newton.steps < fire.steps


def test_gradient_descent_map_fixed_point(lj13_relax):
    s = _lj13_start()
    pot = _exact_lj()
    res = lj13_relax(s, fmax=1e-9)
    T = gradient_descent_map(pot.energy_fn(s), 0.05)
    x = res.system.positions
    # |T(x*) - x*| = η |∇E(x*)| <= η fmax.
    assert float(jnp.max(jnp.linalg.norm(T(x, pot.params) - x, axis=1))) <= 0.05 * 1e-9


def test_compiled_relax_is_reused_with_cell_lists():
    """Cell-list neighbor lists carry jax-md metadata (cell_size array, a fresh cell-list
    closure per allocation) that used to break or defeat the compile cache on a second
    call; the second call must neither fail nor recompile."""
    rc, ro, fmax = 4.5, 4.0, 1e-6  # short range: the 21 Å box is >= 4 list radii wide
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(4)
    del atoms[0]
    atoms.positions += np.random.default_rng(5).normal(scale=0.03, size=atoms.positions.shape)
    s = System.from_ase(atoms)
    pot = LennardJones(sigma=SIGMA, epsilon=EPS, r_cutoff=rc, r_onset=ro)
    fn = make_relax(pot, s, neighbor_list=True)
    first = fn(s, fmax=fmax)
    compiled = fn.host._compiled + (fn.host._evaluate,)
    # (A fresh list for the final confirmation may have another capacity: a new shape.)
    sizes = tuple(f._cache_size() for f in compiled)
    second = fn(s, fmax=fmax)
    assert first.converged and second.converged
    assert tuple(f._cache_size() for f in compiled) == sizes
    check = second.system.to_ase()
    check.calc = AseLJ(sigma=SIGMA, epsilon=EPS, rc=rc, ro=ro, smooth=True)
    assert np.linalg.norm(check.get_forces(), axis=1).max() < fmax
