"""``ms.propagate_uncertainty``: parameter uncertainty carried to relaxed observables.

For parameters ``θ ~ (θ₀, Σ)`` (``Σ`` over ``ravel_pytree(params)`` order, ``(P, P)``)
and a relaxed observable ``O(θ) = O(R*(θ), θ, cell*(θ))`` the linearisation
``O(θ) ≈ O(θ₀) + J (θ − θ₀)``, ``J = dO/dθ`` (implicit derivative), gives

    mean ≈ O(θ₀),        Cov[O] ≈ J Σ Jᵀ.

The mean is ``O(θ₀)`` to first order: its shift ``½ tr(Σ ∂²O/∂θ²)`` is second order in
``Σ`` and is not computed (it needs second derivatives of the relaxed state); the
linearisation holds when ``Σ`` is small against the curvature of ``O(θ)`` (compare with
a few re-relaxations, or :func:`~mdsens.predict` at ``θ₀ ± std``).

Two ways to get ``J`` (``mode=``):

* ``"forward"``: the columns ``dR*/dθ_j`` of :func:`~mdsens.sensitivity`, one solve per
  parameter, then any number of observables (positions, cell) at no extra solve;
* ``"reverse"``: one adjoint solve per scalar observable
  (:func:`~mdsens.observable_gradient`), whatever the number of parameters; scalar
  observables only (energy, stress components, user functions) and fixed cell.

``"auto"`` takes reverse when every observable is a scalar (or the stress) and there are
fewer scalar components than parameters, forward otherwise. Both give the same ``J``
up to the linear solves' tolerance.

Observables: ``"energy"`` (eV), ``"positions"`` (``(N, d)``, Å, gauge-fixed: no net
translation, and no net rotation for clusters), ``"stress"`` (Voigt, ASE sign, eV/Å³;
periodic, fixed cell), ``"cell"`` (``(d, d)``, Å; ``relax_cell=True``), and user functions
``O(positions (N, d), params, cell) -> scalar`` (jax-traceable; e.g. a defect formation
energy), given as ``{name: function}``.

Failure modes: a covariance of the wrong shape, not symmetric, not positive
semi-definite, or with NaN/inf (:class:`~mdsens.ParameterError`, naming the fix);
unknown observables, non-scalar user functions, a mode that cannot give an observable
(:class:`~mdsens.OptionError`); every error of ``ms.sensitivity``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import numpy as np

from mdsens.errors import OptionError
from mdsens.md import cache
from mdsens.md.errors import ParameterError
from mdsens.md.prediction import ParameterJacobian, evaluator, jacobian_in_stages, jacobian_stages
from mdsens.md.progress import structure_stages
from mdsens.md.sensitivity import DEFAULT_TOL, flat_params, observable_gradient, parameter_labels
from mdsens.md.strain import stress_from_energy, voigt_names
from mdsens.md.system import System

__all__ = ["ObservableUncertainty", "Uncertainty", "propagate_uncertainty", "checked_covariance", "BUILTIN"]

#: The observables known by name.
BUILTIN = ("energy", "positions", "stress", "cell")
#: Relative tolerances of the covariance checks (of ``max |Σ|``): asymmetry, and how
#: negative an eigenvalue may be from round-off before Σ counts as not PSD.
SYMMETRY_RTOL = 1e-10
PSD_RTOL = 1e-10


def checked_covariance(covariance, names: tuple) -> np.ndarray:
    """``covariance`` as a symmetric float64 ``(P, P)`` array, or :class:`ParameterError`."""
    n = len(names)
    try:
        S = np.array(covariance, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ParameterError(f"covariance must be a ({n}, {n}) array of numbers; {err}.") from None
    if S.shape != (n, n):
        raise ParameterError(
            f"covariance must be ({n}, {n}) over the flat parameters in ravel_pytree(params) order "
            f"{list(names)}; got shape {S.shape}. For independent parameters pass np.diag(std**2) "
            "(zeros for parameters without uncertainty).")
    if not np.all(np.isfinite(S)):
        raise ParameterError("covariance contains NaN or inf; give finite (co)variances (0 for none).")
    scale = float(np.abs(S).max()) if S.size else 0.0
    asym = float(np.abs(S - S.T).max()) if S.size else 0.0
    if asym > SYMMETRY_RTOL * scale:
        raise ParameterError(
            f"covariance is not symmetric (max |Σ − Σᵀ| = {asym:.3e}, max |Σ| = {scale:.3e}); a covariance "
            "matrix is symmetric: pass (Σ + Σᵀ)/2 if the asymmetry is round-off.")
    S = 0.5 * (S + S.T)
    lowest = float(np.linalg.eigvalsh(S).min()) if S.size else 0.0
    if lowest < -PSD_RTOL * scale:
        raise ParameterError(
            f"covariance is not positive semi-definite (smallest eigenvalue {lowest:.3e}, max |Σ| = "
            f"{scale:.3e}); variances cannot be negative and |correlations| cannot exceed 1. Check "
            "its construction, e.g. Σ = D C D with D = diag(std) and C a valid correlation matrix.")
    return S


# ------------------------------------------------------------------------ results
@dataclasses.dataclass(frozen=True)
class ObservableUncertainty:
    """Linearised statistics of one relaxed observable.

    Attributes:
      name: the observable's name.
      value: ``O(θ₀)``, the observable's shape ``S`` (``()`` for scalars), in its units;
        also the first-order mean.
      jacobian: ``dO/dθ``, ``(size, P)`` with ``size = prod(S)`` (flattened components,
        C order), units of O per parameter unit.
      std: ``sqrt(diag(J Σ Jᵀ))``, shape ``S``, units of O.
      parameter_covariance: ``Σ``, ``(P, P)``.
    """

    name: str
    value: np.ndarray
    jacobian: np.ndarray
    std: np.ndarray
    parameter_covariance: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """First-order mean: ``O(θ₀)`` (the shift ``½ tr(Σ O'')`` is not included)."""
        return self.value

    @property
    def covariance(self) -> np.ndarray:
        """``J Σ Jᵀ``, ``(size, size)`` over the flattened components."""
        return self.jacobian @ self.parameter_covariance @ self.jacobian.T

    @property
    def variance(self) -> np.ndarray:
        """``std²``, shape ``S``."""
        return self.std ** 2


@dataclasses.dataclass(frozen=True)
class Uncertainty:
    """Result of :func:`propagate_uncertainty`: one :class:`ObservableUncertainty` per
    observable, by name (``u["energy"]``, ``u.observables``).

    Attributes:
      observables: ``{name: ObservableUncertainty}`` in the order asked (do not mutate).
      parameter_names: labels of the ``P`` flat parameters (``ravel_pytree`` order).
      parameter_covariance: ``Σ``, ``(P, P)`` (symmetrized).
      mode: ``"forward"`` or ``"reverse"``, how the Jacobians were computed.
      relax_cell: whether the cell followed the parameters (zero-stress result).
      jacobian: the forward :class:`~mdsens.md.prediction.ParameterJacobian` (reusable
        by ``ms.predict(..., jacobian=)``), ``None`` in reverse mode.
    """

    observables: dict
    parameter_names: tuple
    parameter_covariance: np.ndarray
    mode: str
    relax_cell: bool
    jacobian: Optional[ParameterJacobian] = None

    def __getitem__(self, name: str) -> ObservableUncertainty:
        try:
            return self.observables[name]
        except KeyError:
            raise KeyError(f"no observable {name!r}; this result has {list(self.observables)}.") from None

    def __contains__(self, name) -> bool:
        return name in self.observables

    def _get(self, name, attr):
        if name not in self.observables:
            raise AttributeError(f"{name!r} was not among the observables ({list(self.observables)}); "
                                 f"pass observables=[..., {name!r}].")
        return getattr(self.observables[name], attr)

    @property
    def energy_mean(self) -> float:
        """Relaxed energy at θ₀ (eV), the first-order mean."""
        return float(self._get("energy", "value"))

    @property
    def energy_std(self) -> float:
        """Standard deviation of the relaxed energy (eV)."""
        return float(self._get("energy", "std"))

    @property
    def positions_std(self) -> np.ndarray:
        """``(N, d)`` standard deviations of the relaxed positions (Å, gauge-fixed)."""
        return self._get("positions", "std")

    @property
    def stress_std(self) -> np.ndarray:
        """Standard deviations of the relaxed Voigt stress (eV/Å³)."""
        return self._get("stress", "std")

    @property
    def cell_std(self) -> np.ndarray:
        """``(d, d)`` standard deviations of the relaxed cell (Å, ``relax_cell``)."""
        return self._get("cell", "std")

    def covariance(self, *names: str) -> np.ndarray:
        """Joint covariance of the named observables' flattened components, in order
        (default: all), e.g. ``u.covariance("energy", "E_f")`` is ``(2, 2)``."""
        J = np.concatenate([self[n].jacobian for n in (names or tuple(self.observables))])
        return J @ self.parameter_covariance @ J.T

    def table(self) -> str:
        """Value and standard deviation of every scalar component (positions: the largest)."""
        lines = [f"linearised uncertainty ({self.mode} mode), {len(self.parameter_names)} parameters"]
        for name, o in self.observables.items():
            if name in ("positions", "cell"):
                lines.append(f"{name:>16}  max std {float(np.max(o.std)):.6g}")
                continue
            for k, (v, s) in enumerate(zip(np.ravel(o.value), np.ravel(o.std))):
                label = name if np.size(o.value) == 1 else f"{name}[{k}]"
                lines.append(f"{label:>16}  {v: .10g} ± {s:.6g}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ------------------------------------------------------------------------ propagation
def _requested(observables, system: System, relax_cell: bool) -> dict:
    """``{name: builtin name or callable}``, checked."""
    if observables is None:
        names = ["energy", "positions"] + (["cell"] if relax_cell else ["stress"] if system.pbc else [])
        return {n: n for n in names}
    if isinstance(observables, str) or callable(observables):
        observables = [observables]
    items = observables.items() if isinstance(observables, dict) else [(o, o) for o in observables]
    out = {}
    for name, spec in items:
        if isinstance(spec, str):
            if spec not in BUILTIN:
                raise OptionError(f"unknown observable {spec!r}; built-in ones are {BUILTIN}, and "
                                  "{name: O(positions, params, cell)} adds a function.")
            if spec == "stress" and (not system.pbc or relax_cell):
                raise OptionError("the 'stress' observable needs a periodic system at fixed cell (it is zero "
                                  "with relax_cell=True).")
            if spec == "cell" and not relax_cell:
                raise OptionError("the 'cell' observable needs relax_cell=True (at fixed cell it does not change).")
        elif not callable(spec):
            raise OptionError(f"observable {name!r} must be one of {BUILTIN} or a function "
                              f"O(positions, params, cell) -> scalar; got {spec!r}.")
        out[str(name)] = spec
    if not out:
        raise OptionError("observables is empty; name at least one (e.g. ['energy']).")
    return out


def _scalar_value(O, name, R, params, cell):
    try:
        shape = jax.eval_shape(O, R, params, cell).shape
    except Exception as err:
        raise OptionError(f"observable {name!r} could not be evaluated as O(positions (N, d), params, cell): "
                          f"{type(err).__name__}: {err}") from None
    if shape != ():
        raise OptionError(f"observable {name!r} must return a scalar; it returns shape {shape}.")
    return np.asarray(_compiled(O, "value", lambda: O)(R, params, cell), np.float64)


def _compiled(O, what: str, build):
    """``jax.jit(build())`` memoized per observable: run eagerly, each of a user
    observable's operations compiles on its own (minutes for a neighbor-list energy)."""
    return cache.memoized(("uncertainty_" + what, cache.hashable(O)), lambda: jax.jit(build()))


def _forward_rows(O, R, params, cell, jac: ParameterJacobian) -> np.ndarray:
    """``(1, P)``: ``∂O/∂θ + ∂O/∂R · dR*/dθ (+ ∂O/∂cell · dcell*/dθ)``."""
    if cell is None:
        gR, gp = _compiled(O, "grad_free", lambda: jax.grad(O, argnums=(0, 1)))(R, params, cell)
        gC = None
    else:
        gR, gp, gC = _compiled(O, "grad_periodic", lambda: jax.grad(O, argnums=(0, 1, 2)))(R, params, cell)
    row = flat_params(gp) + np.tensordot(jac.positions, np.asarray(gR), axes=2)
    if gC is not None and jac.cell is not None:
        row = row + np.tensordot(jac.cell, np.asarray(gC), axes=2)
    return row[None, :]


def propagate_uncertainty(result, pot, covariance, observables=None, *, params=None, mode: str = "auto",
                          relax_cell: bool = False, jacobian: Optional[ParameterJacobian] = None,
                          solve: Optional[Callable] = None, tol: float = DEFAULT_TOL, stability=True,
                          neighbor_list=None, on_failure: str = "raise",
                          progress: Optional[bool] = None) -> Uncertainty:
    """Linearised mean and covariance of relaxed observables under parameter uncertainty.

    Args:
      result: a ``RelaxResult`` (``ms.relax``) or a relaxed ``System``.
      pot: the potential; ``params`` the parameters θ₀ it was relaxed with (default
        ``pot.params``).
      covariance: ``Σ``, ``(P, P)`` over ``ravel_pytree(params)`` order (dict keys
        sorted, each leaf flattened in C order; labels as ``ms.sensitivity(...).names``),
        symmetric positive semi-definite, in parameter units squared.
      observables: ``None`` (energy, positions, and the stress (fixed cell) or the cell
        (``relax_cell``)); a list of built-in names (``"energy"``, ``"positions"``,
        ``"stress"``, ``"cell"``); or a dict ``{name: "builtin" or O}`` with
        ``O(positions (N, d), params, cell) -> scalar`` (jax-traceable).
      mode: ``"auto"``, ``"forward"`` (sensitivity columns, one solve per parameter) or
        ``"reverse"`` (one adjoint solve per scalar component; scalar observables and
        fixed cell only). See the module docstring.
      relax_cell: ``result`` was relaxed with ``relax_cell=True``: the cell follows θ
        (forward mode).
      jacobian: a :class:`~mdsens.md.prediction.ParameterJacobian` of this result
        (``Prediction.jacobian``, ``Uncertainty.jacobian``) to reuse in forward mode.
      solve, tol, stability, neighbor_list, on_failure: as :func:`~mdsens.sensitivity`.
      progress: show the stages on stderr (forward: the sensitivity solves, then the
        observables; reverse: one stage per adjoint solve, i.e. per scalar component);
        default: when stderr is a terminal.

    Returns:
      :class:`Uncertainty`: per observable the value at θ₀ (= the first-order mean),
      ``std`` and ``covariance``; ``.energy_std``, ``.positions_std``, ...

    Raises:
      ParameterError: a covariance of the wrong shape, asymmetric, not PSD, or NaN/inf.
      OptionError: unknown observables, a non-scalar function, ``mode="reverse"`` with
        positions, cell or ``relax_cell``; and the errors of ``ms.sensitivity``.
    """
    if mode not in ("auto", "forward", "reverse"):
        raise OptionError(f"mode must be 'auto', 'forward' or 'reverse'; got {mode!r}.")
    system = getattr(result, "system", result)
    if not isinstance(system, System):
        raise OptionError(f"need a RelaxResult (from ms.relax) or a relaxed ms.System; got {type(result).__name__}.")
    if relax_cell and not system.pbc:
        raise OptionError("relax_cell=True needs a periodic system (the cell follows θ); this one is free.")
    params = pot.check(system, pot.params if params is None else params)
    names = parameter_labels(params)
    sigma = checked_covariance(covariance, names)
    wanted = _requested(observables, system, relax_cell)
    vectors = [n for n, s in wanted.items() if s in ("positions", "cell")]
    nv = len(voigt_names(system.dim))
    n_scalar = sum(nv if s == "stress" else 1 for s in wanted.values() if s not in ("positions", "cell"))
    if mode == "reverse" and (vectors or relax_cell):
        raise OptionError(
            f"mode='reverse' gives scalar observables at fixed cell; {vectors or 'relax_cell=True'} needs "
            "mode='forward' (one solve per parameter covers every component).")
    if mode == "auto":
        mode = "reverse" if not vectors and not relax_cell and n_scalar < len(names) else "forward"

    options = dict(params=params, solve=solve, tol=tol, stability=stability, neighbor_list=neighbor_list,
                   on_failure=on_failure)
    if mode == "forward":
        total = (jacobian_stages(relax_cell) if jacobian is None else 0) + 1
    else:
        total = n_scalar
    with structure_stages(progress, "propagate_uncertainty", result, params, total) as stages:
        rows, values, jac = _jacobian_rows(result, pot, wanted, mode, relax_cell, jacobian, options, nv, stages)
    out = {}
    for name in wanted:
        J = np.asarray(rows[name], np.float64)
        var = np.maximum(np.einsum("ip,pq,iq->i", J, sigma, J), 0.0)
        value = np.asarray(values[name], np.float64)
        out[name] = ObservableUncertainty(name=name, value=value, jacobian=J,
                                          std=np.sqrt(var).reshape(value.shape), parameter_covariance=sigma)
    return Uncertainty(observables=out, parameter_names=names, parameter_covariance=sigma, mode=mode,
                       relax_cell=bool(relax_cell), jacobian=jac)


def _jacobian_rows(result, pot, wanted, mode, relax_cell, jacobian, options, nv, stages):
    """``(rows, values, jacobian)``: per observable ``J`` (rows over the parameters) and
    ``O(θ₀)``, and the forward-mode :class:`ParameterJacobian` (``None`` in reverse
    mode). Reports each solve program to ``stages``; inner calls show no bar."""
    system = getattr(result, "system", result)
    params, neighbor_list = options["params"], options["neighbor_list"]
    names = parameter_labels(params)
    ev = evaluator(pot, system, params, neighbor_list)
    nb = ev.neighbor(system, params)
    R, cell = system.positions, system.cell
    E = ev.energy_fn
    energy_of = lambda x, p, c: E(x, p, c, nb)  # noqa: E731
    stress_of = lambda x, p, c: stress_from_energy(E, x, p, c, nb)  # noqa: E731
    rows, values = {}, {}
    if mode == "forward":
        jac = jacobian
        if jac is None:
            jac = jacobian_in_stages(result, pot, system, params, relax_cell, options, stages)
        elif not isinstance(jac, ParameterJacobian) or jac.relax_cell != bool(relax_cell) \
                or not np.allclose(jac.values, flat_params(params), rtol=1e-12, atol=0.0) \
                or jac.reference_positions.shape != tuple(R.shape) \
                or not np.allclose(jac.reference_positions, np.asarray(R), rtol=0.0, atol=1e-12):
            raise OptionError("jacobian= was computed for another structure, other parameters or another "
                              "relax_cell; leave it out or pass the one of this result.")
        P = len(names)
        stages.start("observables")
        for name, spec in wanted.items():
            if spec == "energy":
                values[name], rows[name] = np.asarray(jac.reference_energy), jac.energy[None, :]
            elif spec == "positions":
                values[name], rows[name] = np.asarray(R, np.float64), jac.positions.reshape(P, -1).T
            elif spec == "cell":
                values[name], rows[name] = np.asarray(cell, np.float64), jac.cell.reshape(P, -1).T
            elif spec == "stress":
                values[name] = np.asarray(stress_of(R, params, cell))
                rows[name] = jac.stress.T
            else:
                values[name] = _scalar_value(spec, name, R, params, cell)
                rows[name] = _forward_rows(spec, R, params, cell, jac)
    else:
        jac = None

        def adjoint(O, label):
            stages.start(f"adjoint solve: {label}")  # one solve program per scalar component
            return flat_params(observable_gradient(result, pot, O, **options))[None, :]

        for name, spec in wanted.items():
            if spec == "energy":
                values[name] = np.asarray(energy_of(R, params, cell))
                rows[name] = adjoint(energy_of, name)
            elif spec == "stress":
                values[name] = np.asarray(stress_of(R, params, cell))
                labels = voigt_names(system.dim)
                rows[name] = np.concatenate([adjoint(lambda x, p, c, I=I: stress_of(x, p, c)[I],
                                                     f"{name}_{labels[I]}") for I in range(nv)])
            else:
                values[name] = _scalar_value(spec, name, R, params, cell)
                rows[name] = adjoint(spec, name)
    return rows, values, jac
