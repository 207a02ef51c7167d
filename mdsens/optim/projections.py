"""Euclidean (and KL) projections onto convex sets, with JAXopt's names and signatures.

``projection_C(x, hyperparams) = argmin_{p ∈ C} ½‖p − x‖²``. All are jittable, vmappable
and differentiable in forward and reverse mode. Closed forms are differentiated by
autodiff; sort-based ones carry their a.e. Jacobian as a ``custom_jvp`` (the simplex:
``diag(s) − s sᵀ/|s|`` on the support ``s``); the iterative KL projections onto
transport polytopes (Sinkhorn) are differentiated through their own optimality
condition with :func:`mdsens.custom_root`, never by unrolling the iterations.

Hyperparameters follow JAXopt: ``projection_box(x, (lower, upper))``,
``projection_l1_ball(x, max_value)``, ``projection_hyperplane(x, (a, b))``,
``projection_box_section(x, (alpha, beta, w, c))``, ``projection_polyhedron(x, (A, b, G, h))``,
``projection_transport(sim_matrix, (a, b))``. The iterative ones (Euclidean and KL
transport, polyhedron) are differentiated implicitly: through the marginal condition of
their dual, or the conic residual map of their QP. Simplex-type projections act on
the last axis (each row of a matrix is projected). Invalid hyperparameters with concrete
values (a negative radius, ``lower > upper``, mismatched shapes) raise
:class:`~mdsens.OptionError`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import logsumexp

from mdsens import errors
from mdsens.implicit import custom_root, linear_solve
from mdsens.optim import validation
from mdsens.optim.tree_util import tree_add_scalar_mul, tree_l2_norm, tree_scalar_mul, tree_vdot

__all__ = [
    "kl_mirror_step",
    "projection_non_negative",
    "projection_box",
    "projection_hypercube",
    "projection_simplex",
    "projection_l1_sphere",
    "projection_l1_ball",
    "projection_l2_sphere",
    "projection_l2_ball",
    "projection_linf_ball",
    "projection_hyperplane",
    "projection_halfspace",
    "projection_affine_set",
    "projection_box_section",
    "projection_polyhedron",
    "projection_second_order_cone",
    "projection_transport",
    "projection_birkhoff",
    "kl_projection_simplex",
    "kl_projection_transport",
    "kl_projection_birkhoff",
]

tree_map = jax.tree_util.tree_map


# ------------------------------------------------------------------------- orthant, box
def projection_non_negative(x, hyperparams=None):
    """Projection onto the non-negative orthant, ``max(x, 0)`` leaf by leaf.

    Args:
      x: pytree to project.
      hyperparams: ignored (JAXopt's signature).
    """
    del hyperparams
    return tree_map(jax.nn.relu, x)


def _like_x(value, x):
    """``value`` as a pytree of ``x``'s structure (a scalar or array is used for every leaf)."""
    x_def = jax.tree_util.tree_structure(x)
    if jax.tree_util.tree_structure(value) == x_def:
        return value
    return jax.tree_util.tree_unflatten(x_def, [value] * x_def.num_leaves)


def projection_box(x, hyperparams):
    """Projection onto the box ``{p : lower ≤ p ≤ upper}``, i.e. ``clip(x, lower, upper)``.

    Args:
      x: pytree to project.
      hyperparams: ``(lower, upper)``: scalars, arrays broadcastable to the leaves of
        ``x``, or pytrees shaped like ``x``. ``lower ≤ upper`` is required.
    """
    lower, upper = hyperparams
    lower, upper = _like_x(lower, x), _like_x(upper, x)

    def clip(leaf, lo, hi):
        validation.check_broadcastable(lo, jnp.shape(leaf), "lower")
        validation.check_broadcastable(hi, jnp.shape(leaf), "upper")
        validation.check_nonnegative(jnp.asarray(hi) - jnp.asarray(lo), "upper - lower",
                                     " (an empty box has no projection)")
        return jnp.clip(leaf, lo, hi)

    return tree_map(clip, x, lower, upper)


def projection_hypercube(x, unit=1.0):
    """Projection onto the hypercube ``[0, unit]ⁿ`` (``projection_box(x, (0, unit))``)."""
    validation.check_nonnegative(unit, "unit")
    return projection_box(x, (0.0, unit))


def projection_linf_ball(x, max_value=1.0):
    """Projection onto the l∞ ball ``{p : ‖p‖∞ ≤ max_value}`` (a box, ``clip``)."""
    validation.check_nonnegative(max_value, "max_value", " (the radius of the l-infinity ball)")
    return projection_box(x, (-max_value, max_value))


# ----------------------------------------------------------------------- simplex and l1
@jax.custom_jvp
def _simplex(x, value):
    """Sort-based projection of each row of ``x`` onto ``{p ≥ 0, Σ p = value}``."""
    n = x.shape[-1]
    u = jnp.flip(jnp.sort(x, axis=-1), axis=-1)
    shifted = jnp.cumsum(u, axis=-1) - value[..., None]
    k = jnp.arange(1, n + 1, dtype=x.dtype)
    support = jnp.sum(u - shifted / k > 0, axis=-1, keepdims=True)
    support = jnp.maximum(support, 1)  # value = 0 keeps one entry at zero
    threshold = jnp.take_along_axis(shifted, support - 1, axis=-1) / support.astype(x.dtype)
    return jnp.maximum(x - threshold, 0.0)


@_simplex.defjvp
def _simplex_jvp(primals, tangents):
    # On the support s, p = x − τ with τ = (Σ_s x − value)/|s|; off it p = 0.
    x, value = primals
    dx, dvalue = tangents
    p = _simplex(x, value)
    s = (p > 0).astype(x.dtype)
    card = jnp.maximum(jnp.sum(s, axis=-1, keepdims=True), 1.0)
    dthreshold = (jnp.sum(s * dx, axis=-1, keepdims=True) - dvalue[..., None]) / card
    return p, s * (dx - dthreshold)


def projection_simplex(x, value=1.0):
    """Projection onto the simplex ``{p ≥ 0, Σᵢ pᵢ = value}`` along the last axis.

    Sort-based, O(n log n) (Held, Wolfe & Crowder 1974; Condat 2016). Its Jacobian,
    ``diag(s) − s sᵀ/|s|`` on the support ``s``, is a ``custom_jvp``.

    Args:
      x: array of shape ``(..., n)``; each row is projected.
      value: the sum, ``≥ 0`` (scalar or shape ``x.shape[:-1]``; default 1: the
        probability simplex).
    """
    x = jnp.asarray(x)
    validation.check_ndim(x, range(1, 33), "x", "an array with at least one axis")
    value = 1.0 if value is None else value
    validation.check_nonnegative(value, "value", " (the sum of the simplex)")
    value = jnp.broadcast_to(jnp.asarray(value, x.dtype), x.shape[:-1])
    return _simplex(x, value)


def projection_l1_sphere(x, value=1.0):
    """Projection onto the l1 sphere ``{p : ‖p‖₁ = value}`` along the last axis."""
    validation.check_nonnegative(value, "value", " (the radius of the l1 sphere)")
    x = jnp.asarray(x)
    return jnp.sign(x) * projection_simplex(jnp.abs(x), value)


def projection_l1_ball(x, max_value=1.0):
    """Projection onto the l1 ball ``{p : ‖p‖₁ ≤ max_value}`` along the last axis.

    Inside the ball ``x`` itself; outside, soft-thresholding ``sign(x) max(|x| − τ, 0)``
    with ``τ`` from the simplex projection of ``|x|`` (Duchi et al. 2008).
    """
    validation.check_nonnegative(max_value, "max_value", " (the radius of the l1 ball)")
    x = jnp.asarray(x)
    inside = jnp.sum(jnp.abs(x), axis=-1, keepdims=True) <= jnp.asarray(max_value)[..., None]
    return jnp.where(inside, x, projection_l1_sphere(x, max_value))


# --------------------------------------------------------------------------- l2 balls
def _safe_norm(x):
    """``‖x‖₂`` with a finite (zero) derivative at ``x = 0``."""
    sq = tree_l2_norm(x, squared=True)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def projection_l2_sphere(x, value=1.0):
    """Projection onto the l2 sphere ``{p : ‖p‖₂ = value}`` (``x`` a pytree, ``x ≠ 0``)."""
    validation.check_nonnegative(value, "value", " (the radius of the l2 sphere)")
    norm = _safe_norm(x)
    return tree_scalar_mul(value / jnp.where(norm > 0, norm, 1.0), x)


def projection_l2_ball(x, max_value=1.0):
    """Projection onto the l2 ball ``{p : ‖p‖₂ ≤ max_value}``: ``x min(1, r/‖x‖)``."""
    validation.check_nonnegative(max_value, "max_value", " (the radius of the l2 ball)")
    norm = _safe_norm(x)
    outside = norm > max_value
    factor = jnp.where(outside, max_value / jnp.where(outside, norm, 1.0), 1.0)
    return tree_scalar_mul(factor, x)


# ------------------------------------------------------------------- affine sets
def _check_normal(a):
    validation.check_nonzero(a, "a", " (the normal of a hyperplane or halfspace)")


def projection_hyperplane(x, hyperparams):
    """Projection onto the hyperplane ``{p : ⟨a, p⟩ = b}``: ``x − (⟨a, x⟩ − b)/‖a‖² a``.

    Args:
      x: pytree to project.
      hyperparams: ``(a, b)``, ``a`` shaped like ``x`` (non-zero), ``b`` a scalar.
    """
    a, b = hyperparams
    _check_shapes_like(a, x, "a")
    _check_normal(a)
    scale = (tree_vdot(a, x) - b) / tree_vdot(a, a)
    return tree_add_scalar_mul(x, -scale, a)


def projection_halfspace(x, hyperparams):
    """Projection onto the halfspace ``{p : ⟨a, p⟩ ≤ b}``: ``x − max(⟨a, x⟩ − b, 0)/‖a‖² a``."""
    a, b = hyperparams
    _check_shapes_like(a, x, "a")
    _check_normal(a)
    scale = jax.nn.relu(tree_vdot(a, x) - b) / tree_vdot(a, a)
    return tree_add_scalar_mul(x, -scale, a)


def _check_shapes_like(a, x, name):
    shapes_a = [jnp.shape(l) for l in jax.tree_util.tree_leaves(a)]
    shapes_x = [jnp.shape(l) for l in jax.tree_util.tree_leaves(x)]
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(x) or shapes_a != shapes_x:
        raise errors.OptionError(f"{name} must have the structure and shapes of x: got {shapes_a}, x has "
                                 f"{shapes_x}.")


def projection_affine_set(x, hyperparams):
    """Projection onto ``{p : A p = b}``: ``x − Aᵀ (A Aᵀ)⁻¹ (A x − b)``.

    Args:
      x: vector of shape ``(n,)``.
      hyperparams: ``(A, b)`` with ``A`` of shape ``(m, n)`` and full row rank, ``b``
        of shape ``(m,)``.
    """
    A, b = hyperparams
    x, A, b = jnp.asarray(x), jnp.asarray(A), jnp.asarray(b)
    validation.check_ndim(x, 1, "x", "a vector")
    if A.ndim != 2 or A.shape[1] != x.shape[0] or b.shape != (A.shape[0],):
        raise errors.OptionError(
            f"projection_affine_set needs A of shape (m, {x.shape[0]}) and b of shape (m,); got A "
            f"{A.shape} and b {b.shape}."
        )
    return x - A.T @ jnp.linalg.solve(A @ A.T, A @ x - b)


def _box_section_bracket(x, alpha, beta, w):
    """``[lo, hi]`` containing every breakpoint of ``φ(τ) = ⟨w, clip(x + τw, α, β)⟩ − c``."""
    moving = w != 0
    safe_w = jnp.where(moving, w, 1.0)
    t_alpha, t_beta = (alpha - x) / safe_w, (beta - x) / safe_w
    lo = jnp.min(jnp.where(moving, jnp.minimum(t_alpha, t_beta), jnp.inf))
    hi = jnp.max(jnp.where(moving, jnp.maximum(t_alpha, t_beta), -jnp.inf))
    return jnp.where(jnp.isfinite(lo), lo, 0.0), jnp.where(jnp.isfinite(hi), hi, 0.0)


@jax.jit
def _box_section_piece(x, alpha, beta, w, c):
    """The linear piece of the non-decreasing ``φ`` holding its root, by bisection.

    Returns the masks of free and upper-clipped coordinates there, and the midpoint
    (the root itself when no coordinate is free). No derivative flows through this.
    """

    def bisect(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        below = jnp.vdot(w, jnp.clip(x + mid * w, alpha, beta)) - c < 0
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    # 110 halvings take any float64 bracket below the spacing of its numbers.
    lo, hi = lax.fori_loop(0, 110, bisect, _box_section_bracket(x, alpha, beta, w))
    tau0 = 0.5 * (lo + hi)
    y0 = x + tau0 * w
    return (y0 > alpha) & (y0 < beta), y0 >= beta, tau0


def projection_box_section(x, hyperparams, check_feasible: bool = False):
    """Projection onto ``{p : α ≤ p ≤ β, ⟨w, p⟩ = c}`` (e.g. the dual of an SVM with bias).

    The solution is ``p = clip(x + τ w, α, β)`` with ``τ`` the root of the non-decreasing,
    piecewise-linear ``φ(τ) = ⟨w, clip(x + τ w, α, β)⟩ − c``. Bisection (no derivative)
    identifies the linear piece; ``τ`` is then the closed-form root on that piece, so
    autodiff gives the exact Jacobian (that of the implicit function ``φ(τ, θ) = 0``).

    Args:
      x: vector of shape ``(n,)``.
      hyperparams: ``(alpha, beta, w, c)``: ``alpha``, ``beta``, ``w`` broadcastable to
        ``x`` (``alpha ≤ beta``, ``w`` not all zero), ``c`` a scalar.
      check_feasible: raise :class:`~mdsens.OptionError` if ``⟨w, p⟩ = c`` cannot be met
        in the box (concrete values only; inside ``jit`` an infeasible problem returns
        the box point closest to feasibility).
    """
    alpha, beta, w, c = hyperparams
    x = jnp.asarray(x)
    validation.check_ndim(x, 1, "x", "a vector")
    for name, value in (("alpha", alpha), ("beta", beta), ("w", w)):
        validation.check_broadcastable(value, x.shape, name)
    alpha, beta, w = (jnp.broadcast_to(jnp.asarray(v, x.dtype), x.shape) for v in (alpha, beta, w))
    c = jnp.asarray(c, x.dtype)
    validation.check_nonnegative(beta - alpha, "beta - alpha", " (an empty box has no projection)")
    validation.check_nonzero(w, "w")

    if check_feasible and validation.is_concrete(x, alpha, beta, w, c):
        lo, hi = _box_section_bracket(x, alpha, beta, w)
        phi = lambda tau: float(jnp.vdot(w, jnp.clip(x + tau * w, alpha, beta)) - c)  # noqa: E731
        if phi(lo) > 0 or phi(hi) < 0:
            raise errors.OptionError(
                "projection_box_section: no p with alpha <= p <= beta has <w, p> = c; widen the box "
                "or change c."
            )
    free, at_upper, tau0 = _box_section_piece(*lax.stop_gradient((x, alpha, beta, w, c)))
    clipped = jnp.where(at_upper, beta, alpha)
    # Closed-form root of φ on the identified piece: differentiable in every input.
    denominator = jnp.sum(jnp.where(free, w * w, 0.0))
    numerator = c - jnp.sum(jnp.where(free, w * x, w * clipped))
    solvable = denominator > 0
    tau = jnp.where(solvable, numerator / jnp.where(solvable, denominator, 1.0), tau0)
    return jnp.where(free, x + tau * w, clipped)


# -------------------------------------------------------------------------- polyhedra
@functools.lru_cache(maxsize=None)
def _polyhedron_solver():
    # Imported here: the solvers import the conditions, which import this module.
    from mdsens.optim.solvers.conic import ConicQP

    return ConicQP(tol=1e-12)


def projection_polyhedron(x, hyperparams, check_feasible: bool = True):
    """Projection onto the polyhedron ``{p : A p = b, G p ≤ h}``, a QP.

    ``argmin_p ½‖p − x‖²`` s.t. ``A p = b``, ``G p ≤ h``, solved by
    :class:`~mdsens.optim.ConicQP` (``Q = I``, ``c = −x``) and differentiated through its
    conic residual map (implicitly, GMRES) w.r.t. ``x, A, b, G, h``, in both modes. The
    Jacobian exists where the active constraints are linearly independent and strictly
    complementary (generic).

    Args:
      x: vector of shape ``(n,)``.
      hyperparams: ``(A, b, G, h)``: ``A (p, n)``, ``b (p,)``, ``G (q, n)``, ``h (q,)``;
        a pair may be ``(None, None)`` (no equalities, or no inequalities).
      check_feasible: raise :class:`~mdsens.optim.InfeasibleProblemError` when the
        solver finds a certificate that the polyhedron is empty (a ``y`` with
        ``[A; G]ᵀy = 0``, ``y_G ≥ 0``, ``bᵀy_A + hᵀy_G < 0``). Concrete values only:
        inside ``jit`` an empty polyhedron returns the solver's last iterate.
    """
    A, b, G, h = hyperparams
    x = jnp.asarray(x)
    validation.check_ndim(x, 1, "x", "a vector")
    params_eq = None if A is None and b is None else (A, b)
    params_ineq = None if G is None and h is None else (G, h)
    if params_eq is None and params_ineq is None:
        return x
    solver = _polyhedron_solver()
    step = solver.solve_unchecked(None, (jnp.eye(x.shape[0], dtype=x.dtype), -x), params_eq, params_ineq)
    if check_feasible:
        from mdsens.optim.solvers.conic import report_status

        report_status(step.state, "raise", "projection_polyhedron: the polyhedron {p : Ap = b, Gp <= h}")
    return step.params.primal


# ------------------------------------------------------------------------ cones
def projection_second_order_cone(x):
    """Projection onto the second-order cone ``{(t, v) : ‖v‖₂ ≤ t}``, ``t = x[..., 0]``.

    Closed form: ``x`` inside, ``0`` in the polar cone, else
    ``½ (1 + t/‖v‖) (‖v‖, v)``.
    """
    x = jnp.asarray(x)
    validation.check_ndim(x, range(1, 33), "x", "an array with at least one axis")
    t, v = x[..., :1], x[..., 1:]
    sq = jnp.sum(v * v, axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    safe = jnp.where(positive, norm, 1.0)
    scale = 0.5 * (1.0 + t / safe)
    boundary = jnp.concatenate([scale * norm, scale * v], axis=-1)
    return jnp.where(norm <= t, x, jnp.where(norm <= -t, jnp.zeros_like(x), boundary))


# ---------------------------------------------------------------------- KL geometry
def kl_projection_simplex(x, value=1.0):
    """KL (Bregman) projection of ``exp(x)`` onto the simplex: ``value · softmax(x)``.

    ``argmin_{p ∈ Δ} KL(p, exp(x))``, the projection of mirror descent with the entropy
    mirror map ``∇φ(p) = log p`` (see :func:`mdsens.optim.mirror_descent`). Last axis.
    """
    validation.check_nonnegative(value, "value")
    x = jnp.asarray(x)
    return jnp.expand_dims(jnp.asarray(value, x.dtype), -1) * jax.nn.softmax(x, axis=-1)


def kl_mirror_step(x, grad, stepsize, value=1.0):
    """One entropic mirror-descent step on the simplex: ``value · x ⊙ e^{−η g} / ⟨x, e^{−η g}⟩``.

    The same map as ``kl_projection_simplex(log x − η g, value)`` (last axis), written as a
    product: an entry that reached exactly 0 (underflow, routine on sparse solutions)
    keeps a finite Jacobian, where ``log 0`` makes the implicit derivative NaN. ``x``
    must have a positive entry in every row.
    """
    x = jnp.asarray(x)
    scaled = -stepsize * jnp.asarray(grad)
    # the largest exponent on the support: the weights cannot all underflow
    shift = jnp.max(jnp.where(x > 0, scaled, -jnp.inf), axis=-1, keepdims=True)
    shift = lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0.0))
    weights = x * jnp.exp(scaled - shift)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return jnp.expand_dims(jnp.asarray(value, x.dtype), -1) * weights / total


class SinkhornPotentials(NamedTuple):
    """Dual potentials ``(f, g)`` of a transport projection: ``P = exp(S + f ⊕ g)`` (KL) or
    ``P = relu(S + f ⊕ g)`` (Euclidean)."""

    f: jnp.ndarray
    g: jnp.ndarray


def _plan(potentials, sim_matrix):
    return jnp.exp(sim_matrix + potentials.f[:, None] + potentials.g[None, :])


def _marginal_residual(potentials, sim_matrix, a, b):
    """``∇`` of the convex dual ``Σ exp(S + f ⊕ g) − ⟨a, f⟩ − ⟨b, g⟩``: ``(P1 − a, Pᵀ1 − b)``.

    Its Jacobian ``[[diag(P1), P], [Pᵀ, diag(Pᵀ1)]]`` is symmetric positive semi-definite
    with the gauge ``(1, −1)`` (``f + t``, ``g − t`` give the same ``P``) as null space.
    """
    P = _plan(potentials, sim_matrix)
    return SinkhornPotentials(P.sum(axis=1) - a, P.sum(axis=0) - b)


def _gauge(potentials, sim_matrix, a, b):
    del sim_matrix, a, b
    return SinkhornPotentials(jnp.ones((1,) + potentials.f.shape, potentials.f.dtype),
                              -jnp.ones((1,) + potentials.g.shape, potentials.g.dtype))


@functools.partial(jax.jit, static_argnames=("maxiter", "tol"))
def _sinkhorn_sweeps(init, sim_matrix, a, b, *, maxiter, tol):
    """Log-domain Sinkhorn sweeps until ``‖P1 − a‖₁ ≤ tol Σa`` (columns are exact)."""
    log_a, log_b = jnp.log(a), jnp.log(b)

    def g_update(f):
        return log_b - logsumexp(sim_matrix + f[:, None], axis=0)

    def cond(state):
        f, g, k = state
        row_error = jnp.sum(jnp.abs(_plan(SinkhornPotentials(f, g), sim_matrix).sum(axis=1) - a))
        return (row_error > tol * jnp.sum(a)) & (k < maxiter)

    def body(state):
        f, g, k = state
        f = log_a - logsumexp(sim_matrix + g[None, :], axis=1)
        return f, g_update(f), k + 1

    f, g, _ = lax.while_loop(cond, body, (init.f, g_update(init.f), 0))
    return SinkhornPotentials(f, g)


@functools.lru_cache(maxsize=None)
def _sinkhorn(maxiter, tol):
    """The Sinkhorn solver for the potentials, made differentiable by ``custom_root``."""
    solver = functools.partial(_sinkhorn_sweeps, maxiter=maxiter, tol=tol)
    return custom_root(_marginal_residual, solve=functools.partial(linear_solve.cg, tol=1e-12),
                       symmetric=True, nullspace=_gauge)(solver)


def kl_projection_transport(sim_matrix, marginals, maxiter: int = 5000, tol: float = 1e-12):
    """KL projection onto the transport polytope (entropic optimal transport).

    ``argmin_{P > 0} KL(P, exp(S))`` subject to ``P 1 = a``, ``Pᵀ 1 = b``; equivalently
    ``argmin ⟨P, C⟩ + ⟨P, log P − 1⟩`` with cost ``C = −S``. Log-domain Sinkhorn
    iterations find the potentials, ``P = exp(S + f ⊕ g)``; the derivative comes from the
    implicit function theorem on the marginal residual ``(P1 − a, Pᵀ1 − b) = 0``, solved
    by CG with the gauge ``(f + t, g − t)`` declared as null space. Forward and reverse.

    Args:
      sim_matrix: similarity ``S``, shape ``(m, n)``.
      marginals: ``(a, b)``, positive, shapes ``(m,)`` and ``(n,)``, ``Σa = Σb``.
      maxiter: Sinkhorn sweeps at most.
      tol: stop when ``‖P1 − a‖₁ ≤ tol · Σa`` (column sums are exact after each sweep).

    Returns:
      The plan ``P``, shape ``(m, n)``.
    """
    S = jnp.asarray(sim_matrix)
    a, b = _check_transport(S, marginals, "kl_projection_transport")
    maxiter = validation.check_positive_int(maxiter, "maxiter")
    tol = validation.check_tolerance(tol)
    init = SinkhornPotentials(jnp.zeros_like(a), jnp.zeros_like(b))
    potentials = _sinkhorn(maxiter, tol)(init, S, a, b)
    return _plan(potentials, S)


def kl_projection_birkhoff(sim_matrix, maxiter: int = 5000, tol: float = 1e-12):
    """KL projection onto the Birkhoff polytope (doubly stochastic matrices): Sinkhorn.

    :func:`kl_projection_transport` with unit marginals; ``sim_matrix`` is ``(n, n)``.
    """
    return kl_projection_transport(sim_matrix, _unit_marginals(sim_matrix, "kl_projection_birkhoff"),
                                   maxiter=maxiter, tol=tol)


def _unit_marginals(sim_matrix, name):
    """The Birkhoff polytope's marginals ``(1, 1)`` for a square ``sim_matrix``."""
    S = jnp.asarray(sim_matrix)
    validation.check_ndim(S, 2, "sim_matrix", "a square matrix")
    if S.shape[0] != S.shape[1]:
        raise errors.OptionError(f"{name} needs a square sim_matrix; got shape {S.shape}.")
    ones = jnp.ones(S.shape[0], S.dtype)
    return ones, ones


# ------------------------------------------------------------ Euclidean transport
def _l2_plan(potentials, sim_matrix):
    return jax.nn.relu(sim_matrix + potentials.f[:, None] + potentials.g[None, :])


def _l2_marginal_residual(potentials, sim_matrix, a, b):
    """``∇`` of the convex dual ``½‖relu(S + f ⊕ g)‖² − ⟨a, f⟩ − ⟨b, g⟩``: ``(P1 − a, Pᵀ1 − b)``.

    Its Jacobian ``[[diag(M1), M], [Mᵀ, diag(Mᵀ1)]]`` (``M`` the support of ``P``) is
    symmetric positive semi-definite with the gauge ``(1, −1)`` as null space (one per
    connected component of the support; generically one).
    """
    P = _l2_plan(potentials, sim_matrix)
    return SinkhornPotentials(P.sum(axis=1) - a, P.sum(axis=0) - b)


@functools.partial(jax.jit, static_argnames=("maxiter", "tol"))
def _transport_newton(init, sim_matrix, a, b, *, maxiter, tol):
    """Semismooth Newton on the dual of the Euclidean transport projection.

    The dual ``D(f, g) = ½‖relu(S + f ⊕ g)‖² − ⟨a, f⟩ − ⟨b, g⟩`` is convex and piecewise
    quadratic: with the generalized Hessian of the current support, Newton's step is
    exact once the support is right (a few steps). The gauge is fixed by adding
    ``uuᵀ`` (``u ∝ (1, −1)``), and a ridge ``min(‖∇D‖, 1) I`` (Levenberg–Marquardt: it
    vanishes at the solution, so convergence stays quadratic) covers rows or columns
    that momentarily have no support. A step is accepted on Armijo's decrease of ``D``
    or a decrease of ``‖∇D‖``: near the solution ``D`` changes below its round-off.
    """
    m, n = sim_matrix.shape
    dtype = sim_matrix.dtype
    u = jnp.concatenate([jnp.ones(m, dtype), -jnp.ones(n, dtype)]) / jnp.sqrt(jnp.asarray(m + n, dtype))

    def split(z):
        return SinkhornPotentials(z[:m], z[m:])

    def grad(z):
        return jnp.concatenate(_l2_marginal_residual(split(z), sim_matrix, a, b))

    def value(z):
        P = _l2_plan(split(z), sim_matrix)
        return 0.5 * jnp.sum(P * P) - a @ z[:m] - b @ z[m:]

    def running(state):
        _, k, error = state
        return (error > tol * jnp.sum(a)) & (k < maxiter)

    def step(state):
        z, k, _ = state
        support = (sim_matrix + z[:m, None] + z[None, m:] > 0).astype(dtype)
        gradient = grad(z)
        hessian = jnp.block([[jnp.diag(support.sum(axis=1)), support], [support.T, jnp.diag(support.sum(axis=0))]])
        norm = jnp.linalg.norm(gradient)
        ridge = jnp.minimum(norm, 1.0) * jnp.eye(m + n, dtype=dtype)
        direction = jnp.linalg.solve(hessian + jnp.outer(u, u) + ridge, -gradient)
        value0, slope = value(z), gradient @ direction

        def rejected(t):
            trial = z + t * direction
            return ((value(trial) > value0 + 1e-4 * t * slope)
                    & (jnp.linalg.norm(grad(trial)) > (1.0 - 1e-4 * t) * norm) & (t > 1e-12))

        t = lax.while_loop(rejected, lambda t: 0.5 * t, jnp.asarray(1.0, dtype))
        z = z + t * direction
        return z, k + 1, jnp.sum(jnp.abs(grad(z)))

    z0 = jnp.concatenate([init.f, init.g])
    z, _, _ = lax.while_loop(running, step, (z0, 0, jnp.asarray(jnp.inf, dtype)))
    return split(z)


@functools.lru_cache(maxsize=None)
def _transport_solver(maxiter, tol):
    """The dual Newton solver, made differentiable by ``custom_root`` on its marginal condition."""
    solver = functools.partial(_transport_newton, maxiter=maxiter, tol=tol)
    return custom_root(_l2_marginal_residual, solve=functools.partial(linear_solve.cg, tol=1e-12),
                       symmetric=True, nullspace=_gauge)(solver)


def _check_transport(S, marginals, name):
    a, b = (jnp.asarray(m, S.dtype) for m in marginals)
    validation.check_ndim(S, 2, "sim_matrix", "a matrix")
    if a.shape != (S.shape[0],) or b.shape != (S.shape[1],):
        raise errors.OptionError(
            f"{name}: marginals must be (a, b) with shapes ({S.shape[0]},) and ({S.shape[1]},) for a sim_matrix "
            f"of shape {S.shape}; got {a.shape} and {b.shape}."
        )
    validation.check_positive(a, "marginals[0]")
    validation.check_positive(b, "marginals[1]")
    if validation.is_concrete(a, b) and abs(float(a.sum() - b.sum())) > 1e-9 * float(a.sum()):
        raise errors.OptionError(
            f"{name}: the marginals must have the same total mass (Σa = {float(a.sum()):g}, Σb = "
            f"{float(b.sum()):g}); no transport plan exists otherwise. Rescale one of them."
        )
    return a, b


def projection_transport(sim_matrix, marginals, maxiter: int = 100, tol: float = 1e-12):
    """Euclidean projection onto the transport polytope (quadratically regularized OT).

    ``argmin_{P ≥ 0} ½‖P − S‖²`` subject to ``P 1 = a``, ``Pᵀ 1 = b``; equivalently
    ``argmin ⟨P, C⟩ + ½‖P‖²`` with cost ``C = −S`` (Blondel, Seguy & Rolet, AISTATS 2018).
    The dual potentials ``(f, g)`` minimize ``½‖relu(S + f ⊕ g)‖² − ⟨a, f⟩ − ⟨b, g⟩``,
    found by semismooth Newton, and ``P = relu(S + f ⊕ g)`` (sparse). The derivative
    comes from the implicit function theorem on the dual's optimality condition
    ``(P1 − a, Pᵀ1 − b) = 0``, solved by CG with the gauge ``(f + t, g − t)`` declared as
    null space; forward and reverse mode, never unrolled.

    Args:
      sim_matrix: similarity ``S``, shape ``(m, n)``.
      marginals: ``(a, b)``, positive, shapes ``(m,)`` and ``(n,)``, ``Σa = Σb``.
      maxiter: Newton steps at most (a few suffice: the dual is piecewise quadratic).
      tol: stop when ``‖P1 − a‖₁ + ‖Pᵀ1 − b‖₁ ≤ tol · Σa``.

    Returns:
      The plan ``P``, shape ``(m, n)``.
    """
    S = jnp.asarray(sim_matrix)
    a, b = _check_transport(S, marginals, "projection_transport")
    maxiter = validation.check_positive_int(maxiter, "maxiter")
    tol = validation.check_tolerance(tol)
    # Start from the rows projected on their simplices (g = 0): f_i = −τ_i, the
    # threshold of row i, the minimum of P0 − S over the row.
    f0 = jnp.min(projection_simplex(S, a) - S, axis=1)
    init = SinkhornPotentials(lax.stop_gradient(f0), jnp.zeros_like(b))
    potentials = _transport_solver(maxiter, tol)(init, S, a, b)
    return _l2_plan(potentials, S)


def projection_birkhoff(sim_matrix, maxiter: int = 100, tol: float = 1e-12):
    """Euclidean projection onto the Birkhoff polytope (doubly stochastic matrices).

    :func:`projection_transport` with unit marginals; ``sim_matrix`` is ``(n, n)``.
    """
    return projection_transport(sim_matrix, _unit_marginals(sim_matrix, "projection_birkhoff"),
                                maxiter=maxiter, tol=tol)
