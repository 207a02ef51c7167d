"""Proximal operators, with JAXopt's names and signatures.

``prox_g(x, hyperparams, scaling) = argmin_y ½‖y − x‖² + scaling · g(y, hyperparams)``.
``scaling`` is the step size ``η`` of a proximal-gradient step. All act leaf by leaf on
pytrees (the group lasso on the whole pytree), are jittable and differentiable almost
everywhere by autodiff (their Jacobians are the masks the proximal-gradient fixed point
needs, paper §2.3). Negative regularization strengths with concrete values raise
:class:`~mdsens.OptionError`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mdsens.optim import validation
from mdsens.optim.tree_util import tree_l2_norm, tree_scalar_mul

__all__ = [
    "prox_none",
    "prox_lasso",
    "prox_non_negative_lasso",
    "prox_elastic_net",
    "prox_group_lasso",
    "prox_ridge",
    "prox_non_negative_ridge",
    "make_prox_from_projection",
]

tree_map = jax.tree_util.tree_map


def _per_leaf(value, x):
    """``value`` as a pytree like ``x`` (a scalar or array is used for every leaf)."""
    x_def = jax.tree_util.tree_structure(x)
    if jax.tree_util.tree_structure(value) == x_def:
        return value
    return jax.tree_util.tree_unflatten(x_def, [value] * x_def.num_leaves)


def prox_none(x, hyperparams=None, scaling=1.0):
    """The identity: proximal operator of ``g = 0``."""
    del hyperparams, scaling
    return x


def _soft_threshold(u, threshold):
    return jnp.sign(u) * jax.nn.relu(jnp.abs(u) - threshold)


def prox_lasso(x, l1reg=None, scaling=1.0):
    """Soft thresholding: ``argmin_y ½‖y − x‖² + scaling · l1reg · ‖y‖₁``.

    Args:
      x: pytree.
      l1reg: ``≥ 0``, a scalar or a pytree like ``x`` (coordinate-wise weights);
        default 1.
      scaling: step size ``η``.
    """
    l1reg = 1.0 if l1reg is None else l1reg
    validation.check_nonnegative(l1reg, "l1reg")
    return tree_map(lambda u, lam: _soft_threshold(u, scaling * lam), x, _per_leaf(l1reg, x))


def prox_non_negative_lasso(x, l1reg=None, scaling=1.0):
    """``argmin_{y ≥ 0} ½‖y − x‖² + scaling · l1reg · ‖y‖₁ = max(x − scaling · l1reg, 0)``."""
    l1reg = 1.0 if l1reg is None else l1reg
    validation.check_nonnegative(l1reg, "l1reg")
    return tree_map(lambda u, lam: jax.nn.relu(u - scaling * lam), x, _per_leaf(l1reg, x))


def prox_elastic_net(x, hyperparams=None, scaling=1.0):
    """Elastic net: ``argmin_y ½‖y − x‖² + scaling · λ₁ · (‖y‖₁ + λ₂ ½‖y‖²)`` (JAXopt's form).

    The solution is ``soft(x, scaling λ₁) / (1 + scaling λ₁ λ₂)``.

    Args:
      hyperparams: ``(λ₁, λ₂)``, each ``≥ 0``, scalars or pytrees like ``x``
        (default ``(1, 1)``).
    """
    l1reg, l2reg = (1.0, 1.0) if hyperparams is None else hyperparams
    validation.check_nonnegative(l1reg, "hyperparams[0] (l1reg)")
    validation.check_nonnegative(l2reg, "hyperparams[1] (l2reg)")

    def prox(u, lam, gamma):
        return _soft_threshold(u, scaling * lam) / (1.0 + scaling * lam * gamma)

    return tree_map(prox, x, _per_leaf(l1reg, x), _per_leaf(l2reg, x))


def prox_group_lasso(x, l2reg=1.0, scaling=1.0):
    """Block soft thresholding: ``argmin_y ½‖y − x‖² + scaling · l2reg · ‖y‖₂``.

    The whole pytree ``x`` is one group: ``x max(0, 1 − scaling l2reg/‖x‖)``. For
    several groups, ``jax.vmap`` over them (this is the block prox of
    :class:`~mdsens.optim.BlockCoordinateDescent` for rows of a matrix).
    """
    validation.check_nonnegative(l2reg, "l2reg")
    sq = tree_l2_norm(x, squared=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 1.0)
    factor = jnp.where(positive, jax.nn.relu(1.0 - scaling * l2reg / norm), 0.0)
    return tree_scalar_mul(factor, x)


def prox_ridge(x, l2reg=1.0, scaling=1.0):
    """``argmin_y ½‖y − x‖² + scaling · l2reg · ½‖y‖² = x / (1 + scaling · l2reg)``."""
    l2reg = 1.0 if l2reg is None else l2reg
    validation.check_nonnegative(l2reg, "l2reg")
    return tree_scalar_mul(1.0 / (1.0 + scaling * l2reg), x)


def prox_non_negative_ridge(x, l2reg=1.0, scaling=1.0):
    """``argmin_{y ≥ 0} ½‖y − x‖² + scaling · l2reg · ½‖y‖² = max(x, 0)/(1 + scaling l2reg)``."""
    l2reg = 1.0 if l2reg is None else l2reg
    validation.check_nonnegative(l2reg, "l2reg")
    return tree_map(jax.nn.relu, tree_scalar_mul(1.0 / (1.0 + scaling * l2reg), x))


def make_prox_from_projection(projection):
    """The prox of the indicator of a set is its projection: ``prox(x, hp, scaling) = projection(x, hp)``.

    ``scaling`` is meaningless for an indicator and is ignored.
    """

    def prox(x, hyperparams=None, scaling=1.0):
        del scaling
        return projection(x, hyperparams)

    name = getattr(projection, "__name__", repr(projection))
    prox.__doc__ = f"Proximal operator of the indicator of the set ``{name}`` projects onto."
    return prox
