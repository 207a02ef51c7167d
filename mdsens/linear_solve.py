"""``mdsens.linear_solve``: the core's linear solvers (see :mod:`mdsens.implicit.linear_solve`)."""

from mdsens.implicit.linear_solve import (  # noqa: F401
    SolveInfo,
    bicgstab,
    cg,
    cholesky,
    gmres,
    lstsq,
    lu,
    minres,
)

__all__ = ["SolveInfo", "cg", "minres", "gmres", "bicgstab", "lu", "cholesky", "lstsq"]
