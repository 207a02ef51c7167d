"""Progress of long calls (``progress=None|True|False``, :mod:`mdsens.md.progress`).

``True`` names the stages on stderr, ``False`` prints nothing, the default prints only
to a terminal (never under pytest), and results are bitwise the same either way.
"""

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens as ms
from mdsens import cli
from mdsens.md.progress import Stages, progress_enabled, traced_progress
from conftest import triangular_vacancy


class _Terminal(io.StringIO):
    """A stream that says it is a terminal, so that ``progress=None`` shows bars."""

    def isatty(self):
        return True


def _same(a, b, where="result"):
    """``a`` and ``b`` bitwise equal, field by field (NaN equal to NaN)."""
    if dataclasses.is_dataclass(a):
        for field in dataclasses.fields(a):
            _same(getattr(a, field.name), getattr(b, field.name), f"{where}.{field.name}")
    elif isinstance(a, tuple) and hasattr(a, "_fields"):  # NamedTuple results
        for name in a._fields:
            _same(getattr(a, name), getattr(b, name), f"{where}.{name}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (np.ndarray, jax.Array, np.generic, float)) and not isinstance(a, bool):
        assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def lj13():
    system = ms.read(str(ms.data.path("lj13_ar.xyz")))
    pot = ms.potentials.LennardJones(sigma=3.4, epsilon=0.0104)
    res = ms.relax(system, pot, fmax=1e-8, progress=False)
    assert res.converged
    return system, pot, res


@pytest.fixture(scope="module")
def crystal_2d():
    R, _, cell = triangular_vacancy()
    pot = ms.potentials.LennardJones(sigma=1.0, epsilon=1.0)
    res = ms.relax(ms.System(R, cell=cell, pbc=True), pot, fmax=1e-9, max_steps=100_000, progress=False)
    assert res.converged
    return pot, res


# ----------------------------------------------------------------------------- helpers
def test_progress_enabled_follows_the_stream_unless_told():
    assert progress_enabled(True, io.StringIO()) and not progress_enabled(False, _Terminal())
    assert progress_enabled(None, _Terminal()) and not progress_enabled(None, io.StringIO())
    assert not progress_enabled(None, object())  # no isatty at all
    closed = io.StringIO()
    closed.close()
    assert not progress_enabled(None, closed)


def test_stages_name_each_stage_and_stay_silent_when_off():
    shown = io.StringIO()
    with Stages(True, "work N=3", 2, stream=shown) as stages:
        stages.start("first stage")
        stages.start("second stage")
    text = shown.getvalue()
    assert "work N=3: first stage" in text and "work N=3: second stage" in text and "2/2" in text
    silent = _Terminal()
    with Stages(False, "work", 2, stream=silent) as stages:
        stages.start("first")
        stages.describe("detail")
    assert silent.getvalue() == "" and not stages.shown


def test_progress_is_off_under_jit_and_true_is_refused():
    seen = []

    def traced(x):
        seen.append(traced_progress(None, x, "f"))
        with pytest.raises(ms.OptionError, match="jit/vmap"):
            traced_progress(True, x, "f")
        return x

    jax.jit(traced)(jnp.float64(1.0))
    assert seen == [False]
    assert traced_progress(None, np.ones(2), "f") is None  # concrete: left to the stream


def test_relax_batch_refuses_progress_true_under_jit(lj13):
    system, pot, _ = lj13
    with pytest.raises(ms.OptionError, match="progress=True"):
        jax.jit(lambda R: ms.relax_batch([system.replace(positions=R)], pot, progress=True).energy)(
            system.positions)


# ------------------------------------------------------------------------------ calls
def test_sensitivity_shows_its_stages_only_when_asked(capsys, lj13):
    _, pot, res = lj13
    default = ms.sensitivity(res, pot)
    quiet = ms.sensitivity(res, pot, progress=False)
    assert capsys.readouterr().err == ""
    shown = ms.sensitivity(res, pot, progress=True)
    err = capsys.readouterr().err
    for stage in ("sensitivity N=13", "forces and Hessian blocks", "stability analysis",
                  "2 implicit solves and error estimates", "3/3"):
        assert stage in err
    _same(default, shown)
    _same(quiet, shown)


@pytest.mark.slow  # compiles the elastic programs (13 s); the other calls' stages are shown in the default suite
def test_elastic_constants_show_their_stages(capsys, crystal_2d):
    pot, res = crystal_2d
    quiet = ms.elastic_constants(res, pot, progress=False)
    assert capsys.readouterr().err == ""
    shown = ms.elastic_constants(res, pot, progress=True)
    err = capsys.readouterr().err
    for stage in (f"elastic_constants N={res.system.n_atoms}", "stability analysis",
                  "Born term and 3 internal-strain solves"):
        assert stage in err
    _same(quiet, shown)


def test_predict_and_uncertainty_show_their_solves(capsys, lj13):
    _, pot, res = lj13
    new = dict(pot.params, sigma=3.41)
    quiet = ms.predict(res, pot, new, progress=False)
    cov = np.diag([1e-4, 1e-8])
    quiet_u = ms.propagate_uncertainty(res, pot, cov, ["energy"], progress=False)
    assert capsys.readouterr().err == ""
    shown = ms.predict(res, pot, new, progress=True)
    err = capsys.readouterr().err
    for stage in ("predict N=13", "sensitivity (2 parameters)", "energy, forces and stress at the new parameters"):
        assert stage in err
    assert "sensitivity N=13" not in err  # one bar per call: the inner sensitivity is silent
    shown_u = ms.propagate_uncertainty(res, pot, cov, ["energy"], progress=True)
    err = capsys.readouterr().err
    assert "propagate_uncertainty N=13" in err and "adjoint solve: energy" in err
    _same(quiet, shown)
    assert np.array_equal(quiet_u.energy_std, shown_u.energy_std)
    assert np.array_equal(quiet_u["energy"].jacobian, shown_u["energy"].jacobian)


def test_relax_batch_shows_one_stage_for_its_one_program(capsys, lj13):
    system, pot, _ = lj13
    batch = [system, system.replace(positions=system.positions * 1.01)]
    quiet = ms.relax_batch(batch, pot, fmax=1e-6, progress=False)
    assert capsys.readouterr().err == ""
    shown = ms.relax_batch(batch, pot, fmax=1e-6, progress=True)
    err = capsys.readouterr().err
    assert "relax_batch B=2 N=13" in err and "relaxing 2 structures (one program)" in err
    _same(quiet, shown)


def test_demo_announces_its_sections_on_a_terminal_unless_no_progress():
    cases = [c for c in cli.demo_cases() if c.file == "lj13_ar.xyz"]
    outputs = {}
    for argv in (["demo"], ["demo", "--no-progress"]):
        out, err = io.StringIO(), _Terminal()
        code = cli.cmd_demo(cli.build_parser().parse_args(argv), out, err, cases=cases)
        assert code == 0, err.getvalue()
        outputs[argv[-1]] = (out.getvalue(), err.getvalue())
    out, err = outputs["demo"]
    assert "mdsens demo: relaxations: LJ13 Ar cluster" in err
    assert "mdsens demo: sensitivities: LJ13 Ar cluster" in err and "mdsens demo: figure" in err
    assert "mdsens demo" not in out  # the bar never mixes with the tables
    out_quiet, err_quiet = outputs["--no-progress"]
    assert err_quiet == ""
    assert len(out.splitlines()) == len(out_quiet.splitlines())  # the same report, bar or not
