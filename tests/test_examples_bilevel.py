"""The bilevel examples of Blondel et al. (2022, §4) and the SVM hypergradients they rest on.

Truths independent of the code under test:

* SVM hyperparameter: dL/dθ of the validation loss by central finite differences of L,
  with β* from a proximal-gradient solve at tol 1e-11 (no derivative of any solver). Each
  of the three solvers' implicit hypergradient, in reverse and in forward mode, must match
  it; the two modes must agree with each other to round-off (one linear system, solved
  in both directions).
* The examples, run as scripts at reduced size: their printed finite-difference and
  implicit-vs-unrolled checks, and what each experiment is meant to show (hypergradient
  descent lowers the validation loss; distillation beats the class means on its objective;
  task-driven dictionaries beat the two-stage baseline).

The proximal-gradient check is in the default suite (~15 s, compilation); the other two
solvers and the scripts (each a fresh interpreter, ~1 min) are ``slow``.
"""

import pathlib
import re
import runpy

import jax
import numpy as np
import pytest
from conftest import assert_figure, number_after, run_example

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

#: A small SVM where every solver converges well before its cap (mirror descent: ~1200
#: iterations): k = 3 classes, m = 16 samples, p = 40 features, λ = e².
SVM_SIZE = dict(m=16, p=40, k=3)
THETA = 2.0
FD_STEP = 1e-4
#: Implicit vs finite differences: the solver's tol (1e-8) bounds ‖β − β*‖ (Theorem 1), the
#: finite difference is good to ~1e-8 (truncation h², truth solve 1e-11/h). Measured: 7e-9
#: for proximal gradient and BCD, 2e-6 for mirror descent (its residual is a weaker bound).
FD_RTOL = 1e-5
#: Forward vs reverse mode: the same linear system, solved to 1e-10 by GMRES each way
#: (measured ~1e-15).
MODES_RTOL = 1e-8


@pytest.fixture(scope="module")
def svm():
    """The example's module, a small SVM problem, and the finite-difference truth dL/dθ."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MPLBACKEND", "Agg")
    patch.syspath_prepend(str(EXAMPLES))
    try:
        module = runpy.run_path(str(EXAMPLES / "svm_hyperparameters.py"), run_name="svm_hyperparameters_example")
        arrays = module["make_classification"](SVM_SIZE["m"], SVM_SIZE["p"], SVM_SIZE["k"], seed=0)
        data = tuple(jax.numpy.asarray(a) for a in arrays)
        truth_solver = module["make_solver"]("proximal gradient", data[0], tol=1e-11, maxiter=100_000)
        loss = module["outer_loss"](truth_solver, SVM_SIZE["k"])
        value = jax.jit(lambda t, *d: loss(t, *d)[0])
        truth = float(value(THETA + FD_STEP, *data) - value(THETA - FD_STEP, *data)) / (2 * FD_STEP)
        yield module, data, truth
    finally:
        patch.undo()


def _hypergradients(module, data, name):
    """Implicit dL/dθ in reverse and forward mode, and the inner iterations."""
    loss = module["outer_loss"](module["make_solver"](name, data[0]), SVM_SIZE["k"])
    (_, iterations), reverse = jax.jit(jax.value_and_grad(loss, has_aux=True))(THETA, *data)
    forward, _ = jax.jit(jax.jacfwd(loss, has_aux=True))(THETA, *data)
    return float(reverse), float(forward), int(iterations)


@pytest.mark.parametrize("name", [
    "proximal gradient",
    pytest.param("mirror descent", marks=pytest.mark.slow),           # ~15 s more each
    pytest.param("block coordinate descent", marks=pytest.mark.slow),
])
def test_svm_hypergradient_matches_finite_differences_in_both_modes(svm, name):
    module, data, truth = svm
    assert jax.config.read("jax_enable_x64")
    reverse, forward, iterations = _hypergradients(module, data, name)
    assert iterations < module["MAXITER"], f"{name} did not converge ({iterations} iterations)"
    assert abs(truth) > 1e-3  # a hypergradient worth checking (θ is not on a flat stretch)
    assert abs(reverse - truth) <= FD_RTOL * abs(truth), (name, reverse, truth)
    assert abs(forward - reverse) <= MODES_RTOL * abs(reverse), (name, forward, reverse)


def test_mirror_descent_step_keeps_zero_entries_differentiable(svm):
    """The example's exponentiated-gradient step has a finite Jacobian where β has exact
    zeros (``softmax(log β − ηg)`` has NaN there: log 0); values equal the softmax form."""
    module, _, _ = svm
    beta = jax.numpy.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    grad = jax.numpy.array([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])
    step = module["exponentiated_gradient"]
    with np.errstate(divide="ignore"):
        reference = jax.nn.softmax(np.log(np.asarray(beta)) - 0.3 * np.asarray(grad), axis=-1)
    np.testing.assert_allclose(step(beta, grad, 0.3, None), reference, rtol=1e-14, atol=1e-300)
    jacobian = jax.jacfwd(step)(beta, grad, 0.3, None)
    assert np.all(np.isfinite(jacobian))


# ----------------------------------------------------------------------------- scripts


@pytest.mark.slow  # ~1 min: a fresh interpreter compiles 6 hypergradients (3 solvers × 2 kinds)
def test_svm_example(tmp_path):
    out = run_example("svm_hyperparameters.py", tmp_path, "--samples", "30", "--features", "60",
                      "--descent-steps", "3", "--repeats", "1")
    assert_figure(tmp_path / "svm_hyperparameters.png")
    assert "(cap" not in out, out  # every solver converged at this size (mirror descent: ~4800 it.)
    # PG/BCD measured ~1e-9, mirror descent ~1e-6 (it converges last, to tol 1e-8)
    assert number_after(out, "largest relative error (implicit vs finite differences):") < 1e-5, out
    assert number_after(out, "largest relative difference (implicit vs unrolled):") < 1e-5, out
    ratios = re.search(r"unrolled time / implicit time\): mirror descent ([0-9.]+), proximal gradient "
                       r"([0-9.]+), block coordinate descent ([0-9.]+)", out)
    assert ratios and all(float(r) > 0 for r in ratios.groups()), out
    descent = re.search(r"hypergradient descent on θ: L ([0-9.]+) at .* → L ([0-9.]+) at", out)
    assert descent and float(descent.group(2)) < float(descent.group(1)), out


@pytest.mark.slow  # ~45 s: compiling the implicit and unrolled outer gradients
def test_dataset_distillation_example(tmp_path):
    out = run_example("dataset_distillation.py", tmp_path, "--steps", "30", "--repeats", "1")
    assert_figure(tmp_path / "dataset_distillation.png")
    # measured 4e-7 and 3e-7: inner solve to ‖∇‖ ≤ 1e-8, FD step 1e-4
    assert number_after(out, "relative error (implicit vs finite differences):") < 1e-4, out
    difference = re.search(r"relative difference \(implicit vs unrolled, \d+ inner iterations\): "
                           r"([0-9.e+-]+)", out)
    assert difference and float(difference.group(1)) < 1e-5, out
    assert number_after(out, "time ratio unrolled/implicit:") > 0, out
    objective = re.search(r"distilled images: ([0-9.]+); on the 10 class-mean images: ([0-9.]+)", out)
    assert objective and float(objective.group(1)) < float(objective.group(2)), out
    accuracy = number_after(out, "test accuracy of logistic regression trained on the 10 distilled images:")
    assert accuracy > 0.8, out  # 30 steps: ~0.9 (chance: 0.1)


@pytest.mark.slow  # ~45 s: two-stage baseline, checks, 40 task-driven steps
def test_sparse_coding_example(tmp_path):
    out = run_example("sparse_coding.py", tmp_path, "--steps", "40", "--repeats", "1")
    assert_figure(tmp_path / "sparse_coding.png")
    assert number_after(out, "relative error (implicit vs finite differences):") < 1e-5, out  # ~1e-9
    difference = re.search(r"relative difference of dL/dD \(implicit vs unrolled, \d+ proximal-gradient "
                           r"iterations\): ([0-9.e+-]+)", out)
    assert difference and float(difference.group(1)) < 1e-6, out  # ~1e-9
    assert number_after(out, "time ratio unrolled/implicit:") > 0, out
    accuracy = re.search(r"test accuracy: two-stage ([0-9.]+), task-driven ([0-9.]+)", out)
    assert accuracy and float(accuracy.group(2)) > float(accuracy.group(1)) + 0.1, out
