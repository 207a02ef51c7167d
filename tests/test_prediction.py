"""ms.predict against re-relaxations at the new parameters and against closed forms.

Truths: ``ms.relax`` at θ + Δθ started from R* (the error of each prediction, fitted on
a log-log scale against |Δθ|), and the Lennard-Jones scaling law (σ-tied cutoff, cell
relaxed to zero stress: cell* ∝ σ, R* ∝ σ, E* ∝ ε and independent of σ).
"""

import jax.numpy as jnp
import numpy as np
import pytest

import mdsens as ms
from conftest import min_image, triangular_vacancy

FMAX = 1e-12
DIRECTION = {"epsilon": 0.6, "sigma": 0.8}  # relative Δθ direction


def slope(h, err):
    return np.polyfit(np.log(h), np.log(err), 1)[0]


@pytest.fixture(scope="module")
def crystal():
    """LJ (σ = ε = 1, cutoff 3σ) triangular crystal with a vacancy at fixed cell, N = 47."""
    R, _, cell = triangular_vacancy()
    pot = ms.potentials.LennardJones(sigma=1.0, epsilon=1.0)
    res = ms.relax(ms.System(R, cell=cell, pbc=True), pot, fmax=FMAX, max_steps=100_000)
    assert res.converged
    return pot, res


def shifted(pot, h):
    return {k: float(v) * (1.0 + h * DIRECTION[k]) for k, v in pot.params.items()}


@pytest.fixture(scope="module")
def truths(crystal):
    """Re-relaxations at θ(1 + h u) for the h used below: {h: RelaxResult}."""
    pot, res = crystal
    out = {}
    for h in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2):
        r = ms.relax(res.system, pot, params=shifted(pot, h), fmax=FMAX, max_steps=100_000)
        assert r.converged
        out[h] = r
    return out


def errors(pred, truth, cell):
    D = min_image(pred.positions - np.asarray(truth.system.positions), cell)
    D = D - D.mean(0)  # re-relaxation may drift by a net translation (gauge)
    return np.abs(D).max(), abs(pred.energy - float(truth.energy)), abs(pred.energy_linear - float(truth.energy))


def test_first_order_error_scales_as_dtheta_squared(crystal, truths):
    pot, res = crystal
    cell = np.asarray(res.system.cell)
    hs = np.array(sorted(truths))
    jac, rows = None, []
    for h in hs:
        p = ms.predict(res, pot, shifted(pot, h), jacobian=jac)
        jac = p.jacobian
        rows.append(errors(p, truths[h], cell) + (p.fmax,))
        # the prediction is a first-order change, not the reference
        assert np.abs(p.dpositions).max() > 10 * rows[-1][0]
    pos, energy, energy_lin, fmax = np.array(rows).T
    assert abs(slope(hs, pos) - 2) < 0.3, pos
    assert abs(slope(hs, energy_lin) - 2) < 0.3, energy_lin
    assert abs(slope(hs, fmax) - 2) < 0.3, fmax
    # E(R_pred, θ') is variational: error O(|Δθ|⁴); below h = 1e-3 it reaches round-off
    big = hs >= 1e-3
    assert abs(slope(hs[big], energy[big]) - 4) < 0.3, energy
    assert np.all(energy[big] < 1e-3 * energy_lin[big])


def test_second_order_error_scales_as_dtheta_cubed(crystal, truths):
    pot, res = crystal
    cell = np.asarray(res.system.cell)
    hs = np.array([1e-3, 3e-3, 1e-2])
    first = ms.predict(res, pot, shifted(pot, hs[0]))
    pos = []
    for h in hs:
        p = ms.predict(res, pot, shifted(pot, h), order=2, jacobian=first.jacobian)
        assert p.order == 2
        pos.append(errors(p, truths[h], cell)[0])
        assert pos[-1] < 0.5 * errors(ms.predict(res, pot, shifted(pot, h), jacobian=first.jacobian),
                                      truths[h], cell)[0]
    assert abs(slope(hs, np.array(pos)) - 3) < 0.3, pos


@pytest.fixture(scope="module")
def zero_stress():
    """The same crystal with its cell relaxed to zero stress."""
    R, _, cell = triangular_vacancy()
    pot = ms.potentials.LennardJones(sigma=1.0, epsilon=1.0)
    res = ms.relax(ms.System(R, cell=cell, pbc=True), pot, fmax=FMAX, relax_cell=True, stress_tol=1e-12,
                   max_steps=100_000)
    assert res.converged
    return pot, res


@pytest.mark.slow  # ~1 min: compiles the elastic constants and the cell sensitivities
def test_relax_cell_follows_the_lj_scaling_law(zero_stress):
    """σ-tied LJ at zero stress: cell*(σ, ε) = cell* σ/σ₀, R* = R* σ/σ₀ (exactly linear, so
    the first-order prediction is exact at any Δσ), E* = E* ε/ε₀ whatever σ."""
    pot, res = zero_stress
    R, cell, E = (np.asarray(res.system.positions), np.asarray(res.system.cell), float(res.energy))
    h = 0.05
    new = {"sigma": 1.0 + h, "epsilon": 1.0 - 0.5 * h}
    p = ms.predict(res, pot, new, relax_cell=True)
    np.testing.assert_allclose(p.cell, cell * (1 + h), rtol=0, atol=1e-8 * np.abs(cell).max())
    np.testing.assert_allclose(p.positions, R * (1 + h), rtol=0, atol=1e-8 * np.abs(R).max())
    np.testing.assert_allclose(p.energy_linear, E * (1 - 0.5 * h), rtol=1e-9)
    np.testing.assert_allclose(p.energy, E * (1 - 0.5 * h), rtol=1e-9)
    np.testing.assert_allclose(p.jacobian.energy, [E, 0.0], rtol=1e-9, atol=1e-8 * abs(E))  # (epsilon, sigma)
    assert p.fmax < 1e-8 and np.abs(p.stress).max() < 1e-8
    # the fixed-cell prediction of the same change is wrong by O(h): the cell matters
    fixed = ms.predict(res, pot, new)
    assert np.abs(fixed.positions - R * (1 + h)).max() > 1e-3
    with pytest.raises(ms.OptionError, match="order=2"):
        ms.predict(res, pot, new, relax_cell=True, order=2)


def test_bad_new_params_are_refused_with_the_fix(crystal, truths):
    pot, res = crystal
    with pytest.raises(ms.ParameterError, match="pytree structure") as err:
        ms.predict(res, pot, {"sigma": 1.0})
    assert isinstance(err.value, ms.MdsensError) and "dict(pot.params" in str(err.value)
    with pytest.raises(ms.ParameterError, match="shape"):
        ms.predict(res, pot, {"sigma": np.ones(2), "epsilon": 1.0})
    with pytest.raises(ms.ParameterError, match="NaN"):
        ms.predict(res, pot, {"sigma": np.nan, "epsilon": 1.0})
    with pytest.raises(ms.ParameterError):
        ms.predict(res, pot, {"sigma": -1.0, "epsilon": 1.0})  # out of the potential's range
    with pytest.raises(ms.ParameterError, match="pytree structure"):
        ms.predict(res, pot, [1.0, 1.0])
    with pytest.raises(ms.OptionError, match="order"):
        ms.predict(res, pot, dict(pot.params), order=3)
    # a Jacobian of another structure is refused
    other = truths[1e-2]
    jac = ms.predict(res, pot, shifted(pot, 1e-3)).jacobian
    with pytest.raises(ms.OptionError, match="another structure"):
        ms.predict(other, pot, shifted(pot, 1e-3), params=shifted(pot, 1e-2), jacobian=jac)
