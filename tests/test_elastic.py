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


@pytest.mark.slow  # ~25 s; SW against published constants and the probe path stay in the default suite
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


def test_spectral_probe_path_gives_the_published_constants(si_diamond):
    """Above dense_max_dof (lowered here for 64 atoms) the internal-strain solves run beside
    the spectral probe instead of a separate eigen-analysis: same published constants,
    same internal strain as the eigen-analysis path to the solve tolerance."""
    pot, res = si_diamond
    probed = elastic_constants(res, pot, stability=ms.StabilityOptions(dense_max_dof=60)).to_gpa()
    np.testing.assert_allclose(probed.relaxed[0, 0], 151.4, rtol=2e-3)
    np.testing.assert_allclose(probed.relaxed[0, 1], 76.4, rtol=2e-3)
    np.testing.assert_allclose(probed.relaxed[3, 3], 56.4, rtol=2e-3)
    assert probed.n_zero_modes == 3 and np.all(probed.solve_residual < 1e-9)
    dense = elastic_constants(res, pot).to_gpa()
    np.testing.assert_allclose(probed.relaxed, dense.relaxed, atol=1e-8 * np.abs(dense.relaxed).max())
    np.testing.assert_allclose(probed.internal_strain, dense.internal_strain, atol=1e-9)


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


# ------------------------------------------------------- dC/dθ through the relaxation
#: One list for every fast derivative test: they share one compiled derivative program
#: (it is keyed by the layout and the number of parameter directions).
WRT = ["epsilon", "sigma", "lam", "gamma"]


def deformation(eps_v):
    """``I + ε`` from engineering Voigt strain (written here, not taken from mdsens)."""
    out = jnp.eye(3)
    for I, (a, b) in enumerate(VOIGT):
        if a == b:
            out = out.at[a, a].add(eps_v[I])
        else:
            out = out.at[a, b].add(0.5 * eps_v[I]).at[b, a].add(0.5 * eps_v[I])
    return out


@pytest.fixture(scope="module")
def si_zero_stress():
    """SW diamond Si, 64 atoms, cell and ions relaxed (zero stress). By symmetry the ions
    stay on their sites for any θ at this cell: dR*/dθ = 0."""
    pot = StillingerWeber()
    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat((2, 2, 2))
    res = relax(ms.System.from_ase(atoms), pot, relax_cell=True, fmax=1e-10)
    assert res.converged
    return pot, res


@pytest.fixture(scope="module")
def si_sheared(si_zero_stress):
    """The same crystal under a fixed shear ε_yz = 0.004 with the ions relaxed: the two fcc
    sublattices shift by an amount that depends on θ, so dR*/dθ ≠ 0 and the derivative's
    path through the relaxation is exercised. (0.004 keeps second neighbours outside the
    tight derivative list, so this structure shares the compiled programs.)"""
    pot, res = si_zero_stress
    Fm = np.eye(3)
    Fm[1, 2] = Fm[2, 1] = 0.004
    s = res.system.replace(positions=np.asarray(res.system.positions) @ Fm, cell=np.asarray(res.system.cell) @ Fm)
    sheared = relax(s, pot, fmax=1e-11)
    assert sheared.converged
    return pot, sheared


@pytest.fixture(scope="module", params=["zero_stress", "sheared"])
def si_structure(request):
    """``(label, (pot, result))`` for each of the two crystals above."""
    return request.param, request.getfixturevalue("si_" + request.param)


def test_parameter_derivative_matches_rerelaxed_finite_differences(si_structure):
    """dC/dθ against central differences of [re-relax the ions at θ ± h at the same fixed
    cell (fmax 1e-11), then ms.elastic_constants], h = 1e-4 θ. Measured agreement: ≤ 6e-8
    of max |dC/dθ| (the O(h²) truncation of σ and γ dominates), tolerance 1e-6."""
    structure, (pot, res) = si_structure
    C = elastic_constants(res, pot, wrt=WRT)
    assert set(C.dparams) == set(WRT) and C.dparams["lam"].shape == (6, 6)
    assert np.all(C.dparams_solve_residual < 1e-9)
    for name in ("sigma", "lam", "gamma"):
        theta = float(pot.params[name])
        h = 1e-4 * abs(theta)
        sides = []
        for sign in (+1, -1):
            p = dict(pot.params, **{name: theta + sign * h})
            r = relax(res.system, pot, params=p, fmax=1e-11)
            assert r.converged
            sides.append((r, elastic_constants(r, pot, params=p)))
        (rp, Cp), (rm, Cm) = sides
        for got, fd in ((C.dparams[name], (Cp.relaxed - Cm.relaxed) / (2 * h)),
                        (C.dclamped[name], (Cp.clamped - Cm.clamped) / (2 * h))):
            np.testing.assert_allclose(got, fd, rtol=0, atol=1e-6 * np.abs(fd).max(), err_msg=name)
        if structure == "sheared" and name != "lam":
            # the relaxation really moves: the total derivative is not the fixed-ion one
            cell = np.asarray(res.system.cell)
            frac = (np.asarray(rp.system.positions) - np.asarray(rm.system.positions)) @ np.linalg.inv(cell)
            assert np.linalg.norm((frac - np.round(frac)) @ cell) / (2 * h) > 0.01, name


def test_epsilon_derivative_is_constants_over_epsilon(si_structure):
    """SW's energy is ε f(R/σ): R* does not depend on ε and, at fixed cell, C ∝ ε, so
    dC/dε = C/ε exactly (measured 1.3e-13 relative; tolerance 1e-9)."""
    _, (pot, res) = si_structure
    C = elastic_constants(res, pot, wrt=WRT)
    eps = float(pot.params["epsilon"])
    scale = np.abs(C.relaxed).max()
    np.testing.assert_allclose(C.dparams["epsilon"], C.relaxed / eps, rtol=1e-9, atol=1e-9 * scale / eps)
    np.testing.assert_allclose(C.dclamped["epsilon"], C.clamped / eps, rtol=1e-9, atol=1e-9 * scale / eps)
    # to_gpa converts the derivatives with the constants
    np.testing.assert_allclose(C.to_gpa().dparams["epsilon"], C.dparams["epsilon"] / GPa, rtol=1e-14)


def test_clamped_parameter_derivative_matches_jacfwd_of_born_term(si_zero_stress):
    """Second route, no implicit solve: at the zero-stress diamond the ions stay on their
    sites for every θ (dR*/dθ = 0 by symmetry), so d(clamped)/dθ is jax.jacfwd of the Born
    term (1/V) ∂²E/∂ε² at fixed positions, here from the dense (all-pairs) energy and a
    strain written in this file. The internal-strain correction of C11, C12 is zero for
    every θ (normal strains leave the sublattices in place), so its derivative is too.
    Measured 1.3e-13 of max |d(Born)/dθ|; tolerance 1e-9."""
    pot, res = si_zero_stress
    C = elastic_constants(res, pot, wrt=WRT)
    system = res.system
    E = pot.energy_fn(system, neighbor_list=False)
    R, cell = jnp.asarray(system.positions), jnp.asarray(system.cell)
    V = abs(float(np.linalg.det(np.asarray(cell))))

    def born(params):
        strained = lambda e: E(R @ deformation(e), params, cell @ deformation(e))  # noqa: E731
        return jax.hessian(strained)(jnp.zeros(6)) / V

    truth = jax.jit(jax.jacfwd(born))(pot.params)
    for name in WRT:
        ref = np.asarray(truth[name])
        np.testing.assert_allclose(C.dclamped[name], ref, rtol=0, atol=1e-9 * np.abs(ref).max(), err_msg=name)
        np.testing.assert_allclose(C.dparams[name][:3, :3], C.dclamped[name][:3, :3], rtol=0,
                                   atol=1e-9 * np.abs(ref).max(), err_msg=name)


def test_parameter_derivative_options(si_zero_stress):
    """wrt=None changes nothing; unknown names and wrt='cell' are refused with the fix."""
    pot, res = si_zero_stress
    plain = elastic_constants(res, pot)
    assert plain.dparams is None and plain.dclamped is None
    with_d = elastic_constants(res, pot, wrt=WRT)
    np.testing.assert_array_equal(with_d.relaxed, plain.relaxed)
    with pytest.raises(ms.UnknownParameterError, match=r"no parameter 'lambda'.*'lam'"):
        elastic_constants(res, pot, wrt=["lambda"])
    with pytest.raises(ms.OptionError, match="strain derivatives already"):
        elastic_constants(res, pot, wrt="cell")


def test_parameter_derivative_keys_and_shapes_for_array_parameters():
    """A matrix-valued parameter comes back as (*shape, n_voigt, n_voigt) under its leaf
    name, an element asked for by label as (n_voigt, n_voigt) under the label; rows in
    ravel_pytree order (dict keys sorted, elements row-major)."""
    from mdsens.md.elastic import _assemble, _wanted

    params = {"sigma": np.zeros((2, 2)), "epsilon": np.float64(1.0)}
    for wrt, expect in (("params", {"epsilon": (3, 3), "sigma": (2, 2, 3, 3)}),
                        ("sigma[0,1], epsilon", {"sigma[0,1]": (3, 3), "epsilon": (3, 3)}),
                        (["sigma"], {"sigma": (2, 2, 3, 3)})):
        selection = _wanted(params, wrt)
        flat = np.arange(len(selection[1]), dtype=float)[:, None, None] * np.ones((1, 3, 3))
        out = _assemble(flat, params, selection)
        assert {k: v.shape for k, v in out.items()} == expect
        for name, value in out.items():  # each row is the flat index of its parameter
            labels = [lab for lab in selection[0] if lab == name or lab.split("[")[0] == name]
            rows = [list(selection[1]).index(selection[0].index(lab)) for lab in labels]
            np.testing.assert_array_equal(value[..., 0, 0].ravel(), rows)


def dense_relaxed_constants(E, cell, dim):
    """(R, params) ↦ relaxed constants from the dense formula [Born − Λᵀ (H + T Tᵀ)⁻¹ Λ]/V
    (T: the orthonormal translations; Λ ⊥ T, so this is Λᵀ H⁺ Λ), all by autodiff of E."""
    cell = jnp.asarray(cell)
    V = abs(float(np.linalg.det(np.asarray(cell))))
    voigt = VOIGT if dim == 3 else [(0, 0), (1, 1), (0, 1)]

    def defgrad(e):
        out = jnp.eye(dim)
        for I, (a, b) in enumerate(voigt):
            out = out.at[a, b].add(e[I] if a == b else 0.5 * e[I])
            if a != b:
                out = out.at[b, a].add(0.5 * e[I])
        return out

    def constants(R, p):
        n = R.shape[0] * dim
        T = jnp.kron(jnp.ones((R.shape[0], 1)), jnp.eye(dim)) / jnp.sqrt(R.shape[0])
        Es = lambda U, e: E(U @ defgrad(e), p, cell @ defgrad(e))  # noqa: E731
        z = jnp.zeros(len(voigt))
        born = jax.hessian(Es, argnums=1)(R, z)
        H = jax.hessian(E)(R, p, cell).reshape(n, n)
        L = jax.jacfwd(jax.grad(Es), argnums=1)(R, z).reshape(n, len(voigt))
        return (born - L.T @ jnp.linalg.solve(H + T @ T.T, L)) / V

    return constants


def reverse_mode_check(pot, res, forward, names, fmax, seed=0):
    """Reverse mode through ms.relax (its custom_root VJP, a transposed solve) composed
    with the dense formula: ∇_θ ⟨W, C(R*(θ), θ)⟩ for a random symmetric W, against
    ⟨W, dC/dθ⟩ from the forward-mode program. Returns (reverse, forward, partial at
    fixed R) per name."""
    dim = res.system.dim
    nv = 6 if dim == 3 else 3
    W = np.random.default_rng(seed).normal(size=(nv, nv))
    W = jnp.asarray(W + W.T)
    constants = dense_relaxed_constants(pot.energy_fn(res.system, neighbor_list=False), res.system.cell, dim)
    R, pullback = jax.vjp(lambda p: relax(res.system, pot, params=p, fmax=fmax, max_steps=100_000).system.positions,
                          pot.params)
    gR, g_partial = jax.jit(jax.grad(lambda R, p: jnp.sum(W * constants(R, p)), argnums=(0, 1)))(R, pot.params)
    (g_chain,) = pullback(gR)
    return {k: (float(g_partial[k] + g_chain[k]), float(np.sum(np.asarray(W) * forward[k])), float(g_partial[k]))
            for k in names}


@pytest.mark.slow  # ~2 min on a loaded 2-core CPU: third derivatives of the dense three-body energy compile
def test_parameter_derivative_forward_equals_reverse_through_relax(si_sheared):
    """⟨W, dC/dθ⟩ (forward mode, this module) against reverse mode through ms.relax and
    a dense pseudo-inverse formula, on the sheared crystal where R* depends on θ.
    Measured agreement ≤ 1e-15 relative; tolerance 1e-9. The path through R*(θ) is
    2–3e-3 of the result (dR*/dε = 0), far above the tolerance."""
    pot, res = si_sheared
    C = elastic_constants(res, pot, wrt=WRT)
    for name, (reverse, forward, partial) in reverse_mode_check(pot, res, C.dparams, WRT, 1e-11).items():
        assert abs(forward - reverse) <= 1e-9 * abs(reverse), (name, forward, reverse)
        if name != "epsilon":  # dR*/dε = 0
            assert abs(reverse - partial) > 1e-5 * abs(reverse), (name, reverse, partial)


@pytest.mark.slow  # ~1.5 min on a loaded 2-core CPU (its own compilations: 2D, dense energy)
def test_parameter_derivative_2d_lennard_jones_vacancy():
    """2D (3x3 Voigt), dense energy (no neighbor list), a vacancy with internal
    relaxation: forward mode against reverse mode through ms.relax and the dense formula
    (measured 2.5e-14 relative; tolerance 1e-9), and dC/dε = C/ε (the switched LJ energy is
    ε times a function of R/σ and the fixed cutoffs)."""
    from conftest import triangular_vacancy

    R0, _, cell = triangular_vacancy(4, 4, 1.12)
    R0 = R0 + 0.02 * np.random.default_rng(3).normal(size=R0.shape)
    pot = LennardJones(sigma=1.0, epsilon=1.0, r_cutoff=1.8, r_onset=1.5)
    res = relax(ms.System(R0, cell=cell, pbc=True), pot, fmax=1e-11, max_steps=100_000)
    assert res.converged
    C = elastic_constants(res, pot, wrt="params")
    assert C.dparams["sigma"].shape == (3, 3) and set(C.dparams) == set(pot.params)
    eps = float(pot.params["epsilon"])
    np.testing.assert_allclose(C.dparams["epsilon"], C.relaxed / eps, rtol=1e-9, atol=1e-9 * np.abs(C.relaxed).max())
    checks = reverse_mode_check(pot, res, C.dparams, ["sigma", "epsilon"], 1e-11)
    for name, (reverse, forward, partial) in checks.items():
        assert abs(forward - reverse) <= 1e-9 * abs(reverse), (name, forward, reverse)
    reverse, _, partial = checks["sigma"]
    assert abs(reverse - partial) > 1e-3 * abs(reverse)  # R*(σ) moves: the path through it matters
