"""One error vocabulary for the whole package.

Every exception mdsens raises on purpose derives from :class:`MdsensError`, every warning
from :class:`MdsensWarning`; ``except ms.MdsensError`` catches them all. Each class is
also the builtin it always was (``ValueError``, ``RuntimeError``, ``TypeError``), so code
that caught those keeps working. The physics layer adds its classes in
:mod:`mdsens.md.errors`; all are exported flat from ``mdsens``.

Where a check can go either way, one policy decides, spelled the same everywhere
(``on_failure=``): ``"raise"`` the error, ``"warn"`` with the matching warning and
return the result, or ``"ignore"``. :func:`check_policy` validates it (a typo raises),
and :func:`report` is the one place that turns a failed check into an error or a
warning.

Errors raised inside a traced computation (``jax.jit``, ``jax.vmap``, the staged part of
``jax.grad``) come from a host callback; JAX re-raises them as
``jax.errors.JaxRuntimeError`` whose message starts with the mdsens class name
(``LinearSolveError: ...``) and carries the same advice.
"""

from __future__ import annotations

import warnings

__all__ = [
    "MdsensError",
    "MdsensWarning",
    "OptionError",
    "PrecisionError",
    "MissingFileError",
    "LinearSolveError",
    "LinearSolveWarning",
    "OptimalityStructureError",
    "NullSpaceError",
    "NullSpaceWarning",
    "RootError",
    "RootWarning",
    "InfeasibleProblemError",
    "InfeasibleProblemWarning",
    "SingularJacobianError",
    "NonFiniteError",
    "FAILURE_POLICIES",
    "check_policy",
    "report",
]

#: The accepted values of every ``on_failure=`` argument.
FAILURE_POLICIES = ("raise", "warn", "ignore")


class MdsensError(Exception):
    """Base of every error mdsens raises on purpose; the message names the fix."""


class MdsensWarning(UserWarning):
    """Base of every warning mdsens issues on purpose."""


class OptionError(MdsensError, ValueError):
    """An invalid option value (a typo in a policy, a negative tolerance, ...)."""


class PrecisionError(MdsensError, RuntimeError):
    """Float64 is off, and the computation cannot be trusted in float32."""


class MissingFileError(MdsensError, FileNotFoundError):
    """A file mdsens was asked to read does not exist."""


# ------------------------------------------------------------------------------ core
class LinearSolveError(MdsensError, RuntimeError):
    """The implicit-differentiation linear solve did not reach its tolerance."""


class LinearSolveWarning(MdsensWarning, RuntimeWarning):
    """Issued instead of :class:`LinearSolveError` when ``on_failure="warn"``."""


class OptimalityStructureError(MdsensError, TypeError):
    """``F(x, θ)`` does not have the pytree structure, shapes and dtypes of ``x``."""


class NullSpaceError(MdsensError, ValueError):
    """A declared null space is empty, or is not a null space of ``∂₁F``."""


class NullSpaceWarning(MdsensWarning, RuntimeWarning):
    """Issued instead of :class:`NullSpaceError` when ``on_failure="warn"``."""


class RootError(MdsensError, RuntimeError):
    """The solver returned a point where the optimality condition does not hold."""


class RootWarning(MdsensWarning, RuntimeWarning):
    """Issued instead of :class:`RootError` when ``on_failure="warn"``."""


class InfeasibleProblemError(RootError):
    """The cone program has no solution: its constraints are empty (primal infeasible) or
    its objective is unbounded below (dual infeasible); the message gives the certificate."""


class InfeasibleProblemWarning(RootWarning):
    """Issued instead of :class:`InfeasibleProblemError` when ``on_failure="warn"``."""


class SingularJacobianError(MdsensError, ValueError):
    """``∂₁F`` is singular beyond the declared null space: no implicit Jacobian, no bound."""


class NonFiniteError(MdsensError, ValueError):
    """An input, or the optimality condition evaluated at it, contains NaN or inf."""


# --------------------------------------------------------------------------- policy
def check_policy(value, name: str = "on_failure") -> str:
    """Return ``value`` if it is one of :data:`FAILURE_POLICIES`, else raise :class:`OptionError`."""
    if value not in FAILURE_POLICIES:
        raise OptionError(
            f"{name} must be one of {FAILURE_POLICIES}; got {value!r}. 'raise' stops with an "
            "error, 'warn' returns the result with a warning, 'ignore' returns it silently."
        )
    return value


def report(policy: str, message: str, error: type, warning: type, *, stacklevel: int = 3) -> None:
    """Act on a failed check: raise ``error(message)``, warn with ``warning``, or nothing.

    ``policy`` is validated by :func:`check_policy`; ``stacklevel`` is passed on to
    :func:`warnings.warn` (counted from the caller of :func:`report`).
    """
    check_policy(policy)
    if policy == "raise":
        raise error(message)
    if policy == "warn":
        warnings.warn(message, warning, stacklevel=stacklevel)
