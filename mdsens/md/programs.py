"""``jax.jit`` for the relaxation's host programs, with the CPU compile options they run best with.

XLA's CPU backend hands small matrix products to YNNPACK: the ``(N, 3) @ (3, 3)``
changes between Cartesian and fractional coordinates, the displacements' transforms and
their transposes under ``grad``, Stillinger–Weber's per-atom contractions. Each is a few
microseconds of arithmetic, and YNNPACK's thread pool costs more than it saves on them:
a relaxation step runs about eight. Without them, ``ms.make_relax`` of SW Si at N = 999
took 133 ms against 156 ms (2 cores, medians of four alternating processes); the
sensitivities, measured with the option set for the whole process, did not change
(docs/design.md §9). It is a per-program compile option, not a process flag: other JAX
code keeps XLA's defaults. JAX takes compile options on top-level programs only, so
:func:`jit` serves programs that are never called under a transformation (the host
relaxation's; not ``relax_batch``'s, which ``jax.grad`` may trace).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import numpy as np

from mdsens.md import cache

__all__ = ["CPU_COMPILER_OPTIONS", "compiler_options", "jit"]

#: XLA compile options of the relaxation's programs on the CPU: no YNNPACK fusions.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options() -> Optional[dict]:
    """:data:`CPU_COMPILER_OPTIONS` when JAX's default backend is the CPU and this jaxlib
    knows them (an experimental XLA option: older and newer versions may not), else
    ``None`` (XLA's defaults). The check compiles one trivial program, once per process
    (:func:`mdsens.md.cache.capability`)."""
    if jax.default_backend() != "cpu":
        return None
    return cache.capability(("cpu compiler options", tuple(sorted(CPU_COMPILER_OPTIONS.items()))), _supported)


def _supported() -> Optional[dict]:
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(np.zeros(1)).compile()
    except Exception:  # JaxRuntimeError "No such compile option" (XlaRuntimeError in older JAX)
        return None
    return dict(CPU_COMPILER_OPTIONS)


def jit(fun: Callable, **kwargs):
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options`."""
    return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
