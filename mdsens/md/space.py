"""Displacements for mdsens energies, built from jax-md primitives.

Why not ``jax_md.space.periodic_general(box, fractional_coordinates=True)`` directly:
its ``transform`` carries a custom JVP that passes the tangent of the *fractional*
coordinates through unchanged ("gradients flow through unchanged", so that
``grad(E)(R_frac)`` returns Cartesian forces). mdsens differentiates
``E(positions_cartesian, params, cell)`` with ``frac = positions @ inv(cell)``; chaining
that custom JVP with ``inv(cell)`` gives forces off by a factor ``inv(cell)`` (verified:
~21x too small for a 21 Å cubic cell). Here the same minimum-image map
(``jax_md.space.periodic_displacement`` on fractional differences) is followed by a
plain ``jax_md.space.raw_transform`` with the float64 box, so derivatives w.r.t.
positions, cell and parameters are all the true ones.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from mdsens.md._jax_md import space as jspace


def periodic_general_displacement(frac_a, frac_b, box):
    """Minimum-image Cartesian displacement ``R_a - R_b`` from fractional coordinates.

    Args:
      frac_a, frac_b: ``(d,)`` fractional coordinates (any real values; wrapped).
      box: ``(d, d)`` jax-md box, columns are lattice vectors (``cell.T``), Å.

    Returns:
      ``(d,)`` displacement (Å): ``box @ wrap(frac_a - frac_b)`` with each fractional
      component wrapped into [-1/2, 1/2). This is the minimum image whenever the
      interaction range is below half of every perpendicular cell width.
    """
    ds = jspace.periodic_displacement(jnp.float64(1.0), frac_a - frac_b)
    return jspace.raw_transform(box, ds)


def free_displacement(ra, rb, box=None):
    """``R_a - R_b`` in free space (``box`` ignored), Å."""
    return jspace.pairwise_displacement(ra, rb)


def fractional(positions, cell):
    """Fractional coordinates ``positions @ inv(cell)`` (``cell`` rows are lattice vectors)."""
    return jnp.linalg.solve(cell.T, positions.T).T


def wrap_positions(positions, cell):
    """``positions`` wrapped into the cell: fractional coordinates in ``[0, 1)``."""
    frac = fractional(positions, cell)
    return (frac - jnp.floor(frac)) @ cell


def perpendicular_widths(cell) -> np.ndarray:
    """Distances between opposite faces of the cell, ``(d,)`` (Å), on the host.

    ``h_a = 1 / |b_a|`` with ``b_a`` the reciprocal vectors (columns of ``inv(cell)``).
    Minimum image is exact for an interaction range ``r < min(h) / 2``: any vector
    shorter than ``h_a / 2`` has fractional component ``|s_a| < 1/2``, so it is the
    wrapped one, and no second image of the same atom lies within range.
    """
    inv = np.linalg.inv(np.asarray(cell, dtype=np.float64))
    return 1.0 / np.linalg.norm(inv, axis=0)
