"""Fast Hessian products and tight neighbor lists against autodiff on the full pair set.

Every derivative routine takes Hessian products at one structure through
``mdsens.md.hessian`` (per-atom blocks of the local energy's Hessian) on the pairs that
interact there (``neighbors.interacting_neighbors``). The truth here is the potential's
dense all-pairs energy and forward-over-reverse autodiff of its gradient: no blocks, no
list. Also: the core's ``operator=`` against the closed-form ridge Jacobian, and a wrong
operator refused.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk

import mdsens as ms
from mdsens.md import neighbors
from mdsens.md.hessian import hessian_products
from mdsens.md.potentials import LennardJones, Morse, SoftSphere, StillingerWeber, Tersoff
from conftest import data_file


def _si(n_rep=2, seed=0):
    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat((n_rep,) * 3)
    del atoms[0]
    atoms.positions += 0.05 * np.random.default_rng(seed).normal(size=atoms.positions.shape)
    return ms.System.from_ase(atoms)


def _cases():
    si = _si()
    ar = ms.read(data_file("ar_fcc_vacancy.xyz"))
    packing = ms.read(data_file("soft_spheres_2d.xyz"))
    cluster = ms.read(data_file("lj13_ar.xyz"))
    return {
        "stillinger-weber": (StillingerWeber(), si),
        "tersoff": (Tersoff.from_lammps(data_file("potentials/Si.tersoff")), si),
        "lennard-jones fcc": (LennardJones(sigma=3.4, epsilon=0.0104, r_cutoff=6.5, r_onset=5.5), ar),
        "lennard-jones cluster": (LennardJones(sigma=3.4, epsilon=0.0104, r_cutoff=8.5, r_onset=6.8), cluster),
        "morse": (Morse(epsilon=0.0104, r0=3.8, rho0=6.0, rcut1=1.4, rcut2=1.7), ar),  # cutoff 6.46 Å
        "soft spheres 2D": (SoftSphere(sigma={"A": 1.0, "B": 1.4}, epsilon=1.0, alpha=2.0), packing),
    }


CASES = _cases()


#: Stillinger–Weber (many-body blocks) runs by default; the pair potentials' blocks are
#: also exercised by every default sensitivity test (against pseudo-inverses and finite
#: differences), so their direct checks, and Tersoff's long compilation, run with the
#: slow suite.
SLOW = {"tersoff", "morse", "lennard-jones cluster", "lennard-jones fcc", "soft spheres 2D"}


def _energy_gradient_hvp(E):
    grad = jax.grad(E)

    @jax.jit
    def run(R, V, p, cell, nb):
        hvp = jax.vmap(lambda v: jax.jvp(lambda x: grad(x, p, cell, nb), (R,), (v,))[1])(V)
        return E(R, p, cell, nb), grad(R, p, cell, nb), hvp

    return run


def _case_lists(name):
    """``(pot, system, full list, tight list, list energy)`` of a case."""
    pot, system = CASES[name]
    full = neighbors.indices_only(pot.neighbor_list(system))
    tight = neighbors.interacting_neighbors(system, pot.cutoff(), full)
    return pot, system, full, tight, pot.energy_fn(system, neighbor_list=True)


#: SW's products on the tight list are checked against autodiff in the default suite
#: (test_block_products_batched_every_way_equal_autodiff). This test adds SW's energy and
#: gradient on the tight list but compiles autodiff's SW Hessian (29 s): a slow one.
TIGHT_LIST_SLOW = SLOW | {"stillinger-weber"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in TIGHT_LIST_SLOW else n
                                  for n in CASES])
def test_tight_list_and_block_hessian_match_autodiff_on_the_full_list(name):
    pot, system, full, tight, E = _case_lists(name)
    R, cell, p = system.positions, system.cell, pot.params
    V = jax.random.normal(jax.random.PRNGKey(3), (2,) + R.shape, jnp.float64)
    e_ref, g_ref, hv_ref = (np.asarray(x) for x in _energy_gradient_hvp(E)(R, V, p, cell, full))
    assert e_ref != 0.0 and np.abs(hv_ref).max() > 0  # the case has interacting pairs

    fast = jax.jit(lambda R, V, p, c, nb: (E(R, p, c, nb), jax.grad(E)(R, p, c, nb),
                                           jax.vmap(hessian_products(E, R, p, c, nb))(V)))
    e, g, hv = (np.asarray(x) for x in fast(R, V, p, cell, tight))
    assert abs(e - e_ref) <= 1e-12 * abs(e_ref)
    assert np.abs(g - g_ref).max() <= 1e-11 * np.abs(g_ref).max()
    assert np.abs(hv - hv_ref).max() <= 1e-10 * np.abs(hv_ref).max()
    assert tight.idx.shape[1] <= full.idx.shape[1]
    # the blocks were used (not the autodiff fallback), read through the mirror slots
    assert E.hessian_products(R, p, cell, tight) is not None and tight.mirror is not None


def test_tight_list_keeps_only_interacting_pairs():
    pot, system = CASES["stillinger-weber"]
    full = pot.neighbor_list(system)
    tight = neighbors.interacting_neighbors(system, pot.cutoff(), full)
    idx = np.asarray(tight.idx)
    n = system.n_atoms
    assert idx.shape[1] < full.idx.shape[1]
    # the same pairs as a brute-force minimum-image search
    frac = np.asarray(system.positions) @ np.linalg.inv(np.asarray(system.cell))
    for i in (0, 7, n - 1):
        d = frac[i] - frac
        d = (d - np.round(d)) @ np.asarray(system.cell)
        r = np.linalg.norm(d, axis=1)
        expected = set(np.flatnonzero((r < 1.01 * pot.cutoff()) & (np.arange(n) != i)))
        assert set(idx[i][idx[i] < n]) == expected


def test_tight_list_from_all_pairs_pads_small_systems():
    # three atoms, no list: the capacity step (4) exceeds the candidates (3)
    system = ms.System(positions=np.array([[0.0, 0, 0], [1.2, 0, 0], [0, 1.3, 0]]), pbc=False)
    tight = neighbors.interacting_neighbors(system, 2.0)
    assert tight.idx.shape == (3, 4)
    assert sorted(np.asarray(tight.idx)[0][:2].tolist()) == [1, 2]


def _brute_mirror(idx):
    n, m = idx.shape
    mirror = {}
    for i in range(n):
        for k in range(m):
            j = idx[i, k]
            if j < n:
                back = [k2 for k2 in range(m) if idx[j, k2] == i]
                mirror[i * m + k] = j * m + back[0] if len(back) == 1 else None
    return mirror


def test_mirror_slots_match_a_brute_force_search_and_flag_asymmetric_lists():
    pot, system = CASES["stillinger-weber"]
    tight = neighbors.interacting_neighbors(system, pot.cutoff(), pot.neighbor_list(system))
    idx = np.asarray(tight.idx)
    expected = _brute_mirror(idx)
    assert None not in expected.values()
    mirror = np.asarray(tight.mirror)  # the tight list carries its mirror slots
    assert all(int(mirror[k]) == v for k, v in expected.items())
    one_way = idx.copy()
    i = 5
    one_way[i, 0] = system.n_atoms  # row i forgets j; row j still holds i
    assert neighbors.mirror_slots(one_way) is None
    twice = idx.copy()
    twice[i, -1] = twice[i, 0]  # the same neighbor twice in one row
    assert neighbors.mirror_slots(twice) is None


def test_block_products_without_mirror_slots_take_the_scatter():
    # A list that holds one pair in one direction only, beyond the cutoff (so the energy
    # is unchanged), has no mirror slots: the products scatter, and equal autodiff on
    # the full list.
    pot, system = CASES["lennard-jones fcc"]
    R, cell, p = system.positions, system.cell, pot.params
    full = neighbors.indices_only(pot.neighbor_list(system))
    idx = np.asarray(full.idx).copy()
    n = system.n_atoms
    frac = np.asarray(R) @ np.linalg.inv(np.asarray(cell))
    d = frac[0] - frac[np.minimum(idx[0], n - 1)]
    r = np.linalg.norm((d - np.round(d)) @ np.asarray(cell), axis=1)
    beyond = np.flatnonzero((idx[0] < n) & (r > pot.cutoff()))
    assert beyond.size > 0
    idx[0, beyond[0]] = n
    assert neighbors.mirror_slots(idx) is None
    one_way = neighbors.NeighborIndices(jnp.asarray(idx))
    E = pot.energy_fn(system, neighbor_list=True)
    V = jax.random.normal(jax.random.PRNGKey(4), (2,) + R.shape, jnp.float64)
    hv_ref = np.asarray(_energy_gradient_hvp(E)(R, V, p, cell, full)[2])
    hv = np.asarray(jax.jit(lambda V: jax.vmap(hessian_products(E, R, p, cell, one_way))(V))(V))
    assert np.abs(hv - hv_ref).max() <= 1e-10 * np.abs(hv_ref).max()


@pytest.mark.parametrize("name", ["stillinger-weber", pytest.param("lennard-jones fcc", marks=pytest.mark.slow)])
def test_block_products_batched_every_way_equal_autodiff(name):
    # The product's batching rule moves a batch of columns last; nested batches, a batch
    # of structures (the blocks batched too, as in ms.relax_batch) and a jvp take other
    # routes. Each equals forward-over-reverse autodiff on the full list.
    pot, system, full, tight, E = _case_lists(name)
    R, cell, p = system.positions, system.cell, pot.params
    V = jax.random.normal(jax.random.PRNGKey(5), (2, 3) + R.shape, jnp.float64)
    shift = 1e-3 * jax.random.normal(jax.random.PRNGKey(6), R.shape, jnp.float64)
    Rs = jnp.stack([R, R + shift])  # both within the tight list's margin
    run = _energy_gradient_hvp(E)
    ref = np.stack([np.asarray(run(r, V[k], p, cell, full)[2]) for k, r in enumerate(Rs)])
    scale = np.abs(ref).max()

    single = jax.jit(lambda v: hessian_products(E, R, p, cell, tight)(v))(V[0, 0])
    nested = jax.jit(lambda V: jax.vmap(jax.vmap(hessian_products(E, R, p, cell, tight)))(V))(
        jnp.stack([V[0], V[0]]))
    structures = jax.jit(jax.vmap(lambda r, v: jax.vmap(hessian_products(E, r, p, cell, tight))(v)))(Rs, V)
    _, tangent = jax.jit(lambda v, t: jax.jvp(hessian_products(E, R, p, cell, tight), (v,), (t,)))(V[0, 0], V[0, 1])
    assert np.abs(np.asarray(single) - ref[0, 0]).max() <= 1e-10 * scale
    assert np.abs(np.asarray(nested) - ref[0][None]).max() <= 1e-10 * scale
    assert np.abs(np.asarray(structures) - ref).max() <= 1e-10 * scale
    assert np.abs(np.asarray(tangent) - ref[0, 1]).max() <= 1e-10 * scale
    assert tight.mirror is not None


@pytest.mark.parametrize("name", ["lennard-jones fcc", "soft spheres 2D", *(pytest.param(n, marks=pytest.mark.slow)
                                                               for n in ("lennard-jones cluster", "morse"))])
def test_pair_potentials_row_local_gradient_equals_autodiff(name):
    # The relaxation loop's (E, ∇E) of a pair potential sums each row's own slots
    # (doubled) instead of transposing the gather; against jax.value_and_grad of the same
    # energy, off the minimum, on the full list, the loop's short list and the dense path.
    pot, system = CASES[name]
    R = system.positions + 0.03 * jax.random.normal(jax.random.PRNGKey(7), system.positions.shape, jnp.float64)
    cell, p = system.cell, pot.params
    cut = pot.cutoff()
    nl = pot.neighbor_list_fn(system, p, cutoff=cut, short_skin=neighbors.SHORT_SKIN_FRACTION * cut)
    lists = {"full": nl.allocate(R, cell), "short": nl.allocate(R, cell, short=True, interaction_cutoff=cut)}
    for label, neighbor, E in [*((k, nb, pot.energy_fn(system, neighbor_list=True)) for k, nb in lists.items()),
                               ("dense", None, pot.energy_fn(system, neighbor_list=False))]:
        e_ref, g_ref = jax.jit(jax.value_and_grad(E))(R, p, cell, neighbor)
        e, g = jax.jit(E.value_and_gradient)(R, p, cell, neighbor)
        assert abs(float(e - e_ref)) <= 1e-13 * abs(float(e_ref)), label
        assert float(jnp.max(jnp.abs(g - g_ref))) <= 1e-12 * float(jnp.max(jnp.abs(g_ref))), label
    if name == "lennard-jones fcc":
        # a list allocated for a 12 % wider box overflows in this one: inside jit NaN, as
        # the energy gives (outside, the energy's host check refuses the list)
        broken = nl.update(R, nl.allocate(R * 1.12, cell * 1.12), cell)
        assert bool(broken.did_buffer_overflow)
        e, g = jax.jit(pot.energy_fn(system, neighbor_list=True).value_and_gradient)(R, p, cell, broken)
        assert np.isnan(float(e)) and np.all(np.isnan(np.asarray(g)))
    assert not hasattr(StillingerWeber().energy_fn(_si(), neighbor_list=True), "value_and_gradient")


# --------------------------------------------------------------------- core: operator=
rng = np.random.default_rng(0)
X = rng.normal(size=(30, 6))
Y = rng.normal(size=30)


def ridge_F(w, lam):
    return X.T @ (X @ w - Y) + lam * w


def test_operator_gives_the_closed_form_ridge_jacobian_in_both_modes():
    lam = 0.7
    A = X.T @ X + lam * np.eye(6)
    w = np.linalg.solve(A, X.T @ Y)
    truth = -np.linalg.solve(A, w)  # dw*/dλ
    op = lambda v: jnp.asarray(A) @ v  # noqa: E731
    solve = functools.partial(ms.linear_solve.cg, tol=1e-13)
    jv = ms.root_jvp(ridge_F, jnp.asarray(w), (lam,), (1.0,), solve=solve, symmetric=True, operator=op)
    np.testing.assert_allclose(jv, truth, rtol=1e-10)
    u = rng.normal(size=6)
    (vj,) = ms.root_vjp(ridge_F, jnp.asarray(w), (lam,), jnp.asarray(u), solve=solve, symmetric=True, operator=op)
    np.testing.assert_allclose(float(vj), u @ truth, rtol=1e-10)


def test_wrong_operator_is_refused():
    lam = 0.7
    A = X.T @ X + lam * np.eye(6)
    w = np.linalg.solve(A, X.T @ Y)
    with pytest.raises(ms.LinearSolveError, match="operator= does not apply"):
        ms.root_jvp(ridge_F, jnp.asarray(w), (lam,), (1.0,), operator=lambda v: 2.0 * jnp.asarray(A) @ v)
