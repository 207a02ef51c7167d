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

**Error estimate (Theorem 1 of Blondel et al. 2022, to first order).** At an
approximate minimum ``R = R* + δ`` the Jacobian computed there differs from the exact
one by the derivative of ``J`` along ``δ``, plus the linear solve's own inexactness.
mdsens takes ``δ`` as the Newton step ``H⁺ P∇E`` and reports, per parameter,

    error_estimate_j = 2 ‖H⁺ (r_j − ∂_R[H dR_j + b_j][δ])‖,   r_j = H dR_j + b_j

(:func:`mdsens.jacobian_error.first_order_error` and ``first_order_estimate``; ``r_j``
is the solve's residual). It is the actual first-order error, doubled: within a factor
of a few of the true error, and above it, wherever the Newton model holds.
``linearity = ‖P∇E(R − δ)‖ / ‖P∇E(R)‖`` says whether it does; above
:data:`mdsens.jacobian_error.LINEARITY_MAX` (``R`` outside the quadratic basin of ``R*``,
or a contact that opens between them, where the Hessian jumps) no local estimate is
reliable and the report is ``inf``: relax tighter. It grows linearly with the force
residual. Units: those of ``dR/dθ``, Euclidean norm over all atoms.
``error_constant`` keeps the Theorem-1 form's local constant
``C_j = (‖∂_R b_j [δ̂]‖ + ‖∂³E[δ̂, dR_j]‖) / λ_min`` (``δ̂ = δ/‖δ‖``) as a diagnostic.

Units: ``positions`` derivatives in length / (parameter unit); ``energy`` in energy /
(parameter unit); for strain, per unit (dimensionless) strain.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import re
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mdsens.errors import LinearSolveError, LinearSolveWarning, OptionError, check_policy, report
from mdsens.implicit import linear_solve, root_jvp, root_vjp
from mdsens import jacobian_error
from mdsens.jacobian_error import distance_from_residual, theorem1_constant_local
from mdsens.md import cache
from mdsens.md.errors import StructureError, UnknownParameterError
from mdsens.md.hessian import hessian_products
from mdsens.md.io import write_text_atomically
from mdsens.md.options import as_stability
from mdsens.md import probe
from mdsens.md.probe import probed_solves
from mdsens.md.problem import STRICT_FMAX, ProblemBuilder, check_stationary
from mdsens.md.progress import structure_stages
from mdsens.md.strain import deformation_gradient, voigt_names, voigt_strain_matrix

__all__ = [
    "Sensitivity",
    "sensitivity",
    "make_sensitivity",
    "observable_gradient",
    "make_observable_gradient",
    "DEFAULT_TOL",
]

#: Default relative tolerance of the implicit linear solves.
DEFAULT_TOL = 1e-10


# ------------------------------------------------------------------------ parameters
def parameter_labels(params: dict) -> tuple:
    """Labels of the flat parameters in ``ravel_pytree`` order (dict keys sorted):
    ``sigma``, ``sigma[0,1]``..."""
    labels = []
    for key in sorted(params):
        shape = np.shape(params[key])
        if shape == ():
            labels.append(key)
        else:
            for idx in np.ndindex(*shape):
                labels.append(f"{key}[{','.join(str(i) for i in idx)}]")
    return tuple(labels)


def _split_names(text: str) -> list:
    """``"sigma[0,1], epsilon"`` -> ``["sigma[0,1]", "epsilon"]``: commas inside brackets
    belong to an element label."""
    return [t.strip() for t in re.split(r",(?![^\[]*\])", text) if t.strip()]


def select_parameters(labels: tuple, wrt, *, cell: bool = True) -> np.ndarray:
    """Indices of the scalar parameters named by ``wrt`` (leaf names or element labels);
    ``cell``: whether the caller also takes ``wrt='cell'`` (its errors offer it)."""
    if wrt == "params" or wrt is None:
        return np.arange(len(labels))
    if isinstance(wrt, str):
        wrt = _split_names(wrt)
    choices = "'cell', or " if cell else "or "
    chosen = []
    for name in wrt:
        name = str(name).replace(" ", "")
        hits = [i for i, lab in enumerate(labels) if lab == name or lab.split("[")[0] == name]
        if not hits:
            leaves = sorted({lab.split("[")[0] for lab in labels})
            raise UnknownParameterError(
                f"no parameter {name!r}; this potential has {leaves} (elements as "
                f"{list(labels)}). Pass wrt='params', {choices}a list of those names."
            )
        chosen.extend(h for h in hits if h not in chosen)
    if not chosen:
        raise UnknownParameterError(f"wrt names no parameter; pass wrt='params', {choices}parameter names.")
    return np.asarray(chosen, dtype=int)


def _directions(wrt: dict, params: dict):
    """Named directions ``{name: params-like tangent}`` as flat ``(P, n)`` rows, checked."""
    if not wrt:
        raise OptionError("wrt={} names no direction; give {name: tangent} with a params-like tangent.")
    rows = []
    for name, tangent in wrt.items():
        if not isinstance(tangent, dict) or set(tangent) != set(params):
            got = sorted(tangent) if isinstance(tangent, dict) else type(tangent).__name__
            raise OptionError(
                f"direction {name!r} must be a dict with every parameter of the potential, "
                f"{sorted(params)}; got {got}. Use zeros for the parameters that do not change."
            )
        for key, value in tangent.items():
            if np.shape(value) != np.shape(params[key]):
                raise OptionError(
                    f"direction {name!r}: {key!r} must have the parameter's shape "
                    f"{np.shape(params[key])}; got {np.shape(value)}."
                )
        flat = ravel_pytree({k: jnp.asarray(v, jnp.float64) for k, v in tangent.items()})[0]
        if not bool(jnp.all(jnp.isfinite(flat))):
            raise OptionError(f"direction {name!r} contains NaN or inf.")
        rows.append(flat)
    return tuple(wrt), jnp.stack(rows)


def _default_solve(tol):
    if not (isinstance(tol, (int, float)) and np.isfinite(tol) and tol > 0):
        raise OptionError(f"tol must be a positive number (relative residual); got {tol!r}.")
    return functools.partial(linear_solve.cg, tol=tol)


# ------------------------------------------------------------------------ result
@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """Derivatives of a relaxed structure w.r.t. scalar parameters (or strain components).

    Flat arrays are indexed by parameter ``j`` in the order of ``names``.

    Attributes:
      wrt: ``"params"``, ``"cell"`` or ``"directions"`` (a dict of named directions).
      names: labels of the scalar parameters (``"sigma"``, ``"sigma[0,1]"``,
        ``"strain_xx"``...).
      values: their values at the relaxed state (strain: 0), ``(P,)``.
      dpositions: ``dR*/dθ_j``, ``(P, N, d)`` (length / parameter unit), gauge-fixed.
      denergy: total ``dE*/dθ_j`` (energy / parameter unit), ``(P,)``.
      denergy_partial: ``∂E/∂θ_j`` at fixed positions, ``(P,)`` (equal to ``denergy``
        at an exact minimum: envelope theorem).
      internal: strain only: the internal (non-affine) relaxation ``dU*/dε``,
        ``(P, N, d)``; ``None`` for params.
      solve_residual: relative residual of each implicit linear solve, ``(P,)``. The
        default CG stops at ``tol``, or earlier once the residual is below 1 % of
        what the relaxation's own error leaves of the right-hand side: then
        ``error_estimate``, not this, says how accurate the column is (ε of a potential
        with ``E ∝ ε`` stops near 0.01, its right-hand side being the force residual).
      solve_iterations: iterations of each solve, ``(P,)``.
      error_constant: Theorem-1 constant estimate ``C_j`` (see module doc), ``(P,)``.
      error_estimate: estimated ``‖dR_j(R) − dR_j(R*)‖``, first order (see module doc),
        ``(P,)`` (length / parameter unit); ``inf`` outside the Newton basin.
      fmax: largest per-atom force at the input positions (force units).
      residual_norm: ``‖P ∇E‖``, the projected force residual (force units).
      distance_bound: ``‖P ∇E‖ / λ_min`` ≳ ``‖R − R*‖`` (length).
      newton_distance: ``‖H⁺ P ∇E‖ ≈ ‖R − R*‖`` (length), the Newton step's length.
      linearity: ``‖P ∇E(R − δ)‖ / ‖P ∇E(R)‖`` after the Newton step ``δ``: small where
        the first-order error estimate holds (see module doc).
      lambda_min, lambda_max: Hessian eigenvalue range beyond the zero modes
        (energy/length²); NaN if the stability check was skipped.
      n_zero_modes: rigid + soft modes in the null space; n_soft_modes: the soft ones.
      relax_converged: the relaxation's own ``converged`` flag (None for a bare System).
      param_shapes: shape of each params leaf (params only), to rebuild pytrees.
      indices: flat indices (into ``ravel_pytree(params)``) of the parameters selected.
      stability_check: how the Hessian was checked: ``"probe"`` (the Ritz values of a
        random column solved with the others; docs/design.md §5), ``"eigen-analysis"``
        (dense, Lanczos or LOBPCG on its own) or ``"none"`` (``stability=False``).
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
    newton_distance: float
    linearity: float
    lambda_min: float
    lambda_max: float
    n_zero_modes: int
    n_soft_modes: int
    relax_converged: Optional[bool]
    param_shapes: dict
    indices: np.ndarray
    stability_check: str = "eigen-analysis"

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
            f"‖R−R*‖ ≈ {self.newton_distance:.3e} (Newton step; linearity {self.linearity:.2g})"
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
            write_text_atomically(path, text)
        return text

    def to_dict(self, positions: bool = False) -> dict:
        """JSON-ready dict: diagnostics, rows, and (``positions=True``) the full dR/dθ."""
        out = {
            "wrt": self.wrt,
            "fmax": self.fmax,
            "residual_norm": self.residual_norm,
            "distance_bound": self.distance_bound,
            "newton_distance": self.newton_distance,
            "linearity": self.linearity,
            "lambda_min": self.lambda_min,
            "lambda_max": self.lambda_max,
            "n_zero_modes": self.n_zero_modes,
            "n_soft_modes": self.n_soft_modes,
            "relax_converged": self.relax_converged,
            "stability_check": self.stability_check,
            "rows": self.rows(),
        }
        if positions:
            out["dpositions"] = {n: self.dpositions[j].tolist() for j, n in enumerate(self.names)}
        return out

    def to_json(self, path=None, positions: bool = False) -> str:
        """:meth:`to_dict` as JSON text; written to ``path`` if given."""
        text = json.dumps(self.to_dict(positions), indent=2, allow_nan=True)
        if path is not None:
            write_text_atomically(path, text)
        return text


# ------------------------------------------------------------------------ machinery
def flat_params(params) -> np.ndarray:
    """``ravel_pytree(params)[0]`` on the host, float64 ``(P,)`` (eager jax operations
    would each compile)."""
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree_util.tree_leaves(params)]
                          or [np.zeros(0)])


def _unraveler(params):
    """``ravel_pytree(params)[1]`` built on the host: the flat vector's layout only."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    shapes = [np.shape(v) for v in leaves]
    ends = np.cumsum([int(np.prod(sh)) for sh in shapes]).tolist()

    def unravel(flat):
        pieces = [flat[e - int(np.prod(sh)):e].reshape(sh) for sh, e in zip(shapes, ends)]
        return jax.tree_util.tree_unflatten(treedef, pieces)

    return unravel


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
        unravel = _unraveler(prob.params)

        def E_theta(x, th, cell, nb, params):
            return energy(x, unravel(th), cell, nb)

    return E_theta


def _hessian_of_theta(prob, wrt):
    """``H(x, θ, cell, nb, params, blocks) -> (v ↦ ∂²E_θ/∂x² v)`` for :func:`_energy_of_theta`'s
    ``E_θ``, from the potential's fast products (:mod:`mdsens.md.hessian`); ``blocks``
    (``prob.blocks``) were built at the problem's structure and parameters, where the
    solves take place (``θ`` is then the problem's own, and the strain 0)."""
    energy = prob.energy
    if wrt == "cell":
        dim = prob.system.dim

        def hessian(U, eps_v, cell, nb, params, blocks):
            # E(U F) has Hessian-vector products F-conjugated: ∇²_U v = (∇²_R (v F)) Fᵀ.
            Fm = deformation_gradient(eps_v, dim)
            product = hessian_products(energy, U @ Fm, params, cell @ Fm, nb, blocks=blocks)
            return lambda v: product(v @ Fm) @ Fm.T
    else:
        unravel = _unraveler(prob.params)

        def hessian(x, th, cell, nb, params, blocks):
            return hessian_products(energy, x, unravel(th), cell, nb, blocks=blocks)

    return hessian


#: Relative tolerance of the solves behind the error estimate (the Newton step and one
#: solve per column). A factor-of-two estimate needs two digits. CG's iterates grow in
#: norm, so a truncated solve errs low; measured at 1e-2 against 1e-4: 3e-4 (LJ Ar,
#: N = 499) and 1 % (SW Si, N = 999) lower, for 12 % of the call (docs/design.md §13).
ESTIMATE_TOL = 1e-2


#: A column's solve stops once its residual is below this fraction of
#: ``‖∂ₓb[δ]‖``, the part of its right-hand side ``b`` that the relaxation's own error
#: ``δ`` leaves undetermined: solving further cannot make the column more accurate
#: (Theorem 1), and a right-hand side that is pure residual noise (ε of a potential with
#: ``E ∝ ε``) would otherwise be chased for its relative tolerance. docs/design.md §13.
SOLVE_FLOOR_FACTOR = 0.01


def estimate_options(nullspace, operator) -> dict:
    """The solve options of every error-estimate solve: loose CG (:data:`ESTIMATE_TOL`)
    on the symmetric Hessian ``operator`` with the derivative's own ``nullspace``."""
    return dict(solve=functools.partial(linear_solve.cg, tol=ESTIMATE_TOL), nullspace=nullspace,
                symmetric=True, operator=operator)


def newton(F, R, theta, basis, loose):
    """``(δ, (‖P∇E(R)‖, ‖P∇E(R − δ)‖))``: the Newton step ``H⁺ P∇E`` (a loose solve) and
    the force residuals before and after it, for :func:`linearity` on the host. Jittable."""
    Q = basis.reshape(basis.shape[0], -1)
    norm = lambda v: jnp.linalg.norm(v.ravel() - Q.T @ (Q @ v.ravel()))  # noqa: E731
    delta, _ = jacobian_error.newton_step(F, R, theta, **loose)
    return delta, jnp.stack([norm(F(R, theta)), norm(F(R - delta, theta))])


def linearity(residuals, lam_max, positions) -> float:
    """:func:`mdsens.jacobian_error.newton_linearity` of :func:`newton`'s residuals, with
    the rounding scale ``λ_max ‖R − R̄‖`` of the forces (0 without a stability analysis)."""
    before, after = (float(v) for v in np.asarray(residuals))
    R = np.asarray(positions)
    return float(jacobian_error.newton_linearity(before, after, lam_max * np.linalg.norm(R - R.mean(axis=0))))


def _columns(F, R, theta, tangents, basis, solve, hessian=None, probing=None, floored=False):
    """vmapped forward implicit derivatives and their error diagnostics (jit-able).

    F(R, theta) -> (N, d); tangents: (P, *theta.shape); hessian: ``v ↦ ∂₁F v`` at
    ``(R, theta)`` for the solves (:func:`~mdsens.md.hessian.hessian_products`).
    Returns (dR (P,N,d), info, β (P,), γ (P,), g (N,d), ‖Pg‖, ‖e‖ (P,), ‖δ‖,
    (‖P∇E(R)‖, ‖P∇E(R − δ)‖), probed): the Newton step ``δ`` with the residuals
    before and after it (:func:`linearity`) and, per column, the first-order error ``e``
    (its solve's own residual included) and the directional constants β, γ along ``δ``
    (:func:`mdsens.jacobian_error.first_order_error`). With ``probing = (z (N, d), tol)``
    the columns are solved by :func:`mdsens.md.probe.probed_solves`, and ``probed`` is the probe's
    ``(SolveInfo, Lanczos tridiagonal)`` (else ``None``). ``floored``: ``solve`` takes
    ``atol``, and each column's solve stops once its residual is below
    :data:`SOLVE_FLOOR_FACTOR` times the part of its right-hand side that the inexact root
    leaves undetermined (:func:`mdsens.jacobian_error.rhs_variation`).
    """
    basis = jnp.asarray(basis)
    nullspace = lambda x, th: basis  # noqa: E731  constant modes, (k, N, d)
    g = F(R, theta)
    loose = estimate_options(nullspace, hessian)
    delta, residuals = newton(F, R, theta, basis, loose)
    g_norm = residuals[0]  # ‖P∇E(R)‖, which the Newton step's linearity test needs anyway
    b, d_b = jax.vmap(lambda t: jacobian_error.rhs_variation(F, R, theta, delta, t))(tangents)
    flat_norms = lambda v: jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=1)  # noqa: E731
    floors = SOLVE_FLOOR_FACTOR * flat_norms(d_b) * jnp.linalg.norm(delta) if floored else None

    if probing is None:
        def solved(t, floor):
            column_solve = solve if floor is None else functools.partial(solve, atol=floor)
            return root_jvp(F, R, (theta,), (t,), solve=column_solve, nullspace=nullspace,
                            symmetric=True, return_info=True, on_failure="ignore", operator=hessian)

        dR, info = linear_solve.each_column(solved, tangents, floors)
        probed = None
    else:
        dR, info, probed = probed_solves(hessian, basis, -b, *probing, floors=floors)

    # the error's right-hand sides batched (autodiff amortizes over lanes), its solves one
    # by one (CG lanes do not: linear_solve.each_column)
    rhs, _, (beta, gamma) = jax.vmap(
        lambda x, t, b, d_b: jacobian_error.first_order_rhs(F, R, theta, delta, x, t, operator=hessian,
                                                            rhs_terms=(b, d_b)))(dR, tangents, b, d_b)
    e, _ = linear_solve.each_column(lambda r: jacobian_error.linearized_solve(F, R, theta, r, **loose), rhs)
    e_norm = jnp.linalg.norm(e.reshape(e.shape[0], -1), axis=1)
    return dR, info, beta, gamma, g, g_norm, e_norm, jnp.linalg.norm(delta), residuals, probed


def _report_solve(converged, relative, names, policy):
    bad = [n for n, c in zip(names, np.atleast_1d(converged)) if not c]
    if not bad:
        return
    report(policy,
           f"the implicit linear solve did not reach its tolerance for {bad} (worst relative "
           f"residual {float(np.max(relative)):.3e}). Fixes: relax tighter (an unconverged "
           "structure can have an indefinite Hessian), use solve=functools.partial("
           "ms.linear_solve.minres, tol=...), or check for undeclared soft modes "
           "(stability=True).",
           LinearSolveError, LinearSolveWarning, stacklevel=4)


class _Derivative:
    """What ``make_sensitivity`` and ``make_observable_gradient`` share: the options, the
    problem builder and the compiled functions keyed by layout."""

    def __init__(self, pot, system, *, solve, tol, strict, strict_fmax, stability, neighbor_list, on_failure,
                 needs_cell):
        if needs_cell and not system.pbc:
            raise OptionError("wrt='cell' needs a periodic system; this one is free (pbc=False).")
        self.pot = pot
        self.template = system
        self.solve = solve or _default_solve(tol)
        self.probe_tol = probe.probe_tolerance(solve, tol)
        self.strict, self.strict_fmax = bool(strict), float(strict_fmax)
        self.stability = as_stability(stability)
        self.on_failure = check_policy(on_failure)
        self._problem = ProblemBuilder(pot, neighbor_list)
        self._compiled = {}

    @staticmethod
    def _key(prob, *extra):
        s = prob.system
        return (s.n_atoms, s.dim, s.pbc, tuple(np.asarray(s.species).tolist()),
                tuple((k, np.shape(v)) for k, v in sorted(prob.params.items())), prob.neighbor is None) + extra


class make_sensitivity(_Derivative):  # noqa: N801  (a function that returns a function)
    """A reusable, compiled :func:`sensitivity` for systems shaped like ``system``.

    ``sens_fn = make_sensitivity(pot, system, wrt=...)``; ``sens_fn(result, params=None,
    neighbor=None, progress=None)`` returns a :class:`Sensitivity`. The first call
    compiles; later calls with the same layout and parameter shapes reuse the compiled
    solves. Options are those of :func:`sensitivity`.
    """

    def __init__(self, pot, system, wrt="params", *, solve=None, tol=DEFAULT_TOL, strict=False,
                 strict_fmax=STRICT_FMAX, stability=True, neighbor_list=None, on_failure="raise"):
        super().__init__(pot, system, solve=solve, tol=tol, strict=strict, strict_fmax=strict_fmax,
                         stability=stability, neighbor_list=neighbor_list, on_failure=on_failure,
                         needs_cell=wrt == "cell")
        if not (isinstance(wrt, (str, dict, list, tuple)) or wrt is None):
            raise OptionError(f"wrt must be 'params', 'cell', parameter names or a dict of directions; got {wrt!r}.")
        self.wrt = wrt

    def _functions(self, prob, n_tangents, probed=False):
        key = self._key(prob, n_tangents, probed)
        if key not in self._compiled:
            E_theta = _energy_of_theta(prob, self.wrt)
            F = jax.grad(E_theta)
            H = _hessian_of_theta(prob, self.wrt)
            solve, tol = self.solve, self.probe_tol
            floored = tol is not None  # the default CG, which takes atol

            def run(R, theta, tangents, basis, cell, nb, params, blocks, probe_vector=None):
                Fc = lambda x, th: F(x, th, cell, nb, params)  # noqa: E731
                probing = None if probe_vector is None else (probe_vector, tol)
                cols = _columns(Fc, R, theta, tangents, basis, solve, H(R, theta, cell, nb, params, blocks), probing,
                                floored)
                partial = jax.grad(E_theta, argnums=1)(R, theta, cell, nb, params)
                return cols, partial

            self._compiled[key] = jax.jit(run)
        return self._compiled[key]

    def _solved(self, prob, fmax_now, arguments, n_tangents, stages):
        """``(outputs of the compiled solves, (basis, n_soft, λ_min, λ_max), stability_check)``
        (:func:`mdsens.md.probe.solved_with_stability`): beside the spectral probe in the
        common case, after the full analysis when the probe cannot decide."""
        def run_probed(basis, z):
            stages.start(f"{n_tangents} implicit solves, a spectral probe and error estimates")
            out = self._functions(prob, n_tangents, probed=True)(*arguments(basis), z)
            return out, out[0][1].breakdown, out[0][-1]

        def run_plain(basis):
            stages.start(f"{n_tangents} implicit solve{'s' if n_tangents != 1 else ''} and error estimates")
            return self._functions(prob, n_tangents)(*arguments(basis))

        return probe.solved_with_stability(prob, self.stability, self.probe_tol, fmax_now, run_probed, run_plain,
                                           stages)

    def _parameters(self, system, params):
        """``(theta, tangents, names, values, indices, shapes)`` for ``self.wrt``."""
        wrt = self.wrt
        if wrt == "cell":
            nv = len(voigt_names(system.dim))
            return (np.zeros(nv), np.eye(nv),
                    tuple(f"strain_{n}" for n in voigt_names(system.dim)), np.zeros(nv), np.arange(nv), {})
        theta = flat_params(params)
        if isinstance(wrt, dict):
            names, tangents = _directions(wrt, params)
            return theta, tangents, names, np.full(len(names), np.nan), np.arange(len(names)), {}
        labels = parameter_labels(params)
        idx = select_parameters(labels, wrt)
        return (theta, np.eye(theta.size)[idx], tuple(labels[i] for i in idx),
                theta[idx], idx, {k: tuple(np.shape(v)) for k, v in params.items()})

    def __call__(self, result, params=None, neighbor=None, progress: Optional[bool] = None) -> Sensitivity:
        with structure_stages(progress, "sensitivity", result, params, 3) as stages:
            stages.start("forces and Hessian blocks")
            prob = self._problem(result, params, neighbor)
            system, params_ = prob.system, prob.params
            theta, tangents, names, values, idx, shapes = self._parameters(system, params_)
            fmax_now = check_stationary(prob, self.strict, self.strict_fmax, "a sensitivity")
            R = system.positions

            def arguments(basis):
                # host arrays go to the compiled program as they are: jit moves them in its
                # call, where an eager jnp.asarray is a dispatch of its own
                return (R, theta, tangents, basis, system.cell, prob.neighbor, params_, prob.blocks)

            # all columns are one batched program: one stage, not one per column
            out, (basis, n_soft, lam_min, lam_max), check = self._solved(prob, fmax_now, arguments, len(names),
                                                                         stages)
            (dR, info, beta, gamma, g, g_norm, e_norm, newton_length, residuals, _), partial = out
            dR = np.asarray(dR)  # waits for the program, so the stage ends when the solves do
        rel = np.asarray(info.relative_residual)
        _report_solve(np.asarray(info.converged), rel, names, self.on_failure)

        g = np.asarray(g)
        partial = np.asarray(tangents) @ np.asarray(partial)
        denergy = partial + np.einsum("nd,pnd->p", g, dR)
        g_norm = float(g_norm)
        # Theorem 1 from the one implementation in mdsens.jacobian_error (NaN without λ_min > 0)
        C = np.asarray(theorem1_constant_local(lam_min, np.asarray(beta), np.asarray(gamma)))
        dist = float(distance_from_residual(g_norm, lam_min))
        lin = linearity(residuals, lam_max, R)
        estimate = np.asarray(jacobian_error.first_order_estimate(np.asarray(e_norm), lin))

        internal = None
        if self.wrt == "cell":
            internal = dR
            E_I = np.stack([np.asarray(voigt_strain_matrix(t, system.dim)) for t in np.eye(len(names))])
            dR = dR + np.einsum("nd,pde->pne", np.asarray(R), E_I)

        return Sensitivity(
            wrt="cell" if self.wrt == "cell" else ("directions" if isinstance(self.wrt, dict) else "params"),
            names=names,
            values=np.asarray(values, dtype=np.float64),
            dpositions=dR,
            denergy=np.asarray(denergy),
            denergy_partial=partial,
            internal=internal,
            solve_residual=rel,
            solve_iterations=np.asarray(info.iterations),
            error_constant=np.asarray(C),
            error_estimate=estimate,
            fmax=fmax_now,
            residual_norm=g_norm,
            distance_bound=dist,
            newton_distance=float(newton_length),
            linearity=lin,
            lambda_min=float(lam_min),
            lambda_max=float(lam_max),
            n_zero_modes=int(np.asarray(basis).shape[0]),
            n_soft_modes=int(n_soft),
            relax_converged=prob.converged,
            param_shapes=shapes,
            indices=np.asarray(idx),
            stability_check=check,
        )


def sensitivity(result, pot, wrt="params", *, params=None, solve: Optional[Callable] = None,
                tol: float = DEFAULT_TOL, strict: bool = False, strict_fmax: float = STRICT_FMAX,
                stability=True, neighbor_list=None, neighbor=None, on_failure: str = "raise",
                progress: Optional[bool] = None) -> Sensitivity:
    """Derivatives of a relaxed structure w.r.t. potential parameters or the cell.

    Args:
      result: a ``RelaxResult`` (from ``ms.relax``) or a relaxed ``System``.
      pot: the potential it was relaxed with.
      wrt: ``"params"`` (every scalar in ``params``), a list of leaf names or element
        labels (``["sigma", "epsilon"]``, ``"sigma,epsilon"``, ``"sigma[0,1]"``),
        ``"cell"`` (Voigt strain components at fixed fractional coordinates), or a dict
        ``{name: tangent}`` of directions in parameter space (each a params-like dict,
        e.g. the change of one particle diameter in a mixing-rule matrix).
      params: the parameters the structure was relaxed with (default ``pot.params``).
      solve: linear solver ``solve(matvec, b) -> (x, SolveInfo)``; default
        ``ms.linear_solve.cg`` with ``tol`` (the deflated Hessian is positive definite).
      tol: relative residual tolerance of the default solver.
      strict: refuse (:class:`~mdsens.NotConvergedError`) a structure whose relaxation
        did not converge or whose largest force is not below ``strict_fmax``; without
        it such a structure gets a :class:`~mdsens.NotConvergedWarning`.
      stability: ``True`` (default) or :class:`~mdsens.StabilityOptions`: the Hessian's
        low spectrum refuses saddles, adds soft modes to the null space and gives
        ``λ_min`` for the error estimate. ``False``: rigid modes only, faster, error
        estimates NaN.
      neighbor_list: ``None`` (automatic), a bool or :class:`~mdsens.NeighborListOptions`.
      neighbor: a neighbor list to use (checked: not overflowed, not stale); default the
        relaxation's own while it covers the range, else a fresh one.
      on_failure: a linear solve that misses ``tol``: ``"raise"`` (default), ``"warn"``
        or ``"ignore"``.
      progress: show the stages (Hessian blocks, stability analysis, the solves: all
        columns in one program) on stderr; default: when stderr is a terminal. ``True``
        under jit/vmap raises :class:`~mdsens.OptionError`.

    Returns:
      :class:`Sensitivity`. Compiles on every call; :class:`make_sensitivity` reuses the
      compiled solves across structures and parameters.

    Raises:
      SaddlePointError: negative curvature at the input.
      NotConvergedError: ``strict=True`` and not relaxed enough.
      ResultMismatchError: the result was relaxed with another potential or parameters.
      LinearSolveError: a solve missed its tolerance (``on_failure="raise"``).
      UnknownParameterError: an unknown parameter name in ``wrt`` (a ``KeyError``).
    """
    system = getattr(result, "system", result)
    options = dict(solve=solve, tol=tol, strict=strict, strict_fmax=strict_fmax, stability=stability,
                   neighbor_list=neighbor_list, on_failure=on_failure)
    fn = cache.memoized_make("sensitivity", pot, system, (cache.hashable(wrt),), options,
                   lambda: make_sensitivity(pot, system, wrt, **options))
    return fn(result, params=pot.params if params is None else params, neighbor=neighbor, progress=progress)


@dataclasses.dataclass(frozen=True)
class GradientInfo:
    """Diagnostics of an observable gradient (``observable_gradient(..., return_info=True)``).

    Attributes:
      error_estimate: estimated ``‖∇O(R) − ∇O(R*)‖`` over all flat parameters (units of
        O per parameter unit, or per unit strain): twice the first-order error
        (:func:`mdsens.jacobian_error.first_order_gradient_error`, which includes the
        adjoint solve's own residual). ``inf`` where the Newton model fails
        (``linearity`` above :data:`mdsens.jacobian_error.LINEARITY_MAX`): relax tighter.
      newton_distance: ``‖H⁺ P ∇E‖ ≈ ‖R − R*‖`` (length).
      linearity: ``‖P ∇E(R − δ)‖ / ‖P ∇E(R)‖`` after the Newton step ``δ``.
      fmax: largest per-atom force at the input (force units).
    """

    error_estimate: float
    newton_distance: float
    linearity: float
    fmax: float


class make_observable_gradient(_Derivative):  # noqa: N801
    """A reusable, compiled :func:`observable_gradient` (compiles on the first call).

    ``grad_fn = make_observable_gradient(pot, system, observable, wrt=...)``;
    ``grad_fn(result, params=None, neighbor=None)``. Options are those of
    :func:`observable_gradient`.
    """

    def __init__(self, pot, system, observable, *, wrt="params", solve=None, tol=DEFAULT_TOL, strict=False,
                 strict_fmax=STRICT_FMAX, stability=True, neighbor_list=None, on_failure="raise"):
        if wrt not in ("params", "cell"):
            raise OptionError(f"wrt must be 'params' or 'cell'; got {wrt!r}.")
        if not callable(observable):
            raise OptionError(f"observable must be a function O(positions, params, cell); got {observable!r}.")
        super().__init__(pot, system, solve=solve, tol=tol, strict=strict, strict_fmax=strict_fmax,
                         stability=stability, neighbor_list=neighbor_list, on_failure=on_failure,
                         needs_cell=wrt == "cell")
        self.observable, self.wrt = observable, wrt

    def _functions(self, prob):
        key = self._key(prob)
        if key in self._compiled:
            return self._compiled[key]
        system, observable = prob.system, self.observable
        solve, policy = self.solve, self.on_failure
        if self.wrt == "cell":
            dim = system.dim

            def O(U, eps_v, cell, params):
                D = deformation_gradient(eps_v, dim)
                return observable(U @ D, params, cell @ D)
        else:
            unravel = _unraveler(prob.params)

            def O(x, th, cell, params):
                return observable(x, unravel(th), cell)

        F = jax.grad(_energy_of_theta(prob, self.wrt))
        H = _hessian_of_theta(prob, self.wrt)

        @jax.jit
        def grad_total(R, theta, B, cell, nb, params, blocks):
            gR, gth = jax.grad(O, argnums=(0, 1))(R, theta, cell, params)
            Fc = lambda x, th: F(x, th, cell, nb, params)  # noqa: E731
            (cot,) = root_vjp(Fc, R, (theta,), gR, solve=solve, nullspace=lambda x, th: B,
                              symmetric=True, on_failure=policy, operator=H(R, theta, cell, nb, params, blocks))
            return gth + cot

        @jax.jit
        def grad_with_error(R, theta, B, cell, nb, params, blocks):
            """The gradient from an explicit adjoint ``w`` (one tight solve, as ``grad_total``'s),
            and its first-order error (two loose solves)."""
            Fc = lambda x, th: F(x, th, cell, nb, params)  # noqa: E731
            Oc = lambda x, th: O(x, th, cell, params)  # noqa: E731
            nullspace = lambda x, th: B  # noqa: E731
            operator = H(R, theta, cell, nb, params, blocks)
            gR = jax.grad(Oc)(R, theta)
            w = jacobian_error.adjoint(Fc, R, theta, gR, solve=solve, nullspace=nullspace, symmetric=True,
                                       operator=operator)
            gradient = jax.grad(lambda th: Oc(R, th) - jnp.vdot(w, Fc(R, th)))(theta)
            loose = estimate_options(nullspace, operator)
            delta, residuals = newton(Fc, R, theta, B, loose)
            e = jacobian_error.first_order_gradient_error(Fc, Oc, R, theta, delta, w, **loose)
            return gradient, jnp.linalg.norm(e), jnp.linalg.norm(delta), residuals

        probe_tol = self.probe_tol

        @jax.jit
        def grad_probed(R, theta, B, cell, nb, params, blocks, z):
            """``grad_total`` with the adjoint as an explicit solve (``H`` is symmetric) beside
            the spectral probe on ``z`` (:func:`mdsens.md.probe.probed_solves`)."""
            Fc = lambda x, th: F(x, th, cell, nb, params)  # noqa: E731
            Oc = lambda x, th: O(x, th, cell, params)  # noqa: E731
            gR = jax.grad(Oc)(R, theta)
            w, info, probed = probed_solves(H(R, theta, cell, nb, params, blocks), B, gR[None], z, probe_tol)
            gradient = jax.grad(lambda th: Oc(R, th) - jnp.vdot(w[0], Fc(R, th)))(theta)
            return gradient, info, probed

        self._compiled[key] = (grad_total, grad_with_error, grad_probed, O)
        return self._compiled[key]

    def __call__(self, result, params=None, neighbor=None, return_info: bool = False):
        prob = self._problem(result, params, neighbor)
        if self.wrt == "cell":
            theta, unravel = jnp.zeros((len(voigt_names(prob.system.dim)),), jnp.float64), None
        else:
            theta, unravel = jnp.asarray(flat_params(prob.params)), _unraveler(prob.params)
        grad_total, grad_with_error, grad_probed, O = self._functions(prob)
        fmax_now = check_stationary(prob, self.strict, self.strict_fmax, "an observable gradient")
        s = prob.system
        try:
            value = jax.eval_shape(O, s.positions, theta, s.cell, prob.params)
        except Exception as err:
            raise OptionError(
                f"the observable could not be evaluated as O(positions (N, d), params, cell): "
                f"{type(err).__name__}: {err}"
            ) from None
        if value.shape != ():
            raise OptionError(f"the observable must return a scalar; it returns shape {value.shape}.")

        def arguments(basis):
            return (s.positions, theta, basis, s.cell, prob.neighbor, prob.params, prob.blocks)

        def run_probed(basis, z):
            gradient, solve_info, probed = grad_probed(*arguments(basis), z)
            return (gradient, solve_info), solve_info.breakdown, probed

        def run_plain(basis):
            return (grad_with_error if return_info else grad_total)(*arguments(basis)), None

        # with return_info the error estimate's program (no probe) takes the solves
        (out, solve_info), (_, _, _, lam_max), check = probe.solved_with_stability(
            prob, self.stability, None if return_info else self.probe_tol, fmax_now, run_probed, run_plain)
        if check == "probe":
            _report_solve(np.asarray(solve_info.converged), np.asarray(solve_info.relative_residual),
                          ["the adjoint"], self.on_failure)
        elif return_info:
            out, e_norm, newton_length, residuals = out
            lin = linearity(residuals, lam_max, s.positions)
            estimate = float(jacobian_error.first_order_estimate(float(e_norm), lin))
            info = GradientInfo(estimate, float(newton_length), lin, fmax_now)
        if not np.all(np.isfinite(np.asarray(out))):
            raise StructureError("the observable's gradient is NaN/inf at this structure; check the observable.")
        out = np.asarray(out) if unravel is None else unravel(out)
        return (out, info) if return_info else out


def observable_gradient(result, pot, observable: Callable, *, wrt: str = "params", params=None,
                        solve: Optional[Callable] = None, tol: float = DEFAULT_TOL, strict: bool = False,
                        strict_fmax: float = STRICT_FMAX, stability=True, neighbor_list=None, neighbor=None,
                        on_failure: str = "raise", return_info: bool = False):
    """Gradient of a scalar observable of the relaxed structure, in one (reverse) solve.

    ``d/dθ O(R*(θ), θ, cell) = ∂O/∂θ + (dR*/dθ)ᵀ ∂O/∂R`` with the second term from the
    core's :func:`~mdsens.implicit.root_vjp` (one transposed linear solve, whatever the
    number of parameters), gauge-fixed exactly as :func:`sensitivity`.

    Args:
      result, pot, params, solve, tol, strict, strict_fmax, stability, neighbor_list,
        neighbor, on_failure: as :func:`sensitivity`. Keep ``stability`` on for
        structures with rattlers: an observable that touches one otherwise breaks CG.
      observable: ``O(positions (N, d), params, cell) -> scalar`` (jax-traceable). For
        ``wrt="cell"`` it is called with the strained positions, params and strained cell.
      wrt: ``"params"`` (returns a dict like params) or ``"cell"`` (the ``(n_voigt,)``
        derivative w.r.t. Voigt strain at fixed fractional coordinates, engineering shear).
      return_info: also return a :class:`GradientInfo` with the gradient's error
        estimate (two more solves, at a loose tolerance; compiled on first use).

    Returns:
      ``dO/dparams`` (dict like params; units of O per parameter unit) or ``dO/dε``;
      with ``return_info``, the pair ``(gradient, GradientInfo)``.
    """
    system = getattr(result, "system", result)
    options = dict(solve=solve, tol=tol, strict=strict, strict_fmax=strict_fmax, stability=stability,
                   neighbor_list=neighbor_list, on_failure=on_failure)
    fn = cache.memoized_make("observable_gradient", pot, system, (cache.hashable(observable), wrt), options,
                   lambda: make_observable_gradient(pot, system, observable, wrt=wrt, **options))
    return fn(result, params=pot.params if params is None else params, neighbor=neighbor, return_info=return_info)

