"""`System`: an atomistic structure as a JAX pytree, and its conversion to and from ASE.

Conventions (see ``docs/design.md``):

* ``positions``: ``(N, d)`` Cartesian coordinates, Å (or reduced length units for
  reduced-unit models), float64.
* ``cell``: ``None`` for a free (non-periodic) system, else ``(d, d)`` with **rows** as
  lattice vectors, exactly like ``ase.Atoms.cell``. jax-md's ``periodic_general`` wants the
  transpose (``box = cell.T``) and fractional coordinates ``positions @ inv(cell)``.
* ``species``: ``(N,)`` int32 indices into ``symbols``.
* ``symbols``: tuple of species names (chemical symbols for ASE structures, or labels such
  as ``("A", "B")`` for reduced-unit mixtures; the default for species indices without
  names). Static: not a leaf.
* ``pbc``: ``True`` (periodic in every direction) or ``False`` (free). Mixed boundary
  conditions are refused with an error that says what to do.

Leaves (differentiable): ``positions`` and ``cell``. Everything else is static metadata,
so a ``System`` passes through ``jax.jit``, ``jax.vmap`` and ``jax.grad`` unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.md.errors import StructureError


def generic_symbols(n_species: int) -> tuple:
    """Labels for species given by index only: ``("A", "B", ...)`` (``"S26"``... beyond Z)."""
    return tuple(chr(ord("A") + k) if k < 26 else f"S{k}" for k in range(n_species))


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class System:
    """An atomistic structure: positions, cell, species and boundary conditions.

    Args:
      positions: ``(N, d)`` Cartesian positions (Å), ``d`` in {2, 3}.
      cell: ``None`` (free space) or ``(d, d)`` lattice vectors as rows (Å).
      species: ``(N,)`` integer species indices into ``symbols``; default all zeros.
      symbols: names of the species, e.g. ``("Ar",)`` or ``("A", "B")``; default
        ``("X",)`` for one species and ``("A", "B", ...)`` for several.
      pbc: ``True`` for fully periodic (requires a cell), ``False`` for free space.

    Raises:
      StructureError: no atoms, wrong shapes, a periodic system without a cell, a
        zero-volume cell, NaN/inf coordinates, or species indices outside ``symbols``.
    """

    positions: jnp.ndarray
    cell: Optional[jnp.ndarray] = None
    species: Optional[np.ndarray] = None
    symbols: tuple = ("X",)
    pbc: bool = False

    def __post_init__(self):
        positions = self.positions
        if not isinstance(positions, jax.core.Tracer):
            positions = jnp.asarray(positions, dtype=jnp.float64)
        if positions.ndim != 2 or positions.shape[1] not in (2, 3):
            raise StructureError(
                f"positions must have shape (N, 2) or (N, 3); got {positions.shape}."
            )
        n, dim = positions.shape
        if n == 0:
            raise StructureError("a system needs at least one atom; positions has shape (0, d).")
        object.__setattr__(self, "positions", positions)

        pbc = self.pbc
        if isinstance(pbc, (tuple, list, np.ndarray)):
            flags = [bool(p) for p in np.asarray(pbc).ravel()]
            if all(flags):
                pbc = True
            elif not any(flags):
                pbc = False
            else:
                raise StructureError(
                    f"mixed periodic boundary conditions pbc={tuple(flags)} are not supported. "
                    "Make the structure fully periodic (e.g. add vacuum along the open "
                    "direction and set pbc=True) or fully free (pbc=False)."
                )
        object.__setattr__(self, "pbc", bool(pbc))

        cell = self.cell
        if self.pbc and cell is None:
            raise StructureError("a periodic system (pbc=True) needs a cell; pass cell=(d, d) rows.")
        if cell is not None:
            if not isinstance(cell, jax.core.Tracer):
                cell = jnp.asarray(cell, dtype=jnp.float64)
            if cell.shape != (dim, dim):
                raise StructureError(
                    f"cell must have shape ({dim}, {dim}) to match {dim}-D positions; got {cell.shape}."
                )
            if not isinstance(cell, jax.core.Tracer):
                volume = abs(float(np.linalg.det(np.asarray(cell))))
                if not np.isfinite(volume) or volume < 1e-10:
                    raise StructureError(
                        f"the cell has zero (or non-finite) volume ({volume:g}); give "
                        f"{dim} linearly independent lattice vectors as rows."
                    )
        if not self.pbc and cell is not None:
            # A free system keeps no cell: otherwise derivatives w.r.t. a meaningless box appear.
            cell = None
        object.__setattr__(self, "cell", cell)

        if self.species is None:
            species = np.zeros((n,), dtype=np.int32)
        elif isinstance(self.species, jax.core.Tracer):
            species = self.species
        else:
            species = np.asarray(self.species)
            if species.shape != (n,):
                raise StructureError(f"species must have shape ({n},); got {species.shape}.")
            if not np.issubdtype(species.dtype, np.integer):
                raise StructureError("species must be integer indices into `symbols`.")
            species = species.astype(np.int32)
        object.__setattr__(self, "species", species)

        symbols = tuple(str(s) for s in self.symbols)
        if (symbols == ("X",) and not isinstance(species, jax.core.Tracer) and n
                and int(np.max(species)) >= 1):
            symbols = generic_symbols(int(np.max(species)) + 1)
        object.__setattr__(self, "symbols", symbols)
        if not isinstance(species, jax.core.Tracer) and n and (
            species.min() < 0 or species.max() >= len(symbols)
        ):
            raise StructureError(
                f"species indices range over [{species.min()}, {species.max()}] but only "
                f"{len(symbols)} symbols {symbols} were given."
            )

        if not isinstance(positions, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(positions))):
            raise StructureError("positions contain NaN or inf; check the input structure.")

    # -- pytree protocol: positions and cell are leaves; the rest is static ------------
    def tree_flatten(self):
        species_key = None if self.species is None else tuple(np.asarray(self.species).tolist())
        return (self.positions, self.cell), (species_key, self.symbols, self.pbc)

    @classmethod
    def tree_unflatten(cls, aux, children):
        positions, cell = children
        species_key, symbols, pbc = aux
        obj = object.__new__(cls)
        object.__setattr__(obj, "positions", positions)
        object.__setattr__(obj, "cell", cell)
        object.__setattr__(
            obj, "species", None if species_key is None else np.asarray(species_key, np.int32)
        )
        object.__setattr__(obj, "symbols", symbols)
        object.__setattr__(obj, "pbc", pbc)
        return obj

    # -- derived quantities -----------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def dim(self) -> int:
        return int(self.positions.shape[1])

    @property
    def volume(self):
        """Cell volume (area in 2D), Å^d; ``None`` for a free system."""
        return None if self.cell is None else jnp.abs(jnp.linalg.det(self.cell))

    @property
    def box(self):
        """The jax-md box (columns are lattice vectors): ``cell.T``; ``None`` if free."""
        return None if self.cell is None else self.cell.T

    @property
    def fractional_positions(self):
        """``positions @ inv(cell)``: fractional coordinates, ``(N, d)``."""
        if self.cell is None:
            raise StructureError("a free system has no fractional coordinates (cell is None).")
        return jnp.linalg.solve(self.cell.T, self.positions.T).T

    @property
    def chemical_symbols(self) -> list:
        """Per-atom species names, length N."""
        return [self.symbols[int(s)] for s in np.asarray(self.species)]

    def replace(self, **changes) -> "System":
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # -- ASE interoperability ---------------------------------------------------------
    @classmethod
    def from_ase(cls, atoms, symbols: Optional[Sequence[str]] = None) -> "System":
        """Build a `System` from an ``ase.Atoms``.

        Args:
          atoms: the ASE structure. Its ``pbc`` must be all True or all False.
          symbols: optional species ordering (e.g. ``("Si",)``); defaults to the sorted
            unique chemical symbols of ``atoms``. Every symbol in ``atoms`` must be in it.
        """
        names = list(atoms.get_chemical_symbols())
        if symbols is None:
            symbols = tuple(sorted(set(names)))
        symbols = tuple(symbols)
        missing = sorted(set(names) - set(symbols))
        if missing:
            raise StructureError(f"atoms contain symbols {missing} that are not in symbols={symbols}.")
        index = {s: i for i, s in enumerate(symbols)}
        species = np.array([index[s] for s in names], dtype=np.int32)
        pbc = np.asarray(atoms.pbc, dtype=bool)
        cell = np.asarray(atoms.cell.array, dtype=np.float64) if pbc.any() else None
        return cls(
            positions=np.asarray(atoms.positions, dtype=np.float64),
            cell=cell,
            species=species,
            symbols=symbols,
            pbc=tuple(pbc.tolist()),
        )

    def to_ase(self):
        """Convert to an ``ase.Atoms`` (3D only); lossless for positions, cell, pbc, symbols."""
        import ase

        if self.dim != 3:
            raise StructureError(
                "ASE structures are 3D; this is a 2D system. Use ms.write(..., format='npz') or "
                "embed it in 3D (add a zero z coordinate and a vacuum lattice vector)."
            )
        return ase.Atoms(
            symbols=self.chemical_symbols,
            positions=np.asarray(self.positions),
            cell=None if self.cell is None else np.asarray(self.cell),
            pbc=self.pbc,
        )

    def __repr__(self) -> str:
        kind = "periodic" if self.pbc else "free"
        return f"System(N={self.n_atoms}, d={self.dim}, {kind}, symbols={self.symbols})"
