"""The `Potential` contract every mdsens force field satisfies.

A potential is a *description* (hyper-parameters, species it knows, default parameters);
the numbers that can be differentiated live in ``pot.params``, a dict pytree of float64
arrays, and are passed at call time. Nothing is cached on the object: the functions it
returns are pure and jit-able, in the jax-md style. The central method is
:meth:`Potential.energy_fn`, which returns

    E(positions, params, cell, neighbor=None) -> scalar energy (eV)

* ``positions``: ``(N, d)`` **Cartesian** (Å); ``params``: a pytree like ``pot.params``;
* ``cell``: ``(d, d)`` lattice rows (Å) for periodic systems, ``None`` for free ones.
  Pair vectors are minimum-image displacements of the fractional coordinates
  ``positions @ inv(cell)`` (:mod:`mdsens.md.space`, not jax-md's ``periodic_general``),
  so ``E(R (I + ε), params, cell (I + ε))`` is the affinely strained energy and
  derivatives w.r.t. ``cell`` are box derivatives (stress, elastic constants);
* ``neighbor``: a :class:`mdsens.md.neighbors.Neighbors` (or its indices), or ``None``
  for the dense all-pairs path. From ``pot.neighbor_list_min_atoms`` atoms the function
  *requires* one (see :mod:`mdsens.md.neighbors`).

Everything is differentiable w.r.t. ``positions``, ``params`` and ``cell``.

One validation path: :meth:`Potential.check` (species, dimension, finite values in
their physical range, cutoff against the cell) runs for the constructor's parameters and
for every ``params=`` passed later. Failures are :class:`~mdsens.PotentialError`
subclasses: :class:`~mdsens.SpeciesError`, :class:`~mdsens.CutoffError` (the message
gives the ``atoms.repeat(...)`` that fixes it), :class:`~mdsens.ParameterError`.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from mdsens.md._jax_md import space

from mdsens._config import require_x64
from mdsens.md import cache, neighbors
from mdsens.md.errors import CutoffError, ParameterError, PotentialError, SpeciesError
from mdsens.md.layer import is_traced
from mdsens.md.space import free_displacement, perpendicular_widths, periodic_general_displacement
from mdsens.md.strain import stress_from_energy
from mdsens.md.system import System

__all__ = [
    "Potential",
    "as_float64_tree",
    "check_finite_params",
    "check_cutoff_fits_cell",
    "safe_norm",
    "pair_table",
    "local_hessian_blocks",
    "local_hessian_apply",
    "local_hessian_products",
]


def as_float64_tree(params: dict) -> dict:
    """Every leaf as a strongly typed float64 array (jax-md silently downcasts weak types)."""
    return {k: jnp.asarray(v, dtype=jnp.float64) for k, v in params.items()}


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_finite_params(params: dict, name: str = "potential") -> None:
    """Raise :class:`ParameterError` if any (concrete) parameter is NaN or inf."""
    for k, v in params.items():
        if _is_concrete(v) and not np.all(np.isfinite(np.asarray(v))):
            raise ParameterError(
                f"{name} parameter {k!r} contains NaN or inf: {np.asarray(v)!r}. "
                "Pass finite values (a NaN usually comes from a failed fit or a bad "
                "gradient step upstream)."
            )


def check_cutoff_fits_cell(cutoff: float, system: System, name: str = "potential") -> None:
    """Raise :class:`CutoffError` if ``cutoff >= min(h)/2`` for a periodic ``system``."""
    if not system.pbc or system.cell is None or not _is_concrete(system.cell):
        return
    h = perpendicular_widths(system.cell)
    if np.all(cutoff < 0.5 * h):
        return
    repeats = tuple(int(np.floor(2.0 * cutoff / ha)) + 1 for ha in h)
    raise CutoffError(
        f"{name} interaction range {cutoff:.6g} is not smaller than half the perpendicular "
        f"width of the periodic cell (widths {np.array2string(h, precision=4)}; need "
        f"cutoff < {0.5 * h.min():.6g}). mdsens uses minimum-image periodic images only and "
        f"would miss interactions. Replicate the cell, e.g. "
        f"`ms.System.from_ase(atoms.repeat({repeats}))` (the smallest repeats that fit), "
        f"or use a shorter cutoff."
    )


class Potential:
    """Base class for potentials evaluated on neighbor displacement vectors.

    Subclasses set ``params`` (dict of float64 arrays), ``symbols`` (species names, or
    ``None`` for "species by index") and ``n_species`` (size of the species tables), and
    implement:

    * ``cutoff(params)``: interaction range (Å), a host float;
    * ``_local_energy(params, dR, mask, species_i, species_j)``: the total energy from
      neighbor displacement vectors ``dR (N, M, d)`` (``dR[i, m] = R_i - R_{j(i, m)}``,
      Cartesian, minimum image), a boolean ``mask (N, M)`` of real neighbors (self and
      padding excluded; it is *not* cut at the cutoff: the subclass cuts), and species
      table indices ``species_i (N,)``, ``species_j (N, M)``. Each pair appears twice
      (i→j and j→i), as in a full (``Dense``) neighbor list. It must be a sum over atoms
      ``i`` of terms that read row ``i`` of ``dR`` only (true of pair, Stillinger–Weber
      and Tersoff forms): :func:`local_hessian_products` builds Hessians from it.

    The energy function carries ``E.hessian_products(positions, params, cell, neighbor)``,
    a fast ``V ↦ ∇²E V`` that the derivative routines use.
    """

    #: dict of float64 arrays: what `jax.grad` can differentiate.
    params: dict
    #: species names the potential has parameters for, or ``None`` for "by index".
    symbols: Optional[tuple] = None
    #: number of species the parameter tables cover (``None``: any, single table).
    n_species: Optional[int] = None
    #: a short name for messages.
    name: str = "potential"
    #: the automatic dense/neighbor-list switch: neighbor lists when N >= this (or in a
    #: sparse periodic cell, :meth:`uses_neighbor_list`). Potentials whose dense path is
    #: O(N³) (Tersoff) lower it.
    neighbor_list_min_atoms: int = neighbors.NEIGHBOR_LIST_MIN_ATOMS
    #: ``_local_energy`` is a sum of terms of one pair vector each (pair potentials): its
    #: Hessian in the pair vectors is ``d × d`` blocks per pair rather than per atom.
    pairwise: bool = False
    #: the dimensions the potential is defined in (three-body forms: 3D only).
    dims: tuple = (2, 3)
    #: ``{param: (lower, upper, strict)}``: the physical range of each parameter's values
    #: (``None`` bounds are open; ``strict`` excludes the bounds), checked on every
    #: concrete ``params``. Subclasses extend it; :meth:`_check_values` adds relations.
    ranges: dict = {}

    # -- hooks ------------------------------------------------------------------------
    def cutoff(self, params=None) -> float:
        """Interaction range (Å) for ``params`` (default ``self.params``), on the host."""
        raise NotImplementedError

    def uses_neighbor_list(self, system: System) -> bool:
        """The automatic dense/list choice for ``system`` (:func:`neighbors.use_neighbor_list`
        with this potential's threshold and cutoff): a layout-level decision, made with
        ``self.params`` so that it stays put while a fit varies the parameters."""
        return neighbors.use_neighbor_list(system.n_atoms, self.neighbor_list_min_atoms,
                                           neighbors.list_share(system, self.cutoff()))

    def _local_energy(self, params, dR, mask, species_i, species_j):
        raise NotImplementedError

    def _validate_params(self, params: dict) -> dict:
        """Float64 leaves, the expected keys, finite values. Subclasses may extend."""
        if set(params) != set(self.params):
            raise ParameterError(
                f"{self.name} expects parameters {sorted(self.params)}; got {sorted(params)}."
            )
        params = as_float64_tree(params)
        for k, v in params.items():
            if v.shape != jnp.shape(self.params[k]):
                raise ParameterError(
                    f"{self.name} parameter {k!r} must have shape {jnp.shape(self.params[k])}; "
                    f"got {v.shape}."
                )
        check_finite_params(params, self.name)
        if all(_is_concrete(v) for v in params.values()):
            self._check_ranges(params)
            self._check_values(params)
        return params

    def _check_ranges(self, params: dict) -> None:
        for key, (low, high, strict) in self.ranges.items():
            if key not in params:
                continue
            v = np.asarray(params[key])
            bad = np.zeros(v.shape, bool)
            if low is not None:
                bad |= (v <= low) if strict else (v < low)
            if high is not None:
                bad |= (v >= high) if strict else (v > high)
            if np.any(bad):
                lo = "" if low is None else f"{low} {'<' if strict else '<='} "
                hi = "" if high is None else f" {'<' if strict else '<='} {high}"
                raise ParameterError(
                    f"{self.name} parameter {key!r} = {v.tolist()} is outside its physical range "
                    f"({lo}{key}{hi}). A sign error or a bad fitting step upstream is the usual cause."
                )

    def _check_values(self, params: dict) -> None:
        """Relations between parameters (e.g. ``r_onset < r_cutoff``); subclasses extend."""

    def cache_key(self) -> tuple:
        """Everything but the parameter values that defines this potential's energy
        functions (class, species tables, static settings, parameter shapes), hashable:
        the key under which compiled programs are reused (:mod:`mdsens.md.cache`)."""
        static = tuple(sorted((k, cache.hashable(v)) for k, v in vars(self).items() if k != "params"))
        shapes = tuple((k, tuple(np.shape(v))) for k, v in sorted(self.params.items()))
        return (type(self), static, shapes)

    # -- species ----------------------------------------------------------------------
    def species_indices(self, system: System) -> np.ndarray:
        """Per-atom indices into this potential's species tables, ``(N,)`` int32.

        Raises:
          SpeciesError: a system species the potential has no parameters for.
        """
        species = np.asarray(system.species, dtype=np.int32)
        if self.symbols is not None:
            table = {s: i for i, s in enumerate(self.symbols)}
            present = sorted({system.symbols[int(s)] for s in np.unique(species)})
            missing = [s for s in present if s not in table]
            if missing:
                raise SpeciesError(
                    f"{self.name} has parameters for species {self.symbols} but the system "
                    f"contains {missing}. Give parameters for {missing} (e.g. add them to the "
                    f"per-species dict or matrix) or remove those atoms."
                )
            lookup = np.array([table.get(s, -1) for s in system.symbols], dtype=np.int32)
            return lookup[species]
        if self.n_species is not None and species.size and species.max() >= self.n_species:
            raise SpeciesError(
                f"{self.name} has parameters for {self.n_species} species (indices "
                f"0..{self.n_species - 1}) but the system has species {system.symbols} "
                f"(index {int(species.max())} used). Give ({len(system.symbols)}, "
                f"{len(system.symbols)}) parameter matrices, or name the species with "
                f"symbols=... ."
            )
        return species

    # -- checks -----------------------------------------------------------------------
    def check(self, system: System, params=None) -> dict:
        """Validate ``params`` (default ``self.params``) for ``system`` on the host.

        Returns the float64 parameters. Raises :class:`SpeciesError`,
        :class:`CutoffError`, :class:`ParameterError`, or :class:`PotentialError` for a
        dimension the potential is not defined in.
        """
        params = self.params if params is None else params
        if system.dim not in self.dims:
            raise PotentialError(
                f"{self.name} is defined in {' or '.join(f'{d}D' for d in self.dims)}; this system is "
                f"{system.dim}D. Use a potential defined in {system.dim}D (pair potentials: "
                "LennardJones, Morse, SoftSphere), or embed the structure in 3D."
            )
        params = self._validate_params(params)
        self.species_indices(system)
        if all(_is_concrete(v) for v in params.values()):
            check_cutoff_fits_cell(self.cutoff(params), system, self.name)
        return params

    # -- energy -----------------------------------------------------------------------
    def energy_fn(
        self, system: System, *, neighbor_list: bool | None = None, params=None
    ) -> Callable:
        """Pure energy function ``E(positions, params, cell, neighbor=None)`` for ``system``.

        Args:
          system: fixes the species, boundary conditions and dimension (positions and
            cell are call-time arguments).
          neighbor_list: ``None`` chooses automatically (neighbor lists when
            ``N >= self.neighbor_list_min_atoms``); ``True``/``False`` forces.
            In neighbor-list mode ``E`` requires ``neighbor`` (from
            :meth:`neighbor_list`); in dense mode ``neighbor=None`` means all pairs
            (a ``neighbor`` is still honoured if given).
          params: only used to validate the cutoff against the cell now (default
            ``self.params``); the returned ``E`` takes its params at call time.

        Returns:
          ``E(positions (N, d) Å, params, cell (d, d) Å or None, neighbor=None) -> eV``.
          Pure and jit-able; differentiable in positions, params and cell. A neighbor
          list that overflowed is refused (concrete) or gives NaN (inside ``jit``).
        """
        require_x64(f"{self.name} energies")
        self.check(system, params)
        species = self.species_indices(system)
        species_j_pad = np.concatenate([species, species[:1]])  # padding index N -> any
        n = system.n_atoms
        use_nl = self.uses_neighbor_list(system) if neighbor_list is None else bool(neighbor_list)
        periodic = bool(system.pbc)
        # Our own displacement (jax-md primitives, no custom JVP): see mdsens.md.space.
        displacement = periodic_general_displacement if periodic else free_displacement
        local_energy = self._local_energy
        validate = self._shape_check_only
        name = self.name
        off_diagonal = ~np.eye(n, dtype=bool)

        def pair_vectors(positions, cell, neighbor):
            """``(dR (N, M, d), mask (N, M), species_j (N, M))`` as ``_local_energy`` takes them."""
            positions = jnp.asarray(positions, jnp.float64)
            if periodic:
                if cell is None:
                    raise PotentialError(f"{name}: this system is periodic; pass its cell (d, d).")
                cell = jnp.asarray(cell, jnp.float64)
                # Fractional coordinates from the float64 cell given now: box derivatives
                # (stress) flow through `cell`, and jax-md wraps by minimum image.
                # positions @ inv(cell), not solve(cell.T, positions.T): the same
                # numbers for a well-conditioned cell, but the reverse-mode rule of a
                # solve with N right-hand sides dominated every gradient (33 of 36 ms
                # for LJ at N = 863 on the CPU).
                x = positions @ jnp.linalg.inv(cell)
                box = cell.T
            else:
                x = positions
                box = None

            def d(a, b):
                return displacement(a, b, box)

            if neighbor is None:
                if use_nl:
                    raise PotentialError(
                        f"{name}: this energy function was built for neighbor lists "
                        f"(N={n}); pass "
                        "neighbor=pot.neighbor_list(system, params), or build it with "
                        "energy_fn(system, neighbor_list=False) for the dense path."
                    )
                dR = space.map_product(d)(x, x)
                mask = jnp.asarray(off_diagonal)
                sj = jnp.broadcast_to(jnp.asarray(species)[None, :], (n, n))
            else:
                neighbors.refuse_overflowed(neighbor, f"the {name} energy")
                idx = neighbors.pair_idx(neighbor)
                # jnp.take, not x[idx]: same values, but the gradient of the 2-D-index
                # gather form lowers to a scatter that XLA's CPU backend runs ~10x
                # slower (36 ms vs 2.4 ms per LJ gradient at N = 863).
                neighbors_x = jnp.take(x, jnp.minimum(idx, n - 1), axis=0)
                dR = space.map_neighbor(d)(x, neighbors_x)
                mask = (idx < n) & (idx != jnp.arange(n)[:, None])
                sj = jnp.asarray(species_j_pad)[idx]
            return dR, mask, sj

        def energy(positions, params, cell=None, neighbor=None):
            params = validate(params)
            dR, mask, sj = pair_vectors(positions, cell, neighbor)
            (e,) = neighbors.nan_if_overflowed(neighbor, local_energy(params, dR, mask, jnp.asarray(species), sj))
            return e

        pairwise = self.pairwise

        def gradient_and_hessian_blocks(positions, params, cell=None, neighbor=None):
            """``(∇E, blocks)`` (:func:`local_hessian_blocks`), or ``None`` where blocks do
            not pay (no list, or too big)."""
            if neighbor is None:
                return None
            params = validate(params)
            return local_hessian_blocks(
                lambda R: pair_vectors(R, cell, neighbor)[0], positions,
                lambda dR, mask, sj: local_energy(params, dR, mask, jnp.asarray(species), sj),
                pair_vectors(positions, cell, neighbor)[1:], pairwise=pairwise)

        def hessian_apply(blocks, positions, params, cell=None, neighbor=None):
            """``v ↦ H v`` from blocks built at the same arguments."""
            return local_hessian_apply(lambda R: pair_vectors(R, cell, neighbor)[0], positions, blocks,
                                       pairwise=pairwise, idx=neighbors.pair_idx(neighbor),
                                       mirror=getattr(neighbor, "mirror", None))

        def hessian_products(positions, params, cell=None, neighbor=None):
            """``V (..., N, d) -> H V``, or ``None`` where blocks do not pay."""
            built = gradient_and_hessian_blocks(positions, params, cell, neighbor)
            return None if built is None else hessian_apply(built[1], positions, params, cell, neighbor)

        energy.gradient_and_hessian_blocks = gradient_and_hessian_blocks
        energy.hessian_apply = hessian_apply
        energy.hessian_products = hessian_products
        if pairwise:
            def value_and_gradient(positions, params, cell=None, neighbor=None):
                """``(E, ∇E)`` on a full list (each pair in both rows, as every list mdsens
                builds): ``∂E/∂R_i = −2 Σ_m ∂L/∂dR[i, m]`` (jax-md's ``dR[i, m] = R_j −
                R_i``), the pair terms being even in ``dR`` and symmetric in species, so
                the mirror slot's half equals this one's. No transposed gather (a
                scatter-add on XLA's CPU backend; docs/design.md §9). Wrong on a one-way
                list: for the loops that build their own lists."""
                params = validate(params)
                dR, mask, sj = pair_vectors(positions, cell, neighbor)
                e, g = jax.value_and_grad(lambda D: local_energy(params, D, mask, jnp.asarray(species), sj))(dR)
                return neighbors.nan_if_overflowed(neighbor, e, -2.0 * g.sum(axis=1))

            energy.value_and_gradient = value_and_gradient
        return energy

    def _shape_check_only(self, params):
        """Inside jit: float64 leaves (jax-md downcasts weak types), no value checks."""
        return as_float64_tree(params)

    # -- neighbor lists -----------------------------------------------------------------
    def neighbor_list_fn(self, system: System, params=None, cutoff=None, **kwargs) -> "neighbors.NeighborListFn":
        """A :class:`mdsens.md.neighbors.NeighborListFn` covering ``self.cutoff(params)``,
        or ``cutoff`` (Å) if given, which must be at least that.

        ``kwargs`` go to :func:`mdsens.md.neighbors.neighbor_list_fn` (``skin``,
        ``capacity_multiplier``, ``short_skin``).
        """
        params = self.check(system, params)
        needed = float(self.cutoff(params))
        if cutoff is None:
            cutoff = needed
        elif not float(cutoff) >= needed:
            raise PotentialError(f"a neighbor list for {self.name} at these parameters must cover "
                                 f"{needed:g} Å; got cutoff={cutoff!r}.")
        return neighbors.neighbor_list_fn(system, cutoff, **kwargs)

    def neighbor_list(self, system: System, params=None, **kwargs) -> "neighbors.Neighbors":
        """An allocated, checked neighbor list for ``system`` (host)."""
        nl = self.neighbor_list_fn(system, params, **kwargs)
        return nl.allocate(system.positions, system.cell)

    # -- host-level wrappers (not for use inside jit) -------------------------------------
    def _evaluate(self, system: System, params, what, kind: str):
        """Run ``what(E, R, p, C, nbrs)`` under one ``jax.jit`` (host wrappers), compiled
        once per ``kind``, potential and layout (the memo of :mod:`mdsens.md.cache`):
        a fresh ``jax.jit`` per call recompiled every ``pot.energy(...)``."""
        params = self.check(system, params)
        use_nl = self.uses_neighbor_list(system)
        key = ("potential_" + kind, self.cache_key(), cache.layout_key(system), use_nl)
        fn = cache.memoized(key, lambda: jax.jit(functools.partial(
            what, self.energy_fn(system, neighbor_list=use_nl, params=params))))
        nbrs = None
        if use_nl:  # a fresh list per call: its capacity is padded to few shapes
            nbrs = neighbors.indices_only(self.neighbor_list(system, params), neighbors.INDEX_CAPACITY_STEP)
        out = fn(system.positions, params, system.cell, nbrs)
        if is_traced(out):
            # under jvp/vmap of the caller the values are not known here; the caller's
            # own primal run checks them
            return out
        if not bool(np.all(np.isfinite(np.asarray(out)))):
            raise PotentialError(
                f"{self.name} gives a NaN/inf energy or force for {system!r}. Usual causes: two "
                "atoms at (nearly) the same position (check the shortest distance), or "
                "parameters outside the potential's range."
            )
        return out

    def energy(self, system: System, params=None):
        """Potential energy of ``system`` (eV), float64 scalar."""
        return self._evaluate(system, params, lambda E, R, p, C, nb: E(R, p, C, nb), "energy")

    def forces(self, system: System, params=None):
        """Forces ``-dE/dR``, ``(N, d)`` (eV/Å)."""
        return self._evaluate(system, params, lambda E, R, p, C, nb: -jax.grad(E)(R, p, C, nb), "forces")

    def stress(self, system: System, params=None):
        """Stress in ASE's convention and Voigt order (xx, yy, zz, yz, xz, xy), eV/Å³.

        ``(1/V) dE/dε`` at fixed fractional coordinates, from
        ``E(R (I+ε), p, cell (I+ε))`` with symmetric ε (note: jax-md's own stress has
        the opposite sign). 2D systems give (xx, yy, xy) in eV/Å².

        Raises:
          PotentialError: a free (non-periodic) system has no stress.
        """
        if not system.pbc:
            raise PotentialError(
                "stress needs a periodic system with a cell; this one is free (pbc=False)."
            )
        return self._evaluate(system, params, lambda E, R, p, C, nb: stress_from_energy(E, R, p, C, nb), "stress")


#: Most Hessian-block entries (8 bytes each) built for fast products; beyond, products
#: come from autodiff of the gradient (no memory beyond the gradient's).
LOCAL_HESSIAN_MAX_ENTRIES = 2**26


def local_hessian_blocks(pair_vectors_of: Callable, positions, local_energy: Callable, aux, *,
                         pairwise: bool):
    """``(∇E (N, d), blocks)``: the gradient and small dense blocks of the local energy's Hessian.

    ``E(R) = L(dR(R))``, with ``dR (N, M, d)`` linear in ``R`` near ``R`` (fixed images)
    and ``L`` a sum over atoms of terms of one row of ``dR`` (of one slot when
    ``pairwise``). Then ``∇E = Jᵀ ∇L`` and ``∇²E = Jᵀ (⊕ ∇²L_i) J`` with ``J = ∂dR/∂R``.
    The blocks cost ``M d`` products of ``∇L`` (``d`` when ``pairwise``), once; each
    Hessian product afterwards (:func:`local_hessian_apply`) is a gather, ``N`` small
    dense products and a scatter, a fraction of an autodiff one (5x at Stillinger–Weber
    N = 999 with a tight list). Build them once and pass them to every compiled program
    that needs products: they are plain arrays.

    Args:
      pair_vectors_of: ``R (N, d) -> dR (N, M, d)``.
      positions: ``(N, d)``, where the Hessian is taken.
      local_energy: ``L(dR, mask, species_j) -> scalar``.
      aux: ``(mask (N, M), species_j (N, M))`` at ``positions``.
      pairwise: ``L`` is a sum of terms of one pair vector each.

    Returns:
      ``(gradient (N, d), blocks)`` with blocks ``(N, M, d, d)`` when ``pairwise`` else
      ``(N, M d, M d)``; ``None`` when the blocks would exceed
      :data:`LOCAL_HESSIAN_MAX_ENTRIES` (a dense all-pairs row, a huge cutoff).
    """
    mask, sj = aux
    d0, to_pairs = jax.linearize(pair_vectors_of, positions)
    n, m, d = d0.shape
    width = d if pairwise else m * d
    if n * (m * d) * (d if pairwise else m * d) > LOCAL_HESSIAN_MAX_ENTRIES:
        return None
    from_pairs = jax.linear_transpose(to_pairs, positions)
    grad_L = jax.grad(lambda D: local_energy(D, mask, sj))

    def column(k):
        # Unit tangent k in every row (every slot when pairwise) at once: rows (slots)
        # do not couple in L, so each gets its own column of its own block.
        unit = jnp.zeros((width,), d0.dtype).at[k].set(1.0)
        tangent = jnp.broadcast_to(unit.reshape((1, d) if pairwise else (m, d)), d0.shape)
        return jax.jvp(grad_L, (d0,), (tangent,))[1]

    cols = jax.vmap(column)(jnp.arange(width))  # (width, N, M, d)
    if pairwise:
        blocks = jnp.moveaxis(cols, 0, -1)  # (N, M, d, d)
    else:
        blocks = jnp.moveaxis(cols.reshape(width, n, width), 0, -1)  # (N, Md, Md)
    return from_pairs(grad_L(d0))[0], blocks


def local_hessian_apply(pair_vectors_of: Callable, positions, blocks, *, pairwise: bool, idx=None,
                        mirror=None) -> Callable:
    """``v ↦ ∇²E v`` from the blocks of :func:`local_hessian_blocks` (same ``positions``).

    ``idx (N, M)`` and ``mirror (N M,)``: the neighbor indices ``dR`` was built from and
    their mirror slots (:func:`mdsens.md.neighbors.mirror_slots`). With them the product
    reads each pair's other half from its mirror slot (two gathers) instead of
    scattering it there, which XLA's CPU backend runs several times slower; without,
    the scatter (``jax.linear_transpose`` of ``dR(R)``). The gathered product is linear
    in ``v`` and supports ``jax.vmap`` and ``jax.jvp``, not ``jax.vjp`` (``∇²E`` is
    symmetric: apply it to the cotangent instead).
    """
    if mirror is None:
        def local(w):
            if pairwise:
                return jnp.einsum("nmab,nmb->nma", blocks, w)
            n = w.shape[0]
            return jnp.einsum("nab,nb->na", blocks, w.reshape(n, -1)).reshape(w.shape)

        _, to_pairs = jax.linearize(pair_vectors_of, positions)
        from_pairs = jax.linear_transpose(to_pairs, positions)
        return lambda v: from_pairs(local(to_pairs(v)))[0]
    return functools.partial(_mirrored_product, blocks, idx, mirror)


def _mirrored_columns(blocks, idx, mirror, V):
    """``∇²E V`` for ``V (N, d, B)``: the columns last, so that each gathered row is one
    contiguous ``d B`` run, which is what makes a batch of products cheaper than its
    columns one by one (0.44 against 0.72 ms for three columns vmapped at N = 499 LJ)."""
    n, m = idx.shape
    valid = (idx < n)[:, :, None, None]
    # dR[i, m] = ±(R_i − R_j) (Cartesian; minimum image), so the tangent is
    # v_i − v_j whichever the sign, and (∇²E v)_i = Σ_m h[i, m] − h[mirror(i, m)]
    w = jnp.where(valid, V[:, None] - jnp.take(V, jnp.minimum(idx, n - 1), axis=0), 0.0)
    if blocks.ndim == 4:
        # a broadcast product and a sum, not einsum: XLA fuses it with the gather
        # around it, where einsum's dot lowering materializes (0.14 against 0.26 ms per
        # product at N = 499 LJ, 56 slots)
        h = (blocks[..., None] * w[:, :, None]).sum(3)
    else:
        h = jnp.einsum("nab,nbc->nac", blocks, w.reshape(n, -1, w.shape[-1])).reshape(w.shape)
    # a many-body row block maps the real slots' tangents into its padded slots too;
    # only the energy's masking would zero those, so mask them here
    h = jnp.where(valid, h, 0.0).reshape(n * m, *w.shape[2:])
    return (h - jnp.take(h, mirror, axis=0)).reshape(w.shape).sum(axis=1)


def _mirrored_single(blocks, idx, mirror, v):
    return _mirrored_columns(blocks, idx, mirror, v[..., None])[..., 0]


@jax.custom_batching.custom_vmap
def _mirrored_product(blocks, idx, mirror, v):
    return _mirrored_single(blocks, idx, mirror, v)


@_mirrored_product.def_vmap
def _mirrored_product_batched(axis_size, in_batched, blocks, idx, mirror, v):
    if any(in_batched[:3]) or not in_batched[3]:
        # another structure per lane (relax_batch): plain vmap
        axes = tuple(0 if b else None for b in in_batched)
        return jax.vmap(_mirrored_single, axes)(blocks, idx, mirror, v), True
    return jnp.moveaxis(_mirrored_columns(blocks, idx, mirror, jnp.moveaxis(v, 0, -1)), -1, 0), True


def local_hessian_products(pair_vectors_of: Callable, positions, local_energy: Callable, aux, *,
                           pairwise: bool) -> Optional[Callable]:
    """``v ↦ ∇²E v`` (:func:`local_hessian_blocks` then :func:`local_hessian_apply`), or
    ``None`` when the blocks would be too big."""
    built = local_hessian_blocks(pair_vectors_of, positions, local_energy, aux, pairwise=pairwise)
    if built is None:
        return None
    return local_hessian_apply(pair_vectors_of, positions, built[1], pairwise=pairwise)


def safe_norm(dR, mask, fill=1.0):
    """``|dR|`` where ``mask``, else ``fill``: the double-where trick keeps gradients
    finite at the zero self-displacement and at padded neighbor slots."""
    r2 = jnp.sum(dR * dR, axis=-1)
    r2 = jnp.where(mask, r2, fill * fill)
    return jnp.sqrt(r2)


def pair_table(value, species_i, species_j):
    """Per-pair parameter: scalar -> itself; (S, S) matrix -> ``m[s_i, s_j]`` (symmetrized,
    so a gradient w.r.t. the matrix comes out symmetric)."""
    value = jnp.asarray(value, jnp.float64)
    if value.ndim == 0:
        return value
    sym = 0.5 * (value + value.T)
    return sym[species_i[:, None], species_j]
