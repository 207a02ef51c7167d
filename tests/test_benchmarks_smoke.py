"""benchmarks/core.py still runs: ``--smoke`` (p = 10, one repeat) with the test interpreter.

The test venv has no jaxopt; the benchmark must then skip that column, not fail.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_core_benchmark_smoke(tmp_path):
    out_json = tmp_path / "core.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "core.py"), "--smoke", "--quiet",
         "--json", str(out_json)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "quantity  method" in proc.stdout and "median ms" in proc.stdout, proc.stdout
    assert "FAILED" not in proc.stdout
    assert out_json.exists()


def _run_sensitivity_benchmark(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "sensitivity.py"), *args,
         "--no-unroll", "--no-jaxopt", "--no-elastic"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fwd/relax" in proc.stdout, proc.stdout
    return [ast.literal_eval(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow  # ~70 s; `make bench` runs the benchmark itself
def test_sensitivity_benchmark_smoke():
    """benchmarks/sensitivity.py on one small packing (no peers): the table prints and
    mdsens's forward derivative matches the dense pseudo-inverse it is checked against."""
    (result,) = _run_sensitivity_benchmark("--soft-sizes", "32", "--si-reps")
    assert result["system"] == "soft-sphere 2D", result
    assert result["ref"] == "pinv" and result["fwd_err"] < 1e-8, result


@pytest.mark.slow  # ~85 s, mostly compilation
def test_sensitivity_benchmark_smoke_stillinger_weber():
    """The 63-atom SW row, on the neighbor-list path (SW switches to lists at 32 atoms)."""
    (result,) = _run_sensitivity_benchmark("--soft-sizes", "--si-reps", "2")
    assert result["system"] == "SW Si + vacancy", result
    assert result["ref"] == "pinv" and result["fwd_err"] < 1e-8, result


@pytest.mark.slow  # two subprocesses compiling a batched relaxation
def test_batch_benchmark_smoke(tmp_path):
    """benchmarks/batch.py on 2 packings, 1 and 2 forced host devices: the sharded batch
    reaches the same minima as the loop of ms.relax (energies to round-off)."""
    import json

    out_json = tmp_path / "batch.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "batch.py"), "--batch", "2", "--devices", "1", "2",
         "--repeats", "1", "--json", str(out_json)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loop / batch" in proc.stdout, proc.stdout
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["devices"] for r in rows] == [1, 2]
    loop = rows[0]["loop_energy"]
    for r in rows:
        assert r["batch_converged"] == 2
        assert max(abs(a - b) for a, b in zip(r["batch_energy"], loop)) < 1e-10 * max(abs(e) for e in loop)


_LAMMPS_MODELS_CHECK = r"""
import importlib.util, os, sys
import numpy as np
root = sys.argv[1]
spec = importlib.util.spec_from_file_location("bench_lammps_script", os.path.join(root, "benchmarks", "lammps.py"))
bench = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(bench)  # needs no LAMMPS until main() runs past its arguments
from _lammps import pair_setup

label, system, pot = bench.LJ.build(3)
assert system.n_atoms == 107, system.n_atoms
assert min(np.diag(np.asarray(system.cell))) > 2 * float(pot.params["r_cutoff"])
params = {k: float(pot.params[k]) for k in bench.LJ.names}
assert params == {"epsilon": 0.0104, "sigma": 3.4}, params
commands = pair_setup(bench.LJ.potential(dict(params, sigma=3.5)), workdir=".").commands
assert commands == ["pair_style lj/charmm/coul/charmm 6.0 7.5", "pair_coeff 1 1 0.0104 3.5"], commands
assert bench.LJ.fd_step("epsilon", 0.0104) == bench.LJ_RELATIVE_STEP * 0.0104

label, system, pot = bench.SW.build(2)
assert system.n_atoms == 63
same = bench.SW.potential(pot.params)
assert all(float(same.params[k]) == float(pot.params[k]) for k in bench.SW.names)
assert bench.SW.fd_step("q", 0.0) == bench.DEFAULT_RELATIVE_STEP  # the floor of 1

try:
    bench.main(["--lj-sizes", "2"])
except SystemExit as exc:
    assert exc.code == 2, exc.code
else:
    raise AssertionError("--lj-sizes 2 accepted")
print("ok")
"""


def test_lammps_benchmark_models(tmp_path):
    """benchmarks/lammps.py's SW and LJ model descriptions, without LAMMPS: the LJ cell
    (N = 107, wider than 2 r_c), the LAMMPS commands for perturbed parameters, the FD
    steps, and the refusal of a cell narrower than 2 r_c."""
    proc = subprocess.run([sys.executable, "-c", _LAMMPS_MODELS_CHECK, ROOT], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]
