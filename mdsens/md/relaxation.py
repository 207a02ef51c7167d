"""``ms.relax``: relaxation as an implicit layer, differentiable without unrolling.

A relaxed structure ``R*(θ, cell)`` is a root of ``F(R, θ, cell) = ∇_R E = 0``, so the
relaxation is wrapped in :func:`mdsens.custom_root` with that ``F`` (``∂₁F`` is the
Hessian: symmetric, and positive definite beyond its zero modes at a minimum). The
relaxation's by-products reach ``F`` and the null space explicitly, through the core's
aux channel (``optimality_takes_aux``): the neighbor list confirmed at ``R*`` and the
null-space basis of the stability analysis. The two primal paths differ only in what
fills that channel:

* **host path** (concrete values; ``jax.grad``, ``jax.jvp``, ``jax.jacfwd`` and
  ``jax.jacrev`` outside ``jit`` included): the host driver
  (:class:`mdsens.md.driver.HostRelaxation`), with neighbor lists confirmed at ``R*``,
  and, when a derivative is taken, the stability analysis of
  :func:`mdsens.md.zero_modes.stability` (saddle → error, rattlers and soft modes →
  null space);
* **traced path** (under ``jax.jit`` / ``jax.vmap``): the pure on-device minimizer of
  :mod:`mdsens.md.minimize` with the same criterion, the dense energy (a neighbor list
  must be built on the host), and the rigid modes as null space.

What is differentiable, w.r.t. every leaf of ``params`` and the input cell (at fixed
fractional coordinates): ``system.positions`` (implicit function theorem, gauge without
net translation, and rotation for clusters), and ``energy``, ``forces``, ``stress``
evaluated at the differentiable ``R*`` (``dE*/dθ = ∂E/∂θ``, the envelope theorem).
``fmax``, ``steps`` and ``converged`` carry no derivative. With ``relax_cell=True`` see
:mod:`mdsens.md.cell_relaxation`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.errors import OptionError, check_policy
from mdsens.implicit import linear_solve
from mdsens.md import cache, minimize, neighbors, zero_modes
from mdsens.md.cell_relaxation import CellRelaxation
from mdsens.md.driver import DEFAULT_FMAX, DEFAULT_MAX_STEPS, HostRelaxation, RelaxResult
from mdsens.md.errors import NotConvergedWarning
from mdsens.md.options import DEFAULT_MINIMIZER, as_minimizer, as_neighbor_list, as_stability
from mdsens.md.strain import energy_forces_stress
from mdsens.md.system import System
from mdsens.md.layer import is_traced, python_scalar, relaxation_root

__all__ = ["relax", "make_relax", "relaxation_condition", "DEFAULT_SOLVE_TOL"]

#: Relative tolerance of the implicit-differentiation CG solve.
DEFAULT_SOLVE_TOL = 1e-10


def relaxation_condition(energy_fn):
    """``F(R, params, cell, neighbor) = ∇_R E``: the optimality condition of a relaxation."""
    return jax.grad(energy_fn)


class RelaxAux(NamedTuple):
    """What the primal relaxation hands to ``F`` and the null space (the aux channel).

    Attributes:
      neighbor: the :class:`~mdsens.md.neighbors.NeighborIndices` of the list confirmed
        at ``R*`` (host path with lists), else ``None``. Only the indices: the channel's
        structure keys the compiled tangent, and a jax-md list's metadata changes with
        every allocation.
      basis: ``(k, N, d)`` null-space basis at ``R*``.
      steps, fmax, converged: the relaxation's diagnostics (arrays).
    """

    neighbor: Any
    basis: jax.Array
    steps: jax.Array
    fmax: jax.Array
    converged: jax.Array


class make_relax:  # noqa: N801  (a function that returns a function, jax-md style)
    """A reusable ``ms.relax`` for systems shaped like ``system``.

    ``relax_fn = ms.make_relax(pot, system, ...)`` takes the layout options of
    :func:`relax`; ``relax_fn(system, params=None, *, fmax=..., max_steps=...,
    stress_tol=None, progress=None)`` behaves exactly like :func:`relax` (differentiable
    in the same ways) and reuses its compiled pieces: a second call with the same layout
    (N, species, pbc) and any positions, cell and parameters does not recompile.
    """

    def __init__(self, pot, system: System, *, relax_cell: bool = False, minimizer=DEFAULT_MINIMIZER,
                 neighbor_list=None, solve=None, stability=True, on_failure: str = "raise"):
        self.pot = pot
        self.template = system
        self.on_failure = check_policy(on_failure)
        self.stability = as_stability(stability)
        self.solve = solve or functools.partial(linear_solve.cg, tol=DEFAULT_SOLVE_TOL)
        self.host = HostRelaxation(pot, system, minimizer=minimizer, relax_cell=relax_cell,
                                   neighbor_list=neighbor_list)
        self.cell = CellRelaxation(self.host, self.solve, self.stability, self.on_failure) if relax_cell else None
        self._roots = {}  # progress → the implicit layer (its compiled tangent lives with it)
        self._evaluate = jax.jit(energy_forces_stress, static_argnums=0)

    def __call__(self, system: System, params=None, *, fmax: float = DEFAULT_FMAX,
                 max_steps: int = DEFAULT_MAX_STEPS, stress_tol: Optional[float] = None,
                 progress: Optional[bool] = None) -> RelaxResult:
        params = self.pot.params if params is None else params
        criteria = dict(fmax=fmax, max_steps=max_steps, stress_tol=stress_tol, progress=progress)
        if self.cell is not None:
            return self.cell(system, params, criteria)
        self.host.check_compatible(system)
        if stress_tol is not None:
            raise OptionError("stress_tol only applies with relax_cell=True.")
        if not is_traced((params, system.positions, system.cell)):
            # Nothing to differentiate: the host relaxation as is.
            return self.host(system, params, **criteria)
        # fmax and max_steps are arguments of the solver, not closed over: under jit they
        # are tracers, and JAX re-traces the solver when it linearizes.
        R, aux = self._relaxed_positions(progress)(system.positions, params, system.cell, fmax, max_steps)
        return self._outputs(system, R, aux, params)

    # -- the implicit layer ---------------------------------------------------------------
    def _relaxed_positions(self, progress):
        if progress not in self._roots:
            self._roots[progress] = self._implicit_layer(progress)
        return self._roots[progress]

    def _implicit_layer(self, progress):
        host, template, stability = self.host, self.template, self.stability
        energy_fn = host.energy_fn
        grad_E = relaxation_condition(energy_fn)

        def F(R, aux, params, cell, fmax, max_steps):
            return grad_E(R, params, cell, aux.neighbor)

        @relaxation_root(F, self.solve, self.on_failure)
        def relaxed_positions(init, params, cell, fmax, max_steps):
            if is_traced((init, params, cell, fmax, max_steps)):
                return self._on_device(init, params, cell, fmax, max_steps, progress)
            start = template.replace(positions=init, cell=cell)
            done = host(start, params, fmax=float(fmax), max_steps=int(max_steps), progress=progress)
            R = done.system.positions
            nb_idx = neighbors.indices_only(done.neighbor)
            if stability is not None:
                basis = zero_modes.stability(energy_fn, R, template.pbc, stability,
                                             args=(params, cell, nb_idx)).basis
            else:
                basis = zero_modes.rigid_modes(R, template.pbc)
            aux = RelaxAux(nb_idx, jnp.asarray(basis), jnp.asarray(done.steps),
                           jnp.asarray(done.fmax), jnp.asarray(done.converged))
            return R, aux

        return relaxed_positions

    def _on_device(self, init, params, cell, fmax, max_steps, progress):
        """The traced path: the pure minimizer, rigid modes as the null space."""
        energy_fn = self._traced_energy_fn()
        if progress:
            raise OptionError("progress=True needs the host loop; it is not available under jit/vmap.")
        out = minimize.minimize(energy_fn, init, params, cell, fmax=fmax, max_steps=max_steps,
                                options=self.host.minimizer)
        basis = zero_modes.rigid_modes(out.positions, self.template.pbc)
        jax.debug.callback(_warn_if_not_converged, fmax, max_steps, out.fmax, out.steps)
        return out.positions, RelaxAux(None, basis, out.steps, out.fmax, out.fmax < fmax)

    def _traced_energy_fn(self):
        """The energy under jit/vmap, where no list can be built (that is host work). An
        automatic choice of lists below ``pot.neighbor_list_min_atoms`` (a sparse cell)
        falls back to all pairs: same energy, affordable at that size."""
        host, n = self.host, self.template.n_atoms
        if not host.use_nl:
            return host.energy_fn
        if host.neighbor_options.enabled is None and n < self.pot.neighbor_list_min_atoms:
            return self._dense_energy_fn
        raise OptionError(
            f"relax() of N={n} atoms uses a neighbor list, whose cutoff must be known on the "
            "host, but the call is traced by jit/vmap. Call relax outside jit/vmap (jax.grad, "
            "jax.jvp and jax.jacfwd of it work), pass neighbor_list=False (dense and exact), or "
            "differentiate with ms.sensitivity(result, pot)."
        )

    @functools.cached_property
    def _dense_energy_fn(self):
        """All pairs, for traced calls of an automatic list choice (built once)."""
        return self.pot.energy_fn(self.template, neighbor_list=False)

    def _outputs(self, system, R, aux, params):
        relaxed = system.replace(positions=R)
        energy_fn = self.host.energy_fn if aux.neighbor is not None else self._traced_energy_fn()
        energy, forces, stress = self._evaluate(energy_fn, R, params, system.cell, aux.neighbor)
        # A jax-md list is not returned with derivatives: only its indices served F.
        return RelaxResult(relaxed, energy, forces, python_scalar(aux.fmax, float), python_scalar(aux.steps, int),
                           python_scalar(aux.converged, bool), stress, None)


def _warn_if_not_converged(target, max_steps, fmax_now, steps):
    fmax_now, target = np.atleast_1d(np.asarray(fmax_now)), np.asarray(target)
    done = fmax_now < target
    if np.all(done):
        return
    which = "" if fmax_now.size == 1 else f" for {int(np.sum(~done))} of {fmax_now.size} structures"
    warnings.warn(
        f"relaxation did not converge{which} in {int(np.max(steps))} steps (max_steps={int(np.max(max_steps))}): "
        f"fmax = {float(np.max(fmax_now)):.3g} (target {float(np.min(target)):.3g}); its derivatives are "
        "only as accurate as the relaxation (Theorem 1). Raise max_steps or loosen fmax.",
        NotConvergedWarning,
        stacklevel=2,
    )


def relax(system: System, pot, *, params=None, fmax: float = DEFAULT_FMAX, max_steps: int = DEFAULT_MAX_STEPS,
          relax_cell: bool = False, stress_tol: Optional[float] = None, progress: Optional[bool] = None,
          minimizer=DEFAULT_MINIMIZER, neighbor_list=None, solve=None, stability=True, on_failure: str = "raise"
          ) -> RelaxResult:
    """Relax ``system`` under ``pot``; differentiable w.r.t. ``params`` and ``system.cell``.

    Args:
      system: the start structure.
      pot: a potential (:mod:`mdsens.md.potentials`).
      params: parameter pytree (default ``pot.params``).
      fmax: force criterion, ASE's ``max_i |F_i| < fmax`` (eV/Å, or reduced units).
      max_steps: iteration budget; reaching it returns ``converged=False`` and warns
        (:class:`~mdsens.NotConvergedWarning`).
      relax_cell: also relax the cell to zero stress (periodic systems).
      stress_tol: stress criterion ``max |σ_ab| < stress_tol`` (eV/Å³; eV/Å² in 2D) with
        ``relax_cell``; default ``fmax · cell_factor / V`` (ASE ``UnitCellFilter``'s).
      progress: show a progress bar; default: when stderr is a terminal.
      minimizer: ``"lbfgs"`` / :class:`~mdsens.LBFGS` (default), ``"fire"`` /
        :class:`~mdsens.FIRE` or ``"gradient_descent"`` / :class:`~mdsens.GradientDescent`,
        with their options.
      neighbor_list: ``None`` (automatic: ``N >= pot.neighbor_list_min_atoms``), ``True``,
        ``False``, or :class:`~mdsens.NeighborListOptions`.
      solve: linear solver of the implicit derivative (default CG, relative tolerance
        1e-10; the Hessian deflated by its zero modes is positive definite at a minimum).
      stability: when differentiating, check the Hessian at ``R*`` (``True``, or
        :class:`~mdsens.StabilityOptions`): saddle → error, soft modes → null space,
        near-singular → warning. ``False``: rigid modes only. Skipped under jit/vmap.
      on_failure: a failed check of the implicit derivative (linear solve, root, null
        space): ``"raise"`` (default), ``"warn"`` or ``"ignore"``.

    Returns:
      :class:`~mdsens.md.driver.RelaxResult`: ``system, energy (eV), forces (N, d) eV/Å,
      fmax, steps, converged, stress`` (ASE Voigt, eV/Å³), ``neighbor``.

    Raises:
      RelaxError: NaN/inf energies or forces, or invalid criteria.
      PotentialError: unknown species, a cutoff too long for the cell, invalid parameters.
      SaddlePointError: (differentiating, with ``stability``) the result is a saddle.
      OptionError: invalid options; a neighbor-list system under ``jit``/``vmap`` (pass
        ``neighbor_list=False``, dense and exact).
      NotImplementedError: derivatives through ``relax_cell=True`` under jit/vmap.
    """
    key = ("relax", pot.cache_key(), cache.layout_key(system), bool(relax_cell), as_minimizer(minimizer),
           as_neighbor_list(neighbor_list), cache.hashable(solve), cache.hashable(stability), on_failure)
    fn = cache.memoized(key, lambda: make_relax(pot, system, relax_cell=relax_cell, minimizer=minimizer,
                                                neighbor_list=neighbor_list, solve=solve, stability=stability,
                                                on_failure=on_failure))
    params = pot.params if params is None else params
    return fn(system, params, fmax=fmax, max_steps=max_steps, stress_tol=stress_tol, progress=progress)
