"""ms.propagate_uncertainty against Monte Carlo over re-relaxations and closed forms.

Truths: 200 re-relaxations (``ms.relax``) at parameters drawn from the covariance (fixed
seed): sample means and standard deviations, and per sample the linear prediction
against the re-relaxed change; forward mode against reverse mode (different solves); the
Lennard-Jones scaling law at zero stress (cell* ∝ σ, E* ∝ ε).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens as ms
from conftest import min_image, triangular_vacancy

FMAX = 1e-12
N_SAMPLES = 200
#: Parameter covariance over ravel_pytree order (epsilon, sigma): relative stds 3e-4, 2e-4,
#: correlation 0.4: small enough that the linearisation error is below the MC error.
STD = np.array([3e-4, 2e-4])
COV = np.outer(STD, STD) * np.array([[1.0, 0.4], [0.4, 1.0]])


@pytest.fixture(scope="module")
def crystal():
    """LJ triangular crystal with a vacancy at fixed cell (N = 47) and its vacancy
    formation energy E_f = E(R) − (N/M) E_perfect (M = N + 1 sites), a user observable
    that depends on the parameters explicitly too."""
    R, perfect, cell = triangular_vacancy()
    pot = ms.potentials.LennardJones(sigma=1.0, epsilon=1.0)
    res = ms.relax(ms.System(R, cell=cell, pbc=True), pot, fmax=FMAX, max_steps=100_000)
    assert res.converged
    E_vac = pot.energy_fn(res.system, neighbor_list=False)
    E_perf = pot.energy_fn(ms.System(perfect, cell=cell, pbc=True), neighbor_list=False)
    ratio = len(R) / len(perfect)

    def formation(positions, params, cell):
        return E_vac(positions, params, cell) - ratio * E_perf(jnp.asarray(perfect), params, cell)

    return pot, res, formation


@pytest.fixture(scope="module")
def monte_carlo(crystal):
    """Re-relaxed observables at N_SAMPLES parameter draws: (Δθ (n, 2), {name: (n, ...)})."""
    pot, res, formation = crystal
    rng = np.random.default_rng(20240702)
    theta0 = np.array([1.0, 1.0])
    draws = rng.multivariate_normal(theta0, COV, size=N_SAMPLES)
    R0, cell = np.asarray(res.system.positions), np.asarray(res.system.cell)
    out = {"energy": [], "E_f": [], "stress": [], "positions": []}
    formation_jit = jax.jit(formation)
    for eps, sigma in draws:
        p = {"epsilon": jnp.float64(eps), "sigma": jnp.float64(sigma)}
        r = ms.relax(res.system, pot, params=p, fmax=1e-10, max_steps=100_000)
        assert r.converged
        D = min_image(np.asarray(r.system.positions) - R0, cell)
        out["positions"].append(R0 + D - D.mean(0))  # gauge: no net translation
        out["energy"].append(float(r.energy))
        out["E_f"].append(float(formation_jit(r.system.positions, p, r.system.cell)))
        out["stress"].append(np.asarray(r.stress))
    return draws - theta0, {k: np.array(v) for k, v in out.items()}


@pytest.mark.slow  # ~1.5 min on a shared 2-core CPU, mostly compiling; 200 re-relaxations
def test_linearised_statistics_agree_with_monte_carlo(crystal, monte_carlo):
    pot, res, formation = crystal
    dtheta, mc = monte_carlo
    u = ms.propagate_uncertainty(res, pot, COV, {"energy": "energy", "positions": "positions",
                                                 "stress": "stress", "E_f": formation})
    assert u.mode == "forward"  # positions need the columns
    n = len(dtheta)
    for name in ("energy", "E_f", "stress", "positions"):
        o, X = u[name], mc[name]
        std = np.ravel(o.std)
        keep = std > 1e-3 * std.max()  # components fixed by symmetry (σ_xy, some atoms) have std 0
        assert keep.any()
        mean_mc = np.ravel(X.mean(0))[keep]
        std_mc = np.ravel(X.std(0, ddof=1))[keep]
        # means: the first-order mean O(θ₀) within 4 Monte Carlo standard errors
        assert np.all(np.abs(mean_mc - np.ravel(o.mean)[keep]) < 4 * std[keep] / np.sqrt(n)), name
        # standard deviations: relative MC error of a std is 1/sqrt(2(n-1)); allow 4 of them
        assert np.all(np.abs(std_mc / std[keep] - 1) < 4 / np.sqrt(2 * (n - 1))), name
        # per sample: the linear model J Δθ against the re-relaxed change (nonlinearity only)
        change = X.reshape(n, -1) - np.ravel(o.value)
        residual = change - dtheta @ o.jacobian.T
        assert np.all(np.sqrt(np.mean(residual[:, keep] ** 2, axis=0)) < 0.02 * std[keep]), name
    assert u.energy_std == pytest.approx(float(u["energy"].std))
    assert u.positions_std.shape == res.system.positions.shape
    # joint covariance of the energy and E_f against the sample covariance, within 4 of
    # its standard errors sqrt((C_ii C_jj + C_ij²) / (n - 1)) (Gaussian samples)
    C = u.covariance("energy", "E_f")
    C_mc = np.cov(mc["energy"], mc["E_f"])
    se = np.sqrt((np.outer(np.diag(C), np.diag(C)) + C ** 2) / (n - 1))
    assert np.all(np.abs(C_mc - C) < 4 * se), (C, C_mc)


@pytest.mark.slow  # ~30 s; the refusals stay in the default suite
def test_forward_and_reverse_modes_agree(crystal):
    pot, res, formation = crystal
    obs = {"energy": "energy", "E_f": formation}
    fwd = ms.propagate_uncertainty(res, pot, COV, obs, mode="forward")
    rev = ms.propagate_uncertainty(res, pot, COV, obs, mode="reverse")
    assert (fwd.mode, rev.mode) == ("forward", "reverse")
    np.testing.assert_allclose(rev.covariance(), fwd.covariance(), rtol=1e-7)
    for name in obs:
        np.testing.assert_allclose(rev[name].jacobian, fwd[name].jacobian, rtol=1e-7)
    # auto: one scalar and two parameters -> reverse; positions -> forward
    assert ms.propagate_uncertainty(res, pot, COV, ["energy"]).mode == "reverse"
    auto = ms.propagate_uncertainty(res, pot, COV, jacobian=fwd.jacobian)
    assert auto.mode == "forward" and set(auto.observables) == {"energy", "positions", "stress"}
    np.testing.assert_allclose(auto.energy_std, fwd.energy_std, rtol=1e-12)


@pytest.mark.slow  # ~1 min: compiles the elastic constants and the cell sensitivities
def test_zero_stress_cell_follows_the_lj_scaling_law():
    """σ-tied LJ relaxed to zero stress: cell* = cell σ/σ₀ and E* = E ε/ε₀, so
    std(cell) = |cell| std(σ)/σ₀, std(E*) = |E*| std(ε)/ε₀ (σ does not change E*)."""
    R, _, cell = triangular_vacancy()
    pot = ms.potentials.LennardJones(sigma=1.0, epsilon=1.0)
    res = ms.relax(ms.System(R, cell=cell, pbc=True), pot, fmax=FMAX, relax_cell=True, stress_tol=1e-12,
                   max_steps=100_000)
    u = ms.propagate_uncertainty(res, pot, COV, relax_cell=True)
    assert u.mode == "forward" and set(u.observables) == {"energy", "positions", "cell"}
    C, E = np.asarray(res.system.cell), float(res.energy)
    np.testing.assert_allclose(u.cell_std, np.abs(C) * STD[1], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(u.energy_std, abs(E) * STD[0], rtol=1e-7)
    np.testing.assert_allclose(u.positions_std, np.abs(np.asarray(res.system.positions)) * STD[1],
                               rtol=1e-6, atol=1e-9)
    with pytest.raises(ms.OptionError, match="reverse"):
        ms.propagate_uncertainty(res, pot, COV, ["energy"], relax_cell=True, mode="reverse")


@pytest.mark.parametrize("cov, match", [
    (np.eye(3), "shape"),
    (np.array([1e-6, 1e-6]), "shape"),
    (np.array([[1e-6, np.nan], [np.nan, 1e-6]]), "NaN"),
    (np.array([[1e-6, 2e-7], [0.0, 1e-6]]), "not symmetric"),
    (np.array([[1e-6, 2e-6], [2e-6, 1e-6]]), "positive semi-definite"),
    (np.diag([1e-6, -1e-8]), "positive semi-definite"),
    ("abc", "array of numbers"),
])
def test_bad_covariance_is_refused_with_the_fix(crystal, cov, match):
    pot, res, _ = crystal
    with pytest.raises(ms.ParameterError, match=match) as err:
        ms.propagate_uncertainty(res, pot, cov)
    assert isinstance(err.value, ms.MdsensError) and isinstance(err.value, ValueError)


def test_bad_observables_and_modes_are_refused(crystal):
    pot, res, _ = crystal
    with pytest.raises(ms.OptionError, match="unknown observable"):
        ms.propagate_uncertainty(res, pot, COV, ["enthalpy"])
    with pytest.raises(ms.OptionError, match="relax_cell"):
        ms.propagate_uncertainty(res, pot, COV, ["cell"])
    with pytest.raises(ms.OptionError, match="mode='forward'"):
        ms.propagate_uncertainty(res, pot, COV, ["positions"], mode="reverse")
    with pytest.raises(ms.OptionError, match="mode"):
        ms.propagate_uncertainty(res, pot, COV, mode="sideways")
    with pytest.raises(ms.OptionError, match="scalar"):
        ms.propagate_uncertainty(res, pot, COV, {"R": lambda R, p, c: R}, mode="reverse")
    with pytest.raises(ms.OptionError, match="scalar"):
        ms.propagate_uncertainty(res, pot, COV, {"R": lambda R, p, c: R}, mode="forward",
                                 jacobian=ms.predict(res, pot, dict(pot.params)).jacobian)
