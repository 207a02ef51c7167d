"""Small jittable reference solvers, each differentiable through its optimality condition.

One module per solver family; every ``run`` returns an :class:`~mdsens.optim.OptStep`
(see :mod:`mdsens.optim.solvers.base` for what they share).
"""

from mdsens.optim.solvers.base import OptStep
from mdsens.optim.solvers.block_cd import BlockCDState, BlockCoordinateDescent
from mdsens.optim.solvers.conic import (
    ConicQP,
    ConicSolver,
    ConicState,
    InfeasibleProblemError,
    InfeasibleProblemWarning,
)
from mdsens.optim.solvers.fixed_point import (
    AndersonAcceleration,
    AndersonState,
    FixedPointIteration,
    FixedPointState,
)
from mdsens.optim.solvers.gradient import GradientDescent, ProjectedGradient, ProxGradState, ProximalGradient
from mdsens.optim.solvers.mirror_descent import MirrorDescent, MirrorDescentState
from mdsens.optim.solvers.newton import GaussNewton, GaussNewtonState, Newton, NewtonState

__all__ = [
    "OptStep", "GradientDescent", "ProximalGradient", "ProjectedGradient", "ProxGradState", "MirrorDescent",
    "MirrorDescentState", "BlockCoordinateDescent", "BlockCDState", "Newton", "NewtonState", "GaussNewton",
    "GaussNewtonState", "FixedPointIteration", "FixedPointState", "AndersonAcceleration", "AndersonState",
    "ConicSolver", "ConicQP", "ConicState", "InfeasibleProblemError", "InfeasibleProblemWarning",
]
