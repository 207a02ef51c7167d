"""Clamped-ion (Born) and relaxed-ion elastic constants of a relaxed periodic structure.

Definition (what is returned). With a homogeneous symmetric strain ``ε`` applied at
fixed fractional coordinates, ``cell → cell (I + ε)``, ``R = U (I + ε)``, and Voigt
components with **engineering shear** strains ``(ε_xx, ε_yy, ε_zz, γ_yz, γ_xz, γ_xy)``
(``γ_ab = 2 ε_ab``; 2D: ``(ε_xx, ε_yy, γ_xy)``):

* clamped-ion (Born):  ``C⁰_IJ = (1/V) ∂²E/∂ε_I∂ε_J`` at fixed ``U``;
* relaxed-ion:         ``C_IJ = C⁰_IJ − (1/V) Λ_Iᵀ H⁺ Λ_J``, with the internal-strain
  coupling ``Λ_I = ∂²E/∂U∂ε_I`` and ``H = ∂²E/∂U²``, i.e. the second derivative of the
  relaxed energy ``E*(ε) = min_U E``. ``H⁺ Λ_I = −dU*/dε_I`` comes from the core's
  ``root_jvp`` (forward mode, one solve per Voigt component, batched with ``vmap``) with
  the translations (and any rattlers) as the null space.

With this Voigt convention ``C`` is the usual matrix of ``σ_I = C_IJ ε_J`` (e.g. cubic
``C11, C12, C44``). Units: eV/Å³ (3D) or eV/Å² (2D), per ``V`` = the cell volume (area)
of the input structure; :meth:`ElasticConstants.to_gpa` converts 3D values with
``ase.units.GPa``.

**Residual stress.** These are energy-Hessian (small-strain, ``F = I + ε``) constants
at the input state. When the structure is under a stress ``σ`` they differ from the
stress–strain coefficients ``∂σ_I/∂ε_J`` and from the Lagrangian (Green-strain)
constants by terms linear in ``σ``; the residual stress is reported in ``stress`` so
that the caller can judge it. Relax the cell (``relax(..., relax_cell=True)``) for the
zero-stress constants, where all definitions agree.

**Error estimate.** At an approximate minimum ``R = R* + δ`` the relaxed-ion constants
are off by the derivative of ``Born + Λᵀ dU`` along ``δ`` (the Newton step), to first
order; ``error_estimate`` reports twice its spectral norm, as ``ms.sensitivity`` does
for its columns (:mod:`mdsens.jacobian_error`).

**Parameter derivatives** (``wrt=``). ``dC/dθ`` is the total derivative at fixed cell
of ``C(θ) = [Born(R*(θ), θ) + Λ(R*, θ)ᵀ dU(R*, θ)] / V`` through the relaxation
``R*(θ)``: forward mode in one compiled program. ``dR*/dθ_k`` comes from ``root_jvp`` on
``F(R, θ) = ∇_R E(R, θ)`` (the same null space), then one ``jax.jvp`` of
``(R, θ) ↦ (Born, Λᵀ dU)`` along ``(dR*/dθ_k, e_k)``, vmapped over the directions ``k``.
The inner solves are ``lax.custom_linear_solve``, so their tangent (a second solve with
the same operator, ``dU' = H⁺(∂Λ − ∂H dU)``) is exact; the Hessian products inside are
rebuilt from ``(R, θ)`` so that ``∂H`` is the third derivative of the energy.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mdsens import jacobian_error
from mdsens.errors import LinearSolveError, LinearSolveWarning, OptionError, check_policy, report
from mdsens.implicit import linear_solve, root_jvp
from mdsens.md import cache
from mdsens.md.hessian import hessian_products
from mdsens.md.options import as_stability
from mdsens.md import probe
from mdsens.md.probe import probed_solves
from mdsens.md.problem import STRICT_FMAX, ProblemBuilder, check_stationary
from mdsens.md.progress import structure_stages
from mdsens.md.sensitivity import select_parameters, estimate_options, linearity, newton, parameter_labels
from mdsens.md.strain import deformation_gradient, voigt_names

__all__ = ["ElasticConstants", "elastic_constants", "make_elastic_constants"]


@dataclasses.dataclass(frozen=True)
class ElasticConstants:
    """Voigt elastic constants (see the module docstring for the definitions).

    Attributes:
      clamped: clamped-ion (Born) ``(6, 6)`` (``(3, 3)`` in 2D).
      relaxed: relaxed-ion, same shape (symmetrized; see ``asymmetry``).
      volume: cell volume (Å³; area Å² in 2D).
      stress: residual Voigt stress (ASE sign), same unit as the constants.
      internal_strain: ``dU*/dε_I``, ``(n_voigt, N, d)`` internal relaxation per unit
        strain (Å), translation-free.
      unit: ``"eV/Å³"``, ``"eV/Å²"`` or ``"GPa"``.
      solve_residual: relative residual of each of the ``n_voigt`` solves.
      asymmetry: ``max |C − Cᵀ| / max |C|`` of the relaxed correction before
        symmetrization (a solve-accuracy check; ≈ the solve tolerance).
      n_zero_modes: translations plus rattlers declared in the null space.
      error_estimate: estimated ``‖C(R) − C(R*)‖₂`` of the relaxed-ion constants at an
        approximate minimum ``R`` (same unit; spectral norm): twice the first-order error
        along the Newton step (see ``_internal``); ``inf`` where the Newton model fails
        (``linearity`` above :data:`mdsens.jacobian_error.LINEARITY_MAX`): relax tighter.
      linearity: ``‖P∇E(R − δ)‖ / ‖P∇E(R)‖`` after the Newton step ``δ`` (0 at a minimum).
      dparams: ``None``, or with ``wrt=`` a dict ``name -> dC_relaxed/dθ_name`` of shape
        ``(*leaf_shape, n_voigt, n_voigt)`` (``(n_voigt, n_voigt)`` for a scalar parameter;
        an element label such as ``"sigma[0,1]"`` when only that element was asked for):
        the total derivative at fixed cell through the relaxation ``R*(θ)``, symmetrized
        like ``relaxed``; unit: the constants' per unit of the parameter.
      dclamped: the same for the clamped-ion constants (also through ``R*(θ)``).
      dparams_solve_residual: relative residuals of the ``dR*/dθ`` solves, one per
        scalar parameter direction (empty without ``wrt``).
    """

    clamped: np.ndarray
    relaxed: np.ndarray
    volume: float
    stress: np.ndarray
    internal_strain: np.ndarray
    unit: str
    solve_residual: np.ndarray
    asymmetry: float
    n_zero_modes: int
    error_estimate: float = float("nan")
    linearity: float = float("nan")
    dparams: Optional[dict] = None
    dclamped: Optional[dict] = None
    dparams_solve_residual: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))

    @property
    def dim(self) -> int:
        return 3 if self.clamped.shape[0] == 6 else 2

    @property
    def relaxation(self) -> np.ndarray:
        """``relaxed − clamped`` (≤ 0 in the sense of quadratic forms)."""
        return self.relaxed - self.clamped

    def to_gpa(self) -> "ElasticConstants":
        """The same constants in GPa (3D only; ``ase.units.GPa``)."""
        from ase.units import GPa

        if self.dim != 3:
            raise OptionError("GPa is a 3D unit; 2D constants are in eV/Å² (force per length).")
        if self.unit == "GPa":
            return self
        f = 1.0 / GPa
        scaled = lambda d: None if d is None else {k: v * f for k, v in d.items()}  # noqa: E731
        return dataclasses.replace(self, clamped=self.clamped * f, relaxed=self.relaxed * f,
                                   stress=self.stress * f, error_estimate=self.error_estimate * f, unit="GPa",
                                   dparams=scaled(self.dparams), dclamped=scaled(self.dclamped))

    def table(self) -> str:
        names = voigt_names(self.dim)
        lines = [f"elastic constants ({self.unit}), V = {self.volume:.6g}, residual stress max "
                 f"{np.abs(self.stress).max():.3g} {self.unit}, error estimate {self.error_estimate:.2g} {self.unit}"]
        for label, C in (("clamped-ion (Born)", self.clamped), ("relaxed-ion", self.relaxed)):
            lines.append(label)
            lines.append("      " + "".join(f"{n:>12}" for n in names))
            for n, row in zip(names, C):
                lines.append(f"{n:>6}" + "".join(f"{v:12.5g}" for v in row))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _strain_column(F, R, theta0, t, nullspace, solve, hessian):
    """``(dU/dε·t, SolveInfo, Λ·t)``: one internal-strain solve and its coupling column."""
    dU, info = root_jvp(F, R, (theta0,), (t,), solve=solve, nullspace=nullspace,
                        symmetric=True, return_info=True, on_failure="ignore", operator=hessian)
    return dU, info, jax.jvp(lambda th: F(R, th), (theta0,), (t,))[1]


def _internal(E_s, R, basis, solve, hessian, probing=None):
    """Born Hessian, internal strain dU/dε, Λ·dU and the first-order error of Λ·dU + Born
    along the Newton step (jit-able).

    ``E_s(U, ε_voigt)`` is the strain energy; one forward solve per Voigt component,
    batched with ``vmap``, with ``hessian`` (``v ↦ ∂²E_s/∂U² v`` at ε = 0) as operator.
    The error of column ``I`` of ``V C = Born + Λᵀ dU`` at ``R = R* + δ`` is, to first
    order, ``∂_U[∂_ε∇_ε E_s · (dU_I, t_I)][δ] + Λᵀ e_I`` with ``e_I`` the first-order
    error of ``dU_I`` (:func:`mdsens.jacobian_error.first_order_error`). With
    ``probing = (z, tol)`` the solves run beside the spectral probe
    (:func:`mdsens.md.probe.probed_solves`), whose output comes last (else ``None``).
    """
    n_voigt = len(voigt_names(R.shape[1]))
    F = jax.grad(E_s)
    grad_eps = jax.grad(E_s, argnums=1)
    theta0 = jnp.zeros((n_voigt,), jnp.float64)
    born = jax.hessian(E_s, argnums=1)(R, theta0)
    nullspace = lambda x, th: basis  # noqa: E731
    loose = estimate_options(nullspace, hessian)
    delta, residuals = newton(F, R, theta0, basis, loose)
    length = jnp.linalg.norm(delta)
    step = jacobian_error.FIRST_ORDER_STEP
    shifted = R + step * delta / jnp.where(length > 0, length, 1.0)

    strains = jnp.eye(n_voigt, dtype=jnp.float64)
    probed = None
    if probing is None:
        dU, info, lam = jax.vmap(lambda t: _strain_column(F, R, theta0, t, nullspace, solve, hessian))(strains)
    else:
        lam = jax.vmap(lambda t: jax.jvp(lambda th: F(R, th), (theta0,), (t,))[1])(strains)
        dU, info, probed = probed_solves(hessian, basis, -lam, *probing)

    def error_terms(dU, t):
        rhs, _, _ = jacobian_error.first_order_rhs(F, R, theta0, delta, dU, t, operator=hessian)
        # column I of Born + Λᵀ dU is the tangent of ∇_ε E_s along (dU_I, t_I)
        m0, m1 = jax.vmap(lambda x: jax.jvp(grad_eps, (x, theta0), (dU, t))[1])(jnp.stack([R, shifted]))
        return rhs, (m1 - m0) * (length / step)

    rhs, d_columns = jax.vmap(error_terms)(dU, strains)
    e, _ = jax.vmap(lambda r: jacobian_error.linearized_solve(F, R, theta0, r, **loose))(rhs)
    correction = jnp.einsum("jnd,ind->ij", lam, dU)  # Λ_Jᵀ dU_I = −Λ_Jᵀ H⁺ Λ_I
    error = d_columns.T + jnp.einsum("jnd,ind->ji", lam, e)  # [J, I], as `correction`'s transpose
    stress_v = jax.grad(E_s, argnums=1)(R, theta0)
    return born, correction, dU, info, stress_v, error, residuals, probed


def _constants(E_s, R, basis, solve, hessian):
    """``(Born, Λᵀ dU)``, ``(n_voigt, n_voigt)`` each (eV, not yet per volume), without the
    diagnostics of :func:`_internal`: the function that the parameter derivative
    differentiates. ``hessian`` must be built from the differentiated arguments."""
    n_voigt = len(voigt_names(R.shape[1]))
    F = jax.grad(E_s)
    theta0 = jnp.zeros((n_voigt,), jnp.float64)
    # forward-over-forward: its tangent (a third derivative) compiles ~30% faster than jax.hessian's
    born = jax.jacfwd(jax.jacfwd(E_s, argnums=1), argnums=1)(R, theta0)
    nullspace = lambda x, th: basis  # noqa: E731

    dU, _, lam = jax.vmap(lambda t: _strain_column(F, R, theta0, t, nullspace, solve, hessian))(
        jnp.eye(n_voigt, dtype=jnp.float64))
    return born, jnp.einsum("jnd,ind->ij", lam, dU)


def _parameter_derivatives(energy, dim, R, basis, params, cell, nb, blocks, directions, solve):
    """``d(Born)/dθ·v`` and ``d(Λᵀ dU)/dθ·v`` for each flat direction ``v`` (rows of
    ``directions``, ``(P, n_params)`` in ``ravel_pytree`` order), total through ``R*(θ)``
    at fixed cell, and the :class:`SolveInfo` of the ``dR*/dθ`` solves (jit-able).

    Returns ``(dborn (P, nv, nv), dcorrection (P, nv, nv), info)`` in eV per unit of θ.
    """
    flat, unravel = ravel_pytree(params)
    nullspace = lambda x, th: basis  # noqa: E731

    def constants(x, th):
        p = unravel(th)

        def E_s(U, eps_v):
            D = deformation_gradient(eps_v, dim)
            return energy(U @ D, p, cell @ D, nb)

        # products rebuilt from (x, θ), not the blocks: their tangent carries ∂H
        return _constants(E_s, x, basis, solve, hessian_products(energy, x, p, cell, nb))

    F = lambda x, th: jax.grad(energy)(x, unravel(th), cell, nb)  # noqa: E731
    H = hessian_products(energy, R, params, cell, nb, blocks=blocks)  # no tangent flows through here

    def one(v):
        dR, info = root_jvp(F, R, (flat,), (v,), solve=solve, nullspace=nullspace, symmetric=True,
                            return_info=True, on_failure="ignore", operator=H)
        _, (dborn, dcorr) = jax.jvp(constants, (R, flat), (dR, v))
        return dborn, dcorr, info

    return jax.vmap(one)(directions)


def _wanted(params, wrt):
    """``(labels, indices, names)`` of the scalar parameters selected by ``wrt`` and the
    keys of ``dparams``: a leaf name where every element of the leaf was selected, else
    each selected element's label."""
    if wrt == "cell":
        raise OptionError("elastic_constants(wrt='cell') is not a derivative it offers: the constants are "
                          "strain derivatives already. Pass wrt='params' or parameter names.")
    if isinstance(wrt, dict):
        raise OptionError("elastic_constants takes no dict of directions; pass wrt='params' (or the names "
                          "involved) and contract dparams with the direction.")
    if not isinstance(wrt, (str, list, tuple)):
        raise OptionError(f"wrt must be None, 'params', a parameter name or a list of names; got {wrt!r}.")
    labels = parameter_labels(params)
    idx = select_parameters(labels, wrt, cell=False)
    chosen, names = set(idx.tolist()), []
    for i in idx:
        leaf = labels[i].split("[")[0]
        members = [j for j, lab in enumerate(labels) if lab.split("[")[0] == leaf]
        name = leaf if chosen.issuperset(members) else labels[i]
        if name not in names:
            names.append(name)
    return labels, idx, names


def _assemble(flat, params, selection) -> dict:
    """``{name: array}`` from one ``(n_voigt, n_voigt)`` row of ``flat`` per selected scalar
    parameter (``selection`` from :func:`_wanted`): a leaf's rows reshaped to
    ``(*leaf_shape, n_voigt, n_voigt)``, an element label's row as it is."""
    labels, idx, names = selection
    row_of = {int(i): row for row, i in enumerate(idx)}
    nv = flat.shape[-1]
    out = {}
    for name in names:
        if name in params:
            rows = [row_of[j] for j, lab in enumerate(labels) if lab.split("[")[0] == name]
            out[name] = flat[rows].reshape(np.shape(params[name]) + (nv, nv))
        else:
            out[name] = flat[row_of[labels.index(name)]]
    return out


class make_elastic_constants:  # noqa: N801  (a function that returns a function)
    """A reusable, compiled :func:`elastic_constants` for structures shaped like ``system``.

    ``elastic_fn = make_elastic_constants(pot, system)``; ``elastic_fn(result, params=None,
    neighbor=None, progress=None, wrt=None)`` returns :class:`ElasticConstants`. The first call compiles the Born
    Hessian and the ``n_voigt`` batched solves; later calls with the same layout reuse
    them. ``wrt`` (see :func:`elastic_constants`) compiles a second program, once per
    layout and number of parameter directions; ``wrt=None`` never runs it. Options are
    those of :func:`elastic_constants`.
    """

    def __init__(self, pot, system, *, solve: Optional[Callable] = None, tol: float = 1e-10, strict: bool = False,
                 strict_fmax: float = STRICT_FMAX, stability=True, neighbor_list=None, on_failure: str = "raise"):
        if not system.pbc:
            raise OptionError("elastic constants need a periodic system with a cell; this one is free.")
        if not (isinstance(tol, (int, float)) and np.isfinite(tol) and tol > 0):
            raise OptionError(f"tol must be a positive number (relative residual); got {tol!r}.")
        self.pot = pot
        self.tol = float(tol)
        self.solve = solve or functools.partial(linear_solve.cg, tol=tol)
        self.probe_tol = probe.probe_tolerance(solve, tol)
        self.strict, self.strict_fmax = bool(strict), float(strict_fmax)
        self.stability = as_stability(stability)
        self.on_failure = check_policy(on_failure)
        self._problem = ProblemBuilder(pot, neighbor_list)
        self._compiled = {}
        self._compiled_derivative = {}  # the wrt= programs, keyed like _compiled plus the direction count

    def _compile(self, prob):
        energy, dim, solve, tol = prob.energy, prob.system.dim, self.solve, self.probe_tol

        def run(R, basis, params, cell, nb, blocks, probe_vector=None):
            def E_s(U, eps_v):
                D = deformation_gradient(eps_v, dim)
                return energy(U @ D, params, cell @ D, nb)

            # at ε = 0 the strain energy's Hessian in U is the energy's own
            return _internal(E_s, R, basis, solve, hessian_products(energy, R, params, cell, nb, blocks=blocks),
                             None if probe_vector is None else (probe_vector, tol))

        return jax.jit(run)

    def _compile_derivative(self, prob):
        energy, dim, solve = prob.energy, prob.system.dim, self.solve
        return jax.jit(functools.partial(_parameter_derivatives, energy, dim, solve=solve))

    def _derivatives(self, prob, basis, key, selection):
        """``(dparams, dclamped, residuals)`` for :class:`ElasticConstants` (per volume);
        ``selection`` from :func:`_wanted`."""
        params, system = prob.params, prob.system
        labels, idx, names = selection
        directions = jnp.asarray(np.eye(len(labels))[idx])
        dkey = key + (len(idx),)
        if dkey not in self._compiled_derivative:
            self._compiled_derivative[dkey] = self._compile_derivative(prob)
        dborn, dcorr, info = self._compiled_derivative[dkey](
            system.positions, basis, params, system.cell, prob.neighbor, prob.blocks, directions)
        V = float(system.volume)
        dborn, dcorr = np.asarray(dborn) / V, np.asarray(dcorr) / V
        sym = lambda a: 0.5 * (a + np.swapaxes(a, -1, -2))  # noqa: E731
        dclamped_flat = sym(dborn)
        drelaxed_flat = dclamped_flat + sym(dcorr)
        residual = np.asarray(info.relative_residual)
        if not bool(np.all(np.asarray(info.converged))):
            report(self.on_failure,
                   f"the dR*/dθ solves of the parameter derivative missed tol={self.tol:g} for "
                   f"{[labels[i] for i, c in zip(idx, np.asarray(info.converged)) if not c]} (relative "
                   f"residuals {residual}). Relax tighter, keep stability=True (soft modes), or pass "
                   "solve=functools.partial(ms.linear_solve.minres, ...).",
                   LinearSolveError, LinearSolveWarning)
        return (_assemble(drelaxed_flat, params, selection), _assemble(dclamped_flat, params, selection),
                residual)

    def __call__(self, result, params=None, neighbor=None, progress: Optional[bool] = None,
                 wrt=None) -> ElasticConstants:
        with structure_stages(progress, "elastic_constants", result, params, 3 if wrt is None else 4) as stages:
            stages.start("forces and Hessian blocks")
            prob = self._problem(result, params, neighbor)
            system = prob.system
            if not system.pbc:
                raise OptionError("elastic constants need a periodic system with a cell; this one is free.")
            selection = None if wrt is None else _wanted(prob.params, wrt)
            key = (system.n_atoms, system.dim, tuple(np.asarray(system.species).tolist()),
                   tuple((k, np.shape(v)) for k, v in sorted(prob.params.items())), prob.neighbor is None)
            if key not in self._compiled:
                self._compiled[key] = self._compile(prob)
            run = self._compiled[key]
            fmax_now = check_stationary(prob, self.strict, self.strict_fmax, "elastic constants")
            solves = f"Born term and {len(voigt_names(system.dim))} internal-strain solves"

            def arguments(basis):
                return system.positions, basis, prob.params, system.cell, prob.neighbor, prob.blocks

            def run_probed(basis, z):
                stages.start(solves + " with a spectral probe")
                out = run(*arguments(basis), z)
                return out, out[3].breakdown, out[-1]

            def run_plain(basis):
                # the Born Hessian and every strain column are one program: one stage
                stages.start(solves)
                return run(*arguments(basis))

            out, (basis, _, _, lam_max), _ = probe.solved_with_stability(
                prob, self.stability, self.probe_tol, fmax_now, run_probed, run_plain, stages)
            born, correction, dU, info, stress_v, error, residuals, _ = out
            jax.block_until_ready(born)  # the stage ends when the program does
            derivatives = (None, None, np.zeros(0))
            if selection is not None:
                stages.start(f"derivatives w.r.t. {len(selection[1])} parameter"
                             f"{'s' if len(selection[1]) != 1 else ''} through the relaxation")
                derivatives = self._derivatives(prob, basis, key, selection)
        if not bool(np.all(np.asarray(info.converged))):
            report(self.on_failure,
                   f"the internal-relaxation solves missed tol={self.tol:g} (relative residuals "
                   f"{np.asarray(info.relative_residual)}). Relax tighter, keep stability=True (soft "
                   "modes), or pass solve=functools.partial(ms.linear_solve.minres, ...).",
                   LinearSolveError, LinearSolveWarning)
        V = float(system.volume)
        born = np.asarray(born) / V
        corr = np.asarray(correction) / V
        scale = max(np.abs(born).max(), 1e-300)
        asym = float(np.abs(corr - corr.T).max() / scale)
        clamped = 0.5 * (born + born.T)
        relaxed = clamped + 0.5 * (corr + corr.T)
        lin = linearity(residuals, lam_max, system.positions)
        estimate = jacobian_error.first_order_estimate(np.linalg.norm(np.asarray(error) / V, 2), lin)
        return ElasticConstants(
            clamped=clamped,
            relaxed=relaxed,
            volume=V,
            stress=np.asarray(stress_v) / V,
            internal_strain=np.asarray(dU),
            unit="eV/Å³" if system.dim == 3 else "eV/Å²",
            solve_residual=np.asarray(info.relative_residual),
            asymmetry=asym,
            n_zero_modes=int(np.asarray(basis).shape[0]),
            error_estimate=float(estimate),
            linearity=lin,
            dparams=derivatives[0],
            dclamped=derivatives[1],
            dparams_solve_residual=derivatives[2],
        )


def elastic_constants(result, pot, *, params=None, solve: Optional[Callable] = None, tol: float = 1e-10,
                      strict: bool = False, strict_fmax: float = STRICT_FMAX, stability=True, neighbor_list=None,
                      neighbor=None, on_failure: str = "raise", progress: Optional[bool] = None,
                      wrt=None) -> ElasticConstants:
    """Clamped-ion and relaxed-ion Voigt elastic constants of a relaxed periodic structure.

    Args:
      result: a ``RelaxResult`` or a relaxed periodic ``System``.
      pot: the potential; ``params`` default ``pot.params``.
      solve, tol: linear solver of the internal relaxation (default CG with ``tol``).
      strict, strict_fmax, stability, neighbor_list, neighbor: as ``ms.sensitivity``.
      on_failure: an internal-relaxation solve that misses ``tol``: ``"raise"``
        (default), ``"warn"`` or ``"ignore"``.
      progress: show the stages (Hessian blocks, stability analysis, the Born term with
        all strain columns in one program) on stderr; default: when stderr is a
        terminal. ``True`` under jit/vmap raises :class:`~mdsens.OptionError`.
      wrt: ``None`` (default: no derivatives), ``"params"`` (every parameter), a leaf
        name or element label (``"lam"``, ``"sigma[0,1]"``), a comma-separated string or
        a list of them: fill ``dparams`` and ``dclamped`` with ``dC/dθ``, the total
        derivative at fixed cell through the relaxation ``R*(θ)`` (module docstring).
        One ``dR*/dθ`` solve and ``n_voigt`` tangent solves per scalar parameter, in a
        second compiled program.

    Returns:
      :class:`ElasticConstants` in eV/Å³ (eV/Å² in 2D). Compiles on every call;
      :class:`make_elastic_constants` reuses the compiled solves.

    Raises:
      OptionError: a free (non-periodic) system, or invalid options (``wrt="cell"``).
      UnknownParameterError: ``wrt`` names no parameter of the potential.
      SaddlePointError: negative curvature at the input.
      LinearSolveError: an internal-relaxation solve missed ``tol`` (``on_failure="raise"``).
    """
    system = getattr(result, "system", result)
    options = dict(solve=solve, tol=tol, strict=strict, strict_fmax=strict_fmax, stability=stability,
                   neighbor_list=neighbor_list, on_failure=on_failure)
    fn = cache.memoized_make("elastic_constants", pot, system, (), options,
                       lambda: make_elastic_constants(pot, system, **options))
    return fn(result, params=pot.params if params is None else params, neighbor=neighbor, progress=progress,
              wrt=wrt)
