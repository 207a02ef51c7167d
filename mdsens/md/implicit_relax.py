"""Relaxation as an implicit layer: derivatives of relaxed structures without unrolling.

A relaxed structure ``R*(θ, cell)`` is a root of the stationarity condition

    F(R, θ, cell) = ∇_R E(R, θ, cell) = 0,

so :func:`relax` wraps the relaxation loop in :func:`mdsens.custom_root` with that ``F``.
``∂₁F`` is the Hessian: symmetric, positive semi-definite at a minimum, singular along
rigid translations (and rotations of a free cluster). Those modes are declared through
``nullspace=``, which fixes the **gauge**: derivatives of positions have no net
translation, and for clusters no net rotation about the centroid. When the relaxed
positions are concrete (no ``jit``/``vmap`` around the call), the Hessian's spectrum is
also checked (:func:`mdsens.md.zero_modes.stability`): a saddle point raises
:class:`~mdsens.md.zero_modes.SaddlePointError`, soft modes such as rattlers join the
null space, and a near-singular Hessian warns.

What is differentiable (forward and reverse mode, w.r.t. every leaf of ``params`` and
w.r.t. the cell of the input structure, at fixed fractional coordinates):

* ``result.system.positions`` — through the implicit function theorem;
* ``result.energy``, ``result.forces``, ``result.stress`` — evaluated at the
  differentiable ``R*``, so ``dE*/dθ`` equals the partial ``∂E/∂θ`` (envelope theorem).

``fmax``, ``steps`` and ``converged`` describe the relaxation and carry no derivative.
Under ``jax.jit`` or ``jax.vmap`` the host loop cannot run; the pure on-device FIRE
(:func:`mdsens.md.relax.fire_minimize`) is used instead, with the same criterion, and
those three fields are then arrays.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.implicit import custom_root, linear_solve
from mdsens.md import neighbors as _nb
from mdsens.md import relax as _relax
from mdsens.md import zero_modes as _zm
from mdsens.md.potentials.base import energy_forces_stress
from mdsens.md.system import System

__all__ = ["relax", "relaxation_condition", "rigid_null_space"]

#: Relative tolerance of the implicit-differentiation CG solve.
DEFAULT_SOLVE_TOL = 1e-10


def relaxation_condition(energy_fn):
    """``F(R, params, cell, neighbor) = ∇_R E``: the optimality condition of a relaxation.

    With a neighbor list, ``neighbor`` must be valid at ``R``; :func:`relax` passes a
    list allocated at the start and updated to ``R`` inside ``F``.
    """
    return jax.grad(energy_fn)


def rigid_null_space(positions, pbc: bool):
    """Rigid-body zero modes as a ``(k, N, d)`` array (jax, traceable; not orthonormal).

    ``d`` translations; for a free cluster also rotations about the centroid (3 in 3D,
    1 in 2D). :func:`mdsens.custom_root` orthonormalizes them.
    """
    n, d = positions.shape
    modes = [jnp.broadcast_to(jnp.eye(d, dtype=positions.dtype)[a], (n, d)) for a in range(d)]
    if not pbc:
        X = positions - positions.mean(axis=0)
        if d == 2:
            modes.append(jnp.stack([-X[:, 1], X[:, 0]], axis=1))
        else:
            modes.extend(jnp.cross(jnp.eye(3, dtype=X.dtype)[a], X) for a in range(3))
    return jnp.stack(modes)


def _is_traced(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def relax(system: System, pot, *, params=None, fmax: float = _relax.DEFAULT_FMAX,
          max_steps: int = _relax.DEFAULT_MAX_STEPS, method: str = "fire", relax_cell: bool = False,
          solve=None, check_stability: bool = True, **options) -> "_relax.RelaxResult":
    """Relax ``system`` under ``pot``; differentiable w.r.t. ``params`` and ``system.cell``.

    Same arguments and result as :func:`mdsens.md.relax.relax` (FIRE or gradient
    descent, ASE's force criterion, progress, ``converged=False`` plus a warning when
    ``max_steps`` runs out), plus:

    Args:
      solve: linear solver for the implicit derivative (default CG, relative tolerance
        1e-10). The Hessian deflated by its zero modes is positive definite at a
        minimum, so CG applies.
      check_stability: check the Hessian spectrum at the relaxed structure when
        differentiating (saddle → error, soft modes → null space, near-singular →
        warning). Needs concrete values; skipped under ``jit``/``vmap``.

    The derivative is the implicit one, ``dR*/dθ = −H⁺ ∂²E/∂R∂θ`` in the gauge without
    net translation (and rotation for clusters): see the module docstring.

    Raises:
      NotImplementedError: derivatives through ``relax_cell=True`` (relax the cell
        first, then differentiate a fixed-cell relaxation from it: the cell is then an
        input, and strain derivatives come from ``ms.elastic_constants``).
      ValueError: a neighbor-list-sized system (``N >= NEIGHBOR_LIST_MIN_ATOMS``) whose
        parameters are traced by ``jit``/``vmap``: the list's cutoff must be known on the
        host. Pass ``neighbor_list=False`` (dense, exact) or use ``ms.sensitivity``.
    """
    params = pot.params if params is None else params
    if relax_cell:
        if _is_traced((params, system.positions, system.cell)):
            raise NotImplementedError(
                "derivatives through relax(relax_cell=True) are not supported: relax the cell "
                "first, then differentiate relax(..., relax_cell=False) started from the relaxed "
                "structure (its cell is then an input), or use ms.elastic_constants for strain "
                "response."
            )
        return _relax.relax(system, pot, params=params, fmax=fmax, max_steps=max_steps,
                            method=method, relax_cell=True, **options)

    # Only a call being differentiated pays for the Hessian eigen-analysis.
    differentiating = _is_traced((params, system.positions, system.cell))
    neighbor_list = options.pop("neighbor_list", None)
    # Options of the call, not of the compiled relaxation that make_relax builds.
    progress = options.pop("progress", None)
    if options.pop("stress_tol", None) is not None:
        raise ValueError("stress_tol only applies with relax_cell=True.")
    use_nl = _nb.use_neighbor_list(system.n_atoms) if neighbor_list is None else bool(neighbor_list)
    cell = system.cell
    energy_fn = pot.energy_fn(system, neighbor_list=use_nl,
                              params=None if _is_traced(params) else params)
    grad_E = relaxation_condition(energy_fn)
    host_results = []

    if use_nl:
        if _is_traced((params, cell)):
            raise ValueError(
                f"relax() of N={system.n_atoms} atoms uses a neighbor list, whose cutoff must "
                "be known on the host, but the parameters or cell are traced by jit/vmap. "
                "Pass neighbor_list=False (dense and exact), call relax outside jit/vmap, or "
                "differentiate with ms.sensitivity(result, pot)."
            )
        nl = pot.neighbor_list_fn(system, params, **options.get("neighbor_options", None) or {})
        seed = nl.allocate(system.positions, cell, extra_capacity=8)

        def F(R, params, cell, seed):
            return grad_E(R, params, cell, nl.update(R, seed, cell))
    else:
        nl, seed = None, None

        def F(R, params, cell, seed):
            return grad_E(R, params, cell, None)

    host_relax = _relax.make_relax(pot, system, method=method, neighbor_list=use_nl, **options)

    stable_bases = []

    def null_space(R, params, cell, seed):
        # The basis found by the host eigen-analysis of the primal solve, if there was
        # one; the rigid modes otherwise (under jit/vmap).
        return stable_bases[-1] if stable_bases else rigid_null_space(R, system.pbc)

    def analyse_stability(R, params, cell):
        # Runs in the primal (eager) solve: reverse mode stages everything inside the
        # JVP rule, where a host eigen-analysis could not see concrete numbers.
        neighbor = None if nl is None else nl.allocate(R, cell)
        energy = lambda r: energy_fn(r, params, cell, neighbor)  # noqa: E731
        stable_bases.append(np.asarray(_zm.null_space(energy, R, system.pbc)))

    linear = solve or functools.partial(linear_solve.cg, tol=DEFAULT_SOLVE_TOL)

    @custom_root(F, solve=linear, nullspace=null_space, symmetric=True, has_aux=True)
    def relaxed_positions(init, params, cell, seed):
        if _is_traced((init, params, cell)):
            minimize = _relax.fire_minimize if method == "fire" else _relax.gradient_descent_minimize
            kwargs = {} if nl is None else dict(neighbor=seed, neighbor_update=nl.update)
            out = minimize(energy_fn, init, params, cell, fmax=fmax, max_steps=max_steps, **kwargs)
            return out.positions, (out.steps, out.fmax)
        start = system.replace(positions=init) if cell is None else system.replace(positions=init, cell=cell)
        result = host_relax(start, params, fmax=fmax, max_steps=max_steps, progress=progress)
        host_results.append(result)
        if check_stability and differentiating:
            analyse_stability(result.system.positions, params, cell)
        return result.system.positions, (jnp.asarray(result.steps), jnp.asarray(result.fmax))

    R, (steps, fmax_now) = relaxed_positions(system.positions, params, cell, seed)

    relaxed = system.replace(positions=R) if cell is None else system.replace(positions=R, cell=cell)
    neighbor = None if nl is None else nl.update(R, seed, cell)
    if nl is not None and not _is_traced(R) and neighbor.needs_reallocation():
        neighbor = nl.allocate(jax.lax.stop_gradient(R), cell)
    energy, forces, stress = energy_forces_stress(energy_fn, R, params, cell, neighbor)
    if host_results:
        host = host_results[-1]
        return _relax.RelaxResult(relaxed, energy, forces, host.fmax, host.steps, host.converged, stress)
    converged = fmax_now < fmax
    jax.debug.callback(functools.partial(_warn_if_not_converged, fmax, max_steps), fmax_now, steps)
    return _relax.RelaxResult(relaxed, energy, forces, fmax_now, steps, converged, stress)


def _warn_if_not_converged(target, max_steps, fmax_now, steps):
    fmax_now = np.atleast_1d(np.asarray(fmax_now))
    if np.all(fmax_now < target):
        return
    warnings.warn(
        f"relaxation did not converge in {int(np.max(steps))} steps (max_steps={max_steps}): "
        f"fmax = {float(np.max(fmax_now)):.3g} (target {target:.3g}); its derivatives are "
        "only as accurate as the relaxation (Theorem 1). Raise max_steps or loosen fmax.",
        _relax.NotConvergedWarning,
        stacklevel=2,
    )
