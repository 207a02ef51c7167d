"""The optimization catalog: optimality conditions, projections, proximal operators and
small reference solvers, all differentiable in forward and reverse mode through
:func:`mdsens.custom_root` (paper §2.3 of Blondel et al., NeurIPS 2022).

Knows no physics. Names and calling conventions are JAXopt's where JAXopt has them, so
that ``import jaxopt`` → ``from mdsens import optim as jaxopt`` ports code (see
``docs/design.md``, "The optimization catalog"). The API is flat: ``optim.<name>``.
"""

from mdsens.optim import conditions, projections, proximal, solvers, tree_util
from mdsens.optim.conditions import (
    Cone,
    KKTSolution,
    block_proximal_gradient,
    conic,
    conic_point,
    conic_solution,
    gauss_newton,
    kkt,
    mirror_descent,
    newton,
    projected_gradient,
    proximal_gradient,
    stationary,
)
from mdsens.optim.projections import (
    kl_mirror_step,
    kl_projection_birkhoff,
    kl_projection_simplex,
    kl_projection_transport,
    projection_affine_set,
    projection_box,
    projection_birkhoff,
    projection_box_section,
    projection_halfspace,
    projection_hypercube,
    projection_hyperplane,
    projection_l1_ball,
    projection_l1_sphere,
    projection_l2_ball,
    projection_l2_sphere,
    projection_linf_ball,
    projection_non_negative,
    projection_polyhedron,
    projection_second_order_cone,
    projection_simplex,
    projection_transport,
)
from mdsens.optim.proximal import (
    make_prox_from_projection,
    prox_elastic_net,
    prox_group_lasso,
    prox_lasso,
    prox_non_negative_lasso,
    prox_non_negative_ridge,
    prox_none,
    prox_ridge,
)
from mdsens.optim.solvers import (
    AndersonAcceleration,
    AndersonState,
    BlockCDState,
    BlockCoordinateDescent,
    ConicQP,
    ConicSolver,
    ConicState,
    FixedPointIteration,
    FixedPointState,
    GaussNewton,
    GaussNewtonState,
    GradientDescent,
    InfeasibleProblemError,
    InfeasibleProblemWarning,
    MirrorDescent,
    MirrorDescentState,
    Newton,
    NewtonState,
    OptStep,
    ProjectedGradient,
    ProxGradState,
    ProximalGradient,
)

# JAXopt's module names, so that ``optim.prox.prox_lasso`` and
# ``optim.projection.projection_simplex`` port unchanged.
prox = proximal
projection = projections

__all__ = [
    # modules
    "conditions", "projections", "proximal", "solvers", "tree_util", "prox", "projection",
    # optimality conditions
    "stationary", "kkt", "KKTSolution", "proximal_gradient", "projected_gradient", "mirror_descent",
    "newton", "gauss_newton", "block_proximal_gradient", "Cone", "conic", "conic_point", "conic_solution",
    # projections
    "projection_non_negative", "projection_box", "projection_hypercube", "projection_simplex",
    "projection_l1_sphere", "projection_l1_ball", "projection_l2_sphere", "projection_l2_ball",
    "projection_linf_ball", "projection_hyperplane", "projection_halfspace", "projection_affine_set",
    "projection_box_section", "projection_polyhedron", "projection_second_order_cone", "projection_transport",
    "projection_birkhoff", "kl_projection_simplex", "kl_mirror_step", "kl_projection_transport",
    "kl_projection_birkhoff",
    # proximal operators
    "prox_none", "prox_lasso", "prox_non_negative_lasso", "prox_elastic_net", "prox_group_lasso",
    "prox_ridge", "prox_non_negative_ridge", "make_prox_from_projection",
    # solvers
    "OptStep", "GradientDescent", "ProximalGradient", "ProjectedGradient", "ProxGradState",
    "MirrorDescent", "MirrorDescentState", "BlockCoordinateDescent", "BlockCDState", "Newton", "NewtonState",
    "GaussNewton", "GaussNewtonState", "FixedPointIteration", "FixedPointState", "AndersonAcceleration",
    "AndersonState", "ConicSolver", "ConicQP", "ConicState", "InfeasibleProblemError", "InfeasibleProblemWarning",
]
