"""Pytree arithmetic shared by the projections, proximal operators and solvers.

Every solver in :mod:`mdsens.optim` accepts parameters as arbitrary pytrees of arrays;
these helpers keep that arithmetic in one place (JAXopt's ``tree_util`` names).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "tree_add",
    "tree_sub",
    "tree_scalar_mul",
    "tree_add_scalar_mul",
    "tree_vdot",
    "tree_l2_norm",
    "tree_where",
    "tree_zeros_like",
]

tree_map = jax.tree_util.tree_map


def tree_add(x, y):
    """``x + y`` leaf by leaf."""
    return tree_map(jnp.add, x, y)


def tree_sub(x, y):
    """``x − y`` leaf by leaf."""
    return tree_map(jnp.subtract, x, y)


def tree_scalar_mul(scalar, x):
    """``scalar · x`` leaf by leaf."""
    return tree_map(lambda leaf: scalar * leaf, x)


def tree_add_scalar_mul(x, scalar, y):
    """``x + scalar · y`` leaf by leaf."""
    return tree_map(lambda a, b: a + scalar * b, x, y)


def tree_vdot(x, y):
    """``⟨x, y⟩`` summed over all leaves."""
    leaves = jax.tree_util.tree_leaves(tree_map(jnp.vdot, x, y))
    return sum(leaves) if leaves else jnp.zeros(())


def tree_l2_norm(x, squared: bool = False):
    """``‖x‖₂`` over all leaves (``‖x‖₂²`` with ``squared``)."""
    leaves = jax.tree_util.tree_leaves(x)
    sq = sum(jnp.sum(jnp.square(leaf)) for leaf in leaves) if leaves else jnp.zeros(())
    return sq if squared else jnp.sqrt(sq)


def tree_where(condition, x, y):
    """``x`` where the scalar ``condition`` holds, else ``y`` (leaf by leaf)."""
    return tree_map(lambda a, b: jnp.where(condition, a, b), x, y)


def tree_zeros_like(x):
    """Zeros shaped like ``x``."""
    return tree_map(jnp.zeros_like, x)
