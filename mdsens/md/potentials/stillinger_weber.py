"""Stillinger–Weber three-body potential (F. H. Stillinger & T. A. Weber, Phys. Rev. B
31, 5262 (1985)), in the form and parameter names of LAMMPS ``pair_style sw``:

    E  = Σ_{i<j} φ₂(r_ij) + Σ_i Σ_{j<k} φ₃(r_ij, r_ik, θ_jik)
    φ₂ = A ε [B (σ/r)^p − (σ/r)^q] exp(σ / (r − aσ))                        (r < aσ)
    φ₃ = λ ε (cos θ_jik − cos θ₀)² exp(γσ/(r_ij − aσ)) exp(γσ/(r_ik − aσ))  (r_ij, r_ik < aσ)

Silicon defaults are the original paper's (LAMMPS ``Si.sw``): ε = 2.1683 eV,
σ = 2.0951 Å, a = 1.80, λ = 21.0, γ = 1.20, cos θ₀ = −1/3, A = 7.049556277,
B = 0.6022245584, p = 4, q = 0; diamond Si has E = −2ε = −4.3366 eV/atom at
a₀ = 5.431 Å.

The three-body sum is evaluated without forming (N, M, M) angle arrays: with unit
vectors u_j and weights g_j = exp(γσ/(r_ij − aσ)),
Σ_{j≠k} g_j g_k (u_j·u_k − c₀)² = (‖Σ g u⊗u‖² − Σg²) − 2c₀(‖Σ g u‖² − Σg²) + c₀²((Σg)² − Σg²),
which is O(N M d²) instead of O(N M²) (the dense path has M = N).
"""

from __future__ import annotations

import jax.numpy as jnp

from mdsens.md.potentials.base import ParameterError, Potential, safe_norm
from mdsens.md.potentials.pair import resolve_species_params

SILICON = dict(
    epsilon=2.1683,
    sigma=2.0951,
    a=1.80,
    lam=21.0,
    gamma=1.20,
    costheta0=-1.0 / 3.0,
    A=7.049556277,
    B=0.6022245584,
    p=4.0,
    q=0.0,
)


class StillingerWeber(Potential):
    """Stillinger–Weber, one species (silicon defaults); Å and eV.

    Args:
      epsilon: energy unit ε (eV). Default 2.1683.
      sigma: length unit σ (Å). Default 2.0951.
      a: cutoff in units of σ (cutoff = aσ = 3.7712 Å). Default 1.80.
      lam: three-body strength λ. Default 21.0 (1.5–2.0× for amorphous-Si variants).
      gamma: three-body decay γ. Default 1.20.
      costheta0: preferred cosine cos θ₀. Default −1/3 (tetrahedral).
      A, B, p, q: two-body shape. Defaults 7.049556277, 0.6022245584, 4, 0.
      symbols: the one species this applies to. Default ``("Si",)``; a system with
        another species raises :class:`SpeciesError` (pass ``symbols=("Ge",)`` with
        your parameters, or ``symbols=None`` to apply to any one-species system).

    ``params``: all of the above as float64 scalars (every one differentiable).
    """

    name = "StillingerWeber"
    # The dense three-body sum runs over all (N, N, N) triplets. Measured (2-core CPU,
    # FIRE on Si): lists win from ~30 atoms (1.3x at 45, 1.6x at 63, 7x at 215 atoms).
    neighbor_list_min_atoms = 32
    dims = (3,)
    ranges = {"epsilon": (0.0, None, True), "sigma": (0.0, None, True), "a": (0.0, None, True),
              "lam": (0.0, None, False), "gamma": (0.0, None, False)}

    def __init__(
        self,
        epsilon=SILICON["epsilon"],
        sigma=SILICON["sigma"],
        a=SILICON["a"],
        lam=SILICON["lam"],
        gamma=SILICON["gamma"],
        costheta0=SILICON["costheta0"],
        A=SILICON["A"],
        B=SILICON["B"],
        p=SILICON["p"],
        q=SILICON["q"],
        *,
        symbols=("Si",),
    ):
        values = dict(epsilon=epsilon, sigma=sigma, a=a, lam=lam, gamma=gamma,
                      costheta0=costheta0, A=A, B=B, p=p, q=q)
        for k, v in values.items():
            if jnp.ndim(v) != 0:
                raise ParameterError(f"StillingerWeber: {k} must be a scalar (one species); got shape {jnp.shape(v)}.")
        self.params, _, _ = resolve_species_params(self.name, values, {}, None)
        self.symbols = None if symbols is None else tuple(symbols)
        if self.symbols is not None and len(self.symbols) != 1:
            raise ParameterError(f"StillingerWeber is single-species; got symbols={self.symbols}.")
        self.n_species = 1
        self._validate_params(self.params)

    def cutoff(self, params=None) -> float:
        params = self.params if params is None else params
        return float(params["a"]) * float(params["sigma"])

    def _local_energy(self, params, dR, mask, species_i, species_j):
        eps, sigma, a = params["epsilon"], params["sigma"], params["a"]
        rc = a * sigma
        r = safe_norm(dR, mask)
        within = mask & (r < rc)
        # Out-of-range slots get a harmless distance (rc/2): every term and its
        # derivative is finite there, and `within` zeroes them.
        r_in = jnp.where(within, r, 0.5 * rc)
        # x^p e^s = exp(p log x + s): one log and two exps per pair instead of two general
        # powers and an exp (8 % of a gradient on the CPU; same values).
        log_x = jnp.log(sigma / r_in)
        s = sigma / (r_in - rc)
        phi2 = params["A"] * eps * (params["B"] * jnp.exp(params["p"] * log_x + s) - jnp.exp(params["q"] * log_x + s))
        e2 = 0.5 * jnp.sum(jnp.where(within, phi2, 0.0))

        g = jnp.where(within, jnp.exp(params["gamma"] * s), 0.0)  # (N, M)
        u = dR * (1.0 / r_in)[..., None]  # unit vectors where within (g = 0 elsewhere)
        gsum = jnp.sum(g, axis=1)
        g2sum = jnp.sum(g * g, axis=1)
        v = jnp.einsum("nm,nmd->nd", g, u)
        T = jnp.einsum("nm,nmd,nme->nde", g, u, u)
        s0 = gsum**2 - g2sum
        s1 = jnp.sum(v * v, axis=1) - g2sum
        s2 = jnp.sum(T * T, axis=(1, 2)) - g2sum
        c0 = params["costheta0"]
        e3 = 0.5 * params["lam"] * eps * jnp.sum(s2 - 2.0 * c0 * s1 + c0 * c0 * s0)
        return e2 + e3

    def __repr__(self):
        items = ", ".join(f"{k}={float(v):g}" for k, v in self.params.items())
        return f"StillingerWeber({items}, symbols={self.symbols})"
