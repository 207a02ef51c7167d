"""Strain, stress and Voigt conventions: the one home for all of them.

* A homogeneous strain is applied **at fixed fractional coordinates**: with the
  deformation gradient ``D = I + ε`` (``ε`` symmetric), positions and cell rows map as
  ``R → R D`` and ``cell → cell D``.
* **Voigt order** ``(xx, yy, zz, yz, xz, xy)`` in 3D and ``(xx, yy, xy)`` in 2D, with
  **engineering shear** strains ``γ_ab = 2 ε_ab``, so that ``σ_I = C_IJ ε_J`` is the usual
  matrix form (cubic ``C11, C12, C44``).
* **Stress** has ASE's sign: ``σ = (1/V) ∂E/∂ε`` at ``ε = 0`` (positive = tensile, the
  cell wants to shrink); jax-md's stress is ``−σ``. Units eV/Å³ (eV/Å² in 2D).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "voigt_names",
    "voigt_pairs",
    "voigt_labels",
    "voigt_strain_matrix",
    "deformation_gradient",
    "strain_to_voigt",
    "full_to_voigt",
    "strain_energy_fn",
    "stress_from_energy",
    "energy_forces_stress",
]


def voigt_names(dim: int) -> tuple:
    """Voigt component labels: ``(xx, yy, zz, yz, xz, xy)`` (3D) or ``(xx, yy, xy)`` (2D)."""
    return ("xx", "yy", "zz", "yz", "xz", "xy") if dim == 3 else ("xx", "yy", "xy")


def voigt_pairs(dim: int) -> tuple:
    """Tensor indices ``(a, b)`` of each Voigt component, in :func:`voigt_names` order."""
    return ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)) if dim == 3 else ((0, 0), (1, 1), (0, 1))


def voigt_labels(n: int) -> Sequence[str]:
    """Labels of an ``n × n`` Voigt matrix: :func:`voigt_names` for 6 or 3, else ``1..n``."""
    if n in (6, 3):
        return voigt_names(3 if n == 6 else 2)
    return tuple(str(i + 1) for i in range(n))


def voigt_strain_matrix(eps_voigt, dim: int):
    """Symmetric strain tensor ``(d, d)`` from Voigt components with engineering shear.

    ``ε_ab = ε_ba = γ_I / 2`` for a shear component ``I``; diagonal components as is.
    """
    eps = jnp.zeros((dim, dim), jnp.float64)
    for I, (a, b) in enumerate(voigt_pairs(dim)):
        if a == b:
            eps = eps.at[a, a].add(eps_voigt[I])
        else:
            eps = eps.at[a, b].add(0.5 * eps_voigt[I]).at[b, a].add(0.5 * eps_voigt[I])
    return eps


def deformation_gradient(eps_voigt, dim: int):
    """``D = I + ε`` for Voigt strain components: ``R D`` and ``cell D`` are the strained
    positions and cell (strain at fixed fractional coordinates)."""
    return jnp.eye(dim, dtype=jnp.float64) + voigt_strain_matrix(eps_voigt, dim)


def strain_to_voigt(eps) -> np.ndarray:
    """Voigt vector (engineering shear) of a symmetric ``(d, d)`` strain tensor (host)."""
    eps = np.asarray(eps)
    return np.array([eps[a, b] if a == b else eps[a, b] + eps[b, a] for a, b in voigt_pairs(eps.shape[0])])


def full_to_voigt(sigma):
    """A symmetric ``(d, d)`` stress tensor as its Voigt vector (no factor on shears)."""
    return jnp.stack([sigma[a, b] for a, b in voigt_pairs(sigma.shape[0])])


def strain_energy_fn(E, positions, params, cell, neighbor=None):
    """``e(ε) = E(R (I+ε_s), p, cell (I+ε_s))``, ``ε_s = (ε + εᵀ)/2``: ``(d, d) -> eV``.

    ``de/dε`` at 0 is ``V σ`` (ASE sign), its second derivative ``V`` times the
    clamped-ion elastic tensor.
    """
    dim = positions.shape[1]
    eye = jnp.eye(dim, dtype=jnp.float64)

    def e(eps):
        D = eye + 0.5 * (eps + eps.T)
        return E(positions @ D, params, cell @ D, neighbor)

    return e


def stress_from_energy(E, positions, params, cell, neighbor=None):
    """Voigt stress (ASE sign, eV/Å³; 2D: (xx, yy, xy) in eV/Å²) of an energy function."""
    e = strain_energy_fn(E, positions, params, cell, neighbor)
    dim = positions.shape[1]
    sigma = jax.grad(e)(jnp.zeros((dim, dim), jnp.float64)) / jnp.abs(jnp.linalg.det(cell))
    return full_to_voigt(sigma)


def energy_forces_stress(E, positions, params, cell=None, neighbor=None):
    """``(energy, forces, stress)`` of an energy function from one gradient pass.

    ``d/dR`` and ``d/dε`` of the affinely strained energy at ``ε = 0`` are ``∇E`` and
    ``V σ``. Stress in ASE's sign and Voigt order; ``None`` for a free system.
    Differentiable, jit-able.
    """
    if cell is None:
        energy, grad = jax.value_and_grad(E)(positions, params, cell, neighbor)
        return energy, -grad, None
    dim = positions.shape[1]
    e = lambda R, eps: strain_energy_fn(E, R, params, cell, neighbor)(eps)  # noqa: E731
    zero = jnp.zeros((dim, dim), jnp.float64)
    energy, (grad, dstrain) = jax.value_and_grad(e, argnums=(0, 1))(positions, zero)
    return energy, -grad, full_to_voigt(dstrain / jnp.abs(jnp.linalg.det(cell)))
