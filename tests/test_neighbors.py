"""Neighbor lists: same energies/forces as the dense path (1e-12), automatic switch,
growth of the interaction range with a parameter, overflow and box deformation.

The dense all-pairs path is the reference (itself validated against ASE in
test_potentials.py); every list-based result must agree with it to 1e-12.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk

import mdsens as ms
from mdsens.md import neighbors
from mdsens.md.potentials import LennardJones, SoftSphere

SIGMA, EPS = 3.4, 0.0104


def ar(repeat=4, a=5.26, rattle=0.1, seed=11):
    atoms = bulk("Ar", "fcc", a=a, cubic=True).repeat(repeat)
    del atoms[0]
    atoms.rattle(rattle, seed=seed)
    return ms.System.from_ase(atoms)


def dense_ef(pot, system, params):
    E = pot.energy_fn(system, neighbor_list=False, params=params)
    e, g = jax.jit(jax.value_and_grad(E))(system.positions, params, system.cell)
    return float(e), -np.asarray(g)


def nl_ef(pot, system, params, nbrs):
    E = pot.energy_fn(system, neighbor_list=True, params=params)
    e, g = jax.jit(jax.value_and_grad(E))(system.positions, params, system.cell, nbrs)
    return float(e), -np.asarray(g)


def assert_same(a, b):
    (ea, fa), (eb, fb) = a, b
    assert abs(ea - eb) < 1e-12 * abs(eb)
    assert np.max(np.abs(fa - fb)) < 1e-12 * np.max(np.abs(fb))


def test_automatic_switch_at_documented_size():
    assert neighbors.NEIGHBOR_LIST_MIN_ATOMS == 500
    assert not neighbors.use_neighbor_list(499) and neighbors.use_neighbor_list(500)
    rng = np.random.default_rng(0)
    n, L = 500, 30.0
    g = np.stack(np.meshgrid(np.arange(25), np.arange(20), indexing="ij"), -1).reshape(-1, 2)
    pos = (g + 0.5 + 0.2 * rng.standard_normal(g.shape)) * np.array([L / 25, L / 20])
    system = ms.System(positions=pos, cell=np.eye(2) * L, species=np.arange(n) % 2, symbols=("A", "B"), pbc=True)
    pot = SoftSphere(sigma=[[1.3, 1.5], [1.5, 1.7]], alpha=2.0)
    E = pot.energy_fn(system)  # automatic: N = 500 -> neighbor list
    with pytest.raises(ValueError, match="neighbor"):
        E(system.positions, pot.params, system.cell)
    nbrs = pot.neighbor_list(system)
    assert isinstance(nbrs, neighbors.Neighbors)
    assert_same(nl_ef(pot, system, pot.params, nbrs), dense_ef(pot, system, pot.params))
    # host wrappers use the list automatically and agree too
    e_dense, _ = dense_ef(pot, system, pot.params)
    assert abs(float(pot.energy(system)) - e_dense) < 1e-12 * abs(e_dense)


def binary_packing(n, seed=0):
    """A 2D binary soft-sphere packing (diameters 0.6 and 1, as the paper's figure) at
    packing fraction 0.98."""
    side = np.sqrt(n * np.pi * (1 + 0.6**2) / 8 / 0.98)
    pos = np.random.default_rng(seed).uniform(0, side, (n, 2))
    system = ms.System(positions=pos, cell=np.eye(2) * side, species=np.arange(n) % 2, symbols=("A", "B"), pbc=True)
    return system, SoftSphere(sigma=[[0.6, 0.8], [0.8, 1.0]], alpha=2.0, symbols=("A", "B"))


def test_automatic_switch_below_500_atoms_follows_the_cell_share_of_the_list_sphere():
    packing, soft = binary_packing(128)
    side = float(packing.cell[0, 0])
    share = neighbors.list_share(packing, soft.cutoff())
    assert abs(share - np.pi * (1.1 * 1.0) ** 2 / side**2) < 1e-12  # closed form: disc / cell
    assert share <= neighbors.SPARSE_LIST_MAX_SHARE and soft.uses_neighbor_list(packing)
    small, _ = binary_packing(neighbors.SPARSE_LIST_MIN_ATOMS - 2)
    assert not soft.uses_neighbor_list(small)  # too few atoms for any list to pay
    crowded = ar(repeat=4)  # 255 atoms; the 3σ sphere (+10 % skin) covers 64 % of the cell
    lj = LennardJones(SIGMA, EPS)
    assert neighbors.list_share(crowded, lj.cutoff()) > neighbors.SPARSE_LIST_MAX_SHARE
    assert not lj.uses_neighbor_list(crowded)
    assert LennardJones(SIGMA, EPS, r_cutoff=7.5, r_onset=6.0).uses_neighbor_list(ar(repeat=5))  # share 0.13
    assert neighbors.list_share(packing.replace(pbc=False), soft.cutoff()) is None  # free: the count alone


def test_jit_of_relax_falls_back_to_all_pairs_when_lists_were_chosen_automatically():
    system, pot = binary_packing(128)
    host = ms.relax(system, pot, fmax=1e-10, max_steps=100000)
    assert host.neighbor is not None  # the automatic choice: a list
    start = system.replace(positions=host.system.positions + 1e-3 * np.random.default_rng(1).normal(size=(128, 2)))
    energy = jax.jit(lambda p: ms.relax(start, pot, params=p, fmax=1e-10, max_steps=100000).energy)(pot.params)
    assert abs(float(energy) - float(host.energy)) < 1e-10 * abs(float(host.energy))
    with pytest.raises(ms.OptionError, match="neighbor_list=False"):
        jax.jit(lambda p: ms.relax(start, pot, params=p, neighbor_list=True).energy)(pot.params)


def test_neighbor_list_equals_dense_lj_and_free_cluster():
    system = ar()
    pot = LennardJones(SIGMA, EPS)
    assert_same(nl_ef(pot, system, pot.params, pot.neighbor_list(system)), dense_ef(pot, system, pot.params))
    from ase.cluster import Icosahedron

    atoms = Icosahedron("Ar", noshells=3, latticeconstant=5.26)
    atoms.rattle(0.05, seed=1)
    free = ms.System.from_ase(atoms)
    assert_same(nl_ef(pot, free, pot.params, pot.neighbor_list(free)), dense_ef(pot, free, pot.params))


def test_parameter_that_grows_the_range_reallocates():
    # r_c = 3σ is tied to σ: a larger σ needs a longer list. 5x5x5 cell: half-width 13.15 Å.
    system = ar(repeat=5, rattle=0.05)
    pot = LennardJones(SIGMA, EPS)
    nl = pot.neighbor_list_fn(system)
    nbrs = nl.allocate(system.positions, system.cell)
    grown = {"sigma": jnp.asarray(4.1), "epsilon": jnp.asarray(EPS)}  # r_c = 12.3 Å
    assert pot.cutoff(grown) > nl.list_radius  # the old list cannot cover it
    dense = dense_ef(pot, system, grown)
    stale = nl_ef(pot, system, grown, nbrs)
    assert abs(stale[0] - dense[0]) > 1e-6 * abs(dense[0])  # the pitfall is real
    nl2, nbrs2 = neighbors.refresh(nl, nbrs, system, pot.cutoff(grown))
    assert nl2.cutoff == pytest.approx(pot.cutoff(grown)) and nbrs2.cutoff >= pot.cutoff(grown)
    assert_same(nl_ef(pot, system, grown, nbrs2), dense)
    # a list that already covers the range is kept (updated, not reallocated)
    nl3, _ = neighbors.refresh(nl2, nbrs2, system, pot.cutoff(pot.params))
    assert nl3 is nl2


def test_overflow_inside_jit_is_detected_and_reallocated():
    pot = LennardJones(SIGMA, EPS)
    loose = ar(a=5.26 * 1.12, rattle=0.0)
    tight = ar(a=5.26, rattle=0.1)
    nl = pot.neighbor_list_fn(loose, skin=0.5)
    nbrs = nl.allocate(loose.positions, loose.cell)
    new = jax.jit(nl.update)(tight.positions, nbrs, tight.cell)  # box shrinks 11 %
    assert bool(new.did_buffer_overflow) and new.needs_reallocation()
    nl2, nbrs2 = neighbors.refresh(nl, nbrs, tight, pot.cutoff())
    assert not nbrs2.needs_reallocation()
    assert nbrs2.idx.shape[1] > nbrs.idx.shape[1]
    assert_same(nl_ef(pot, tight, pot.params, nbrs2), dense_ef(pot, tight, pot.params))


def test_box_deformation_forces_a_rebuild():
    pot = LennardJones(SIGMA, EPS)
    system = ar(rattle=0.05)
    nl = pot.neighbor_list_fn(system)
    nbrs = nl.allocate(system.positions, system.cell, extra_capacity=40)
    F = np.eye(3) + np.array([[0.05, 0.01, 0.0], [0.01, 0.03, 0.0], [0.0, 0.0, 0.06]])
    strained = system.replace(positions=system.positions @ F, cell=system.cell @ F)
    assert np.linalg.norm(F - np.eye(3), 2) > nl.max_strain
    new = jax.jit(nl.update)(strained.positions, nbrs, strained.cell)  # atoms did not move in fractional terms
    assert not bool(new.did_buffer_overflow)
    assert not np.allclose(np.asarray(new.reference_box), np.asarray(nbrs.reference_box))  # rebuilt
    assert_same(nl_ef(pot, strained, pot.params, new), dense_ef(pot, strained, pot.params))
    # a small strain is absorbed by the margin without a rebuild
    Fs = np.eye(3) * (1 + 0.2 * nl.max_strain)
    small = jax.jit(nl.update)(system.positions @ Fs, nbrs, system.cell @ Fs)
    np.testing.assert_array_equal(np.asarray(small.reference_box), np.asarray(nbrs.reference_box))


def test_metric_box_preserves_distances():
    rng = np.random.default_rng(3)
    cell = rng.standard_normal((3, 3)) + 4 * np.eye(3)
    R = np.asarray(neighbors.metric_box(cell))
    assert np.allclose(np.tril(R, -1), 0) and np.all(np.diag(R) > 0)
    s = rng.standard_normal((20, 3))
    np.testing.assert_allclose(np.linalg.norm(s @ cell, axis=1), np.linalg.norm(s @ R.T, axis=1), rtol=1e-13)


def test_derivatives_reuse_the_relaxation_list_only_while_it_covers_the_range():
    """RelaxResult.neighbor (built at R*) serves the derivatives unless a parameter grew
    the interaction range past the list, or the structure is not the relaxed one."""
    from mdsens.md.problem import relaxation_neighbors

    rng = np.random.default_rng(3)
    n, L = 500, 60.0  # dilute: no contacts, already relaxed at step 0
    system = ms.System(rng.uniform(0, L, (n, 2)), cell=np.eye(2) * L, pbc=True)
    pot = ms.potentials.SoftSphere(sigma=1.0)
    res = ms.make_relax(pot, system)(system, fmax=1e-8)
    assert res.converged and isinstance(res.neighbor, neighbors.Neighbors)
    assert relaxation_neighbors(res, res.system, pot.cutoff()) is res.neighbor
    grown = res.neighbor.cutoff * 1.01
    assert relaxation_neighbors(res, res.system, grown) is None
    moved = res.system.replace(positions=res.system.positions + 0.1)
    assert relaxation_neighbors(res, moved, pot.cutoff()) is None


@pytest.mark.parametrize("periodic, repeat", [(True, 2), (False, 2), (True, 1)])
def test_host_allocation_equals_jax_md_allocation(periodic, repeat):
    """The host allocation (small systems) picks jax-md's pairs and capacity exactly: by
    k-d tree where the list radius is below half the cell (free systems always), by all
    pairs in numpy where it is not (the single 8-atom cell)."""
    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat((repeat,) * 3)
    del atoms[5]
    atoms.rattle(0.1, seed=3)
    system = ms.System.from_ase(atoms)
    if not periodic:
        system = ms.System(positions=system.positions, species=system.species, symbols=system.symbols, pbc=False)
    nl = neighbors.neighbor_list_fn(system, 3.2, capacity_multiplier=1.3)
    ours = nl.allocate(system.positions, system.cell if periodic else None, extra_capacity=2)
    x, kw = nl._frac(system.positions, system.cell if periodic else None)
    theirs = nl._fns.allocate(x, extra_capacity=2, **kw)
    assert ours.nbrs.max_occupancy == theirs.max_occupancy == ours.idx.shape[1]
    n = system.n_atoms
    pairs = lambda idx: {(i, int(j)) for i, row in enumerate(np.asarray(idx)) for j in row if j < n}  # noqa: E731
    assert pairs(ours.idx) == pairs(theirs.idx) and len(pairs(ours.idx)) > 3 * n
    assert (nl.list_radius < 0.5 * 5.431 * repeat) == (repeat == 2)  # both host paths are taken
    # and it updates inside jit like jax-md's own list
    moved = system.positions + 0.4 * nl.skin
    updated = jax.jit(lambda R, nb: nl.update(R, nb, system.cell if periodic else None))(moved, ours)
    reference = nl._fns.allocate(nl._frac(moved, system.cell if periodic else None)[0], **kw)
    assert pairs(updated.idx) == pairs(reference.idx) and not updated.needs_reallocation()


def _silicon_999():
    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat((5, 5, 5))
    del atoms[7]
    atoms.rattle(0.1, seed=4)
    return ms.System.from_ase(atoms), 3.2


def _discs_2d():
    rng = np.random.default_rng(5)
    cell = np.diag([40.0, 31.0])
    positions = rng.uniform(size=(900, 2)) @ cell
    return ms.System(positions=positions, species=np.zeros(900, int), symbols=("A",), cell=cell, pbc=True), 2.5


@pytest.mark.parametrize("build", [_silicon_999, _discs_2d])
def test_tree_allocation_of_a_rectangular_cell_equals_jax_md_allocation(build):
    """Above HOST_ALLOCATION_MAX_ATOMS a rectangular cell's list comes from scipy's
    periodic k-d tree: jax-md's own allocation is the truth for its pairs, capacity and
    cell list, and the list rebuilds inside jit (through that cell list) as jax-md's does."""
    system, cutoff = build()
    assert system.n_atoms > neighbors.HOST_ALLOCATION_MAX_ATOMS
    nl = neighbors.neighbor_list_fn(system, cutoff, capacity_multiplier=1.3)
    assert nl.cell_list
    ours = nl.allocate(system.positions, system.cell, extra_capacity=2)
    x, kw = nl._frac(system.positions, system.cell)
    theirs = nl._fns.allocate(x, extra_capacity=2, **kw)
    assert ours.nbrs.max_occupancy == theirs.max_occupancy == ours.idx.shape[1]
    assert float(ours.nbrs.cell_size) == pytest.approx(float(theirs.cell_size), rel=1e-12)
    # jax-md's capacity estimate (the fullest cell, times the multiplier, plus the extra),
    # raised where the 3^d candidate cells could not hold every slot
    assert ours.nbrs.cell_list_capacity == max(theirs.cell_list_capacity, -(-ours.idx.shape[1] // 3 ** system.dim))
    n = system.n_atoms
    pairs = lambda idx: {(i, int(j)) for i, row in enumerate(np.asarray(idx)) for j in row if j < n}  # noqa: E731
    assert pairs(ours.idx) == pairs(theirs.idx) and len(pairs(ours.idx)) > 3 * n
    moved = system.positions + 0.6 * nl.skin * np.random.default_rng(0).normal(size=system.positions.shape)
    updated = jax.jit(lambda R, nb: nl.update(R, nb, system.cell))(moved, ours)
    reference = nl._fns.allocate(nl._frac(moved, system.cell)[0], **kw)
    assert not np.array_equal(np.asarray(updated.nbrs.reference_position), np.asarray(ours.nbrs.reference_position))
    assert pairs(updated.idx) == pairs(reference.idx) and not updated.needs_reallocation()


# ------------------------------------------------------------------- short lists
def si_vacancy(repeat=2, rattle=0.02, seed=0):
    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat(repeat)
    del atoms[0]
    atoms.positions += rattle * np.random.default_rng(seed).normal(size=atoms.positions.shape)
    return ms.System.from_ase(atoms)


def short_list_fn(pot, system):
    return pot.neighbor_list_fn(system, short_skin=neighbors.SHORT_SKIN_FRACTION * pot.cutoff())


def test_short_list_holds_exactly_the_pairs_within_its_radius():
    from ase.neighborlist import neighbor_list

    system = si_vacancy()
    pot = ms.potentials.StillingerWeber()
    nl = short_list_fn(pot, system)
    nbrs = nl.allocate(system.positions, system.cell, short=True)
    assert nbrs.short is not None and neighbors.short_list_pays(nbrs.short.idx.shape[1], nbrs.idx.shape[1])
    i, j = neighbor_list("ij", system.to_ase(), nl.short_radius)  # ASE's own list: the truth
    idx = np.asarray(nbrs.short.idx)
    ours = {(a, int(b)) for a in range(system.n_atoms) for b in idx[a] if b < system.n_atoms}
    assert ours == set(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize("strain", [0.0, 0.004])
def test_short_list_energy_equals_dense_along_a_path_of_updates(strain):
    """Small moves keep the short list, larger ones (and box strain) rebuild it; the
    energy and forces with it equal the all-pairs path at every point."""
    system = si_vacancy()
    pot = ms.potentials.StillingerWeber()
    nl = short_list_fn(pot, system)
    nbrs = nl.allocate(system.positions, system.cell, short=True)
    update = jax.jit(nl.update)
    with_list = jax.jit(jax.value_and_grad(pot.energy_fn(system, neighbor_list=True)))
    all_pairs = jax.jit(jax.value_and_grad(pot.energy_fn(system, neighbor_list=False)))
    rng = np.random.default_rng(5)
    rebuilt = 0
    for k in range(8):
        F = np.eye(3) * (1 + strain * k)
        R = (system.positions + 0.003 * k * rng.normal(size=system.positions.shape)) @ F
        cell = system.cell @ F
        new = update(R, nbrs, cell)
        assert not new.needs_reallocation()
        rebuilt += int(not np.array_equal(np.asarray(new.short.reference), np.asarray(nbrs.short.reference)))
        (e, g), (e_ref, g_ref) = with_list(R, pot.params, cell, new), all_pairs(R, pot.params, cell)
        assert_same((float(e), np.asarray(g)), (float(e_ref), np.asarray(g_ref)))
        nbrs = new
    assert 0 < rebuilt < 8


def test_short_list_overflow_sets_the_list_flag():
    system = si_vacancy(rattle=0.0)
    pot = ms.potentials.StillingerWeber()
    nl = short_list_fn(pot, system)
    nbrs = nl.allocate(system.positions, system.cell, short=True)
    K = nbrs.short.idx.shape[1]
    # 3 % compression brings the second shell (3.84 Å) inside the cutoff (3.77 Å): 16 pairs
    squeezed = system.replace(positions=system.positions * 0.97, cell=system.cell * 0.97)
    new = jax.jit(nl.update)(squeezed.positions, nbrs, squeezed.cell)
    assert K < 16 and bool(new.did_buffer_overflow) and new.needs_reallocation()


def test_relaxation_with_short_lists_matches_the_dense_relaxation():
    """L-BFGS with short lists (forced neighbor lists) and without lists (all pairs)
    reach the same minimum; the list handed back carries no short list."""
    system = si_vacancy()
    pot = ms.potentials.StillingerWeber()
    with_lists = ms.relax(system, pot, fmax=1e-9, neighbor_list=True)
    dense = ms.relax(system, pot, fmax=1e-9, neighbor_list=False)
    assert with_lists.neighbor.short is None
    assert abs(float(with_lists.energy) - float(dense.energy)) < 1e-10
    np.testing.assert_allclose(np.asarray(with_lists.system.positions), np.asarray(dense.system.positions), atol=1e-8)


def test_wide_pair_lists_get_a_short_list_and_relax_to_the_dense_minimum():
    """LJ fcc Ar (r_c 7.5 Å, N = 255): ~55 % of the list's slots interact, a short list pays
    and the relaxation reaches the minimum of the all-pairs path; a 2D packing's narrow
    list keeps none."""
    system = ar(repeat=4, rattle=0.02)
    pot = LennardJones(SIGMA, EPS, r_cutoff=7.5, r_onset=6.0)
    nl = pot.neighbor_list_fn(system, short_skin=neighbors.SHORT_SKIN_FRACTION * pot.cutoff())
    nbrs = nl.allocate(system.positions, system.cell, short=True)
    K, M = nbrs.short.idx.shape[1], nbrs.idx.shape[1]
    assert neighbors.SHORT_MAX_FILL * M < K <= neighbors.SHORT_WIDE_MAX_FILL * M  # the wide rule decides
    listed = ms.relax(system, pot, fmax=1e-10, neighbor_list=True)
    dense = ms.relax(system, pot, fmax=1e-10, neighbor_list=False)
    assert listed.converged and dense.converged
    assert abs(float(listed.energy) - float(dense.energy)) < 1e-12 * abs(float(dense.energy))
    np.testing.assert_allclose(np.asarray(listed.system.positions), np.asarray(dense.system.positions), atol=1e-8)

    packing, soft = binary_packing(128)
    nl = soft.neighbor_list_fn(packing, short_skin=neighbors.SHORT_SKIN_FRACTION * soft.cutoff())
    assert nl.allocate(packing.positions, packing.cell, short=True).short is None


def test_short_list_of_a_wider_list_holds_exactly_the_pairs_of_the_interaction_cutoff():
    """A list built 10 % wider than the parameters need (a cutoff that grew) keeps its
    short list at the parameters' own cutoff: ASE's list at that radius is the truth."""
    from ase.neighborlist import neighbor_list

    system = si_vacancy()
    pot = ms.potentials.StillingerWeber()
    cutoff = float(pot.cutoff())
    skin = neighbors.SHORT_SKIN_FRACTION * cutoff
    nl = pot.neighbor_list_fn(system, cutoff=1.1 * cutoff, short_skin=skin)
    nbrs = nl.allocate(system.positions, system.cell, short=True, interaction_cutoff=cutoff)
    i, j = neighbor_list("ij", system.to_ase(), cutoff + skin)
    idx = np.asarray(nbrs.short.idx)
    ours = {(a, int(b)) for a in range(system.n_atoms) for b in idx[a] if b < system.n_atoms}
    assert ours == set(zip(i.tolist(), j.tolist()))
    assert len(ours) < 0.5 * len(neighbor_list("i", system.to_ase(), nl.short_radius))  # 2nd shell left out
    with pytest.raises(ms.PotentialError, match="must cover"):
        pot.neighbor_list_fn(system, cutoff=0.9 * cutoff)
    with pytest.raises(ms.NeighborListError, match="interaction_cutoff"):
        nl.allocate(system.positions, system.cell, short=True, interaction_cutoff=1.2 * cutoff)


def test_allocation_like_an_earlier_list_keeps_its_shapes_and_its_pairs():
    """``like=`` pads every capacity up to the earlier list's (never down); the padded
    list gives the all-pairs energy and forces (the truth) to 1e-12."""
    pot = ms.potentials.StillingerWeber()
    system = si_vacancy()
    nl = short_list_fn(pot, system)
    wide = nl.allocate(system.positions, system.cell, short=True, extra_capacity=4)  # as after an overflow
    plain = nl.allocate(system.positions, system.cell, short=True)
    padded = nl.allocate(system.positions, system.cell, short=True, like=wide)
    assert wide.idx.shape[1] > plain.idx.shape[1] and wide.short.idx.shape[1] > plain.short.idx.shape[1]
    assert padded.idx.shape == wide.idx.shape and padded.short.idx.shape == wide.short.idx.shape
    assert nl.allocate(system.positions, system.cell, short=True, like=plain).idx.shape == plain.idx.shape
    no_short = nl.allocate(system.positions, system.cell)
    assert nl.allocate(system.positions, system.cell, short=True, like=no_short).short is None  # same pytree
    params = pot.params
    assert_same(nl_ef(pot, system, params, padded), dense_ef(pot, system, params))


def test_relaxations_at_drifting_parameters_compile_a_bounded_number_of_programs(caplog):
    """A fit-like path (σ up 1 % per call, then back down) used to compile the relaxation
    again at every new cutoff and every new list capacity, until the process ran out of
    code mappings. Lists are now built with headroom and capacities only grow: a handful
    of compilations for 16 relaxations, and each result is the all-pairs minimum."""
    import logging

    pot = ms.potentials.StillingerWeber()
    system = si_vacancy()
    sigmas = float(pot.params["sigma"]) * np.concatenate([1.0 + 0.01 * np.arange(8), 1.07 - 0.01 * np.arange(1, 9)])
    at = lambda s: {**pot.params, "sigma": jnp.asarray(s)}  # noqa: E731
    ms.relax(system, pot, params=at(sigmas[0]), fmax=1e-8, neighbor_list=True)  # compile
    jax.config.update("jax_log_compiles", True)
    results, compiled = [], []
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            for s in sigmas[1:]:
                caplog.clear()
                results.append(ms.relax(system, pot, params=at(s), fmax=1e-8, neighbor_list=True))
                compiled.append(sum("Finished XLA compilation" in r.getMessage() for r in caplog.records))
    finally:
        jax.config.update("jax_log_compiles", False)
    # The first calls compile for the wider list and for the second shell entering the
    # short list (σ + 2 %: a real change of the interacting pairs); then nothing more,
    # where every step up used to compile three to five programs.
    assert sum(compiled) <= 16 and sum(compiled[3:]) == 0, compiled
    for s, r in list(zip(sigmas[1:], results))[::5]:
        dense = ms.relax(r.system, pot, params=at(s), fmax=1e-8, neighbor_list=False)
        assert r.converged and abs(float(r.energy) - float(dense.energy)) < 1e-9
