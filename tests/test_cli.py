"""The `mdsens` command: info, relax, demo, and one-line errors with exit status 2."""

import io
import os
import subprocess
import sys

import ase.io
import pytest

from mdsens import cli
from conftest import DATA

LJ13 = os.path.join(DATA, "lj13_ar.xyz")


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _field(text, key):
    for line in text.splitlines():
        if line.startswith(key + " "):
            return line[len(key):].strip()
    raise KeyError(key)


def test_info_crystal_density():
    code, out, err = run("info", os.path.join(DATA, "si_diamond.cif"))
    assert code == 0 and err == ""
    assert _field(out, "atoms") == "8" and _field(out, "boundary") == "periodic"
    # Silicon's density at a = 5.431 Å is 2.329 g/cm³ (8 × 28.0855 u per a³).
    assert float(_field(out, "mass density").split()[0]) == pytest.approx(2.3290, abs=1e-3)
    assert float(_field(out, "volume").split()[0]) == pytest.approx(5.431**3, rel=1e-5)


def test_info_2d_and_cluster():
    code, out, _ = run("info", os.path.join(DATA, "soft_spheres_2d.xyz"))
    assert code == 0 and _field(out, "dimension") == "2D" and "A: 64, B: 64" in out
    assert float(_field(out, "area").split()[0]) == pytest.approx(12.85758868**2, rel=1e-5)
    code, out, _ = run("info", LJ13)
    assert code == 0 and "free" in _field(out, "boundary")


def test_relax_lj13_reaches_published_minimum_and_writes(tmp_path):
    """With epsilon = 1 and no effective cutoff the energy is LJ13's -44.326801 ε
    (Wales & Doye 1997)."""
    out_file = tmp_path / "relaxed.xyz"
    code, out, err = run(
        "relax", LJ13, "--potential", "lj", "--param", "sigma=3.4", "--param", "epsilon=1",
        "--param", "r_cutoff=40", "--param", "r_onset=35", "--fmax", "1e-8", "-o", str(out_file),
    )
    assert code == 0, err
    energy = float(_field(out, "energy").split()[0])
    assert energy == pytest.approx(-44.326801, abs=1e-6)
    assert _field(out, "converged") == "yes" and float(_field(out, "fmax").split()[0]) < 1e-8
    atoms = ase.io.read(out_file)
    assert len(atoms) == 13 and atoms.get_potential_energy() == pytest.approx(energy, abs=1e-9)


def test_relax_not_converged_is_reported_honestly():
    code, out, err = run("relax", LJ13, "-p", "lj", "--param", "sigma=3.4", "--param", "epsilon=0.0104",
                         "--max-steps", "3")
    assert code == 1
    assert _field(out, "converged") == "NO" and _field(out, "steps") == "3"
    assert err.startswith("mdsens: warning:") and "did not converge" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["relax", LJ13, "-p", "nosuch"], "unknown potential 'nosuch'"),
        (["relax", LJ13, "-p", "lj", "--param", "sigma"], "expected key=value"),
        (["relax", LJ13, "-p", "lj", "--param", "sigma=big"], "is not a number"),
        (["relax", LJ13, "-p", "lj", "--param", "sgima=3.4"], "its parameters are: sigma, epsilon"),
        (["relax", "missing.xyz", "-p", "lj"], "'missing.xyz' does not exist"),
        (["info", DATA], "directory"),
        (["relax", LJ13], "--potential"),
        (["frobnicate"], "invalid choice"),
        (["relax", LJ13, "-p", "sw"], "contains ['Ar']"),  # SW knows Si, not Ar
    ],
)
def test_user_errors_are_one_line_exit_2(argv, message):
    code, out, err = run(*argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mdsens: error: ")
    assert message in err and "Traceback" not in err


def test_unreadable_file(tmp_path):
    bad = tmp_path / "bad.xyz"
    bad.write_text("not a structure\n")
    code, _, err = run("info", str(bad))
    assert code == 2 and "bad.xyz" in err and err.count("\n") == 1


def test_demo_runs_sections_in_order():
    """The demo prints its table and passes its relaxations to later sections."""
    cases = [c for c in cli.demo_cases() if c.file == "lj13_ar.xyz"]
    seen = []
    out, err = io.StringIO(), io.StringIO()
    args = cli.build_parser().parse_args(["demo"])
    code = cli.cmd_demo(args, out, err, cases=cases,
                        sections=cli.DEMO_SECTIONS + [lambda ctx: seen.append(ctx.results)])
    out, err = out.getvalue(), err.getvalue()
    assert code == 0, err
    row = [line for line in out.splitlines() if line.startswith("LJ13 Ar cluster")][0]
    assert row.split()[-2] == "yes"
    assert len(seen) == 1 and seen[0][0][3].converged


@pytest.mark.slow
def test_full_demo():
    code, out, err = run("demo")
    assert code == 0, err
    assert out.count(" yes ") == len(cli.demo_cases())


def test_console_entry_point_as_module():
    proc = subprocess.run([sys.executable, "-m", "mdsens.cli", "info", LJ13], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "atoms" in proc.stdout and proc.stderr == ""


def test_persistent_compilation_cache_is_used_and_can_be_switched_off(tmp_path):
    """The command keeps compiled programs in $MDSENS_CACHE_DIR; --no-compilation-cache
    (or MDSENS_COMPILATION_CACHE=0) keeps nothing."""
    argv = [sys.executable, "-m", "mdsens.cli", "relax", LJ13, "-p", "lj", "--param", "sigma=3.4",
            "--param", "epsilon=0.0104", "--no-progress"]
    env = {**os.environ, "MDSENS_COMPILATION_CACHE": "1", "MDSENS_CACHE_DIR": str(tmp_path / "on")}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert any((tmp_path / "on").iterdir())
    env["MDSENS_CACHE_DIR"] = str(tmp_path / "off")
    proc = subprocess.run(argv[:3] + ["--no-compilation-cache"] + argv[3:], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "off").exists()
