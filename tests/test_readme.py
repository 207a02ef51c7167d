"""Every ```python block of README.md runs as written, in order, in one namespace."""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


#: The README's two halves, each run in its own namespace (so that the test workers
#: share them): the physics-agnostic core, then everything from this heading on.
PHYSICS_HEADING = "## Relaxed structures"


def section_blocks(part):
    core, _, physics = README.read_text().partition(PHYSICS_HEADING)
    assert physics, f"README.md lost its {PHYSICS_HEADING!r} section"
    text = core if part == "core" else physics
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("part", ["core", "physics"])
def test_readme_examples_run(part, tmp_path, monkeypatch, capsys):
    blocks = section_blocks(part)
    assert blocks, "README.md lost its examples"
    monkeypatch.chdir(tmp_path)  # the examples must not depend on the working directory
    namespace = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "nan" not in printed.lower()


def test_readme_core_example_is_correct():
    """The ten-line example prints the closed-form ridge Jacobian, −(XᵀX + λI)⁻¹ x*."""
    import jax
    import jax.numpy as jnp

    namespace = {}
    exec(compile(python_blocks()[0], str(README), "exec"), namespace)
    X, y, ridge = namespace["X"], namespace["y"], namespace["ridge"]
    A = np.asarray(X.T @ X) + 10.0 * np.eye(5)
    truth = -np.linalg.solve(A, np.linalg.solve(A, np.asarray(X.T @ y)))
    np.testing.assert_allclose(jax.jacfwd(ridge, argnums=1)(None, 10.0), truth, rtol=1e-8)


def test_readme_ring_example_matches_pseudo_inverse():
    import jax
    import jax.numpy as jnp

    namespace = {}
    for block in python_blocks()[:2]:
        exec(compile(block, str(README), "exec"), namespace)
    n, energy, relax_ring = namespace["n"], namespace["ring_energy"], namespace["relax_ring"]
    rest = jnp.linspace(0.9, 1.1, n)
    x = relax_ring(jnp.zeros(n), rest)
    assert float(jnp.abs(jax.grad(energy)(x, rest)).max()) < 1e-12
    H = np.asarray(jax.hessian(energy)(x, rest))
    B = np.asarray(jax.jacfwd(jax.grad(energy), argnums=1)(x, rest))
    truth = -np.linalg.pinv(H) @ B
    np.testing.assert_allclose(jax.jacrev(relax_ring, argnums=1)(jnp.zeros(n), rest), truth, atol=1e-9)


def test_readme_lasso_example_matches_the_closed_form_on_the_support():
    """On the lasso's support S, w_S = (A_SᵀA_S)⁻¹(A_Sᵀb − λ sign w_S): dw_S/dλ = −(A_SᵀA_S)⁻¹ sign w_S."""
    blocks = python_blocks()
    block = next(b for b in blocks if "optim.ProximalGradient" in b)
    namespace = {}
    exec(compile(blocks[0] + block, str(README), "exec"), namespace)
    A, w, dw = (np.asarray(namespace[k]) for k in ("A", "w", "dw"))
    support = np.abs(w) > 1e-8
    AS = A[:, support]
    truth = -np.linalg.solve(AS.T @ AS, np.sign(w[support]))
    np.testing.assert_allclose(dw[support], truth, rtol=1e-6)
    np.testing.assert_allclose(dw[~support], 0.0, atol=1e-10)
