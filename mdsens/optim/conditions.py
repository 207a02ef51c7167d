"""Optimality conditions: the catalog of paper §2.3 (Blondel et al., NeurIPS 2022).

Each factory returns a function ready for :func:`mdsens.custom_root` (a root map
``F(x, θ) = 0``) or :func:`mdsens.custom_fixed_point` (a fixed-point map
``T(x, θ) = x``) and states the paper's formula. ``θ`` is passed as the solver's
positional arguments, in JAXopt's order: for a composite problem the hyperparameters of
the non-smooth part come first (``T(x, hyperparams_prox, *args, **kwargs)``), then the
arguments of the smooth part ``f(x, *args, **kwargs)``.

A fixed-point map ``T`` and the root map ``T(x) − x`` give the same derivative; the step
size ``η`` of a fixed-point map changes only the conditioning of the linear system, never
its solution. The fixed point of Anderson acceleration (or of any other accelerated
iteration) is the fixed point of the map it accelerates: use that map.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from mdsens import errors
from mdsens.optim import projections, validation
from mdsens.optim.tree_util import tree_add, tree_add_scalar_mul, tree_map, tree_sub

__all__ = [
    "stationary",
    "KKTSolution",
    "kkt",
    "proximal_gradient",
    "projected_gradient",
    "mirror_descent",
    "newton",
    "gauss_newton",
    "block_proximal_gradient",
    "Cone",
    "conic",
    "conic_point",
    "conic_solution",
]


def _named(fun, name, doc):
    fun.__name__ = fun.__qualname__ = name
    fun.__doc__ = doc
    return fun


# --------------------------------------------------------------------------- smooth
def stationary(fun: Callable) -> Callable:
    """Stationarity of an unconstrained minimum: ``F(x, θ) = ∇₁f(x, θ)`` (paper eq. 5).

    ``∂₁F = ∇²f`` is symmetric (positive definite at a strict minimum): use
    ``custom_root(F, solve=linear_solve.cg, symmetric=True)``.

    Args:
      fun: ``f(x, *args)``, a scalar.

    Returns:
      ``F(x, *args)``, shaped like ``x``.
    """
    grad = jax.grad(fun)
    return _named(lambda x, *args, **kwargs: grad(x, *args, **kwargs), "stationary_F",
                  "F(x, *args, **kwargs) = ∇₁f(x, *args, **kwargs).")


class KKTSolution(NamedTuple):
    """Primal-dual variables of a constrained problem (JAXopt's name).

    ``primal`` (pytree), ``dual_eq`` (one multiplier per equality, or ``None``),
    ``dual_ineq`` (one ``≥ 0`` multiplier per inequality, or ``None``).
    """

    primal: object
    dual_eq: object = None
    dual_ineq: object = None


def kkt(fun: Callable, eq: Optional[Callable] = None, ineq: Optional[Callable] = None) -> Callable:
    """KKT conditions of ``min f(x, θf)`` s.t. ``H(x, θH) = 0``, ``G(x, θG) ≤ 0`` (paper §2.3).

    With ``z = (x, ν, λ)`` (a :class:`KKTSolution`)::

        F(z, θ) = ( ∇₁f(x, θf) + ∂₁H(x, θH)ᵀ ν + ∂₁G(x, θG)ᵀ λ,    stationarity
                    H(x, θH),                                        primal feasibility
                    λ ∘ G(x, θG) )                                   complementary slackness

    Dual feasibility ``λ ≥ 0`` is an inequality, not part of the root: the solver must
    deliver it. ``∂₁F`` is non-symmetric and indefinite (non-singular under LICQ,
    second-order sufficiency and strict complementarity): use GMRES (the default) or a
    dense ``linear_solve.lu``.

    Args:
      fun: ``f(x, params_obj)``.
      eq: ``H(x, params_eq)`` returning an array of equality residuals, or ``None``.
      ineq: ``G(x, params_ineq)`` returning an array of inequality values (``≤ 0`` when
        feasible), or ``None``.

    Returns:
      ``F(z, params_obj, params_eq=None, params_ineq=None)`` returning a
      :class:`KKTSolution` of residuals shaped like ``z``.
    """
    grad = jax.grad(fun)

    def F(z, params_obj, params_eq=None, params_ineq=None):
        x, nu, lam = z
        stationarity = grad(x, params_obj)
        eq_residual = slackness = None
        if eq is not None:
            eq_residual, eq_vjp = jax.vjp(lambda p: eq(p, params_eq), x)
            stationarity = tree_add(stationarity, eq_vjp(nu)[0])
        if ineq is not None:
            g, ineq_vjp = jax.vjp(lambda p: ineq(p, params_ineq), x)
            stationarity = tree_add(stationarity, ineq_vjp(lam)[0])
            slackness = tree_map(jnp.multiply, lam, g)
        out = (stationarity, eq_residual, slackness)
        return KKTSolution(*out) if isinstance(z, KKTSolution) else out

    return _named(F, "kkt_F", kkt.__doc__.splitlines()[0])


# ------------------------------------------------------------------ composite problems
def proximal_gradient(fun: Callable, prox: Callable, step=1.0) -> Callable:
    """Fixed point of proximal gradient (paper §2.3) for ``min f(x, θf) + g(x, θg)``::

        T(x, θ) = prox_{ηg}(x − η ∇₁f(x, θf), θg)

    Args:
      fun: smooth part ``f(x, *args)``.
      prox: ``prox(x, hyperparams_prox, scaling)`` of ``g`` (see :mod:`mdsens.optim.proximal`).
      step: ``η > 0``.

    Returns:
      ``T(x, hyperparams_prox, *args)`` for :func:`mdsens.custom_fixed_point`. ``∂₁T − I``
      is non-symmetric: GMRES (the default).
    """
    validation.check_positive(step, "step")
    grad = jax.grad(fun)

    def T(x, hyperparams_prox, *args, **kwargs):
        return prox(tree_add_scalar_mul(x, -step, grad(x, *args, **kwargs)), hyperparams_prox, step)

    return _named(T, "proximal_gradient_T", "T(x, θg, *θf) = prox_{ηg}(x − η∇₁f(x, θf), θg).")


def projected_gradient(fun: Callable, projection: Callable, step=1.0) -> Callable:
    """Fixed point of projected gradient (paper §2.3) for ``min_{x ∈ C(θC)} f(x, θf)``::

        T(x, θ) = proj_C(x − η ∇₁f(x, θf), θC)

    Args:
      fun: ``f(x, *args)``.
      projection: ``projection(x, hyperparams_proj)`` (see :mod:`mdsens.optim.projections`).
      step: ``η > 0``.

    Returns:
      ``T(x, hyperparams_proj, *args)``.
    """
    validation.check_positive(step, "step")
    grad = jax.grad(fun)

    def T(x, hyperparams_proj, *args, **kwargs):
        return projection(tree_add_scalar_mul(x, -step, grad(x, *args, **kwargs)), hyperparams_proj)

    return _named(T, "projected_gradient_T", "T(x, θC, *θf) = proj_C(x − η∇₁f(x, θf), θC).")


def mirror_descent(fun: Callable, projection: Optional[Callable] = None, mapping: Optional[Callable] = None,
                   step=1.0) -> Callable:
    """Fixed point of mirror descent (paper §2.3) for ``min_{x ∈ C} f(x, θ)``::

        T(x, θ) = proj^φ_C(∇φ(x) − η ∇₁f(x, θ)),   proj^φ_C(y) = argmin_{p ∈ C} D_φ(p, ∇φ*(y))

    Default: the entropy ``φ(x) = ⟨x, log x⟩`` on the simplex (along the last axis), i.e.
    ``mapping = log`` and ``projection = softmax``
    (:func:`~mdsens.optim.kl_projection_simplex`; ``hyperparams_proj`` is the simplex's
    sum, ``None`` for 1): ``T(x) = softmax(log x − η ∇f(x))``, the exponentiated gradient.

    Args:
      fun: ``f(x, *args)``.
      projection: ``projection(y, hyperparams_proj)``, the Bregman projection of ``∇φ*(y)``.
      mapping: the mirror map ``∇φ``.
      step: ``η > 0``.

    Returns:
      ``T(x, hyperparams_proj, *args)``.
    """
    if (projection is None) != (mapping is None):
        raise errors.OptionError("mirror_descent: give both projection and mapping, or neither (the KL "
                                 "geometry of the simplex: projection=kl_projection_simplex, mapping=jnp.log).")
    validation.check_positive(step, "step")
    grad = jax.grad(fun)

    if projection is None:
        # the KL geometry as a product (projections.kl_mirror_step): no log 0 at zero entries
        def T(x, hyperparams_proj, *args, **kwargs):
            value = 1.0 if hyperparams_proj is None else hyperparams_proj
            return tree_map(lambda xi, gi: projections.kl_mirror_step(xi, gi, step, value), x,
                            grad(x, *args, **kwargs))
    else:
        def T(x, hyperparams_proj, *args, **kwargs):
            return projection(tree_add_scalar_mul(mapping(x), -step, grad(x, *args, **kwargs)), hyperparams_proj)

    return _named(T, "mirror_descent_T", "T(x, θC, *θf) = proj^φ_C(∇φ(x) − η∇₁f(x, θf), θC).")


def block_proximal_gradient(fun: Callable, block_prox: Callable, step=1.0) -> Callable:
    """Fixed point of block coordinate proximal gradient (paper §2.3)::

        [T(x, θ)]_j = prox_{η_j g_j}(x_j − η_j [∇₁f(x, θf)]_j, θg)

    The blocks are the rows ``x[j]`` (leading axis) of the array ``x``; for a vector
    each coordinate is a block. The fixed points are those of proximal gradient; the
    per-block steps ``η_j`` (e.g. ``1/L_j``, the inverse block Lipschitz constants used
    by the solver) only precondition the linear system.

    Args:
      fun: ``f(x, *args)``.
      block_prox: ``block_prox(x_j, hyperparams_prox, scaling)``, vmapped over blocks
        (JAXopt's convention: ``hyperparams_prox`` is shared by all blocks).
      step: ``η > 0``, a scalar or one value per block, shape ``(x.shape[0],)``.

    Returns:
      ``T(x, hyperparams_prox, *args)``.
    """
    validation.check_positive(step, "step")
    grad = jax.grad(fun)
    vmapped = jax.vmap(block_prox, in_axes=(0, None, 0))

    def T(x, hyperparams_prox, *args, **kwargs):
        steps = jnp.broadcast_to(jnp.asarray(step, x.dtype), x.shape[:1])
        scale = steps.reshape((-1,) + (1,) * (x.ndim - 1))
        return vmapped(x - scale * grad(x, *args, **kwargs), hyperparams_prox, steps)

    return _named(T, "block_proximal_gradient_T", "[T(x, θ)]_j = prox_{η_j g}(x_j − η_j[∇₁f(x, θf)]_j, θg).")


# ---------------------------------------------------------------- Newton-type maps
def _dense_jacobian(fun, x):
    """``(J (n, n), r (n,))`` of ``fun`` at the pytree ``x``, flattened."""
    flat, unravel = ravel_pytree(x)

    def flat_fun(v):
        return ravel_pytree(fun(unravel(v)))[0]

    return jax.jacfwd(flat_fun)(flat), flat_fun(flat), unravel


def _matrix_free_solve(matvec, b, solve):
    """``A⁻¹ b`` with an mdsens linear solver, differentiable in both modes."""

    def run(mv, rhs):
        out = solve(mv, rhs)
        return out[0] if isinstance(out, tuple) else out

    return lax.custom_linear_solve(matvec, b, solve=run, transpose_solve=run)


def newton(G: Callable, step=1.0, solve: Optional[Callable] = None) -> Callable:
    """Fixed point of Newton's method for a root of ``G`` (paper §2.3)::

        T(x, θ) = x − η [∂₁G(x, θ)]⁻¹ G(x, θ)

    At a root ``∂₁T = (1 − η) I``, so ``∂x* = −[∂₁G]⁻¹ ∂₂G``, the root form's
    derivative. For a minimization ``G = ∇₁f`` (``jax.grad(f)``).

    Args:
      G: ``G(x, *args)``, shaped like ``x``.
      step: ``η > 0`` (damping).
      solve: ``None`` for a dense solve of the materialized Jacobian (small problems),
        or an :mod:`mdsens.linear_solve` solver for a matrix-free inner solve
        (differentiable: it is wrapped in ``lax.custom_linear_solve``).

    Returns:
      ``T(x, *args)``.
    """
    validation.check_positive(step, "step")

    def T(x, *args, **kwargs):
        G_at = lambda p: G(p, *args, **kwargs)  # noqa: E731
        if solve is None:
            J, r, unravel = _dense_jacobian(G_at, x)
            return tree_sub(x, unravel(step * jnp.linalg.solve(J, r)))
        r = G_at(x)
        matvec = lambda v: jax.jvp(G_at, (x,), (v,))[1]  # noqa: E731
        return tree_add_scalar_mul(x, -step, _matrix_free_solve(matvec, r, solve))

    return _named(T, "newton_T", "T(x, θ) = x − η [∂₁G(x, θ)]⁻¹ G(x, θ).")


def gauss_newton(residual: Callable, step=1.0) -> Callable:
    """Fixed point of Gauss–Newton for ``min ½‖r(x, θ)‖²``::

        T(x, θ) = x − η (JᵀJ)⁻¹ Jᵀ r(x, θ),   J = ∂₁r(x, θ)

    At a stationary point ``Jᵀr = 0``, so ``∂₁T − I = −η (JᵀJ)⁻¹ ∇²(½‖r‖²)``: the derivative
    is that of the minimizer, residual or not. ``J`` (dense) needs full column rank.

    Args:
      residual: ``r(x, *args)``, an array.
      step: ``η > 0``.

    Returns:
      ``T(x, *args)``.
    """
    validation.check_positive(step, "step")

    def T(x, *args, **kwargs):
        J, r, unravel = _dense_jacobian(lambda p: residual(p, *args, **kwargs), x)
        return tree_sub(x, unravel(step * jnp.linalg.solve(J.T @ J, J.T @ r)))

    return _named(T, "gauss_newton_T", "T(x, θ) = x − η (JᵀJ)⁻¹ Jᵀ r(x, θ).")


# ----------------------------------------------------------------------------- conic
class Cone(NamedTuple):
    """A product of cones in SCS order: ``zero`` rows (``s = 0``: equalities), then
    ``nonnegative`` rows (``s ≥ 0``: inequalities), then second-order cones of the sizes
    in ``soc`` (``s = (t, v)``, ``‖v‖ ≤ t``)."""

    zero: int = 0
    nonnegative: int = 0
    soc: Tuple[int, ...] = ()

    @property
    def size(self) -> int:
        """Number of rows ``m`` of ``A`` and ``b``."""
        return self.zero + self.nonnegative + sum(self.soc)

    def project_dual(self, w):
        """``Π_{K*}(w)``: free on the zero cone (its dual is everything), ``max(w, 0)`` on
        the orthant, the second-order projection on each (self-dual) SOC block."""
        parts = [w[: self.zero], jax.nn.relu(w[self.zero: self.zero + self.nonnegative])]
        start = self.zero + self.nonnegative
        for q in self.soc:
            parts.append(projections.projection_second_order_cone(w[start: start + q]))
            start += q
        return jnp.concatenate(parts)


def _check_cone(cone):
    if not isinstance(cone, Cone):
        raise errors.OptionError(f"cone must be an mdsens.optim.Cone(zero=, nonnegative=, soc=); got {cone!r}.")
    for name in ("zero", "nonnegative"):
        if getattr(cone, name) < 0:
            raise errors.OptionError(f"Cone.{name} must be >= 0; got {getattr(cone, name)}.")
    if any(q < 1 for q in cone.soc):
        raise errors.OptionError(f"Cone.soc sizes must be >= 1; got {cone.soc}.")
    return cone


def conic(cone: Cone) -> Callable:
    """Residual map of the self-dual embedding of a cone program (paper §2.3, Busseti et
    al. 2019), at ``τ = 1``, for LPs and QPs in SCS's standard form::

        min ½ xᵀPx + cᵀx   s.t.   A x + s = b,   s ∈ K
        dual: P x + Aᵀ y + c = 0,   y ∈ K*,   ⟨s, y⟩ = 0

    The variable is ``z = (x, w)`` with ``w = y − s``; Moreau's decomposition recovers
    ``y = Π_{K*}(w)`` and ``s = y − w``. With ``u = (x, y)``, ``v = (0, s)``,
    ``M = [[P, Aᵀ], [−A, 0]]`` and ``q = (c, b)``::

        F(z, θ) = M Π(z) + q − (Π(z) − z) = ( P x + Aᵀ y + c,   b − A x − s )

    ``F = 0`` is exactly primal feasibility, dual feasibility and complementarity.
    ``∂₁F = (M − I) DΠ(z) + I`` is non-symmetric (GMRES); it is non-singular at a
    unique, strictly complementary solution, where the derivative of an LP vertex or a
    QP solution w.r.t. ``(P, c, A, b)`` exists.

    Args:
      cone: a :class:`Cone` (static).

    Returns:
      ``F(z, P, c, A, b)`` with ``z = (x, w)`` a pair of vectors, ``P`` an ``(n, n)``
      PSD matrix or ``None`` (an LP), ``c (n,)``, ``A (m, n)``, ``b (m,)``.
    """
    _check_cone(cone)

    def F(z, P, c, A, b):
        x, w = z
        y = cone.project_dual(w)
        s = y - w
        dual = A.T @ y + c if P is None else P @ x + A.T @ y + c
        return (dual, b - A @ x - s)

    return _named(F, "conic_F", "F((x, w), P, c, A, b) = (Px + Aᵀy + c, b − Ax − s), y = Π_K*(w), s = y − w.")


def conic_point(x, y, s):
    """The root variable ``z = (x, y − s)`` of :func:`conic` from a primal-dual solution."""
    return (jnp.asarray(x), jnp.asarray(y) - jnp.asarray(s))


def conic_solution(z, cone: Cone):
    """``(x, y, s)`` from the root variable ``z = (x, w)`` of :func:`conic` (differentiable)."""
    x, w = z
    y = _check_cone(cone).project_dual(w)
    return x, y, y - w
