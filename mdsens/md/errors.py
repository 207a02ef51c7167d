"""The physics layer's errors and warnings, all under :class:`mdsens.MdsensError` /
:class:`mdsens.MdsensWarning` (see :mod:`mdsens.errors`)."""

from __future__ import annotations

from mdsens.errors import MdsensError, MdsensWarning

__all__ = [
    "StructureError",
    "StructureFileError",
    "PotentialError",
    "SpeciesError",
    "CutoffError",
    "ParameterError",
    "UnknownParameterError",
    "NeighborListError",
    "RelaxError",
    "NotConvergedError",
    "NotConvergedWarning",
    "ResultMismatchError",
    "SaddlePointError",
    "NearSingularWarning",
]


class StructureError(MdsensError, ValueError):
    """A structure that mdsens cannot use as given; the message says how to fix it."""


class StructureFileError(StructureError):
    """A structure file that cannot be read or written; the message names the file and why."""


class PotentialError(MdsensError, ValueError):
    """A potential cannot be used as asked; the message names the problem and the fix."""


class SpeciesError(PotentialError):
    """The system contains species the potential has no parameters for."""


class CutoffError(PotentialError):
    """The interaction range is too long for the periodic cell (minimum image fails)."""


class ParameterError(PotentialError):
    """Parameters are NaN/inf, out of their range, wrongly shaped, or unknown."""


class UnknownParameterError(ParameterError, KeyError):
    """A parameter name (in ``wrt=``) that the potential does not have."""


class NeighborListError(MdsensError, RuntimeError):
    """A neighbor list cannot be used as given (overflowed, stale, too large to build)."""


class RelaxError(MdsensError, RuntimeError):
    """A relaxation that cannot go on (NaN energies/forces, unusable options)."""


class NotConvergedError(MdsensError, RuntimeError):
    """A structure is not relaxed enough for what was asked (``strict=True``)."""


class NotConvergedWarning(MdsensWarning, RuntimeWarning):
    """A relaxation stopped before its criterion, or a derivative was asked of a
    structure whose forces are not small; results are returned, flagged."""


class ResultMismatchError(MdsensError, ValueError):
    """A relaxation result used with another potential or other parameters than the ones
    it was relaxed with (its forces under the given ones are not zero)."""


class SaddlePointError(MdsensError, RuntimeError):
    """The 'relaxed' structure has a direction of negative curvature: it is a saddle."""


class NearSingularWarning(MdsensWarning, RuntimeWarning):
    """The Hessian is nearly singular beyond the declared zero modes."""
