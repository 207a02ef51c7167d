"""``mdsens.linear_solve``: the core's linear solvers (see :mod:`mdsens.implicit.linear_solve`)."""

from mdsens.implicit.linear_solve import *  # noqa: F401,F403
from mdsens.implicit.linear_solve import __all__  # noqa: F401
