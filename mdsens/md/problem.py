"""The input every derivative routine shares: a relaxed structure, checked and made explicit.

``ms.sensitivity``, ``ms.observable_gradient`` and ``ms.elastic_constants`` all start
from a ``RelaxResult`` (or a bare relaxed ``System``), a potential and parameters. A
:class:`ProblemBuilder` turns those into a :class:`DerivativeProblem` (the structure,
float64 parameters, a pure energy function and the neighbor indices it needs), and the
same three checks run for all of them:

* :meth:`DerivativeProblem.forces` refuses NaN/inf forces;
* :func:`check_stationary`: a structure whose forces are not small gets a warning (or,
  with ``strict=True``, :class:`~mdsens.NotConvergedError`), and a result that was
  relaxed with another potential or other parameters (its forces under these are far
  above the ones it recorded) is refused with :class:`~mdsens.ResultMismatchError`;
* :func:`null_basis`: the stability analysis (saddle → error, rattlers and soft modes →
  null space) or the rigid modes alone.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable, Optional

import jax
import numpy as np

from mdsens.md import neighbors, zero_modes
from mdsens.md.driver import uses_neighbor_list
from mdsens.md.errors import (
    NotConvergedError,
    NotConvergedWarning,
    ResultMismatchError,
    SaddlePointError,
    StructureError,
)
from mdsens.md.hessian import gradient_and_blocks
from mdsens.md.options import as_neighbor_list
from mdsens.md.system import System

__all__ = ["DerivativeProblem", "ProblemBuilder", "relaxation_neighbors", "check_stationary", "null_basis",
           "known_modes", "probed_null_basis", "STRICT_FMAX"]

#: Largest per-atom force (force units) below which a structure counts as relaxed for a
#: derivative: above it ``sensitivity`` warns (or refuses with ``strict=True``).
STRICT_FMAX = 1e-5
#: A result whose forces under the given potential exceed this many times the ones it
#: recorded (and ``STRICT_FMAX``) was relaxed with another potential or parameters.
MISMATCH_FACTOR = 1e3


@dataclasses.dataclass(frozen=True)
class DerivativeProblem:
    """Everything the derivatives need, all explicit.

    Attributes:
      system: the relaxed :class:`System`.
      params: float64 parameter dict.
      energy: ``E(R, params, cell, neighbor)``, pure (the same function across calls of
        one builder, so compiled code is reused).
      neighbor: the pairs interacting at ``system.positions``
        (:func:`~mdsens.md.neighbors.interacting_neighbors`), on either path.
      converged: the relaxation's own flag (``None`` for a bare ``System``).
      recorded_fmax: the largest force the relaxation recorded (``None`` if unknown).
    """

    system: System
    params: dict
    energy: Callable
    neighbor: object
    converged: Optional[bool]
    recorded_fmax: Optional[float]
    gradient: object = None
    blocks: object = None


#: ``(∇E, Hessian blocks)`` at one structure, compiled once per energy function (static).
_gradient_and_blocks = jax.jit(gradient_and_blocks, static_argnums=0)


def relaxation_neighbors(result, system, cutoff):
    """The list a ``RelaxResult`` was confirmed with, if still valid for ``system``.

    It was built at the relaxed positions; it serves only if the caller's system is that
    very structure and the list covers ``cutoff`` (a parameter may have grown the range).
    """
    nb = getattr(result, "neighbor", None)
    if nb is None or getattr(nb, "cutoff", 0.0) < cutoff or nb.idx.shape[0] != system.n_atoms:
        return None
    return nb if getattr(result, "system", None) is system else None


class ProblemBuilder:
    """Turns ``(result, params, neighbor)`` into a :class:`DerivativeProblem` for one potential.

    Reused by the ``make_*`` callables across calls: a fresh jax-md neighbor-list
    function recompiles its allocation, and a fresh energy closure recompiles everything
    jitted around it. So the energy function is built once per layout, and the
    neighbor-list function once per interaction range.
    """

    def __init__(self, pot, neighbor_list=None):
        self.pot = pot
        self.neighbor_options = as_neighbor_list(neighbor_list)
        self._energy = {}
        self._nl = None

    def __call__(self, result, params, neighbor) -> DerivativeProblem:
        system = getattr(result, "system", result)
        if not isinstance(system, System):
            raise StructureError(
                "the derivative routines need a RelaxResult (from ms.relax) or a relaxed "
                f"ms.System; got {type(result).__name__}."
            )
        if system.n_atoms == 0:
            raise StructureError("the system has no atoms; there is nothing to differentiate.")
        pot = self.pot
        params = pot.check(system, pot.params if params is None else params)
        cutoff = pot.cutoff(params)
        use_nl = neighbor is not None or uses_neighbor_list(pot, system, self.neighbor_options)
        layout = (system.n_atoms, system.dim, system.pbc, system.symbols,
                  tuple(np.asarray(system.species).tolist()), use_nl)
        if layout not in self._energy:
            self._energy[layout] = pot.energy_fn(system, neighbor_list=use_nl, params=params)
        if neighbor is not None:
            neighbors.check_valid(neighbor, system, cutoff, "the derivative")
        elif use_nl:
            neighbor = relaxation_neighbors(result, system, cutoff)
            if neighbor is None:
                nl = self._nl
                if nl is None or nl.cutoff < cutoff or nl.n_atoms != system.n_atoms:
                    nl = self._nl = pot.neighbor_list_fn(system, params, **self.neighbor_options.kwargs())
                neighbor = nl.allocate(system.positions, system.cell)
        converged = getattr(result, "converged", None)
        recorded = getattr(result, "fmax", None)
        # Derivatives are taken at this one structure: the pairs within the cutoff suffice,
        # and every Hessian product then costs a fraction of one on the relaxation's list.
        interacting = neighbors.interacting_neighbors(system, cutoff, neighbor)
        energy = self._energy[layout]
        # One program builds the gradient (for the force checks) and the Hessian blocks;
        # the stability analysis and the solves take the blocks as data.
        gradient, blocks = _gradient_and_blocks(energy, system.positions, params, system.cell, interacting)
        return DerivativeProblem(system, params, energy, interacting,
                                 None if converged is None else bool(converged),
                                 None if recorded is None else float(recorded), gradient, blocks)


def check_stationary(prob: DerivativeProblem, strict: bool, strict_fmax: float,
                     what: str = "the derivative") -> float:
    """The largest force at the input, after the stationarity checks (module docstring).

    Reads ``prob.gradient`` (``∂E/∂R`` at the input, ``(N, d)``). Returns ``max_i |F_i|``.
    """
    g = np.asarray(prob.gradient)
    if not np.all(np.isfinite(g)):
        raise StructureError(
            f"the forces at the input structure are NaN/inf, so {what} cannot be computed. Usual "
            "causes: overlapping atoms, or parameters outside the potential's range."
        )
    fmax_now = float(np.sqrt(np.max(np.sum(g * g, axis=-1)))) if g.size else 0.0
    recorded = prob.recorded_fmax
    if (prob.converged and recorded is not None and fmax_now > strict_fmax
            and fmax_now > MISMATCH_FACTOR * max(recorded, 1e-300)):
        raise ResultMismatchError(
            f"this result was relaxed to max force {recorded:.3e}, but under the potential and "
            f"parameters given now its largest force is {fmax_now:.3e}: it was relaxed with another "
            "potential or other parameters. Pass the potential and params= it was relaxed with, "
            "or relax it again with these (ms.relax)."
        )
    if prob.converged is False or not fmax_now < strict_fmax:
        message = (
            f"{what} is asked of a structure that is not relaxed: its largest force is "
            f"{fmax_now:.3e} (threshold {strict_fmax:.1e}; relaxation converged={prob.converged}). "
            "The derivative's error grows with the force residual (Theorem 1; see "
            "error_estimate). Relax again with a smaller fmax or a larger max_steps."
        )
        if strict:
            raise NotConvergedError(message + " (strict=True)")
        warnings.warn(message, NotConvergedWarning, stacklevel=4)
    return fmax_now


def null_basis(prob: DerivativeProblem, stability, fmax_now: Optional[float] = None):
    """``(basis (k, N, d), n_soft, λ_min, λ_max)``: the stability analysis with
    :class:`~mdsens.md.options.StabilityOptions`, or the rigid modes for ``None``."""
    system = prob.system
    if stability is None:
        return zero_modes.rigid_modes(system.positions, system.pbc), 0, float("nan"), float("nan")
    return _analysed(lambda: zero_modes.stability(prob.energy, system.positions, system.pbc, stability,
                                                  args=(prob.params, system.cell, prob.neighbor),
                                                  blocks=prob.blocks), fmax_now)


def known_modes(prob: DerivativeProblem, stability):
    """:func:`mdsens.md.zero_modes.known_modes` of the problem (rigid modes, rattlers)."""
    system = prob.system
    return zero_modes.known_modes(prob.energy, system.positions, system.pbc, stability,
                                  args=(prob.params, system.cell, prob.neighbor), blocks=prob.blocks)


def probed_null_basis(known, tridiagonal, stability, fmax_now: Optional[float] = None):
    """:func:`null_basis` from the Lanczos tridiagonal of a CG solve on a random vector
    (:func:`mdsens.md.zero_modes.stability_from_lanczos`), or ``None`` when it cannot
    decide (then run :func:`null_basis`)."""
    return _analysed(lambda: zero_modes.stability_from_lanczos(known, tridiagonal, stability), fmax_now)


def _analysed(analyse, fmax_now):
    try:
        report = analyse()
    except SaddlePointError as err:
        if fmax_now is not None and fmax_now >= STRICT_FMAX:
            raise type(err)(
                f"{err} Note: the structure is not relaxed (largest force {fmax_now:.3e}), so this "
                "is likely not a saddle but a structure away from its minimum: relax it first."
            ) from None
        raise
    if report is None:
        return None
    return report.basis, report.n_soft, report.lambda_min, report.lambda_max

