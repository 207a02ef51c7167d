"""``examples/packing_ensemble.py``: jax-md's meta-optimization experiment (⟨E*⟩(D) of the
binary soft-sphere packing over random initial conditions) with implicit gradients,
all seeds and diameters relaxed as one ``ms.relax_batch`` program.

Run at reduced size (N = 32, 8 seeds, 3 diameters), against truths independent of the
implicit derivative: central finite differences of E* at D ± h (same seeds, warm-started
from R*; h = 1e-6, so the h² truncation error is ~1e-8 relative, estimated by the script
from D ± 2h, and round-off of the energy differences ~1e-10 relative); the envelope
theorem (∂E/∂D at fixed R plus the stress term, no linear solve); and the converged
limit of the unrolled FIRE trajectories. Slow: ~90-110 s on 2 shared cores, nearly all
compilation (the batched jvp, ms.sensitivity, the unrolled scan, ms.relax).
"""

import csv

import pytest
from conftest import assert_figure, number_after, run_example


@pytest.mark.slow
def test_example_at_reduced_size(tmp_path):
    text = run_example("packing_ensemble.py", tmp_path, "--n", "32", "--seeds", "8", "--points", "3",
                       "--unroll-steps", "10,100,1000")
    assert_figure(tmp_path / "packing_ensemble.png")
    assert "N=32" in text and number_after(text, "number of seeds:") == 8

    converged = number_after(text, "relaxations converged:")
    assert converged == 24, text  # fmax 1e-12 is reached by every seed at this size
    jumped = number_after(text, "seeds that jumped basin under D ± 2h:")
    assert jumped <= 2, text  # measured 0: h = 1e-6 rarely crosses a change of contacts

    # implicit ⟨dE*/dD⟩ against the FD slope of ⟨E*⟩ with the same seeds: measured 2e-8,
    # the script's own estimate of the FD truncation error is 2e-8
    fd = number_after(text, "max relative difference (⟨dE*/dD⟩ implicit vs FD slope of ⟨E*⟩ at D ± h):")
    fd_error = number_after(text, "estimated FD truncation error (relative, from D ± 2h):")
    assert fd < max(10 * fd_error, 1e-7), text
    assert number_after(text, "max relative difference per seed (implicit vs FD at D ± h):") < 1e-5, text

    # the envelope theorem: the implicit positions term contributes ∇E·dR*/dD ~ fmax (1e-12)
    assert number_after(text, "max relative difference (implicit jvp vs envelope, per structure):") < 1e-7, text
    assert number_after(text, "max relative difference (ms.sensitivity denergy vs implicit jvp):") < 1e-9, text
    assert number_after(text, "max relative difference (ms.sensitivity denergy vs denergy_partial):") < 1e-7, text

    # truncated unrolling is biased; once the unrolled FIRE has converged (K = 1000 at
    # N = 32) its derivative is the converged one of the same trajectories
    b10 = number_after(text, "unrolled bias at K = 10:")
    b1000 = number_after(text, "unrolled bias at K = 1000:")
    assert b10 > 0.1 and b1000 < 1e-3 and b1000 < b10 / 100, text

    # E* > 0 everywhere: at φ = 0.98 discs must overlap
    assert number_after(text, "min E* over all converged relaxations:") > 0, text

    rows = list(csv.DictReader(open(tmp_path / "packing_ensemble.csv")))
    assert len(rows) == 3 and all(float(r["mean_E"]) > 0 for r in rows)
    assert [float(r["D"]) for r in rows] == pytest.approx([0.4, 0.7, 1.0])
    for r in rows:
        assert float(r["mean_dEdD_fd"]) == pytest.approx(float(r["mean_dEdD_implicit"]), rel=1e-5, abs=1e-8)
