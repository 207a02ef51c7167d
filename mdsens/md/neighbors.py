"""Neighbor-list policy: when lists are used, how they are built, checked and refreshed.

Policy
------
* Systems with ``N >= NEIGHBOR_LIST_MIN_ATOMS`` (= 500) atoms use neighbor lists; smaller
  ones use the dense all-pairs path (O(N²) but branch-free and fastest at that size).
  A potential may lower the switch (``pot.neighbor_list_min_atoms``; Tersoff: 128 and
  Stillinger–Weber: 32, because their dense three-body sums are O(N³)). Differentiating
  ``ms.relax`` under jit/vmap needs the dense path (``neighbor_list=False``).
  Both give the same energies and forces to round-off (tested to 1e-12).
* Lists are jax-md ``Dense`` lists (full: every pair i→j and j→i, needed by three-body
  potentials), built on fractional coordinates with ``periodic_general`` for periodic
  systems (cell lists when the cell is at least 4 list-radii wide) and ``free`` space
  without cell lists for clusters (O(N²) rebuild; fine up to a few thousand atoms).
* A list covers an interaction range ``cutoff`` (= ``pot.cutoff(params)`` when it was
  made) and stores pairs within ``cutoff + margin + skin``. jax-md rebuilds it inside
  ``update`` when an atom moved more than ``skin/2`` since the last build; mdsens also
  forces a rebuild when the *box* deformed by more than ``max_strain = margin / (cutoff
  + margin + skin)`` (relative change of any distance), which jax-md alone does not
  notice (at fixed fractional coordinates it sees no motion).
* Overflow is never silent: ``update`` may overflow inside jit (the flag is set, the
  list truncated), so the host must call :func:`refresh` (or
  ``pot.refresh_neighbor_list``) after every jitted chunk; it reallocates with fresh
  capacity, and also when the parameters now need a longer range than the list covers.
* jax-md builds lists with the box cast to float32 and its gradient stopped: the list
  only decides *which* pairs interact; energies use the float64 cell given to ``E``.
* jax-md's cell list assumes an upper-triangular box. mdsens hands it the Cholesky
  form ``R`` of the metric (``Rᵀ R = cellᵀ cell``, via QR), which has the same
  distances for the same fractional coordinates, so any triclinic/rotated cell works.

API
---
``nl = neighbor_list_fn(system, cutoff)``; ``nbrs = nl.allocate(positions, cell)``;
``nbrs = nl.update(positions, nbrs, cell)`` (pure, jit-able);
``nl, nbrs = refresh(nl, nbrs, system, cutoff)`` (host). ``nbrs`` is a
:class:`Neighbors` pytree to pass as ``neighbor=`` to a potential's energy function.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import partition, space

from mdsens.md.system import System

#: Systems with at least this many atoms use neighbor lists (dense all-pairs below).
NEIGHBOR_LIST_MIN_ATOMS = 500
#: Default skin, relative to the cutoff (skin = 0.1 * cutoff).
DEFAULT_SKIN_FRACTION = 0.1
#: Default strain margin, relative to the skin (margin = 0.5 * skin).
DEFAULT_MARGIN_FRACTION = 0.5


class NeighborListError(RuntimeError):
    """A neighbor list cannot be used as given; the message says what to do."""


def use_neighbor_list(n_atoms: int, min_atoms: int = NEIGHBOR_LIST_MIN_ATOMS) -> bool:
    """The automatic choice: ``n_atoms >= min_atoms`` (default 500)."""
    return int(n_atoms) >= int(min_atoms)


def metric_box(cell):
    """Upper-triangular ``R`` (positive diagonal) with ``Rᵀ R = cellᵀ cell``.

    ``R s`` has the same length as ``cell.T s`` for every fractional ``s``, so neighbor
    lists built with ``R`` select exactly the same pairs; jax-md's cell-list sizing
    (``_fractional_cell_size``) is only right for upper-triangular boxes.
    """
    _, r = jnp.linalg.qr(jnp.asarray(cell).T)
    signs = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)
    return signs[:, None] * r


@jax.tree_util.register_pytree_node_class
class Neighbors:
    """A neighbor list in the state mdsens tracks (a pytree; pass it as ``neighbor=``).

    Attributes:
      nbrs: the jax-md ``NeighborList`` (``Dense``; ``idx (N, max_neighbors)``, padding N).
      reference_box: metric box at the last (re)build, ``(d, d)``; ``None`` if free.
      cutoff: interaction range (Å) the list covers (static).
    """

    def __init__(self, nbrs, reference_box, cutoff: float):
        self.nbrs = nbrs
        self.reference_box = reference_box
        self.cutoff = float(cutoff)

    def tree_flatten(self):
        return (self.nbrs, self.reference_box), (self.cutoff,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], children[1], aux[0])

    @property
    def idx(self):
        """``(N, max_neighbors)`` neighbor indices; ``N`` marks empty slots."""
        return self.nbrs.idx

    @property
    def did_buffer_overflow(self):
        """True if the list (or its cell list) ran out of capacity and was truncated."""
        return self.nbrs.did_buffer_overflow

    def needs_reallocation(self) -> bool:
        """Host check: overflow (list or cell list), or cells too small for a shrunk box."""
        code = int(self.nbrs.error.code)
        bad = (
            partition.PEC.NEIGHBOR_LIST_OVERFLOW
            | partition.PEC.CELL_LIST_OVERFLOW
            | partition.PEC.CELL_SIZE_TOO_SMALL
        )
        # Not MALFORMED_BOX: jax-md 0.2.29 sets that bit for every *valid* (upper-
        # triangular) box (its predicate is inverted); mdsens always hands it the
        # upper-triangular metric box, so the bit carries no information.
        return bool(code & bad)

    def __repr__(self):
        return (
            f"Neighbors(N={self.idx.shape[0]}, capacity={self.idx.shape[1]}, "
            f"cutoff={self.cutoff:g})"
        )


class NeighborIndices(NamedTuple):
    """Just the ``idx (N, M)`` of a neighbor list: all a potential's energy reads from it."""

    idx: jax.Array


def indices_only(neighbor):
    """The part of a neighbor list to pass into jitted code: ``NeighborIndices`` or None.

    jax-md's ``NeighborList`` keeps ``cell_size`` (an array) and a fresh update closure as
    static pytree metadata, so passing a newly allocated list into a jitted function
    retraces and recompiles it every time (and array metadata can make the cache-key
    comparison fail). Energies only need the indices, whose shape is the capacity.
    """
    return None if neighbor is None else NeighborIndices(neighbor_idx(neighbor))


def neighbor_idx(neighbor):
    """``idx`` of a :class:`Neighbors` or a jax-md Dense ``NeighborList``."""
    if isinstance(neighbor, Neighbors):
        return neighbor.idx
    fmt = getattr(neighbor, "format", partition.Dense)
    if fmt is not partition.Dense:
        raise NeighborListError(
            "mdsens potentials use Dense (full) neighbor lists; build them with "
            "pot.neighbor_list(...) or mdsens.md.neighbors.neighbor_list_fn(...)."
        )
    return neighbor.idx


@dataclasses.dataclass(frozen=True)
class NeighborListFn:
    """Allocate/update functions for one system layout and one interaction range.

    Attributes:
      cutoff: interaction range covered (Å).
      skin: rebuild when an atom moved more than ``skin/2`` (Å).
      margin: extra list radius that absorbs box deformation (Å).
      periodic: whether the system is periodic.
      n_atoms: number of atoms.
    """

    cutoff: float
    skin: float
    margin: float
    periodic: bool
    n_atoms: int
    capacity_multiplier: float
    _fns: object = dataclasses.field(repr=False, compare=False)

    @property
    def list_radius(self) -> float:
        """Pairs closer than this at the last build are in the list (Å)."""
        return self.cutoff + self.margin + self.skin

    @property
    def max_strain(self) -> float:
        """Largest relative distance change from box deformation before a forced rebuild."""
        return self.margin / self.list_radius

    def _frac(self, positions, cell):
        positions = jnp.asarray(positions, jnp.float64)
        if not self.periodic:
            return positions, {}
        cell = jnp.asarray(cell, jnp.float64)
        frac = jnp.linalg.solve(cell.T, positions.T).T
        # jax-md's cell list indexes cells by position: fractional coords must be in [0, 1).
        frac = jnp.mod(frac, 1.0)
        return frac, {"box": metric_box(cell)}

    def allocate(self, positions, cell=None, extra_capacity: int = 0) -> Neighbors:
        """Build a list from scratch (host; not jit-able: the capacity is data-dependent)."""
        x, kw = self._frac(positions, cell)
        nbrs = self._fns.allocate(x, extra_capacity=extra_capacity, **kw)
        out = Neighbors(nbrs, kw.get("box"), self.cutoff)
        if out.needs_reallocation():  # cannot happen for a fresh list; never ignore it
            raise NeighborListError(f"freshly allocated neighbor list reports an error: {nbrs.error}")
        return out

    def update(self, positions, neighbors: Neighbors, cell=None) -> Neighbors:
        """Pure, jit-able update; rebuilds on atom motion > skin/2 or box strain > max_strain.

        Keeps the capacity: a rebuild that needs more slots sets the overflow flag,
        which the host must check (:func:`refresh`).
        """
        x, kw = self._frac(positions, cell)
        nbrs = neighbors.nbrs
        ref_box = neighbors.reference_box
        if self.periodic:
            box = kw["box"]
            deformation = box @ jnp.linalg.inv(ref_box) - jnp.eye(box.shape[0], dtype=box.dtype)
            strained = jnp.linalg.norm(deformation, ord=2) > self.max_strain
            # Force jax-md's rebuild branch by moving the reference half a cell away
            # (|0.5 (1,..,1) @ cell| >= h_min / 2 > cutoff > skin / 2).
            ref = jnp.where(strained, nbrs.reference_position + 0.5, nbrs.reference_position)
            nbrs = dataclasses.replace(nbrs, reference_position=ref)
        new = self._fns.update(x, nbrs, **kw)
        if self.periodic:
            rebuilt = jnp.any(new.reference_position != nbrs.reference_position)
            ref_box = jnp.where(rebuilt, kw["box"], ref_box)
        return Neighbors(new, ref_box, self.cutoff)


def neighbor_list_fn(
    system: System,
    cutoff: float,
    *,
    skin: Optional[float] = None,
    margin: Optional[float] = None,
    capacity_multiplier: float = 1.25,
) -> NeighborListFn:
    """Neighbor-list functions for ``system`` and an interaction range ``cutoff`` (Å).

    Args:
      system: fixes N, dimension and boundary conditions (the cell is a call-time arg).
      cutoff: interaction range to cover; use ``pot.cutoff(params)``.
      skin: motion allowance (Å); default ``0.1 * cutoff``.
      margin: box-deformation allowance (Å); default ``0.5 * skin``.
      capacity_multiplier: spare neighbor slots at allocation (jax-md's).
    """
    cutoff = float(cutoff)
    if not np.isfinite(cutoff) or cutoff <= 0:
        raise NeighborListError(f"neighbor-list cutoff must be positive and finite; got {cutoff}.")
    skin = DEFAULT_SKIN_FRACTION * cutoff if skin is None else float(skin)
    margin = DEFAULT_MARGIN_FRACTION * skin if margin is None else float(margin)
    periodic = bool(system.pbc)
    if periodic:
        box0 = np.asarray(metric_box(system.cell))
        displacement, _ = space.periodic_general(box0, fractional_coordinates=True)
        fns = partition.neighbor_list(
            displacement,
            box0,
            cutoff + margin,
            dr_threshold=skin,
            capacity_multiplier=capacity_multiplier,
            fractional_coordinates=True,
            format=partition.Dense,
        )
    else:
        displacement, _ = space.free()
        fns = partition.neighbor_list(
            displacement,
            1.0,
            cutoff + margin,
            dr_threshold=skin,
            capacity_multiplier=capacity_multiplier,
            disable_cell_list=True,
            format=partition.Dense,
        )
    return NeighborListFn(
        cutoff=cutoff,
        skin=skin,
        margin=margin,
        periodic=periodic,
        n_atoms=system.n_atoms,
        capacity_multiplier=capacity_multiplier,
        _fns=fns,
    )


def refresh(
    nl: Optional[NeighborListFn],
    neighbors: Optional[Neighbors],
    system: System,
    cutoff: float,
    **kwargs,
):
    """Host check: return ``(nl, neighbors)`` valid for ``system`` and range ``cutoff``.

    * ``nl`` is ``None``, or covers less than ``cutoff`` (a parameter grew the range):
      new functions for ``cutoff`` and a fresh list.
    * The updated list overflowed (or its cells became too small): reallocated with
      fresh capacity. Never truncated.
    * Otherwise the list is updated (rebuilt if atoms or the box moved too much).
    """
    if (
        nl is None
        or neighbors is None
        or nl.cutoff < cutoff
        or neighbors.cutoff < cutoff
        or nl.n_atoms != system.n_atoms
        or nl.periodic != bool(system.pbc)
    ):
        if nl is None or nl.cutoff < cutoff or nl.n_atoms != system.n_atoms or nl.periodic != bool(system.pbc):
            nl = neighbor_list_fn(system, cutoff, **kwargs)
        return nl, nl.allocate(system.positions, system.cell)
    new = nl.update(system.positions, neighbors, system.cell)
    if new.needs_reallocation():
        new = nl.allocate(system.positions, system.cell)
    return nl, new
