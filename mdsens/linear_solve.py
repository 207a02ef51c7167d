"""``mdsens.linear_solve``: the core's linear solvers (see :mod:`mdsens.implicit.linear_solve`)."""

from mdsens.implicit.linear_solve import (  # noqa: F401
    LanczosTridiagonal,
    SolveInfo,
    bicgstab,
    cg,
    cg_lanczos,
    cholesky,
    each_column,
    gmres,
    lstsq,
    lu,
    minres,
)

__all__ = ["SolveInfo", "cg", "cg_lanczos", "LanczosTridiagonal", "minres", "gmres", "bicgstab", "lu", "cholesky",
           "lstsq", "each_column"]
