"""Neighbor lists: when they are used, how they are built, checked and refreshed.

The policy (stated in full in ``docs/design.md``, "Neighbor lists"):

* Lists are used from ``pot.neighbor_list_min_atoms`` atoms (500 for pair potentials,
  128 for Tersoff and EAM, 32 for Stillinger–Weber, whose dense three-body paths are
  O(N³)), and from :data:`SPARSE_LIST_MIN_ATOMS` atoms in a periodic cell of which one
  list sphere covers at most :data:`SPARSE_LIST_MAX_SHARE` (the list then keeps that share
  of the pairs); :class:`~mdsens.md.options.NeighborListOptions` overrides it.
* Lists are jax-md ``Dense`` (full) lists on fractional coordinates, covering
  ``cutoff + margin + skin``; :meth:`NeighborListFn.update` (pure, jit-able) rebuilds
  when an atom moved more than ``skin/2`` or the box deformed beyond ``margin``.
* **Overflow is never silent.** Every consumer checks the flag: an overflowed list is
  reallocated with :func:`overflow_capacity` more slots (:func:`refresh`, the relaxation
  driver); :func:`indices_only` and the energy functions refuse one on the host and
  turn the energy into NaN inside ``jit``; a list that no longer matches the positions
  (stale) is refused by :func:`check_valid`.
* jax-md builds lists with the box cast to float32 and its gradient stopped: the list
  only decides *which* pairs interact; energies use the float64 cell given to ``E``.
* jax-md's cell list assumes an upper-triangular box: mdsens hands it the metric box
  (:func:`metric_box`). A cell list that would be huge for the number of atoms (a big,
  mostly empty box) is replaced by the O(N²) build when N is small, and refused with a
  clear message before anything is allocated otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from mdsens.md._jax_md import partition, space

from mdsens.md.errors import NeighborListError
from mdsens.md.space import perpendicular_widths
from mdsens.md.system import System

#: Default switch to neighbor lists (pair potentials; others set their own).
NEIGHBOR_LIST_MIN_ATOMS = 500
#: Default skin, relative to the cutoff (skin = 0.1 * cutoff).
DEFAULT_SKIN_FRACTION = 0.1
#: Below ``neighbor_list_min_atoms``, lists are still used in a periodic cell of which one
#: list sphere (radius ``cutoff + skin``) covers at most this share: measured on the CPU,
#: lists relax LJ fcc Ar 1.7x faster at a share of 0.25 (N = 255) and 3.2x at 0.13
#: (N = 499), a 2D soft-sphere packing 3.6x faster at 0.05 (N = 128); dense is 1.4x
#: faster at 0.6 (N = 107). docs/design.md §6.
SPARSE_LIST_MAX_SHARE = 0.3
#: ... and from this many atoms: below it, all pairs cost less than any list upkeep.
SPARSE_LIST_MIN_ATOMS = 64
#: When parameters need a longer cutoff than a relaxation's list functions cover, new ones
#: are built this much longer (relative): a cutoff that grew (parameter draws, a fit) is
#: likely to grow again, and each new list function compiles the relaxation's programs
#: again. Short lists keep the parameters' own cutoff, so energies do not pay for it.
CUTOFF_GROWTH_HEADROOM = 0.1
#: Default strain margin, relative to the skin (margin = 0.5 * skin).
DEFAULT_MARGIN_FRACTION = 0.5
#: Largest memory (bytes) a cell list may take before the O(N²) build or an error.
CELL_LIST_MAX_BYTES = 2**30
#: Largest N for the O(N²) candidate build when a cell list would be too sparse.
DENSE_BUILD_MAX_ATOMS = 5000
#: Up to this many atoms a list is allocated on the host (numpy, all pairs): cheaper
#: than the one-off compilations of jax-md's eager allocation, which pays off above it.
HOST_ALLOCATION_MAX_ATOMS = 512
#: Skin of the short list (LAMMPS's ``neighshort``), relative to the cutoff. Small,
#: because diamond Si's second shell (3.84 Å) lies just beyond the SW cutoff (3.77 Å):
#: on a start rattled by 0.02 Å, a skin of 1 % of the cutoff puts up to 9 pairs in a
#: row, this one up to 7 (4 interact). Rebuilds are cheap (one pass over the list).
SHORT_SKIN_FRACTION = 0.0025
#: Spare slots of a short list beyond the largest count at its allocation.
SHORT_SLACK = 1
#: A short list is kept if it needs at most this fraction of the list's slots ...
SHORT_MAX_FILL = 0.5
#: ... or at most this fraction while saving at least SHORT_MIN_SAVED slots per atom: a
#: wide list of a pair potential (LJ fcc Ar, r_c 7.5 Å: ~80 of ~140 slots interact) gains
#: 1.9x per relaxation, a narrow one (a 2D packing's 16 slots) loses 10 % to the upkeep.
SHORT_WIDE_MAX_FILL = 0.75
SHORT_MIN_SAVED = 32


def short_list_pays(short_slots: int, list_slots: int) -> bool:
    """Whether a short list of ``short_slots`` per atom is worth keeping beside a list of
    ``list_slots`` (:data:`SHORT_MAX_FILL`, :data:`SHORT_WIDE_MAX_FILL`)."""
    if short_slots <= SHORT_MAX_FILL * list_slots:
        return True
    return short_slots <= SHORT_WIDE_MAX_FILL * list_slots and list_slots - short_slots >= SHORT_MIN_SAVED


def use_neighbor_list(n_atoms: int, min_atoms: int = NEIGHBOR_LIST_MIN_ATOMS,
                      share: Optional[float] = None) -> bool:
    """The automatic choice: ``n_atoms >= min_atoms``, or a sparse periodic cell (``share``,
    from :func:`list_share`, at most :data:`SPARSE_LIST_MAX_SHARE`) of at least
    :data:`SPARSE_LIST_MIN_ATOMS` atoms."""
    n = int(n_atoms)
    if n >= int(min_atoms):
        return True
    return share is not None and n >= SPARSE_LIST_MIN_ATOMS and share <= SPARSE_LIST_MAX_SHARE


def list_share(system: System, cutoff: float) -> Optional[float]:
    """The share of a periodic cell inside one default list sphere (radius
    ``cutoff · (1 + DEFAULT_SKIN_FRACTION)``): the fraction of all pairs a list keeps.

    ``None`` for a free system or a cell that is not concrete (traced): the choice then
    falls back to the atom count alone.
    """
    if not system.pbc or system.cell is None or isinstance(system.cell, jax.core.Tracer):
        return None
    volume = abs(float(np.linalg.det(np.asarray(system.cell, dtype=np.float64))))
    radius = float(cutoff) * (1.0 + DEFAULT_SKIN_FRACTION)
    ball = 4.0 / 3.0 * np.pi * radius**3 if system.dim == 3 else np.pi * radius**2
    return ball / volume if volume > 0 else None


def metric_box(cell):
    """Upper-triangular ``R`` (positive diagonal) with ``Rᵀ R = cellᵀ cell``.

    ``R s`` has the same length as ``cell.T s`` for every fractional ``s``, so lists built
    with ``R`` select exactly the same pairs; jax-md's cell-list sizing is only right for
    upper-triangular boxes.
    """
    xp = jnp if isinstance(cell, jax.core.Tracer) else np  # host work compiles nothing
    _, r = xp.linalg.qr(xp.asarray(cell, dtype=np.float64).T)
    signs = xp.where(xp.diagonal(r) < 0, -1.0, 1.0)
    return signs[:, None] * r


@contextlib.contextmanager
def _jax_md_index_casts():
    """Silence one known, harmless FutureWarning of jax-md 0.2.29 under float64: its cell
    list builds candidate indices as int64 (``jnp.arange`` with x64) and scatters them
    into an int32 list (values < N, an exact cast). Raised while tracing, so this covers
    the compiled relaxation loop too. JAX announces it will become an error; see
    docs/design.md §10."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="scatter inputs have incompatible types", category=FutureWarning)
        yield


class ShortList(NamedTuple):
    """The pairs within ``radius`` at the last short build (a pytree).

    Attributes:
      idx: ``(N, K)`` neighbor indices, padding ``N``: the list's pairs that interact.
      reference: ``(N, d)`` positions at the build (fractional if periodic).
      box: metric box at the build ``(d, d)``; ``None`` if free.
      radius: the interaction cutoff it was built for plus ``short_skin`` (Å, 0-d): data,
        not the list's static cutoff, so that a list built wider than the parameters
        need (a cutoff that grew) keeps its short list as short as they allow.
    """

    idx: jax.Array
    reference: jax.Array
    box: Optional[jax.Array]
    radius: jax.Array


@jax.tree_util.register_pytree_node_class
class Neighbors:
    """A neighbor list in the state mdsens tracks (a pytree; pass it as ``neighbor=``).

    Attributes:
      nbrs: the jax-md ``NeighborList`` (``Dense``; ``idx (N, max_neighbors)``, padding N).
      reference_box: metric box at the last (re)build, ``(d, d)``; ``None`` if free.
      cutoff: interaction range (Å) the list covers (static).
      skin: motion allowance (Å) of the list (static).
      short: a :class:`ShortList` that energies use instead of ``nbrs.idx``, or ``None``.
        Only the relaxation loop carries one (:meth:`NeighborListFn.update` keeps it
        exact at the positions it is updated to); lists handed to users never do.
      short_skin: motion allowance (Å) of ``short`` (static).
    """

    def __init__(self, nbrs, reference_box, cutoff: float, skin: float = 0.0, short=None,
                 short_skin: float = 0.0):
        self.nbrs = nbrs
        self.reference_box = reference_box
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.short = short
        self.short_skin = float(short_skin)

    def tree_flatten(self):
        return (self.nbrs, self.reference_box, self.short), (self.cutoff, self.skin, self.short_skin)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], children[1], aux[0], aux[1], children[2], aux[2])

    def without_short(self) -> "Neighbors":
        """The same list without its short list (what may leave the relaxation loop)."""
        return Neighbors(self.nbrs, self.reference_box, self.cutoff, self.skin)

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
        return _needs_reallocation(self.nbrs)

    def __repr__(self):
        return f"Neighbors(N={self.idx.shape[0]}, capacity={self.idx.shape[1]}, cutoff={self.cutoff:g})"


# Not MALFORMED_BOX: jax-md 0.2.29 sets that bit for every *valid* (upper-triangular)
# box (its predicate is inverted); mdsens always hands it the metric box.
_REALLOCATE = partition.PEC.NEIGHBOR_LIST_OVERFLOW | partition.PEC.CELL_LIST_OVERFLOW | partition.PEC.CELL_SIZE_TOO_SMALL


def _needs_reallocation(nbrs) -> bool:
    return bool(int(np.asarray(nbrs.error.code)) & _REALLOCATE)


def needs_reallocation(neighbor):
    """Traced form of :meth:`Neighbors.needs_reallocation`: a bool array (False for ``None``).

    For pure loops that must keep a failed trial's flag for the host to see.
    """
    if neighbor is None:
        return jnp.zeros((), bool)
    return (neighbor.nbrs.error.code & _REALLOCATE) != 0


class NeighborIndices(NamedTuple):
    """Just the ``idx (N, M)`` of a neighbor list: all a potential's energy reads from it.

    ``mirror``: for a list known to hold each pair once in both rows, the flat index
    ``j M + m'`` of the slot of row ``j`` that holds ``i``, for each slot ``(i, m)``
    holding ``j`` (:func:`mirror_slots`), ``(N M,)``; ``None`` otherwise. Block Hessian
    products read a pair's other half there instead of scattering it.
    """

    idx: jax.Array
    mirror: Optional[jax.Array] = None


def mirror_slots(idx) -> Optional[np.ndarray]:
    """Host: the ``mirror`` of :class:`NeighborIndices` for ``idx (N, M)`` (padding
    ``N``), or ``None`` when some pair is in one row only or a neighbor repeats in a row.
    Padded slots point at themselves."""
    idx = np.asarray(idx)
    n, m = idx.shape
    within = np.argsort(idx, axis=1, kind="stable")  # each row's neighbors ascending, padding last
    ordered = np.take_along_axis(idx, within, axis=1)
    real = ordered < n
    if np.any((ordered[:, 1:] == ordered[:, :-1]) & real[:, 1:]):
        return None
    # The real slots in (row, neighbor) order, and a stable sort of them by neighbor:
    # the (neighbor, row) order. Row-local sorts and one small-integer sort (radix in
    # numpy), not a global sort and a search: 0.5 against 1.7 ms at N = 499 LJ.
    slots = (np.arange(n)[:, None] * m + within)[real]
    rows = np.repeat(np.arange(n), real.sum(axis=1))
    cols = ordered[real]
    by_col = np.argsort(cols.astype(np.int16 if n < 2**15 else np.int32), kind="stable")
    # a symmetric pattern lists the same pairs both ways: transposed, the (neighbor,
    # row) sequence is the (row, neighbor) one, and each slot's mirror sits at its place
    if not (np.array_equal(cols[by_col], rows) and np.array_equal(rows[by_col], cols)):
        return None
    mirror = np.arange(n * m)
    mirror[slots] = slots[by_col]
    return mirror.astype(np.int32)


def _overflow_flag(neighbor):
    """The overflow flag of a list, or ``None`` if it carries none (bare indices)."""
    nbrs = getattr(neighbor, "nbrs", neighbor)
    if not hasattr(nbrs, "error"):
        return None
    code = nbrs.error.code
    if isinstance(code, jax.core.Tracer):
        return nbrs.did_buffer_overflow
    return bool(int(np.asarray(code)) & (partition.PEC.NEIGHBOR_LIST_OVERFLOW | partition.PEC.CELL_LIST_OVERFLOW))


def refuse_overflowed(neighbor, where: str = "this computation") -> None:
    """Raise :class:`NeighborListError` if a concrete list overflowed (host check)."""
    flag = _overflow_flag(neighbor)
    if flag is None or isinstance(flag, jax.core.Tracer):
        return
    nbrs = getattr(neighbor, "nbrs", neighbor)
    if bool(flag) or _needs_reallocation(nbrs):
        raise NeighborListError(
            f"the neighbor list passed to {where} overflowed (it ran out of capacity and was "
            "truncated), so pairs are missing and energies and forces would be wrong. Build a "
            "fresh one with pot.neighbor_list(system), or reallocate it with "
            "mdsens.md.neighbors.refresh(...)."
        )


def overflow_flag(neighbor):
    """The overflow flag as a traced-friendly bool array (False for bare indices)."""
    flag = _overflow_flag(neighbor)
    return jnp.asarray(False) if flag is None else jnp.asarray(flag)


def nan_if_overflowed(neighbor, *values):
    """``values`` as they are, or NaN where ``neighbor`` (``None``: no list) overflowed.
    Inside jit the flag is traced: a truncated list gives NaN, never a number."""
    if neighbor is None:
        return values
    broken = overflow_flag(neighbor)
    return tuple(jnp.where(broken, jnp.nan, v) for v in values)


#: Host callers that pass fresh lists to one compiled program pad the capacity to a
#: multiple of this (:func:`indices_only`): a handful of shapes instead of one per count.
INDEX_CAPACITY_STEP = 8


def indices_only(neighbor, step: int = 1, floor: int = 0):
    """The part of a neighbor list to pass into jitted code: ``NeighborIndices`` or None.

    jax-md's ``NeighborList`` keeps ``cell_size`` (an array) and a fresh update closure as
    static pytree metadata, so passing a newly allocated list into a jitted function
    retraces and recompiles it every time. Energies only need the indices, whose shape is
    the capacity: padded here (with ``N``, which every energy skips) to at least ``floor``
    slots and a multiple of ``step``. A concrete list that overflowed is refused.
    """
    if neighbor is None:
        return None
    refuse_overflowed(neighbor)
    idx = neighbor_idx(neighbor)
    width = idx.shape[1]
    capacity = max(int(floor), step * -(-width // step))
    return NeighborIndices(_padded(idx, capacity) if capacity > width else idx)


def _padded(idx, capacity: int):
    """``idx (N, K)`` widened to ``(N, capacity)`` with ``N`` (numpy: no eager op to compile)."""
    n, width = idx.shape
    out = np.full((n, capacity), n, np.asarray(idx).dtype)
    out[:, :width] = np.asarray(idx)
    return jnp.asarray(out)


def neighbor_idx(neighbor):
    """``idx`` of a :class:`Neighbors`, :class:`NeighborIndices` or jax-md Dense ``NeighborList``."""
    if isinstance(neighbor, (Neighbors, NeighborIndices)):
        return neighbor.idx
    fmt = getattr(neighbor, "format", partition.Dense)
    if fmt is not partition.Dense or not hasattr(neighbor, "idx"):
        raise NeighborListError(
            "mdsens potentials use Dense (full) neighbor lists; build them with "
            "pot.neighbor_list(...) or mdsens.md.neighbors.neighbor_list_fn(...)."
        )
    return neighbor.idx


def pair_idx(neighbor):
    """The indices an energy reads: the short list's where there is one, else ``idx``."""
    short = getattr(neighbor, "short", None)
    return neighbor_idx(neighbor) if short is None else short.idx


def overflow_capacity(neighbor) -> int:
    """Extra slots for the reallocation of an overflowed list: its capacity doubles (at
    least 8 more), since every new shape costs a recompilation."""
    return max(8, int(neighbor_idx(neighbor).shape[1]))


def with_floor(neighbor: Neighbors, like: Neighbors) -> Neighbors:
    """``neighbor`` with every capacity at least that of ``like`` (same functions, same N).

    Each new capacity is a new shape, and each new shape compiles every program that takes
    the list again; a caller that builds many lists (a relaxation per parameter draw) keeps
    its programs by letting capacities grow, never shrink. The list slots are padded with
    ``N``, which every consumer skips; the cell-list capacity only sizes later rebuilds.
    """
    nbrs, floor = neighbor.nbrs, like.nbrs
    width = nbrs.idx.shape[1]
    changes = {}
    if floor.idx.shape[1] > width:
        changes.update(idx=_padded(nbrs.idx, floor.idx.shape[1]), max_occupancy=floor.idx.shape[1])
    if (nbrs.cell_list_capacity is not None and floor.cell_list_capacity is not None
            and floor.cell_list_capacity > nbrs.cell_list_capacity):
        changes["cell_list_capacity"] = floor.cell_list_capacity
    if not changes:
        return neighbor
    return Neighbors(dataclasses.replace(nbrs, **changes), neighbor.reference_box, neighbor.cutoff, neighbor.skin,
                     neighbor.short, neighbor.short_skin)


def stable_metadata(neighbor, cell_list_fns: dict):
    """The same list with jax-md's static metadata made cache-friendly.

    Jitted functions taking a jax-md ``NeighborList`` key their compilation cache on its
    static fields. Two of them defeat the cache: ``cell_size``, a 0-d array, and
    ``cell_list_fn``, a fresh closure from every allocation. Here ``cell_size`` becomes a
    float and ``cell_list_fn`` is shared between allocations with the same box and cell
    size (it depends on nothing else), through the caller-owned ``cell_list_fns`` dict.
    """
    nbrs = getattr(neighbor, "nbrs", None)
    if nbrs is None or getattr(nbrs, "cell_list_fn", None) is None:
        return neighbor
    changes = {}
    size = nbrs.cell_size
    if size is not None and not isinstance(size, float) and np.ndim(size) == 0:
        size = changes["cell_size"] = float(size)
    box = neighbor.reference_box
    key = (None if box is None else np.asarray(box).tobytes(), repr(size))
    changes["cell_list_fn"] = cell_list_fns.setdefault(key, nbrs.cell_list_fn)
    return Neighbors(dataclasses.replace(nbrs, **changes), neighbor.reference_box, neighbor.cutoff, neighbor.skin,
                     neighbor.short, neighbor.short_skin)


def check_valid(neighbor, system: System, cutoff: float, where: str = "this computation") -> None:
    """Raise :class:`NeighborListError` unless ``neighbor`` may be used for ``system``.

    It must not have overflowed, must cover ``cutoff``, must have one row per atom, and
    must still describe these positions: no atom moved more than ``skin/2`` since it was
    built and the box did not deform beyond its margin (else it is stale and misses pairs).
    """
    refuse_overflowed(neighbor, where)
    idx = neighbor_idx(neighbor)
    if idx.shape[0] != system.n_atoms:
        raise NeighborListError(
            f"the neighbor list passed to {where} has {idx.shape[0]} rows but the system has "
            f"{system.n_atoms} atoms; build it for this system with pot.neighbor_list(system)."
        )
    if not isinstance(neighbor, Neighbors):
        raise NeighborListError(
            f"{where} needs an mdsens neighbor list (pot.neighbor_list(system) or a "
            "RelaxResult's .neighbor), which records its range and skin; got "
            f"{type(neighbor).__name__}."
        )
    if neighbor.cutoff < cutoff:
        raise NeighborListError(
            f"the neighbor list passed to {where} covers a range of {neighbor.cutoff:.6g} but the "
            f"potential now reaches {cutoff:.6g} (a parameter grew the range): build a new list "
            "with pot.neighbor_list(system, params)."
        )
    moved = _largest_motion(neighbor, system)
    if moved > 0.5 * neighbor.skin + 1e-12:
        raise NeighborListError(
            f"the neighbor list passed to {where} is stale: an atom moved {moved:.3g} since it was "
            f"built, more than half its skin ({neighbor.skin:.3g}), so pairs may be missing. Pass "
            "the list of the relaxation that produced these positions (result.neighbor), or none "
            "(a fresh one is built)."
        )


def _largest_motion(neighbor, system) -> float:
    ref = np.asarray(neighbor.nbrs.reference_position, np.float64)
    R = np.asarray(system.positions, np.float64)
    if neighbor.reference_box is None:
        return float(np.sqrt(np.max(np.sum((R - ref) ** 2, axis=1), initial=0.0)))
    cell = np.asarray(system.cell, np.float64)
    ds = np.linalg.solve(cell.T, R.T).T - ref
    ds -= np.round(ds)
    metric = np.asarray(metric_box(cell))
    # a box deformation since the build counts as motion of the farthest atom
    strain = np.linalg.norm(metric @ np.linalg.inv(np.asarray(neighbor.reference_box)) - np.eye(cell.shape[0]), 2)
    moved = float(np.sqrt(np.max(np.sum((ds @ metric.T) ** 2, axis=1), initial=0.0)))
    return moved + strain * (neighbor.cutoff + 1.5 * neighbor.skin)


@dataclasses.dataclass(frozen=True)
class NeighborListFn:
    """Allocate/update functions for one system layout and one interaction range.

    Attributes:
      cutoff: interaction range covered (Å).
      skin: rebuild when an atom moved more than ``skin/2`` (Å).
      margin: extra list radius that absorbs box deformation (Å).
      periodic: whether the system is periodic.
      n_atoms: number of atoms.
      capacity_multiplier: spare slots at allocation (jax-md's).
      cell_list: whether a cell list is used for the build.
    """

    cutoff: float
    skin: float
    margin: float
    periodic: bool
    n_atoms: int
    capacity_multiplier: float
    cell_list: bool
    _fns: object = dataclasses.field(repr=False, compare=False)
    #: motion allowance (Å) of the short lists this function keeps (0: none).
    short_skin: float = 0.0

    @property
    def list_radius(self) -> float:
        """Pairs closer than this at the last build are in the list (Å)."""
        return self.cutoff + self.short_skin + self.margin + self.skin

    @property
    def short_radius(self) -> float:
        """The widest short list's radius (Å): pairs closer than this at its build are in
        it (``allocate(..., interaction_cutoff=c)`` builds one of radius ``c + short_skin``)."""
        return self.cutoff + self.short_skin

    @property
    def max_strain(self) -> float:
        """Largest relative distance change from box deformation before a forced rebuild."""
        return self.margin / self.list_radius

    def _host_frac(self, positions, cell):
        """``(fractional positions (wrapped into the unit cell), metric box)`` on the host: the
        allocations' form of :meth:`_frac`, whose eager jax operations each dispatch."""
        cell = np.asarray(cell, np.float64)
        x = np.mod(np.linalg.solve(cell.T, np.asarray(positions, np.float64).T).T, 1.0)
        return x, metric_box(cell)

    def _frac(self, positions, cell):
        positions = jnp.asarray(positions, jnp.float64)
        if not self.periodic:
            return positions, {}
        cell = jnp.asarray(cell, jnp.float64)
        frac = jnp.linalg.solve(cell.T, positions.T).T
        # jax-md's cell list indexes cells by position: fractional coords must be in [0, 1).
        frac = jnp.mod(frac, 1.0)
        return frac, {"box": metric_box(cell)}

    def allocate(self, positions, cell=None, extra_capacity: int = 0, short: bool = False,
                 like: Optional[Neighbors] = None, interaction_cutoff: Optional[float] = None) -> Neighbors:
        """Build a list from scratch (host; not jit-able: the capacity is data-dependent).

        ``short=True`` (with ``short_skin > 0``) adds a :class:`ShortList` when it pays
        (:func:`short_list_pays`); ``extra_capacity`` enlarges it too. ``like``, an earlier
        list of these functions, sets floors: every capacity at least its own, and a short
        list kept exactly when it kept one, so that the new list has its shapes unless it
        needs more (a program compiled for ``like`` is reused; :func:`with_floor`).
        ``interaction_cutoff`` (at most ``cutoff``) is the range the short list must hold.
        """
        if self.cell_list and self.n_atoms > HOST_ALLOCATION_MAX_ATOMS:
            x, box = self._host_frac(positions, cell)
            if _is_diagonal(box):
                nbrs = self._allocate_with_tree(x, box, extra_capacity)
                kw = {"box": jnp.asarray(box)}
            else:
                x, kw = self._frac(positions, cell)
                with _jax_md_index_casts():
                    nbrs = self._fns.allocate(x, extra_capacity=extra_capacity, **kw)
        else:
            nbrs, kw = self._allocate_all_pairs(positions, cell, extra_capacity)
        out = Neighbors(nbrs, kw.get("box"), self.cutoff, self.skin)
        if out.needs_reallocation():  # cannot happen for a fresh list; never ignore it
            raise NeighborListError(f"freshly allocated neighbor list reports an error: {nbrs.error}")
        if like is not None:
            out = with_floor(out, like)
        if short and self.short_skin > 0 and (like is None or like.short is not None):
            cutoff = self.cutoff if interaction_cutoff is None else float(interaction_cutoff)
            if not 0 < cutoff <= self.cutoff:
                raise NeighborListError(
                    f"interaction_cutoff must lie in (0, {self.cutoff:g}] (the list's cutoff); got {cutoff:g}.")
            out = self._with_short(out, positions, cell, extra_capacity, like, cutoff + self.short_skin)
        return out

    def _with_short(self, neighbor: Neighbors, positions, cell, extra_capacity: int,
                    like: Optional[Neighbors], radius: float) -> Neighbors:
        x, kw = self._frac(positions, cell)
        x, box = np.asarray(x), kw.get("box")
        candidates = np.asarray(neighbor.idx)
        near = _host_pairs_within(x, None if box is None else np.asarray(box), candidates, radius)
        K = _capacity(int(near.sum(axis=1).max(initial=0)) + SHORT_SLACK + extra_capacity)
        if like is not None:  # kept because `like` kept one; at least as wide
            K = max(K, like.short.idx.shape[1])
        elif not short_list_pays(K, candidates.shape[1]):
            return neighbor
        short = ShortList(jnp.asarray(_compacted(near, candidates, K)), jnp.asarray(x), box,
                          jnp.asarray(radius, jnp.float64))
        return Neighbors(neighbor.nbrs, neighbor.reference_box, self.cutoff, self.skin, short, self.short_skin)

    def _short_build(self, x, box, idx, capacity: int, radius):
        """``(idx (N, capacity), overflowed)``: the pairs of ``idx`` within ``radius`` at
        ``x``, in list order (jit-able; a cumulative count places them, no sort)."""
        n = idx.shape[0]
        d = x[:, None, :] - jnp.take(x, jnp.minimum(idx, n - 1), axis=0)
        if box is not None:
            d = (d - jnp.floor(d + 0.5)) @ jnp.asarray(box).T
        rows = jnp.arange(n)[:, None]
        within = (idx < n) & (idx != rows) & (jnp.sum(d * d, axis=-1) < radius ** 2)
        slot = jnp.cumsum(within, axis=1) - 1
        target = jnp.where(within & (slot < capacity), slot, capacity)  # column `capacity`: discarded
        short = jnp.full((n, capacity + 1), n, idx.dtype).at[rows, target].set(idx)[:, :capacity]
        return short, jnp.any(slot[:, -1] >= capacity)

    def _short_update(self, x, box, idx, short: ShortList):
        """The short list valid at ``x`` (rebuilt if an atom moved or the box deformed too
        much since its build) and whether it overflowed."""
        ds = x - short.reference
        strain = 0.0
        if box is not None:
            ds = (ds - jnp.floor(ds + 0.5)) @ box.T
            strain = jnp.linalg.norm(box @ jnp.linalg.inv(short.box) - jnp.eye(box.shape[0], dtype=box.dtype), ord=2)
        moved = jnp.sqrt(jnp.max(jnp.sum(ds * ds, axis=1)))
        # A pair beyond the short radius at the build is now at least
        # radius (1 - strain) - 2 moved: outside the cutoff while this stays below the skin.
        stale = 2.0 * moved + strain * short.radius > self.short_skin
        capacity = short.idx.shape[1]

        def rebuild(_):
            new_idx, overflowed = self._short_build(x, box, idx, capacity, short.radius)
            return ShortList(new_idx.astype(short.idx.dtype), x, box, short.radius), overflowed

        return lax.cond(stale, rebuild, lambda _: (short, jnp.zeros((), bool)), None)

    def _allocate_with_tree(self, x, box, extra_capacity):
        """jax-md's cell-list allocation for a rectangular cell, with the pairs found by
        scipy's periodic k-d tree: the same list (pairs closer than ``list_radius``, the
        same capacity rule, jax-md's cell list for later rebuilds), 8x faster on the CPU
        (N = 4095 Si: 11 against 90 ms, most of it jax-md's candidate pruning)."""
        n = x.shape[0]
        lengths = np.diag(box).astype(np.float64)
        rows, cols = _tree_pairs(x, lengths, self.list_radius)
        # jax-md's cell list, as its own allocation builds it (fractional cells of size
        # 1 / floor(min width / radius)), so that rebuilds inside the loop use one.
        per_side = max(np.floor(np.min(lengths) / self.list_radius), 1.0)
        cell_size = 1.0 / per_side
        cell_fn, cell_capacity = None, None
        if cell_size < 1.0 / 3.0:
            cell_fn = partition.cell_list(1.0, cell_size, self.capacity_multiplier)
            cell_capacity = _cell_capacity(x, cell_size, self.capacity_multiplier) + extra_capacity
        idx, capacity = self._slots(rows, cols, n, extra_capacity)
        if cell_capacity is not None:  # candidates (3^d cells) must hold every slot
            cell_capacity = max(cell_capacity, -(-capacity // 3 ** x.shape[1]))
        return partition.NeighborList(
            jnp.asarray(idx), jnp.asarray(x), partition.PartitionError(jnp.zeros((), jnp.uint8)),
            cell_capacity, capacity, partition.Dense, cell_size, cell_fn, self._fns.update)

    def _slots(self, rows, cols, n, extra_capacity):
        """``(idx (N, capacity), capacity)`` from row-sorted pairs, capacity as jax-md sizes it."""
        counts = np.bincount(rows, minlength=n)
        occupancy = int(counts.max(initial=0))
        capacity = min(int(occupancy * self.capacity_multiplier + extra_capacity), max(n - 1, 0))
        slot = np.arange(rows.size) - (np.cumsum(counts) - counts)[rows]
        keep = slot < capacity
        idx = np.full((n, capacity), n, dtype=np.int32)
        idx[rows[keep], slot[keep]] = cols[keep]
        return idx, capacity

    def _allocate_all_pairs(self, positions, cell, extra_capacity):
        """jax-md's allocation without a cell list, in numpy: the same list (pairs closer
        than ``list_radius`` in the metric jax-md uses, capacity sized as jax-md sizes it),
        without the ~35 one-off compilations of jax-md's eager allocation."""
        x = np.asarray(positions, np.float64)
        n = x.shape[0]
        kw = {}
        if self.periodic:
            cell = np.asarray(cell, np.float64)
            x = np.mod(np.linalg.solve(cell.T, x.T).T, 1.0)
            kw["box"] = box = metric_box(cell)
        if not self.periodic or (_is_diagonal(box) and self.list_radius < 0.5 * np.min(np.diag(box))):
            # the k-d tree finds the same pairs (one image each) in a fraction of the time
            rows, cols = _tree_pairs(x, np.diag(box) if self.periodic else None, self.list_radius)
        else:
            rows, cols = [], []
            for start in range(0, n, _ROWS_PER_CHUNK):
                d = x[start:start + _ROWS_PER_CHUNK, None, :] - x[None, :, :]
                if self.periodic:
                    d = (d - np.floor(d + 0.5)) @ box.T
                i, j = np.nonzero(np.einsum("ijd,ijd->ij", d, d) < self.list_radius ** 2)
                i += start
                rows.append(i[i != j])
                cols.append(j[i != j])
            rows, cols = np.concatenate(rows), np.concatenate(cols)  # row-major: sorted by row
        idx, capacity = self._slots(rows, cols, n, extra_capacity)
        nbrs = partition.NeighborList(
            jnp.asarray(idx), jnp.asarray(x), partition.PartitionError(jnp.zeros((), jnp.uint8)),
            None, capacity, partition.Dense, None, None, self._fns.update)
        return nbrs, {k: jnp.asarray(v) for k, v in kw.items()}

    def update(self, positions, neighbors: Neighbors, cell=None) -> Neighbors:
        """Pure, jit-able update; rebuilds on atom motion > skin/2 or box strain > max_strain.

        Keeps the capacity: a rebuild that needs more slots sets the overflow flag, which
        the host must check (:func:`refresh`).
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
        with _jax_md_index_casts():
            new = self._fns.update(x, nbrs, **kw)
        if self.periodic:
            rebuilt = jnp.any(new.reference_position != nbrs.reference_position)
            ref_box = jnp.where(rebuilt, kw["box"], ref_box)
        short = neighbors.short
        if short is not None:
            short, overflowed = self._short_update(x, kw.get("box"), new.idx, short)
            # the host reallocates on this flag, as for the list itself (refresh, driver)
            new = dataclasses.replace(new, error=new.error.update(partition.PEC.NEIGHBOR_LIST_OVERFLOW, overflowed))
        return Neighbors(new, ref_box, self.cutoff, self.skin, short, neighbors.short_skin)


def _tree_pairs(x, lengths, radius: float):
    """``(rows, cols)``: every ordered pair ``i ≠ j`` closer than ``radius``, sorted by row
    then column, from scipy's k-d tree: Cartesian ``x`` (``lengths`` ``None``), or
    fractional ``x`` in a rectangular periodic cell of side ``lengths`` (minimum image)."""
    from scipy.spatial import cKDTree

    if lengths is None:
        tree = cKDTree(x)
    else:
        lengths = np.asarray(lengths, np.float64)
        y = x * lengths
        y = np.where(y >= lengths, y - lengths, y)  # x < 1 may still round up to the length
        tree = cKDTree(y, boxsize=lengths)
    pairs = tree.query_pairs(radius, output_type="ndarray")
    rows = np.concatenate([pairs[:, 0], pairs[:, 1]]).astype(np.int64)
    cols = np.concatenate([pairs[:, 1], pairs[:, 0]]).astype(np.int64)
    order = np.argsort(rows * x.shape[0] + cols)  # one key per pair: 5x faster than lexsort
    return rows[order], cols[order]


def _cell_capacity(x, cell_size: float, multiplier: float) -> int:
    """jax-md's cell-list capacity estimate (``partition._estimate_cell_capacity``) for
    fractional ``x`` in the unit box, in numpy: the fullest cell times ``multiplier``.
    jax-md's eager version dispatches ~70 small programs (8 ms at N = 999)."""
    per_side = np.floor(1.0 / cell_size)
    size = 1.0 / per_side
    per_side = int(per_side)
    index = np.mod((x / size).astype(np.int32), per_side)
    cell = index @ (per_side ** np.arange(x.shape[1]))
    return int(np.bincount(cell, minlength=per_side ** x.shape[1]).max() * multiplier)


def _is_diagonal(box) -> bool:
    box = np.asarray(box)
    return bool(np.all(box == np.diag(np.diag(box))))


def _use_cell_list(system: System, radius: float) -> bool:
    """Whether the build should use a cell list; refuses a hopeless box before allocating."""
    widths = perpendicular_widths(system.cell)
    cells_per_dim = np.floor(widths / radius)
    if np.any(cells_per_dim < 3):
        return False  # jax-md would not use one either
    n_cells = float(np.prod(cells_per_dim))
    n = system.n_atoms
    too_big = n_cells * (4 + 8 * system.dim) > CELL_LIST_MAX_BYTES
    if not too_big and n_cells <= 64 * max(n, 1):
        return True
    if n <= DENSE_BUILD_MAX_ATOMS:
        return False  # a mostly empty box: the O(N²) build is cheaper than the cells
    raise NeighborListError(
        f"a cell list for this box would have {n_cells:.3g} cells ({n_cells * (4 + 8 * system.dim) / 2**30:.3g} "
        f"GiB or more) for {n} atoms: the box (perpendicular widths {np.array2string(widths, precision=4)}) "
        f"is mostly empty for a list radius of {radius:.4g}. Remove the vacuum (a smaller cell), "
        "make the system free (pbc=False) if it is a cluster, or use neighbor_list=False."
    )


def neighbor_list_fn(system: System, cutoff: float, *, skin: Optional[float] = None, margin: Optional[float] = None,
                     capacity_multiplier: float = 1.25, short_skin: float = 0.0) -> NeighborListFn:
    """Neighbor-list functions for ``system`` and an interaction range ``cutoff`` (Å).

    Args:
      system: fixes N, dimension and boundary conditions (the cell is a call-time arg).
      cutoff: interaction range to cover; use ``pot.cutoff(params)``.
      skin: motion allowance (Å, ``>= 0``); default ``0.1 * cutoff``.
      margin: box-deformation allowance (Å, ``>= 0``); default ``0.5 * skin``.
      capacity_multiplier: spare neighbor slots at allocation (jax-md's), ``>= 1``.
      short_skin: motion allowance (Å) of short lists (``allocate(..., short=True)``);
        the list's radius grows by it so that it always holds the short list's pairs.

    Raises:
      NeighborListError: a non-positive cutoff, a negative skin or margin, or a box so
        large and empty that its cell list cannot be built.
    """
    cutoff = float(cutoff)
    if not np.isfinite(cutoff) or cutoff <= 0:
        raise NeighborListError(f"neighbor-list cutoff must be positive and finite; got {cutoff}.")
    skin = DEFAULT_SKIN_FRACTION * cutoff if skin is None else float(skin)
    margin = DEFAULT_MARGIN_FRACTION * skin if margin is None else float(margin)
    if not (np.isfinite(skin) and skin >= 0 and np.isfinite(margin) and margin >= 0):
        raise NeighborListError(
            f"skin and margin must be >= 0 (a list must reach at least the cutoff); got skin={skin}, "
            f"margin={margin}."
        )
    short_skin = float(short_skin)
    if not (np.isfinite(short_skin) and short_skin >= 0):
        raise NeighborListError(f"short_skin must be >= 0; got {short_skin}.")
    if not capacity_multiplier >= 1:
        raise NeighborListError(f"capacity_multiplier must be >= 1; got {capacity_multiplier}.")
    periodic = bool(system.pbc)
    if periodic:
        box0 = np.asarray(metric_box(system.cell))
        cell_list = _use_cell_list(system, cutoff + short_skin + margin + skin)
        displacement, _ = space.periodic_general(box0, fractional_coordinates=True)
        fns = partition.neighbor_list(displacement, box0, cutoff + short_skin + margin, dr_threshold=skin,
                                      capacity_multiplier=capacity_multiplier, fractional_coordinates=True,
                                      disable_cell_list=not cell_list, format=partition.Dense)
    else:
        cell_list = False
        displacement, _ = space.free()
        fns = partition.neighbor_list(displacement, 1.0, cutoff + short_skin + margin, dr_threshold=skin,
                                      capacity_multiplier=capacity_multiplier, disable_cell_list=True,
                                      format=partition.Dense)
    return NeighborListFn(cutoff=cutoff, skin=skin, margin=margin, periodic=periodic, n_atoms=system.n_atoms,
                          capacity_multiplier=capacity_multiplier, cell_list=cell_list, _fns=fns,
                          short_skin=short_skin)


def refresh(nl: Optional[NeighborListFn], neighbors: Optional[Neighbors], system: System, cutoff: float,
            **kwargs):
    """Host check: return ``(nl, neighbors)`` valid for ``system`` and range ``cutoff``.

    * ``nl`` is ``None``, covers less than ``cutoff`` (a parameter grew the range), or
      was built for another layout: new functions and a fresh list.
    * The updated list overflowed (or its cells became too small): reallocated with
      :func:`overflow_capacity` more slots. Never truncated.
    * Otherwise the list is updated (rebuilt if atoms or the box moved too much).
    """
    if nl is None or nl.cutoff < cutoff or nl.n_atoms != system.n_atoms or nl.periodic != bool(system.pbc):
        nl = neighbor_list_fn(system, cutoff, **kwargs)
        return nl, nl.allocate(system.positions, system.cell)
    if neighbors is None or neighbors.cutoff < cutoff:
        return nl, nl.allocate(system.positions, system.cell)
    new = nl.update(system.positions, neighbors, system.cell)
    if new.needs_reallocation():
        new = nl.allocate(system.positions, system.cell, extra_capacity=overflow_capacity(neighbors))
    return nl, new


#: A list for derivatives at one structure keeps the pairs closer than this multiple of
#: the cutoff: the margin covers the small displacements of the finite-difference
#: diagnostics, and the extra pairs contribute exactly zero.
INTERACTING_MARGIN = 1.01
#: Capacity of such a list is rounded up to a multiple of this: structures of one layout
#: then share compiled programs although their largest coordination differs slightly.
INTERACTING_CAPACITY_STEP = 4
#: Rows of candidate pairs handled at once on the dense path (memory bound).
_ROWS_PER_CHUNK = 256


def interacting_neighbors(system: System, cutoff: float, neighbor=None) -> NeighborIndices:
    """The pairs that interact at ``system.positions``, as a tight list for derivatives.

    A relaxation's list covers ``cutoff + skin`` so that it survives many steps; a
    derivative at one structure needs only the pairs within the cutoff. For
    Stillinger–Weber silicon that is 4 of the ~20 slots, and every energy, gradient and
    Hessian product costs in proportion (a Hessian-vector product 5x cheaper at
    N = 999). Valid only near these positions (within the relative margin
    :data:`INTERACTING_MARGIN`), which is all a derivative at the structure needs.

    Args:
      system: the structure (positions, cell, pbc).
      cutoff: the potential's interaction range (Å) at its current parameters.
      neighbor: the list the candidates come from (any list covering ``cutoff``); ``None``
        takes all pairs (the potential's dense path).

    Returns:
      :class:`NeighborIndices` ``idx (N, K)``, padding ``N``, ``K`` a multiple of
      :data:`INTERACTING_CAPACITY_STEP`. Pairs appear in both directions, as in a full
      list, and ``mirror`` says where (:func:`mirror_slots`).
    """
    R = np.asarray(system.positions, np.float64)
    n = R.shape[0]
    periodic = bool(system.pbc)
    cell = np.asarray(system.cell, np.float64) if periodic else None
    coords = R @ np.linalg.inv(cell) if periodic else R
    if neighbor is not None:
        refuse_overflowed(neighbor, "a derivative")
        candidates = np.asarray(neighbor_idx(neighbor))
    else:
        candidates = np.broadcast_to(np.arange(n), (n, n))
    near = _host_pairs_within(coords, None if cell is None else cell.T, candidates, INTERACTING_MARGIN * float(cutoff))
    K = _capacity(max(int(near.sum(axis=1).max(initial=0)), 1))
    idx = _compacted(near, candidates, K)
    mirror = mirror_slots(idx)
    return NeighborIndices(jnp.asarray(idx), None if mirror is None else jnp.asarray(mirror))


def _capacity(count: int) -> int:
    """``count`` rounded up to a multiple of :data:`INTERACTING_CAPACITY_STEP`."""
    return INTERACTING_CAPACITY_STEP * -(-count // INTERACTING_CAPACITY_STEP)


def _compacted(near, candidates, K: int) -> np.ndarray:
    """``(N, K)`` int32: each row's ``candidates`` where ``near``, in order, padded with ``N``."""
    n = candidates.shape[0]
    order = np.argsort(~near, axis=1, kind="stable")[:, :K]  # K may exceed the candidates
    idx = np.full((n, K), n, dtype=np.int32)
    idx[:, :order.shape[1]] = np.where(np.take_along_axis(near, order, axis=1),
                                       np.take_along_axis(candidates, order, axis=1), n)
    return idx


def _host_pairs_within(coords, box, candidates, radius: float) -> np.ndarray:
    """``(N, M)`` bool: which candidate pairs are closer than ``radius`` (host, numpy).

    ``coords`` are fractional when ``box`` (``(d, d)``, columns the lattice vectors) is
    given, with the energy's minimum-image convention (:mod:`mdsens.md.space`), so that
    exactly the pairs it sees are kept; Cartesian otherwise.
    """
    n = coords.shape[0]
    near = np.zeros(candidates.shape, bool)
    for start in range(0, n, _ROWS_PER_CHUNK):  # memory bound on the dense path
        cand = candidates[start:start + _ROWS_PER_CHUNK]
        own = np.arange(start, start + cand.shape[0])[:, None]
        d = coords[own] - coords[np.minimum(cand, n - 1)]
        if box is not None:
            d = (d - np.floor(d + 0.5)) @ box.T
        near[start:start + cand.shape[0]] = (cand < n) & (cand != own) & (np.einsum("imd,imd->im", d, d) < radius**2)
    return near
