"""Input checks for the optimization catalog: bad input raises :class:`~mdsens.OptionError`.

Checks on *values* (a negative radius, a negative regularization) run only when the
values are concrete: inside ``jit`` they are tracers and the caller owns them. Checks on
*shapes* always run (shapes are static under ``jit``). Every message names the fix.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import errors

__all__ = [
    "is_concrete",
    "check_nonnegative",
    "check_positive",
    "check_nonzero",
    "check_broadcastable",
    "check_ndim",
    "check_positive_int",
    "check_tolerance",
    "check_stepsize",
]


def is_concrete(*trees) -> bool:
    """``True`` when no leaf of ``trees`` is a tracer (values can be inspected)."""
    return not any(isinstance(leaf, jax.core.Tracer) for t in trees for leaf in jax.tree_util.tree_leaves(t))


def _values(value):
    return np.asarray(jax.device_get(value), dtype=float)


def check_nonnegative(value, name: str, what: str = ""):
    """Raise unless every entry of ``value`` is ``≥ 0`` and finite (concrete values only)."""
    if value is None or not is_concrete(value):
        return value
    for leaf in jax.tree_util.tree_leaves(value):
        v = _values(leaf)
        if not np.all(np.isfinite(v)) or np.any(v < 0):
            raise errors.OptionError(
                f"{name} must be finite and non-negative{what}; got {np.array2string(v, threshold=8)}. "
                f"Pass {name} >= 0."
            )
    return value


def check_positive(value, name: str, what: str = ""):
    """Raise unless every entry of ``value`` is ``> 0`` and finite (concrete values only)."""
    if value is None or not is_concrete(value):
        return value
    for leaf in jax.tree_util.tree_leaves(value):
        v = _values(leaf)
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
            raise errors.OptionError(
                f"{name} must be finite and positive{what}; got {np.array2string(v, threshold=8)}. "
                f"Pass {name} > 0."
            )
    return value


def check_nonzero(value, name: str, what: str = ""):
    """Raise if ``value`` is identically zero (concrete values only)."""
    if value is None or not is_concrete(value):
        return value
    v = np.concatenate([_values(leaf).ravel() for leaf in jax.tree_util.tree_leaves(value)] or [np.zeros(0)])
    if not np.all(np.isfinite(v)) or not np.any(v != 0):
        raise errors.OptionError(f"{name} must be finite and not identically zero{what}.")
    return value


def check_broadcastable(value, shape, name: str, target: str = "x"):
    """Raise unless ``value`` broadcasts to ``shape`` without changing it."""
    try:
        out = jnp.broadcast_shapes(jnp.shape(value), tuple(shape))
    except ValueError:
        out = None
    if out != tuple(shape):
        raise errors.OptionError(
            f"{name} has shape {tuple(jnp.shape(value))}, which does not broadcast to the shape "
            f"{tuple(shape)} of {target}. Pass a scalar or an array of the shape of {target}."
        )
    return value


def check_ndim(x, ndims, name: str, what: str):
    """Raise unless ``x.ndim`` is in ``ndims``."""
    ndims = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if jnp.ndim(x) not in ndims:
        raise errors.OptionError(
            f"{name} must be {what} (ndim {' or '.join(map(str, ndims))}); got shape {tuple(jnp.shape(x))}."
        )
    return x


def check_positive_int(value, name: str):
    """Raise unless ``value`` is a Python integer ``≥ 1``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise errors.OptionError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


def check_tolerance(value, name: str = "tol"):
    """Raise unless ``value`` is a finite number ``≥ 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value < 0:
        raise errors.OptionError(f"{name} must be a finite number >= 0; got {value!r}.")
    return float(value)


def check_stepsize(value, name: str = "stepsize", allow_line_search: bool = True):
    """Raise unless ``value`` is a finite number (``<= 0`` means line search where allowed)."""
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise errors.OptionError(f"{name} must be a finite number; got {value!r}.")
    if value <= 0 and not allow_line_search:
        raise errors.OptionError(f"{name} must be positive; got {value!r}.")
    return float(value)
