"""Hessian-vector products of an energy, the workhorse of every derivative.

Linear solves for sensitivities, the stability analysis (Lanczos, LOBPCG, rattler
probes) and elastic constants all apply ``∇²E`` many times at one structure. An energy
function of an mdsens potential carries ``E.gradient_and_hessian_blocks``, which builds
small dense blocks of the local energy's Hessian (and the gradient from the same pass),
and ``E.hessian_apply``, which applies ``∇²E`` from them as a gather, block products and
a scatter (:mod:`mdsens.md.potentials.base`). Any other energy gets forward-over-reverse
autodiff. Both are exact; tests compare them.

The blocks are plain arrays. :func:`gradient_and_blocks` builds them once per structure,
in one compiled program, and every later program (stability analysis, sensitivity
solve, elastic constants) takes them as an argument: each program then compiles only
the cheap apply, not the block construction again.
"""

from __future__ import annotations

from typing import Callable

import jax

__all__ = ["gradient_and_blocks", "hessian_products"]


def gradient_and_blocks(energy: Callable, positions, *args):
    """``(∇E (N, d), blocks)`` at ``positions``; ``blocks`` is ``None`` where products come
    from autodiff (no fast form, or blocks too big). Call inside ``jit``."""
    fast = getattr(energy, "gradient_and_hessian_blocks", None)
    built = fast(positions, *args) if fast is not None else None
    if built is not None:
        return built
    return jax.grad(energy)(positions, *args), None


def hessian_products(energy: Callable, positions, *args, blocks=None) -> Callable:
    """``v ↦ ∇²E(positions, *args) v`` for ``v (N, d)``; call inside ``jit``.

    ``blocks``: from :func:`gradient_and_blocks` at the same arguments (built here when
    ``None``). Build once, outside loops: each product afterwards is cheap.
    """
    if blocks is None:
        fast = getattr(energy, "gradient_and_hessian_blocks", None)
        built = fast(positions, *args) if fast is not None else None
        blocks = None if built is None else built[1]
    if blocks is not None:
        return energy.hessian_apply(blocks, positions, *args)
    grad = jax.grad(energy)
    return lambda v: jax.jvp(lambda x: grad(x, *args), (positions,), (v,))[1]
