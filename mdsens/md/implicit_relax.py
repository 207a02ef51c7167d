"""Relaxation as an implicit layer: derivatives of relaxed structures without unrolling.

A relaxed structure ``R*(θ, cell)`` is a root of the stationarity condition

    F(R, θ, cell) = ∇_R E(R, θ, cell) = 0,

so :func:`relax` wraps the relaxation loop in :func:`mdsens.custom_root` with that ``F``.
``∂₁F`` is the Hessian: symmetric, positive semi-definite at a minimum, singular along
rigid translations (and rotations of a free cluster). Those modes are declared through
``nullspace=``, which fixes the **gauge**: derivatives of positions have no net
translation, and for clusters no net rotation about the centroid. When the relaxed
positions are concrete (no ``jit``/``vmap`` around the call), the Hessian's spectrum is
also checked (:func:`mdsens.md.zero_modes.stability`): a saddle point raises
:class:`~mdsens.md.zero_modes.SaddlePointError`, soft modes such as rattlers join the
null space, and a near-singular Hessian warns.

What is differentiable (forward and reverse mode, w.r.t. every leaf of ``params`` and
w.r.t. the cell of the input structure, at fixed fractional coordinates):

* ``result.system.positions`` — through the implicit function theorem;
* ``result.energy``, ``result.forces``, ``result.stress`` — evaluated at the
  differentiable ``R*``, so ``dE*/dθ`` equals the partial ``∂E/∂θ`` (envelope theorem).

``fmax``, ``steps`` and ``converged`` describe the relaxation and carry no derivative.
Under ``jax.jit`` or ``jax.vmap`` the host loop cannot run; the pure on-device FIRE
(:func:`mdsens.md.relax.fire_minimize`) is used instead, with the same criterion, and
those three fields are then arrays.

**Cell relaxation** (``relax_cell=True``): the cell response to parameters (how lattice
constants, positions, energy and stress of the zero-stress structure move with θ).
With ``cell₀`` the input cell (rows), the variable is ``x = (U, q)``: reference positions
``U`` ``(N, d)`` and a scaled Voigt strain ``q = c e`` (``d(d+1)/2`` components,
engineering shear, the order of :func:`mdsens.md.sensitivity.voigt_names`), and

    D(e) = I + ε(e)   (ε symmetric),    R = U D,    cell = cell₀ D,
    Ê(U, e; θ, cell₀) = E(U D, θ, cell₀ D),
    F(x, θ, cell₀) = ∇ₓ Ê(U, q/c) = (∇_R E · D,  (V/c) [σ : D⁻¹ E_I]_I) = 0

(``E_I = ∂ε/∂e_I``, σ ASE's stress): zero forces and zero stress, as ``D`` is invertible.
The primal is the host relaxation of :func:`mdsens.md.relax.relax` (``relax_cell=True``);
its result has the rigid rotation removed (polar decomposition), ``cell* = cell₀ P`` with
``P`` symmetric, so ``ε* = P − I`` and ``U* = R* P⁻¹``. Then

    dx*/dθ = −H⁺ ∂²Ê/∂x∂θ,       H = ∇²ₓÊ   (symmetric; PSD at a stable minimum),

solved by CG with ``H`` deflated by its null space: the ``d`` translations of ``U``
(zero on the strain); the symmetric strain leaves no rotation. The outputs
``R* = U* D*`` and ``cell* = cell₀ D*`` are differentiable, with the gauge

* ``d cell*/dθ = cell₀ dD`` with ``dD`` symmetric: the cell derivative has no rigid
  rotation (``cell₀⁻¹ d cell*`` is symmetric);
* ``dR*/dθ = dU D* + U* dD``, then shifted to **no net translation**, ``Σ_i dR_i/dθ = 0``
  (the values of ``R*`` are untouched);
* ``energy``, ``forces``, ``stress`` are evaluated at the differentiable ``(R*, cell*)``:
  ``dE*/dθ = ∂E/∂θ`` at fixed structure (envelope theorem), and the forces and stress
  stay zero along the relaxed branch, so their derivatives vanish (up to the residual).

The strain scale ``c`` (a length) makes the strain block's mean curvature equal the
largest curvature of the atoms' block, ``c² = mean diag(∂²Ê/∂e²) / λ_max(∂²Ê/∂U²)``,
for the conditioning of CG; it is a linear change of variables and changes nothing in
the derivative. Derivatives w.r.t. ``system.cell`` are allowed but are pure gauge: the
relaxed structure does not depend on the start cell except through the rotation-free
convention ``cell* = cell₀ P`` (so ``dE*/dcell₀ = 0``).

When differentiating, the stability of the relaxed state is checked on the host
(``check_stability=True``): up to ``zero_modes.DENSE_MAX_DOF`` degrees of freedom by a
dense eigen-analysis of ``H`` (strain scaled by ``c``) beyond the translations; above
that by :func:`mdsens.md.zero_modes.stability` of the atoms' block ``A = ∂²Ê/∂U²`` and the
eigenvalues of the Schur complement ``S = H_qq − H_qU A⁺ H_Uq`` (``V`` times the relaxed
elastic tensor, ``A⁺`` by deflated CG): ``H`` is PSD beyond its null space iff both are.
A negative eigenvalue (a saddle) raises :class:`~mdsens.md.zero_modes.SaddlePointError`;
zero modes (rattlers, a flat cell direction) join the null space; a nearly singular
``H`` warns (:class:`~mdsens.md.zero_modes.NearSingularWarning`), with the thresholds of
:mod:`mdsens.md.zero_modes`. ``check_stability=False`` skips this: only the
translations are declared, and a saddle is then not detected.

Derivatives through ``relax_cell=True`` need the host: under ``jax.jit`` or ``jax.vmap``
they raise ``NotImplementedError`` (call ``relax`` outside; loop over parameter sets in
Python). With neighbor lists (``N >= NEIGHBOR_LIST_MIN_ATOMS`` or
``neighbor_list=True``) the derivative uses a list built on the host at the relaxed
structure with the concrete parameters. Like the fixed-cell path, each differentiated
call compiles its relaxation and derivative pieces (tens of seconds on a CPU); there is
no cache across calls. Derivatives are only as accurate as the relaxation (Theorem 1):
set ``fmax`` and ``stress_tol`` tight (the default ``stress_tol`` is ASE's loose
``fmax · N / V``).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.implicit import custom_root, linear_solve
from mdsens.md import neighbors as _nb
from mdsens.md import relax as _relax
from mdsens.md import zero_modes as _zm
from mdsens.md.potentials.base import energy_forces_stress
from mdsens.md.sensitivity import _voigt_pairs, deformation_gradient, voigt_names
from mdsens.md.system import System

__all__ = ["relax", "relaxation_condition", "rigid_null_space"]

#: Relative tolerance of the implicit-differentiation CG solve.
DEFAULT_SOLVE_TOL = 1e-10


def relaxation_condition(energy_fn):
    """``F(R, params, cell, neighbor) = ∇_R E``: the optimality condition of a relaxation.

    With a neighbor list, ``neighbor`` must be valid at ``R``; :func:`relax` passes a
    list allocated at the start and updated to ``R`` inside ``F``.
    """
    return jax.grad(energy_fn)


def rigid_null_space(positions, pbc: bool):
    """Rigid-body zero modes as a ``(k, N, d)`` array (jax, traceable; not orthonormal).

    ``d`` translations; for a free cluster also rotations about the centroid (3 in 3D,
    1 in 2D). :func:`mdsens.custom_root` orthonormalizes them.
    """
    n, d = positions.shape
    modes = [jnp.broadcast_to(jnp.eye(d, dtype=positions.dtype)[a], (n, d)) for a in range(d)]
    if not pbc:
        X = positions - positions.mean(axis=0)
        if d == 2:
            modes.append(jnp.stack([-X[:, 1], X[:, 0]], axis=1))
        else:
            modes.extend(jnp.cross(jnp.eye(3, dtype=X.dtype)[a], X) for a in range(3))
    return jnp.stack(modes)


def _is_traced(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def relax(system: System, pot, *, params=None, fmax: float = _relax.DEFAULT_FMAX,
          max_steps: int = _relax.DEFAULT_MAX_STEPS, method: str = "fire", relax_cell: bool = False,
          solve=None, check_stability: bool = True, **options) -> "_relax.RelaxResult":
    """Relax ``system`` under ``pot``; differentiable w.r.t. ``params`` and ``system.cell``.

    Same arguments and result as :func:`mdsens.md.relax.relax` (FIRE or gradient
    descent, ASE's force criterion, progress, ``converged=False`` plus a warning when
    ``max_steps`` runs out), plus:

    Args:
      solve: linear solver for the implicit derivative (default CG, relative tolerance
        1e-10). The Hessian deflated by its zero modes is positive definite at a
        minimum, so CG applies.
      check_stability: check the Hessian spectrum at the relaxed structure when
        differentiating (saddle → error, soft modes → null space, near-singular →
        warning). Needs concrete values; skipped under ``jit``/``vmap``.

    The derivative is the implicit one, ``dR*/dθ = −H⁺ ∂²E/∂R∂θ`` in the gauge without
    net translation (and rotation for clusters): see the module docstring.

    With ``relax_cell=True`` (and ``stress_tol=`` for the stress criterion) the relaxed
    cell, positions, energy, forces and stress are differentiable w.r.t. ``params`` in
    forward and reverse mode, by implicit differentiation in (positions, strain): see
    "Cell relaxation" in the module docstring for the formulation and gauge. Set
    ``fmax`` and ``stress_tol`` tight when the derivatives matter.

    Raises:
      NotImplementedError: derivatives through ``relax_cell=True`` under ``jax.jit`` or
        ``jax.vmap`` (the cell relaxation runs on the host): call ``relax`` outside.
      SaddlePointError: (when differentiating with ``check_stability``) the relaxed
        structure, or with ``relax_cell`` the relaxed (structure, cell), is a saddle.
      ValueError: a neighbor-list-sized system (``N >= pot.neighbor_list_min_atoms``)
        relaxed under ``jit``/``vmap``: the list is built on the host. Differentiating
        with ``jax.grad``/``jax.jvp``/``jax.jacfwd`` outside ``jit`` works (the list is
        built at R* with the concrete parameters); under ``jit`` pass
        ``neighbor_list=False`` (dense, exact) or use ``ms.sensitivity``.
    """
    params = pot.params if params is None else params
    if relax_cell:
        return _relax_cell(system, pot, params, fmax=fmax, max_steps=max_steps, method=method,
                           solve=solve, check_stability=check_stability, **options)

    # Only a call being differentiated pays for the Hessian eigen-analysis.
    differentiating = _is_traced((params, system.positions, system.cell))
    neighbor_list = options.pop("neighbor_list", None)
    # Options of the call, not of the compiled relaxation that make_relax builds.
    progress = options.pop("progress", None)
    if options.pop("stress_tol", None) is not None:
        raise ValueError("stress_tol only applies with relax_cell=True.")
    host_relax = _relax.make_relax(pot, system, method=method, neighbor_list=neighbor_list, **options)
    use_nl = host_relax.use_nl
    cell = system.cell
    energy_fn = pot.energy_fn(system, neighbor_list=use_nl,
                              params=None if _is_traced(params) else params)
    grad_E = relaxation_condition(energy_fn)
    # Filled by the primal solve when it runs on the host (concrete values: no jit/vmap
    # around the call, though jax.grad/jvp/jacfwd may be): the relaxation's result and
    # the neighbor list it built at R*. F and the outputs are only ever evaluated at R*,
    # so that one list is exact for them, and it is built with concrete parameters even
    # when jax.grad traces them.
    host = {}

    def F(R, params, cell):
        return grad_E(R, params, cell, host.get("neighbor"))

    stable_bases = []

    def null_space(R, params, cell):
        # The basis found by the host eigen-analysis of the primal solve, if there was
        # one; the rigid modes otherwise (under jit/vmap).
        return stable_bases[-1] if stable_bases else rigid_null_space(R, system.pbc)

    def analyse_stability(R, params, cell):
        # Runs in the primal (eager) solve: reverse mode stages everything inside the
        # JVP rule, where a host eigen-analysis could not see concrete numbers.
        stable_bases.append(np.asarray(_zm.null_space(energy_fn, R, system.pbc,
                                                      args=(params, cell, host.get("neighbor")))))

    linear = solve or functools.partial(linear_solve.cg, tol=DEFAULT_SOLVE_TOL)

    @custom_root(F, solve=linear, nullspace=null_space, symmetric=True, has_aux=True)
    def relaxed_positions(init, params, cell):
        if _is_traced((init, params, cell)):
            if use_nl:
                raise ValueError(
                    f"relax() of N={system.n_atoms} atoms uses a neighbor list, whose cutoff "
                    "must be known on the host, but the call is traced by jit/vmap. Call relax "
                    "outside jit/vmap (jax.grad, jax.jvp and jax.jacfwd of it work), pass "
                    "neighbor_list=False (dense and exact), or differentiate with "
                    "ms.sensitivity(result, pot)."
                )
            minimize = _relax.fire_minimize if method == "fire" else _relax.gradient_descent_minimize
            out = minimize(energy_fn, init, params, cell, fmax=fmax, max_steps=max_steps)
            return out.positions, (out.steps, out.fmax)
        start = system.replace(positions=init) if cell is None else system.replace(positions=init, cell=cell)
        result = host_relax(start, params, fmax=fmax, max_steps=max_steps, progress=progress)
        host.update(result=result, neighbor=_nb.indices_only(result.neighbor))
        if check_stability and differentiating:
            analyse_stability(result.system.positions, params, cell)
        return result.system.positions, (jnp.asarray(result.steps), jnp.asarray(result.fmax))

    R, (steps, fmax_now) = relaxed_positions(system.positions, params, cell)

    relaxed = system.replace(positions=R) if cell is None else system.replace(positions=R, cell=cell)
    energy, forces, stress = energy_forces_stress(energy_fn, R, params, cell, host.get("neighbor"))
    if "result" in host:
        done = host["result"]
        return _relax.RelaxResult(relaxed, energy, forces, done.fmax, done.steps, done.converged, stress,
                                  done.neighbor)
    converged = fmax_now < fmax
    jax.debug.callback(functools.partial(_warn_if_not_converged, fmax, max_steps), fmax_now, steps)
    return _relax.RelaxResult(relaxed, energy, forces, fmax_now, steps, converged, stress)


def _warn_if_not_converged(target, max_steps, fmax_now, steps):
    fmax_now = np.atleast_1d(np.asarray(fmax_now))
    if np.all(fmax_now < target):
        return
    warnings.warn(
        f"relaxation did not converge in {int(np.max(steps))} steps (max_steps={max_steps}): "
        f"fmax = {float(np.max(fmax_now)):.3g} (target {target:.3g}); its derivatives are "
        "only as accurate as the relaxation (Theorem 1). Raise max_steps or loosen fmax.",
        _relax.NotConvergedWarning,
        stacklevel=2,
    )


# ------------------------------------------------------------------------ relax_cell
class _CellKit:
    """Everything ``relax(relax_cell=True)`` compiles, for one potential and layout.

    All functions take what varies between calls (positions, strain, params, cell,
    strain scale ``c``, neighbor indices) as arguments, so their compilations are reused.
    """

    def __init__(self, pot, system: System, method: str, options: dict):
        self.host_relax = _relax.make_relax(pot, system, method=method, relax_cell=True, **options)
        energy_fn = self.host_relax.energy_fn
        self.energy_fn = energy_fn
        n, dim = system.n_atoms, system.dim
        nd = n * dim
        self.nv = nv = len(voigt_names(dim))

        def E_hat(U, e, params, cell0, nb):
            """``Ê(U, e) = E(U D(e), θ, cell₀ D(e))``, ``D = I + ε(e)``."""
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
            # rows as Hessian-vector products, in batches (bounded memory)
            grad = jax.grad(flat_energy)

            def row(v):
                return jax.jvp(lambda y: grad(y, params, cell0, nb), (x,), (v,))[1]

            return jax.lax.map(row, jnp.eye(x.size, dtype=x.dtype), batch_size=min(64, x.size))

        self.dense_hessian = jax.jit(dense_hessian)

        def scales(U, e, params, cell0, nb):
            lam = _relax.max_curvature(lambda U_, p, c_, nb_: E_hat(U_, e, p, c_, nb_), U, params, cell0, nb)
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

    # -- analyses of the relaxed state: (c, (basis_U, basis_q)) --------------------------
    def analyse(self, U, e, params, cell0, nb, check_stability):
        if not check_stability:
            return self._unchecked(U, e, params, cell0, nb)
        if U.size + self.nv <= _zm.DENSE_MAX_DOF:
            return self._dense(U, e, params, cell0, nb)
        return self._iterative(U, e, params, cell0, nb)

    def _unchecked(self, U, e, params, cell0, nb):
        """``check_stability=False``: the strain scale only, and the translations."""
        lam, C = self.scales(U, e, params, cell0, nb)
        bU = _zm.rigid_modes(U, True)  # the d translations
        return _strain_scale(C, float(lam)), (bU, np.zeros((bU.shape[0], self.nv)))

    def _dense(self, U, e, params, cell0, nb):
        """Dense eigen-analysis of the joint Hessian in ``[U, q]``, ``q = c e``, projected
        on the complement of the ``d`` translations: saddle → error, soft modes → null
        space, near-singular → warning (thresholds of :mod:`mdsens.md.zero_modes`)."""
        n, dim = U.shape
        nd, nv = n * dim, self.nv
        H = np.asarray(self.dense_hessian(jnp.concatenate([U.ravel(), e]), params, cell0, nb))
        H = 0.5 * (H + H.T)
        lam_U = np.linalg.eigvalsh(H[:nd, :nd])
        c = _strain_scale(H[nd:, nd:], float(np.abs(lam_U).max(initial=0.0)))
        t = np.concatenate([np.ones(nd), np.full(nv, 1.0 / c)])
        H = t[:, None] * H * t[None, :]
        # the d translations of U, zero on the strain
        Qt = np.concatenate([_zm.rigid_modes(U, True).reshape(dim, nd).T, np.zeros((nv, dim))])
        P = np.eye(nd + nv) - Qt @ Qt.T
        w, V = np.linalg.eigh(P @ H @ P)
        # the d translations are exact zeros: drop the eigenpairs that overlap them most
        drop = np.argsort(-np.sum((Qt.T @ V) ** 2, axis=0))[:dim]
        keep = np.setdiff1d(np.arange(nd + nv), drop)
        soft = _verdict(w[keep], None)
        modes = np.concatenate([Qt, V[:, keep][:, soft]], axis=1).T  # (k, nd + nv)
        return c, (modes[:, :nd].reshape(-1, n, dim), modes[:, nd:])

    def _iterative(self, U, e, params, cell0, nb):
        """The same verdict without a dense Hessian (large systems).

        ``H = [[A, B], [Bᵀ, C]]`` (strain scaled to ``q = c e``) is positive semi-definite
        beyond its null space iff ``A = ∂²Ê/∂U²`` is (:func:`mdsens.md.zero_modes.stability`,
        dense or LOBPCG, which also finds rattlers) and the Schur complement
        ``S = C − Bᵀ A⁺ B`` (``V`` times the relaxed elastic tensor) is.
        """
        n, dim = U.shape
        nv = self.nv
        report = _zm.stability(self.E_hat, U, True, args=(e, params, cell0, nb))
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
                _zm.NearSingularWarning,
                stacklevel=5,
            )
        Y = np.asarray(Y)
        S = C - B.T @ Y
        mu, W = np.linalg.eigh(0.5 * (S + S.T))
        soft = _verdict(mu, lam_U)
        W = W[:, soft]
        # a flat strain direction w comes with its internal relaxation −A⁺B w
        bU = np.concatenate([basis_U, (-(Y @ W)).T.reshape(-1, n, dim)], axis=0)
        bq = np.concatenate([np.zeros((basis_U.shape[0], nv)), W.T], axis=0)
        return c, (bU, bq)


def _verdict(w, lam_scale) -> np.ndarray:
    """Saddle → :class:`SaddlePointError`; near-singular → warning; returns the soft mask.

    ``w``: eigenvalues beyond the translations; ``lam_scale``: a further curvature scale
    (the largest eigenvalue of the atoms' block) when ``w`` is not the whole spectrum.
    """
    lam_max = max(float(np.abs(w).max(initial=0.0)), lam_scale or 0.0, 1e-300)
    soft = np.abs(w) <= _zm.SOFT_MODE_RTOL * lam_max
    rest = w[~soft]
    if rest.size and rest.min() < -_zm.SADDLE_RTOL * lam_max:
        n_neg = int(np.sum(rest < -_zm.SADDLE_RTOL * lam_max))
        raise _zm.SaddlePointError(
            f"the cell-relaxed structure is a saddle point, not a minimum: the Hessian in "
            f"(positions, strain) has {n_neg} negative eigenvalue(s) beyond the translations, "
            f"the most negative {rest.min():.6g} (largest {lam_max:.6g}; strain scaled to the "
            "atoms' curvature). A derivative of a saddle is not what a relaxation follows. "
            "Fix: perturb the positions and the cell (break the symmetry) and relax again."
        )
    if rest.size and 0 <= rest.min() <= _zm.NEAR_SINGULAR_RTOL * lam_max:
        warnings.warn(
            "relax(relax_cell=True): the Hessian in (positions, strain) is nearly singular "
            f"beyond the declared zero modes: smallest eigenvalue {rest.min():.6g} "
            f"(λ_min/λ_max = {rest.min() / lam_max:.3g}). Derivatives are amplified by "
            "1/λ_min and are only as accurate as the relaxation; relax to a smaller fmax "
            "and stress_tol.",
            _zm.NearSingularWarning,
            stacklevel=6,
        )
    return soft


def _strain_to_voigt(eps, dim: int) -> np.ndarray:
    """Voigt vector (engineering shear, ``voigt_names`` order) of a symmetric ``(d, d)`` ε."""
    return np.array([eps[a, b] if a == b else eps[a, b] + eps[b, a] for a, b in _voigt_pairs(dim)])


def _strain_scale(C_e, lam_max_U) -> float:
    """``c`` with ``q = c e``: the strain block's mean curvature becomes ``λ_max`` of the
    atoms' block (conditioning only; the derivative does not depend on it)."""
    curv = float(np.mean(np.abs(np.diag(np.asarray(C_e)))))
    ratio = curv / lam_max_U if lam_max_U > 0 else float("nan")
    return float(np.sqrt(ratio)) if (np.isfinite(ratio) and ratio > 0) else 1.0


def _relax_cell(system: System, pot, params, *, fmax, max_steps, method, solve, check_stability,
                **options):
    """``relax(..., relax_cell=True)``: host relaxation, implicit derivatives (module doc)."""
    stress_tol = options.pop("stress_tol", None)
    progress = options.pop("progress", None)
    kit = _CellKit(pot, system, method, options)
    call = dict(fmax=fmax, max_steps=max_steps, stress_tol=stress_tol, progress=progress)
    if not _is_traced((params, system.positions, system.cell)):
        # Nothing to differentiate: the host relaxation as is.
        return kit.host_relax(system, params, **call)

    dim = system.dim
    # Filled by the primal (host) solve, which sees concrete values outside jit/vmap:
    # the strain scale c, the neighbor indices at the relaxed structure, the null-space
    # basis and the host result.
    state = {}

    def F(x, params, cell0):
        return kit.F(x, params, cell0, state["c"], state["neighbor"])

    def null_space(x, params, cell0):
        return state["basis"]

    linear = solve or functools.partial(linear_solve.cg, tol=DEFAULT_SOLVE_TOL)

    @custom_root(F, solve=linear, nullspace=null_space, symmetric=True, has_aux=True)
    def relaxed_state(init, params, cell0):
        if _is_traced((init, params, cell0)):
            raise NotImplementedError(
                "relax(..., relax_cell=True) cannot run under jax.jit or jax.vmap: the cell "
                "relaxation and its stability analysis run on the host. Call it outside "
                "jit/vmap (jax.grad, jax.jacfwd, jax.jacrev, jax.jvp and jax.vjp all work), "
                "e.g. loop over parameter sets in Python."
            )
        cell0 = np.asarray(cell0, np.float64)
        host = kit.host_relax(system.replace(positions=init, cell=jnp.asarray(cell0)), params, **call)
        # relax removed the rigid rotation: cell* = cell0 P with P symmetric positive.
        P = np.linalg.solve(cell0, np.asarray(host.system.cell))
        P = 0.5 * (P + P.T)
        e = jnp.asarray(_strain_to_voigt(P - np.eye(dim), dim))
        U = jnp.asarray(np.linalg.solve(P, np.asarray(host.system.positions).T).T)  # R* P⁻¹
        # The list the relaxation confirmed convergence with, built at (R*, cell*) with
        # these concrete parameters; None on the dense path.
        nb = _nb.indices_only(host.neighbor)
        c, (bU, bq) = kit.analyse(U, e, params, jnp.asarray(cell0), nb, check_stability)
        q = e * c
        state.update(c=jnp.asarray(c, jnp.float64), neighbor=nb, host=host,
                     basis=(jnp.asarray(bU), jnp.asarray(bq)))
        return (U, q), (jnp.asarray(host.steps), jnp.asarray(host.fmax))

    (U, q), _ = relaxed_state(system.positions, params, system.cell)
    R, cell, energy, forces, stress = kit.outputs(U, q, params, system.cell, state["c"], state["neighbor"])
    host = state["host"]
    return host._replace(system=host.system.replace(positions=R, cell=cell), energy=energy,
                         forces=forces, stress=stress)
