"""The one piece of global state mdsens owns: JAX's float64 switch.

Implicit differentiation of relaxed structures needs float64: forces at a minimum are
differences of large, nearly cancelling terms, and the Hessian solves that give
sensitivities lose about half the digits of the inputs. So ``import mdsens`` turns on
``jax_enable_x64``.

Opt out by setting the environment variable ``MDSENS_ENABLE_X64=0`` *before* the import
(for example to study float32 behaviour). Physics routines then refuse to run with a
clear error, because jax-md silently downcasts parameters and the results would not be
trustworthy; the physics-agnostic core keeps working in float32.
"""

import os

import jax

from mdsens.errors import PrecisionError

_ENV_VAR = "MDSENS_ENABLE_X64"


def _x64_requested() -> bool:
    value = os.environ.get(_ENV_VAR, "1").strip().lower()
    return value not in {"0", "false", "no", "off"}


def enable_x64_if_requested() -> None:
    """Turn on JAX float64 unless ``MDSENS_ENABLE_X64=0``; called once by ``import mdsens``."""
    if _x64_requested():
        jax.config.update("jax_enable_x64", True)


def x64_enabled() -> bool:
    """Whether JAX currently computes in float64."""
    return bool(jax.config.read("jax_enable_x64"))


def require_x64(what: str) -> None:
    """Raise :class:`~mdsens.PrecisionError` if float64 is off: physics results are not
    trustworthy without it."""
    if not x64_enabled():
        raise PrecisionError(
            f"{what} needs float64, but jax_enable_x64 is off. Unset {_ENV_VAR}=0 (or call "
            "jax.config.update('jax_enable_x64', True)) before importing mdsens."
        )
