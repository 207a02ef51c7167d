"""mdsens.md.programs: the relaxation's host programs compile without YNNPACK fusions on
the CPU, and compute what XLA's defaults compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens.md import programs


def wrapped_energy(R, cell):
    """Small (N, 3) @ (3, 3) products under grad, as in a relaxation step."""
    frac = R @ jnp.linalg.inv(cell)
    d = (frac[:, None, :] - frac[None, :8, :])
    d = (d - jnp.floor(d + 0.5)) @ cell
    return jnp.sum(jnp.exp(-jnp.sum(d * d, axis=-1)))


def test_relaxation_programs_compile_without_ynnpack_fusions_and_agree_with_xla_defaults():
    options = programs.compiler_options()
    if options is None:
        pytest.skip("this jaxlib has no YNNPACK fusion option, or the backend is not the CPU")
    assert options == programs.CPU_COMPILER_OPTIONS
    rng = np.random.default_rng(0)
    R, cell = rng.uniform(0, 10, (2000, 3)), np.diag([10.0, 11.0, 12.0]) + 0.1
    fn = jax.value_and_grad(wrapped_energy)
    default = jax.jit(fn).lower(R, cell).compile()
    tuned = programs.jit(fn).lower(R, cell).compile()
    assert "__ynn_fusion" in default.as_text()  # XLA's default hands these products to YNNPACK
    assert "__ynn_fusion" not in tuned.as_text()
    (e0, g0), (e1, g1) = default(R, cell), tuned(R, cell)
    np.testing.assert_allclose(e1, e0, rtol=1e-13)
    np.testing.assert_allclose(g1, g0, rtol=1e-12, atol=1e-14 * np.abs(g0).max())
