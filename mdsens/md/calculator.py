"""``ms.Calculator``: any mdsens potential as an ASE calculator.

``atoms.calc = ms.Calculator(pot)`` makes ASE's optimizers (BFGS, FIRE, with
``FrechetCellFilter``), MD integrators, NEB and phonons run on an mdsens potential.
Properties follow ASE: ``energy`` and ``free_energy`` (eV, equal: no electronic entropy),
``forces`` ``(N, 3)`` eV/Å, ``stress`` Voigt ``(xx, yy, zz, yz, xz, xy)`` eV/Å³ in ASE's
sign (``pot.stress``'s, :mod:`mdsens.md.strain`), periodic systems only. All are computed
together by one compiled program and cached by ASE until the atoms change.

Compilation: the program is memoized in :mod:`mdsens.md.cache` under the potential's
static description and the layout (N, species, pbc), like ``ms.relax``'s: moving atoms,
changing the cell or the parameter values never recompiles, nor does a new calculator
or a new structure of the same layout (with neighbor lists: of the same list capacity).
Per-atom ``energies`` are not offered: the potential contract exposes the total energy
only.

Neighbor lists (from ``pot.neighbor_list_min_atoms`` atoms, or as ``neighbor_list=``
says): the calculator keeps one list and, before every evaluation, checks it against
the atoms (:func:`mdsens.md.neighbors.check_valid`: no atom moved more than half the
skin, the box did not deform beyond its margin, the range still covered). A list that
fails is rebuilt from scratch, so it never overflows or goes stale. Its capacity only
grows (padded with empty slots), so rebuilding recompiles only when it must grow.
"""

from __future__ import annotations

import jax
import numpy as np
from ase.calculators import calculator as ase_calculator

from mdsens.md import cache, neighbors
from mdsens.md.driver import uses_neighbor_list
from mdsens.md.errors import NeighborListError, PotentialError, StructureError
from mdsens.md.options import as_neighbor_list
from mdsens.md.potentials.base import as_float64_tree
from mdsens.md.sensitivity import sensitivity as structure_sensitivity
from mdsens.md.strain import energy_forces_stress
from mdsens.md.system import System

__all__ = ["Calculator", "StressUnavailableError"]


class StressUnavailableError(PotentialError, ase_calculator.PropertyNotImplementedError):
    """Stress asked of a free (non-periodic) structure: both an mdsens error and ASE's
    ``PropertyNotImplementedError``, so ASE code that probes for stress keeps working."""


class Calculator(ase_calculator.Calculator):
    """An ASE calculator for an mdsens potential.

    Args:
      pot: an mdsens potential (:mod:`mdsens.md.potentials`).
      params: its parameter pytree (default ``pot.params``); ``calc.set(params=...)``
        changes it and discards the cached results, without recompiling.
      neighbor_list: ``None`` (automatic: lists from ``pot.neighbor_list_min_atoms``
        atoms), ``True``, ``False`` or :class:`~mdsens.NeighborListOptions`.
      **kwargs: ASE's (``label``, ``directory``, ``atoms``).

    Species are matched by chemical symbol (``ms.System.from_ase``'s sorted order for
    potentials whose species are indices). ASE atoms must be all periodic or all free.

    Raises (on computing, as mdsens errors):
      SpeciesError: an element the potential has no parameters for.
      StructureError: NaN/inf positions, mixed ``pbc``, a periodic cell of zero volume.
      CutoffError: the cutoff reaches half the cell's width (the message gives the repeat).
      ParameterError: invalid ``params``.
      PotentialError: a NaN/inf energy, forces or stress (overlapping atoms, usually).
      StressUnavailableError: stress of a free structure.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]
    name = "mdsens"

    def __init__(self, pot, params=None, *, neighbor_list=None, **kwargs):
        self.pot = pot
        self.neighbor_list = neighbor_list  # as given: ms.sensitivity keys its compiled programs on it
        self.neighbor_options = as_neighbor_list(neighbor_list)
        #: Diagnostics: neighbor lists built so far (the first one included).
        self.neighbor_builds = 0
        self._neighbor_fn = None
        self._neighbor = None
        self._indices = None  # the list's indices, padded to the capacity, on the device
        self._capacity = 0
        self._params = None
        super().__init__(params=pot.params if params is None else params, **kwargs)

    # -- ASE protocol ---------------------------------------------------------------------
    def set(self, **kwargs):
        """ASE's ``set``; a changed ``params`` discards the cached results."""
        if "params" in kwargs:
            # Stored as NumPy (ASE compares and writes parameters); passed on as float64.
            kwargs["params"] = {k: np.asarray(v, np.float64) for k, v in dict(kwargs["params"]).items()}
        changed = super().set(**kwargs)
        if "params" in changed:
            self._params = as_float64_tree(self.parameters["params"])
            self.reset()
        return changed

    @property
    def params(self) -> dict:
        """The potential's parameters in use (float64 arrays)."""
        return self._params

    def calculate(self, atoms=None, properties=("energy",), system_changes=ase_calculator.all_changes):
        """Compute energy, free energy, forces and (periodic systems) stress at once."""
        super().calculate(atoms, properties, system_changes)
        system = System.from_ase(self.atoms)  # StructureError for NaN positions, mixed pbc
        if "stress" in properties and not system.pbc:
            raise StressUnavailableError(
                "stress needs a periodic structure (atoms.pbc all True, with a cell); these "
                "atoms are free (pbc=False). Ask for energy and forces only, or make the "
                "structure periodic with enough vacuum."
            )
        params = self.pot.check(system, self._params)  # SpeciesError, CutoffError, ...
        use_nl = uses_neighbor_list(self.pot, system, self.neighbor_options)
        program = cache.memoized(
            ("calculator", self.pot.cache_key(), cache.layout_key(system), use_nl),
            lambda: _compile(self.pot, system, use_nl, params))
        neighbor = self._neighbor_indices(system, params) if use_nl else None
        energy, forces, stress = program(system.positions, params, system.cell, neighbor)

        energy = float(energy)
        forces = np.asarray(forces)
        stress = None if stress is None else np.asarray(stress)
        if not (np.isfinite(energy) and np.all(np.isfinite(forces))
                and (stress is None or np.all(np.isfinite(stress)))):
            raise PotentialError(
                f"{self.pot.name} gives a NaN/inf energy, forces or stress for {system!r}. Usual "
                "causes: two atoms at (nearly) the same position (check the shortest distance), "
                "or parameters outside the potential's range."
            )
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}
        if stress is not None:
            self.results["stress"] = stress

    # -- mdsens extras ----------------------------------------------------------------------
    def sensitivity(self, atoms=None, wrt="params", **kwargs):
        """``ms.sensitivity`` of ``atoms`` (default: the last computed structure).

        The structure must be relaxed at fixed cell (e.g. by an ASE optimizer with
        ``fmax`` around 1e-6 eV/Å): the derivative is only as accurate as the relaxation
        (Theorem 1; see ``error_estimate``). Larger forces give a
        :class:`~mdsens.NotConvergedWarning`, or :class:`~mdsens.NotConvergedError` with
        ``strict=True``.

        Args:
          atoms: an ``ase.Atoms``; default the atoms of the last calculation.
          wrt: as :func:`mdsens.sensitivity` (``"params"``, names, ``"cell"``, directions).
          **kwargs: passed on to :func:`mdsens.sensitivity` (``solve``, ``tol``,
            ``strict``, ``stability``, ``on_failure``, ...).

        Returns:
          :class:`~mdsens.Sensitivity` (``dpositions (P, N, 3)`` Å per parameter unit,
          ``denergy (P,)`` eV per parameter unit, diagnostics).
        """
        atoms = self.atoms if atoms is None else atoms
        if atoms is None:
            raise StructureError(
                "no structure to differentiate: pass atoms=..., or attach this calculator "
                "(atoms.calc = calc) and relax them (e.g. ase.optimize.BFGS) first."
            )
        kwargs.setdefault("neighbor_list", self.neighbor_list)
        return structure_sensitivity(System.from_ase(atoms), self.pot, wrt, params=self._params, **kwargs)

    # -- neighbor lists -------------------------------------------------------------------
    def _neighbor_indices(self, system, params) -> neighbors.NeighborIndices:
        """Indices of a list valid for ``system`` (rebuilt when it is not)."""
        cutoff = float(self.pot.cutoff(params))
        nl = self._neighbor_fn
        if nl is None or nl.n_atoms != system.n_atoms or nl.periodic != system.pbc or nl.cutoff < cutoff:
            nl, self._neighbor = None, None
        if self._neighbor is not None:
            try:
                neighbors.check_valid(self._neighbor, system, cutoff, "the calculator")
            except NeighborListError:  # atoms moved more than skin/2, or the box deformed
                self._neighbor = None
        if self._neighbor is None:
            if nl is not None:
                try:
                    self._neighbor = nl.allocate(system.positions, system.cell)
                except NeighborListError:
                    nl = None  # the box changed too much for its cell list: new functions
            if nl is None:
                nl = self.pot.neighbor_list_fn(system, params, **self.neighbor_options.kwargs())
                self._neighbor = nl.allocate(system.positions, system.cell)
            self._neighbor_fn = nl
            self.neighbor_builds += 1
            # A fixed capacity (grown, never shrunk) keeps the compiled program.
            self._indices = neighbors.indices_only(self._neighbor, neighbors.INDEX_CAPACITY_STEP, self._capacity)
            self._capacity = self._indices.idx.shape[1]
        return self._indices


def _compile(pot, system, use_nl, params):
    """``(R, params, cell, neighbor) -> (energy, forces, stress)``, jitted for ``system``'s
    layout (its energy function takes positions, cell and parameters at call time)."""
    energy_fn = pot.energy_fn(system, neighbor_list=use_nl, params=params)
    return jax.jit(lambda R, p, C, nb: energy_forces_stress(energy_fn, R, p, C, nb))
