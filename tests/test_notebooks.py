"""Every notebook in ``notebooks/`` runs end to end and prints its checks.

Each ``notebooks/*.ipynb`` is committed with its outputs cleared, is executed with
nbclient in a kernel running this interpreter, and must finish without an error. The
printed agreements of the notebooks listed in ``EXPECTED`` are asserted against truths
independent of the code under test (finite differences of re-relaxations, published
constants, exact scaling laws, Monte Carlo re-relaxations); a notebook without an entry
is still executed and checked. The quickstart is in the default suite; the others take
minutes on 2 CPU cores (compiling three-body derivatives, batched relaxations) and are
marked ``slow``.
"""

import json
import pathlib
import re
import sys

import pytest
from conftest import number_after

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"

#: Notebooks cheap enough for the default suite; every other one is ``slow``.
FAST = {"quickstart.ipynb"}


def check_quickstart(text, images):
    assert "converged = True" in text
    assert "sensitivity w.r.t." in text and "relaxed-ion" in text
    assert len(images) == 2, "expected the elastic-matrix and arrow figures"


def check_paper_figure(text, images):
    assert "converged = True" in text
    # measured ~1e-7: FD truncation (h = 1e-6) and relaxation noise
    assert number_after(text, "relative error (implicit vs finite differences, fixed box):") < 1e-4, text
    converged, total = map(int, re.search(r"relaxations converged: (\d+) of (\d+)", text).groups())
    assert converged >= total - 2, text
    # measured ~1e-8: the FD slope of ⟨E*⟩ over the same seeds, warm-started
    assert number_after(text, "max relative difference (⟨dE*/dD⟩ implicit vs FD slope of ⟨E*⟩):") < 1e-4, text
    assert len(images) == 2, "expected the arrow figure and the ensemble figure"


def check_silicon_vacancy(text, images):
    assert abs(number_after(text, "bulk closed form vs direct evaluation [eV]:")) < 1e-9, text
    assert "converged = True" in text
    # the known SW vacancy (~2.8 eV), not the spurious minimum with unbonded neighbours (4.3 eV)
    assert 2.5 < number_after(text, "E_f (fixed cell) [eV]:") < 3.1, text
    # exact SW scaling laws: E ∝ ε; stress and bulk modulus both ∝ ε
    assert abs(number_after(text, "exact scaling check, dE_f/dε − E_f/ε [eV]:")) < 1e-8, text
    assert abs(number_after(text, "exact scaling check, dΩ_rel/dε [Å³]:")) < 1e-5, text
    # first-order predictions against re-relaxations: errors O(Δθ²) (ratio 4), O(Δθ⁴) at the
    # predicted structure (ratio 16)
    for key, ratio in (("E_linear", 4.0), ("Omega_linear", 4.0), ("E_at_prediction", 16.0)):
        got = number_after(text, f"prediction error ratio, {key} (5% / 2.5%):")
        assert abs(got - ratio) < 0.15 * ratio, text
    # dE_f/dθ by autodiff of the user observable through dR*/dθ vs dE*/dθ (differ by ∇E·dR*/dθ ~ fmax)
    assert number_after(text, "max difference [eV/unit]:") < 1e-6, text
    # Monte Carlo of re-relaxations against the same draws through the linear model
    for key in ("E_f", "Omega_rel"):
        got = number_after(text, f"{key} Monte Carlo std / std of the same draws through the linear model:")
        assert abs(got - 1.0) < 0.1, text
    assert len(images) == 2, "expected the prediction and the uncertainty figures"


def check_elastic_constants(text, images):
    # C11, C12, C44 = 151.4, 76.4, 56.4 GPa (given to 0.1 GPa)
    assert number_after(text, "largest relative deviation from the published values:") < 2e-3, text
    for name in ("C11", "C12", "C44"):
        m = re.search(rf"clamped-ion {name}: implicit ([-0-9.]+) GPa, finite strain ([-0-9.]+) GPa", text)
        assert m and abs(float(m.group(1)) - float(m.group(2))) < 1e-3 * abs(float(m.group(2))), text
    assert number_after(text, "relative difference, relaxed-ion C44 (implicit vs finite strain):") < 1e-4, text
    assert number_after(text, "exact scaling check, dC/dε vs C/ε (relaxed-ion), max relative difference:") < 1e-6, text
    assert len(images) == 1, "expected the heatmaps"


#: Per notebook, the checks of its printed output and inline figures.
EXPECTED = {
    "quickstart.ipynb": check_quickstart,
    "paper_figure.ipynb": check_paper_figure,
    "silicon_vacancy.ipynb": check_silicon_vacancy,
    "elastic_constants.ipynb": check_elastic_constants,
}


def notebook_params():
    return [pytest.param(path, id=path.stem, marks=() if path.name in FAST else (pytest.mark.slow,))
            for path in sorted(NOTEBOOKS.glob("*.ipynb"))]


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


def test_notebooks_are_found():
    assert (NOTEBOOKS / "quickstart.ipynb").is_file()
    assert set(EXPECTED) <= {p.name for p in NOTEBOOKS.glob("*.ipynb")}, "a checked notebook went missing"


@pytest.mark.parametrize("path", notebook_params())
def test_notebook_runs(path, current_python_kernel):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed: pip install -e '.[test]'")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed: pip install -e '.[test]'")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
        f"commit {path.name} with its outputs cleared"

    client = nbclient.NotebookClient(nb, timeout=1200, kernel_name=current_python_kernel,
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

    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{path.name} raised"
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    check = EXPECTED.get(path.name)
    if check is not None:
        check(text, images)
