"""`relax` as an implicit layer, against exact scaling laws and finite-difference re-relaxation.

Lennard-Jones with cutoffs far beyond the structure is exactly scale invariant:
E*(σ, ε) = ε e(…) and R*(σ) = σ r*, so dE*/dε = E*/ε and dR*/dσ = (R* − R̄*)/σ in the
gauge without net translation and rotation (independent truths, not the code itself).
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens as ms
from mdsens import relax
from mdsens.md.io import read
from mdsens.md.potentials.lennard_jones import LennardJones
from mdsens.md.potentials.soft_sphere import SoftSphere
from conftest import data_file

FMAX = 1e-9


@pytest.fixture(scope="module")
def cluster():
    system = read(data_file("lj13_ar.xyz"))
    pot = LennardJones(sigma=3.4, epsilon=0.0104, r_cutoff=40.0, r_onset=35.0)
    return system, pot, relax(system, pot, fmax=FMAX, progress=False)


def test_cluster_scaling_laws_forward_and_reverse(cluster):
    system, pot, result = cluster
    R = np.asarray(result.system.positions)
    expected = (R - R.mean(0)) / 3.4
    jac = jax.jacfwd(lambda p: relax(system, pot, params=p, fmax=FMAX).system.positions)(pot.params)
    np.testing.assert_allclose(jac["sigma"], expected, atol=1e-8 * np.abs(expected).max())
    grad = jax.grad(lambda p: relax(system, pot, params=p, fmax=FMAX).energy)(pot.params)
    np.testing.assert_allclose(grad["epsilon"], float(result.energy) / 0.0104, rtol=1e-8)
    # the known LJ13 minimum, in units of ε (Wales & Doye 1997)
    np.testing.assert_allclose(float(result.energy) / 0.0104, -44.326801, atol=1e-6)


def test_forward_equals_reverse(cluster):
    system, pot, _ = cluster
    # ⟨u, J v⟩ = ⟨Jᵀ u, v⟩ is exact algebra; solve both to 1e-13 so that CG's own error
    # (κ × its tolerance) does not blur it
    solve = functools.partial(ms.linear_solve.cg, tol=1e-13)
    f = lambda p: relax(system, pot, params=p, fmax=FMAX, solve=solve).system.positions  # noqa: E731
    v = {k: jnp.zeros_like(x) for k, x in pot.params.items()}
    v["sigma"], v["epsilon"] = jnp.asarray(0.7), jnp.asarray(-0.002)
    u = jnp.asarray(np.random.default_rng(0).normal(size=(13, 3)))
    _, jv = jax.jvp(f, (pot.params,), (v,))
    _, pullback = jax.vjp(f, pot.params)
    (ju,) = pullback(u)
    lhs = float(jnp.vdot(u, jv))
    rhs = float(sum(jnp.vdot(ju[k], v[k]) for k in v))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-9)


@pytest.fixture(scope="module")
def packing():
    system = read(data_file("soft_spheres_2d.xyz"))
    pot = SoftSphere(sigma={"A": 1.0, "B": 1.4})
    return system, pot, relax(system, pot, fmax=1e-10, neighbor_list=False)


def rigid_particles(system, diameters):
    """Particles with at least d + 1 overlapping neighbors (soft spheres touch when
    r < σ_ij); the others are rattlers, which re-relaxations leave anywhere."""
    R, cell = np.asarray(system.positions), np.asarray(system.cell)
    d = np.array([diameters[system.symbols[k]] for k in np.asarray(system.species)])
    D = R[:, None] - R[None]
    frac = D @ np.linalg.inv(cell)
    D = (frac - np.round(frac)) @ cell
    touching = np.linalg.norm(D, axis=-1) < (d[:, None] + d[None]) / 2
    np.fill_diagonal(touching, False)
    return touching.sum(axis=1) > system.dim


def dense_pinv_tangent(pot, system, name, direction):
    """−H⁺ ∂²E/∂R∂θ·direction from the dense all-pairs Hessian at system.positions."""
    energy = pot.energy_fn(system, neighbor_list=False)
    R, cell = system.positions, system.cell
    n = R.size
    H = jax.hessian(energy)(R, pot.params, cell).reshape(n, n)
    mixed = jax.jacfwd(lambda t: jax.grad(energy)(
        R, {**pot.params, name: pot.params[name] + t * direction}, cell))(0.0).reshape(n)
    H_pinv = np.linalg.pinv(np.asarray(H), rcond=1e-10)
    return -(H_pinv @ np.asarray(mixed)).reshape(R.shape)


@pytest.mark.slow  # ~70 s of re-relaxations; the packing is checked against finite differences by test_examples too
def test_periodic_packing_matches_finite_difference_re_relaxation(packing):
    system, pot, result = packing
    name = "sigma"
    direction = jnp.zeros_like(pot.params[name]).at[0, 0].set(1.0)

    def positions(scale):
        p = dict(pot.params)
        p[name] = pot.params[name] + scale * direction
        return relax(result.system, pot, params=p, fmax=1e-11, neighbor_list=False).system.positions

    R_star, tangent = jax.jvp(positions, (0.0,), (1.0,))
    h = 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plus, minus = np.asarray(positions(h)), np.asarray(positions(-h))
    cell = np.asarray(result.system.cell)
    diff = plus - minus
    frac = diff @ np.linalg.inv(cell)
    diff = (frac - np.round(frac)) @ cell  # undo wrapping across the cell
    # rattlers move arbitrarily between re-relaxations: the gauge (no net translation)
    # and the comparison use the rigid particles only
    rigid = rigid_particles(result.system, {"A": 1.0, "B": 1.4})
    diff -= diff[rigid].mean(0)
    fd = diff / (2 * h)
    # FD of re-relaxations carries noise ~ fmax / (λ_min h): a loose check
    tangent_rigid = np.asarray(tangent)[rigid]
    tangent_rigid = tangent_rigid - tangent_rigid.mean(0)
    np.testing.assert_allclose(tangent_rigid, fd[rigid], atol=1e-3 * np.abs(fd[rigid]).max())
    np.testing.assert_allclose(np.asarray(tangent).sum(0), 0.0, atol=1e-9)

    # the tight truth: a dense pseudo-inverse of the Hessian, at the very R* the
    # derivative used
    R = R_star
    dense = dense_pinv_tangent(pot, result.system.replace(positions=R), name, direction)
    np.testing.assert_allclose(np.asarray(tangent), dense, atol=1e-8 * np.abs(dense).max())

    # reverse mode on the same 128-particle periodic packing (the case where a plain CG
    # without the translation null space returns a Jacobian of norm ~1e19): ⟨u, dR*/dθ⟩
    u = np.random.default_rng(0).normal(size=R.shape)
    _, pullback = jax.vjp(positions, 0.0)
    (reverse,) = pullback(jnp.asarray(u))
    np.testing.assert_allclose(float(reverse), float(np.vdot(u, dense)), rtol=1e-8)


@pytest.mark.slow  # ~60 s; the default minimizer's derivative is checked by every other test here
def test_every_minimizer_gives_the_same_derivative(packing):
    system, pot, result = packing

    def energy_derivative(method):
        def e(p):
            return relax(result.system, pot, params=p, fmax=1e-10, minimizer=method,
                         neighbor_list=False, max_steps=200_000).energy
        return jax.grad(e)(pot.params)

    fire, gd, lbfgs = (energy_derivative(m) for m in ("fire", "gradient_descent", "lbfgs"))
    for k in fire:
        np.testing.assert_allclose(fire[k], gd[k], rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(lbfgs[k], gd[k], rtol=1e-7, atol=1e-10)


@pytest.mark.slow  # ~25 s; test_batch.py keeps a vmapped, differentiated relaxation in the default suite
def test_vmap_over_parameter_sets_uses_the_device_loop(cluster):
    system, pot, result = cluster
    eps = jnp.array([0.0104, 0.0208])

    def energy(e):
        p = dict(pot.params)
        p["epsilon"] = e
        return relax(result.system, pot, params=p, fmax=FMAX).energy

    energies = jax.vmap(energy)(eps)
    np.testing.assert_allclose(energies, np.asarray(eps) / 0.0104 * float(result.energy), rtol=1e-9)
    grads = jax.vmap(jax.grad(energy))(eps)
    np.testing.assert_allclose(grads, float(result.energy) / 0.0104, rtol=1e-8)



# Over a minute and a half of compilation; the slow suite (which CI runs) keeps it.
@pytest.mark.slow
def test_neighbor_list_relax_is_differentiable_outside_jit(packing):
    """Systems of N >= 500 use neighbor lists; jax.jvp and jax.vjp of ms.relax work there
    (the list is built on the host at R*, with concrete parameters). Forced on the
    128-particle packing and checked against the dense all-pairs pseudo-inverse; under
    jit the host list cannot be built and the refusal says what to do."""
    system, pot, result = packing
    direction = jnp.zeros_like(pot.params["sigma"]).at[0, 0].set(1.0)

    def positions(scale):
        p = {**pot.params, "sigma": pot.params["sigma"] + scale * direction}
        return relax(result.system, pot, params=p, fmax=1e-11, neighbor_list=True).system.positions

    R_star, tangent = jax.jvp(positions, (0.0,), (1.0,))
    dense = dense_pinv_tangent(pot, result.system.replace(positions=R_star), "sigma", direction)
    np.testing.assert_allclose(np.asarray(tangent), dense, atol=1e-8 * np.abs(dense).max())
    u = np.random.default_rng(1).normal(size=dense.shape)
    (reverse,) = jax.vjp(positions, 0.0)[1](jnp.asarray(u))
    np.testing.assert_allclose(float(reverse), float(np.vdot(u, dense)), rtol=1e-8)
    with pytest.raises(ValueError, match="outside jit"):
        jax.jit(positions)(0.0)
