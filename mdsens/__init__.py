"""mdsens: sensitivity analysis of relaxed atomistic structures by implicit differentiation.

``import mdsens`` turns on JAX float64 (opt out with ``MDSENS_ENABLE_X64=0``; see
:mod:`mdsens._config`).
"""

from mdsens._config import enable_x64_if_requested as _enable_x64_if_requested

_enable_x64_if_requested()

from mdsens import linear_solve  # noqa: E402
from mdsens.implicit import (  # noqa: E402
    LinearSolveError,
    LinearSolveWarning,
    OptimalityStructureError,
    SolveInfo,
    custom_fixed_point,
    custom_root,
    root_jvp,
    root_vjp,
)
from mdsens.md import (  # noqa: E402
    ElasticConstants,
    NearSingularWarning,
    NotConvergedWarning,
    RelaxError,
    RelaxResult,
    SaddlePointError,
    Sensitivity,
    StructureError,
    StructureFileError,
    System,
    elastic_constants,
    make_elastic_constants,
    make_observable_gradient,
    make_relax,
    make_sensitivity,
    observable_gradient,
    potentials,
    read,
    relax,
    sensitivity,
    write,
)

__version__ = "0.1.0"
