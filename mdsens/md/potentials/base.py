"""The `Potential` contract every mdsens force field satisfies.

A potential is a *description* (hyper-parameters, species it knows, default parameters);
the numbers that can be differentiated live in ``pot.params``, a dict pytree of float64
arrays, and are passed at call time. Nothing is cached on the object: the functions it
returns are pure and jit-able, in the jax-md style.

The central method is :meth:`Potential.energy_fn`, which returns

    E(positions, params, cell, neighbor=None) -> scalar energy (eV)

* ``positions``: ``(N, d)`` **Cartesian** (Å).
* ``params``: a pytree shaped like ``pot.params``.
* ``cell``: ``(d, d)`` lattice rows (Å) for periodic systems, ``None`` for free ones.
  Internally the energy is evaluated on fractional coordinates
  ``positions @ inv(cell)`` with jax-md ``periodic_general(cell.T,
  fractional_coordinates=True)``, so ``E(positions @ (I + eps), params, cell @ (I + eps))``
  is the energy of the affinely strained structure and derivatives w.r.t. ``cell`` are
  box derivatives; stress and elastic constants come from there.
* ``neighbor``: a jax-md ``NeighborList`` from :meth:`Potential.neighbor_list_fn`, or
  ``None`` for the dense all-pairs path.

Everything is differentiable w.r.t. ``positions``, ``params`` and ``cell``.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp

from mdsens.md.system import System


class Potential:
    """Base class. Subclasses set ``params``, ``symbols`` and implement the two hooks."""

    #: dict of float64 arrays: what `jax.grad` can differentiate.
    params: dict
    #: species names the potential has parameters for, or ``None`` for "any one species".
    symbols: Optional[tuple] = None

    def energy_fn(self, system: System, *, neighbor_list: bool | None = None) -> Callable:
        """Pure energy function ``E(positions, params, cell, neighbor=None)`` for ``system``.

        ``neighbor_list=None`` chooses automatically (neighbor lists above a documented
        number of atoms); the returned function then expects a ``neighbor`` argument
        built by :meth:`neighbor_list_fn`.
        """
        raise NotImplementedError

    def cutoff(self, params=None) -> float:
        """Interaction range (Å) for ``params`` (default ``self.params``), on the host."""
        raise NotImplementedError

    # Convenience, host-level wrappers (not for use inside jit): -----------------------
    def energy(self, system: System, params=None):
        """Potential energy of ``system`` (eV)."""
        raise NotImplementedError

    def forces(self, system: System, params=None):
        """Forces ``-dE/dR``, ``(N, d)`` (eV/Å)."""
        raise NotImplementedError

    def stress(self, system: System, params=None):
        """Stress in ASE's convention and Voigt order (xx, yy, zz, yz, xz, xy), eV/Å³.

        ``(1/V) dE/d(strain)`` at fixed fractional coordinates; 2D systems give
        (xx, yy, xy) in eV/Å².
        """
        raise NotImplementedError


def as_float64_tree(params: dict) -> dict:
    """Every leaf as a strongly typed float64 array (jax-md silently downcasts weak types)."""
    return {k: jnp.asarray(v, dtype=jnp.float64) for k, v in params.items()}
