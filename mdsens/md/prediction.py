"""``ms.predict``: the relaxed structure at new parameters, without relaxing again.

The implicit derivative of a relaxed state (:func:`mdsens.md.sensitivity.sensitivity`)
is a first-order model of the relaxed structure as a function of the parameters θ
(Maliyov, Grigorev and Swinburne, arXiv:2407.02414). With ``Δθ = θ' − θ`` (flat, in
``ravel_pytree(params)`` order) and the columns ``J = dR*/dθ``:

* **positions, order 1**: ``R₁ = R* + J Δθ``; error ``O(|Δθ|²)``.
* **positions, order 2** (fixed cell): one chord-Newton step with the Hessian already
  factored into the first-order solve, ``R₂ = R₁ − H(R*, θ)⁺ ∇E(R₁, θ')``. Since
  ``∇E(R₁, θ') = H' (R₁ − R*') + O(|Δθ|⁴)`` and ``H' − H = O(|Δθ|)``, the error drops to
  ``O(|Δθ|³)`` for the price of one more forward solve (the core's ``root_jvp`` on
  ``∇E(R, θ) + s ∇E(R₁, θ') = 0``, same gauge as the sensitivity).
* **cell** (``relax_cell=True``: the result was relaxed to zero stress): at zero stress
  ``dε*/dθ = −C⁻¹ dσ*/dθ|_cell`` with ``C`` the relaxed-ion elastic constants
  (:func:`mdsens.md.elastic.elastic_constants`) and ``dσ*/dθ|_cell`` the stress change
  of the fixed-cell relaxed structure; then ``cell₁ = cell (I + ε(Δε))`` (symmetric
  strain: no rigid rotation, as in ``relax(relax_cell=True)``) and
  ``dR*/dθ = dR*/dθ|_cell + Σ_I dR*/dε_I dε_I/dθ`` (``sensitivity(wrt="cell")``'s total
  strain derivatives). Order 1 only.
* **energy**: ``Prediction.energy`` is ``E(R_pred, θ', cell_pred)``, the energy at the
  predicted structure under the new parameters. The relaxed energy is stationary in the
  structure, so a structure error ``δ = O(|Δθ|²)`` costs only ``½ δᵀ H δ = O(|Δθ|⁴)``:
  the order-1 energy is accurate to ``O(|Δθ|⁴)`` (third order). The plain Taylor
  estimate ``E* + dE*/dθ · Δθ`` (error ``O(|Δθ|²)``) is ``Prediction.energy_linear``.

Positions are not wrapped into the cell, so ``positions − R*`` is the displacement;
compare with a re-relaxation by the minimum image, with the net translation removed
(the predicted change has none; a cluster's has no net rotation either).

Failure modes: parameters of another pytree structure, shape, NaN/inf or out of range
(:class:`~mdsens.ParameterError`); every error of :func:`~mdsens.sensitivity` (saddle,
mismatched result, failed solve); ``relax_cell`` or ``order=2`` where they do not apply
(:class:`~mdsens.OptionError`). A large ``Δθ`` is not refused: ``Prediction.fmax`` (the
largest force of the prediction under θ') measures how far it is from relaxed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mdsens.errors import LinearSolveError, LinearSolveWarning, OptionError, check_policy, report
from mdsens.implicit import linear_solve, root_jvp
from mdsens.md import cache, neighbors
from mdsens.md.driver import uses_neighbor_list
from mdsens.md.elastic import elastic_constants
from mdsens.md.errors import ParameterError, StructureError
from mdsens.md.hessian import hessian_products
from mdsens.md.options import as_neighbor_list, as_stability
from mdsens.md.problem import STRICT_FMAX, ProblemBuilder, check_stationary, null_basis
from mdsens.md.progress import Stages, structure_stages
from mdsens.md.sensitivity import DEFAULT_TOL, Sensitivity, flat_params, parameter_labels, sensitivity
from mdsens.md.strain import energy_forces_stress, stress_from_energy, voigt_strain_matrix
from mdsens.md.system import System

__all__ = ["Prediction", "ParameterJacobian", "predict", "parameter_jacobian", "checked_params"]


# ------------------------------------------------------------------------ parameters
def _describe(params) -> str:
    if isinstance(params, dict):
        return "{" + ", ".join(f"{k!r}: shape {np.shape(v)}" for k, v in sorted(params.items())) + "}"
    return type(params).__name__


def checked_params(pot, system: System, reference: dict, new, name: str = "new_params") -> dict:
    """``new`` validated against ``reference`` (the parameters the structure was relaxed
    with): the same dict keys and leaf shapes, finite, within the potential's ranges.
    Returns float64 parameters (``pot.check``). Raises :class:`ParameterError`."""
    fix = f"Build {name} from the potential's own, e.g. dict(pot.params, sigma=1.05)."
    if not isinstance(new, dict) or set(new) != set(reference):
        raise ParameterError(
            f"{name} must have the pytree structure of the parameters, {_describe(reference)}; "
            f"got {_describe(new)}. {fix}")
    for key in sorted(reference):
        if jax.tree_util.tree_structure(new[key]) != jax.tree_util.tree_structure(reference[key]) \
                or np.shape(new[key]) != np.shape(reference[key]):
            raise ParameterError(
                f"{name}[{key!r}] must have shape {np.shape(reference[key])} like the parameters; "
                f"got shape {np.shape(new[key])}. {fix}")
        if not np.all(np.isfinite(np.asarray(new[key], np.float64))):
            raise ParameterError(f"{name}[{key!r}] contains NaN or inf; give finite values.")
    return pot.check(system, new)


# ------------------------------------------------------------------------ evaluations
class _Evaluator:
    """Energy, forces and stress, and stress tangents, of one potential and layout (jitted
    once; memoized in :mod:`mdsens.md.cache` like the ``make_*`` objects)."""

    def __init__(self, pot, system, use_nl, params):
        self.pot, self.use_nl = pot, use_nl
        self.energy_fn = E = pot.energy_fn(system, neighbor_list=use_nl, params=params)
        self.evaluate = jax.jit(lambda R, p, C, nb: energy_forces_stress(E, R, p, C, nb))

        def stress_tangents(R, p, C, nb, dR, dp_rows):
            unravel = ravel_pytree(p)[1]
            stress = lambda x, q: stress_from_energy(E, x, q, C, nb)  # noqa: E731
            return jax.vmap(lambda dr, dq: jax.jvp(stress, (R, p), (dr, unravel(dq)))[1])(dR, dp_rows)

        self.stress_tangents = jax.jit(stress_tangents)
        self.forces = jax.jit(lambda R, p, C, nb: -jax.grad(E)(R, p, C, nb))

    def neighbor(self, system, params):
        """Neighbor indices for ``system`` (a fresh list), or ``None`` on the dense path."""
        return neighbors.indices_only(self.pot.neighbor_list(system, params)) if self.use_nl else None


def evaluator(pot, system, params, neighbor_list=None) -> _Evaluator:
    """The memoized :class:`_Evaluator` for ``pot`` and the layout of ``system``."""
    use_nl = uses_neighbor_list(pot, system, as_neighbor_list(neighbor_list))
    key = ("prediction_evaluator", pot.cache_key(), cache.layout_key(system), use_nl)
    return cache.memoized(key, lambda: _Evaluator(pot, system, use_nl, params))


# ------------------------------------------------------------------------ the Jacobian
@dataclasses.dataclass(frozen=True)
class ParameterJacobian:
    """First derivatives of a relaxed state w.r.t. every scalar parameter.

    Rows are indexed by the flat parameter ``j`` in ``ravel_pytree(params)`` order
    (``names``). Built once per structure by :func:`parameter_jacobian` (what
    :func:`predict` and :func:`~mdsens.propagate_uncertainty` do); pass it back as
    ``jacobian=`` to skip the solves.

    Attributes:
      names: labels of the ``P`` scalar parameters (``"sigma"``, ``"sigma[0,1]"``...).
      values: their values ``θ`` at the relaxed state, ``(P,)``.
      positions: ``dR*/dθ_j``, ``(P, N, d)`` (length / parameter unit), gauge-fixed (no
        net translation; clusters: no net rotation). With ``relax_cell`` the total
        derivative, the cell following θ.
      energy: ``dE*/dθ_j``, ``(P,)`` (energy / parameter unit).
      cell: ``dcell*/dθ_j``, ``(P, d, d)`` (rows lattice vectors; zero at fixed cell),
        ``None`` for a free system.
      stress: ``dσ*/dθ_j``, ``(P, n_voigt)`` (ASE sign, eV/Å³ per parameter unit; zero
        up to the solves' accuracy with ``relax_cell``), ``None`` for a free system.
      strain: ``dε*/dθ_j``, ``(P, n_voigt)`` Voigt strain (engineering shear) of the
        zero-stress cell, ``relax_cell`` only, else ``None``.
      relax_cell: whether the cell follows θ (zero stress) or is fixed.
      sensitivity: the fixed-cell :class:`~mdsens.Sensitivity` the rows come from (its
        solve residuals and Theorem-1 error estimates).
      reference_positions, reference_cell: the structure it was computed at.
      reference_energy: ``E*`` there (energy units).
    """

    names: tuple
    values: np.ndarray
    positions: np.ndarray
    energy: np.ndarray
    cell: Optional[np.ndarray]
    stress: Optional[np.ndarray]
    strain: Optional[np.ndarray]
    relax_cell: bool
    sensitivity: Sensitivity
    reference_positions: np.ndarray
    reference_cell: Optional[np.ndarray]
    reference_energy: float


def _structure(result) -> System:
    system = getattr(result, "system", result)
    if not isinstance(system, System):
        raise StructureError(f"need a RelaxResult (from ms.relax) or a relaxed ms.System; got {type(result).__name__}.")
    return system


def parameter_jacobian(result, pot, *, params=None, relax_cell: bool = False, solve: Optional[Callable] = None,
                       tol: float = DEFAULT_TOL, stability=True, neighbor_list=None,
                       on_failure: str = "raise", progress: Optional[bool] = None) -> ParameterJacobian:
    """:class:`ParameterJacobian` of a relaxed structure (forward mode, one solve per
    parameter through :func:`~mdsens.sensitivity`; with ``relax_cell`` also
    ``sensitivity(wrt="cell")`` and the relaxed elastic constants).

    Args:
      result: a ``RelaxResult`` or relaxed ``System``; ``params`` the parameters it was
        relaxed with (default ``pot.params``).
      relax_cell: the structure was relaxed with ``relax(..., relax_cell=True)`` (zero
        stress): the cell follows the parameters. Periodic systems only.
      solve, tol, stability, neighbor_list, on_failure: as :func:`~mdsens.sensitivity`.
      progress: show the stages (the sensitivity; with ``relax_cell`` also the cell
        sensitivity and the elastic constants) on stderr; default: when stderr is a
        terminal.

    Raises:
      OptionError: ``relax_cell`` for a free system; every error of ``ms.sensitivity``
      and ``ms.elastic_constants``.
    """
    system = _structure(result)
    if relax_cell and not system.pbc:
        raise OptionError("relax_cell=True needs a periodic system (the cell follows θ); this one is free.")
    params = pot.check(system, pot.params if params is None else params)
    options = dict(params=params, solve=solve, tol=tol, stability=stability, neighbor_list=neighbor_list,
                   on_failure=on_failure)
    with structure_stages(progress, "parameter_jacobian", result, params, jacobian_stages(relax_cell)) as stages:
        return jacobian_in_stages(result, pot, system, params, relax_cell, options, stages)


def jacobian_stages(relax_cell: bool) -> int:
    """How many progress stages :func:`parameter_jacobian` reports (its solve programs)."""
    return 3 if relax_cell else 1


def jacobian_in_stages(result, pot, system, params, relax_cell, options, stages: Stages) -> ParameterJacobian:
    """:func:`parameter_jacobian` on checked input, reporting to ``stages``; the inner
    calls show no bar of their own (one bar per call)."""
    neighbor_list = options["neighbor_list"]
    stages.start(f"sensitivity ({len(flat_params(params))} parameters)")
    sens = sensitivity(result, pot, progress=False, **options)
    P, R = len(sens.names), np.asarray(system.positions)
    dR = np.asarray(sens.dpositions)
    denergy = np.asarray(sens.denergy)
    ev = evaluator(pot, system, params, neighbor_list)
    energy = getattr(result, "energy", None)
    cell = dcell = dstress = strain = None
    if system.pbc:
        nb = ev.neighbor(system, params)
        cell = np.asarray(system.cell)
        dstress = np.asarray(ev.stress_tangents(system.positions, params, system.cell, nb, jnp.asarray(dR),
                                                jnp.eye(P, dtype=jnp.float64)))
        dcell = np.zeros((P,) + cell.shape)
        if relax_cell:
            stages.start("cell sensitivity")
            sens_cell = sensitivity(result, pot, wrt="cell", progress=False, **options)
            stages.start("elastic constants")
            C = elastic_constants(result, pot, progress=False, **options).relaxed
            # zero stress at θ + Δθ: dσ|_cell + C dε = 0
            strain = -np.linalg.solve(C, dstress.T).T
            dR = dR + np.einsum("pi,ind->pnd", strain, np.asarray(sens_cell.dpositions))
            denergy = denergy + strain @ np.asarray(sens_cell.denergy)
            dcell = np.stack([cell @ np.asarray(voigt_strain_matrix(e, system.dim)) for e in strain])
            dstress = dstress + strain @ C.T
    if energy is None:
        nb = ev.neighbor(system, params)
        energy = ev.evaluate(system.positions, params, system.cell, nb)[0]
    return ParameterJacobian(
        names=tuple(sens.names), values=np.asarray(sens.values, np.float64), positions=dR, energy=denergy,
        cell=dcell, stress=dstress, strain=strain, relax_cell=bool(relax_cell), sensitivity=sens,
        reference_positions=R, reference_cell=cell, reference_energy=float(energy))


def _check_jacobian(jacobian, system, theta, relax_cell):
    if not isinstance(jacobian, ParameterJacobian):
        raise OptionError(f"jacobian must be a ParameterJacobian (Prediction.jacobian); got {type(jacobian).__name__}.")
    same = (jacobian.relax_cell == bool(relax_cell) and jacobian.values.shape == theta.shape
            and np.allclose(jacobian.values, theta, rtol=1e-12, atol=0.0)
            and jacobian.reference_positions.shape == tuple(system.positions.shape)
            and np.allclose(jacobian.reference_positions, np.asarray(system.positions), rtol=0.0, atol=1e-12))
    if not same:
        raise OptionError(
            "jacobian= was computed for another structure, other parameters or another relax_cell; "
            "pass the jacobian of a prediction from this very result and params, or leave it out.")
    return jacobian


# ------------------------------------------------------------------------ order 2
class _ChordStep:
    """``−H(R*, θ)⁺ g`` for a force residual ``g``: one forward solve of the core's
    ``root_jvp`` on ``∇E(R, θ) + s g = 0`` at ``s = 0``, with the sensitivity's null
    space (stability analysis) and fast Hessian products."""

    def __init__(self, pot, solve, tol, stability, neighbor_list, on_failure):
        if not (isinstance(tol, (int, float)) and np.isfinite(tol) and tol > 0):
            raise OptionError(f"tol must be a positive number (relative residual); got {tol!r}.")
        self.solve = solve or functools.partial(linear_solve.cg, tol=tol)
        self.stability = as_stability(stability)
        self.on_failure = check_policy(on_failure)
        self.problem = ProblemBuilder(pot, neighbor_list)
        self._compiled = {}

    def _run(self, energy):
        if energy not in self._compiled:
            solve = self.solve

            def run(R, g, basis, params, cell, nb, blocks):
                grad = jax.grad(energy)
                F = lambda x, s: grad(x, params, cell, nb) + s * g  # noqa: E731
                return root_jvp(F, R, (jnp.float64(0.0),), (jnp.float64(1.0),), solve=solve,
                                nullspace=lambda x, s: basis, symmetric=True, return_info=True,
                                on_failure="ignore", operator=hessian_products(energy, R, params, cell, nb,
                                                                               blocks=blocks))

            self._compiled[energy] = jax.jit(run)
        return self._compiled[energy]

    def __call__(self, result, params, g):
        prob = self.problem(result, params, None)
        fmax = check_stationary(prob, False, STRICT_FMAX, "a second-order prediction")
        basis = null_basis(prob, self.stability, fmax)[0]
        s = prob.system
        dx, info = self._run(prob.energy)(s.positions, jnp.asarray(g), basis, prob.params, s.cell,
                                          prob.neighbor, prob.blocks)
        if not bool(np.all(np.asarray(info.converged))):
            report(self.on_failure,
                   f"the second-order (chord) solve missed its tolerance (relative residual "
                   f"{float(np.max(np.asarray(info.relative_residual))):.3e}). Use order=1, relax tighter, "
                   "or pass solve=functools.partial(ms.linear_solve.minres, tol=...).",
                   LinearSolveError, LinearSolveWarning, stacklevel=4)
        return np.asarray(dx)


# ------------------------------------------------------------------------ result
@dataclasses.dataclass(frozen=True)
class Prediction:
    """The relaxed state predicted at new parameters (see the module docstring).

    Attributes:
      system: the predicted relaxed :class:`~mdsens.System` (positions ``(N, d)`` in Å,
        not wrapped into the cell; the predicted cell with ``relax_cell``).
      energy: ``E(R_pred, θ', cell_pred)`` (eV): error ``O(|Δθ|⁴)`` at order 1.
      energy_linear: ``E* + dE*/dθ · Δθ`` (eV): error ``O(|Δθ|²)``.
      forces: ``(N, d)`` forces of the prediction under ``θ'`` (eV/Å).
      fmax: their largest norm: zero for an exact prediction (``≈ λ ‖error‖``).
      stress: Voigt stress of the prediction under ``θ'`` (ASE sign, eV/Å³), ``None``
        for a free system.
      params: the new parameters ``θ'`` (float64 dict).
      dparams: ``Δθ = θ' − θ``, ``(P,)`` in ``ravel_pytree`` order.
      order: 1 or 2 (positions; the cell is order 1).
      relax_cell: whether the cell was predicted (zero-stress result) or kept.
      jacobian: the :class:`ParameterJacobian` used; pass it as ``jacobian=`` to predict
        other parameters of the same result without new solves.
    """

    system: System
    energy: float
    energy_linear: float
    forces: np.ndarray
    fmax: float
    stress: Optional[np.ndarray]
    params: dict
    dparams: np.ndarray
    order: int
    relax_cell: bool
    jacobian: ParameterJacobian

    @property
    def positions(self) -> np.ndarray:
        """Predicted relaxed positions ``(N, d)`` (Å), not wrapped."""
        return np.asarray(self.system.positions)

    @property
    def cell(self) -> Optional[np.ndarray]:
        """Predicted cell (rows lattice vectors), ``None`` for a free system."""
        return None if self.system.cell is None else np.asarray(self.system.cell)

    @property
    def dpositions(self) -> np.ndarray:
        """``R_pred − R*``, ``(N, d)`` (Å)."""
        return self.positions - self.jacobian.reference_positions


def predict(result, pot, new_params: dict, *, params=None, order: int = 1, relax_cell: bool = False,
            jacobian: Optional[ParameterJacobian] = None, solve: Optional[Callable] = None,
            tol: float = DEFAULT_TOL, stability=True, neighbor_list=None, on_failure: str = "raise",
            progress: Optional[bool] = None) -> Prediction:
    """The relaxed structure, energy and cell at ``new_params``, without relaxing again.

    Args:
      result: a ``RelaxResult`` (``ms.relax``) or a relaxed ``System``.
      pot: the potential it was relaxed with.
      new_params: the new parameters ``θ'``: a dict with the keys and leaf shapes of
        ``pot.params`` (e.g. ``dict(pot.params, sigma=1.01)``).
      params: the parameters ``result`` was relaxed with (default ``pot.params``).
      order: 1 (``R* + J Δθ``, error ``O(|Δθ|²)``) or 2 (one more forward solve, error
        ``O(|Δθ|³)``; fixed cell only).
      relax_cell: ``result`` was relaxed with ``relax_cell=True``: predict the
        zero-stress cell too (periodic systems; order 1).
      jacobian: a :class:`ParameterJacobian` of this result (``Prediction.jacobian``)
        to reuse: then no first-order solve runs.
      solve, tol, stability, neighbor_list, on_failure: as :func:`~mdsens.sensitivity`.
      progress: show the stages (the first-order solves unless ``jacobian`` is given,
        the second-order solve, the evaluation at ``θ'``) on stderr; default: when stderr
        is a terminal.

    Returns:
      :class:`Prediction` (energy in eV, positions and cell in Å).

    Raises:
      ParameterError: ``new_params`` of another structure, shape, NaN/inf or out of range.
      OptionError: ``order`` not 1 or 2, ``order=2`` with ``relax_cell``, ``relax_cell``
        for a free system, a ``jacobian`` of another result.
      SaddlePointError, ResultMismatchError, LinearSolveError: as ``ms.sensitivity``.
    """
    if order not in (1, 2) or isinstance(order, bool):
        raise OptionError(f"order must be 1 or 2; got {order!r}.")
    if order == 2 and relax_cell:
        raise OptionError("order=2 is available at fixed cell; with relax_cell=True use order=1.")
    system = _structure(result)
    params = pot.check(system, pot.params if params is None else params)
    new = checked_params(pot, system, params, new_params)
    theta = flat_params(params)
    total = (jacobian_stages(relax_cell) if jacobian is None else 0) + (order == 2) + 1
    with structure_stages(progress, "predict", result, params, total) as stages:
        return _predicted(result, pot, system, params, new, theta, order, relax_cell, jacobian, solve, tol,
                          stability, neighbor_list, on_failure, stages)


def _predicted(result, pot, system, params, new, theta, order, relax_cell, jacobian, solve, tol, stability,
               neighbor_list, on_failure, stages) -> Prediction:
    """:func:`predict` on checked input, reporting to ``stages``."""
    if jacobian is None:
        options = dict(params=params, solve=solve, tol=tol, stability=stability, neighbor_list=neighbor_list,
                       on_failure=on_failure)
        jacobian = jacobian_in_stages(result, pot, system, params, relax_cell, options, stages)
    else:
        jacobian = _check_jacobian(jacobian, system, theta, relax_cell)
    dtheta = flat_params(new) - theta
    R = jacobian.reference_positions + np.tensordot(dtheta, jacobian.positions, axes=1)
    cell = None if jacobian.cell is None else jacobian.reference_cell + np.tensordot(dtheta, jacobian.cell, axes=1)
    predicted = system.replace(positions=jnp.asarray(R), cell=None if cell is None else jnp.asarray(cell))
    ev = evaluator(pot, system, params, neighbor_list)
    if order == 2:
        stages.start("second-order (chord) solve")
        g = -np.asarray(ev.forces(predicted.positions, new, predicted.cell, ev.neighbor(predicted, new)))
        chord = cache.memoized_make(
            "predict_chord", pot, system, (), dict(solve=solve, tol=tol, stability=stability,
                                                   neighbor_list=neighbor_list, on_failure=on_failure),
            lambda: _ChordStep(pot, solve, tol, stability, neighbor_list, on_failure))
        predicted = predicted.replace(positions=jnp.asarray(R + chord(result, params, g)))
    stages.start("energy, forces and stress at the new parameters")
    energy, forces, stress = ev.evaluate(predicted.positions, new, predicted.cell, ev.neighbor(predicted, new))
    forces = np.asarray(forces)
    return Prediction(
        system=predicted,
        energy=float(energy),
        energy_linear=float(jacobian.reference_energy + jacobian.energy @ dtheta),
        forces=forces,
        fmax=float(np.sqrt(np.max(np.sum(forces * forces, axis=-1)))) if forces.size else 0.0,
        stress=None if stress is None else np.asarray(stress),
        params=new,
        dparams=dtheta,
        order=int(order),
        relax_cell=bool(relax_cell),
        jacobian=jacobian,
    )
