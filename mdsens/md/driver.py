"""The host driver of a relaxation: compiled chunks of a pure minimizer, checked in between.

:class:`HostRelaxation` runs a minimizer of :mod:`mdsens.md.minimize` in jitted chunks
of ``chunk_size`` steps (a ``lax.while_loop`` that exits as soon as the criterion
holds). Between chunks, on the host, it

* checks neighbor-list overflow: an overflowed chunk is discarded and re-run with a
  reallocated list (:func:`mdsens.md.neighbors.overflow_capacity`), never truncated;
* refuses NaN/inf energies with :class:`~mdsens.RelaxError`;
* shows progress (tqdm, :mod:`mdsens.md.progress`);

and finally **confirms convergence with a freshly built neighbor list** (a stale list
can make a relaxation look converged), and evaluates energy, forces and stress at the
result. It is not differentiable: :func:`mdsens.md.relaxation.relax` wraps it.

The compiled chunks depend on the layout (N, species, pbc, neighbor capacity) and the
options, not on positions, cell or parameters, so one instance serves many calls.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mdsens._config import require_x64
from mdsens.md import minimize, neighbors, programs
from mdsens.md.errors import NotConvergedWarning, RelaxError
from mdsens.md.options import DEFAULT_MINIMIZER, LBFGS, GradientDescent, as_minimizer, as_neighbor_list
from mdsens.md.progress import progress_bar, progress_enabled
from mdsens.md.strain import energy_forces_stress
from mdsens.md.system import System

__all__ = ["RelaxResult", "HostRelaxation", "DEFAULT_FMAX", "DEFAULT_MAX_STEPS"]

#: Default force criterion (force units: eV/Å, or reduced).
DEFAULT_FMAX = 1e-6
#: Default step budget.
DEFAULT_MAX_STEPS = 20_000


class RelaxResult(NamedTuple):
    """Result of ``ms.relax`` (a pytree).

    Attributes:
      system: the relaxed :class:`System` (positions wrapped into the cell; with
        ``relax_cell=True`` also the relaxed cell).
      energy: potential energy, float64 scalar (eV).
      forces: ``(N, d)`` forces ``-∂E/∂R`` (eV/Å), from a freshly built neighbor list.
      fmax: ``max_i |forces_i|`` (eV/Å).
      steps: iterations taken.
      converged: the ``fmax`` criterion (and the stress criterion with ``relax_cell``)
        confirmed with a fresh neighbor list. Never True otherwise.
      stress: Voigt stress in ASE's convention (xx, yy, zz, yz, xz, xy) in eV/Å³
        ((xx, yy, xy), eV/Å², in 2D) for periodic systems, else ``None``.
      neighbor: the neighbor list freshly built at the relaxed structure
        (:class:`mdsens.md.neighbors.Neighbors`), ``None`` on the dense path and when
        ``relax`` was differentiated (jvp, grad, jit); the derivative routines reuse it
        while it covers the potential's range.
    """

    system: System
    energy: jax.Array
    forces: jax.Array
    fmax: Any
    steps: Any
    converged: Any
    stress: Optional[jax.Array] = None
    neighbor: Any = None


def uses_neighbor_list(pot, system, options) -> bool:
    """Whether ``system`` uses lists under ``options`` (a NeighborListOptions)."""
    if options.enabled is not None:
        return bool(options.enabled)
    return pot.uses_neighbor_list(system)


class HostRelaxation:
    """A compiled, reusable host relaxation for systems shaped like ``system``.

    ``host = HostRelaxation(pot, system, minimizer=..., relax_cell=..., neighbor_list=...)``;
    ``host(system, params, fmax=..., max_steps=..., stress_tol=None, progress=None)``
    returns a :class:`RelaxResult`. Options are those of ``ms.relax``.
    """

    def __init__(self, pot, system: System, *, minimizer=DEFAULT_MINIMIZER, relax_cell: bool = False,
                 neighbor_list=None):
        require_x64("relaxation")
        self.minimizer = as_minimizer(minimizer)
        self.neighbor_options = as_neighbor_list(neighbor_list)
        if relax_cell and not system.pbc:
            raise RelaxError("relax_cell=True needs a periodic system; this one is free (pbc=False).")
        if system.n_atoms == 0:
            raise RelaxError("the system has no atoms; there is nothing to relax.")
        self.pot = pot
        self.template = system
        self.relax_cell = bool(relax_cell)
        self.use_nl = uses_neighbor_list(pot, system, self.neighbor_options)
        # Short lists are exact only where every energy is evaluated at the positions the
        # list was just updated to: L-BFGS and gradient descent do that, FIRE does not
        # (it updates, then moves the atoms, then evaluates).
        self.short_lists = isinstance(self.minimizer, (LBFGS, GradientDescent))
        cf = self.minimizer.cell_factor
        self.cell_factor = float(system.n_atoms if cf is None else cf)
        self.energy_fn = pot.energy_fn(system, neighbor_list=self.use_nl)
        if self.relax_cell:
            self.problem = minimize.cell_problem(self.energy_fn, system.n_atoms, system.dim, self.cell_factor)
        else:
            # the loop builds its own lists, all full ones: the row-local gradient holds
            self.problem = minimize.positions_problem(self.energy_fn, periodic=system.pbc,
                                                      value_and_grad=getattr(self.energy_fn, "value_and_gradient",
                                                                             None))
        #: Diagnostics: neighbor lists reallocated after an overflow (all calls).
        self.reallocations = 0
        self._nl = None
        self._widest = None
        self._compiled = None
        self._cell_list_fns = {}
        self._evaluate = programs.jit(lambda R, p, C, nb: energy_forces_stress(self.energy_fn, R, p, C, nb))

    # -- compiled pieces (rebuilt only when a new neighbor-list function is needed) ------
    def _compile(self, nl):
        init, step = minimize.minimizer(self.problem, self.minimizer, None if nl is None else nl.update)
        self._nl = nl
        self._widest = None  # the list with the largest capacities these programs have seen
        self._compiled = (programs.jit(init),
                          programs.jit(lambda s, p, c, f, t, m: minimize.run(step, s, p, c, f, t, m)))

    def check_compatible(self, system):
        """Raise :class:`RelaxError` unless ``system`` has this relaxation's layout."""
        t = self.template
        if (system.n_atoms != t.n_atoms or system.dim != t.dim or system.pbc != t.pbc
                or system.symbols != t.symbols
                or not np.array_equal(np.asarray(system.species), np.asarray(t.species))):
            raise RelaxError(
                f"this relaxation was built for {t!r} with its species order; got {system!r}. "
                "Build a new one with ms.make_relax(pot, system)."
            )

    def _neighbor_fn(self, system, params, cutoff: float):
        """Neighbor-list functions covering ``cutoff``, the range of ``params`` (reused if
        they still cover it)."""
        if not self.use_nl:
            return None
        nl = self._nl
        if nl is None or nl.cutoff < cutoff:
            short_skin = neighbors.SHORT_SKIN_FRACTION * cutoff if self.short_lists else 0.0
            if nl is not None:
                cutoff = max(cutoff, (1.0 + neighbors.CUTOFF_GROWTH_HEADROOM) * nl.cutoff)
            nl = self.pot.neighbor_list_fn(system, params, cutoff=cutoff, short_skin=short_skin,
                                           **self.neighbor_options.kwargs())
        return nl

    def __call__(self, system: System, params=None, *, fmax: float = DEFAULT_FMAX,
                 max_steps: int = DEFAULT_MAX_STEPS, stress_tol: Optional[float] = None,
                 progress: Optional[bool] = None) -> RelaxResult:
        self.check_compatible(system)
        fmax, max_steps = _checked_criteria(fmax, max_steps)
        params = self.pot.check(system, params)
        tol_s = math.inf
        if self.relax_cell:
            if stress_tol is None:
                # ASE's UnitCellFilter criterion: virial per cell_factor below fmax.
                stress_tol = fmax * self.cell_factor / float(system.volume)
            tol_s = float(stress_tol)
            if not (tol_s > 0 and math.isfinite(tol_s)):
                raise RelaxError(f"stress_tol must be a positive number (eV/Å³); got {stress_tol!r}.")
        elif stress_tol is not None:
            raise RelaxError("stress_tol only applies with relax_cell=True.")

        cutoff = float(self.pot.cutoff(params)) if self.use_nl else None
        nl = self._neighbor_fn(system, params, cutoff)
        if self._compiled is None or nl is not self._nl:
            self._compile(nl)
        init, run = self._compiled

        cell_ref = system.cell
        X0 = system.positions
        if self.relax_cell:
            X0 = jnp.asarray(np.concatenate([np.asarray(system.positions), np.zeros((system.dim, system.dim))]))

        def allocate(X, extra=0):
            if nl is None:
                return None
            R, cell = self.problem.physical(X, cell_ref)
            return self._allocated(nl, R, cell, extra=extra, short=self.short_lists, interaction_cutoff=cutoff)

        state = init(X0, params, cell_ref, allocate(X0))
        confirmed = None  # the fresh list that confirmed convergence, at the final positions
        evaluated = None  # (energy, forces, stress) with that list there
        bar = progress_bar(progress_enabled(progress), max_steps, f"relax N={system.n_atoms}", unit="step")
        chunk = self.minimizer.chunk_size
        extra = 0
        try:
            while True:
                _raise_if_not_finite(state, system)
                if float(state.fmax) < fmax and float(state.smax) < tol_s:
                    if nl is None:
                        break
                    # Converged as the loop saw it: confirm with a fresh list (forces only).
                    X = state.inner.position
                    fresh_list = allocate(X, extra)
                    R, cell = self._physical(X, cell_ref)
                    evaluated = self._evaluate(R, params, cell, fresh_list)
                    f_fresh, s_fresh = _criteria(*evaluated[1:], self.relax_cell)
                    if f_fresh < fmax and s_fresh < tol_s:
                        state = state._replace(neighbor=fresh_list)
                        confirmed = fresh_list
                        break
                    # A stale list hid pairs (or the forces are not finite: init reports
                    # it): restart from here with the fresh list.
                    state = init(X, params, cell_ref, fresh_list)._replace(step=state.step)
                    _raise_if_not_finite(state, system)
                    continue
                done = int(state.step)
                if done >= max_steps:
                    break
                new = run(state, params, cell_ref, fmax, tol_s, min(done + chunk, max_steps))
                if nl is not None and new.neighbor.needs_reallocation():
                    # The chunk's forces are untrustworthy: redo it with a bigger list, in
                    # shorter chunks so that the list keeps up.
                    self.reallocations += 1
                    extra += neighbors.overflow_capacity(new.neighbor)
                    chunk = max(1, chunk // 2)
                    X = state.inner.position
                    state = init(X, params, cell_ref, allocate(X, extra))._replace(step=state.step)
                    continue
                state = new
                chunk = self.minimizer.chunk_size
                bar.update(int(state.step) - done)
                bar.set_postfix_str(f"fmax={float(state.fmax):.3g}", refresh=False)
        finally:
            bar.close()
        return self._result(system, state, params, nl, confirmed, evaluated, fmax, tol_s, max_steps)

    def _allocated(self, nl, R, cell, extra=0, short=False, interaction_cutoff=None):
        """A fresh list at ``(R, cell)`` with the shapes of the programs already compiled
        (capacities only grow: a relaxation per parameter draw compiles a few variants,
        not one per draw)."""
        fresh = nl.allocate(R, cell, extra_capacity=extra, short=short, like=self._widest,
                            interaction_cutoff=interaction_cutoff)
        if short == self.short_lists:  # the loop's kind of list (the final one may lack the short)
            self._widest = fresh
        return neighbors.stable_metadata(fresh, self._cell_list_fns)

    def _physical(self, X, cell_ref):
        """Host form of ``problem.physical``: positions and cell of the state ``X``."""
        if not self.relax_cell:
            return X, cell_ref
        n = self.template.n_atoms
        D = np.eye(self.template.dim) + np.asarray(X[n:]) / self.cell_factor
        return jnp.asarray(np.asarray(X[:n]) @ D), jnp.asarray(np.asarray(cell_ref) @ D)

    def _result(self, system, state, params, nl, confirmed, evaluated, fmax, tol_s, max_steps):
        X = state.inner.position
        R, cell = self._physical(X, system.cell)
        if self.relax_cell:
            D = np.eye(system.dim) + np.asarray(X[system.n_atoms:]) / self.cell_factor
            R, cell = _remove_rotation(R, cell, D)
        relaxed = system.replace(positions=R, cell=cell) if system.pbc else system.replace(positions=R)
        if self.relax_cell:
            self.pot.check(relaxed, params)  # the cell may have shrunk below 2 x cutoff
        neighbor = None
        if confirmed is not None and not self.relax_cell:
            # built at exactly these positions, and evaluated there; its short list stays
            # in the loop (valid only where the loop updates it)
            neighbor = confirmed.without_short()
        else:
            evaluated = None
            if nl is not None:  # unconfirmed, or the rotation removed from the cell moved every atom
                neighbor = self._allocated(nl, relaxed.positions, relaxed.cell)
        if evaluated is None:
            evaluated = self._evaluate(relaxed.positions, params, relaxed.cell, neighbor)
        energy, forces, stress = evaluated
        f, s = _criteria(forces, stress, True)
        if not (np.isfinite(float(energy)) and np.isfinite(f) and np.isfinite(s)):
            raise RelaxError(f"the relaxed {system!r} has a NaN/inf energy or forces.")
        steps = int(state.step)
        converged = f < fmax and (s < tol_s if self.relax_cell else True)
        if not converged:
            what = f"fmax = {f:.3g} (target {fmax:.3g})"
            if self.relax_cell:
                what += f", max |stress| = {s:.3g} (target {tol_s:.3g})"
            warnings.warn(
                f"relaxation of {system!r} did not converge in {steps} steps (max_steps="
                f"{max_steps}): {what}. Raise max_steps, loosen fmax, or check the "
                "structure and parameters; the result is returned with converged=False.",
                NotConvergedWarning,
                stacklevel=4,
            )
        return RelaxResult(relaxed, energy, forces, f, steps, bool(converged), stress, neighbor)


# --------------------------------------------------------------------------- helpers
def _criteria(forces, stress, with_stress: bool):
    """``(fmax, max |σ|)`` on the host (``max |σ|`` is 0 without a stress or when not asked):
    the convergence criteria of ``problem.residuals`` at a physical structure."""
    forces = np.asarray(forces)
    f = float(np.sqrt(np.max(np.sum(forces * forces, axis=-1), initial=0.0)))
    # Voigt holds every distinct component of the symmetric tensor: same max |σ_ab|.
    s = 0.0 if stress is None or not with_stress else float(np.max(np.abs(np.asarray(stress))))
    return f, s


def _checked_criteria(fmax, max_steps):
    try:
        fmax = float(fmax)
    except (TypeError, ValueError):
        raise RelaxError(f"fmax must be a positive number (force units); got {fmax!r}.") from None
    if not (fmax > 0 and math.isfinite(fmax)):
        raise RelaxError(f"fmax must be a positive number (force units); got {fmax}.")
    if isinstance(max_steps, bool) or not float(max_steps) == int(max_steps) or int(max_steps) < 0:
        raise RelaxError(f"max_steps must be an integer >= 0; got {max_steps!r}.")
    return fmax, int(max_steps)


def _raise_if_not_finite(state, system):
    if not (np.isfinite(float(state.fmax)) and np.isfinite(float(state.smax))):
        raise RelaxError(
            f"the energy or forces became NaN/inf after {int(state.step)} steps while relaxing "
            f"{system!r}. Usual causes: overlapping atoms (check the structure's shortest "
            "distance), parameters outside the potential's range, or a step too large (lower "
            "LBFGS(maxstep=...), FIRE(maxstep=..., dt_max=...), or GradientDescent(step_size=...))."
        )


def _remove_rotation(R, cell, D):
    """Drop the rigid rotation from the deformation ``D`` (rows: ``x -> x D``).

    Right polar decomposition ``D = P Q`` (``P`` symmetric positive, ``Q`` orthogonal,
    from the SVD ``D = U Σ Vᵀ``: ``P = U Σ Uᵀ``, ``Q = U Vᵀ``); returns ``(R Qᵀ, cell Qᵀ)``,
    the structure deformed by the pure stretch ``P``. Energies are unchanged.
    """
    u, _, vt = np.linalg.svd(np.asarray(D))
    q = u @ vt
    return R @ q.T, cell @ q.T
