"""Embedded-atom method (``mdsens.md.potentials.eam``) against independent truths.

* The spline: SciPy's ``InterpolatedUnivariateSpline(k=3)`` (the interpolant ASE uses).
* Files: ASE's ``EAM`` calculator reading the same setfl / eam/fs / funcfl file (energy,
  forces, stress). ASE splines ``φ`` where mdsens (like LAMMPS) splines ``r·φ``: the two
  differ by the interpolation error ``O(dr⁴ φ⁗)``, measured 5e-14 (energy), 3e-10
  (forces) relative at dr = 1.06e-3 Å, so tolerances are 1e-10 / 1e-8. The ``F`` and
  ``ρ`` splines are the same function as ASE's, to round-off.
* The analytic Zhou–Johnson–Wadley form: the fitted fcc values of Phys. Rev. B 69, 144113
  (2004) (a = √2 r_e: Cu 3.615 Å, Ni 3.52 Å, Al 4.05 Å; cohesive energies Cu 3.54 eV, Ni
  4.45 eV), from an energy-vs-lattice scan (and, slow, ``ms.relax(relax_cell=True)``).
* Forces and stress against 5-point finite differences of the energy. EAM energies leave
  Hessian products to autodiff (their dense per-atom blocks do not pay); the local-energy
  contract still holds: the base class's blocks against autodiff on every pair (slow).
* ``ms.sensitivity`` w.r.t. one Zhou parameter: ⟨u, J v⟩ forward (sensitivity) and
  reverse (``observable_gradient``), and central differences of re-relaxations (slow).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk
from scipy.interpolate import InterpolatedUnivariateSpline

import mdsens as ms
from mdsens.md import neighbors
from mdsens.md.potentials.base import CutoffError, ParameterError, Potential, SpeciesError
from mdsens.md.potentials.eam import (
    EAM,
    FUNCFL_PAIR_UNIT,
    ZHOU_2004,
    ZHOU_FIELDS,
    ZhouEAM,
    spline_coefficients,
    spline_values,
)
from mdsens.md.strain import energy_forces_stress


# ----------------------------------------------------------------------------- helpers
def fcc(symbol="Cu", a=3.615, reps=3, vacancy=True, rattle=0.05, seed=1, alloy=None):
    """Cubic fcc supercell, optionally without atom 0, rattled; ``alloy`` = second element
    on a random half of the sites."""
    atoms = bulk(symbol, "fcc", a=a, cubic=True).repeat(reps)
    if vacancy:
        del atoms[0]
    if alloy is not None:
        rng = np.random.default_rng(seed)
        symbols = np.array(atoms.get_chemical_symbols())
        symbols[rng.permutation(len(atoms))[: len(atoms) // 2]] = alloy
        atoms.set_chemical_symbols(symbols.tolist())
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


def evaluate(pot, atoms):
    """Energy (eV), forces (eV/Å), Voigt stress (eV/Å³, ASE sign): one jitted pass."""
    system = ms.System.from_ase(atoms)
    E = pot.energy_fn(system)
    e, f, s = jax.jit(lambda R, p, c: energy_forces_stress(E, R, p, c))(system.positions, pot.params, system.cell)
    return float(e), np.asarray(f), np.asarray(s)


def ase_results(atoms, calc):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()


def assert_same(mine, theirs, e_tol, f_tol, s_tol):
    (e, f, s), (ea, fa, sa) = mine, theirs
    assert abs(e - ea) <= e_tol * abs(ea), (e, ea)
    assert np.abs(f - fa).max() <= f_tol * np.abs(fa).max(), np.abs(f - fa).max()
    assert np.abs(s - sa).max() <= s_tol * np.abs(sa).max(), (s, sa)


def fd5(f, h):
    return (-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h)


# ----------------------------------------------------------------------------- splines
def test_spline_is_scipys_not_a_knot_interpolant():
    step, n = 0.1, 40
    x = step * np.arange(n)
    rng = np.random.default_rng(0)
    tables = np.stack([np.sin(1.3 * x) * np.exp(-x / 3), x**3 - 2 * x, rng.normal(size=n)])
    coef = spline_coefficients(tables, step)
    xs = np.linspace(-0.3, x[-1] + 0.3, 501)  # also outside: the end cubics continue
    values_and_slopes = jax.jit(jax.vmap(jax.value_and_grad(lambda t, k: spline_values(coef, step, t, k)),
                                         in_axes=(0, None)))
    for k, y in enumerate(tables):
        ref = InterpolatedUnivariateSpline(x, y, k=3)
        got, slope = values_and_slopes(jnp.asarray(xs), k)
        np.testing.assert_allclose(got, ref(xs), rtol=0, atol=1e-12 * np.abs(y).max())
        np.testing.assert_allclose(slope, ref.derivative()(xs), rtol=0, atol=1e-10 * np.abs(y).max() / step)
    # a cubic is reproduced exactly; the coefficients are linear in the table values
    np.testing.assert_allclose(values_and_slopes(jnp.asarray(xs), 1)[0], xs**3 - 2 * xs, atol=1e-12)
    tangent = jax.jvp(lambda t: spline_coefficients(t, step), (jnp.asarray(tables),), (jnp.asarray(tables),))[1]
    np.testing.assert_allclose(tangent, coef, rtol=1e-13, atol=1e-15)


def zhou_numpy(p, q):
    """The paper's formulas in NumPy for elements with parameter dicts ``p``, ``q``:
    ``(f_p, φ_pp, φ_pq, F_p)``."""
    def f(e, r):
        return e["fe"] * np.exp(-e["beta"] * (r / e["re"] - 1)) / (1 + (r / e["re"] - e["lam"]) ** 20)

    def phi(e, r):
        x = r / e["re"]
        return (e["A"] * np.exp(-e["alpha"] * (x - 1)) / (1 + (x - e["kappa"]) ** 20)
                - e["B"] * np.exp(-e["beta"] * (x - 1)) / (1 + (x - e["lam"]) ** 20))

    def mixed(r):
        return 0.5 * (f(q, r) / f(p, r) * phi(p, r) + f(p, r) / f(q, r) * phi(q, r))

    def F(rho):
        rn, r0 = 0.85 * p["rhoe"], 1.15 * p["rhoe"]
        low = sum(p[f"Fn{i}"] * (rho / rn - 1) ** i for i in range(4))
        mid = sum(p[f"F{i}"] * (rho / p["rhoe"] - 1) ** i for i in range(4))
        y = rho / p["rhos"]
        with np.errstate(divide="ignore", invalid="ignore"):  # log 0 in the unused branch
            high = p["Fe"] * (1 - p["eta"] * np.log(y)) * y ** p["eta"]
        return np.where(rho < rn, low, np.where(rho < r0, mid, high))

    return (lambda r: f(p, r)), (lambda r: phi(p, r)), mixed, F


def test_zhou_functions_are_the_papers():
    pot = ZhouEAM(("Cu", "Ni"), r_cutoff=6.4, r_onset=6.0)
    f, phi, mixed, F = zhou_numpy(ZHOU_2004["Cu"], ZHOU_2004["Ni"])
    r = np.linspace(1.8, 5.9, 23)  # below the switch
    np.testing.assert_allclose(pot.density_fn("Cu", host="Ni")(r), f(r), rtol=1e-13)
    np.testing.assert_allclose(pot.pair_fn("Cu")(r), phi(r), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pot.pair_fn("Cu", "Ni")(r), mixed(r), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pot.pair_fn("Ni", "Cu")(r), mixed(r), rtol=1e-12, atol=1e-15)
    rhoe = ZHOU_2004["Cu"]["rhoe"]
    rho = np.concatenate([np.linspace(0.0, 2.0 * rhoe, 41), [0.85 * rhoe, 1.15 * rhoe]])
    np.testing.assert_allclose(pot.embedding_fn("Cu")(rho), F(rho), rtol=1e-13, atol=1e-13)
    # the fit is continuous in F and F' where the branches meet, and F(0) = 0
    dF = jax.vmap(jax.grad(pot.embedding_fn("Cu")))
    for knot in (0.85 * rhoe, 1.15 * rhoe):
        sides = jnp.asarray([knot * (1 - 1e-9), knot * (1 + 1e-9)])
        assert abs(np.diff(F(np.asarray(sides)))[0]) < 1e-5
        assert abs(np.diff(np.asarray(dF(sides)))[0]) < 1e-5
    assert abs(float(pot.embedding_fn("Cu")(0.0))) < 1e-6
    # nothing beyond r_cutoff
    r_far = jnp.asarray([6.41, 7.0])
    assert np.all(np.asarray(pot.pair_fn("Cu", "Ni")(r_far)) == 0)
    assert np.all(np.asarray(pot.density_fn("Ni")(r_far)) == 0)


# ----------------------------------------------------------------------------- files vs ASE
@pytest.fixture(scope="module")
def cu_setfl(tmp_path_factory):
    """The analytic Zhou Cu, cut off smoothly at 4.9–5.3 Å (fits a 3×3×3 cell), as setfl."""
    zhou = ZhouEAM("Cu", r_cutoff=5.3, r_onset=4.9)
    path = zhou.tabulate(nr=5000, nrho=2000).write(tmp_path_factory.mktemp("eam") / "Cu_zhou04.eam.alloy")
    return zhou, path


def test_setfl_matches_ase_and_the_analytic_form(cu_setfl, tmp_path):
    from ase.calculators.eam import EAM as AseEAM

    zhou, path = cu_setfl
    pot = EAM.from_file(path)
    assert pot.kind == "eam/alloy" and pot.symbols == ("Cu",) and pot.cutoff() == 5.3
    again = EAM.from_file(pot.write(tmp_path / "again.eam.alloy"))  # written with 17 digits
    for key in pot.params:
        np.testing.assert_array_equal(again.params[key], pot.params[key])
    atoms = fcc()  # rattled Cu, 3×3×3 cells, one vacancy
    mine = evaluate(pot, atoms)
    assert_same(mine, ase_results(atoms, AseEAM(potential=str(path))), 1e-10, 1e-8, 1e-8)
    # the table is the analytic potential, up to the spline's interpolation error
    assert_same(mine, evaluate(zhou, atoms), 1e-10, 1e-8, 1e-8)


@pytest.mark.slow
def test_fs_and_funcfl_match_ase(tmp_path):
    from ase.calculators.eam import EAM as AseEAM
    from ase.units import Bohr, Hartree

    # eam/fs: Cu–Ni with asymmetric cross densities (a Cu atom at a Ni host differs from
    # a Ni atom at a Cu host), which only the fs format carries
    tab = ZhouEAM(("Cu", "Ni"), r_cutoff=5.2, r_onset=4.8).tabulate(nr=5000, nrho=2000, kind="eam/fs")
    rho = np.array(tab.params["rho"])
    rho[0, 1] *= 1.2  # Cu atom -> Ni host
    rho[1, 0] *= 0.9  # Ni atom -> Cu host
    params = dict(tab.params, rho=jnp.asarray(rho))
    path = tab.write(tmp_path / "CuNi.eam.fs", params=params)
    pot = EAM.from_file(path)
    atoms = fcc("Cu", a=3.56, alloy="Ni")
    mine = evaluate(pot, atoms)
    assert_same(mine, ase_results(atoms, AseEAM(potential=str(path))), 1e-10, 1e-8, 1e-8)
    swapped = evaluate(EAM.from_file(tab.write(tmp_path / "sym.eam.fs")), atoms)
    assert abs(swapped[0] - mine[0]) > 1e-3  # the asymmetry matters (guards the index order)

    # funcfl: a synthetic one-element table (Z(r) > 0: a purely repulsive pair term)
    nr, dr, nrho, drho, rc = 3000, 5.0 / 2999, 2000, 0.02, 5.0
    r, rho_grid = dr * np.arange(nr), drho * np.arange(nrho)
    x = np.clip((r - 4.6) / (rc - 4.6), 0.0, 1.0)
    switch = 1.0 - x**3 * (10.0 - 15.0 * x + 6.0 * x**2)  # C² from 1 at 4.6 Å to 0 at rc
    tables = {"F": (-2.9 * (rho_grid / 20.0) * (2.0 - rho_grid / 20.0))[None],
              "Z": (11.0 * np.exp(-1.6 * r) * switch)[None],
              "rho": (1.6 * np.exp(-4.3 * (r / 2.55 - 1.0)) * switch)[None]}
    funcfl = EAM(tables, symbols=("Cu",), drho=drho, dr=dr, cutoff=rc, kind="eam",
                 masses=[63.546], lattice_constants=[3.615], lattice_types=["fcc"])
    path = funcfl.write(tmp_path / "Cu_synthetic.eam")
    pot = EAM.from_file(path)
    assert pot.kind == "eam" and pot.symbols == ("Cu",)
    calc = AseEAM(potential=str(path))
    # ASE converts Z with CODATA Hartree·Bohr; LAMMPS (and mdsens) with 27.2·0.529
    calc.rphi_data *= FUNCFL_PAIR_UNIT / (Hartree * Bohr)
    calc.set_splines()
    atoms = fcc("Cu", a=3.615)
    assert_same(evaluate(pot, atoms), ase_results(atoms, calc), 1e-10, 1e-8, 1e-8)


# ----------------------------------------------------------------------------- published values
def test_zhou_reproduces_published_lattice_constants_and_cohesive_energies():
    from scipy.optimize import minimize_scalar

    # One compiled energy for the three elements: the parameters are call-time arguments.
    # Range 6.6–6.9 Å (< half of the smallest 4×4×4 cell, Ni's 7.04 Å) keeps every shell
    # that matters (the functions fall below 1e-7 there).
    pot = ZhouEAM("Cu", r_cutoff=6.9, r_onset=6.6)
    atoms = fcc("Cu", a=3.615, reps=4, vacancy=False, rattle=0.0)
    system = ms.System.from_ase(atoms)
    E = jax.jit(pot.energy_fn(system, neighbor_list=False))  # no list to rebuild as the lattice scales
    R0, C0, n = np.asarray(system.positions), np.asarray(system.cell), len(atoms)

    def per_atom(a, params):
        return float(E(R0 * a / 3.615, params, C0 * a / 3.615)) / n

    published = {"Cu": (3.615, 3.54), "Ni": (3.52, 4.45), "Al": (4.05, None)}
    for element, (a_pub, ec_pub) in published.items():
        params = {k: jnp.asarray([ZHOU_2004[element][k]]) for k in ZHOU_FIELDS}
        guess = np.sqrt(2) * ZHOU_2004[element]["re"]
        best = minimize_scalar(lambda a: per_atom(a, params), bracket=(0.98 * guess, guess, 1.02 * guess),
                               tol=1e-10)
        assert abs(best.x - a_pub) < 1e-3, (element, best.x)
        assert abs(best.x - guess) < 1e-5, (element, best.x)  # the fit put the minimum at √2 r_e
        if ec_pub is not None:
            assert abs(-best.fun - ec_pub) < 1e-3, (element, -best.fun)


@pytest.mark.slow
def test_relax_cell_reaches_the_published_copper_lattice():
    pot = ZhouEAM("Cu")  # default range 2.3–2.5 r_e
    atoms = fcc("Cu", a=3.58, reps=4, vacancy=False, rattle=0.0)
    res = ms.relax(ms.System.from_ase(atoms), pot, relax_cell=True, fmax=1e-8)
    assert res.converged
    cell = np.asarray(res.system.cell) / 4
    np.testing.assert_allclose(cell, np.eye(3) * 3.615, atol=1e-3)
    assert abs(float(res.energy) / len(atoms) + 3.54) < 1e-3


# ----------------------------------------------------------------------------- derivatives
@pytest.fixture(scope="module")
def cuni():
    """Zhou Cu–Ni alloy, nearest neighbors only (range 3.0–3.4 Å fits a 2×2×2 cell), a
    rattled vacancy cell whose pairs sample the switch."""
    pot = ZhouEAM(("Cu", "Ni"), r_cutoff=3.4, r_onset=3.0)
    return pot, ms.System.from_ase(fcc("Cu", a=3.56, reps=2, alloy="Ni", rattle=0.08, seed=3))


def test_forces_and_stress_are_energy_derivatives(cuni):
    pot, system = cuni
    E = pot.energy_fn(system, neighbor_list=False)
    R, C, p = np.asarray(system.positions), np.asarray(system.cell), pot.params
    efs = jax.jit(lambda R, p, c: energy_forces_stress(E, R, p, c))  # one program for all
    _, f, s = (np.asarray(x) for x in efs(R, p, C))
    h, tol = 1e-4, 1e-8
    for i, a in ((0, 0), (5, 1), (17, 2), (30, 0)):
        def shifted(t, i=i, a=a):
            Rt = R.copy()
            Rt[i, a] += t
            return float(efs(Rt, p, C)[0])

        assert abs(-fd5(shifted, h) - f[i, a]) < tol * np.abs(f).max()
    V = abs(np.linalg.det(C))
    for k, (a, b) in enumerate([(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]):
        def strained(t, a=a, b=b):
            eps = np.zeros((3, 3))
            eps[a, b] = eps[b, a] = t
            return float(efs(R @ (np.eye(3) + eps), p, C @ (np.eye(3) + eps))[0])

        assert abs(fd5(strained, h) / V / (1.0 if a == b else 2.0) - s[k]) < tol * np.abs(s).max()


def _local_blocks_match_autodiff(pot, system, use_list):
    """The local-energy contract: Hessian products from the base class's per-atom blocks
    (pairs within the cutoff) equal forward-over-reverse autodiff on every pair (the
    full list, or all pairs)."""
    R, cell, p = system.positions, system.cell, pot.params
    full = neighbors.indices_only(pot.neighbor_list(system)) if use_list else None
    tight = neighbors.interacting_neighbors(system, pot.cutoff(), full)
    E = Potential.energy_fn(pot, system, neighbor_list=use_list)  # the generic blocks, not EAM's opt-out
    V = jax.random.normal(jax.random.PRNGKey(3), (2,) + R.shape, jnp.float64)
    grad = jax.grad(E)

    @jax.jit
    def both(R, V, p, c, full, tight):
        reference = jax.vmap(lambda v: jax.jvp(lambda x: grad(x, p, c, full), (R,), (v,))[1])(V)
        blocks = E.hessian_products(R, p, c, tight)
        assert blocks is not None  # the per-atom blocks, not the autodiff fallback
        return reference, jax.vmap(blocks)(V)

    reference, products = both(R, V, p, cell, full, tight)
    reference = np.asarray(reference)
    assert np.abs(reference).max() > 0
    assert np.abs(np.asarray(products) - reference).max() <= 1e-10 * np.abs(reference).max()


def test_hessian_products_come_from_autodiff(cuni):
    # EAM opts out of the per-atom blocks (dense (Md)² blocks cost more than autodiff)
    pot, system = cuni
    E = pot.energy_fn(system, neighbor_list=False)
    tight = neighbors.interacting_neighbors(system, pot.cutoff())
    for hook in ("hessian_products", "gradient_and_hessian_blocks"):
        if hasattr(E, hook):
            assert getattr(E, hook)(system.positions, pot.params, system.cell, tight) is None


@pytest.mark.slow
def test_local_energy_contract_blocks_match_autodiff():
    pot = ZhouEAM(("Cu", "Ni"), r_cutoff=3.4, r_onset=3.0)
    system = ms.System.from_ase(fcc("Cu", a=3.56, reps=2, alloy="Ni", rattle=0.08, seed=3))
    _local_blocks_match_autodiff(pot, system, use_list=False)


@pytest.mark.slow
def test_local_energy_contract_blocks_match_autodiff_tabulated(cu_setfl):
    _, path = cu_setfl
    _local_blocks_match_autodiff(EAM.from_file(path), ms.System.from_ase(fcc()), use_list=True)


@pytest.fixture(scope="module")
def cu_vacancy_relaxed():
    pot = ZhouEAM("Cu", r_cutoff=3.4, r_onset=3.0)
    res = ms.relax(ms.System.from_ase(fcc("Cu", reps=2, rattle=0.03)), pot, fmax=1e-11)
    assert res.converged
    return pot, res


@pytest.mark.slow  # ~70 s CPU, mostly compiling the relaxation and derivative programs
def test_sensitivity_forward_equals_reverse(cu_vacancy_relaxed):
    pot, res = cu_vacancy_relaxed
    S = ms.sensitivity(res, pot, wrt=["beta"])
    assert S.names == ("beta[0]",)
    u = jnp.asarray(np.random.default_rng(5).normal(size=res.system.positions.shape))
    forward = float(jnp.sum(u * S.dpositions[0]))
    reverse = float(ms.observable_gradient(res, pot, lambda R, p, c: jnp.sum(u * R))["beta"][0])
    assert abs(forward) > 1e-3
    np.testing.assert_allclose(forward, reverse, rtol=1e-9)
    np.testing.assert_allclose(S.denergy, S.denergy_partial, rtol=1e-8)  # envelope theorem


@pytest.mark.slow
def test_sensitivity_against_finite_difference_relaxations(cu_vacancy_relaxed):
    pot, res = cu_vacancy_relaxed
    S = ms.sensitivity(res, pot, wrt=["beta"])
    h, out = 1e-4, []
    for sign in (1, -1):
        params = dict(pot.params, beta=pot.params["beta"] + sign * h)
        r = ms.relax(res.system, pot, params=params, fmax=1e-12)
        assert r.converged
        out.append((np.asarray(r.system.positions), float(r.energy)))
    cell = np.asarray(res.system.cell)
    frac = (out[0][0] - out[1][0]) @ np.linalg.inv(cell)
    fd = (frac - np.round(frac)) @ cell / (2 * h)
    fd -= fd.mean(0)  # the derivative's gauge: no net translation
    np.testing.assert_allclose(S.dpositions[0], fd, atol=1e-5 * np.abs(fd).max())
    np.testing.assert_allclose(S.denergy[0], (out[0][1] - out[1][1]) / (2 * h), rtol=1e-6)


@pytest.mark.slow
def test_elastic_constants_are_energy_second_derivatives():
    pot = ZhouEAM("Cu", r_cutoff=5.3, r_onset=4.9)
    system = ms.System.from_ase(fcc("Cu", a=3.615, reps=3, vacancy=False, rattle=0.0))
    C = ms.elastic_constants(system, pot)
    # a Bravais lattice has no internal relaxation
    np.testing.assert_allclose(C.relaxed, C.clamped, atol=1e-8 * np.abs(C.clamped).max())
    energy = jax.jit(pot.energy_fn(system))
    R, cell, p = np.asarray(system.positions), np.asarray(system.cell), pot.params
    V = abs(np.linalg.det(cell))
    pairs = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]

    def E(strain):  # Voigt strain, engineering shear
        eps = np.zeros((3, 3))
        for (a, b), t in zip(pairs, strain):
            eps[a, b] = eps[b, a] = t if a == b else t / 2
        return float(energy(R @ (np.eye(3) + eps), p, cell @ (np.eye(3) + eps)))

    h = 1e-3
    for I, J in ((0, 0), (3, 3), (0, 1)):
        def e(s, t):
            strain = np.zeros(6)
            strain[I] += s
            strain[J] += t
            return E(strain)

        if I == J:
            fd = (-e(2 * h, 0) + 16 * e(h, 0) - 30 * e(0, 0) + 16 * e(-h, 0) - e(-2 * h, 0)) / (12 * h * h)
        else:  # the mixed central difference is second order: Richardson-extrapolate it
            def mixed(k):
                return (e(k, k) - e(k, -k) - e(-k, k) + e(-k, -k)) / (4 * k * k)

            fd = (4 * mixed(h / 2) - mixed(h)) / 3
        assert abs(fd / V - C.clamped[I, J]) < 1e-6 * np.abs(C.clamped).max(), (I, J, fd / V, C.clamped[I, J])
    c11, c12, c44 = C.relaxed[0, 0], C.relaxed[0, 1], C.relaxed[3, 3]
    assert c11 > c12 > 0 and c44 > 0  # a stable cubic crystal
    np.testing.assert_allclose(np.diag(C.relaxed)[:3], c11, rtol=1e-8)


# ----------------------------------------------------------------------------- errors
def test_clear_errors(cu_setfl, tmp_path):
    _, path = cu_setfl
    pot = EAM.from_file(path)
    ni = ms.System.from_ase(fcc("Ni", a=3.52))
    with pytest.raises(SpeciesError, match="Ni"):
        pot.energy(ni)
    with pytest.raises(SpeciesError, match="Xx"):
        ZhouEAM(("Cu", "Xx"))
    with pytest.raises(CutoffError, match="repeat"):
        ZhouEAM("Cu").energy(ms.System.from_ase(fcc(reps=2)))  # range 6.39 Å > 3.615 Å
    lines = path.read_text().splitlines()
    broken = {
        "truncated.eam.alloy": "\n".join(lines[:-40]),
        "extra.eam.alloy": "\n".join(lines + ["1.0 2.0"]),
        "word.eam.alloy": "\n".join(lines[:6] + ["1.0 nan-ish 2.0"] + lines[7:]),
        "grid.eam.alloy": "\n".join(lines[:4] + ["2 0.1 2 0.1 5.0"] + lines[5:]),
        "header.eam.alloy": "\n".join(lines[:3] + ["Cu"] + lines[4:]),
    }
    for name, text in broken.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ParameterError, match=name):
            EAM.from_file(tmp_path / name)
    with pytest.raises(ParameterError, match="unknown file kind"):
        EAM.from_file(path, kind="tersoff")
    (tmp_path / "potential.txt").write_text(path.read_text())
    with pytest.raises(ParameterError, match="kind="):
        EAM.from_file(tmp_path / "potential.txt")
    with pytest.raises(ms.MissingFileError):
        EAM.from_file(tmp_path / "absent.eam.alloy")
    with pytest.raises(ParameterError, match="r_onset < r_cutoff"):
        ZhouEAM("Cu", r_cutoff=4.0, r_onset=4.5)
    with pytest.raises(ParameterError, match="'re'"):
        zhou = ZhouEAM("Cu")
        zhou.energy(ni.replace(symbols=("Cu",)), params=dict(zhou.params, re=jnp.asarray([-1.0])))
