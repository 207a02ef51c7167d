"""Option objects: every knob of the physics layer, listed once, validated at construction.

They are small frozen dataclasses, accepted the same way by ``relax``, ``sensitivity``,
``observable_gradient``, ``elastic_constants`` and their ``make_*`` forms:

* ``minimizer=``: :class:`LBFGS` (default), :class:`FIRE` or :class:`GradientDescent`, or
  their names ``"fire"`` / ``"lbfgs"`` / ``"gradient_descent"``;
* ``neighbor_list=``: ``None`` (automatic), ``True``/``False``, or
  :class:`NeighborListOptions`;
* ``stability=``: ``True`` (default checks), ``False`` (rigid modes only), or
  :class:`StabilityOptions`.

An invalid value raises :class:`~mdsens.errors.OptionError` when the object is built,
never later inside a computation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

from mdsens.errors import OptionError

__all__ = [
    "FIRE",
    "GradientDescent",
    "LBFGS",
    "NeighborListOptions",
    "StabilityOptions",
    "DEFAULT_MINIMIZER",
    "as_minimizer",
    "as_neighbor_list",
    "as_stability",
]


def _floats(obj, *names):
    """Store the named fields as Python floats (an int time step would give jax-md an
    integer dtype inside its while_loop)."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            object.__setattr__(obj, name, float(value))


def _number(owner, name, value, *, positive=True, allow_none=False, allow_zero=False, integer=False):
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value) == int(value)
    if ok and positive:
        ok = value > 0 or (allow_zero and value == 0)
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = " >= 0" if allow_zero else (" > 0" if positive else "")
        none = " or None" if allow_none else ""
        raise OptionError(f"{owner}: {name} must be {kind}{bound}{none}; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class FIRE:
    """jax-md's FIRE (Bitzek et al. 2006), with mdsens' mass and step conventions.

    Attributes:
      dt_start, dt_max: time steps in units of ``1/ω_max`` (the mass is the largest
        Hessian eigenvalue, so the stiffest mode has unit angular frequency; velocity
        Verlet is stable for ``dt < 2``). Defaults 0.1 and 1.0.
      maxstep: largest per-atom displacement per step (length units), ASE's 0.2 Å;
        ``None``: no limit.
      chunk_size: steps per jitted chunk between host checks (neighbor-list overflow,
        progress). Default 250.
      cell_factor: scale of the cell variable with ``relax_cell`` (default ``N``, like
        ASE's ``UnitCellFilter``).
    """

    dt_start: float = 0.1
    dt_max: float = 1.0
    maxstep: Optional[float] = 0.2
    chunk_size: int = 250
    cell_factor: Optional[float] = None

    name = "fire"

    def __post_init__(self):
        _number("FIRE", "dt_start", self.dt_start)
        _number("FIRE", "dt_max", self.dt_max)
        if self.dt_start > self.dt_max:
            raise OptionError(f"FIRE: dt_start ({self.dt_start}) must not exceed dt_max ({self.dt_max}).")
        _number("FIRE", "maxstep", self.maxstep, allow_none=True)
        _number("FIRE", "chunk_size", self.chunk_size, integer=True)
        _number("FIRE", "cell_factor", self.cell_factor, allow_none=True)
        _floats(self, "dt_start", "dt_max", "maxstep", "cell_factor")
        object.__setattr__(self, "chunk_size", int(self.chunk_size))


@dataclasses.dataclass(frozen=True)
class GradientDescent:
    """The fixed-point map ``T(x) = x − η ∇E(x)``: linear convergence, for checks and
    for ``custom_fixed_point``, not for speed.

    Attributes:
      step_size: ``η`` (length²/energy); default ``1/λ_max`` (estimated at the start).
      chunk_size, cell_factor: as in :class:`FIRE`.
    """

    step_size: Optional[float] = None
    chunk_size: int = 250
    cell_factor: Optional[float] = None

    name = "gradient_descent"

    def __post_init__(self):
        _number("GradientDescent", "step_size", self.step_size, allow_none=True)
        _number("GradientDescent", "chunk_size", self.chunk_size, integer=True)
        _number("GradientDescent", "cell_factor", self.cell_factor, allow_none=True)
        _floats(self, "step_size", "cell_factor")
        object.__setattr__(self, "chunk_size", int(self.chunk_size))


@dataclasses.dataclass(frozen=True)
class LBFGS:
    """Limited-memory BFGS (Nocedal 1980) with a backtracking Armijo line search.

    The two-loop recursion over the last ``memory`` pairs ``(s, y)`` gives the step; the
    first step, and any step after a reset, is ``−g / λ_max``. The step is scaled so that no
    row of the variable moves more than ``maxstep``, then halved (with a quadratic guess)
    until the energy decreases by Armijo's rule, within the energy's round-off. A pair with
    ``sᵀy <= 0`` is not stored; a line search that fails ``max_backtracks`` times clears
    the memory.

    Attributes:
      memory: stored pairs ``m`` (ASE's default is 100; 10-20 is usual). Default 10.
      maxstep: largest per-row displacement per step (length units), ASE's 0.2 Å.
      armijo: sufficient-decrease constant ``c₁``. Default 1e-4.
      max_backtracks: line-search trials per step before the memory is cleared. Default 10.
      chunk_size, cell_factor: as in :class:`FIRE`.
    """

    memory: int = 10
    maxstep: float = 0.2
    armijo: float = 1e-4
    max_backtracks: int = 10
    chunk_size: int = 250
    cell_factor: Optional[float] = None

    name = "lbfgs"

    def __post_init__(self):
        _number("LBFGS", "memory", self.memory, integer=True)
        _number("LBFGS", "maxstep", self.maxstep)
        _number("LBFGS", "armijo", self.armijo)
        if self.armijo >= 0.5:
            raise OptionError(f"LBFGS: armijo must be in (0, 0.5); got {self.armijo}.")
        _number("LBFGS", "max_backtracks", self.max_backtracks, integer=True)
        _number("LBFGS", "chunk_size", self.chunk_size, integer=True)
        _number("LBFGS", "cell_factor", self.cell_factor, allow_none=True)
        _floats(self, "maxstep", "armijo", "cell_factor")
        for name in ("memory", "max_backtracks", "chunk_size"):
            object.__setattr__(self, name, int(getattr(self, name)))


Minimizer = Union[FIRE, GradientDescent, LBFGS]
#: The minimizer every relaxation uses unless told otherwise: it needs 4-10x fewer force
#: evaluations than FIRE on crystals and packings (benchmarks/RESULTS.md).
DEFAULT_MINIMIZER = LBFGS()
_MINIMIZERS = {"fire": FIRE, "gradient_descent": GradientDescent, "lbfgs": LBFGS}


def as_minimizer(value) -> Minimizer:
    """A :class:`FIRE`, :class:`LBFGS` or :class:`GradientDescent` from itself or its name."""
    if isinstance(value, (FIRE, GradientDescent, LBFGS)):
        return value
    if isinstance(value, str) and value.lower() in _MINIMIZERS:
        return _MINIMIZERS[value.lower()]()
    raise OptionError(
        f"unknown minimizer {value!r}; use 'fire', 'lbfgs', 'gradient_descent', ms.FIRE(...), "
        "ms.LBFGS(...) or ms.GradientDescent(...)."
    )


@dataclasses.dataclass(frozen=True)
class NeighborListOptions:
    """Neighbor lists (see ``docs/design.md``, "Neighbor lists").

    Attributes:
      enabled: ``None`` chooses per potential (``N >= pot.neighbor_list_min_atoms``);
        ``True``/``False`` forces lists or the dense all-pairs path.
      skin: motion allowance (length): the list is rebuilt when an atom moved more than
        ``skin/2``; default ``0.1 × cutoff``. ``>= 0``.
      margin: box-deformation allowance (length); default ``skin/2``. ``>= 0``.
      capacity_multiplier: spare slots at allocation (jax-md's), ``>= 1``.
    """

    enabled: Optional[bool] = None
    skin: Optional[float] = None
    margin: Optional[float] = None
    capacity_multiplier: float = 1.25

    def __post_init__(self):
        if self.enabled not in (None, True, False):
            raise OptionError(f"NeighborListOptions: enabled must be None, True or False; got {self.enabled!r}.")
        _number("NeighborListOptions", "skin", self.skin, allow_none=True, allow_zero=True)
        _number("NeighborListOptions", "margin", self.margin, allow_none=True, allow_zero=True)
        _number("NeighborListOptions", "capacity_multiplier", self.capacity_multiplier)
        _floats(self, "skin", "margin", "capacity_multiplier")
        if self.capacity_multiplier < 1:
            raise OptionError(
                f"NeighborListOptions: capacity_multiplier must be >= 1; got {self.capacity_multiplier}."
            )

    def kwargs(self) -> dict:
        """The list-building keywords (``skin``, ``margin``, ``capacity_multiplier``)."""
        return dict(skin=self.skin, margin=self.margin, capacity_multiplier=self.capacity_multiplier)


def as_neighbor_list(value) -> NeighborListOptions:
    """:class:`NeighborListOptions` from ``None``, a bool, or itself."""
    if isinstance(value, NeighborListOptions):
        return value
    if value is None or isinstance(value, bool):
        return NeighborListOptions(enabled=value)
    raise OptionError(
        f"neighbor_list must be None (automatic), True, False or ms.NeighborListOptions(...); "
        f"got {value!r}."
    )


@dataclasses.dataclass(frozen=True)
class StabilityOptions:
    """The stability analysis of a relaxed structure (see :mod:`mdsens.md.zero_modes`).

    Attributes:
      method: ``"auto"`` (dense up to ``dense_max_dof`` degrees of freedom, else Lanczos),
        ``"dense"``, ``"lanczos"`` (one Lanczos run; LOBPCG takes over when it meets a
        soft mode or does not converge) or ``"lobpcg"``.
      soft_mode_rtol: ``|λ| / λ_max`` at or below which a mode is a zero mode.
      saddle_rtol: ``λ / λ_max`` below ``−saddle_rtol`` is a saddle.
      near_singular_rtol: ``λ_min / λ_max`` below which a warning is issued.
      isolated_dof_rtol: threshold of the random probing for rattlers; ``None`` skips it.
      dense_max_dof: largest ``N·d`` handled by a dense eigendecomposition.
      maxiter: Lanczos iterations, and LOBPCG iterations per round.
      residual_rtol: residual ``/ λ_max`` accepted for the pairs the report uses.
      lambda_min_rtol: relative accuracy of ``λ_min`` that stops the iteration.
      rounds: LOBPCG rounds (block doubled each) to get past soft modes.
      lobpcg_modes: lowest eigenpairs LOBPCG seeks in its first round.
      lobpcg_chunk: LOBPCG runs in restarted chunks of this many iterations.
      lobpcg_tol: residual ``/ λ_max`` LOBPCG iterates for (its whole block).
      raise_on_saddle: raise :class:`~mdsens.SaddlePointError` on a saddle.
      warn: warn for a nearly singular Hessian and an unconverged eigen-solver.
    """

    method: str = "auto"
    soft_mode_rtol: float = 1e-10
    saddle_rtol: float = 1e-7
    near_singular_rtol: float = 1e-7
    isolated_dof_rtol: Optional[float] = 1e-12
    dense_max_dof: int = 300
    maxiter: int = 400
    residual_rtol: float = 1e-8
    lambda_min_rtol: float = 1e-2
    rounds: int = 4
    lobpcg_modes: int = 8
    lobpcg_chunk: int = 100
    lobpcg_tol: float = 1e-12
    raise_on_saddle: bool = True
    warn: bool = True

    def __post_init__(self):
        if self.method not in ("auto", "dense", "lanczos", "lobpcg"):
            raise OptionError(
                f"StabilityOptions: method must be 'auto', 'dense', 'lanczos' or 'lobpcg'; got {self.method!r}."
            )
        for name in ("soft_mode_rtol", "saddle_rtol", "near_singular_rtol", "lobpcg_tol", "residual_rtol",
                     "lambda_min_rtol"):
            _number("StabilityOptions", name, getattr(self, name))
        _number("StabilityOptions", "isolated_dof_rtol", self.isolated_dof_rtol, allow_none=True)
        for name in ("lobpcg_modes", "maxiter", "lobpcg_chunk", "rounds"):
            _number("StabilityOptions", name, getattr(self, name), integer=True)
        _number("StabilityOptions", "dense_max_dof", self.dense_max_dof, integer=True, allow_zero=True)
        for name in ("raise_on_saddle", "warn"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"StabilityOptions: {name} must be True or False; got {getattr(self, name)!r}.")


def as_stability(value) -> Optional[StabilityOptions]:
    """:class:`StabilityOptions` for ``True`` or itself; ``None`` for ``False`` (no analysis)."""
    if isinstance(value, StabilityOptions):
        return value
    if value is True:
        return StabilityOptions()
    if value is False:
        return None
    raise OptionError(f"stability must be True, False or ms.StabilityOptions(...); got {value!r}.")
