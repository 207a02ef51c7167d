"""Your own potential: ``ms.potentials.from_energy_fn`` and ``from_jax_md``.

Truths: the built-in Morse (its own code path: ``_local_energy``, block Hessians) for a
hand-written Morse; jax-md's own all-pairs evaluation of its networks; central finite
differences of re-relaxations for a relaxed structure under a neural-network potential,
and forward/reverse consistency ``⟨u, J v⟩ = ⟨Jᵀ u, v⟩``.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk
from ase.cluster import Icosahedron

import mdsens as ms

MORSE = dict(epsilon=0.35, r0=2.6, rho0=4.0, rcut1=1.15, rcut2=1.4)  # range rcut2·r0 = 3.64 Å


def morse_by_hand(positions, params, cell, neighbor):
    """ASE's Morse with its quintic cutoff, written as a user would."""
    dR, mask = ms.potentials.neighbor_displacements(positions, cell, neighbor)
    r = jnp.linalg.norm(dR, axis=-1)
    r0 = params["r0"]
    r1, r2 = params["rcut1"] * r0, params["rcut2"] * r0
    s = 1.0 - (r - r1) / (r2 - r1)
    fc = jnp.where(s >= 1.0, 1.0, jnp.where(s > 0.0, 6 * s**5 - 15 * s**4 + 10 * s**3, 0.0))
    e = jnp.exp(params["rho0"] * (1.0 - r / r0))
    return 0.5 * jnp.sum(jnp.where(mask, params["epsilon"] * e * (e - 2.0) * fc, 0.0))


def morse_pair():
    ref = ms.potentials.Morse(**MORSE)
    return ref, ms.potentials.from_energy_fn(morse_by_hand, dict(MORSE), cutoff=ref.cutoff())


def cu_vacancy():
    """fcc (a = 3.7 Å, first neighbors at 2.62 Å) 2x2x2 cubic, one vacancy, rattled: 31 atoms."""
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 2, 2))
    del atoms[0]
    atoms.positions += 0.05 * np.random.default_rng(0).standard_normal(atoms.positions.shape)
    return ms.System.from_ase(atoms)


def cluster13(r0=2.6, seed=0):
    atoms = Icosahedron("Ar", 2, latticeconstant=r0 * np.sqrt(2))
    atoms.positions += 0.05 * np.random.default_rng(seed).standard_normal(atoms.positions.shape)
    return ms.System.from_ase(atoms)


def rigid_projector(R):
    """``I − Q Qᵀ`` on ``(N·3)`` vectors, ``Q`` the 6 rigid modes of a free cluster at ``R``."""
    R = np.asarray(R)
    n = R.shape[0]
    c = R - R.mean(0)
    modes = [np.tile(e, n) for e in np.eye(3)] + [np.cross(e, c).ravel() for e in np.eye(3)]
    q, _ = np.linalg.qr(np.stack(modes, 1))
    return np.eye(3 * n) - q @ q.T


# ------------------------------------------------------------------ 1. hand-written Morse
@pytest.mark.parametrize("neighbor_list", [False, True])
def test_energy_forces_stress_and_parameter_gradient_match_builtin_morse(neighbor_list):
    ref, pot = morse_pair()
    system = cu_vacancy()
    out = []
    for p in (ref, pot):
        E = p.energy_fn(system, neighbor_list=neighbor_list)
        nb = p.neighbor_list(system) if neighbor_list else None
        f = jax.jit(lambda R, q, C, nb, E=E: (E(R, q, C, nb), jax.grad(E, argnums=(0, 1, 2))(R, q, C, nb)))
        out.append(f(system.positions, p.params, system.cell, nb))
    (e1, (g1, p1, c1)), (e2, (g2, p2, c2)) = out
    assert abs(float(e1)) > 10.0  # a real structure, not an empty sum
    np.testing.assert_allclose(float(e2), float(e1), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(g2), np.asarray(g1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(c2), np.asarray(c1), rtol=0, atol=1e-12)  # cell: stress
    assert set(p2) == set(p1)
    for k in p1:
        np.testing.assert_allclose(float(p2[k]), float(p1[k]), rtol=1e-12, atol=1e-12)
    if not neighbor_list:  # the host wrappers, once
        np.testing.assert_allclose(np.asarray(pot.stress(system)), np.asarray(ref.stress(system)), atol=1e-14)


def test_relaxed_structure_and_sensitivities_match_builtin_morse():
    ref, pot = morse_pair()
    system = cluster13()
    res_ref = ms.relax(system, ref, fmax=1e-10)
    res = ms.relax(system, pot, fmax=1e-10)
    assert res.converged and res_ref.converged and res.fmax < 1e-10
    np.testing.assert_allclose(res.energy, res_ref.energy, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(res.system.positions), np.asarray(res_ref.system.positions), atol=1e-9)
    s_ref = ms.sensitivity(res_ref, ref, stability=False)
    s = ms.sensitivity(res, pot, stability=False)
    assert s.names == s_ref.names == ("epsilon", "r0", "rcut1", "rcut2", "rho0")
    assert np.max(np.abs(s_ref.dpositions)) > 0.1  # r0 moves every atom
    np.testing.assert_allclose(s.dpositions, s_ref.dpositions, rtol=0, atol=1e-8)
    np.testing.assert_allclose(s.denergy, s_ref.denergy, rtol=1e-8, atol=1e-10)


@pytest.mark.slow
def test_relax_and_sensitivity_on_neighbor_lists_match_builtin_morse():
    ref, pot = morse_pair()
    system = cu_vacancy()
    res_ref = ms.relax(system, ref, fmax=1e-10, neighbor_list=True)
    res = ms.relax(system, pot, fmax=1e-10, neighbor_list=True)
    assert res.neighbor is not None and res.converged
    np.testing.assert_allclose(np.asarray(res.system.positions), np.asarray(res_ref.system.positions), atol=1e-9)
    s_ref = ms.sensitivity(res_ref, ref, neighbor_list=True)
    s = ms.sensitivity(res, pot, neighbor_list=True)
    np.testing.assert_allclose(s.dpositions, s_ref.dpositions, rtol=0, atol=1e-8)
    np.testing.assert_allclose(s.denergy, s_ref.denergy, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(s.lambda_min, s_ref.lambda_min, rtol=1e-6)


# ------------------------------------------------------------------ pytrees and names
def lj_nested(positions, params, cell, neighbor):
    """Lennard-Jones with ASE's smooth cutoff, parameters as a nested pytree."""
    dR, mask = ms.potentials.neighbor_displacements(positions, cell, neighbor)
    r2 = jnp.sum(dR * dR, axis=-1)
    sigma, epsilon = params["pair"]["sigma"], params["pair"]["epsilon"]
    r_onset, r_cut = params["range"][0], params["range"][1]
    s6 = (sigma**2 / r2) ** 3
    u = 4.0 * epsilon * (s6 * s6 - s6)
    # ASE's LennardJones smooth cutoff: (rc²−r²)²(rc²+2r²−3ro²)/(rc²−ro²)³ between ro and rc
    sw = (r_cut**2 - r2) ** 2 * (r_cut**2 + 2 * r2 - 3 * r_onset**2) / (r_cut**2 - r_onset**2) ** 3
    fc = jnp.where(r2 < r_onset**2, 1.0, jnp.where(r2 < r_cut**2, sw, 0.0))
    return 0.5 * jnp.sum(jnp.where(mask, u * fc, 0.0))


def test_nested_params_names_tree_and_energy_match_builtin_lennard_jones():
    ref = ms.potentials.LennardJones(sigma=3.4, epsilon=0.0104, r_cutoff=8.5, r_onset=6.8)
    tree = {"pair": {"sigma": 3.4, "epsilon": np.float32(0.0104)}, "range": [6.8, 8.5]}
    pot = ms.potentials.from_energy_fn(lj_nested, tree, cutoff=8.5)
    assert sorted(pot.params) == ["pair/epsilon", "pair/sigma", "range/0", "range/1"]
    assert all(v.dtype == jnp.float64 for v in pot.params.values())
    back = pot.tree()
    assert back["range"][1] == 8.5 and isinstance(back["range"], list)
    assert pot.flatten(back).keys() == pot.params.keys()
    system = ms.read(ms.data.path("lj13_ar.xyz"))
    e_ref = float(ref.energy(system))
    # float32 input is upcast: 0.0104 in float32 differs from the float64 value by ~1e-10 relative
    p64 = dict(pot.params, **{"pair/epsilon": 0.0104})
    np.testing.assert_allclose(float(pot.energy(system, p64)), e_ref, rtol=1e-13)
    # the user's nested tree is accepted wherever params are
    nested = {"pair": {"sigma": 3.4, "epsilon": 0.0104}, "range": [6.8, 8.5]}
    np.testing.assert_allclose(float(pot.energy(system, nested)), e_ref, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(pot.forces(system, nested)), np.asarray(ref.forces(system)), atol=1e-13)
    # gradient w.r.t. the flat dict equals the built-in's w.r.t. sigma/epsilon
    E, E_ref = pot.energy_fn(system), ref.energy_fn(system)
    g = jax.grad(E, argnums=1)(system.positions, p64, None)
    g_ref = jax.grad(E_ref, argnums=1)(system.positions, ref.params, None)
    np.testing.assert_allclose(float(g["pair/sigma"]), float(g_ref["sigma"]), rtol=1e-12)
    np.testing.assert_allclose(float(g["pair/epsilon"]), float(g_ref["epsilon"]), rtol=1e-12)


# ------------------------------------------------------------------ errors
def test_clear_errors():
    system = cluster13()
    with pytest.raises(ms.PotentialError, match="cutoff="):
        ms.potentials.from_energy_fn(morse_by_hand, MORSE)
    with pytest.raises(ms.PotentialError, match="positive"):
        ms.potentials.from_energy_fn(morse_by_hand, MORSE, cutoff=-1.0)
    with pytest.raises(ms.PotentialError, match="function"):
        ms.potentials.from_energy_fn("morse", MORSE, cutoff=3.0)
    with pytest.raises(ms.ParameterError, match="dtype int"):
        ms.potentials.from_energy_fn(morse_by_hand, dict(MORSE, n=np.int32(3)), cutoff=3.0)
    with pytest.raises(ms.ParameterError, match="NaN"):
        ms.potentials.from_energy_fn(morse_by_hand, dict(MORSE, epsilon=np.nan), cutoff=3.0)
    with pytest.raises(ms.ParameterError, match="must not contain"):
        ms.potentials.from_energy_fn(morse_by_hand, {"a[0]": 1.0}, cutoff=3.0)
    with pytest.raises(ms.ParameterError, match="both named"):
        ms.potentials.from_energy_fn(morse_by_hand, {"a/b": 1.0, "a": {"b": 2.0}}, cutoff=3.0)
    pot = ms.potentials.from_energy_fn(morse_by_hand, MORSE, cutoff=3.64)
    with pytest.raises(ms.ParameterError, match="shaped like"):
        pot.energy(system, {"epsilon": 1.0})

    def per_atom(R, p, cell, nb):
        return jnp.sum(R, axis=1)

    def single(R, p, cell, nb):
        return jnp.sum(R).astype(jnp.float32)

    def not_a_number(R, p, cell, nb):
        return jnp.sum(R) * jnp.nan

    for fn, match in ((per_atom, "scalar"), (single, "float32"), (not_a_number, "NaN")):
        bad = ms.potentials.from_energy_fn(fn, MORSE, cutoff=3.64)
        with pytest.raises(ms.PotentialError, match=match):
            bad.energy(system)
        if fn is not not_a_number:  # refused while tracing, before anything compiles
            with pytest.raises(ms.PotentialError, match=match):
                ms.relax(system, bad, fmax=1e-3, max_steps=5)
    # a concrete, un-jitted call names the NaN too
    nan_pot = ms.potentials.from_energy_fn(not_a_number, MORSE, cutoff=3.64)
    with pytest.raises(ms.PotentialError, match="returned nan"):
        nan_pot.energy_fn(system)(system.positions, nan_pot.params, None)
    sym = ms.potentials.from_energy_fn(lambda R, p, c, nb, sp: jnp.sum(R * 0.0), MORSE, cutoff=3.64, symbols=("Cu",))
    with pytest.raises(ms.SpeciesError):
        sym.energy(system)  # an Ar cluster
    with pytest.raises(ms.PotentialError, match="params="):
        ms.potentials.from_jax_md(lambda params, R, neighbor: 0.0, cutoff=3.0)


def test_species_are_passed_as_indices_into_symbols():
    seen = {}

    def fn(R, p, cell, nb, species):
        seen["species"] = species
        return p["k"] * jnp.sum(jnp.where(species == 1, jnp.sum(R * R, axis=1), 0.0))

    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    system = ms.System.from_ase(atoms)
    pot = ms.potentials.from_energy_fn(fn, {"k": 0.5}, cutoff=1.0, symbols=("Cl", "Na"))
    e = float(pot.energy(system))
    na = np.asarray(system.positions)[np.array(atoms.get_chemical_symbols()) == "Na"]
    np.testing.assert_allclose(e, 0.5 * np.sum(na * na), rtol=1e-14)
    assert seen["species"].shape == (8,)


# ------------------------------------------------------------------ 2. jax-md networks
CUT = 5.0


def _bp(neighbor_list_version=True, mlp_sizes=(8,), cutoff=CUT):
    from jax_md import energy, partition

    kw = dict(key=jax.random.PRNGKey(0), mlp_sizes=mlp_sizes, sym_kwargs=dict(cutoff_distance=cutoff))
    if neighbor_list_version:
        return energy.behler_parrinello_neighbor_list(ms.potentials.displacement, 1.0, format=partition.Dense, **kw)
    return energy.behler_parrinello(ms.potentials.displacement, **kw)


def test_behler_parrinello_matches_jax_md_all_pairs_evaluation():
    """Periodic Cu vacancy (31 atoms): mdsens's neighbor-list path against jax-md's own
    all-pairs model (same PRNG key, so the same weights), the cell passed as ``cell=``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # jax-md's int64 scatter
        pair = _bp(cutoff=3.6)
        dense_model = _bp(neighbor_list_version=False, cutoff=3.6)
        pot = ms.potentials.from_jax_md(pair, cutoff=3.6)
        system = cu_vacancy()
        assert any(k.startswith("mlp/layers_0/kernel") for k in pot.params)
        R, C = jnp.asarray(system.positions), jnp.asarray(system.cell)
        truth_e, truth_f = jax.jit(jax.value_and_grad(lambda R: dense_model(R, cell=C)))(R)
        E = pot.energy_fn(system, neighbor_list=True)
        e, g = jax.jit(jax.value_and_grad(E))(R, pot.params, C, pot.neighbor_list(system))
        np.testing.assert_allclose(float(e), float(truth_e), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(g), np.asarray(truth_f), atol=1e-11)
        assert np.max(np.abs(np.asarray(truth_f))) > 1e-3  # the rattle gives forces to compare


def test_graph_network_with_self_edges_matches_jax_md_all_pairs_evaluation():
    from jax_md import energy, partition

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        kw = dict(key=jax.random.PRNGKey(2), mlp_sizes=(8,), n_recurrences=1)
        _, nl_model = energy.graph_network_neighbor_list(ms.potentials.displacement, 1.0, 3.0, 0.0,
                                                         format=partition.Dense, **kw)
        dense_model = energy.graph_network(ms.potentials.displacement, 3.0, **kw)
        system = cluster13(r0=2.6, seed=3)
        truth = float(dense_model(jnp.asarray(system.positions)))
        with_self = ms.potentials.from_jax_md(nl_model, cutoff=3.0, mask_self=False)
        np.testing.assert_allclose(float(with_self.energy(system)), truth, rtol=1e-12)
        without = ms.potentials.from_jax_md(nl_model, cutoff=3.0)
        assert abs(float(without.energy(system)) - truth) > 1e-6  # the flag is not cosmetic
        sparse = energy.graph_network_neighbor_list(ms.potentials.displacement, 1.0, 3.0, 0.0,
                                                    format=partition.Sparse, **kw)
    with pytest.raises(ms.PotentialError, match="Dense"):
        ms.potentials.from_jax_md(sparse, cutoff=3.0)


def nn_potential(mlp_sizes=(32, 32), scale=0.1):
    """A physical baseline (Morse) plus a Behler–Parrinello network: the Δ-learning shape.

    A randomly initialized network alone has no minimum to relax to; the baseline gives
    one and the network moves it. ``split_nnx`` makes the jax-md model a pure function.
    """
    _, nn = _bp(mlp_sizes=mlp_sizes)
    apply, weights = ms.potentials.split_nnx(nn)

    def model(params, R, neighbor, cell=None):
        base = morse_by_hand(R, params["morse"], cell, neighbor.idx)
        return base + params["scale"] * apply(params["nn"], R, neighbor, **({} if cell is None else {"cell": cell}))

    morse = dict(epsilon=1.0, r0=2.6, rho0=6.0, rcut1=1.5, rcut2=CUT / 2.6)
    return ms.potentials.from_jax_md(model, {"morse": morse, "nn": weights, "scale": scale}, cutoff=CUT)


@pytest.mark.slow
def test_neural_network_sensitivities_against_finite_differences_of_relaxations():
    """13-atom cluster, Morse + BP network (2081 weights): dR*/dw (forward) and the
    gradient of a relaxed observable w.r.t. all weights (reverse, one solve) against
    central differences of re-relaxations, and ⟨u, J v⟩ (forward) = ⟨Jᵀu, v⟩ (reverse)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pot = nn_potential()
    n_weights = sum(v.size for k, v in pot.params.items() if k.startswith("nn/"))
    assert n_weights > 2000
    res = ms.relax(cluster13(), pot, fmax=1e-10)
    assert res.converged and res.fmax < 1e-10
    R0 = np.asarray(res.system.positions)
    # a minimum: positive definite beyond the 6 rigid modes
    E = pot.energy_fn(res.system)
    H = np.asarray(jax.hessian(lambda x: E(x.reshape(-1, 3), pot.params, None))(R0.ravel()))
    lam = np.linalg.eigvalsh(0.5 * (H + H.T))
    assert np.all(np.abs(lam[:6]) < 1e-8 * lam[-1]) and lam[6] > 1e-3 * lam[-1]

    labels = ["nn/mlp/layers_0/kernel[3,5]", "nn/mlp/layers_1/kernel[7,2]", "nn/mlp/layers_1/bias[3]",
              "nn/mlp/layers_2/kernel[4,0]"]
    sens = ms.sensitivity(res, pot, wrt=labels)
    assert sens.names == tuple(labels)
    P = rigid_projector(R0)
    relax_at = lambda p: np.asarray(ms.relax(res.system, pot, params=p, fmax=1e-11).system.positions)  # noqa: E731

    def bumped(label, h):
        key, index = label.split("[")
        index = tuple(int(i) for i in index.rstrip("]").split(","))
        return dict(pot.params, **{key: pot.params[key].at[index].add(h)})

    h = 1e-3
    for j, label in enumerate(labels):
        fd = (relax_at(bumped(label, h)) - relax_at(bumped(label, -h))) / (2 * h)
        fd = (P @ fd.ravel()).reshape(fd.shape)  # the re-relaxations may also rotate the cluster
        col = sens.dpositions[j]
        assert np.linalg.norm(col) > 1e-5
        np.testing.assert_allclose(col, fd, rtol=0, atol=2e-4 * np.abs(col).max())

    def gyration(R, params, cell):
        return jnp.sum((R - jnp.mean(R, axis=0)) ** 2)

    grad = ms.observable_gradient(res, pot, gyration)
    assert set(grad) == set(pot.params) and grad["nn/mlp/layers_1/kernel"].shape == (32, 32)
    rng = np.random.default_rng(5)
    for key in ("nn/mlp/layers_0/kernel", "nn/mlp/layers_1/kernel", "nn/mlp/layers_1/bias"):
        index = tuple(int(rng.integers(s)) for s in pot.params[key].shape)
        label = f"{key}[{','.join(map(str, index))}]"
        O = lambda p: float(gyration(jnp.asarray(relax_at(p)), p, None))  # noqa: E731
        fd = (O(bumped(label, h)) - O(bumped(label, -h))) / (2 * h)
        np.testing.assert_allclose(float(grad[key][index]), fd, rtol=1e-5, atol=1e-9)
    # forward/reverse: u = ∂O/∂R at R*, v a random combination of the four weights
    u = np.asarray(jax.grad(gyration)(jnp.asarray(R0), None, None))
    v = rng.standard_normal(len(labels))
    forward = float(np.einsum("nd,pnd,p->", u, sens.dpositions, v))
    reverse = 0.0
    for c, label in zip(v, labels):
        key, index = label.split("[")
        index = tuple(int(i) for i in index.rstrip("]").split(","))
        reverse += c * float(np.asarray(grad[key])[index])
    np.testing.assert_allclose(forward, reverse, rtol=1e-8)
