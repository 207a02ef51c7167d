"""Sensitivities of a relaxed structure to force-field parameters and to the cell.

A relaxed structure ``R*(θ)`` is a root of the optimality condition

    F(R, θ) = ∇_R E(R, θ, cell) = 0,                     ∂₁F = H (symmetric Hessian)

and the implicit function theorem gives ``dR*/dθ = −H⁺ ∂²E/∂R∂θ`` (the core's
:func:`mdsens.implicit.root_jvp`, one linear solve per scalar parameter, batched with
``jax.vmap``). No relaxation step is ever differentiated.

**Gauge.** ``H`` is singular along rigid translations (and rotations of a free cluster)
and along rattlers. Those modes are declared as the core's ``nullspace=`` (see
:mod:`mdsens.md.zero_modes`), so the derivative returned is the minimum-norm one: no net
translation ``Σ_i dR_i/dθ = 0``, for clusters no net rotation about the centroid, and no
motion along a rattler's free directions.

**Cell (strain) sensitivities.** ``wrt="cell"`` differentiates w.r.t. a homogeneous
symmetric strain ``ε`` applied at fixed fractional coordinates: ``cell → cell (I + ε)``,
``R = U (I + ε)`` with the internal coordinates ``U`` relaxed,
``F(U, ε) = ∇_U E(U (I+ε), θ, cell (I+ε))``. Components are Voigt with engineering
shear strains: ``(xx, yy, zz, yz, xz, xy)`` in 3D, ``(xx, yy, xy)`` in 2D, where the
shear component ``γ_yz = 2 ε_yz``. Then ``dE*/dε_I = V σ_I`` (ASE's stress sign). The
positions derivative reported is the total one, ``dR*/dε_I = dU*/dε_I + R* E_I``
(affine part about the Cartesian origin, plus the internal relaxation, whose gauge is
fixed as above); ``internal`` holds the internal relaxation alone.

**Per-species parameters.** Each element of each params leaf is its own scalar
parameter (the convention of ``jax.jacfwd``). mdsens' pair potentials symmetrize an
``(S, S)`` matrix inside the energy, so the effect of changing the pair parameter
``p_ab = p_ba`` together is the sum of the ``[a,b]`` and ``[b,a]`` columns (each is half
of it when ``a ≠ b``).

**Error estimate (Theorem 1 of Blondel et al. 2022).** At an approximate minimum ``R``
the Jacobian computed there differs from the exact one at ``R*`` by at most
``C ‖R − R*‖``, with ``C = β/α + γ ‖B‖/α²`` (α: smallest curvature, β, γ: Lipschitz
constants of ``B = ∂F/∂θ`` and ``A = ∂F/∂R`` in ``R``). mdsens reports for every
parameter the local estimate

    C_j = (‖∂_R b_j [û]‖ + ‖∂³E[û, dR_j]‖) / λ_min,     ‖R − R*‖ ≲ ‖P ∇E‖ / λ_min,

with ``û`` the unit direction of the projected force residual ``P ∇E`` and ``λ_min``
the smallest non-zero Hessian eigenvalue (it equals the theorem's constant with the
Lipschitz constants replaced by directional derivatives along ``û`` and ``‖B‖/α`` by
``‖dR_j‖``), and ``error_estimate_j = C_j · ‖P ∇E‖ / λ_min`` (same units as ``dR/dθ``,
absolute, Euclidean norm over all atoms). It grows linearly with the force residual:
relax tighter to shrink it.

Units: ``positions`` derivatives in length / (parameter unit); ``energy`` in energy /
(parameter unit); for strain, per unit (dimensionless) strain.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import warnings
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mdsens.implicit import linear_solve as _ls
from mdsens.implicit.root import LinearSolveError, LinearSolveWarning, root_jvp, root_vjp
from mdsens.md import zero_modes as _zm

__all__ = [
    "Sensitivity",
    "sensitivity",
    "make_sensitivity",
    "observable_gradient",
    "make_observable_gradient",
    "NotConvergedError",
    "STRICT_FMAX",
    "voigt_names",
    "voigt_strain_matrix",
    "deformation_gradient",
]

#: Largest per-atom force (force units) that ``strict=True`` accepts.
STRICT_FMAX = 1e-5
#: Default relative tolerance of the implicit linear solves.
DEFAULT_TOL = 1e-10


class NotConvergedError(RuntimeError):
    """``strict=True`` and the input structure is not relaxed to the required force."""


# ------------------------------------------------------------------------ strain helpers
def voigt_names(dim: int) -> tuple:
    """Voigt component labels: ``(xx, yy, zz, yz, xz, xy)`` (3D) or ``(xx, yy, xy)`` (2D)."""
    return ("xx", "yy", "zz", "yz", "xz", "xy") if dim == 3 else ("xx", "yy", "xy")


def _voigt_pairs(dim):
    return [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)] if dim == 3 else [(0, 0), (1, 1), (0, 1)]


def voigt_strain_matrix(eps_voigt, dim: int):
    """Symmetric strain tensor ``(d, d)`` from Voigt components with engineering shear.

    ``ε_ab = ε_ba = γ_I / 2`` for a shear component ``I``; diagonal components as is.
    """
    eps = jnp.zeros((dim, dim), jnp.float64)
    for I, (a, b) in enumerate(_voigt_pairs(dim)):
        if a == b:
            eps = eps.at[a, a].add(eps_voigt[I])
        else:
            eps = eps.at[a, b].add(0.5 * eps_voigt[I]).at[b, a].add(0.5 * eps_voigt[I])
    return eps


def deformation_gradient(eps_voigt, dim: int):
    """``I + ε`` for Voigt strain components: the affine map applied to positions and
    cell rows (``R (I+ε)``, ``cell (I+ε)``), i.e. strain at fixed fractional coordinates."""
    return jnp.eye(dim, dtype=jnp.float64) + voigt_strain_matrix(eps_voigt, dim)


# ------------------------------------------------------------------------ the problem
@dataclasses.dataclass(frozen=True)
class _Problem:
    """Everything the derivatives need, all explicit (no hidden state)."""

    system: object
    params: dict
    energy: Callable  # E(R, params, cell, neighbor)
    neighbor: object
    converged: Optional[bool]


def _relaxation_neighbors(result, system, cutoff):
    """The list a ``RelaxResult`` was confirmed with, if still valid for ``system``.

    It was built at the relaxed positions; it serves only if the caller's system is that
    very structure and the list covers ``cutoff`` (a parameter may have grown the range).
    """
    nb = getattr(result, "neighbor", None)
    if nb is None or getattr(nb, "cutoff", 0.0) < cutoff or nb.idx.shape[0] != system.n_atoms:
        return None
    return nb if getattr(result, "system", None) is system else None


class _ProblemBuilder:
    """Turns ``(result, params, neighbor)`` into a :class:`_Problem` for one potential.

    Reused by the ``make_*`` callables across calls: a fresh jax-md neighbor-list
    function recompiles its allocation (0.5 s at N = 512, more than the derivative
    itself), and a fresh energy closure recompiles everything jitted around it. So the
    energy function is built once per system layout, and the neighbor-list function
    once per interaction range (again only when a parameter grows the range).
    """

    def __init__(self, pot):
        self.pot = pot
        self._energy = {}
        self._nl = None

    def __call__(self, result, params, neighbor) -> _Problem:
        system = getattr(result, "system", result)
        if not hasattr(system, "positions"):
            raise TypeError(
                "sensitivity needs a RelaxResult (from ms.relax) or a System; got "
                f"{type(result).__name__}."
            )
        pot = self.pot
        params = pot.params if params is None else params
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), dict(params))
        from mdsens.md import neighbors as _nb
        from mdsens.md.potentials.base import Potential

        if isinstance(pot, Potential):
            params = pot.check(system, params)  # species, finite values, cutoff vs cell
            use_nl = neighbor is not None or _nb.use_neighbor_list(system.n_atoms, pot.neighbor_list_min_atoms)
            layout = (system.n_atoms, system.dim, system.pbc, system.symbols,
                      tuple(np.asarray(system.species).tolist()), use_nl)
            if layout not in self._energy:
                self._energy[layout] = pot.energy_fn(system, neighbor_list=use_nl, params=params)
            energy = self._energy[layout]
            if use_nl and neighbor is None:
                neighbor = _relaxation_neighbors(result, system, pot.cutoff(params))
            if use_nl and neighbor is None:
                nl = self._nl
                if nl is None or nl.cutoff < pot.cutoff(params) or nl.n_atoms != system.n_atoms:
                    nl = self._nl = pot.neighbor_list_fn(system, params)
                neighbor = nl.allocate(system.positions, system.cell)
            # Indices only: a fresh jax-md list's static metadata would recompile every call.
            neighbor = _nb.indices_only(neighbor)
        else:
            # Any object with the Potential contract's `params` and `energy_fn(system)`.
            energy = pot.energy_fn(system)
        converged = getattr(result, "converged", None)
        return _Problem(system, params, energy, neighbor, None if converged is None else bool(converged))


def _param_labels(params: dict) -> tuple:
    """Labels in ``ravel_pytree`` order (dict keys sorted): ``sigma``, ``sigma[0,1]``..."""
    labels = []
    for key in sorted(params):
        shape = np.shape(params[key])
        if shape == ():
            labels.append(key)
        else:
            for idx in np.ndindex(*shape):
                labels.append(f"{key}[{','.join(str(i) for i in idx)}]")
    return tuple(labels)


def _select(labels: tuple, wrt) -> np.ndarray:
    """Indices of the scalar parameters named by ``wrt`` (leaf names or element labels)."""
    if wrt == "params" or wrt is None:
        return np.arange(len(labels))
    if isinstance(wrt, str):
        wrt = [w.strip() for w in wrt.split(",") if w.strip()]
    chosen = []
    for name in wrt:
        hits = [i for i, lab in enumerate(labels) if lab == name or lab.split("[")[0] == name]
        if not hits:
            leaves = sorted({lab.split("[")[0] for lab in labels})
            raise KeyError(
                f"no parameter {name!r}; this potential has {leaves} (elements as "
                f"{list(labels)}). Pass wrt='params', 'cell', or a list of those names."
            )
        chosen.extend(h for h in hits if h not in chosen)
    return np.asarray(chosen, dtype=int)


def _default_solve(tol):
    return functools.partial(_ls.cg, tol=tol)


# ------------------------------------------------------------------------ result
@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """Derivatives of a relaxed structure w.r.t. scalar parameters (or strain components).

    Flat arrays are indexed by parameter ``j`` in the order of ``names``.

    Attributes:
      wrt: ``"params"`` or ``"cell"``.
      names: labels of the scalar parameters (``"sigma"``, ``"sigma[0,1]"``,
        ``"strain_xx"``...).
      values: their values at the relaxed state (strain: 0), ``(P,)``.
      dpositions: ``dR*/dθ_j``, ``(P, N, d)`` (length / parameter unit), gauge-fixed.
      denergy: total ``dE*/dθ_j`` (energy / parameter unit), ``(P,)``.
      denergy_partial: ``∂E/∂θ_j`` at fixed positions, ``(P,)`` (equal to ``denergy``
        at an exact minimum: envelope theorem).
      internal: strain only: the internal (non-affine) relaxation ``dU*/dε``,
        ``(P, N, d)``; ``None`` for params.
      solve_residual: relative residual of each implicit linear solve, ``(P,)``.
      solve_iterations: iterations of each solve, ``(P,)``.
      error_constant: Theorem-1 constant estimate ``C_j`` (see module doc), ``(P,)``.
      error_estimate: ``C_j · distance_bound`` (length / parameter unit), ``(P,)``.
      fmax: largest per-atom force at the input positions (force units).
      residual_norm: ``‖P ∇E‖``, the projected force residual (force units).
      distance_bound: ``‖P ∇E‖ / λ_min`` ≳ ``‖R − R*‖`` (length).
      lambda_min, lambda_max: Hessian eigenvalue range beyond the zero modes
        (energy/length²); NaN if the stability check was skipped.
      n_zero_modes: rigid + soft modes in the null space; n_soft_modes: the soft ones.
      relax_converged: the relaxation's own ``converged`` flag (None for a bare System).
      param_shapes: shape of each params leaf (params only), to rebuild pytrees.
      indices: flat indices (into ``ravel_pytree(params)``) of the parameters selected.
    """

    wrt: str
    names: tuple
    values: np.ndarray
    dpositions: np.ndarray
    denergy: np.ndarray
    denergy_partial: np.ndarray
    internal: Optional[np.ndarray]
    solve_residual: np.ndarray
    solve_iterations: np.ndarray
    error_constant: np.ndarray
    error_estimate: np.ndarray
    fmax: float
    residual_norm: float
    distance_bound: float
    lambda_min: float
    lambda_max: float
    n_zero_modes: int
    n_soft_modes: int
    relax_converged: Optional[bool]
    param_shapes: dict
    indices: np.ndarray

    # -- pytree views (like jax.jacfwd of the relaxed positions w.r.t. params) ----------
    def _as_tree(self, flat_rows, trailing):
        if self.wrt != "params":
            raise AttributeError("pytree views exist for wrt='params'; use the flat arrays.")
        total = int(sum(int(np.prod(s)) for s in self.param_shapes.values()))
        full = np.full((total,) + trailing, np.nan)
        full[self.indices] = flat_rows
        out, start = {}, 0
        for key in sorted(self.param_shapes):
            shape = tuple(self.param_shapes[key])
            size = int(np.prod(shape))
            block = full[start:start + size].reshape(shape + trailing)
            # leaf layout (*trailing, *shape), as jax.jacfwd returns it
            out[key] = np.moveaxis(block, tuple(range(len(shape))), tuple(range(len(trailing), len(trailing) + len(shape))))
            start += size
        return out

    @property
    def positions(self) -> dict:
        """dR*/dparams as a dict like params, each leaf ``(N, d, *leaf.shape)``; NaN
        for parameters not selected by ``wrt``."""
        return self._as_tree(self.dpositions, self.dpositions.shape[1:])

    @property
    def energy(self) -> dict:
        """dE*/dparams as a dict like params (each leaf shaped like the parameter)."""
        return self._as_tree(self.denergy, ())

    # -- tables ---------------------------------------------------------------------------
    def rows(self) -> list:
        """One dict per parameter: the columns of :meth:`table`, CSV and JSON."""
        rows = []
        for j, name in enumerate(self.names):
            d = self.dpositions[j]
            rows.append({
                "parameter": name,
                "value": float(self.values[j]),
                "dE/dtheta": float(self.denergy[j]),
                "partial_E/dtheta": float(self.denergy_partial[j]),
                "max_atom_|dR/dtheta|": float(np.sqrt(np.max(np.sum(d * d, axis=-1)))) if d.size else 0.0,
                "norm_dR/dtheta": float(np.linalg.norm(d)),
                "solve_residual": float(self.solve_residual[j]),
                "error_constant": float(self.error_constant[j]),
                "error_estimate": float(self.error_estimate[j]),
            })
        return rows

    def table(self) -> str:
        """A fixed-width text table with a header of diagnostics."""
        head = (
            f"sensitivity w.r.t. {self.wrt}: fmax = {self.fmax:.3e}, ‖P∇E‖ = {self.residual_norm:.3e}, "
            f"λ_min = {self.lambda_min:.4g}, λ_max = {self.lambda_max:.4g}, "
            f"zero modes = {self.n_zero_modes} ({self.n_soft_modes} soft), "
            f"‖R−R*‖ ≲ {self.distance_bound:.3e}"
        )
        cols = ["parameter", "value", "dE/dtheta", "partial_E/dtheta", "max_atom_|dR/dtheta|",
                "norm_dR/dtheta", "solve_residual", "error_estimate"]
        rows = self.rows()
        cells = [[r[c] if c == "parameter" else f"{r[c]:.6g}" for c in cols] for r in rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
        line = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
        body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join([head, line, "-" * len(line)] + body)

    def __str__(self) -> str:
        return self.table()

    def to_csv(self, path=None) -> str:
        """The rows of :meth:`table` as CSV; written to ``path`` if given. Returns the text."""
        rows = self.rows()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["parameter"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", newline="") as fh:
                fh.write(text)
        return text

    def to_dict(self, positions: bool = False) -> dict:
        """JSON-ready dict: diagnostics, rows, and (``positions=True``) the full dR/dθ."""
        out = {
            "wrt": self.wrt,
            "fmax": self.fmax,
            "residual_norm": self.residual_norm,
            "distance_bound": self.distance_bound,
            "lambda_min": self.lambda_min,
            "lambda_max": self.lambda_max,
            "n_zero_modes": self.n_zero_modes,
            "n_soft_modes": self.n_soft_modes,
            "relax_converged": self.relax_converged,
            "rows": self.rows(),
        }
        if positions:
            out["dpositions"] = {n: self.dpositions[j].tolist() for j, n in enumerate(self.names)}
        return out

    def to_json(self, path=None, positions: bool = False) -> str:
        """:meth:`to_dict` as JSON text; written to ``path`` if given."""
        text = json.dumps(self.to_dict(positions), indent=2, allow_nan=True)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text)
        return text


# ------------------------------------------------------------------------ machinery
def _energy_of_theta(prob, wrt):
    """``E_θ(x, θ, cell, nb, params)``: the energy as a function of what is differentiated.

    ``wrt="cell"``: ``x = U`` and ``θ`` the Voigt strain, ``E(U (I+ε), params, cell (I+ε))``
    (strain at fixed fractional coordinates). Otherwise ``x = R`` and ``θ`` the flat
    parameter vector (``ravel_pytree`` order; ``params`` is then unused). Everything that
    varies between calls is an argument, so a compiled solve serves any structure and
    parameters with the same layout.
    """
    energy = prob.energy
    if wrt == "cell":
        dim = prob.system.dim

        def E_theta(U, eps_v, cell, nb, params):
            Fm = deformation_gradient(eps_v, dim)
            return energy(U @ Fm, params, cell @ Fm, nb)
    else:
        _, unravel = ravel_pytree(prob.params)

        def E_theta(x, th, cell, nb, params):
            return energy(x, unravel(th), cell, nb)

    return E_theta


def _columns(F, R, theta, tangents, basis, solve):
    """vmapped forward implicit derivatives and Theorem-1 diagnostics (jit-able).

    F(R, theta) -> (N, d); tangents: (P, *theta.shape). Returns (dR (P,N,d), info,
    ‖b‖ (P,), β (P,), γ (P,), g (N,d)).
    """
    basis = jnp.asarray(basis)
    nullspace = lambda x, th: basis  # noqa: E731  constant modes, (k, N, d)
    Q = basis.reshape(basis.shape[0], -1)
    g = F(R, theta)
    g_proj = (g.ravel() - Q.T @ (Q @ g.ravel())).reshape(g.shape)
    g_norm = jnp.linalg.norm(g_proj)
    u_hat = g_proj / jnp.where(g_norm > 0, g_norm, 1.0)

    def one(t):
        dR, info = root_jvp(F, R, (theta,), (t,), solve=solve, nullspace=nullspace,
                            symmetric=True, return_info=True, on_solve_failure="ignore")
        b_of = lambda x: jax.jvp(lambda th: F(x, th), (theta,), (t,))[1]  # noqa: E731
        b, db = jax.jvp(b_of, (R,), (u_hat,))
        hvp = lambda x: jax.jvp(lambda y: F(y, theta), (x,), (dR,))[1]  # noqa: E731
        _, dA_J = jax.jvp(hvp, (R,), (u_hat,))
        return dR, info, jnp.linalg.norm(b), jnp.linalg.norm(db), jnp.linalg.norm(dA_J)

    dR, info, b_norm, beta, gamma = jax.vmap(one)(tangents)
    return dR, info, b_norm, beta, gamma, g, g_norm


def _null_basis(prob, check_stability, stability_options):
    system = prob.system
    if check_stability:
        report = _zm.stability(prob.energy, system.positions, system.pbc,
                               args=(prob.params, system.cell, prob.neighbor), **(stability_options or {}))
        return report.basis, report.n_soft, report.lambda_min, report.lambda_max
    rigid = _zm.rigid_modes(system.positions, system.pbc)
    return rigid, 0, float("nan"), float("nan")


def _check_strict(prob, fmax_now, strict, strict_fmax):
    if not strict:
        return
    if prob.converged is False or not (fmax_now < strict_fmax):
        raise NotConvergedError(
            f"strict=True: the structure is not relaxed enough for a trustworthy derivative "
            f"(max force {fmax_now:.3e} force units, threshold {strict_fmax:.1e}; relaxation "
            f"converged={prob.converged}). The derivative error grows linearly with the force "
            "residual (Theorem 1). Fix: relax again with a smaller fmax / larger max_steps, "
            "or pass strict=False to get the derivative with its error estimate."
        )


def _report_solve(info_conv, info_rel, names, on_solve_failure):
    bad = [n for n, c in zip(names, np.atleast_1d(info_conv)) if not c]
    if not bad or on_solve_failure == "ignore":
        return
    worst = float(np.max(info_rel))
    msg = (
        f"the implicit linear solve did not reach its tolerance for {bad} (worst relative "
        f"residual {worst:.3e}). Fixes: relax tighter (an unconverged structure can have an "
        "indefinite Hessian), raise maxiter, use solve=functools.partial("
        "ms.linear_solve.minres, tol=...), or check for undeclared soft modes."
    )
    if on_solve_failure == "raise":
        raise LinearSolveError(msg)
    warnings.warn(msg, LinearSolveWarning, stacklevel=3)


class make_sensitivity:  # noqa: N801  (a function that returns a function, like make_relax)
    """A reusable, compiled :func:`sensitivity` for systems shaped like ``system``.

    ``sens_fn = make_sensitivity(pot, system, wrt=...)``; ``sens_fn(result, params=None)``
    returns a :class:`Sensitivity`. The first call compiles (seconds on a CPU); later
    calls with the same species layout and parameter shapes reuse the compiled solves,
    so timing a second call measures the derivative itself. Options are those of
    :func:`sensitivity`.
    """

    def __init__(self, pot, system, wrt="params", *, params=None, solve=None, tol=DEFAULT_TOL,
                 strict=False, strict_fmax=STRICT_FMAX, check_stability=True,
                 stability_options=None, on_solve_failure="raise"):
        self.pot = pot
        self.template = system
        self.wrt = wrt
        self.solve = solve or _default_solve(tol)
        self.strict, self.strict_fmax = bool(strict), float(strict_fmax)
        self.check_stability = bool(check_stability)
        self.stability_options = stability_options
        self.on_solve_failure = on_solve_failure
        if wrt == "cell" and not system.pbc:
            raise ValueError("wrt='cell' needs a periodic system; this one is free (pbc=False).")
        self._problem = _ProblemBuilder(pot)
        self._compiled = {}

    def _run(self, key, prob):
        if key not in self._compiled:
            E_theta = _energy_of_theta(prob, self.wrt)
            F = jax.grad(E_theta)
            solve = self.solve

            def run(R, theta, tangents, basis, cell, nb, params):
                Fc = lambda x, th: F(x, th, cell, nb, params)  # noqa: E731
                cols = _columns(Fc, R, theta, tangents, basis, solve)
                partial = jax.grad(E_theta, argnums=1)(R, theta, cell, nb, params)
                return cols, partial

            self._compiled[key] = (jax.jit(F), jax.jit(run))
        return self._compiled[key]

    def __call__(self, result, params=None, neighbor=None) -> Sensitivity:
        prob = self._problem(result, params, neighbor)
        system, params_ = prob.system, prob.params
        R = system.positions
        wrt = self.wrt
        if wrt == "cell":
            nv = len(voigt_names(system.dim))
            theta = jnp.zeros((nv,), jnp.float64)
            tangents = jnp.eye(nv, dtype=jnp.float64)
            names = tuple(f"strain_{n}" for n in voigt_names(system.dim))
            values = np.zeros(nv)
            idx = np.arange(nv)
            shapes = {}
        else:
            labels = _param_labels(params_)
            theta, _ = ravel_pytree(params_)
            if isinstance(wrt, dict):
                # named directions in parameter space: {label: params-like tangent}
                names = tuple(wrt)
                tangents = jnp.stack([ravel_pytree(jax.tree_util.tree_map(
                    lambda x: jnp.asarray(x, jnp.float64), dict(t)))[0] for t in wrt.values()])
                values = np.full(len(names), np.nan)
                idx = np.arange(len(names))
                shapes = {}
            else:
                idx = _select(labels, wrt)
                tangents = jnp.eye(theta.size, dtype=jnp.float64)[idx]
                names = tuple(labels[i] for i in idx)
                values = np.asarray(theta)[idx]
                shapes = {k: tuple(np.shape(v)) for k, v in params_.items()}

        # The compiled solve is keyed on everything that changes the traced program.
        key = (system.n_atoms, system.dim, system.pbc, tuple(np.asarray(system.species).tolist()),
               tuple((k, np.shape(v)) for k, v in sorted(params_.items())),
               np.shape(tangents), prob.neighbor is None)
        F, run = self._run(key, prob)
        g0 = np.asarray(F(R, theta, system.cell, prob.neighbor, params_))
        fmax_now = float(np.sqrt(np.max(np.sum(g0 * g0, axis=-1)))) if g0.size else 0.0
        _check_strict(prob, fmax_now, self.strict, self.strict_fmax)
        basis, n_soft, lam_min, lam_max = _null_basis(prob, self.check_stability, self.stability_options)

        (dR, info, b_norm, beta, gamma, g, g_norm), partial = run(
            R, theta, tangents, jnp.asarray(basis), system.cell, prob.neighbor, params_)
        dR = np.asarray(dR)
        rel = np.asarray(info.relative_residual)
        _report_solve(np.asarray(info.converged), rel, names, self.on_solve_failure)

        g = np.asarray(g)
        partial = np.asarray(tangents) @ np.asarray(partial)
        denergy = partial + np.einsum("nd,pnd->p", g, dR)
        g_norm = float(g_norm)
        if lam_min > 0 and np.isfinite(lam_min):
            C = (np.asarray(beta) + np.asarray(gamma)) / lam_min
            dist = g_norm / lam_min
        else:
            C = np.full(len(names), np.nan)
            dist = float("nan")

        internal = None
        if wrt == "cell":
            internal = dR
            E_I = np.stack([np.asarray(voigt_strain_matrix(t, system.dim)) for t in np.eye(len(names))])
            dR = dR + np.einsum("nd,pde->pne", np.asarray(R), E_I)

        return Sensitivity(
            wrt="cell" if wrt == "cell" else ("directions" if isinstance(wrt, dict) else "params"),
            names=names,
            values=np.asarray(values, dtype=np.float64),
            dpositions=dR,
            denergy=np.asarray(denergy),
            denergy_partial=partial,
            internal=internal,
            solve_residual=rel,
            solve_iterations=np.asarray(info.iterations),
            error_constant=np.asarray(C),
            error_estimate=np.asarray(C * dist),
            fmax=fmax_now,
            residual_norm=g_norm,
            distance_bound=dist,
            lambda_min=float(lam_min),
            lambda_max=float(lam_max),
            n_zero_modes=int(np.asarray(basis).shape[0]),
            n_soft_modes=int(n_soft),
            relax_converged=prob.converged,
            param_shapes=shapes,
            indices=np.asarray(idx),
        )


def sensitivity(
    result,
    pot,
    wrt="params",
    *,
    params=None,
    solve: Optional[Callable] = None,
    tol: float = DEFAULT_TOL,
    strict: bool = False,
    strict_fmax: float = STRICT_FMAX,
    check_stability: bool = True,
    stability_options: Optional[dict] = None,
    neighbor=None,
    on_solve_failure: str = "raise",
) -> Sensitivity:
    """Derivatives of a relaxed structure w.r.t. potential parameters or the cell.

    Args:
      result: a ``RelaxResult`` (from ``ms.relax``) or a relaxed ``System``.
      pot: the potential it was relaxed with (``pot.params``, ``pot.energy_fn``).
      wrt: ``"params"`` (every scalar in ``params``), a list of leaf names or element
        labels (``["sigma", "epsilon"]``, ``"sigma,epsilon"``, ``"sigma[0,1]"``),
        ``"cell"`` (Voigt strain components at fixed fractional coordinates), or a dict
        ``{name: tangent}`` of directions in parameter space (each a params-like pytree,
        e.g. the change of one particle diameter in a mixing-rule matrix).
      params: the parameters the structure was relaxed with (default ``pot.params``).
      solve: linear solver ``solve(matvec, b) -> (x, SolveInfo)``; default
        ``ms.linear_solve.cg`` with ``tol``. The matrix is the Hessian deflated on its
        zero modes (symmetric positive definite at a minimum).
      tol: relative residual tolerance of the default solver.
      strict: refuse (:class:`NotConvergedError`) when the relaxation did not converge
        or the largest per-atom force is not below ``strict_fmax``.
      check_stability: compute the Hessian's low spectrum (dense or LOBPCG, see
        :mod:`mdsens.md.zero_modes`): refuse saddles, add soft modes to the null space,
        and give ``λ_min`` for the error estimate. ``False``: rigid modes only, faster,
        error estimates NaN.
      stability_options: keyword arguments for :func:`mdsens.md.zero_modes.stability`.
      neighbor: a neighbor list to use (default: built fresh when the potential uses one).
      on_solve_failure: ``"raise"`` (default), ``"warn"`` or ``"ignore"`` when a
        linear solve misses its tolerance.

    Returns:
      :class:`Sensitivity`. Compiles on every call; use :class:`make_sensitivity` to
      reuse the compiled solves across structures.

    Raises:
      SaddlePointError: negative curvature at the input (see ``zero_modes``).
      NotConvergedError: ``strict=True`` and not relaxed enough.
      LinearSolveError: a solve missed its tolerance (``on_solve_failure="raise"``).
      KeyError: an unknown parameter name in ``wrt``.
    """
    system = getattr(result, "system", result)
    fn = make_sensitivity(pot, system, wrt, solve=solve, tol=tol, strict=strict,
                          strict_fmax=strict_fmax, check_stability=check_stability,
                          stability_options=stability_options, on_solve_failure=on_solve_failure)
    return fn(result, params=params, neighbor=neighbor)


class make_observable_gradient:  # noqa: N801
    """A reusable, compiled :func:`observable_gradient` (compiles on the first call).

    ``grad_fn = make_observable_gradient(pot, system, observable, wrt=...)``;
    ``grad_fn(result, params=None)``. Options are those of :func:`observable_gradient`.
    """

    def __init__(self, pot, system, observable, *, wrt="params", solve=None, tol=DEFAULT_TOL,
                 strict=False, strict_fmax=STRICT_FMAX, check_stability=True,
                 stability_options=None, on_solve_failure="raise"):
        if wrt not in ("params", "cell"):
            raise ValueError(f"wrt must be 'params' or 'cell'; got {wrt!r}.")
        if wrt == "cell" and not system.pbc:
            raise ValueError("wrt='cell' needs a periodic system; this one is free (pbc=False).")
        self.pot, self.observable, self.wrt = pot, observable, wrt
        self.solve = solve or _default_solve(tol)
        self.strict, self.strict_fmax = bool(strict), float(strict_fmax)
        self.check_stability, self.stability_options = bool(check_stability), stability_options
        self.on_solve_failure = on_solve_failure
        self._problem = _ProblemBuilder(pot)
        self._compiled = {}

    def _build(self, prob):
        system, observable = prob.system, self.observable
        solve, policy = self.solve, self.on_solve_failure
        if self.wrt == "cell":
            dim = system.dim

            def O(U, eps_v, cell, params):
                Fm = deformation_gradient(eps_v, dim)
                return observable(U @ Fm, params, cell @ Fm)
        else:
            _, unravel = ravel_pytree(prob.params)

            def O(x, th, cell, params):
                return observable(x, unravel(th), cell)

        F = jax.grad(_energy_of_theta(prob, self.wrt))

        @jax.jit
        def grad_total(R, theta, B, cell, nb, params):
            gR, gth = jax.grad(O, argnums=(0, 1))(R, theta, cell, params)
            Fc = lambda x, th: F(x, th, cell, nb, params)  # noqa: E731
            (cot,) = root_vjp(Fc, R, (theta,), gR, solve=solve, nullspace=lambda x, th: B,
                              symmetric=True, on_solve_failure=policy)
            return gth + cot

        return jax.jit(F), grad_total

    def __call__(self, result, params=None, neighbor=None):
        prob = self._problem(result, params, neighbor)
        system, params_ = prob.system, prob.params
        R = system.positions
        if self.wrt == "cell":
            theta = jnp.zeros((len(voigt_names(system.dim)),), jnp.float64)
            unravel = None
        else:
            theta, unravel = ravel_pytree(params_)
        key = (system.n_atoms, system.dim, system.pbc, tuple(np.asarray(system.species).tolist()),
               tuple((k, np.shape(v)) for k, v in sorted(params_.items())), prob.neighbor is None)
        if key not in self._compiled:
            self._compiled[key] = self._build(prob)
        F, grad_total = self._compiled[key]
        g0 = np.asarray(F(R, theta, system.cell, prob.neighbor, params_))
        fmax_now = float(np.sqrt(np.max(np.sum(g0 * g0, axis=-1)))) if g0.size else 0.0
        _check_strict(prob, fmax_now, self.strict, self.strict_fmax)
        basis = _null_basis(prob, self.check_stability, self.stability_options)[0]
        out = grad_total(R, theta, jnp.asarray(basis), system.cell, prob.neighbor, params_)
        return np.asarray(out) if unravel is None else unravel(out)


def observable_gradient(
    result,
    pot,
    observable: Callable,
    *,
    wrt: str = "params",
    params=None,
    solve: Optional[Callable] = None,
    tol: float = DEFAULT_TOL,
    strict: bool = False,
    strict_fmax: float = STRICT_FMAX,
    check_stability: bool = True,
    stability_options: Optional[dict] = None,
    neighbor=None,
    on_solve_failure: str = "raise",
):
    """Gradient of a scalar observable of the relaxed structure, in one (reverse) solve.

    ``d/dθ O(R*(θ), θ, cell) = ∂O/∂θ + (dR*/dθ)ᵀ ∂O/∂R`` with the second term from the
    core's :func:`~mdsens.implicit.root_vjp` (one transposed linear solve, whatever the
    number of parameters), gauge-fixed exactly as :func:`sensitivity` (the part of
    ``∂O/∂R`` along zero modes does not contribute).

    Args:
      result, pot, params, solve, tol, strict, strict_fmax, neighbor: as :func:`sensitivity`.
      observable: ``O(positions (N, d), params, cell) -> scalar`` (jax-traceable). For
        ``wrt="cell"`` it is called with the strained positions, params and strained cell.
      wrt: ``"params"`` (returns a dict like params) or ``"cell"`` (returns the
        ``(n_voigt,)`` derivative w.r.t. Voigt strain components at fixed fractional
        coordinates, engineering shear).
      check_stability: run the stability check first (default, as in
        :func:`sensitivity`): saddles are refused and soft modes such as rattlers join the
        null space. An observable that touches a rattler otherwise makes CG break down
        (a clear ``LinearSolveError``, seen on a 512-particle packing). ``False`` declares
        the rigid modes only, which is cheaper and safe for a structure without soft modes.
      on_solve_failure: the core's policy for a solve that misses ``tol`` (``"raise"``:
        an error carrying the core's message, ``"warn"``, ``"ignore"``).

    Returns:
      ``dO/dparams`` (dict like params; units of O per parameter unit) or ``dO/dε``.
    """
    system = getattr(result, "system", result)
    fn = make_observable_gradient(pot, system, observable, wrt=wrt, solve=solve, tol=tol,
                                  strict=strict, strict_fmax=strict_fmax,
                                  check_stability=check_stability,
                                  stability_options=stability_options,
                                  on_solve_failure=on_solve_failure)
    return fn(result, params=params, neighbor=neighbor)
