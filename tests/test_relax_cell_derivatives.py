"""Derivatives through ``relax(..., relax_cell=True)``: the cell response to parameters.

Independent truths, never the code itself:

* exact scaling laws. A potential whose every length (σ's, cutoffs) scales with one
  factor λ has E(λR, λcell; λ·lengths) = E(R, cell; lengths), and E ∝ ε: so the relaxed
  cell and positions scale with λ (d cell*/dλ = cell*, dR*/dλ = R* mod translation),
  the relaxed energy does not change with λ, and dE*/dε = E*/ε with the structure fixed.
  Stillinger–Weber (cutoff aσ) and Lennard-Jones with (σ, r_cutoff, r_onset) scaled
  together are such potentials. The relaxed stress is zero for every parameter, so its
  derivative is zero;
* fourth-order central finite differences of re-relaxations (relax_cell=True, tight fmax/stress_tol)
  for a parameter that changes the structure non-trivially (a binary LJ crystal whose
  cell relaxes anisotropically);
* forward and reverse mode are transposes of each other.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk

import mdsens as ms
from mdsens import relax
from mdsens.md.potentials import LennardJones, StillingerWeber

FMAX = 1e-10  # eV/Å
STRESS_TOL = 1e-12  # eV/Å³
LENGTHS = ("sigma", "r_cutoff", "r_onset")


def _outputs(result):
    return dict(positions=result.system.positions, cell=result.system.cell, energy=result.energy,
                stress=result.stress, forces=result.forces)


def _along(jac, direction):
    """Contract a jacfwd leaf ``(*out, *param)`` with a parameter direction ``(*param)``."""
    d = np.asarray(direction)
    return np.tensordot(np.asarray(jac), d, axes=d.ndim)


def _scale_direction(params, keys):
    """The tangent ``d params/dλ`` of ``params[k] → λ params[k]`` for ``k`` in keys."""
    return {k: (v if k in keys else jnp.zeros_like(v)) for k, v in params.items()}


# ------------------------------------------------------------------ binary LJ crystal
@pytest.fixture(scope="module")
def lj_binary():
    """Random 50/50 Ar/Kr fcc crystal (108 atoms), sheared start; relaxed cell is triclinic."""
    atoms = bulk("Ar", "fcc", a=5.30, cubic=True).repeat(3)
    rng = np.random.default_rng(0)
    atoms.set_chemical_symbols(list(np.array(["Ar", "Kr"])[rng.permutation(np.arange(108) % 2)]))
    atoms.set_cell(atoms.cell @ np.array([[1.01, 0.01, 0.0], [0.01, 0.99, 0.0], [0.0, 0.0, 1.0]]),
                   scale_atoms=True)
    pot = LennardJones(sigma={"Ar": 3.40, "Kr": 3.60}, epsilon={"Ar": 0.0104, "Kr": 0.0140},
                       r_cutoff=7.5, r_onset=6.0)
    start = ms.System.from_ase(atoms)
    res = relax(start, pot, fmax=FMAX, stress_tol=STRESS_TOL, relax_cell=True, progress=False)
    assert res.converged
    # start the derivatives from the relaxed structure (its cell is the reference cell0)
    return pot, res.system, res


def _lj_relax(system, pot, params):
    return relax(system, pot, params=params, fmax=FMAX, stress_tol=STRESS_TOL, relax_cell=True)


@pytest.fixture(scope="module")
def lj_jacobian(lj_binary):
    pot, system, _ = lj_binary
    return jax.jacfwd(lambda p: _outputs(_lj_relax(system, pot, p)))(pot.params)


@pytest.mark.slow  # ~45 s with its fixture; the refusals stay in the default suite
def test_lj_scaling_laws_forward_mode(lj_binary, lj_jacobian):
    pot, system, res = lj_binary
    J, p = lj_jacobian, pot.params
    cell = np.asarray(res.system.cell)
    R = np.asarray(res.system.positions)
    E = float(res.energy)
    assert np.abs(cell - np.diag(np.diag(cell))).max() > 1e-3  # anisotropic: not trivial

    lam = _scale_direction(p, LENGTHS)
    d = {k: sum(_along(J[k][name], lam[name]) for name in lam) for k in J}
    np.testing.assert_allclose(d["cell"], cell, atol=1e-8 * np.abs(cell).max())
    expected = R - R.mean(0)  # the gauge: no net translation
    np.testing.assert_allclose(d["positions"], expected, atol=1e-8 * np.abs(expected).max())
    assert abs(d["energy"]) < 1e-9 * abs(E)
    # stress and forces stay zero along the relaxed branch
    assert np.abs(d["stress"]).max() < 1e-8 * abs(E) / abs(np.linalg.det(cell))
    assert np.abs(d["forces"]).max() < 1e-9 * abs(E)

    eps = _scale_direction(p, ("epsilon",))
    d = {k: sum(_along(J[k][name], eps[name]) for name in eps) for k in J}
    np.testing.assert_allclose(d["energy"], E, rtol=1e-9)
    np.testing.assert_allclose(d["cell"], 0.0, atol=1e-9 * np.abs(cell).max())
    np.testing.assert_allclose(d["positions"], 0.0, atol=1e-9 * np.abs(R).max())

    # the cell derivative has no rigid rotation: cell0⁻¹ dcell is symmetric
    for k in ("sigma", "epsilon"):
        G = np.einsum("ab,bcij->acij", np.linalg.inv(np.asarray(system.cell)), np.asarray(J["cell"][k]))
        np.testing.assert_allclose(G, np.swapaxes(G, 0, 1), atol=1e-10 * np.abs(G).max())


@pytest.mark.slow  # ~60 s
def test_lj_reverse_mode_closed_forms_and_forward_equals_reverse(lj_binary, lj_jacobian):
    pot, system, res = lj_binary
    p = pot.params
    rng = np.random.default_rng(1)
    u = {k: jnp.asarray(rng.normal(size=np.shape(v))) for k, v in _outputs(res).items()}
    u["energy"] = jnp.asarray(1.0)

    def loss(params):
        out = _outputs(_lj_relax(system, pot, params))
        return sum(jnp.vdot(u[k], out[k]) for k in out)

    g = jax.grad(loss)(p)
    cell = np.asarray(res.system.cell)
    R = np.asarray(res.system.positions)
    E = float(res.energy)
    # closed forms: along λ (all lengths) the loss moves by ⟨u_cell, cell*⟩ + ⟨u_R, R* − R̄*⟩
    lam = _scale_direction(p, LENGTHS)
    along_lam = sum(float(jnp.vdot(g[k], lam[k])) for k in p)
    truth = float(np.vdot(u["cell"], cell) + np.vdot(u["positions"], R - R.mean(0)))
    np.testing.assert_allclose(along_lam, truth, rtol=1e-8)
    eps = _scale_direction(p, ("epsilon",))
    np.testing.assert_allclose(sum(float(jnp.vdot(g[k], eps[k])) for k in p), E, rtol=1e-8)

    # forward = reverse: ⟨u, J v⟩ (jacfwd) equals ⟨uᵀJ, v⟩ (grad) for a random direction v
    v = {k: jnp.asarray(rng.normal(size=np.shape(x))) for k, x in p.items()}
    Jv = {k: sum(_along(lj_jacobian[k][name], v[name]) for name in p) for k in lj_jacobian}
    lhs = sum(float(np.vdot(np.asarray(u[k]), Jv[k])) for k in Jv)
    rhs = sum(float(jnp.vdot(g[k], v[k])) for k in p)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-9)  # both solves to relative residual 1e-10


@pytest.mark.slow  # eight re-relaxations with tight stress: ~35 s
def test_lj_cell_derivative_matches_finite_difference_re_relaxation(lj_binary, lj_jacobian):
    pot, system, res = lj_binary
    # ε_KrKr: changes the structure (not a scaling law), anisotropically
    name, index, h = "epsilon", (1, 1), 1e-4
    direction = jnp.zeros_like(pot.params[name]).at[index].set(1.0)

    def relaxed(scale):
        params = dict(pot.params)
        params[name] = pot.params[name] + scale * direction
        r = relax(system, pot, params=params, fmax=1e-12, stress_tol=1e-14, relax_cell=True,
                  max_steps=100_000)
        assert r.converged
        cell = np.asarray(r.system.cell)
        diff = np.asarray(r.system.positions) - np.asarray(system.positions)
        frac = diff @ np.linalg.inv(cell)
        diff = (frac - np.round(frac)) @ cell  # undo wrapping across the cell
        return cell, diff - diff.mean(0), float(r.energy)

    # fourth-order central differences of re-relaxations from the same start (same cell0)
    runs = {k: relaxed(k * h) for k in (-2, -1, 1, 2)}
    fd = [(8 * (runs[1][i] - runs[-1][i]) - (runs[2][i] - runs[-2][i])) / (12 * h) for i in range(3)]
    fd_cell, fd_pos, fd_energy = fd

    jac_cell = _along(lj_jacobian["cell"][name], direction)
    assert np.abs(jac_cell).max() > 1.0  # a real response (Å/eV)
    np.testing.assert_allclose(jac_cell, fd_cell, atol=1e-5 * np.abs(fd_cell).max())
    jac_pos = _along(lj_jacobian["positions"][name], direction)
    np.testing.assert_allclose(jac_pos, fd_pos, atol=1e-5 * np.abs(fd_pos).max())
    np.testing.assert_allclose(float(_along(lj_jacobian["energy"][name], direction)), fd_energy, rtol=1e-7)

    # the relaxed stress stays zero: the relaxation cancels the clamped-structure response
    def clamped_stress(t):
        return pot.stress(res.system, {**pot.params, name: pot.params[name] + t * direction})

    clamped = jax.jacfwd(clamped_stress)(0.0)
    relaxed_response = _along(lj_jacobian["stress"][name], direction)
    assert np.abs(clamped).max() > 1e-3  # eV/Å³ per eV
    assert np.abs(relaxed_response).max() < 1e-8 * np.abs(clamped).max()


# ------------------------------------------------------------- Stillinger-Weber silicon
@pytest.mark.slow
def test_stillinger_weber_silicon_scaling_law():
    """SW lengths all scale with σ (cutoff aσ): a*(σ) ∝ σ, E*(σ) constant, E* ∝ ε."""
    pot = StillingerWeber()
    atoms = bulk("Si", "diamond", a=5.3, cubic=True).repeat((2, 2, 2))  # 8 atoms: cutoff too long
    atoms.set_cell(atoms.cell @ np.array([[1.0, 0.02, 0.0], [0.02, 1.01, 0.0], [0.0, 0.0, 0.99]]),
                   scale_atoms=True)
    atoms.positions += np.random.default_rng(0).normal(scale=0.02, size=atoms.positions.shape)
    start = ms.System.from_ase(atoms)
    # tight enough for 1e-7: fmax 1e-9 eV/Å, stress 1e-11 eV/Å³ (moduli ~ 0.5 eV/Å³)
    res = relax(start, pot, fmax=1e-9, stress_tol=1e-11, relax_cell=True, progress=False)
    assert res.converged
    np.testing.assert_allclose(np.asarray(res.system.cell), 2 * 5.431 * np.eye(3), atol=2e-3)
    system = res.system
    sigma, E = float(pot.params["sigma"]), float(res.energy)
    cell, R = np.asarray(res.system.cell), np.asarray(res.system.positions)

    def run(p):
        return relax(system, pot, params=p, fmax=1e-9, stress_tol=1e-11, relax_cell=True)

    J = jax.jacfwd(lambda p: _outputs(run(p)))(pot.params)
    np.testing.assert_allclose(J["cell"]["sigma"], cell / sigma, atol=1e-7 * np.abs(cell).max() / sigma)
    expected = (R - R.mean(0)) / sigma
    np.testing.assert_allclose(J["positions"]["sigma"], expected, atol=1e-7 * np.abs(expected).max())
    assert abs(float(J["energy"]["sigma"])) < 1e-7 * abs(E) / sigma
    np.testing.assert_allclose(float(J["energy"]["epsilon"]), E / float(pot.params["epsilon"]), rtol=1e-7)
    np.testing.assert_allclose(J["cell"]["epsilon"], 0.0, atol=1e-9)

    def loss(p):
        r = run(p)
        return r.energy + jnp.trace(r.system.cell)

    g = jax.grad(loss)(pot.params)
    np.testing.assert_allclose(float(g["sigma"]), np.trace(cell) / sigma, rtol=1e-7)
    np.testing.assert_allclose(float(g["epsilon"]), E / float(pot.params["epsilon"]), rtol=1e-7)


@pytest.mark.slow
def test_neighbor_list_path_gives_the_dense_derivative(lj_binary, lj_jacobian):
    pot, system, _ = lj_binary
    J = jax.jacfwd(lambda p: relax(system, pot, params=p, fmax=FMAX, stress_tol=STRESS_TOL,
                                   relax_cell=True, neighbor_list=True).system.cell)(pot.params)
    for k in pot.params:
        ref = np.asarray(lj_jacobian["cell"][k])
        np.testing.assert_allclose(J[k], ref, atol=1e-9 * np.abs(ref).max())


@pytest.mark.slow
def test_iterative_stability_analysis_gives_the_dense_derivative(lj_binary, lj_jacobian):
    """Above dense_max_dof: LOBPCG on the atoms' block and a Schur complement for the cell."""
    pot, system, _ = lj_binary
    iterative = ms.StabilityOptions(dense_max_dof=100)
    J = jax.jacfwd(lambda p: relax(system, pot, params=p, fmax=FMAX, stress_tol=STRESS_TOL, relax_cell=True,
                                   stability=iterative).system.cell)(pot.params)
    for k in pot.params:
        ref = np.asarray(lj_jacobian["cell"][k])
        np.testing.assert_allclose(J[k], ref, atol=1e-9 * np.abs(ref).max())


@pytest.mark.slow
def test_two_dimensional_scaling_law():
    """2D (3 Voigt strains): binary LJ triangular crystal, d cell*/dλ = cell*, dE*/dε = E*/ε."""
    n = 6
    base = np.array([[1.0, 0.0], [0.5, np.sqrt(3) / 2]]) * 1.12
    grid = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 2)
    rng = np.random.default_rng(3)
    start = ms.System(positions=grid @ base + rng.normal(scale=0.01, size=(n * n, 2)),
                      cell=n * base @ np.array([[1.02, 0.01], [0.01, 0.99]]), pbc=True,
                      species=rng.permutation(np.arange(n * n) % 2), symbols=("A", "B"))
    pot = LennardJones(sigma={"A": 1.0, "B": 1.1}, epsilon={"A": 1.0, "B": 0.8}, r_cutoff=2.5,
                       r_onset=2.0)
    res = relax(start, pot, fmax=FMAX, stress_tol=STRESS_TOL, relax_cell=True, progress=False)
    assert res.converged
    system, cell, E = res.system, np.asarray(res.system.cell), float(res.energy)
    R = np.asarray(res.system.positions)
    J = jax.jacfwd(lambda p: _outputs(_lj_relax(system, pot, p)))(pot.params)
    lam = _scale_direction(pot.params, LENGTHS)
    np.testing.assert_allclose(sum(_along(J["cell"][k], lam[k]) for k in lam), cell,
                               atol=1e-8 * np.abs(cell).max())
    np.testing.assert_allclose(sum(_along(J["positions"][k], lam[k]) for k in lam), R - R.mean(0),
                               atol=1e-8 * np.abs(R).max())
    eps = _scale_direction(pot.params, ("epsilon",))
    np.testing.assert_allclose(sum(_along(J["energy"][k], eps[k]) for k in eps), E, rtol=1e-9)


# --------------------------------------------------------------------- failure modes
def test_jit_and_vmap_are_refused_clearly(lj_binary):
    pot, system, _ = lj_binary

    def energy(eps):
        return relax(system, pot, params={**pot.params, "epsilon": eps}, relax_cell=True).energy

    with pytest.raises(NotImplementedError, match="jit"):
        jax.jit(energy)(pot.params["epsilon"])
    with pytest.raises(NotImplementedError, match="vmap"):
        jax.vmap(energy)(jnp.stack([pot.params["epsilon"]] * 2))


@pytest.mark.slow
def test_saddle_point_is_refused():
    """Simple-cubic LJ at its zero-pressure lattice constant: forces and stress vanish by
    symmetry (relax takes 0 steps), but sc is mechanically unstable: a saddle."""
    from scipy.optimize import brentq

    n = 5
    pot = LennardJones(sigma=1.0, epsilon=1.0, r_cutoff=2.2, r_onset=1.8)

    def sc(a):
        grid = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
        return ms.System(positions=grid * a, cell=np.eye(3) * n * a, pbc=True)

    a0 = brentq(lambda a: float(pot.stress(sc(a))[0]), 0.95, 1.2, xtol=1e-15)
    system = sc(a0)

    def energy(p):
        return relax(system, pot, params=p, fmax=1e-10, stress_tol=1e-12, relax_cell=True).energy

    with pytest.raises(ms.SaddlePointError, match="saddle"):
        jax.grad(energy)(pot.params)
