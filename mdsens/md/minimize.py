"""Pure, jittable minimizers in jax-md's shape: functions that return ``(init, step)``.

A **problem** (:class:`Problem`) says what is minimized: the positions alone
(:func:`positions_problem`), or positions and cell together (:func:`cell_problem`). A
**minimizer** turns it into a pair of pure functions::

    init, step = fire(problem, FIRE(), neighbor_update)
    state = init(X, params, cell, neighbor)        # a MinimizerState
    state = step(state, params, cell)              # one iteration
    state = run(step, state, params, cell, fmax, stress_tol, max_steps)   # lax.while_loop

Everything is a pytree and jit/vmap-compatible: ``params`` may be traced, and so may
``fmax`` and the step budget. Nothing here checks neighbor-list overflow or shows
progress; the host driver (:mod:`mdsens.md.driver`) does, between jitted chunks.

Conventions:

* Convergence is ASE's: ``max_i |F_i| < fmax`` (largest per-atom force norm), and with
  the cell ``max_ab |σ_ab| < stress_tol``.
* FIRE runs jax-md's ``minimize.fire_descent`` with one scalar mass equal to the largest
  Hessian eigenvalue (:func:`max_curvature`), so ``dt`` is in units of ``1/ω_max``; each
  step's displacement is scaled so that no atom moves more than ``maxstep`` (ASE's FIRE
  does the same).
* Gradient descent is the fixed-point map ``T(x) = x − η ∇E(x)``, ``η = 1/λ_max`` by
  default.
* Periodic positions are wrapped into the cell after every step; energies are unchanged.
* The cell variable is ``X = [S; q]``, ``(N + d, d)``: reference positions ``S`` and
  ``q = c (D − I)`` with ``D`` the deformation gradient (``R = S D``, ``cell = cell₀ D``)
  and ``c`` the cell factor (default N, like ASE's ``UnitCellFilter``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from mdsens.md._jax_md import minimize as jax_md_minimize

from mdsens.md import neighbors
from mdsens.md.errors import RelaxError
from mdsens.md.options import FIRE, LBFGS, GradientDescent
from mdsens.md.space import wrap_positions

__all__ = [
    "Problem",
    "positions_problem",
    "cell_problem",
    "max_curvature",
    "MinimizerState",
    "GradientDescentState",
    "LBFGSState",
    "fire",
    "lbfgs",
    "gradient_descent",
    "minimizer",
    "run",
    "MinimizeResult",
    "fire_minimize",
    "gradient_descent_minimize",
    "lbfgs_minimize",
    "minimize",
    "gradient_descent_map",
    "max_norm",
]

#: Power-iteration steps for the stiffest curvature (a 10-20 % estimate is enough).
POWER_ITERATIONS = 20
#: L-BFGS needs λ_max only for its first step, which its line search corrects.
LBFGS_POWER_ITERATIONS = 6


def max_norm(v):
    """``max_i |v_i|`` over rows; 0 for an empty array."""
    return jnp.sqrt(jnp.max(jnp.sum(v * v, axis=-1), initial=0.0))


def _limit(dX, maxstep):
    """Scale ``dX`` so that no row moves more than ``maxstep`` (direction kept)."""
    if maxstep is None:
        return dX
    return dX * jnp.minimum(1.0, maxstep / jnp.maximum(max_norm(dX), 1e-300))


# ------------------------------------------------------------------------- problems
class Problem(NamedTuple):
    """A minimization variable ``X`` and how it maps to atoms (all pure functions).

    Attributes:
      energy: ``energy(X, params, cell, neighbor) -> scalar``.
      physical: ``physical(X, cell) -> (positions, cell_now)``.
      residuals: ``residuals(X, grad, cell) -> (fmax, smax)``, the force and stress
        criteria from the gradient ``∂energy/∂X``.
      shift: ``shift(X, dX, cell, maxstep) -> X'``, one step (wrapped, limited).
      value_and_grad: ``(energy, ∂energy/∂X)`` at the same arguments as ``energy``, when
        a cheaper form than ``jax.value_and_grad(energy)`` exists; else ``None``.
    """

    energy: Callable
    physical: Callable
    residuals: Callable
    shift: Callable
    value_and_grad: Optional[Callable] = None


def positions_problem(energy_fn, periodic: bool, value_and_grad: Optional[Callable] = None) -> Problem:
    """Minimize over positions ``X = R``; ``energy_fn(R, params, cell, neighbor)``;
    ``value_and_grad``: :attr:`Problem.value_and_grad`."""

    def physical(X, cell):
        return X, cell

    def residuals(X, grad, cell):
        return max_norm(grad), jnp.zeros((), grad.dtype)

    def shift(X, dX, cell, maxstep):
        X = X + _limit(dX, maxstep)
        return wrap_positions(X, cell) if periodic else X

    return Problem(energy_fn, physical, residuals, shift, value_and_grad)


def cell_problem(energy_fn, n: int, dim: int, cell_factor) -> Problem:
    """Minimize over positions and cell, ``X = [S; c (D − I)]`` (see the module docstring)."""
    eye = jnp.eye(dim, dtype=jnp.float64)

    def deformation(X):
        return eye + X[n:] / cell_factor

    def physical(X, cell_ref):
        D = deformation(X)
        return X[:n] @ D, cell_ref @ D

    def energy(X, params, cell_ref, neighbor):
        R, cell = physical(X, cell_ref)
        return energy_fn(R, params, cell, neighbor)

    def residuals(X, grad, cell_ref):
        D = deformation(X)
        # dU/dS = ∇_R E Dᵀ  and  dU/dq = (1/c) ∂E/∂D;  σ = Dᵀ ∂E/∂D / V.
        grad_r = jnp.linalg.solve(D, grad[:n].T).T
        volume = jnp.abs(jnp.linalg.det(cell_ref @ D))
        sigma = D.T @ grad[n:] * cell_factor / volume
        return max_norm(grad_r), jnp.max(jnp.abs(sigma))

    def shift(X, dX, cell_ref, maxstep):
        X = X + _limit(dX, maxstep)
        return X.at[:n].set(wrap_positions(X[:n], cell_ref))

    return Problem(energy, physical, residuals, shift)


def max_curvature(energy_fn, positions, params, cell=None, neighbor=None, iterations=POWER_ITERATIONS,
                  h=1e-4):
    """Estimate the largest |eigenvalue| of the Hessian ∂²E/∂X² (energy/length²).

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


# ------------------------------------------------------------------------ minimizers
class GradientDescentState(NamedTuple):
    """State of :func:`gradient_descent`: ``position``, ``gradient`` at it, ``step_size``."""

    position: jax.Array
    gradient: jax.Array
    step_size: jax.Array


class MinimizerState(NamedTuple):
    """The state every minimizer carries (a pytree).

    Attributes:
      inner: the method's own state (jax-md's ``FireDescentState``, or
        :class:`GradientDescentState`); ``inner.position`` is the variable ``X``.
      neighbor: the neighbor list, updated before each step (``None`` on the dense path).
      step: int32, iterations done.
      fmax: force criterion ``max_i |F_i|`` at ``inner.position`` (NaN if the energy is).
      smax: stress criterion ``max |σ_ab|`` (0 without the cell).
    """

    inner: Any
    neighbor: Any
    step: jax.Array
    fmax: jax.Array
    smax: jax.Array


def fire(problem: Problem, options: FIRE = FIRE(), neighbor_update: Optional[Callable] = None):
    """``(init, step)`` for FIRE on ``problem``.

    ``init(X, params, cell, neighbor, mass=None) -> MinimizerState`` (the mass defaults
    to :func:`max_curvature`); ``step(state, params, cell) -> MinimizerState``.
    """

    def U(X, params=None, cell=None, neighbor=None):
        return problem.energy(X, params, cell, neighbor)

    def shift(X, dX, params=None, cell=None, neighbor=None, **_):
        return problem.shift(X, dX, cell, options.maxstep)

    fire_init, fire_apply = jax_md_minimize.fire_descent(U, shift, dt_start=options.dt_start,
                                                         dt_max=options.dt_max)

    def init(X, params, cell, neighbor, mass=None):
        if mass is None:
            mass = max_curvature(U, X, params, cell, neighbor)
        inner = fire_init(X, mass=jnp.asarray(mass, jnp.float64), params=params, cell=cell,
                          neighbor=neighbors.indices_only(neighbor))
        fmax, smax = problem.residuals(X, -inner.force, cell)
        return MinimizerState(inner, neighbor, jnp.zeros((), jnp.int32), fmax, smax)

    def step(state, params, cell):
        nb = _updated(problem, neighbor_update, state, cell)
        inner = fire_apply(state.inner, params=params, cell=cell, neighbor=neighbors.indices_only(nb))
        fmax, smax = problem.residuals(inner.position, -inner.force, cell)
        return MinimizerState(inner, nb, state.step + 1, fmax, smax)

    return init, step


def gradient_descent(problem: Problem, options: GradientDescent = GradientDescent(),
                     neighbor_update: Optional[Callable] = None):
    """``(init, step)`` for ``X ← shift(X, −η ∇U(X))`` on ``problem``.

    ``init(X, params, cell, neighbor) -> MinimizerState`` (``η = options.step_size`` or
    ``1/λ_max``); ``step(state, params, cell) -> MinimizerState``.
    """
    grad_U = jax.grad(problem.energy)

    def init(X, params, cell, neighbor):
        eta = options.step_size
        if eta is None:
            eta = 1.0 / max_curvature(problem.energy, X, params, cell, neighbor)
        g = grad_U(X, params, cell, neighbor)
        fmax, smax = problem.residuals(X, g, cell)
        inner = GradientDescentState(X, g, jnp.asarray(eta, jnp.float64))
        return MinimizerState(inner, neighbor, jnp.zeros((), jnp.int32), fmax, smax)

    def step(state, params, cell):
        X, g, eta = state.inner
        X = problem.shift(X, -eta * g, cell, None)
        nb = _updated(problem, neighbor_update, state._replace(inner=state.inner._replace(position=X)), cell)
        g = grad_U(X, params, cell, nb)
        fmax, smax = problem.residuals(X, g, cell)
        return MinimizerState(GradientDescentState(X, g, eta), nb, state.step + 1, fmax, smax)

    return init, step


class LBFGSState(NamedTuple):
    """State of :func:`lbfgs` (a pytree).

    Attributes:
      position: the variable ``X``.
      energy, gradient: ``U(X)`` and ``∂U/∂X``.
      s, y: ``(memory, *X.shape)`` ring buffers of steps and gradient changes.
      rho: ``(memory,)``, ``1 / sᵀy`` of the stored pairs.
      head: int32, slot of the next pair; ``count``: int32, pairs stored (``<= memory``).
      h0: the reset step scale ``1/λ_max`` (length²/energy).
      evaluations: int32, energy-and-gradient evaluations so far (line-search trials included).
    """

    position: jax.Array
    energy: jax.Array
    gradient: jax.Array
    s: jax.Array
    y: jax.Array
    rho: jax.Array
    head: jax.Array
    count: jax.Array
    h0: jax.Array
    evaluations: jax.Array


def _two_loop(g, s, y, rho, head, count, h0):
    """``−H g`` by the L-BFGS two-loop recursion over the ``count`` newest pairs."""
    m = s.shape[0]

    def newest_first(i, carry):
        q, alpha = carry
        j = (head - 1 - i) % m
        a = jnp.where(i < count, rho[j] * jnp.vdot(s[j], q), 0.0)
        return q - a * y[j], alpha.at[j].set(a)

    q, alpha = lax.fori_loop(0, m, newest_first, (g, jnp.zeros_like(rho)))
    last = (head - 1) % m
    gamma = jnp.where(count > 0, 1.0 / (rho[last] * jnp.maximum(jnp.vdot(y[last], y[last]), 1e-300)), h0)
    r = gamma * q

    def oldest_first(k, r):
        i = m - 1 - k
        j = (head - 1 - i) % m
        b = rho[j] * jnp.vdot(y[j], r)
        return r + jnp.where(i < count, alpha[j] - b, 0.0) * s[j]

    return -lax.fori_loop(0, m, oldest_first, r)


def lbfgs(problem: Problem, options: LBFGS = LBFGS(), neighbor_update: Optional[Callable] = None):
    """``(init, step)`` for L-BFGS with a backtracking line search on ``problem``.

    ``init(X, params, cell, neighbor, h0=None) -> MinimizerState`` (``h0`` defaults to
    ``1 /`` :func:`max_curvature`); ``step(state, params, cell) -> MinimizerState``. Each
    step costs one energy-and-gradient evaluation when the first trial is accepted (the
    usual case) and one more per backtrack; ``state.inner.evaluations`` counts them.
    """
    value_and_grad = problem.value_and_grad or jax.value_and_grad(problem.energy)
    m = options.memory

    def init(X, params, cell, neighbor, h0=None):
        if h0 is None:
            h0 = 1.0 / max_curvature(problem.energy, X, params, cell, neighbor, iterations=LBFGS_POWER_ITERATIONS)
        E, g = value_and_grad(X, params, cell, neighbor)
        inner = LBFGSState(X, E, g, jnp.zeros((m,) + X.shape, X.dtype), jnp.zeros((m,) + X.shape, X.dtype),
                           jnp.zeros((m,), X.dtype), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                           jnp.asarray(h0, X.dtype), jnp.ones((), jnp.int32))
        fmax, smax = problem.residuals(X, g, cell)
        return MinimizerState(inner, neighbor, jnp.zeros((), jnp.int32), fmax, smax)

    def trial(X, dX, params, cell, neighbor):
        X_new = problem.shift(X, dX, cell, None)
        nb = neighbor
        if neighbor is not None:
            R, cell_now = problem.physical(X_new, cell)
            nb = neighbor_update(R, neighbor, cell_now)
        E, g = value_and_grad(X_new, params, cell, nb)
        return X_new, nb, E, g

    def step(state, params, cell):
        st = state.inner
        X, E, g = st.position, st.energy, st.gradient
        d = _two_loop(g, st.s, st.y, st.rho, st.head, st.count, st.h0)
        slope = jnp.vdot(g, d)
        descent = slope < 0
        # Not a descent direction (round-off in the memory): restart from steepest descent.
        d = jnp.where(descent, d, -st.h0 * g)
        d = _limit(d, options.maxstep)
        slope = jnp.vdot(g, d)
        # Energy differences below this are round-off; the Armijo test cannot see them.
        noise = 64 * jnp.finfo(X.dtype).eps * (jnp.abs(E) + 1.0)

        def searching(c):
            ok, tries, _, _, nb, *_ = c
            # An overflowed list gives wrong energies: stop, and let the host reallocate.
            return ~ok & (tries < options.max_backtracks) & ~neighbors.needs_reallocation(nb)

        def backtrack(c):
            _, tries, alpha, *_ = c
            X_new, nb, E_new, g_new = trial(X, alpha * d, params, cell, state.neighbor)
            ok = jnp.isfinite(E_new) & (E_new <= E + options.armijo * alpha * slope + noise)
            ok = ok & ~neighbors.needs_reallocation(nb)
            # Minimum of the quadratic through E, slope and E_new, kept within [0.1, 0.5] α.
            curvature = E_new - E - alpha * slope
            guess = -slope * alpha**2 / (2 * jnp.where(curvature > 0, curvature, 1.0))
            shrunk = jnp.clip(jnp.where((curvature > 0) & jnp.isfinite(guess), guess, 0.5 * alpha),
                              0.1 * alpha, 0.5 * alpha)
            return ok, tries + 1, jnp.where(ok, alpha, shrunk), X_new, nb, E_new, g_new

        first = (jnp.zeros((), bool), jnp.zeros((), jnp.int32), jnp.ones((), X.dtype), X, state.neighbor, E, g)
        ok, tries, alpha, X_new, nb, E_new, g_new = lax.while_loop(searching, backtrack, first)

        s_new = alpha * d
        y_new = g_new - g
        sy = jnp.vdot(s_new, y_new)
        store = ok & (sy > 1e-12 * jnp.linalg.norm(s_new) * jnp.linalg.norm(y_new))
        head = st.head
        # the slot, not the whole buffer, is selected: a where over the buffers copied them
        s_buf = st.s.at[head].set(jnp.where(store, s_new, st.s[head]))
        y_buf = st.y.at[head].set(jnp.where(store, y_new, st.y[head]))
        rho = jnp.where(store, st.rho.at[head].set(1.0 / jnp.where(store, sy, 1.0)), st.rho)
        head = jnp.where(store, (head + 1) % m, head)
        count = jnp.where(ok, jnp.where(store, jnp.minimum(st.count + 1, m), st.count), 0)

        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        X_out, E_out, g_out = keep((X_new, E_new, g_new), (X, E, g))
        # A failed search keeps the old list, unless the trial's overflowed: the host must see that.
        nb_out = None
        if state.neighbor is not None:
            nb_out = jax.tree_util.tree_map(lambda a, b: jnp.where(ok | neighbors.needs_reallocation(nb), a, b),
                                            nb, state.neighbor)
        inner = LBFGSState(X_out, E_out, g_out, s_buf, y_buf, rho, head, count, st.h0, st.evaluations + tries)
        fmax, smax = problem.residuals(X_out, g_out, cell)
        return MinimizerState(inner, nb_out, state.step + 1, fmax, smax)

    return init, step


def _updated(problem, neighbor_update, state, cell):
    """The neighbor list updated to the state's physical positions (``None`` stays)."""
    if state.neighbor is None:
        return None
    R, cell_now = problem.physical(state.inner.position, cell)
    return neighbor_update(R, state.neighbor, cell_now)


def minimizer(problem: Problem, options, neighbor_update: Optional[Callable] = None):
    """``(init, step)`` of the method ``options`` names (:class:`FIRE`, :class:`LBFGS` or
    :class:`GradientDescent`).

    ``init(X, params, cell, neighbor)`` takes the method's default mass / step size.
    """
    if isinstance(options, FIRE):
        init, step = fire(problem, options, neighbor_update)
    elif isinstance(options, LBFGS):
        init, step = lbfgs(problem, options, neighbor_update)
    else:
        return gradient_descent(problem, options, neighbor_update)
    return (lambda X, params, cell, neighbor: init(X, params, cell, neighbor)), step


def run(step: Callable, state: MinimizerState, params, cell, fmax, stress_tol, max_steps) -> MinimizerState:
    """Iterate ``step`` until the criteria hold, the energy is not finite, or
    ``state.step`` reaches ``max_steps`` (a ``lax.while_loop``; all may be traced)."""

    def going(s):
        converged = (s.fmax < fmax) & (s.smax < stress_tol)
        finite = jnp.isfinite(s.fmax) & jnp.isfinite(s.smax)
        return (s.step < max_steps) & ~converged & finite

    return lax.while_loop(going, lambda s: step(s, params, cell), state)


# ------------------------------------------------------------- one-call minimizations
class MinimizeResult(NamedTuple):
    """Output of :func:`fire_minimize` and :func:`gradient_descent_minimize` (a pytree).

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


def _check_neighbor_args(neighbor, neighbor_update):
    if (neighbor is None) != (neighbor_update is None):
        raise RelaxError(
            "pass both neighbor= and neighbor_update= (e.g. nl.update from "
            "pot.neighbor_list_fn(system, params)), or neither for the dense path."
        )


def _minimize(energy_fn, positions, params, cell, options, fmax, max_steps, neighbor, neighbor_update):
    _check_neighbor_args(neighbor, neighbor_update)
    init, step = minimizer(positions_problem(energy_fn, periodic=cell is not None), options, neighbor_update)
    state = init(jnp.asarray(positions, jnp.float64), params, cell, neighbor)
    state = run(step, state, params, cell, fmax, jnp.inf, max_steps)
    return MinimizeResult(state.inner.position, state.step, state.fmax, state.neighbor)


def fire_minimize(energy_fn: Callable, positions, params, cell=None, *, fmax=1e-6, max_steps=20_000,
                  options: FIRE = FIRE(), neighbor=None, neighbor_update: Optional[Callable] = None
                  ) -> MinimizeResult:
    """Minimize ``energy_fn`` over positions with FIRE until ``max_i |F_i| < fmax``.

    Pure and jit/vmap-compatible; ``params``, ``cell``, ``fmax`` and ``max_steps`` may be
    traced. Not differentiable by itself (``ms.relax`` wraps it with ``custom_root``).

    Args:
      energy_fn: ``E(positions (N, d), params, cell, neighbor) -> scalar`` (e.g.
        ``pot.energy_fn(system)``).
      positions: ``(N, d)`` Cartesian start (Å).
      params: parameter pytree passed to ``energy_fn``.
      cell: ``(d, d)`` lattice rows (periodic; positions are wrapped) or ``None`` (free).
      fmax: force criterion (eV/Å), strict ``<`` as in ASE.
      max_steps: iteration budget.
      options: :class:`~mdsens.md.options.FIRE`.
      neighbor, neighbor_update: a neighbor list and a pure ``update(positions,
        neighbor, cell)`` (e.g. ``nl.update``), both or neither. The caller must check
        ``result.neighbor`` for overflow.

    Returns:
      :class:`MinimizeResult`; ``fmax`` is NaN if the energy became NaN.
    """
    return _minimize(energy_fn, positions, params, cell, options, fmax, max_steps, neighbor, neighbor_update)


def gradient_descent_minimize(energy_fn: Callable, positions, params, cell=None, *, fmax=1e-6,
                              max_steps=20_000, options: GradientDescent = GradientDescent(),
                              neighbor=None, neighbor_update: Optional[Callable] = None) -> MinimizeResult:
    """Iterate ``T(x) = x − η ∇E(x)`` (wrapped into the cell) until ``max_i |F_i| < fmax``.

    Same contract as :func:`fire_minimize`; ``options.step_size`` η (length²/energy)
    defaults to ``1 / λ_max``.
    """
    return _minimize(energy_fn, positions, params, cell, options, fmax, max_steps, neighbor, neighbor_update)


def lbfgs_minimize(energy_fn: Callable, positions, params, cell=None, *, fmax=1e-6, max_steps=20_000,
                   options: LBFGS = LBFGS(), neighbor=None, neighbor_update: Optional[Callable] = None
                   ) -> MinimizeResult:
    """Minimize ``energy_fn`` over positions with :func:`lbfgs` until ``max_i |F_i| < fmax``.

    Same contract as :func:`fire_minimize`.
    """
    return _minimize(energy_fn, positions, params, cell, options, fmax, max_steps, neighbor, neighbor_update)


def minimize(energy_fn: Callable, positions, params, cell=None, *, fmax=1e-6, max_steps=20_000,
             options=FIRE(), neighbor=None, neighbor_update: Optional[Callable] = None) -> MinimizeResult:
    """Minimize with the method ``options`` names (:class:`FIRE`, :class:`LBFGS` or
    :class:`GradientDescent`); same contract as :func:`fire_minimize`."""
    return _minimize(energy_fn, positions, params, cell, options, fmax, max_steps, neighbor, neighbor_update)


def gradient_descent_map(energy_fn: Callable, step_size) -> Callable:
    """The fixed-point map ``T(x, params, cell, neighbor=None) = x − η ∇ₓE(x, params, cell)``.

    No wrapping, so ``T`` is smooth (for ``custom_fixed_point``); a relaxed structure
    ``x*`` satisfies ``T(x*) = x*`` exactly when ``∇E(x*) = 0``.
    """
    grad = jax.grad(energy_fn)

    def T(x, params, cell=None, neighbor=None):
        return x - step_size * grad(x, params, cell, neighbor)

    return T
