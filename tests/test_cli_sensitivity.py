"""`mdsens sensitivity` against the exact Lennard-Jones law dE*/dε = E*/ε (cutoff tied to σ)."""

import csv
import io

import numpy as np

from mdsens.cli import main
from conftest import data_file


def test_sensitivity_command_prints_and_writes_the_exact_energy_derivative(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    path = tmp_path / "sens.csv"
    code = main(["sensitivity", data_file("lj13_ar.xyz"), "-p", "lj", "--param", "sigma=3.4",
                 "--param", "epsilon=0.0104", "--wrt", "sigma,epsilon", "--csv", str(path)], out, err)
    assert code == 0, err.getvalue()
    assert "epsilon" in out.getvalue() and "dE/dtheta" in out.getvalue()
    rows = {r["parameter"]: r for r in csv.DictReader(path.open())}
    relax_out = io.StringIO()
    assert main(["relax", data_file("lj13_ar.xyz"), "-p", "lj", "--param", "sigma=3.4",
                 "--param", "epsilon=0.0104", "--fmax", "1e-8", "--no-progress"], relax_out, err) == 0
    energy = float(next(l for l in relax_out.getvalue().splitlines() if l.startswith("energy")).split()[1])
    np.testing.assert_allclose(float(rows["epsilon"]["dE/dtheta"]), energy / 0.0104, rtol=1e-7)


def test_sensitivity_command_rejects_unknown_parameter():
    out, err = io.StringIO(), io.StringIO()
    code = main(["sensitivity", data_file("lj13_ar.xyz"), "-p", "lj", "--wrt", "nonsense"], out, err)
    assert code == 2 and "nonsense" in err.getvalue()
