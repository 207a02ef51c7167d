"""examples/fit_potential.py: the force-field fit recovers the parameters that made its targets.

Independent truths: the published Stillinger–Weber ε, σ, λ (Stillinger & Weber 1985; the
targets were generated with them, the fit starts 10 % off), and central finite
differences of the loss, each point a fresh re-relaxation, for the fit's gradient
(``jax.grad`` through ``ms.relax``, the cell following a₀(θ)). ``ms.observable_gradient``,
the same implicit derivative assembled by hand (w.r.t. θ and the cell's strain, chained
through a₀(θ)), is a second, independently written route to it.
"""

import pytest
from conftest import assert_figure, number_after, run_example

#: Stillinger & Weber, PRB 31, 5262 (1985): ε (eV), σ (Å), λ
PUBLISHED = {"ε": 2.1683, "σ": 2.0951, "λ": 21.0}


@pytest.mark.slow  # 1.5-2 min on 2 shared cores at load 1-5, nearly all compiling (the fit itself ~1 s)
def test_fit_potential_recovers_stillinger_weber_parameters(tmp_path):
    out = run_example("fit_potential.py", tmp_path, "--quick")
    assert_figure(tmp_path / "fit_potential.png")
    rows = (tmp_path / "fit_potential.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,") and len(rows) >= 4, out
    for symbol, true in PUBLISHED.items():
        # measured ~7e-12: the loss is minimized to round-off (relaxations to 1e-9 eV/Å)
        assert abs(number_after(out, f"recovered {symbol} =") / true - 1) < 1e-8, out
    # jax.grad vs central differences with relative step 1e-5: measured 1.9e-9 (truncation)
    assert number_after(out, "gradient agreement, jax.grad vs central FD (max |Δ| / max |FD|):") < 1e-6, out
    # two implicit routes, both CG to a relative residual of 1e-10: measured 7.9e-13
    assert number_after(
        out, "gradient agreement, jax.grad vs observable_gradient (max |Δ| / max |observable_gradient|):") < 1e-8, out
    assert number_after(out, "gradient agreement, observable_gradient vs central FD (max |Δ| / max |FD|):") < 1e-6, out
    # one relaxation and one reverse solve vs six re-relaxations: measured 0.6-0.7. Before
    # the compiled tangent (93836ff) every jax.grad recompiled its backward solve (~3 s,
    # ratio ~20); 2 catches that regression without timing noise failing the test.
    assert 0 < number_after(out, "cost ratio jax.grad / FD:") < 2, out
    assert number_after(out, "cost ratio observable_gradient / FD:") > 0, out
    first, last = (float(r.split(",")[1]) for r in (rows[1], rows[-1]))
    assert last < 1e-12 * first, out
