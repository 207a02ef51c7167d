"""benchmarks/core.py still runs: ``--smoke`` (p = 10, one repeat) with the test interpreter.

The test venv has no jaxopt; the benchmark must then skip that column, not fail.
"""

import os
import subprocess
import sys

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


def test_sensitivity_benchmark_smoke():
    """benchmarks/sensitivity.py on one small packing and the 63-atom SW crystal (no
    peers): the table prints and mdsens's forward derivative matches the dense
    pseudo-inverse it is checked against, on the dense and the neighbor-list paths."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "sensitivity.py"), "--soft-sizes", "32",
         "--si-reps", "2", "--no-unroll", "--no-jaxopt", "--no-elastic"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fwd/relax" in proc.stdout, proc.stdout
    import ast

    rows = [ast.literal_eval(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["system"] for r in rows] == ["soft-sphere 2D", "SW Si + vacancy"], rows
    for result in rows:
        assert result["ref"] == "pinv" and result["fwd_err"] < 1e-8, result
