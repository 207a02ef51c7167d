"""Clamped-ion and relaxed-ion elastic constants of Stillinger–Weber silicon.

In diamond silicon a shear strain moves the two fcc sublattices against each other
(internal strain, Kleinman's ζ), so the relaxed-ion C44 is much softer than the
clamped-ion (Born) one, while C11 and C12 do not relax: by the site symmetry of diamond
only the shear strains couple to internal displacements. ``ms.elastic_constants`` gets the relaxed-ion constants as

    C = C⁰ − (1/V) Λᵀ H⁺ Λ,     Λ = ∂²E/∂R∂ε  (internal-strain coupling),

with H⁺Λ from implicit differentiation of the relaxed positions w.r.t. strain (forward
mode, 6 batched CG solves), never by finite strains.

Data: ``mdsens/data/si_diamond_2x2x2.vasp`` (64 atoms, a = 5.431 Å, rattled by 0.03 Å),
relaxed at fixed cell with the original SW parameters (Stillinger & Weber, PRB 31,
5262 (1985)). Reference values for SW Si (e.g. Balamane, Halicioglu & Tiller, PRB 46,
2250 (1992)): C11 = 151.4, C12 = 76.4, C44 = 56.4 GPa (relaxed-ion).

Run: ``python examples/elastic_si.py --out out/`` (about 30-45 s on 2 cores, mostly
compiling the three-body potential's derivatives).
"""

from __future__ import annotations

import _common

_common.headless()

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import mdsens as ms  # noqa: E402
from mdsens.plot import elastic_matrix  # noqa: E402

#: Relaxed-ion SW silicon constants, GPa (Balamane, Halicioglu & Tiller 1992, Table).
REFERENCE = {"C11": 151.4, "C12": 76.4, "C44": 56.4}


def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    out = _common.out_dir(args.out)
    timer = _common.Timer()

    system = ms.read(ms.data.path("si_diamond_2x2x2.vasp"))
    pot = ms.potentials.StillingerWeber()
    res = ms.relax(system, pot, fmax=1e-10, max_steps=100_000)
    assert res.converged
    timer(f"relaxed {system}: {res.steps} L-BFGS steps, E* = {float(res.energy) / system.n_atoms:.6f} eV/atom")

    C = ms.elastic_constants(res, pot).to_gpa()
    timer("clamped- and relaxed-ion elastic constants (6 implicit solves, compile included)")
    print(C.table())

    got = {"C11": C.relaxed[0, 0], "C12": C.relaxed[0, 1], "C44": C.relaxed[3, 3]}
    print(f"{'':6}{'clamped':>10}{'relaxed':>10}{'reference':>11}  (GPa)")
    clamped = {"C11": C.clamped[0, 0], "C12": C.clamped[0, 1], "C44": C.clamped[3, 3]}
    for k, ref in REFERENCE.items():
        print(f"{k:6}{clamped[k]:10.2f}{got[k]:10.2f}{ref:11.1f}")
    worst = max(abs(got[k] - REFERENCE[k]) / REFERENCE[k] for k in REFERENCE)
    print(f"largest relative deviation from the reference: {worst:.2e}")

    vmax = float(np.abs(C.clamped).max())
    fig = Figure(figsize=(14.0, 4.4), layout="constrained")
    axes = fig.subplots(1, 3)
    elastic_matrix(C.clamped, ax=axes[0], vmax=vmax, title="clamped-ion (Born) $C^0$", colorbar=False)
    elastic_matrix(C.relaxed, ax=axes[1], vmax=vmax, title="relaxed-ion $C$", colorbar=False)
    elastic_matrix(C.relaxation, ax=axes[2], vmax=vmax,
                   title=r"internal relaxation $C - C^0 = -\Lambda^T H^+ \Lambda / V$")
    fig.suptitle(f"Stillinger–Weber Si, {system.n_atoms} atoms, a = 5.431 Å: elastic constants (GPa)")
    _common.save_figure(fig, out, "elastic_si.png", timer, dpi=100)
    return worst


if __name__ == "__main__":
    main()
