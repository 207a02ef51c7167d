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
  fractional_coordinates=True)``, the box passed at call time, so
  ``E(positions @ (I + eps), params, cell @ (I + eps))`` is the energy of the affinely
  strained structure and derivatives w.r.t. ``cell`` are box derivatives; stress and
  elastic constants come from there.
* ``neighbor``: a :class:`mdsens.md.neighbors.Neighbors` from
  :meth:`Potential.neighbor_list`, or ``None`` for the dense all-pairs path.

Everything is differentiable w.r.t. ``positions``, ``params`` and ``cell``.

Neighbor lists (see :mod:`mdsens.md.neighbors`)
-----------------------------------------------
Systems with ``N >= pot.neighbor_list_min_atoms`` atoms (500 for pair potentials, 128
for Tersoff and 32 for Stillinger–Weber, whose dense paths are O(N³)) use neighbor lists
automatically; the energy function then *requires* a ``neighbor`` argument (calling it
without one raises instead of silently building an O(N²) dense problem)::

    E = pot.energy_fn(system)                      # auto: list if N >= neighbor_list_min_atoms
    nl = pot.neighbor_list_fn(system, params)      # NeighborListFn, cutoff = pot.cutoff(params)
    nbrs = nl.allocate(positions, cell)            # host
    nbrs = nl.update(positions, nbrs, cell)        # pure, jit-able (e.g. every relax step)
    nl, nbrs = pot.refresh_neighbor_list(system, nbrs, nl, params)   # host, after each chunk:
        # reallocates on overflow, on a cutoff that grew past the list's, or a box change
    E(positions, params, cell, nbrs)

The list only decides *which* pairs interact (jax-md builds it in float32 with the box
gradient stopped); energies always use the float64 ``cell`` passed to ``E``.

Failure modes (all subclasses of :class:`PotentialError`, a ``ValueError``):

* :class:`SpeciesError`: the system has a species the potential has no parameters for.
* :class:`CutoffError`: the cutoff is not smaller than half the perpendicular width of
  the periodic cell (minimum image would miss periodic images); the message gives the
  ``atoms.repeat(...)`` that fixes it.
* :class:`ParameterError`: NaN/inf, wrongly shaped or unknown parameters.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import space

from mdsens.md import neighbors as _nb
from mdsens.md.space import free_displacement, periodic_general_displacement
from mdsens.md.system import System


class PotentialError(ValueError):
    """A potential cannot be used as asked; the message names the problem and the fix."""


class SpeciesError(PotentialError):
    """The system contains species the potential has no parameters for."""


class CutoffError(PotentialError):
    """The interaction range is too long for the periodic cell (minimum image fails)."""


class ParameterError(PotentialError):
    """Parameters are NaN/inf, wrongly shaped, or not the ones the potential expects."""


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


def perpendicular_widths(cell) -> np.ndarray:
    """Distances between opposite faces of the cell, ``(d,)`` (Å), on the host.

    ``h_a = 1 / |b_a|`` with ``b_a`` the reciprocal vectors (columns of ``inv(cell)``).
    Minimum image is exact for an interaction range ``r < min(h) / 2``: any vector
    shorter than ``h_a / 2`` has fractional component ``|s_a| < 1/2``, so it is the
    wrapped one, and no second image of the same atom lies within range.
    """
    inv = np.linalg.inv(np.asarray(cell, dtype=np.float64))
    return 1.0 / np.linalg.norm(inv, axis=0)


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
      (i→j and j→i), as in a full (``Dense``) neighbor list.
    """

    #: dict of float64 arrays: what `jax.grad` can differentiate.
    params: dict
    #: species names the potential has parameters for, or ``None`` for "by index".
    symbols: Optional[tuple] = None
    #: number of species the parameter tables cover (``None``: any, single table).
    n_species: Optional[int] = None
    #: a short name for messages.
    name: str = "potential"
    #: the automatic dense/neighbor-list switch: neighbor lists when N >= this.
    #: Potentials whose dense path is O(N³) (Tersoff) lower it.
    neighbor_list_min_atoms: int = _nb.NEIGHBOR_LIST_MIN_ATOMS

    # -- hooks ------------------------------------------------------------------------
    def cutoff(self, params=None) -> float:
        """Interaction range (Å) for ``params`` (default ``self.params``), on the host."""
        raise NotImplementedError

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
        return params

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
        :class:`CutoffError` or :class:`ParameterError` (see module docstring).
        """
        params = self.params if params is None else params
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
            ``N >= neighbors.NEIGHBOR_LIST_MIN_ATOMS``); ``True``/``False`` forces.
            In neighbor-list mode ``E`` requires ``neighbor`` (from
            :meth:`neighbor_list`); in dense mode ``neighbor=None`` means all pairs
            (a ``neighbor`` is still honoured if given).
          params: only used to validate the cutoff against the cell now (default
            ``self.params``); the returned ``E`` takes its params at call time.

        Returns:
          ``E(positions (N, d) Å, params, cell (d, d) Å or None, neighbor=None) -> eV``.
          Pure and jit-able; differentiable in positions, params and cell.
        """
        self.check(system, params)
        species = self.species_indices(system)
        species_j_pad = np.concatenate([species, species[:1]])  # padding index N -> any
        n = system.n_atoms
        use_nl = (
            _nb.use_neighbor_list(n, self.neighbor_list_min_atoms)
            if neighbor_list is None
            else bool(neighbor_list)
        )
        periodic = bool(system.pbc)
        # Our own displacement (jax-md primitives, no custom JVP): see mdsens.md.space.
        displacement = periodic_general_displacement if periodic else free_displacement
        local_energy = self._local_energy
        validate = self._shape_check_only
        name = self.name
        off_diagonal = ~np.eye(n, dtype=bool)

        def energy(positions, params, cell=None, neighbor=None):
            params = validate(params)
            positions = jnp.asarray(positions, jnp.float64)
            if periodic:
                if cell is None:
                    raise ValueError(f"{name}: this system is periodic; pass its cell (d, d).")
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
                    raise ValueError(
                        f"{name}: this energy function was built for neighbor lists "
                        f"(N={n}); pass "
                        "neighbor=pot.neighbor_list(system, params), or build it with "
                        "energy_fn(system, neighbor_list=False) for the dense path."
                    )
                dR = space.map_product(d)(x, x)
                mask = jnp.asarray(off_diagonal)
                sj = jnp.broadcast_to(jnp.asarray(species)[None, :], (n, n))
            else:
                idx = _nb.neighbor_idx(neighbor)
                # jnp.take, not x[idx]: same values, but the gradient of the 2-D-index
                # gather form lowers to a scatter that XLA's CPU backend runs ~10x
                # slower (36 ms vs 2.4 ms per LJ gradient at N = 863).
                neighbors_x = jnp.take(x, jnp.minimum(idx, n - 1), axis=0)
                dR = space.map_neighbor(d)(x, neighbors_x)
                mask = (idx < n) & (idx != jnp.arange(n)[:, None])
                sj = jnp.asarray(species_j_pad)[idx]
            return local_energy(params, dR, mask, jnp.asarray(species), sj)

        return energy

    def _shape_check_only(self, params):
        """Inside jit: float64 leaves (jax-md downcasts weak types), no value checks."""
        return as_float64_tree(params)

    # -- neighbor lists -----------------------------------------------------------------
    def neighbor_list_fn(self, system: System, params=None, **kwargs) -> "_nb.NeighborListFn":
        """A :class:`mdsens.md.neighbors.NeighborListFn` covering ``self.cutoff(params)``.

        ``kwargs`` go to :func:`mdsens.md.neighbors.neighbor_list_fn` (``skin``,
        ``capacity_multiplier``).
        """
        params = self.check(system, params)
        return _nb.neighbor_list_fn(system, self.cutoff(params), **kwargs)

    def neighbor_list(self, system: System, params=None, **kwargs) -> "_nb.Neighbors":
        """An allocated, checked neighbor list for ``system`` (host)."""
        nl = self.neighbor_list_fn(system, params, **kwargs)
        return nl.allocate(system.positions, system.cell)

    def refresh_neighbor_list(self, system: System, neighbor, nl=None, params=None, **kwargs):
        """Host check after a jitted chunk: ``(nl, neighbor)`` valid for ``system``/``params``.

        Reallocates (never truncates) when the list overflowed, when ``self.cutoff(params)``
        exceeds the range the list was built for, or when the box changed beyond what
        the list's margin covers; otherwise updates it. ``nl`` defaults to a fresh
        :meth:`neighbor_list_fn`.
        """
        params = self.check(system, params)
        return _nb.refresh(
            nl, neighbor, system, self.cutoff(params), **kwargs
        )

    # -- host-level wrappers (not for use inside jit) -------------------------------------
    def _evaluate(self, system: System, params, what):
        """Run ``what(E, R, p, C, nbrs)`` under one ``jax.jit`` (host wrappers)."""
        params = self.check(system, params)
        use_nl = _nb.use_neighbor_list(system.n_atoms, self.neighbor_list_min_atoms)
        E = self.energy_fn(system, neighbor_list=use_nl, params=params)
        nbrs = self.neighbor_list(system, params) if use_nl else None
        fn = jax.jit(lambda R, p, C, nb: what(E, R, p, C, nb))
        return fn(system.positions, params, system.cell, nbrs)

    def energy(self, system: System, params=None):
        """Potential energy of ``system`` (eV), float64 scalar."""
        return self._evaluate(system, params, lambda E, R, p, C, nb: E(R, p, C, nb))

    def forces(self, system: System, params=None):
        """Forces ``-dE/dR``, ``(N, d)`` (eV/Å)."""
        return self._evaluate(system, params, lambda E, R, p, C, nb: -jax.grad(E)(R, p, C, nb))

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
        return self._evaluate(system, params, lambda E, R, p, C, nb: stress_from_energy(E, R, p, C, nb))


def strain_energy_fn(E, positions, params, cell, neighbor=None):
    """``e(ε) = E(R (I+ε_s), p, cell (I+ε_s))``, ``ε_s = (ε + εᵀ)/2``: ``(d, d) -> eV``.

    The affine strain at fixed fractional coordinates; ``de/dε`` at 0 is ``V σ`` (ASE
    sign), its second derivative the clamped-ion elastic tensor times V.
    """
    dim = positions.shape[1]
    eye = jnp.eye(dim, dtype=jnp.float64)

    def e(eps):
        F = eye + 0.5 * (eps + eps.T)
        return E(positions @ F, params, cell @ F, neighbor)

    return e


def stress_from_energy(E, positions, params, cell, neighbor=None):
    """Voigt stress (ASE sign, eV/Å³; 2D: (xx, yy, xy)) of an mdsens energy function."""
    e = strain_energy_fn(E, positions, params, cell, neighbor)
    dim = positions.shape[1]
    sigma = jax.grad(e)(jnp.zeros((dim, dim), jnp.float64)) / jnp.abs(jnp.linalg.det(cell))
    return full_to_voigt(sigma)


def energy_forces_stress(E, positions, params, cell=None, neighbor=None):
    """``(energy, forces, stress)`` of an mdsens energy function from one gradient pass.

    ``d/dR`` and ``d/dε`` of the affinely strained energy at ``ε = 0`` are ``∇E`` and
    ``V σ``. Stress in ASE's sign and Voigt order (eV/Å³; 2D: (xx, yy, xy) in eV/Å²);
    ``None`` for a free system. Differentiable, jit-able.
    """
    if cell is None:
        energy, grad = jax.value_and_grad(E)(positions, params, cell, neighbor)
        return energy, -grad, None
    dim = positions.shape[1]
    eye = jnp.eye(dim, dtype=jnp.float64)

    def strained(R, eps):
        F = eye + 0.5 * (eps + eps.T)
        return E(R @ F, params, cell @ F, neighbor)

    zero = jnp.zeros((dim, dim), jnp.float64)
    energy, (grad, dstrain) = jax.value_and_grad(strained, argnums=(0, 1))(positions, zero)
    return energy, -grad, full_to_voigt(dstrain / jnp.abs(jnp.linalg.det(cell)))


def full_to_voigt(sigma):
    """(3, 3) -> (xx, yy, zz, yz, xz, xy); (2, 2) -> (xx, yy, xy)."""
    if sigma.shape == (3, 3):
        return jnp.stack(
            [sigma[0, 0], sigma[1, 1], sigma[2, 2], sigma[1, 2], sigma[0, 2], sigma[0, 1]]
        )
    return jnp.stack([sigma[0, 0], sigma[1, 1], sigma[0, 1]])


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
