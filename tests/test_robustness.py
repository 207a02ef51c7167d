"""Bad and unusual input: the right answer, a clear MdsensError, or an MdsensWarning.

Never a silently different number, never a destroyed or partial file. The first part
is one regression test per reported case (the numbers refer to the reliability issue);
the second feeds every public entry point malformed inputs of each class.
"""

import functools
import io
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens as ms
from mdsens import cli
from conftest import data_file

TIED = 2 ** (1 / 6)  # LJ bond length per σ (cutoff tied to σ: exact scaling)


def _dimer(r=1.2):
    return ms.System(np.array([[0.0, 0.0, 0.0], [r, 0.0, 0.0]]))


def _bond(R):
    return jnp.linalg.norm(R[1] - R[0])


@functools.lru_cache(maxsize=None)
def _relaxed(kind="lj"):
    if kind == "lj":
        pot = ms.potentials.LennardJones(sigma=1.0, epsilon=1.0)
        return ms.relax(_dimer(), pot, fmax=1e-11), pot
    pot = ms.potentials.LennardJones(sigma=3.4, epsilon=0.0104)
    return ms.relax(ms.read(data_file("lj13_ar.xyz")), pot, fmax=1e-9), pot


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------ 1. linear molecules
@pytest.mark.parametrize("kind, name, truth", [
    # ~22 s each, slow to keep make test near 10 minutes (CI runs the slow suite)
    pytest.param("lj", "sigma", TIED, marks=pytest.mark.slow),
    pytest.param("morse", "r0", 1.0, marks=pytest.mark.slow),  # the same path, another potential
])
def test_traced_derivative_of_a_linear_molecule(kind, name, truth):
    """dr*/dσ = 2^(1/6) (LJ), dr*/dr₀ = 1 (Morse): exact, under jit, vmap and jacfwd."""
    pot = ms.potentials.LennardJones(sigma=1.0) if kind == "lj" else ms.potentials.Morse()
    start = _dimer(1.1)

    def bond(p, **kw):
        return _bond(ms.relax(start, pot, params=p, fmax=1e-10, neighbor_list=False, **kw).system.positions)

    assert float(jax.jit(jax.grad(bond))(pot.params)[name]) == pytest.approx(truth, rel=1e-6)
    jac = jax.jacfwd(functools.partial(bond, stability=False))(pot.params)
    assert float(jac[name]) == pytest.approx(truth, rel=1e-6)


@pytest.mark.slow  # ~40 s of compilation; the same traced path as the test above
def test_vmapped_derivative_of_a_linear_molecule():
    pot = ms.potentials.LennardJones(sigma=1.0)

    def bond(p):
        return _bond(ms.relax(_dimer(1.1), pot, params=p, fmax=1e-10, neighbor_list=False).system.positions)

    many = {k: jnp.stack([v, 1.1 * v]) for k, v in pot.params.items()}
    np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(bond))(many)["sigma"]), TIED, rtol=1e-6)


# ---------------------------------------------------------------- 2., 3. the core checks
X = np.random.default_rng(0).normal(size=(20, 5))
Y = X @ np.arange(5.0)


def _ridge_F(w, lam):
    return X.T @ (X @ w - Y) + lam * w


def _ridge(init, lam):
    return jnp.linalg.solve(X.T @ X + lam * jnp.eye(5), X.T @ Y)


def test_declared_null_space_is_checked():
    zero = ms.custom_root(_ridge_F, nullspace=lambda w, lam: jnp.zeros((1, 5)))(_ridge)
    with pytest.raises(ms.NullSpaceError, match="only zero vectors"):
        jax.jvp(lambda lam: zero(None, lam), (1.0,), (1.0,))
    wrong = ms.custom_root(_ridge_F, nullspace=lambda w, lam: jnp.eye(5)[:1])(_ridge)
    with pytest.raises(ms.NullSpaceError, match="not a null space"):
        jax.jvp(lambda lam: wrong(None, lam), (1.0,), (1.0,))
    with pytest.raises(Exception, match="NullSpaceError"):  # inside jit: from the host callback
        jax.jit(jax.jacfwd(wrong, argnums=1))(None, 1.0).block_until_ready()


def test_solver_output_must_be_a_root():
    not_a_root = ms.custom_root(_ridge_F)(lambda init, lam: jnp.zeros(5))
    with pytest.raises(ms.RootError, match="not a root"):
        jax.jvp(lambda lam: not_a_root(None, lam), (1.0,), (1.0,))
    with pytest.warns(ms.RootWarning):
        ms.custom_root(_ridge_F, on_failure="warn")(lambda init, lam: jnp.zeros(5))
        jax.jvp(lambda lam: ms.custom_root(_ridge_F, on_failure="warn")(lambda i, l: jnp.zeros(5))(None, lam),
                (1.0,), (1.0,))
    # a true root passes, and gives the closed form
    good = ms.custom_root(_ridge_F)(_ridge)
    A = X.T @ X + np.eye(5)
    np.testing.assert_allclose(jax.jacfwd(good, argnums=1)(None, 1.0),
                               -np.linalg.solve(A, np.linalg.solve(A, X.T @ Y)), rtol=1e-8)


def test_solver_structure_errors_name_the_input():
    short = ms.custom_root(_ridge_F)(lambda init, lam: jnp.zeros(4))
    with pytest.raises(ms.OptimalityStructureError, match="could not be evaluated"):
        jax.jvp(lambda lam: short(None, lam), (1.0,), (1.0,))
    single = ms.custom_root(_ridge_F)(lambda init, lam: _ridge(init, lam).astype(jnp.float32))
    with pytest.raises(ms.OptimalityStructureError, match="float32"):
        jax.jvp(lambda lam: single(None, lam), (1.0,), (1.0,))
    no_aux = ms.custom_root(_ridge_F, has_aux=True)(_ridge)
    with pytest.raises(ms.OptimalityStructureError, match="not a pair"):
        no_aux(None, 1.0)


# ------------------------------------------------------------------------ 4. float32
def test_float32_physics_is_refused():
    code = ("import mdsens as ms, numpy as np\n"
            "s = ms.System(np.array([[0.0, 0, 0], [1.2, 0, 0]]))\n"
            "for call in (lambda: ms.relax(s, ms.potentials.LennardJones(), fmax=1e-8),\n"
            "             lambda: ms.potentials.LennardJones().energy(s)):\n"
            "    try:\n"
            "        call(); print('ran')\n"
            "    except ms.PrecisionError as err:\n"
            "        print('refused', 'MDSENS_ENABLE_X64' in str(err))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MDSENS_ENABLE_X64": "0"})
    assert proc.stdout.split() == ["refused", "True", "refused", "True"], proc.stderr[-2000:]


# -------------------------------------------------------- 5., 6., 19. the input structure
def test_unconverged_relaxation_warns_by_default():
    pot = ms.potentials.LennardJones(sigma=3.4, epsilon=0.0104)
    with pytest.warns(ms.NotConvergedWarning):
        res = ms.relax(ms.read(data_file("lj13_ar.xyz")), pot, max_steps=5)
    with pytest.warns(ms.NotConvergedWarning, match="not relaxed: its largest force"):
        ms.sensitivity(res, pot, wrt="sigma", stability=False)


def test_result_relaxed_with_another_potential_is_refused():
    res, _ = _relaxed("lj")
    with pytest.raises(ms.ResultMismatchError, match="another potential or other parameters"):
        ms.sensitivity(res, ms.potentials.Morse())
    with pytest.raises(ms.ResultMismatchError):
        ms.sensitivity(res, ms.potentials.LennardJones(sigma=1.1, epsilon=1.0))


def test_saddle_of_an_unrelaxed_structure_says_so():
    # a linear trimer away from its minimum: forces are not zero, and bending is unstable
    s = ms.System(np.array([[0.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0]]))
    with pytest.warns(ms.NotConvergedWarning, match="largest force"):
        with pytest.raises(ms.SaddlePointError, match="not relaxed"):
            ms.sensitivity(s, ms.potentials.LennardJones(sigma=1.0, epsilon=1.0))


# ------------------------------------------------------------------ 7., 8., 18. lists
def _fcc(rattle=0.05):
    from ase.build import bulk

    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(4)  # 21 Å: wider than twice the cutoff
    atoms.positions += np.random.default_rng(1).normal(scale=rattle, size=atoms.positions.shape)
    return ms.System.from_ase(atoms)


def test_overflowed_neighbor_list_is_refused_everywhere():
    pot = ms.potentials.LennardJones(sigma=3.4, epsilon=0.0104, r_cutoff=7.5, r_onset=6.0)
    s = _fcc()
    nl = pot.neighbor_list_fn(s, capacity_multiplier=1.0)
    nbrs = nl.allocate(s.positions, s.cell)
    squeezed = s.replace(positions=s.positions * 0.95, cell=s.cell * 0.95)
    over = jax.jit(nl.update)(squeezed.positions, nbrs, squeezed.cell)
    assert over.needs_reallocation()
    E = pot.energy_fn(squeezed, neighbor_list=True)
    with pytest.raises(ms.NeighborListError, match="overflowed"):
        E(squeezed.positions, pot.params, squeezed.cell, over)
    assert np.isnan(float(jax.jit(E)(squeezed.positions, pot.params, squeezed.cell, over)))
    with pytest.raises(ms.NeighborListError, match="overflowed"):
        ms.sensitivity(squeezed, pot, neighbor=over, stability=False)


def test_stale_neighbor_list_is_refused():
    pot = ms.potentials.LennardJones(sigma=3.4, epsilon=0.0104, r_cutoff=7.5, r_onset=6.0)
    s = _fcc()
    nbrs = pot.neighbor_list(s)
    moved = s.replace(positions=s.positions + np.random.default_rng(2).normal(scale=0.5, size=s.positions.shape))
    with pytest.raises(ms.NeighborListError, match="stale"):
        ms.sensitivity(moved, pot, neighbor=nbrs, stability=False)


def test_negative_skin_is_refused_before_anything_runs():
    with pytest.raises(ms.OptionError, match="skin"):
        ms.relax(_fcc(), ms.potentials.LennardJones(sigma=3.4, epsilon=0.0104),
                 neighbor_list=ms.NeighborListOptions(enabled=True, skin=-1.0))
    with pytest.raises(ms.NeighborListError, match="skin"):
        ms.potentials.LennardJones(sigma=3.4, epsilon=0.0104).neighbor_list(_fcc(), skin=-1.0)  # rc 10.2


def test_two_atoms_in_a_huge_box_use_no_cell_list():
    s = ms.System(np.array([[0.0, 0, 0], [3.8, 0, 0]]), cell=np.eye(3) * 1e4, pbc=True)
    pot = ms.potentials.LennardJones(sigma=3.4, epsilon=0.0104)
    nl = pot.neighbor_list_fn(s)
    assert not nl.cell_list
    E = pot.energy_fn(s, neighbor_list=True)
    dense = pot.energy_fn(s, neighbor_list=False)
    got = E(s.positions, pot.params, s.cell, nl.allocate(s.positions, s.cell))
    assert float(got) == pytest.approx(float(dense(s.positions, pot.params, s.cell)), rel=1e-12)


# ------------------------------------------------------------------- 9., 10., 13. potentials
@pytest.mark.parametrize("build", [
    lambda: ms.potentials.SoftSphere(alpha=0.0),
    lambda: ms.potentials.Morse(epsilon=-1.0, rho0=-6.0),
    lambda: ms.potentials.StillingerWeber(epsilon=-1.0),
    lambda: ms.potentials.LennardJones(sigma=-1.0),
    lambda: ms.potentials.LennardJones(r_cutoff=5.0, r_onset=6.0),
    lambda: ms.potentials.ZhouEAM("Cu", r_cutoff=4.0, r_onset=4.5),
    lambda: ms.potentials.ZhouEAM("Cu", parameters={"Cu": {"re": -2.5}}),
])
def test_constructors_refuse_unphysical_parameters(build):
    with pytest.raises(ms.ParameterError):
        build()


def test_params_argument_takes_the_constructor_validation():
    pot = ms.potentials.LennardJones(sigma=1.0, epsilon=1.0)
    with pytest.raises(ms.ParameterError, match="sigma"):
        ms.relax(_dimer(), pot, params={**pot.params, "sigma": jnp.asarray(-1.0)})
    res, _ = _relaxed("lj")
    with pytest.raises(ms.ParameterError, match="sigma"):
        ms.sensitivity(res, pot, params={**pot.params, "sigma": jnp.asarray(-1.0)})
    fixed = ms.potentials.LennardJones(sigma=1.0, r_cutoff=3.0, r_onset=2.0)
    with pytest.raises(ms.ParameterError, match="r_onset"):
        fixed.energy(_dimer(), params={**fixed.params, "r_onset": jnp.asarray(4.0)})


@pytest.mark.parametrize("pot", [ms.potentials.StillingerWeber(symbols=None), ms.potentials.Tersoff.silicon()])
def test_three_body_potentials_refuse_2d(pot):
    s = ms.System(np.array([[0.0, 0.0], [2.3, 0.0]]), symbols=("Si",))
    with pytest.raises(ms.PotentialError, match="3D"):
        pot.energy(s)


def test_coincident_atoms_are_an_error_not_nan():
    with pytest.raises(ms.PotentialError, match="same position"):
        ms.potentials.LennardJones().energy(_dimer(0.0))


def test_finiteness_check_lets_parameter_derivatives_through():
    # the NaN guard of the host wrappers must not break jacfwd/grad over the parameters
    pot = ms.potentials.LennardJones(sigma=1.0, epsilon=1.0)
    r = 1.3
    d_energy = jax.jacfwd(lambda e: pot.energy(_dimer(r), {**pot.params, "epsilon": e}))(1.0)
    np.testing.assert_allclose(d_energy, 4 * (r**-12 - r**-6), rtol=1e-12)


# ------------------------------------------------------------------------- 11., 12., 15. files
def test_partial_occupancy_cif_is_refused(tmp_path):
    path = tmp_path / "alloy.cif"
    path.write_text("data_x\n_cell_length_a 4\n_cell_length_b 4\n_cell_length_c 4\n_cell_angle_alpha 90\n"
                    "_cell_angle_beta 90\n_cell_angle_gamma 90\n_symmetry_space_group_name_H-M 'P 1'\n"
                    "loop_\n_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n_atom_site_fract_y\n"
                    "_atom_site_fract_z\n_atom_site_occupancy\nFe1 Fe 0 0 0 0.5\nNi1 Ni 0 0 0 0.5\n")
    with pytest.raises(ms.StructureFileError, match="partially occupied"):
        ms.read(path)


@pytest.mark.parametrize("info, message", [({"a": "x\ny"}, "newlines"), ({1: 2}, "key 1"),
                                          ({"e": float("nan")}, "finite"), ({"Lattice": 1}, "reserved")])
def test_writer_refuses_what_readers_cannot_read_and_keeps_the_file(tmp_path, info, message):
    path = tmp_path / "s.xyz"
    ms.write(path, _dimer())
    before = path.read_bytes()
    with pytest.raises(ms.StructureFileError, match=message):
        ms.write(path, _dimer(1.5), info=info)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["s.xyz"]  # no temporary left behind
    ms.write(path, _dimer(1.5), info={"energy": -1.0, "tag": "ok"})
    assert ms.read(path).positions[1, 0] == 1.5


def test_read_frame_out_of_range_names_the_count():
    with pytest.raises(ms.StructureFileError, match="index=5.*1 frame"):
        ms.read(data_file("lj13_ar.xyz"), index=5)


# -------------------------------------------------------------------- 14., 16. the command
def test_cli_refuses_to_overwrite_its_input(tmp_path):
    path = tmp_path / "same.xyz"
    path.write_bytes(open(data_file("lj13_ar.xyz"), "rb").read())
    before = path.read_bytes()
    code, _, err = _cli("relax", str(path), "-p", "lj", "--param", "sigma=3.4", "--max-steps", "3", "-o", str(path))
    assert code == 2 and "--force" in err and path.read_bytes() == before
    code, _, _ = _cli("relax", str(path), "-p", "lj", "--param", "sigma=3.4", "--param", "epsilon=0.0104",
                      "--fmax", "1e-5", "-o", str(path), "--force", "--no-progress")
    assert code == 0 and path.read_bytes() != before


def test_cli_errors_are_one_line_with_documented_codes(tmp_path):
    code, _, err = _cli("demo", "-o", "/dev/null/x")
    assert code == 2 and err.count("\n") == 1 and "output directory" in err
    code, _, err = _cli("sensitivity", data_file("lj13_ar.xyz"), "-p", "lj", "--param", "sigma=3.4",
                        "--param", "epsilon=0.0104", "--wrt", "sigma", "--csv", str(tmp_path / "no" / "x.csv"))
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    trimer = tmp_path / "trimer.xyz"
    ms.write(trimer, ms.System(np.array([[0.0, 0, 0], [1.12, 0, 0], [2.24, 0, 0]]), symbols=("Ar",)))
    code, _, err = _cli("sensitivity", str(trimer), "-p", "lj", "--param", "sigma=1", "--param", "epsilon=1",
                        "--fmax", "1e-10")
    assert code == cli.EXIT_CODES["saddle point"] == 3 and "SaddlePointError" in err and err.count("\n") == 1


# ----------------------------------------------------------------------- 17., 20., 21.
def test_wrt_element_labels_with_commas():
    pot = ms.potentials.LennardJones(sigma={"A": 1.0, "B": 1.2})
    s = ms.System(np.array([[0.0, 0, 0], [1.2, 0, 0], [0.5, 1.1, 0]]), species=[0, 1, 0], symbols=("A", "B"))
    res = ms.relax(s, pot, fmax=1e-10)
    one = ms.sensitivity(res, pot, wrt="sigma[0,1]")
    two = ms.sensitivity(res, pot, wrt="sigma[0,1], epsilon")
    assert one.names == ("sigma[0,1]",) and two.names[0] == "sigma[0,1]" and two.names[1] == "epsilon"
    np.testing.assert_allclose(one.dpositions[0], two.dpositions[0], rtol=1e-9, atol=1e-12)  # solve tol 1e-10


def test_direction_missing_a_parameter_names_it():
    res, pot = _relaxed("lj")
    with pytest.raises(ms.OptionError, match="every parameter"):
        ms.sensitivity(res, pot, wrt={"d": {"sigma": 1.0}})


def test_empty_system_and_integer_time_steps():
    with pytest.raises(ms.StructureError, match="at least one atom"):
        ms.System(np.zeros((0, 3)))
    res = ms.relax(_dimer(), ms.potentials.LennardJones(), fmax=1e-8, minimizer=ms.FIRE(dt_start=1, dt_max=1))
    assert res.converged and float(_bond(res.system.positions)) == pytest.approx(TIED, rel=1e-7)


def test_species_without_symbols_get_generic_labels():
    s = ms.System(np.zeros((3, 2)) + np.arange(3)[:, None], species=[0, 1, 2])
    assert s.symbols == ("A", "B", "C") and s.chemical_symbols == ["A", "B", "C"]


# --------------------------------------------------------------------------- fuzz classes
def _lj_pot():
    return ms.potentials.LennardJones(sigma=1.0, epsilon=1.0)


FUZZ = {
    # shapes
    "positions (N, 4)": lambda: ms.System(np.zeros((2, 4))),
    "cell (2, 2) for 3D": lambda: ms.System(np.zeros((2, 3)), cell=np.eye(2), pbc=True),
    "species length": lambda: ms.System(np.zeros((2, 3)), species=[0]),
    "params wrong shape": lambda: ms.relax(_dimer(), _lj_pot(), params={"sigma": jnp.ones(2), "epsilon": 1.0}),
    "params missing key": lambda: ms.relax(_dimer(), _lj_pot(), params={"sigma": 1.0}),
    "observable not scalar": lambda: ms.observable_gradient(_relaxed("lj")[0], _lj_pot(), lambda R, p, c: R),
    # dtypes
    "species floats": lambda: ms.System(np.zeros((2, 3)), species=[0.5, 1.0]),
    "fmax a string": lambda: ms.relax(_dimer(), _lj_pot(), fmax="small"),
    "max_steps fractional": lambda: ms.relax(_dimer(), _lj_pot(), max_steps=2.5),
    # NaN / inf
    "positions NaN": lambda: ms.System(np.array([[0.0, 0, 0], [np.nan, 0, 0]])),
    "params inf": lambda: ms.relax(_dimer(), _lj_pot(), params={"sigma": np.inf, "epsilon": 1.0}),
    "fmax NaN": lambda: ms.relax(_dimer(), _lj_pot(), fmax=float("nan")),
    "tol inf": lambda: ms.sensitivity(_relaxed("lj")[0], _lj_pot(), tol=float("inf")),
    # signs and ranges
    "negative epsilon": lambda: ms.potentials.LennardJones(epsilon=-1.0),
    "zero-volume cell": lambda: ms.System(np.zeros((1, 3)), cell=np.zeros((3, 3)), pbc=True),
    "negative max_steps": lambda: ms.relax(_dimer(), _lj_pot(), max_steps=-1),
    "stress_tol without cell": lambda: ms.relax(_dimer(), _lj_pot(), stress_tol=1e-3),
    "unknown wrt": lambda: ms.sensitivity(_relaxed("lj")[0], _lj_pot(), wrt=["rho"]),
    "policy typo": lambda: ms.sensitivity(_relaxed("lj")[0], _lj_pot(), on_failure="rasie"),
    "cell derivative of a cluster": lambda: ms.sensitivity(_relaxed("lj")[0], _lj_pot(), wrt="cell"),
    "elastic constants of a cluster": lambda: ms.elastic_constants(_relaxed("lj")[0], _lj_pot()),
    "mixed pbc": lambda: ms.System(np.zeros((1, 3)), cell=np.eye(3), pbc=(True, False, True)),
    # mismatched potential / result
    "unknown species": lambda: ms.potentials.StillingerWeber().energy(_dimer()),
    "other parameters": lambda: ms.sensitivity(_relaxed("lj")[0], _lj_pot(),
                                               params={"sigma": jnp.asarray(0.8), "epsilon": jnp.asarray(1.0)}),
    "not a result": lambda: ms.sensitivity("relaxed.xyz", _lj_pot()),
    "wrong layout for make_relax": lambda: ms.make_relax(_lj_pot(), _dimer())(ms.read(data_file("lj13_ar.xyz"))),
    # unreadable and unwritable paths
    "missing file": lambda: ms.read("/no/such/file.xyz"),
    "directory as file": lambda: ms.read(os.path.dirname(data_file("lj13_ar.xyz"))),
    "unknown bundled file": lambda: ms.data.path("nothing.xyz"),
    "write into a missing directory": lambda: ms.write("/no/such/dir/out.xyz", _dimer()),
    "write a directory": lambda: ms.write(os.path.dirname(data_file("lj13_ar.xyz")), _dimer()),
}


@pytest.mark.parametrize("case", sorted(FUZZ))
def test_malformed_input_gives_an_mdsens_error(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ms.MdsensWarning)
        with pytest.raises(ms.MdsensError):
            FUZZ[case]()
    assert os.listdir(tmp_path) == []  # nothing partial was written
