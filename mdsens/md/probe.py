"""The spectral probe: the stability verdict from one more CG run beside the solves.

A derivative of a relaxed structure solves ``H x = b`` for a few right-hand sides with
the (deflated) Hessian ``H``, and must know that ``H`` has no negative or undeclared
zero eigenvalue beyond its known modes. CG's step lengths are the Lanczos coefficients of
``H`` on the Krylov space of its right-hand side, so one more CG run, on a random vector,
gives ``λ_min`` and ``λ_max`` from its tridiagonal's Ritz values for about the price of
one more solve, instead of a separate eigen-solver. ``ms.sensitivity``,
``ms.observable_gradient`` and ``ms.elastic_constants`` use it above ``dense_max_dof``
with the default CG; the full analysis (:func:`mdsens.md.problem.null_basis`) remains the
fallback whenever the probe cannot decide. docs/design.md §5.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.implicit import linear_solve
from mdsens.md.problem import known_modes, null_basis, probed_null_basis
from mdsens.md.progress import Stages

__all__ = ["PROBE_SEED", "PROBE_STEPS", "PROBE_TOL_FACTOR", "probe_tolerance", "probed_solves", "probes_spectrum",
           "with_probe", "solved_with_stability"]

#: Seed of the random right-hand side whose CG solve probes the Hessian's spectrum.
PROBE_SEED = 20240702
#: CG iterations whose Lanczos coefficients the probe keeps (λ_min converges long before).
PROBE_STEPS = 1000
#: The probe's CG tolerance relative to the columns': its Ritz pairs converge a little
#: after the columns' solutions do (docs/design.md §5).
PROBE_TOL_FACTOR = 1e-3


def probed_solves(hessian: Callable, basis, rhs, z, tol: float, floors=None):
    """The solves ``(H + w Q Qᵀ) x = P b`` of the right-hand sides ``rhs (P, N, d)`` (``Q``
    the orthonormal basis of ``basis (k, N, d)``, ``P`` the projector off it;
    :func:`mdsens.root_jvp` deflates with ``w = 1``), then one more CG: a random
    right-hand side ``z (N, d)`` (host-drawn, projected ⊥ ``Q``), whose run is Lanczos
    from a random vector, so its tridiagonal (:func:`mdsens.linear_solve.cg_lanczos`)
    gives ``λ_min`` and ``λ_max`` of ``H`` beyond the known modes. ``hessian``: ``v ↦ H v``
    on ``(N, d)`` arrays; ``tol``: the solves' relative residual; ``floors (P,)``: their
    absolute residuals that suffice (``atol`` of :func:`mdsens.linear_solve.cg`). Jittable.

    Returns:
      ``(x (P, N, d) ⊥ Q, the solves' SolveInfo, (the probe's SolveInfo, its
      LanczosTridiagonal))``.
    """
    shape = z.shape
    Q, _ = jnp.linalg.qr(basis.reshape(basis.shape[0], -1).T)
    z = z.ravel() - Q @ (Q.T @ z.ravel())
    # Rounding feeds the probe's Krylov space a little of the deflated modes, whose Ritz
    # value is the deflation weight: the Rayleigh quotient of z lies inside the spectrum,
    # so that value can be neither λ_min nor λ_max.
    weight = jnp.vdot(z, hessian(z.reshape(shape)).ravel()) / jnp.vdot(z, z)

    def deflated(v):
        return hessian(v.reshape(shape)).ravel() + weight * (Q @ (Q.T @ v))

    B = rhs.reshape(rhs.shape[0], -1)
    B = B - (B @ Q) @ Q.T
    # The probe is its own loop, not a lane of the columns' batch: a batch runs every lane
    # until the slowest is done, and the probe's tighter tolerance keeps it going longer.
    floors = jnp.zeros(B.shape[0], B.dtype) if floors is None else floors
    x, columns = linear_solve.each_column(
        lambda b, floor: linear_solve.cg(deflated, b, tol=tol, maxiter=10 * z.size, atol=floor), B, floors)
    steps = min(PROBE_STEPS, 10 * z.size)
    _, probe_info, tridiagonal = linear_solve.cg_lanczos(deflated, z, steps=steps, tol=tol * PROBE_TOL_FACTOR,
                                                         maxiter=steps)  # never past its record
    x = x - (x @ Q) @ Q.T
    return x.reshape(rhs.shape), columns, (probe_info, tridiagonal)


def probe_tolerance(solve, tol: float) -> Optional[float]:
    """The probe's CG tolerance ``tol`` when the solves are the default CG (``solve`` is
    ``None``), else ``None``: a user's solver builds no Lanczos tridiagonal to read."""
    return float(tol) if solve is None else None


def probes_spectrum(stability, probe_tol: Optional[float], system) -> bool:
    """Whether the stability analysis rides on the solves rather than running its own:
    the default CG (``probe_tol`` its tolerance, ``None`` for a user's solver) and the
    ``"auto"``/``"lanczos"`` method above ``dense_max_dof`` (below it the dense analysis
    is cheaper). ``stability``: :class:`~mdsens.md.options.StabilityOptions` or ``None``."""
    if stability is None or probe_tol is None or stability.method not in ("auto", "lanczos"):
        return False
    return stability.method == "lanczos" or system.n_atoms * system.dim > stability.dense_max_dof


def with_probe(prob, stability, fmax_now: float, run_probed: Callable):
    """``(outputs, (basis, n_soft, λ_min, λ_max))`` with the verdict of the solves' own
    probe, or ``None`` when it cannot decide (then run :func:`mdsens.md.problem.null_basis`).

    The known modes (rigid, rattlers) come first; ``run_probed(basis, z)`` runs the solves
    deflated by them with the probe ``z`` and returns ``(outputs, the solves' breakdown
    flags, (probe SolveInfo, tridiagonal))``. A breakdown (negative curvature) anywhere, a
    soft Ritz pair or an undecided ``λ_min`` means ``None``; a saddle is then refused by
    the full analysis, with its message.
    """
    known = known_modes(prob, stability)
    z = np.random.default_rng(PROBE_SEED).standard_normal(prob.system.positions.shape)
    out, breakdown, (probe_info, tridiagonal) = run_probed(known.basis, z)  # host arrays: jit moves them
    broke = bool(np.any(np.asarray(breakdown))) or bool(np.asarray(probe_info.breakdown))
    found = None if broke else probed_null_basis(known, tridiagonal, stability, fmax_now)
    return None if found is None else (out, found)


def solved_with_stability(prob, stability, probe_tol: Optional[float], fmax_now: float, run_probed: Callable,
                          run_plain: Callable, stages: Optional[Stages] = None):
    """``(outputs, (basis, n_soft, λ_min, λ_max), check)``: the solves of a derivative
    with the stability verdict, the way every derivative routine takes it.

    When :func:`probes_spectrum`, the solves run beside the probe (``run_probed``, as
    :func:`with_probe` takes it) and ``check`` is ``"probe"``; when the probe cannot
    decide, or is not used, the full analysis (:func:`mdsens.md.problem.null_basis`)
    comes first and ``run_plain(basis)`` gives the outputs (``check``
    ``"eigen-analysis"``, or ``"none"`` without a stability analysis). ``stages``: the
    call's progress bar (:class:`mdsens.md.progress.Stages`), if any.
    """
    stages = Stages(False, "", 0) if stages is None else stages
    if probes_spectrum(stability, probe_tol, prob.system):
        stages.start("rigid modes and isolated dofs")
        probed = with_probe(prob, stability, fmax_now, run_probed)
        if probed is not None:
            return (*probed, "probe")
    stages.start("stability analysis" if stability is not None else "rigid modes")
    found = null_basis(prob, stability, fmax_now)
    return run_plain(found[0]), found, "none" if stability is None else "eigen-analysis"
