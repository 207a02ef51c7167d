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
from jax_md import space as jspace


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
