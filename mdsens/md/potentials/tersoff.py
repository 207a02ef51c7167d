"""Tersoff bond-order potential, LAMMPS ``pair_style tersoff`` form and file format.

    E    = ½ Σ_i Σ_{j≠i} f_C(r_ij) [f_R(r_ij) + b_ij f_A(r_ij)]
    f_R  = A e^{−λ₁ r},   f_A = −B e^{−λ₂ r}
    f_C  = 1 (r < R−D);  ½ − ½ sin(π/2 (r−R)/D) (|r−R| ≤ D);  0 (r > R+D)
    b_ij = (1 + (β ζ_ij)^n)^{−1/(2n)}
    ζ_ij = Σ_{k≠i,j} f_C(r_ik) g(θ_ijk) exp[(λ₃ (r_ij − r_ik))^m]      (m = 3 or 1)
    g(θ) = γ (1 + c²/d² − c²/(d² + (cos θ − h)²))

(J. Tersoff, Phys. Rev. B 37, 6991 (1988); 38, 9902 (1988)). Parameters for the
element triple (i, j, k) follow LAMMPS: two-body terms and β, n from (i, j, j); the
three-body terms, including f_C(r_ik), from (i, j, k).

Files: LAMMPS format, 17 entries per triple (element1 element2 element3 m gamma
lambda3 c d costheta0 n beta lambda2 B R D lambda1 A), '#' comments.
``Tersoff.silicon()`` loads the shipped ``mdsens/data/potentials/Si.tersoff`` (Tersoff 1988,
Si(C); diamond a₀ = 5.432 Å, E = −4.63 eV/atom).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Optional

import jax.numpy as jnp
import numpy as np

from mdsens import data
from mdsens.md.potentials.base import ParameterError, Potential, safe_norm

#: LAMMPS column order after the three element names.
FIELDS = ("m", "gamma", "lam3", "c", "d", "h", "n", "beta", "lam2", "B", "R", "D", "lam1", "A")


def read_lammps_tersoff(path) -> dict:
    """Parse a LAMMPS Tersoff file into ``{(e1, e2, e3): {field: float}}``.

    Raises:
      ParameterError: a token count that is not a multiple of 17, or non-numbers.
    """
    tokens = []
    for line in Path(path).read_text().splitlines():
        tokens += line.split("#", 1)[0].split()
    if len(tokens) % 17:
        raise ParameterError(
            f"{path}: a LAMMPS Tersoff file has 17 entries per element triple "
            f"(3 names + 14 numbers); found {len(tokens)} tokens."
        )
    entries = {}
    for i in range(0, len(tokens), 17):
        block = tokens[i : i + 17]
        try:
            values = [float(v) for v in block[3:]]
        except ValueError as err:
            raise ParameterError(f"{path}: entry {block[:3]} has a non-number: {err}") from None
        entries[tuple(block[:3])] = dict(zip(FIELDS, values))
    return entries


class Tersoff(Potential):
    """Tersoff potential from per-triple parameters; Å and eV.

    Args:
      entries: ``{(e1, e2, e3): {field: value}}`` with the 14 LAMMPS fields
        (``m gamma lam3 c d h n beta lam2 B R D lam1 A``; ``h`` is cos θ₀). Every triple
        of ``symbols`` must be present.
      symbols: species order; default the elements in order of first appearance.

    ``params``: 13 float64 arrays of shape ``(S, S, S)`` (all fields but ``m``, which
    is a structural integer, 3 or 1, kept static in ``self.m``), indexed
    ``[i, j, k]`` by species as LAMMPS does. Interaction range ``max(R + D)``.

    Use :meth:`from_lammps` or :meth:`silicon`.
    """

    name = "Tersoff"
    # the dense bond-order sum forms (N, N, N) arrays: switch to neighbor lists early
    neighbor_list_min_atoms = 128
    dims = (3,)
    ranges = {"n": (0.0, None, True), "beta": (0.0, None, False), "D": (0.0, None, True),
              "lam1": (0.0, None, False), "lam2": (0.0, None, False)}

    def __init__(self, entries: dict, symbols: Optional[tuple] = None):
        if symbols is None:
            symbols = tuple(dict.fromkeys(e for key in entries for e in key))
        self.symbols = tuple(symbols)
        S = self.n_species = len(self.symbols)
        tables = {f: np.zeros((S, S, S)) for f in FIELDS}
        for (a, b, c) in itertools.product(range(S), repeat=3):
            key = (self.symbols[a], self.symbols[b], self.symbols[c])
            if key not in entries:
                raise ParameterError(
                    f"Tersoff: no parameters for the element triple {key}; the file must "
                    f"give every triple of {self.symbols} (or restrict symbols=...)."
                )
            for f in FIELDS:
                tables[f][a, b, c] = float(entries[key][f])
        m = tables.pop("m")
        if not np.all(np.isin(m, (1.0, 3.0))):
            raise ParameterError(f"Tersoff: m must be 3 or 1 (LAMMPS); got {np.unique(m)}.")
        self.m = m.astype(np.int32)
        self.params = {k: jnp.asarray(v, jnp.float64) for k, v in tables.items()}
        self._validate_params(self.params)

    def _check_values(self, params):
        if np.any(np.asarray(params["R"]) <= np.asarray(params["D"])):
            raise ParameterError("Tersoff: need 0 < D < R for every triple.")

    @classmethod
    def from_lammps(cls, path, symbols: Optional[tuple] = None) -> "Tersoff":
        """Load a LAMMPS-format Tersoff file (e.g. ``mdsens.data.path("potentials/Si.tersoff")``)."""
        return cls(read_lammps_tersoff(path), symbols)

    @classmethod
    def silicon(cls) -> "Tersoff":
        """Tersoff Si(C) (PRB 38, 9902 (1988)) from the shipped ``Si.tersoff``."""
        return cls.from_lammps(data.path("potentials/Si.tersoff"), ("Si",))

    def cutoff(self, params=None) -> float:
        params = self.params if params is None else params
        return float(np.max(np.asarray(params["R"]) + np.asarray(params["D"])))

    def _local_energy(self, params, dR, mask, species_i, species_j):
        si = species_i[:, None]  # (N, 1)
        sj = species_j  # (N, M)
        pair = {k: v[si, sj, sj] for k, v in params.items()}  # (i, j, j): (N, M)
        trip = {  # (i, j, k): (N, M, M), j along axis 1, k along axis 2
            k: params[k][si[:, :, None], sj[:, :, None], sj[:, None, :]]
            for k in ("gamma", "lam3", "c", "d", "h", "R", "D")
        }
        m3 = jnp.asarray(self.m)[si[:, :, None], sj[:, :, None], sj[:, None, :]] == 3

        r = safe_norm(dR, mask)
        within = mask & (r < pair["R"] + pair["D"])
        r_in = jnp.where(within, r, pair["R"])  # harmless distance for masked slots
        fc = jnp.where(within, _fc(r_in, pair["R"], pair["D"]), 0.0)

        rik = r_in[:, None, :]
        # the true r_ik decides (r_in is a placeholder R for out-of-range slots)
        within_k = mask[:, None, :] & (r[:, None, :] < trip["R"] + trip["D"])
        M = r.shape[1]
        mask3 = within[:, :, None] & within_k & ~jnp.eye(M, dtype=bool)[None]
        fc_ik = jnp.where(mask3, _fc(jnp.where(mask3, rik, trip["R"]), trip["R"], trip["D"]), 0.0)
        u = dR / r_in[..., None]
        cos = jnp.einsum("nja,nka->njk", u, u)
        c2, d2 = trip["c"] ** 2, trip["d"] ** 2
        g = trip["gamma"] * (1.0 + c2 / d2 - c2 / (d2 + (cos - trip["h"]) ** 2))
        t = trip["lam3"] * (r_in[:, :, None] - rik)
        arg = jnp.where(m3, t * t * t, t)
        zeta = jnp.sum(jnp.where(mask3, fc_ik * g * jnp.exp(jnp.where(mask3, arg, 0.0)), 0.0), axis=2)

        n, beta = pair["n"], pair["beta"]
        # (βζ)^n has an infinite ζ-derivative at ζ = 0 for n < 1: mask it (b = 1 there).
        pos = zeta > 0.0
        z = jnp.where(pos, beta * zeta, 1.0)
        b = jnp.where(pos, (1.0 + z**n) ** (-0.5 / n), 1.0)

        f_r = pair["A"] * jnp.exp(-pair["lam1"] * r_in)
        f_a = -pair["B"] * jnp.exp(-pair["lam2"] * r_in)
        return 0.5 * jnp.sum(jnp.where(within, fc * (f_r + b * f_a), 0.0))

    def __repr__(self):
        return f"Tersoff(symbols={self.symbols}, cutoff={self.cutoff():g})"


def _fc(r, R, D):
    """Tersoff cutoff: 1 below R−D, ½ − ½ sin(π/2 (r−R)/D) within D of R, 0 beyond."""
    mid = 0.5 - 0.5 * jnp.sin(0.5 * jnp.pi * (r - R) / D)
    return jnp.where(r < R - D, 1.0, jnp.where(r < R + D, mid, 0.0))
