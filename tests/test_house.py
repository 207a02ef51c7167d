"""The house rules: layering, one options surface, one error vocabulary.

* no module of ``mdsens`` imports another's private names;
* ``mdsens.implicit`` knows no physics;
* every option object refuses invalid input when it is built;
* ``except ms.MdsensError`` (``ms.MdsensWarning``) catches every error (warning) class
  mdsens raises on purpose: one triggering case per class, and every class has one;
* no test monkeypatches a module global.
"""

import ast
import functools
import pathlib
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens as ms
from mdsens import errors

PACKAGE = pathlib.Path(ms.__file__).parent
TESTS = pathlib.Path(__file__).parent


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "data" not in p.relative_to(PACKAGE).parts[:1])


# --------------------------------------------------------------------------- layering
def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mdsens"):
                for alias in node.names:
                    if alias.name.startswith("_") or (alias.asname or "").startswith("_"):
                        offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {alias.name}")
    assert not offenders, offenders
    # and the literal check of the house issue, line by line
    pattern = re.compile(r"import _|from mdsens[.a-z_]* import .*\b_[a-z]")
    lines = [f"{p}:{i}" for p in _modules() for i, line in enumerate(p.read_text().splitlines(), 1)
             if pattern.search(line)]
    assert not lines, lines


def test_the_implicit_core_knows_no_physics():
    for path in (PACKAGE / "implicit").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(("mdsens.md", "jax_md", "ase")), f"{path.name} imports {name}"


def test_no_test_monkeypatches_a_module_global():
    patch = "monkeypatch." + "setattr("
    used = [f"{p.name}:{i}" for p in TESTS.glob("test_*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if patch in line]
    assert not used, used


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("build, message", [
    (lambda: ms.FIRE(dt_max=-1.0), "dt_max"),
    (lambda: ms.FIRE(dt_start=2.0, dt_max=1.0), "dt_start"),
    (lambda: ms.FIRE(maxstep=0.0), "maxstep"),
    (lambda: ms.FIRE(chunk_size=2.5), "chunk_size"),
    (lambda: ms.FIRE(dt_start=float("nan")), "dt_start"),
    (lambda: ms.GradientDescent(step_size=-0.1), "step_size"),
    (lambda: ms.GradientDescent(cell_factor=0), "cell_factor"),
    (lambda: ms.NeighborListOptions(skin=-1.0), "skin"),
    (lambda: ms.NeighborListOptions(margin=float("inf")), "margin"),
    (lambda: ms.NeighborListOptions(capacity_multiplier=0.5), "capacity_multiplier"),
    (lambda: ms.NeighborListOptions(enabled="yes"), "enabled"),
    (lambda: ms.StabilityOptions(method="eig"), "method"),
    (lambda: ms.StabilityOptions(soft_mode_rtol=-1e-10), "soft_mode_rtol"),
    (lambda: ms.StabilityOptions(rounds=0), "rounds"),
    (lambda: ms.StabilityOptions(warn="no"), "warn"),
    (lambda: errors.check_policy("wran"), "on_failure"),
    (lambda: ms.custom_root(lambda x, t: x, on_failure="raies"), "on_failure"),
    (lambda: ms.custom_root(lambda x, t: x, root_tol=-1.0), "root_tol"),
    (lambda: ms.custom_root(lambda x, t: x, optimality_takes_aux=True), "has_aux"),
])
def test_option_objects_refuse_invalid_values_when_built(build, message):
    with pytest.raises(ms.OptionError, match=message):
        build()


def test_the_physics_entry_points_take_the_same_option_objects():
    import inspect

    names = {"minimizer", "neighbor_list", "stability", "on_failure"}
    for fn in (ms.relax, ms.make_relax):
        assert names <= set(inspect.signature(fn).parameters), fn
    for fn in (ms.sensitivity, ms.make_sensitivity, ms.observable_gradient, ms.make_observable_gradient,
               ms.elastic_constants, ms.make_elastic_constants):
        assert names - {"minimizer"} <= set(inspect.signature(fn).parameters), fn


# ------------------------------------------------------------------------------ errors
def _dimer():
    return ms.System(np.array([[0.0, 0, 0], [1.2, 0, 0]]))


def _lj():
    return ms.potentials.LennardJones(sigma=1.0, epsilon=1.0)


@functools.lru_cache(maxsize=None)
def _relaxed_dimer():
    return ms.relax(_dimer(), _lj(), fmax=1e-10)


def _ridge_root(**kw):
    X = np.random.default_rng(0).normal(size=(20, 4))
    F = lambda w, lam: X.T @ (X @ w) + lam * w - 1.0  # noqa: E731
    return F, functools.partial(ms.root_jvp, F, symmetric=True, **kw)


def _nonconverged_sensitivity(**kw):
    s = ms.System(np.array([[0.0, 0, 0], [1.05, 0, 0]]))  # forces far from zero
    return ms.sensitivity(s, _lj(), **kw)


@functools.lru_cache(maxsize=None)
def _relaxed_lj13():
    pot = ms.potentials.LennardJones(sigma=3.4, epsilon=0.0104)
    return ms.relax(ms.read(ms.data.path("lj13_ar.xyz")), pot, fmax=1e-9), pot


def _starved(**kw):
    starved = functools.partial(ms.linear_solve.cg, tol=1e-14, maxiter=1)
    result, pot = _relaxed_lj13()
    return ms.sensitivity(result, pot, solve=starved, **kw)


def _chain_stability(k1, k2):
    """Three atoms on a periodic line, springs k1 (0-1) and k2 (1-2): eigenvalues 0 (the
    translation), about 2 k1 and 1.5 k2."""
    from mdsens.md.zero_modes import stability

    def E(R):
        return 0.5 * k1 * (R[1, 0] - R[0, 0]) ** 2 + 0.5 * k2 * (R[2, 0] - R[1, 0]) ** 2

    return stability(E, jnp.zeros((3, 1)), True)


def _saddle():
    return _chain_stability(1.0, -1.0)


def _near_singular():
    return _chain_stability(1.0, 1e-9)


def _precision_error():
    code = ("import mdsens as ms, numpy as np\n"
            "try:\n"
            "    ms.relax(ms.System(np.array([[0.0, 0, 0], [1.2, 0, 0]])), ms.potentials.LennardJones())\n"
            "except ms.MdsensError as err:\n"
            "    print(type(err).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "MDSENS_ENABLE_X64": "0"}).stdout.strip()
    if out == "PrecisionError":
        raise ms.PrecisionError("raised in the subprocess, caught as MdsensError there")
    pytest.fail(f"the subprocess printed {out!r}")


def _unbounded_lp(**kw):
    """min −x1 − x2 over x ≥ 0, x1 − x2 ≤ 1: unbounded along (1, 1)."""
    G = np.array([[-1.0, 0.0], [0.0, -1.0], [1.0, -1.0]])
    return ms.optim.ConicQP(**kw).run(None, (None, np.array([-1.0, -1.0])), None, (G, np.array([0.0, 0.0, 1.0])))


ERROR_CASES = {
    "OptionError": lambda: ms.FIRE(dt_max=-1.0),
    "PrecisionError": _precision_error,
    "MissingFileError": lambda: ms.read("/nonexistent/structure.xyz"),
    "LinearSolveError": lambda: _starved(),
    "OptimalityStructureError": lambda: ms.root_jvp(lambda x, t: jnp.sum(x), jnp.ones(3), (1.0,), (1.0,)),
    "NullSpaceError": lambda: _ridge_root(nullspace=lambda x, t: jnp.zeros((1, 4)))[1](
        jnp.linalg.solve(np.eye(4), np.ones(4)), (1.0,), (1.0,)),
    "RootError": lambda: _ridge_root()[1](jnp.zeros(4), (1.0,), (1.0,)),
    "StructureError": lambda: ms.System(np.zeros((0, 3))),
    "StructureFileError": lambda: ms.write("x.cif", ms.System(np.zeros((2, 2)) + [[0, 0], [1, 0]])),
    "PotentialError": lambda: _lj().stress(_dimer()),
    "SpeciesError": lambda: ms.potentials.StillingerWeber().energy(_dimer()),
    "CutoffError": lambda: _lj().energy(ms.System(np.zeros((1, 3)), cell=np.eye(3), pbc=True)),
    "ParameterError": lambda: ms.potentials.SoftSphere(alpha=0.0),
    "UnknownParameterError": lambda: ms.sensitivity(_relaxed_dimer(), _lj(), wrt="rho"),
    "NeighborListError": lambda: _lj().neighbor_list(_dimer(), skin=-1.0),
    "RelaxError": lambda: ms.relax(_dimer(), _lj(), fmax=-1.0),
    "NotConvergedError": lambda: _nonconverged_sensitivity(strict=True),
    "ResultMismatchError": lambda: ms.sensitivity(_relaxed_dimer(), ms.potentials.Morse()),
    "SaddlePointError": _saddle,
    "SingularJacobianError": lambda: ms.jacobian_error.implicit_jacobian(
        lambda x, t: jnp.stack([x[0] - t, 0.0 * x[1]]), jnp.ones(2), 1.0),
    "NonFiniteError": lambda: ms.jacobian_error.implicit_jacobian(lambda x, t: x - t, jnp.array([np.nan]), 1.0),
    "InfeasibleProblemError": _unbounded_lp,
}

WARNING_CASES = {
    "LinearSolveWarning": lambda: _starved(on_failure="warn"),
    "NullSpaceWarning": lambda: _ridge_root(nullspace=lambda x, t: jnp.zeros((1, 4)), on_failure="warn")[1](
        jnp.linalg.solve(np.eye(4), np.ones(4)), (1.0,), (1.0,)),
    "RootWarning": lambda: _ridge_root(on_failure="warn")[1](jnp.zeros(4), (1.0,), (1.0,)),
    "NotConvergedWarning": lambda: ms.relax(_dimer(), _lj(), max_steps=2),
    "NearSingularWarning": _near_singular,
    "InfeasibleProblemWarning": lambda: _unbounded_lp(on_failure="warn"),
}


def _classes(base):
    found = {name for name in dir(ms) if isinstance(getattr(ms, name), type) and issubclass(getattr(ms, name), base)}
    return sorted(found - {base.__name__})


def test_every_error_and_warning_class_has_a_triggering_case():
    assert set(_classes(ms.MdsensError)) == set(ERROR_CASES)
    assert set(_classes(ms.MdsensWarning)) == set(WARNING_CASES)


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_mdsens_error_catches_every_error_class(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(getattr(ms, name)):
        try:
            ERROR_CASES[name]()
        except ms.MdsensError as err:
            assert type(err).__name__ == name or isinstance(err, getattr(ms, name))
            raise
        pytest.fail(f"{name}: nothing was raised")


@pytest.mark.parametrize("name", sorted(WARNING_CASES))
def test_mdsens_warning_covers_every_warning_class(name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        WARNING_CASES[name]()
    ours = [w for w in caught if issubclass(w.category, ms.MdsensWarning)]
    assert any(issubclass(w.category, getattr(ms, name)) for w in ours), [str(w.message) for w in caught]


def test_errors_keep_their_builtin_bases():
    assert issubclass(ms.OptionError, ValueError) and issubclass(ms.StructureError, ValueError)
    assert issubclass(ms.LinearSolveError, RuntimeError) and issubclass(ms.SaddlePointError, RuntimeError)
    assert issubclass(ms.OptimalityStructureError, TypeError)
    assert issubclass(ms.MissingFileError, FileNotFoundError)
    assert issubclass(ms.NotConvergedWarning, RuntimeWarning)
    assert ms.InfeasibleProblemError is ms.optim.InfeasibleProblemError and issubclass(ms.InfeasibleProblemError, RuntimeError)


def test_traced_checks_reraise_with_the_class_name():
    F, jvp = _ridge_root()
    with pytest.raises(Exception, match="RootError: the solver's output is not a root"):
        jax.jit(lambda t: jvp(jnp.zeros(4), (t,), (1.0,)))(1.0).block_until_ready()


def test_import_skips_jax_md_initializer_but_jax_md_still_works():
    """``import mdsens`` loads only the jax-md modules it uses (a cold-start cost: jax-md's
    ``__init__`` runs ~120 eager compilations in ``rigid_body``), and user code that
    imports jax-md afterwards sees the whole package."""
    code = (
        "import sys, mdsens\n"
        "assert 'jax_md.rigid_body' not in sys.modules and 'jax_md.energy' not in sys.modules\n"
        "import jax_md\n"
        "from jax_md import rigid_body\n"
        "assert callable(jax_md.energy.soft_sphere) and rigid_body.RigidBody\n"
        "assert callable(jax_md.space.free)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
