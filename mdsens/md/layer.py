"""What the two relaxation layers (``relaxation``, ``cell_relaxation``) share.

``relax`` takes the host path (neighbor lists, stability analysis) when its values are
concrete and the on-device path under ``jit``/``vmap``; its diagnostics are Python
scalars when they can be and arrays (tracers) when they cannot. Both layers declare
their relaxation to :func:`mdsens.custom_root` the same way (:func:`relaxation_root`):
a symmetric optimality condition whose by-products, the null-space basis among them,
arrive through the aux channel.
"""

from __future__ import annotations

import jax

from mdsens.implicit import custom_root

__all__ = ["is_traced", "python_scalar", "relaxation_root"]


def is_traced(tree) -> bool:
    """Whether any leaf of ``tree`` is a JAX tracer (under jit, vmap, grad, ...)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def python_scalar(x, kind):
    """``kind(x)`` when ``x`` is concrete, else ``x`` (a tracer: under jvp, jit or vmap)."""
    try:
        return kind(x)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return x


def _aux_basis(x, aux, *args):
    return aux.basis


def relaxation_root(F, solve, on_failure):
    """``custom_root`` for a relaxation: ``F(x, aux, *args)`` symmetric (a gradient), the
    solver returns ``(x*, aux)`` with ``aux.basis`` the null space at ``x*``."""
    return custom_root(F, solve=solve, has_aux=True, optimality_takes_aux=True, nullspace=_aux_basis,
                       symmetric=True, on_failure=on_failure)
