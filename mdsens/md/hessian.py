"""Hessian-vector products of an energy, the workhorse of every derivative.

Linear solves for sensitivities, the stability analysis (Lanczos, LOBPCG, rattler
probes) and elastic constants all apply ``∇²E`` many times at one structure. An energy
function of an mdsens potential carries ``E.hessian_products``, which builds small
dense blocks of the local energy's Hessian once and then applies ``∇²E`` as a gather,
block products and a scatter (:func:`mdsens.md.potentials.base.local_hessian_products`);
any other energy gets forward-over-reverse autodiff. Both are exact; tests compare them.
"""

from __future__ import annotations

from typing import Callable

import jax

__all__ = ["hessian_products"]


def hessian_products(energy: Callable, positions, *args) -> Callable:
    """``v ↦ ∇²E(positions, *args) v`` for ``v (N, d)``; call inside ``jit``.

    Build it once, outside loops: with an mdsens potential the blocks are computed here
    (``M·d`` gradient products), and each product afterwards is cheap.
    """
    fast = getattr(energy, "hessian_products", None)
    product = fast(positions, *args) if fast is not None else None
    if product is not None:
        return product
    grad = jax.grad(energy)
    return lambda v: jax.jvp(lambda x: grad(x, *args), (positions,), (v,))[1]
