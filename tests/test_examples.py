"""The example scripts and the quickstart notebook run end to end and say true things.

Each example runs as a subprocess, as a user would (``python examples/X.py --out DIR``),
must exit 0 and write its figure. Their printed checks are asserted against truths that
are independent of the code under test:

* packing: implicit dR*/dσ_A vs central finite differences of re-relaxed packings;
* Theorem 1: implicit Jacobian error ∝ solution error (slope ≈ 1 on a log–log fit) and
  smaller than unrolled FIRE's, both measured against the converged reference;
* elastic: Stillinger–Weber Si constants from the literature.
"""

import json
import pathlib
import re
import sys

import pytest
from conftest import assert_figure, number_after, run_example

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
NOTEBOOKS = REPO / "notebooks"


def test_packing_sensitivity_matches_finite_differences(tmp_path):
    out = run_example("packing_sensitivity.py", tmp_path)
    assert_figure(tmp_path / "packing_sensitivity.png")
    rel = number_after(out, "relative error (implicit vs finite differences):")
    assert rel < 1e-4, out  # measured ~6e-7; FD truncation and relaxation noise ~1e-6


@pytest.mark.slow  # ~60-100 s: 1600 unrolled FIRE steps, 40 implicit solves with their error estimates
def test_jacobian_error_follows_theorem_1(tmp_path):
    import csv

    import numpy as np
    from mdsens.jacobian_error import LINEARITY_MAX

    out = run_example("jacobian_error.py", tmp_path)
    assert_figure(tmp_path / "jacobian_error.png")
    m = re.search(r"implicit error ∝ ‖R_k − R\*‖\^([-0-9.]+); the unrolled error is ([0-9.e+]+)×", out)
    assert m, out
    slope, ratio = float(m.group(1)), float(m.group(2))
    assert 0.9 < slope < 1.1, out      # Theorem 1: linear in the solution error
    assert ratio > 10, out             # unrolled lags far behind (measured ~1e3)
    assert number_after(out, "unrolled Jacobian after all 1600 steps: relative error") < 1e-6

    # The a-posteriori estimate (Sensitivity.error_estimate) against the true implicit
    # error ‖J(R_k) − J*‖, both relative to ‖J*‖, at every iterate of the CSV.
    path = tmp_path / "jacobian_error.csv"
    assert path.is_file(), out
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 39, out
    step, error, estimate, linearity = (np.array([float(r[c]) for r in rows])
                                        for c in ("step", "implicit_error", "estimate", "linearity"))
    # NaN where the Hessian at R_k is indefinite (a saddle: no estimate), inf outside the
    # Newton basin (linearity > LINEARITY_MAX: an upper bound, trivially)
    has = np.isfinite(estimate)
    assert has.sum() >= 20, out        # positive definite from step ~600 on
    rounding = 1e-12                   # of ‖J*‖: J(R_k) − J* near R* is at rounding level
    below = [(int(k), e, x) for k, e, x in zip(step[has], error[has], estimate[has]) if x < e - rounding]
    assert not below, f"estimate below the true error at (step, error, estimate): {below}\n{out}"
    # Within a factor 10 in the Newton regime. Below the estimate's own floor (its value at
    # R*: twice the error of ms.sensitivity's own solve, which J* shares) the ratio
    # measures rounding, not the first-order error, so those iterates are left out.
    floor = number_after(out, "estimate floor (estimate at R*, relative to ‖J*‖):")
    newton = has & (linearity <= LINEARITY_MAX) & (error > floor)
    assert newton.sum() >= 10, out
    q = estimate[newton] / error[newton]
    far = [(int(k), float(r)) for k, r in zip(step[newton], q) if not 1 <= r <= 10]
    assert not far, f"estimate/error outside [1, 10] at (step, ratio): {far}\n{out}"


@pytest.mark.slow  # ~30 s: compiling Stillinger-Weber's second derivatives dominates
def test_elastic_si_matches_literature(tmp_path):
    out = run_example("elastic_si.py", tmp_path)
    assert_figure(tmp_path / "elastic_si.png")
    # C11, C12, C44 = 151.4, 76.4, 56.4 GPa (given to 0.1 GPa)
    assert number_after(out, "largest relative deviation from the reference:") < 2e-3, out


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    # jacobian_precision.py is tested in tests/test_jacobian_error.py, next to its module
    # paper_md_sensitivity.py's tests live in tests/test_paper_md_sensitivity.py, the
    # bilevel examples' in tests/test_examples_bilevel.py, silicon_vacancy.py's in
    # tests/test_silicon_vacancy.py, packing_ensemble.py's in tests/test_packing_ensemble.py,
    # fit_potential.py's in tests/test_fit_potential.py
    tested = {"packing_sensitivity.py", "jacobian_error.py", "fit_potential.py", "elastic_si.py",
              "jacobian_precision.py", "paper_md_sensitivity.py", "svm_hyperparameters.py",
              "dataset_distillation.py", "sparse_coding.py", "silicon_vacancy.py", "packing_ensemble.py"}
    assert scripts == tested, f"untested examples: {scripts - tested}"


# ------------------------------------------------------------------------------- notebook
@pytest.fixture
def current_python_kernel(tmp_path, monkeypatch):
    """A ``python3`` kernel spec that runs this interpreter (with mdsens installed),
    ahead of any other ``python3`` spec on the machine (JUPYTER_PATH comes first)."""
    pytest.importorskip("ipykernel", reason="ipykernel is not installed: pip install -e '.[test]'")
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (mdsens tests)", "language": "python",
        "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "python3"


def test_quickstart_notebook_runs(current_python_kernel):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed: pip install -e '.[test]'")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed: pip install -e '.[test]'")
    path = NOTEBOOKS / "quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
        "commit the notebook with its outputs cleared"

    client = nbclient.NotebookClient(nb, timeout=600, kernel_name=current_python_kernel,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.km = client.create_kernel_manager()
    try:  # a kernel that cannot start is an environment problem, not a notebook bug
        client.start_new_kernel()
        client.start_new_kernel_client()
    except Exception as exc:  # noqa: BLE001
        if client.km is not None and client.km.has_kernel:
            client._cleanup_kernel()
        pytest.skip(f"no Jupyter kernel could be started here: {type(exc).__name__}: {exc}")
    client.execute()  # reuses that kernel and shuts it down; a failing cell raises here

    text = "\n".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert "converged = True" in text
    assert "sensitivity w.r.t." in text and "relaxed-ion" in text
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2, "expected the elastic-matrix and arrow figures"
