"""Relaxation to a local energy minimum: jax-md FIRE or the gradient-descent fixed point.

Two layers:

* **Pure, on-device minimizers** — :func:`fire_minimize` and
  :func:`gradient_descent_minimize` — take the potential's pure energy function
  ``E(positions, params, cell, neighbor=None)`` and return a :class:`MinimizeResult`.
  They are jit- and vmap-compatible (``params`` may be traced; ``fmax`` and
  ``max_steps`` may be traced too), keep ``params`` an explicit argument (never closed
  over), and are what implicit differentiation wraps (``custom_root`` with
  F = ∇ₓE = 0, or ``custom_fixed_point`` with :func:`gradient_descent_map`). With a
  neighbor list they need ``neighbor`` and a pure ``neighbor_update``; overflow checking
  is the caller's job (the host loop below does it).
* **The host loop** — :func:`relax` (and :func:`make_relax`, which compiles once and can
  be called again) — runs the same minimizers in jitted chunks of ``chunk_size`` steps
  (a ``lax.while_loop`` that exits as soon as the criterion holds), and between chunks
  checks neighbor-list overflow (the chunk is discarded and re-run with a bigger list,
  never truncated), shows progress, and finally **confirms convergence with a freshly
  built neighbor list**.

Convergence criterion (ASE's): ``max_i |F_i| < fmax``, the largest per-atom force norm,
in the potential's force unit (eV/Å; reduced units for reduced-unit potentials). With
``relax_cell=True`` also ``max_ab |σ_ab| < stress_tol``.

Conventions:

* Units: positions and cells in Å, energies in eV, forces in eV/Å, stress in eV/Å³
  (eV/Å² in 2D), or the reduced units of a reduced-unit potential.
* Stress: ASE's sign and Voigt order, ``σ = (1/V) ∂E/∂ε`` at fixed fractional
  coordinates (positive = tensile: the cell wants to shrink). jax-md's stress is −σ.
* Periodic positions are wrapped into the cell by every step (the shift is
  ``wrap(x + dx)``); energies are unaffected.
* FIRE runs jax-md's ``minimize.fire_descent`` with one scalar mass equal to the largest
  Hessian eigenvalue (estimated by power iteration on Hessian-vector products at the
  start), so the stiffest mode has unit angular frequency and ``dt_start``/``dt_max``
  are dimensionless (velocity Verlet is stable for dt < 2). Each step's displacement is
  scaled down so no atom moves more than ``maxstep`` (as ASE's FIRE does).
* Gradient descent is the fixed-point map ``T(x) = x − η ∇E(x)`` with ``η = 1/λ_max``
  (same estimate) unless ``step_size`` is given; it converges linearly, at a rate set by
  the condition number, so it is for checking and for ``custom_fixed_point``, not speed.
* ``relax_cell=True`` minimizes over (positions, deformation) jointly: the FIRE/GD
  variable is ``X = [S; q]``, an ``(N + d, d)`` array with reference positions ``S`` and
  ``q = c (F - I)``, where ``F`` is the deformation gradient (rows: ``R = S F``,
  ``cell = cell₀ F``) and ``c = cell_factor`` (default N, like ASE's ``UnitCellFilter``).
  The cell "force" is ``-∂E/∂q``, whose symmetric part at ``F = I`` is ``-V σ / c``. The
  cell is zero-pressure relaxed; the final cell has its rigid rotation removed (polar
  decomposition), which leaves the energy unchanged.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax_md import minimize

from mdsens.md import neighbors as _nb
from mdsens.md.potentials.base import energy_forces_stress
from mdsens.md.system import System

__all__ = [
    "relax",
    "make_relax",
    "RelaxResult",
    "MinimizeResult",
    "fire_minimize",
    "gradient_descent_minimize",
    "gradient_descent_map",
    "max_curvature",
    "RelaxError",
    "NotConvergedWarning",
]

#: Default force criterion (force units: eV/Å, or reduced).
DEFAULT_FMAX = 1e-6
#: Default step budget.
DEFAULT_MAX_STEPS = 20_000
#: Steps per jitted chunk between host checks.
DEFAULT_CHUNK_SIZE = 250
#: Largest displacement of any atom in one FIRE step (length units), ASE's default.
DEFAULT_MAXSTEP = 0.2
#: Power-iteration steps for the stiffest curvature (a 10-20 % estimate is enough).
POWER_ITERATIONS = 20


class RelaxError(RuntimeError):
    """A relaxation that cannot go on (NaN energies/forces, unusable options)."""


class NotConvergedWarning(RuntimeWarning):
    """``relax`` reached ``max_steps`` before the force (and stress) criterion held."""


class MinimizeResult(NamedTuple):
    """Output of the pure minimizers (all jax arrays; a pytree).

    Attributes:
      positions: ``(N, d)`` final Cartesian positions (wrapped into the cell if periodic).
      steps: int32 scalar, iterations taken (0 if the input already satisfied ``fmax``).
      fmax: float64 scalar, ``max_i |F_i|`` at ``positions`` as seen by the loop (with
        the neighbor list it carried). NaN if the energy became NaN.
      neighbor: the neighbor list after the last update (``None`` on the dense path);
        check its overflow flag on the host before trusting the result.
    """

    positions: jax.Array
    steps: jax.Array
    fmax: jax.Array
    neighbor: Any = None


class RelaxResult(NamedTuple):
    """Result of :func:`relax` (a pytree).

    Attributes:
      system: the relaxed :class:`System` (positions wrapped into the cell; with
        ``relax_cell=True`` also the relaxed cell).
      energy: potential energy, float64 scalar (eV).
      forces: ``(N, d)`` forces ``-∂E/∂R`` (eV/Å), from a freshly built neighbor list.
      fmax: ``max_i |forces_i|`` (eV/Å), float.
      steps: iterations taken, int.
      converged: ``fmax < fmax`` criterion (and the stress criterion with
        ``relax_cell``) confirmed with a fresh neighbor list, bool. Never True otherwise.
      stress: Voigt stress in ASE's convention (xx, yy, zz, yz, xz, xy) in eV/Å³
        ((xx, yy, xy), eV/Å², in 2D) for periodic systems, else ``None``.
      neighbor: the neighbor list freshly built at the relaxed structure
        (:class:`mdsens.md.neighbors.Neighbors`), ``None`` on the dense path.
        ``ms.sensitivity``, ``ms.observable_gradient`` and ``ms.elastic_constants``
        reuse it when it covers the potential's range, instead of building another.
    """

    system: System
    energy: jax.Array
    forces: jax.Array
    fmax: float
    steps: int
    converged: bool
    stress: Optional[jax.Array] = None
    neighbor: Any = None


# ------------------------------------------------------------------ problem definitions
class _Problem(NamedTuple):
    """A minimization variable ``X`` and how it maps to atoms (all pure functions).

    energy(X, params, cell, neighbor) -> scalar; physical(X, cell) -> (R, cell_now);
    residuals(X, grad, cell) -> (fmax, smax); shift(X, dX, cell, maxstep) -> X'.
    """

    energy: Callable
    physical: Callable
    residuals: Callable
    shift: Callable


def _wrap(positions, cell):
    """Wrap Cartesian ``positions`` into ``cell`` (rows are lattice vectors)."""
    frac = jnp.linalg.solve(cell.T, positions.T).T
    return (frac - jnp.floor(frac)) @ cell


def _max_norm(v):
    """``max_i |v_i|`` over rows; 0 for an empty array."""
    return jnp.sqrt(jnp.max(jnp.sum(v * v, axis=-1), initial=0.0))


def _limit(dX, maxstep):
    """Scale ``dX`` so that no row moves more than ``maxstep`` (direction kept)."""
    if maxstep is None:
        return dX
    largest = _max_norm(dX)
    return dX * jnp.minimum(1.0, maxstep / jnp.maximum(largest, 1e-300))


def _positions_problem(energy_fn, periodic: bool) -> _Problem:
    def energy(X, params, cell, neighbor):
        return energy_fn(X, params, cell, neighbor)

    def physical(X, cell):
        return X, cell

    def residuals(X, grad, cell):
        return _max_norm(grad), jnp.zeros((), grad.dtype)

    def shift(X, dX, cell, maxstep):
        X = X + _limit(dX, maxstep)
        return _wrap(X, cell) if periodic else X

    return _Problem(energy, physical, residuals, shift)


def _cell_problem(energy_fn, n: int, dim: int, cell_factor) -> _Problem:
    """Joint (positions, deformation) variable; see the module docstring."""
    eye = jnp.eye(dim, dtype=jnp.float64)

    def deformation(X):
        return eye + X[n:] / cell_factor

    def physical(X, cell_ref):
        F = deformation(X)
        return X[:n] @ F, cell_ref @ F

    def energy(X, params, cell_ref, neighbor):
        R, cell = physical(X, cell_ref)
        return energy_fn(R, params, cell, neighbor)

    def residuals(X, grad, cell_ref):
        F = deformation(X)
        # dU/dS = ∇_R E Fᵀ  and  dU/dq = (1/c) ∂E/∂F;  σ = Fᵀ ∂E/∂F / V.
        grad_r = jnp.linalg.solve(F, grad[:n].T).T
        volume = jnp.abs(jnp.linalg.det(cell_ref @ F))
        sigma = F.T @ grad[n:] * cell_factor / volume
        return _max_norm(grad_r), jnp.max(jnp.abs(sigma))

    def shift(X, dX, cell_ref, maxstep):
        X = X + _limit(dX, maxstep)
        return X.at[:n].set(_wrap(X[:n], cell_ref))

    return _Problem(energy, physical, residuals, shift)


# ------------------------------------------------------------------------ curvature
def max_curvature(
    energy_fn, positions, params, cell=None, neighbor=None, iterations=POWER_ITERATIONS, h=1e-4
):
    """Estimate the largest |eigenvalue| of the Hessian ∂²E/∂R² (energy/length²).

    Power iteration on finite-difference Hessian-vector products
    ``(∇E(x + h v) − ∇E(x)) / h`` (``h`` in length units, ``|v| = 1``) from a fixed
    pseudo-random start; pure and jit/vmap-compatible. Only a step-size scale is needed
    (10-20 % is plenty), and first derivatives compile much faster than exact
    Hessian-vector products. The estimate approaches ``|λ|_max`` from below.
    """
    grad = jax.grad(energy_fn)
    g0 = grad(positions, params, cell, neighbor)

    def hvp(v):
        return (grad(positions + h * v, params, cell, neighbor) - g0) / h

    v = jax.random.normal(jax.random.PRNGKey(0), positions.shape, positions.dtype)
    v = v / jnp.linalg.norm(v)

    def body(_, carry):
        v, _ = carry
        w = hvp(v)
        norm = jnp.linalg.norm(w)
        return jnp.where(norm > 0, w / jnp.maximum(norm, 1e-300), v), norm

    _, lam = lax.fori_loop(0, iterations, body, (v, jnp.zeros((), positions.dtype)))
    # A structure with no interactions has zero curvature; any positive scale then works.
    return jnp.where((lam > 0) & jnp.isfinite(lam), lam, 1.0)


# ------------------------------------------------------------------------- minimizers
class _Carry(NamedTuple):
    state: Any  # FIRE state, or (X, grad) for gradient descent
    neighbor: Any
    step: jax.Array
    fmax: jax.Array
    smax: jax.Array


def _not_done(carry, tol_f, tol_s, n_target):
    converged = (carry.fmax < tol_f) & (carry.smax < tol_s)
    finite = jnp.isfinite(carry.fmax) & jnp.isfinite(carry.smax)
    return (carry.step < n_target) & ~converged & finite


def _stable_metadata(neighbor, cell_list_fns: dict):
    """The same list with jax-md's static metadata made cache-friendly.

    Jitted functions taking a jax-md ``NeighborList`` key their compilation cache on its
    static fields. Two of them defeat the cache: ``cell_size``, a 0-d array (compared by
    value, and a failure if a tracer ever lands there), and ``cell_list_fn``, a fresh
    closure from every allocation (compared by identity), so each reallocation would
    recompile the relaxation loop. Here ``cell_size`` becomes a float and
    ``cell_list_fn`` is shared between allocations with the same box and cell size
    (it depends on nothing else), through the caller-owned ``cell_list_fns`` dict.
    """
    import dataclasses as _dc

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
    return type(neighbor)(_dc.replace(nbrs, **changes), neighbor.reference_box, neighbor.cutoff)


def _fire(problem: _Problem, neighbor_update, *, dt_start, dt_max, maxstep, **fire_kwargs):
    """``(init, run, position_of)`` for FIRE on ``problem`` (pure functions)."""

    def U(X, params=None, cell=None, neighbor=None):
        return problem.energy(X, params, cell, neighbor)

    def shift(X, dX, params=None, cell=None, neighbor=None, **_):
        return problem.shift(X, dX, cell, maxstep)

    fire_init, fire_apply = minimize.fire_descent(U, shift, dt_start=dt_start, dt_max=dt_max, **fire_kwargs)

    def init(X, params, cell, neighbor, mass=None):
        if mass is None:
            mass = max_curvature(U, X, params, cell, neighbor)
        state = fire_init(
            X, mass=jnp.asarray(mass, jnp.float64), params=params, cell=cell, neighbor=_nb.indices_only(neighbor)
        )
        fmax, smax = problem.residuals(X, -state.force, cell)
        return _Carry(state, neighbor, jnp.zeros((), jnp.int32), fmax, smax)

    def run(carry, params, cell, tol_f, tol_s, n_target):
        def body(c):
            nb = c.neighbor
            if nb is not None:
                X_now, cell_now = problem.physical(c.state.position, cell)
                nb = neighbor_update(X_now, nb, cell_now)
            state = fire_apply(c.state, params=params, cell=cell, neighbor=_nb.indices_only(nb))
            fmax, smax = problem.residuals(state.position, -state.force, cell)
            return _Carry(state, nb, c.step + 1, fmax, smax)

        return lax.while_loop(lambda c: _not_done(c, tol_f, tol_s, n_target), body, carry)

    return init, run, lambda carry: carry.state.position


def _gradient_descent(problem: _Problem, neighbor_update):
    """``(init, run, position_of)`` for ``X ← wrap(X − η ∇U(X))`` (pure functions)."""
    grad_U = jax.grad(problem.energy)

    def init(X, params, cell, neighbor, step_size=None):
        if step_size is None:
            step_size = 1.0 / max_curvature(problem.energy, X, params, cell, neighbor)
        g = grad_U(X, params, cell, neighbor)
        fmax, smax = problem.residuals(X, g, cell)
        state = (X, g, jnp.asarray(step_size, jnp.float64))
        return _Carry(state, neighbor, jnp.zeros((), jnp.int32), fmax, smax)

    def run(carry, params, cell, tol_f, tol_s, n_target):
        def body(c):
            X, g, eta = c.state
            X = problem.shift(X, -eta * g, cell, None)
            nb = c.neighbor
            if nb is not None:
                X_now, cell_now = problem.physical(X, cell)
                nb = neighbor_update(X_now, nb, cell_now)
            g = grad_U(X, params, cell, nb)
            fmax, smax = problem.residuals(X, g, cell)
            return _Carry((X, g, eta), nb, c.step + 1, fmax, smax)

        return lax.while_loop(lambda c: _not_done(c, tol_f, tol_s, n_target), body, carry)

    return init, run, lambda carry: carry.state[0]


def _check_neighbor_args(neighbor, neighbor_update):
    if (neighbor is None) != (neighbor_update is None):
        raise RelaxError(
            "pass both neighbor= and neighbor_update= (e.g. nl.update from "
            "pot.neighbor_list_fn(system, params)), or neither for the dense path."
        )


def fire_minimize(
    energy_fn: Callable,
    positions,
    params,
    cell=None,
    *,
    fmax=DEFAULT_FMAX,
    max_steps=DEFAULT_MAX_STEPS,
    neighbor=None,
    neighbor_update: Optional[Callable] = None,
    dt_start: float = 0.1,
    dt_max: float = 1.0,
    maxstep: Optional[float] = DEFAULT_MAXSTEP,
    mass=None,
) -> MinimizeResult:
    """Minimize ``energy_fn`` over positions with jax-md FIRE until ``max_i |F_i| < fmax``.

    Pure and jit/vmap-compatible; ``params``, ``cell``, ``fmax`` and ``max_steps`` may be
    traced. Not differentiable by itself (wrap it with ``custom_root``).

    Args:
      energy_fn: ``E(positions (N, d), params, cell, neighbor) -> scalar`` (e.g.
        ``pot.energy_fn(system)``).
      positions: ``(N, d)`` Cartesian start (Å).
      params: parameter pytree passed to ``energy_fn`` (e.g. ``pot.params``).
      cell: ``(d, d)`` lattice rows (periodic; positions are wrapped) or ``None`` (free).
      fmax: force criterion (eV/Å), strict ``<`` as in ASE.
      max_steps: iteration budget.
      neighbor, neighbor_update: a neighbor list and a pure ``update(positions,
        neighbor, cell)`` (e.g. ``nl.update``), both or neither. The loop updates the
        list before each step; the caller must check ``result.neighbor`` for overflow.
      dt_start, dt_max: FIRE time steps in units of ``1/ω_max`` (see module docstring).
      maxstep: largest per-atom displacement per step (Å); ``None`` for no limit.
      mass: FIRE mass (energy/length²); default: the estimated largest Hessian
        eigenvalue (:func:`max_curvature`).

    Returns:
      :class:`MinimizeResult` (positions, steps, fmax, neighbor). ``fmax`` is NaN if
      the energy became NaN (the loop stops there).
    """
    _check_neighbor_args(neighbor, neighbor_update)
    problem = _positions_problem(energy_fn, periodic=cell is not None)
    init, run, position_of = _fire(problem, neighbor_update, dt_start=dt_start, dt_max=dt_max, maxstep=maxstep)
    carry = init(jnp.asarray(positions, jnp.float64), params, cell, neighbor, mass)
    carry = run(carry, params, cell, fmax, jnp.inf, max_steps)
    return MinimizeResult(position_of(carry), carry.step, carry.fmax, carry.neighbor)


def gradient_descent_minimize(
    energy_fn: Callable,
    positions,
    params,
    cell=None,
    *,
    fmax=DEFAULT_FMAX,
    max_steps=DEFAULT_MAX_STEPS,
    step_size=None,
    neighbor=None,
    neighbor_update: Optional[Callable] = None,
) -> MinimizeResult:
    """Iterate ``T(x) = x − η ∇E(x)`` (wrapped into the cell) until ``max_i |F_i| < fmax``.

    Same contract as :func:`fire_minimize`. ``step_size`` η (length²/energy) defaults to
    ``1 / λ_max`` with λ_max the estimated largest Hessian eigenvalue at the start.
    """
    _check_neighbor_args(neighbor, neighbor_update)
    problem = _positions_problem(energy_fn, periodic=cell is not None)
    init, run, position_of = _gradient_descent(problem, neighbor_update)
    carry = init(jnp.asarray(positions, jnp.float64), params, cell, neighbor, step_size)
    carry = run(carry, params, cell, fmax, jnp.inf, max_steps)
    return MinimizeResult(position_of(carry), carry.step, carry.fmax, carry.neighbor)


def gradient_descent_map(energy_fn: Callable, step_size) -> Callable:
    """The fixed-point map ``T(x, params, cell, neighbor=None) = x − η ∇ₓE(x, params, cell)``.

    No wrapping, so ``T`` is smooth (for ``custom_fixed_point``); a relaxed structure
    ``x*`` satisfies ``T(x*) = x*`` exactly when ``∇E(x*) = 0``.
    """
    grad = jax.grad(energy_fn)

    def T(x, params, cell=None, neighbor=None):
        return x - step_size * grad(x, params, cell, neighbor)

    return T


# ------------------------------------------------------------------------- host loop
class make_relax:  # noqa: N801  (a function that returns a function, jax-md style)
    """Build a reusable, compiled relaxation for systems shaped like ``system``.

    ``relax_fn = make_relax(pot, system, ...)``; ``relax_fn(system, params=None,
    fmax=..., max_steps=..., stress_tol=None, progress=None) -> RelaxResult``.

    Calling ``relax_fn`` again (same species layout; any positions, cell and params)
    reuses the compiled chunks, so only the first call pays the compile time. The
    options are those of :func:`relax`.
    """

    def __init__(
        self,
        pot,
        system: System,
        *,
        method: str = "fire",
        relax_cell: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        neighbor_list: Optional[bool] = None,
        cell_factor: Optional[float] = None,
        maxstep: Optional[float] = DEFAULT_MAXSTEP,
        dt_start: float = 0.1,
        dt_max: float = 1.0,
        step_size: Optional[float] = None,
        neighbor_options: Optional[dict] = None,
    ):

        if method not in ("fire", "gradient_descent"):
            raise RelaxError(f"unknown method {method!r}; use 'fire' or 'gradient_descent'.")
        if relax_cell and not system.pbc:
            raise RelaxError("relax_cell=True needs a periodic system; this one is free (pbc=False).")
        if int(chunk_size) < 1:
            raise RelaxError(f"chunk_size must be a positive integer; got {chunk_size}.")
        self.pot = pot
        self.template = system
        self.method = method
        self.relax_cell = bool(relax_cell)
        self.chunk_size = int(chunk_size)
        # The potential's own switch (Tersoff: 128 atoms, its dense path is O(N³)).
        min_atoms = getattr(pot, "neighbor_list_min_atoms", _nb.NEIGHBOR_LIST_MIN_ATOMS)
        self.use_nl = _nb.use_neighbor_list(system.n_atoms, min_atoms) if neighbor_list is None else bool(neighbor_list)
        self.cell_factor = float(system.n_atoms if cell_factor is None else cell_factor)
        self.options = dict(maxstep=maxstep, dt_start=dt_start, dt_max=dt_max, step_size=step_size)
        self.energy_fn = pot.energy_fn(system, neighbor_list=self.use_nl)
        if self.relax_cell:
            self.problem = _cell_problem(self.energy_fn, system.n_atoms, system.dim, self.cell_factor)
        else:
            self.problem = _positions_problem(self.energy_fn, periodic=system.pbc)
        self.neighbor_options = dict(neighbor_options or {})
        #: Diagnostics: neighbor lists reallocated after an overflow (all calls).
        self.reallocations = 0
        self._nl = None
        self._compiled = None
        self._cell_list_fns = {}
        self._evaluate = jax.jit(self._evaluate_impl)

    # -- compiled pieces (rebuilt only when a new neighbor-list function is needed) ------
    def _compile(self, nl):
        update = None if nl is None else nl.update
        if self.method == "fire":
            o = self.options
            init, run, position_of = _fire(
                self.problem, update, dt_start=o["dt_start"], dt_max=o["dt_max"], maxstep=o["maxstep"]
            )
            init_j = jax.jit(lambda X, p, c, nb: init(X, p, c, nb, None))
        else:
            init, run, position_of = _gradient_descent(self.problem, update)
            step = self.options["step_size"]
            init_j = jax.jit(lambda X, p, c, nb: init(X, p, c, nb, step))
        self._nl = nl
        self._compiled = (init_j, jax.jit(run), position_of)

    def _evaluate_impl(self, R, params, cell, neighbor):
        """Energy, forces and (periodic) Voigt stress at physical (R, cell), one gradient."""
        return energy_forces_stress(self.energy_fn, R, params, cell, neighbor)

    # -- host orchestration -------------------------------------------------------------
    def _check_compatible(self, system):
        t = self.template
        if (
            system.n_atoms != t.n_atoms
            or system.dim != t.dim
            or system.pbc != t.pbc
            or system.symbols != t.symbols
            or not np.array_equal(np.asarray(system.species), np.asarray(t.species))
        ):
            raise RelaxError(
                f"this relax function was built for {t!r} with its species order; got "
                f"{system!r}. Build a new one with make_relax(pot, system)."
            )

    def _neighbors(self, system, params):
        """Neighbor-list function covering ``params`` (reused if it still covers them)."""
        if not self.use_nl:
            return None
        cutoff = float(self.pot.cutoff(params))
        nl = self._nl
        if nl is None or nl.cutoff < cutoff:
            nl = self.pot.neighbor_list_fn(system, params, **self.neighbor_options)
        return nl

    def __call__(
        self,
        system: System,
        params=None,
        *,
        fmax: float = DEFAULT_FMAX,
        max_steps: int = DEFAULT_MAX_STEPS,
        stress_tol: Optional[float] = None,
        progress: Optional[bool] = None,
    ) -> RelaxResult:
        self._check_compatible(system)
        fmax = float(fmax)
        max_steps = int(max_steps)
        if not (fmax > 0 and math.isfinite(fmax)):
            raise RelaxError(f"fmax must be a positive number (force units); got {fmax}.")
        if max_steps < 0:
            raise RelaxError(f"max_steps must be >= 0; got {max_steps}.")
        params = self.pot.check(system, params)
        if self.relax_cell:
            if stress_tol is None:
                # ASE's UnitCellFilter criterion: virial per cell_factor below fmax.
                stress_tol = fmax * self.cell_factor / float(system.volume)
            stress_tol = float(stress_tol)
            if not (stress_tol > 0):
                raise RelaxError(f"stress_tol must be positive (eV/Å³); got {stress_tol}.")
        tol_s = stress_tol if self.relax_cell else math.inf

        nl = self._neighbors(system, params)
        if self._compiled is None or nl is not self._nl:
            self._compile(nl)
        init, run, position_of = self._compiled

        cell_ref = system.cell
        if self.relax_cell:
            X0 = jnp.concatenate([system.positions, jnp.zeros((system.dim, system.dim))], axis=0)
        else:
            X0 = system.positions

        def allocate(X, extra=0):
            if nl is None:
                return None
            R, cell = self.problem.physical(X, cell_ref)
            return _stable_metadata(nl.allocate(R, cell, extra_capacity=extra), self._cell_list_fns)

        carry = init(X0, params, cell_ref, allocate(X0))
        show = _progress_enabled(progress)
        bar = _progress_bar(show, max_steps, self.template)
        chunk = self.chunk_size
        extra = 0
        try:
            while True:
                self._raise_if_nan(carry, system)
                if float(carry.fmax) < fmax and float(carry.smax) < tol_s:
                    # Converged as the loop saw it: confirm with a fresh list.
                    if nl is None:
                        break
                    X = position_of(carry)
                    fresh = init(X, params, cell_ref, allocate(X, extra))
                    self._raise_if_nan(fresh, system)
                    if float(fresh.fmax) < fmax and float(fresh.smax) < tol_s:
                        carry = carry._replace(neighbor=fresh.neighbor)
                        break
                    # A stale list hid pairs: restart from here with the fresh one.
                    carry = fresh._replace(step=carry.step)
                    continue
                done = int(carry.step)
                if done >= max_steps:
                    break
                target = min(done + chunk, max_steps)
                new = run(carry, params, cell_ref, fmax, tol_s, target)
                if nl is not None and new.neighbor.needs_reallocation():
                    # Overflow inside the chunk: its forces are untrustworthy. Redo it with
                    # a bigger list, in shorter chunks so the list keeps up.
                    self.reallocations += 1
                    # Double the capacity: every new shape costs a recompile.
                    extra += max(8, new.neighbor.idx.shape[1])
                    chunk = max(1, chunk // 2)
                    X = position_of(carry)
                    carry = init(X, params, cell_ref, allocate(X, extra))._replace(step=carry.step)
                    continue
                carry = new
                chunk = self.chunk_size
                bar.update(int(carry.step) - done)
                bar.set_postfix_str(f"fmax={float(carry.fmax):.3g}", refresh=False)
        finally:
            bar.close()

        return self._result(system, carry, position_of, params, nl, fmax, tol_s, max_steps)

    def _raise_if_nan(self, carry, system):
        if not (np.isfinite(float(carry.fmax)) and np.isfinite(float(carry.smax))):
            raise RelaxError(
                f"the energy or forces became NaN/inf after {int(carry.step)} steps while relaxing "
                f"{system!r}. Usual causes: overlapping atoms (check the structure's "
                "shortest distance), parameters outside the potential's range, or a step "
                "too large (lower maxstep / dt_max, or step_size for gradient descent)."
            )

    def _result(self, system, carry, position_of, params, nl, fmax, tol_s, max_steps):
        X = position_of(carry)
        R, cell = self.problem.physical(X, system.cell)
        if self.relax_cell:
            F = np.eye(system.dim) + np.asarray(X[system.n_atoms :]) / self.cell_factor
            R, cell = _remove_rotation(R, cell, F)
        relaxed = system.replace(positions=R, cell=cell) if system.pbc else system.replace(positions=R)
        if self.relax_cell:
            self.pot.check(relaxed, params)  # the cell may have shrunk below 2 x cutoff
        neighbor = None if nl is None else _stable_metadata(nl.allocate(relaxed.positions, relaxed.cell), self._cell_list_fns)
        energy, forces, stress = self._evaluate(relaxed.positions, params, relaxed.cell, neighbor)
        f = float(_max_norm(forces))
        # Voigt holds every distinct component of the symmetric tensor: same max |σ_ab|.
        s = 0.0 if stress is None else float(jnp.max(jnp.abs(stress)))
        if not (np.isfinite(float(energy)) and np.isfinite(f) and np.isfinite(s)):
            raise RelaxError(f"the relaxed {system!r} has a NaN/inf energy or forces.")
        steps = int(carry.step)
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
                stacklevel=3,
            )
        return RelaxResult(relaxed, energy, forces, f, steps, bool(converged), stress, neighbor)


def relax(
    system: System,
    pot,
    *,
    params=None,
    fmax: float = DEFAULT_FMAX,
    max_steps: int = DEFAULT_MAX_STEPS,
    method: str = "fire",
    relax_cell: bool = False,
    stress_tol: Optional[float] = None,
    progress: Optional[bool] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    neighbor_list: Optional[bool] = None,
    cell_factor: Optional[float] = None,
    maxstep: Optional[float] = DEFAULT_MAXSTEP,
    dt_start: float = 0.1,
    dt_max: float = 1.0,
    step_size: Optional[float] = None,
    neighbor_options: Optional[dict] = None,
) -> RelaxResult:
    """Relax ``system`` to a local minimum of ``pot`` (positions, optionally the cell).

    Args:
      system: the start structure.
      pot: a :class:`~mdsens.md.potentials.base.Potential`.
      params: parameter pytree (default ``pot.params``).
      fmax: force criterion, ``max_i |F_i| < fmax`` (eV/Å, or reduced units).
      max_steps: iteration budget; reaching it returns ``converged=False`` and warns.
      method: ``"fire"`` (jax-md ``fire_descent``) or ``"gradient_descent"``
        (``T(x) = x − η∇E``, ``η = step_size`` or ``1/λ_max``).
      relax_cell: also relax the cell to zero stress (periodic systems).
      stress_tol: stress criterion ``max |σ_ab| < stress_tol`` (eV/Å³; eV/Å² in 2D) with
        ``relax_cell``; default ``fmax · cell_factor / V`` (ASE ``UnitCellFilter``'s).
      progress: show a tqdm progress bar; default: only when stderr is a terminal.
      chunk_size: steps per jitted chunk between host checks.
      neighbor_list: force (True) or forbid (False) neighbor lists; default automatic
        (``N >= mdsens.md.neighbors.NEIGHBOR_LIST_MIN_ATOMS``).
      cell_factor: scale of the deformation variable (default N).
      maxstep: FIRE's largest per-atom displacement per step (Å); None: no limit.
      dt_start, dt_max: FIRE time steps in units of ``1/ω_max``.
      step_size: gradient-descent η (Å²/eV); default ``1/λ_max``.
      neighbor_options: keyword arguments for ``pot.neighbor_list_fn`` (``skin``,
        ``capacity_multiplier``).

    Returns:
      :class:`RelaxResult` ``(system, energy, forces, fmax, steps, converged, stress)``;
      energy in eV, forces (N, d) in eV/Å, stress in ASE's Voigt convention (eV/Å³).

    Raises:
      RelaxError: NaN/inf energies or forces, or invalid options.
      PotentialError: (from the potential) unknown species, a cutoff too long for the
        cell, invalid parameters.

    Warns:
      NotConvergedWarning: ``max_steps`` reached; the result has ``converged=False``.
    """
    fn = make_relax(
        pot,
        system,
        method=method,
        relax_cell=relax_cell,
        chunk_size=chunk_size,
        neighbor_list=neighbor_list,
        cell_factor=cell_factor,
        maxstep=maxstep,
        dt_start=dt_start,
        dt_max=dt_max,
        step_size=step_size,
        neighbor_options=neighbor_options,
    )
    return fn(system, params, fmax=fmax, max_steps=max_steps, stress_tol=stress_tol, progress=progress)


# --------------------------------------------------------------------------- helpers
def _remove_rotation(R, cell, F):
    """Drop the rigid rotation from the deformation ``F`` (rows: ``x -> x F``).

    Right polar decomposition ``F = P Q`` (``P`` symmetric positive, ``Q`` orthogonal,
    from the SVD ``F = U Σ Vᵀ``: ``P = U Σ Uᵀ``, ``Q = U Vᵀ``); returns ``(R Qᵀ, cell Qᵀ)``,
    i.e. the structure deformed by the pure stretch ``P``. Energies are unchanged.
    """
    u, _, vt = np.linalg.svd(np.asarray(F))
    q = u @ vt
    return R @ q.T, cell @ q.T


def _progress_enabled(progress: Optional[bool]) -> bool:
    if progress is not None:
        return bool(progress)
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _progress_bar(show: bool, total: int, system: System):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not show, desc=f"relax N={system.n_atoms}", unit="step", leave=False)
