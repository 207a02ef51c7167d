"""Soft spheres (harmonic/Hertzian contacts), jax-md's ``energy.soft_sphere`` form.

    u(r) = (ε/α) (1 − r/σ)^α   for r < σ,   0 otherwise

(O'Hern, Silbert, Liu & Nagel, Phys. Rev. E 68, 011306 (2003)). Reduced units: σ is
the contact distance (the sum of radii for a pair), ε an energy scale; α = 2 is
harmonic, α = 5/2 Hertzian. The interaction range is max σ.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mdsens.md.potentials.base import ParameterError
from mdsens.md.potentials.pair import PairPotential, resolve_species_params


class SoftSphere(PairPotential):
    """Finite-range repulsive soft spheres; reduced units; binary (or S-ary) mixtures.

    Args:
      sigma: contact distance σ: scalar, ``(S, S)`` matrix (e.g. a 1:1.4 binary
        mixture ``[[1.0, 1.2], [1.2, 1.4]]``), or ``{symbol: diameter}`` (additive:
        σ_ij = (σ_i + σ_j)/2). Default 1.0.
      epsilon: energy scale ε: scalar, matrix or ``{symbol: ε}`` (geometric mean).
        Default 1.0.
      alpha: stiffness exponent α (> 1, for continuous forces): scalar or matrix.
        Default 2.0.
      symbols: species names for matrix parameters; default species by index.

    ``params``: ``sigma``, ``epsilon``, ``alpha`` (float64).
    """

    pair_keys = ("sigma", "epsilon", "alpha")
    name = "SoftSphere"
    # α > 1: the force is continuous at contact (α = 1 is a step in the force).
    ranges = {"sigma": (0.0, None, True), "epsilon": (0.0, None, True), "alpha": (1.0, None, True)}

    def __init__(self, sigma=1.0, epsilon=1.0, alpha=2.0, *, symbols=None):
        self.params, self.symbols, self.n_species = resolve_species_params(
            self.name,
            {"sigma": sigma, "epsilon": epsilon, "alpha": alpha},
            {"sigma": "arithmetic", "epsilon": "geometric", "alpha": "arithmetic"},
            symbols,
        )
        self._validate_params(self.params)

    def cutoff(self, params=None) -> float:
        params = self.params if params is None else params
        return float(np.max(np.asarray(params["sigma"])))

    def pair_energy(self, r, pp, params):
        sigma, epsilon, alpha = pp["sigma"], pp["epsilon"], pp["alpha"]
        overlap = r < sigma
        # double where: (1 - r/σ)^α and its α-derivative (x^α ln x) stay finite off contact
        base = jnp.where(overlap, 1.0 - r / sigma, 1.0)
        return jnp.where(overlap, epsilon / alpha * base**alpha, 0.0)
