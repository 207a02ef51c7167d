"""Derivatives through ``relax(..., relax_cell=True)``: the cell response to parameters.

How lattice constants, positions, energy and stress of the zero-stress structure move
with θ. With ``cell₀`` the input cell (rows), the variable is ``x = (U, q)``: reference
positions ``U`` ``(N, d)`` and a scaled Voigt strain ``q = c e`` (engineering shear,
:mod:`mdsens.md.strain` order), and

    D(e) = I + ε(e),    R = U D,    cell = cell₀ D,
    Ê(U, e; θ, cell₀) = E(U D, θ, cell₀ D),
    F(x, θ, cell₀) = ∇ₓ Ê(U, q/c) = 0      (zero forces and zero stress).

The primal is the host relaxation (:class:`mdsens.md.driver.HostRelaxation` with
``relax_cell=True``), whose result has the rigid rotation removed (``cell* = cell₀ P``,
``P`` symmetric), so ``ε* = P − I`` and ``U* = R* P⁻¹``. Then ``dx*/dθ = −H⁺ ∂²Ê/∂x∂θ``
with ``H = ∇²ₓÊ`` deflated by the ``d`` translations of ``U`` (and any soft mode the
stability analysis finds), through :func:`mdsens.custom_root` and its aux channel
(strain scale, neighbor list at the relaxed state, null-space basis).

Gauge: ``d cell*/dθ = cell₀ dD`` with ``dD`` symmetric (no rigid rotation), and
``dR*/dθ`` has no net translation. ``energy``, ``forces`` and ``stress`` are evaluated at
the differentiable ``(R*, cell*)``. The strain scale ``c`` (a length) balances the
strain block against the atoms' block for CG (``c² = mean diag(∂²Ê/∂e²) / λ_max``); it
changes nothing in the derivative. Derivatives w.r.t. ``system.cell`` are pure gauge
(``dE*/dcell₀ = 0``).

The stability verdict (``stability=True``): a dense eigen-analysis of ``H`` up to
``dense_max_dof`` degrees of freedom; above that the atoms' block by
:func:`mdsens.md.zero_modes.stability` and the Schur complement
``S = H_qq − H_qU A⁺ H_Uq`` (``V`` times the relaxed elastic tensor): ``H`` is positive
semi-definite beyond its null space iff both are. Needs the host: under ``jax.jit`` or
``jax.vmap`` these derivatives raise ``NotImplementedError``.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.implicit import linear_solve
from mdsens.md import neighbors, zero_modes
from mdsens.md.driver import RelaxResult
from mdsens.md.errors import NearSingularWarning
from mdsens.md.options import StabilityOptions
from mdsens.md.layer import is_traced, python_scalar, relaxation_root
from mdsens.md.strain import deformation_gradient, energy_forces_stress, strain_to_voigt, voigt_names

__all__ = ["CellRelaxation"]


class CellAux(NamedTuple):
    """The aux channel of the cell relaxation: strain scale, list indices, basis, and the
    host relaxation's diagnostics (arrays; the channel's structure keys the compiled
    tangent, so it holds no jax-md list)."""

    scale: jax.Array
    neighbor: Any
    basis: tuple
    steps: jax.Array
    fmax: jax.Array
    converged: jax.Array


class CellRelaxation:
    """The cell-relaxation layer for one host relaxation (``relax_cell=True``).

    All compiled functions take what varies between calls (positions, strain, params,
    cell, strain scale, neighbor indices) as arguments, so their compilations are reused.
    """

    def __init__(self, host, solve, stability, on_failure):
        self.host = host
        self.solve = solve
        self.stability = stability
        self.on_failure = on_failure
        self._roots = {}  # progress → the implicit layer (its compiled tangent lives with it)
        energy_fn = host.energy_fn
        n, dim = host.template.n_atoms, host.template.dim
        nd = n * dim
        self.nv = nv = len(voigt_names(dim))

        def E_hat(U, e, params, cell0, nb):
            """``Ê(U, e) = E(U D(e), θ, cell₀ D(e))``."""
            D = deformation_gradient(e, dim)
            return energy_fn(U @ D, params, cell0 @ D, nb)

        self.E_hat = E_hat

        def energy_x(x, params, cell0, c, nb):
            U, q = x
            return E_hat(U, q / c, params, cell0, nb)

        # jitted: JAX differentiates and transposes each as one compiled unit.
        self.F = jax.jit(jax.grad(energy_x))

        def outputs(U, q, params, cell0, c, nb):
            D = deformation_gradient(q / c, dim)
            R, cell = U @ D, cell0 @ D
            # Gauge: no net translation of dR*/dθ (the shift is exactly zero in value).
            centre = jnp.mean(R, axis=0)
            R = R - (centre - jax.lax.stop_gradient(centre))
            return (R, cell) + tuple(energy_forces_stress(energy_fn, R, params, cell, nb))

        self.outputs = jax.jit(outputs)

        def flat_energy(x, params, cell0, nb):
            return E_hat(x[:nd].reshape(n, dim), x[nd:], params, cell0, nb)

        def dense_hessian(x, params, cell0, nb):
            grad = jax.grad(flat_energy)

            def row(v):
                return jax.jvp(lambda y: grad(y, params, cell0, nb), (x,), (v,))[1]

            # rows as Hessian-vector products, in batches (bounded memory)
            return jax.lax.map(row, jnp.eye(x.size, dtype=x.dtype), batch_size=min(64, x.size))

        self.dense_hessian = jax.jit(dense_hessian)

        def scales(U, e, params, cell0, nb):
            from mdsens.md.minimize import max_curvature

            lam = max_curvature(lambda U_, p, c_, nb_: E_hat(U_, e, p, c_, nb_), U, params, cell0, nb)
            return lam, jax.hessian(E_hat, argnums=1)(U, e, params, cell0, nb)

        self.scales = jax.jit(scales)

        gU = jax.grad(E_hat, argnums=0)

        def blocks(U, e, params, cell0, nb):
            B = jax.jacfwd(gU, argnums=1)(U, e, params, cell0, nb).reshape(nd, nv)
            return B, jax.hessian(E_hat, argnums=1)(U, e, params, cell0, nb)

        self.blocks = jax.jit(blocks)

        def solve_columns(B, Q, U, e, params, cell0, nb):
            """``A⁺ B`` (``A = ∂²Ê/∂U²``) by CG deflated by the orthonormal ``Q``."""

            def deflated(v):
                _, hv = jax.jvp(lambda u: gU(u, e, params, cell0, nb), (U,), (v.reshape(n, dim),))
                return hv.ravel() + Q @ (Q.T @ v)

            def one(b):
                b = b - Q @ (Q.T @ b)
                y, info = linear_solve.cg(deflated, b, tol=1e-12, maxiter=10 * nd)
                return y - Q @ (Q.T @ y), info.converged

            return jax.vmap(one, in_axes=1, out_axes=(1, 0))(B)

        self.solve_columns = jax.jit(solve_columns)

    # -- the layer ------------------------------------------------------------------------
    def __call__(self, system, params, criteria):
        host = self.host
        if not is_traced((params, system.positions, system.cell)):
            return host(system, params, **criteria)
        progress = criteria["progress"]
        if progress not in self._roots:
            self._roots[progress] = self._implicit_layer(progress)
        (U, q), aux = self._roots[progress](system.positions, params, system.cell, criteria["fmax"],
                                            criteria["max_steps"], criteria["stress_tol"])
        R, cell, energy, forces, stress = self.outputs(U, q, params, system.cell, aux.scale, aux.neighbor)
        return RelaxResult(system.replace(positions=R, cell=cell), energy, forces, python_scalar(aux.fmax, float),
                           python_scalar(aux.steps, int), python_scalar(aux.converged, bool), stress, None)

    def _implicit_layer(self, progress):
        host, dim = self.host, self.host.template.dim

        def F(x, aux, params, cell0, fmax, max_steps, stress_tol):
            return self.F(x, params, cell0, aux.scale, aux.neighbor)

        # The criteria are arguments, not closed over: the layer and its compiled tangent
        # serve every call.
        @relaxation_root(F, self.solve, self.on_failure)
        def relaxed_state(init, params, cell0, fmax, max_steps, stress_tol):
            if is_traced((init, params, cell0)):
                raise NotImplementedError(
                    "relax(..., relax_cell=True) cannot run under jax.jit or jax.vmap: the cell "
                    "relaxation and its stability analysis run on the host. Call it outside "
                    "jit/vmap (jax.grad, jax.jacfwd, jax.jacrev, jax.jvp and jax.vjp all work), "
                    "e.g. loop over parameter sets in Python."
                )
            cell0 = np.asarray(cell0, np.float64)
            start = host.template.replace(positions=init, cell=jnp.asarray(cell0))
            done = host(start, params, fmax=float(fmax), max_steps=int(max_steps),
                        stress_tol=None if stress_tol is None else float(stress_tol), progress=progress)
            # The host removed the rigid rotation: cell* = cell0 P with P symmetric positive.
            P = np.linalg.solve(cell0, np.asarray(done.system.cell))
            P = 0.5 * (P + P.T)
            e = jnp.asarray(strain_to_voigt(P - np.eye(dim)))
            U = jnp.asarray(np.linalg.solve(P, np.asarray(done.system.positions).T).T)  # R* P⁻¹
            # The list the relaxation confirmed convergence with, at (R*, cell*).
            nb = neighbors.indices_only(done.neighbor)
            c, (bU, bq) = self.analyse(U, e, params, jnp.asarray(cell0), nb)
            aux = CellAux(jnp.asarray(c, jnp.float64), nb, (jnp.asarray(bU), jnp.asarray(bq)),
                          jnp.asarray(done.steps), jnp.asarray(done.fmax), jnp.asarray(done.converged))
            return (U, e * c), aux

        return relaxed_state

    # -- analyses of the relaxed state: (c, (basis_U, basis_q)) --------------------------
    def analyse(self, U, e, params, cell0, nb):
        o = self.stability
        if o is None:
            lam, C = self.scales(U, e, params, cell0, nb)
            bU = zero_modes.rigid_modes(U, True)  # the d translations
            return _strain_scale(C, float(lam)), (bU, np.zeros((bU.shape[0], self.nv)))
        if U.size + self.nv <= o.dense_max_dof:
            return self._dense(U, e, params, cell0, nb, o)
        return self._iterative(U, e, params, cell0, nb, o)

    def _dense(self, U, e, params, cell0, nb, o):
        """Dense eigen-analysis of the joint Hessian in ``[U, q]``, ``q = c e``, projected on
        the complement of the ``d`` translations."""
        n, dim = U.shape
        nd, nv = n * dim, self.nv
        H = np.asarray(self.dense_hessian(jnp.concatenate([U.ravel(), e]), params, cell0, nb))
        H = 0.5 * (H + H.T)
        lam_U = np.linalg.eigvalsh(H[:nd, :nd])
        c = _strain_scale(H[nd:, nd:], float(np.abs(lam_U).max(initial=0.0)))
        t = np.concatenate([np.ones(nd), np.full(nv, 1.0 / c)])
        H = t[:, None] * H * t[None, :]
        Qt = np.concatenate([zero_modes.rigid_modes(U, True).reshape(dim, nd).T, np.zeros((nv, dim))])
        P = np.eye(nd + nv) - Qt @ Qt.T
        w, V = np.linalg.eigh(P @ H @ P)
        # the d translations are exact zeros: drop the eigenpairs that overlap them most
        drop = np.argsort(-np.sum((Qt.T @ V) ** 2, axis=0))[:dim]
        keep = np.setdiff1d(np.arange(nd + nv), drop)
        soft = _verdict(w[keep], None, o)
        modes = np.concatenate([Qt, V[:, keep][:, soft]], axis=1).T  # (k, nd + nv)
        return c, (modes[:, :nd].reshape(-1, n, dim), modes[:, nd:])

    def _iterative(self, U, e, params, cell0, nb, o):
        """The same verdict without a dense Hessian: the atoms' block and the Schur complement."""
        n, dim = U.shape
        nv = self.nv
        report = zero_modes.stability(self.E_hat, U, True, o, args=(e, params, cell0, nb))
        basis_U, lam_U = np.asarray(report.basis), float(report.lambda_max)
        B, C = self.blocks(U, e, params, cell0, nb)
        c = _strain_scale(C, lam_U)
        B, C = np.asarray(B) / c, np.asarray(C) / c**2
        Q = jnp.asarray(basis_U.reshape(basis_U.shape[0], -1).T)
        Y, ok = self.solve_columns(jnp.asarray(B), Q, U, e, params, cell0, nb)
        if not bool(np.all(np.asarray(ok))):
            warnings.warn(
                "relax(relax_cell=True): the CG solves of the cell stability analysis (Schur "
                "complement) did not converge; its verdict is approximate.",
                NearSingularWarning,
                stacklevel=5,
            )
        Y = np.asarray(Y)
        S = C - B.T @ Y
        mu, W = np.linalg.eigh(0.5 * (S + S.T))
        soft = _verdict(mu, lam_U, o)
        W = W[:, soft]
        # a flat strain direction w comes with its internal relaxation −A⁺B w
        bU = np.concatenate([basis_U, (-(Y @ W)).T.reshape(-1, n, dim)], axis=0)
        bq = np.concatenate([np.zeros((basis_U.shape[0], nv)), W.T], axis=0)
        return c, (bU, bq)


def _verdict(w, lam_scale, o: StabilityOptions) -> np.ndarray:
    """The soft mask of ``w`` (eigenvalues beyond the translations), after the saddle and
    near-singular verdict; ``lam_scale``: a further curvature scale (the atoms' block's
    largest eigenvalue) when ``w`` is not the whole spectrum."""
    lam_max = max(float(np.abs(w).max(initial=0.0)), lam_scale or 0.0, 1e-300)
    soft = np.abs(w) <= o.soft_mode_rtol * lam_max
    zero_modes.check_spectrum(w[~soft], lam_max, o, "the cell-relaxed structure (positions and strain, "
                              "strain scaled to the atoms' curvature)", "the translations", stacklevel=4)
    return soft


def _strain_scale(C_e, lam_max_U) -> float:
    """``c`` with ``q = c e``: the strain block's mean curvature becomes ``λ_max`` of the
    atoms' block (conditioning only; the derivative does not depend on it)."""
    curv = float(np.mean(np.abs(np.diag(np.asarray(C_e)))))
    ratio = curv / lam_max_U if lam_max_U > 0 else float("nan")
    return float(np.sqrt(ratio)) if (np.isfinite(ratio) and ratio > 0) else 1.0
