"""Rigid modes, numerically found soft modes (rattlers), saddles and near-singular warnings."""

import jax.numpy as jnp
import numpy as np
import pytest

import mdsens  # noqa: F401  (float64)
from mdsens.md.zero_modes import (
    NearSingularWarning,
    SaddlePointError,
    rigid_modes,
    stability,
)


@pytest.mark.parametrize(
    "positions, pbc, k",
    [
        (np.random.default_rng(0).normal(size=(5, 3)), True, 3),
        (np.random.default_rng(0).normal(size=(5, 3)), False, 6),
        (np.random.default_rng(0).normal(size=(5, 2)), False, 3),
        (np.random.default_rng(0).normal(size=(5, 2)), True, 2),
        (np.array([[0.0, 0, 0], [1, 0, 0], [2.5, 0, 0]]), False, 5),  # linear molecule
        (np.array([[0.3, 0.1, 0.2]]), False, 3),  # single atom: no rotation
    ],
)
def test_rigid_mode_counts_and_orthonormality(positions, pbc, k):
    B = rigid_modes(positions, pbc)
    assert B.shape == (k,) + positions.shape
    Q = B.reshape(k, -1)
    np.testing.assert_allclose(Q @ Q.T, np.eye(k), atol=1e-12)


def test_rigid_modes_are_zero_modes_of_a_pair_energy():
    R = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3)))

    d0 = R[:, None] - R[None]
    target = jnp.sum(d0 * d0, -1)

    def E(R):  # minimum (E = 0, zero gradient) at R: rotations are exact zero modes there
        d = R[:, None] - R[None]
        return jnp.sum((jnp.sum(d * d, -1) - target) ** 2)

    import jax

    H = jax.hessian(E)(R).reshape(18, 18)
    B = rigid_modes(R, False).reshape(6, -1)
    np.testing.assert_allclose(np.asarray(H) @ B.T, 0.0, atol=1e-9 * np.abs(H).max())


def test_rattler_is_found_as_soft_mode():
    # three bonded particles and one with no interactions at all (a rattler), periodic
    def E(R):
        return jnp.sum((R[0] - R[1]) ** 2) + jnp.sum((R[1] - R[2]) ** 2) + jnp.sum((R[0] - R[2]) ** 2)

    R = jnp.asarray([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    rep = stability(E, R, True)
    assert rep.n_soft == 2
    np.testing.assert_allclose(np.abs(rep.soft[:, 3]).sum(), np.sqrt(2) * 2 / np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(rep.soft[:, :3], 0.0, atol=1e-8)
    assert rep.basis.shape[0] == 4
    assert rep.lambda_min > 0


def test_saddle_raises_with_most_negative_eigenvalue():
    def E(R):
        dx, dy = R[0] - R[1]
        return -0.5 * dx**2 + 2.0 * dy**2

    with pytest.raises(SaddlePointError, match=r"saddle point.*λ_min = -2 "):
        stability(E, jnp.zeros((2, 2)), True)


def test_near_singular_warning_reports_smallest_eigenvalue():
    def E(R):
        dx, dy = R[0] - R[1]
        return 0.5 * dx**2 + 0.5e-8 * dy**2

    with pytest.warns(NearSingularWarning, match="smallest eigenvalue 2e-08"):
        rep = stability(E, jnp.zeros((2, 2)), True)
    np.testing.assert_allclose(rep.lambda_min, 2e-8, rtol=1e-6)


def test_lobpcg_agrees_with_dense():
    rng = np.random.default_rng(5)
    k = jnp.asarray(rng.uniform(0.5, 2.0, size=(40,)))

    def E(R):  # a ring of springs with random stiffnesses (periodic-like, translation invariant)
        d = R - jnp.roll(R, 1, axis=0)
        return 0.5 * jnp.sum(k[:, None] * d * d)

    R = jnp.asarray(rng.normal(size=(40, 2)))
    dense = stability(E, R, True, method="dense")
    lob = stability(E, R, True, method="lobpcg", warn=False)
    np.testing.assert_allclose(lob.eigenvalues[:3], dense.eigenvalues[:3], rtol=1e-5)
