"""The physics-agnostic core: implicit differentiation of roots and fixed points.

Nothing here knows about atoms; :mod:`mdsens.md` uses it exactly as user code would.
"""

from mdsens.implicit import linear_solve
from mdsens.implicit.linear_solve import SolveInfo
from mdsens.implicit.root import custom_fixed_point, custom_root, root_jvp, root_vjp

__all__ = [
    "custom_root",
    "custom_fixed_point",
    "root_jvp",
    "root_vjp",
    "linear_solve",
    "SolveInfo",
]
