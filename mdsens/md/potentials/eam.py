"""Embedded-atom method (EAM): LAMMPS tables and the analytic Zhou–Johnson–Wadley form.

    E   = Σ_i F_{s_i}(ρ̄_i) + ½ Σ_i Σ_{j≠i} φ_{s_i s_j}(r_ij)
    ρ̄_i = Σ_{j≠i} ρ_{s_j→s_i}(r_ij)

(M. S. Daw & M. I. Baskes, Phys. Rev. B 29, 6443 (1984)). ``ρ_{b→a}(r)`` is the density
an atom of species ``b`` puts at a host of species ``a``; it depends on ``b`` only except
in the Finnis–Sinclair form (``eam/fs``). Row ``i`` of the neighbor displacements fixes
atom ``i``'s term, so the energy is a sum of per-atom terms of one row each: the ``_local_energy``
contract holds, and the per-atom blocks ``∇²L_i = F''(ρ̄_i) ∇ρ̄_i ∇ρ̄_iᵀ + Σ_j [F'(ρ̄_i)
∇²ρ_ij + ½ ∇²φ_ij]`` (``(M d) × (M d)``, ``pairwise = False``) are exact. They are dense
(the embedding couples every pair of a row) and do not pay: EAM energies leave Hessian
products to autodiff (:meth:`EAMPotential.energy_fn`). A rank-one-plus-pair-blocks form,
``O(M d²)`` per atom, would; it needs the energy's pair-vector map, which the base class
keeps private.

Two potentials share that energy:

* :class:`EAM` — tables in the three LAMMPS formats (``pair_style eam`` = DYNAMO
  *funcfl*, ``eam/alloy`` = *setfl*, ``eam/fs`` = Finnis–Sinclair setfl), read with
  :meth:`EAM.from_file` and written back with :meth:`EAM.write`. The tables are the
  parameters (``params["F"]``, ``params["rho"]``, ``params["rphi"]`` or ``params["Z"]``),
  so energies, relaxed structures and sensitivities are differentiable in every tabulated
  value. Between the grid points they are interpolated by **not-a-knot cubic splines**
  (C², so forces and Hessian-vector products are continuous); the splines' second
  derivatives come from one tridiagonal solve per evaluation, linear in the table values.
  This is the interpolant of ASE's ``EAM`` calculator (SciPy's
  ``InterpolatedUnivariateSpline``, ``k=3``) for ``F`` and ``ρ``; for the pair term, as in
  LAMMPS, the spline interpolates ``r·φ`` and divides by ``r`` (ASE splines ``φ`` itself;
  the two differ by the interpolation error, ``O(dr⁴)``). LAMMPS interpolates with its own
  C¹ piecewise cubic (finite-difference slopes): agreement with it is at the interpolation
  error, not round-off. Beyond the last grid point the end cubic is continued (as SciPy
  does; LAMMPS continues ``F`` linearly).
* :class:`ZhouEAM` — the analytic form of X. W. Zhou, R. A. Johnson and H. N. G.
  Wadley, Phys. Rev. B 69, 144113 (2004), with its parameter table for Cu, Ni and Al as a
  differentiable pytree, and :meth:`ZhouEAM.tabulate` to turn it into an :class:`EAM`
  (and a LAMMPS/ASE file).

Unit conventions of the files (LAMMPS ``pair_eam`` documentation): ``F`` in eV, ``ρ``
dimensionless, ``r·φ`` in eV·Å (setfl and fs); funcfl stores the effective charge ``Z(r)``
with ``φ_ab(r) = 27.2 · 0.529 · Z_a(r) Z_b(r) / r`` (LAMMPS's Hartree and Bohr; ASE
uses CODATA values, 0.075 % larger).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ase.data import atomic_masses, atomic_numbers, chemical_symbols

from mdsens.errors import MissingFileError
from mdsens.md.io import write_text_atomically
from mdsens.md.potentials.base import ParameterError, Potential, SpeciesError, safe_norm
from mdsens.md.potentials.morse import quintic_cutoff

__all__ = [
    "EAM",
    "ZhouEAM",
    "EAMPotential",
    "EAMFunctions",
    "read_eam",
    "spline_coefficients",
    "spline_values",
    "FUNCFL_PAIR_UNIT",
    "ZHOU_2004",
    "ZHOU_FIELDS",
]

#: ``r·φ = FUNCFL_PAIR_UNIT · Z_a Z_b`` (eV·Å) for funcfl files: LAMMPS's ``27.2 · 0.529``.
FUNCFL_PAIR_UNIT = 27.2 * 0.529

#: LAMMPS pair styles and the file formats they read.
KINDS = ("eam", "eam/alloy", "eam/fs")
_KIND_ALIASES = {"eam": "eam", "funcfl": "eam", "eam/alloy": "eam/alloy", "alloy": "eam/alloy",
                 "setfl": "eam/alloy", "eam/fs": "eam/fs", "fs": "eam/fs"}
#: The table parameters of each kind, with their shapes in (S species, nrho, nr).
_TABLES = {
    "eam": {"F": ("S", "nrho"), "rho": ("S", "nr"), "Z": ("S", "nr")},
    "eam/alloy": {"F": ("S", "nrho"), "rho": ("S", "nr"), "rphi": ("S", "S", "nr")},
    "eam/fs": {"F": ("S", "nrho"), "rho": ("S", "S", "nr"), "rphi": ("S", "S", "nr")},
}


# ------------------------------------------------------------------------------- splines
def spline_coefficients(values, step):
    """Not-a-knot cubic splines through ``values (T, n)`` on the grid ``0, step, 2 step, …``.

    Returns ``(T, n, 2)``: the values and ``step²/6`` times the splines' second
    derivatives at the grid points, what :func:`spline_values` takes. Linear in
    ``values`` (one tridiagonal solve with ``T`` right-hand sides), so differentiable
    w.r.t. them in both modes. Not-a-knot (third derivative continuous at the second and
    the second-to-last point) is the spline of SciPy's ``InterpolatedUnivariateSpline``;
    on a uniform grid its end conditions keep the system tridiagonal: rows
    ``6 M₁ = r₁`` and ``6 M_{n-2} = r_{n-2}``, ``M₀ = 2M₁ − M₂``. Needs ``n >= 4``.
    """
    values = jnp.asarray(values, jnp.float64)
    n = values.shape[-1]
    m = n - 2
    y = values.reshape(-1, n).T  # (n, T)
    rhs = (y[:-2] - 2.0 * y[1:-1] + y[2:]) * (6.0 / step**2)  # (n-2, T)
    diag = np.full(m, 4.0)
    diag[0] = diag[-1] = 6.0
    lower = np.ones(m)
    upper = np.ones(m)
    lower[0] = lower[-1] = 0.0  # lower[0] unused; the last row has no M_{n-3} term
    upper[0] = upper[-1] = 0.0  # upper[-1] unused; the first row has no M_2 term
    inner = jax.lax.linalg.tridiagonal_solve(
        jnp.asarray(lower), jnp.asarray(diag), jnp.asarray(upper), rhs)  # (n-2, T)
    first = 2.0 * inner[:1] - inner[1:2]
    last = 2.0 * inner[-1:] - inner[-2:-1]
    second = jnp.concatenate([first, inner, last]).T.reshape(values.shape)
    return jnp.stack([values, second * (step**2 / 6.0)], axis=-1)


def spline_values(coefficients, step, x, table=0):
    """Evaluate splines from :func:`spline_coefficients` at ``x`` (any shape).

    ``table`` (int array broadcastable to ``x``) picks the spline of each point. Outside
    ``[0, (n-1) step]`` the end cubics are continued. C² in ``x``; differentiable in
    ``x`` and ``coefficients``.
    """
    n = coefficients.shape[-2]
    flat = coefficients.reshape(-1, 2)
    s = x / step
    k = jnp.clip(jnp.floor(s), 0, n - 2)
    t = s - k
    base = jnp.asarray(table, jnp.int32) * n + k.astype(jnp.int32)
    lo = jnp.take(flat, base, axis=0)
    hi = jnp.take(flat, base + 1, axis=0)
    u = 1.0 - t
    return u * lo[..., 0] + t * hi[..., 0] + (u**3 - u) * lo[..., 1] + (t**3 - t) * hi[..., 1]


# ---------------------------------------------------------------------------- the energy
class EAMFunctions(NamedTuple):
    """The three EAM functions at one set of parameters, on species-index arrays.

    * ``density(r, s_host, s_neighbor)``: ``ρ_{s_neighbor→s_host}(r)``;
    * ``pair(r, s_a, s_b)``: ``φ_ab(r)`` (eV);
    * ``embedding(rho, s)``: ``F_s(ρ)`` (eV).

    Arguments broadcast; ``r`` in Å. ``density_and_pair(r, s_host, s_neighbor)``, when
    given, returns both at once (sharing work the two have in common).
    """

    density: Callable
    pair: Callable
    embedding: Callable
    density_and_pair: Optional[Callable] = None


class EAMPotential(Potential):
    """What :class:`EAM` and :class:`ZhouEAM` share: the energy from :meth:`functions`.

    Subclasses set ``params``, ``symbols``, ``n_species``, ``r_cutoff`` (Å, static) and
    implement ``functions(params) -> EAMFunctions``.
    """

    dims = (3,)
    pairwise = False
    #: Neighbor lists from 128 atoms. Measured (2-core CPU, Cu, range 5.3 Å, warm
    #: gradients): lists 2.5x faster at N = 107, 1.5-2x at 255, 9x at 499.
    neighbor_list_min_atoms = 128
    r_cutoff: float

    def functions(self, params=None) -> EAMFunctions:
        raise NotImplementedError

    def energy_fn(self, system, *, neighbor_list: Optional[bool] = None, params=None) -> Callable:
        """:meth:`Potential.energy_fn`, with Hessian products left to autodiff.

        The energy satisfies the per-atom local contract (tests check the blocks against
        autodiff), but the dense ``(M d)²`` blocks do not pay for EAM: measured at N = 255,
        range 5.3 Å (M = 56), building them costs ~130 autodiff products and each product
        from them is 1.2x *slower* than autodiff (the embedding couples every pair of a
        row, so nothing is sparse). ``E.hessian_products`` (and the block builder) return
        ``None``, which sends :mod:`mdsens.md.hessian` to forward-over-reverse autodiff.
        """
        energy = super().energy_fn(system, neighbor_list=neighbor_list, params=params)
        for hook in ("hessian_products", "gradient_and_hessian_blocks"):
            if hasattr(energy, hook):
                setattr(energy, hook, _autodiff_hessian)
        return energy

    def cutoff(self, params=None) -> float:
        """Interaction range (Å): a static setting, not a parameter."""
        return float(self.r_cutoff)

    def _local_energy(self, params, dR, mask, species_i, species_j):
        fns = self.functions(params)
        r = safe_norm(dR, mask)
        within = mask & (r < self.r_cutoff)
        r_in = jnp.where(within, r, 0.5 * self.r_cutoff)  # a harmless distance elsewhere
        si = species_i[:, None]
        if fns.density_and_pair is None:
            rho, phi = fns.density(r_in, si, species_j), fns.pair(r_in, si, species_j)
        else:
            rho, phi = fns.density_and_pair(r_in, si, species_j)
        density = jnp.sum(jnp.where(within, rho, 0.0), axis=1)
        pair = jnp.where(within, phi, 0.0)
        return jnp.sum(fns.embedding(density, species_i)) + 0.5 * jnp.sum(pair)

    # -- the functions by element name (plots, tests, tabulation) ----------------------
    def _index(self, element) -> int:
        if element not in self.symbols:
            raise SpeciesError(f"{self.name} has parameters for {self.symbols}; got {element!r}.")
        return self.symbols.index(element)

    def _checked_functions(self, params):
        return self.functions(self._validate_params(self.params if params is None else params))

    def embedding_fn(self, element: str, params=None) -> Callable:
        """``rho -> F(rho)`` (eV) of ``element``; ``rho`` any shape."""
        fns, s = self._checked_functions(params), self._index(element)
        return jax.jit(lambda rho: fns.embedding(jnp.asarray(rho, jnp.float64), s))

    def density_fn(self, element: str, host: Optional[str] = None, params=None) -> Callable:
        """``r -> ρ(r)``: the density an ``element`` atom puts at distance ``r`` (Å) from a
        ``host`` atom (default the same element; it matters for ``eam/fs`` only)."""
        fns, s = self._checked_functions(params), self._index(element)
        h = s if host is None else self._index(host)
        return jax.jit(lambda r: fns.density(jnp.asarray(r, jnp.float64), h, s))

    def pair_fn(self, a: str, b: Optional[str] = None, params=None) -> Callable:
        """``r -> φ_ab(r)`` (eV), ``r`` in Å (default ``b = a``)."""
        fns, sa = self._checked_functions(params), self._index(a)
        sb = sa if b is None else self._index(b)
        return jax.jit(lambda r: fns.pair(jnp.asarray(r, jnp.float64), sa, sb))


def _autodiff_hessian(positions, params, cell=None, neighbor=None):
    """No block form: Hessian products of EAM energies come from autodiff (``None``)."""
    return None


# --------------------------------------------------------------------------- file reader
def _kind_of(path, kind) -> str:
    if kind is not None:
        if kind not in _KIND_ALIASES:
            raise ParameterError(f"EAM: unknown file kind {kind!r}; use one of {KINDS} (LAMMPS pair styles).")
        return _KIND_ALIASES[kind]
    name = Path(path).name.lower()
    if name.endswith((".eam.fs", ".fs")):
        return "eam/fs"
    if name.endswith((".eam.alloy", ".alloy", ".setfl", ".set")):
        return "eam/alloy"
    if name.endswith(".eam"):
        return "eam"
    raise ParameterError(
        f"EAM: cannot tell the format of {path} from its name; pass kind='eam' (funcfl), "
        "'eam/alloy' (setfl) or 'eam/fs'.")


def _numbers(tokens, start, count, path, what):
    """``count`` floats from ``tokens[start:]`` (Fortran ``D`` exponents accepted)."""
    chunk = tokens[start:start + count]
    if len(chunk) < count:
        raise ParameterError(
            f"{path}: the file ends inside {what}: {count} values expected, {len(chunk)} found. "
            "A truncated file, or another EAM format (check kind=).")
    try:
        return np.array([float(t.replace("D", "E").replace("d", "e")) for t in chunk])
    except ValueError:
        bad = next(t for t in chunk if not _is_number(t))
        raise ParameterError(f"{path}: {what} contains the non-number {bad!r}.") from None


def _is_number(token) -> bool:
    try:
        float(token.replace("D", "E").replace("d", "e"))
        return True
    except ValueError:
        return False


def _grid(tokens, start, path):
    """``nrho drho nr dr cutoff`` at ``tokens[start:]``, checked."""
    values = _numbers(tokens, start, 5, path, "the grid line (Nrho drho Nr dr cutoff)")
    nrho, nr = values[0], values[2]
    if nrho != int(nrho) or nr != int(nr) or nrho < 4 or nr < 4:
        raise ParameterError(f"{path}: Nrho and Nr must be integers >= 4; got {values[0]:g}, {values[2]:g}.")
    if not (values[1] > 0 and values[3] > 0 and values[4] > 0):
        raise ParameterError(f"{path}: drho, dr and the cutoff must be positive; got {values[[1, 3, 4]]}.")
    return int(nrho), float(values[1]), int(nr), float(values[3]), float(values[4])


def _element_line(tokens, start, path):
    """``atomic-number mass lattice-constant lattice-type``."""
    head = tokens[start:start + 4]
    if len(head) < 4 or not all(_is_number(t) for t in head[:3]):
        raise ParameterError(
            f"{path}: expected an element line 'atomic-number mass lattice-constant lattice-type'; "
            f"got {' '.join(head)!r}.")
    return int(float(head[0])), float(head[1]), float(head[2]), head[3]


def _read_one(path, kind):
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"EAM: no such potential file: {path}.")
    lines = path.read_text().splitlines()
    out = dict(kind=kind, numbers=[], masses=[], lattice_constants=[], lattice_types=[])
    if kind == "eam":
        if len(lines) < 3:
            raise ParameterError(f"{path}: a funcfl file has a comment line, an element line and a grid line.")
        out["comments"] = (lines[0].strip(),)
        tokens = " ".join(lines[1:]).split()
        number, mass, a, lattice = _element_line(tokens, 0, path)
        if not 0 < number < len(chemical_symbols):
            raise ParameterError(f"{path}: atomic number {number} names no element.")
        out.update(symbols=(chemical_symbols[number],), numbers=[number], masses=[mass],
                   lattice_constants=[a], lattice_types=[lattice])
        nrho, drho, nr, dr, cutoff = _grid(tokens, 4, path)
        d = 9
        F = _numbers(tokens, d, nrho, path, "F(rho)")
        Z = _numbers(tokens, d + nrho, nr, path, "Z(r)")
        rho = _numbers(tokens, d + nrho + nr, nr, path, "rho(r)")
        tables = {"F": F[None], "Z": Z[None], "rho": rho[None]}
        end = d + nrho + 2 * nr
    else:
        if len(lines) < 5:
            raise ParameterError(f"{path}: a setfl file has three comment lines, an element line and a grid line.")
        out["comments"] = tuple(line.strip() for line in lines[:3])
        tokens = " ".join(lines[3:]).split()
        if not tokens or not tokens[0].isdigit() or int(tokens[0]) < 1:
            raise ParameterError(f"{path}: line 4 must start with the number of elements; got {lines[3]!r}.")
        S = int(tokens[0])
        symbols = tuple(tokens[1:1 + S])
        if len(symbols) < S or len(set(symbols)) < S:
            raise ParameterError(f"{path}: line 4 must name {S} distinct elements; got {lines[3]!r}.")
        out["symbols"] = symbols
        nrho, drho, nr, dr, cutoff = _grid(tokens, 1 + S, path)
        d = 6 + S
        F = np.zeros((S, nrho))
        rho = np.zeros((S, nr) if kind == "eam/alloy" else (S, S, nr))
        for a in range(S):
            number, mass, lat, lattice = _element_line(tokens, d, path)
            for key, value in zip(("numbers", "masses", "lattice_constants", "lattice_types"),
                                  (number, mass, lat, lattice)):
                out[key].append(value)
            d += 4
            F[a] = _numbers(tokens, d, nrho, path, f"F(rho) of {symbols[a]}")
            d += nrho
            if kind == "eam/alloy":
                rho[a] = _numbers(tokens, d, nr, path, f"rho(r) of {symbols[a]}")
                d += nr
            else:
                for b in range(S):
                    rho[a, b] = _numbers(tokens, d, nr, path, f"rho(r) of {symbols[a]} at {symbols[b]}")
                    d += nr
        rphi = np.zeros((S, S, nr))
        for a in range(S):
            for b in range(a + 1):
                rphi[a, b] = rphi[b, a] = _numbers(tokens, d, nr, path, f"r*phi(r) of {symbols[a]}-{symbols[b]}")
                d += nr
        tables = {"F": F, "rho": rho, "rphi": rphi}
        end = d
    if len(tokens) > end:
        raise ParameterError(
            f"{path}: {len(tokens) - end} values after the last {kind} table. Another format "
            f"(eam/fs vs eam/alloy, or an ADP / eam/he file)? Pass the right kind=.")
    out.update(tables=tables, drho=drho, dr=dr, cutoff=cutoff)
    return out


def read_eam(path, kind: Optional[str] = None) -> dict:
    """Parse a LAMMPS EAM file (host only).

    Args:
      path: a file, or a list of funcfl files (``pair_style eam`` with one file per
        element; they must share one grid).
      kind: ``"eam"`` (funcfl), ``"eam/alloy"`` (setfl) or ``"eam/fs"``; default from
        the name (``*.eam``, ``*.eam.alloy`` / ``*.setfl``, ``*.eam.fs``).

    Returns:
      ``dict(kind, symbols, tables, drho, dr, cutoff, numbers, masses,
      lattice_constants, lattice_types, comments)``; ``tables`` holds NumPy arrays shaped
      as in :class:`EAM`.

    Raises:
      MissingFileError: no such file.
      ParameterError: a file that does not parse as ``kind`` (the message says where).
    """
    if isinstance(path, (list, tuple)):
        parts = [_read_one(p, _kind_of(p, kind or "eam")) for p in path]
        if any(p["kind"] != "eam" for p in parts):
            raise ParameterError("EAM: only funcfl (kind='eam') files combine, one per element.")
        grids = {(p["tables"]["F"].shape[1], p["drho"], p["tables"]["Z"].shape[1], p["dr"]) for p in parts}
        if len(grids) > 1:
            raise ParameterError(
                f"EAM: funcfl files on different grids {sorted(grids)} (Nrho, drho, Nr, dr); "
                "regrid them into one setfl file first.")
        symbols = tuple(s for p in parts for s in p["symbols"])
        if len(set(symbols)) < len(symbols):
            raise ParameterError(f"EAM: two funcfl files for one element: {symbols}.")
        merged = dict(parts[0], symbols=symbols, cutoff=max(p["cutoff"] for p in parts),
                      comments=tuple(c for p in parts for c in p["comments"]))
        merged["tables"] = {k: np.concatenate([p["tables"][k] for p in parts]) for k in ("F", "Z", "rho")}
        for key in ("numbers", "masses", "lattice_constants", "lattice_types"):
            merged[key] = [v for p in parts for v in p[key]]
        return merged
    return _read_one(path, _kind_of(path, kind))


def _value_lines(values, per_line=5):
    """Table values as text lines, ``per_line`` per line, 17 significant digits."""
    values = np.asarray(values, np.float64).ravel()
    return [" ".join(f"{v:.16e}" for v in values[i:i + per_line]) for i in range(0, len(values), per_line)]


# ------------------------------------------------------------------------- tabulated EAM
class EAM(EAMPotential):
    """EAM from tables on uniform grids, as LAMMPS ``pair_style eam``, ``eam/alloy``,
    ``eam/fs`` read them; Å and eV.

    Args:
      tables: the parameters, NumPy or JAX arrays (``S`` species, ``nrho``/``nr`` grid
        points, ``nrho, nr >= 4``):

        * ``F (S, nrho)``: embedding energy at ``ρ = k·drho`` (eV);
        * ``rho``: ``(S, nr)`` density of an atom of each species at ``r = k·dr``
          (``eam``, ``eam/alloy``), or ``(S, S, nr)`` with ``rho[a, b]`` the density an
          ``a`` atom puts at a ``b`` host (``eam/fs``, the file's order);
        * ``rphi (S, S, nr)``: ``r·φ_ab`` (eV·Å), symmetric (``eam/alloy``, ``eam/fs``); or
        * ``Z (S, nr)``: funcfl effective charges, ``r·φ_ab = 27.2·0.529·Z_a Z_b`` (``eam``).
      symbols: element names, the species order of the tables.
      drho, dr: grid spacings (density units, Å); cutoff: interaction range (Å).
      kind: ``"eam/alloy"`` (default), ``"eam/fs"`` or ``"eam"``.
      numbers, masses, lattice_constants, lattice_types: per-element header data, kept
        for :meth:`write` (defaults: atomic numbers and masses from ``ase.data``, 0.0,
        ``"none"``).
      comments: header lines for :meth:`write`.

    ``params``: the tables as float64 arrays. ``rphi`` is symmetrized inside the energy
    (its gradient comes out symmetric). Every value is differentiable; with thousands of
    grid points pass ``wrt=`` a few entries (``"F[0,420]"``) or a direction dict to
    :func:`ms.sensitivity`, not ``"params"``.

    The spline second derivatives are recomputed at every evaluation (one tridiagonal
    solve per grid, negligible beside the pair sums).

    Raises:
      ParameterError: unknown kind, wrong table keys or shapes, fewer than 4 grid points,
        non-positive spacings or cutoff, asymmetric ``rphi``, NaN/inf values.
    """

    name = "EAM"

    def __init__(self, tables: dict, *, symbols: Sequence[str], drho: float, dr: float, cutoff: float,
                 kind: str = "eam/alloy", numbers=None, masses=None, lattice_constants=None,
                 lattice_types=None, comments: Sequence[str] = ()):
        if kind not in _KIND_ALIASES:
            raise ParameterError(f"EAM: unknown kind {kind!r}; use one of {KINDS}.")
        self.kind = _KIND_ALIASES[kind]
        self.symbols = tuple(str(s) for s in symbols)
        S = self.n_species = len(self.symbols)
        if S == 0 or len(set(self.symbols)) < S:
            raise ParameterError(f"EAM: symbols must name distinct elements; got {self.symbols}.")
        for key, value in (("drho", drho), ("dr", dr), ("cutoff", cutoff)):
            if not (np.isfinite(value) and value > 0):
                raise ParameterError(f"EAM: {key} must be a positive number; got {value!r}.")
        self.drho, self.dr, self.r_cutoff = float(drho), float(dr), float(cutoff)
        expected = _TABLES[self.kind]
        if set(tables) != set(expected):
            raise ParameterError(f"EAM ({self.kind}): tables must be {sorted(expected)}; got {sorted(tables)}.")
        arrays = {k: np.asarray(v, np.float64) for k, v in tables.items()}
        nrho, nr = arrays["F"].shape[-1], arrays["rho"].shape[-1]
        sizes = {"S": S, "nrho": nrho, "nr": nr}
        for key, dims in expected.items():
            shape = tuple(sizes[d] for d in dims)
            if arrays[key].shape != shape:
                raise ParameterError(f"EAM ({self.kind}): table {key!r} must have shape {shape} "
                                     f"({', '.join(dims)}); got {arrays[key].shape}.")
        if nrho < 4 or nr < 4:
            raise ParameterError(f"EAM: cubic splines need at least 4 grid points; got nrho={nrho}, nr={nr}.")
        if "rphi" in arrays and not np.allclose(arrays["rphi"], np.swapaxes(arrays["rphi"], 0, 1),
                                                rtol=1e-12, atol=0.0):
            raise ParameterError("EAM: rphi must be symmetric in its two species (phi_ab = phi_ba).")
        self.numbers = tuple(int(v) for v in (numbers if numbers is not None
                                              else [atomic_numbers.get(s, 0) for s in self.symbols]))
        self.masses = tuple(float(v) for v in (masses if masses is not None else [
            float(atomic_masses[atomic_numbers[s]]) if s in atomic_numbers else 0.0 for s in self.symbols]))
        self.lattice_constants = tuple(float(v) for v in (lattice_constants if lattice_constants is not None
                                                          else [0.0] * S))
        self.lattice_types = tuple(str(v) for v in (lattice_types if lattice_types is not None else ["none"] * S))
        self.comments = tuple(" ".join(str(c).split()) for c in comments)  # one line each
        self.params = {k: jnp.asarray(v, jnp.float64) for k, v in arrays.items()}
        self._validate_params(self.params)

    @classmethod
    def from_file(cls, path, kind: Optional[str] = None) -> "EAM":
        """Load a LAMMPS EAM file (see :func:`read_eam`; a list of funcfl files combines
        them as ``pair_style eam`` does). Species are matched by element name."""
        data = read_eam(path, kind)
        return cls(data["tables"], symbols=data["symbols"], drho=data["drho"], dr=data["dr"],
                   cutoff=data["cutoff"], kind=data["kind"], numbers=data["numbers"], masses=data["masses"],
                   lattice_constants=data["lattice_constants"], lattice_types=data["lattice_types"],
                   comments=data["comments"])

    def functions(self, params=None) -> EAMFunctions:
        params = self.params if params is None else params
        S = self.n_species
        if self.kind == "eam":
            Z = params["Z"]
            rphi = FUNCFL_PAIR_UNIT * Z[:, None, :] * Z[None, :, :]
        else:
            rphi = 0.5 * (params["rphi"] + jnp.swapaxes(params["rphi"], 0, 1))
        nr = params["rho"].shape[-1]
        rho_tables = params["rho"].reshape(-1, nr)
        n_rho = rho_tables.shape[0]
        r_coef = spline_coefficients(jnp.concatenate([rho_tables, rphi.reshape(S * S, nr)]), self.dr)
        F_coef = spline_coefficients(params["F"], self.drho)
        fs = self.kind == "eam/fs"
        dr, drho = self.dr, self.drho

        def density(r, s_host, s_neighbor):
            table = s_neighbor * S + s_host if fs else s_neighbor
            return spline_values(r_coef, dr, r, jnp.broadcast_to(table, jnp.shape(r)))

        def pair(r, s_a, s_b):
            table = n_rho + s_a * S + s_b
            return spline_values(r_coef, dr, r, jnp.broadcast_to(table, jnp.shape(r))) / r

        def embedding(rho, s):
            return spline_values(F_coef, drho, rho, jnp.broadcast_to(s, jnp.shape(rho)))

        return EAMFunctions(density, pair, embedding)

    def write(self, path, params=None) -> Path:
        """Write the tables (default ``self.params``) as a LAMMPS file of this kind,
        atomically (:func:`mdsens.md.io.write_text_atomically`), 17 significant digits:
        reading it back gives the same numbers. Returns the path.

        Raises:
          ParameterError: a funcfl (``kind="eam"``) potential with more than one element.
        """
        params = self._validate_params(self.params if params is None else params)
        tables = {k: np.asarray(v) for k, v in params.items()}
        S, nrho, nr = self.n_species, tables["F"].shape[1], tables["rho"].shape[-1]
        if self.kind == "eam" and S != 1:
            raise ParameterError(f"EAM.write: a funcfl file holds one element; this potential has {S} "
                                 f"({self.symbols}). Write one file per element, or use kind='eam/alloy'.")
        comments = list(self.comments) + ["written by mdsens"] * 3
        grid = f"{nrho} {self.drho:.16e} {nr} {self.dr:.16e} {self.r_cutoff:.16e}"

        def element(a):
            return (f"{self.numbers[a]} {self.masses[a]:.10g} {self.lattice_constants[a]:.10g} "
                    f"{self.lattice_types[a]}")

        if self.kind == "eam":
            lines = [comments[0], element(0), grid]
            blocks = [tables["F"][0], tables["Z"][0], tables["rho"][0]]
        else:
            lines = comments[:3] + [f"{S} {' '.join(self.symbols)}", grid]
            rphi = 0.5 * (tables["rphi"] + np.swapaxes(tables["rphi"], 0, 1))
            blocks = []
            for a in range(S):
                blocks += [element(a), tables["F"][a], tables["rho"][a]]  # fs: rho[a] is (S, nr), file order
            blocks += [rphi[a, b] for a in range(S) for b in range(a + 1)]
        for block in blocks:
            lines += [block] if isinstance(block, str) else _value_lines(block)
        write_text_atomically(str(path), "\n".join(lines) + "\n")
        return Path(path)

    def __repr__(self):
        return (f"EAM(kind={self.kind!r}, symbols={self.symbols}, nrho={self.params['F'].shape[1]}, "
                f"nr={self.params['rho'].shape[-1]}, cutoff={self.r_cutoff:g})")


# ------------------------------------------------------------------ Zhou–Johnson–Wadley
#: The 20 parameters per element of the Zhou–Johnson–Wadley (2004) form, Table III order.
ZHOU_FIELDS = ("re", "fe", "rhoe", "rhos", "alpha", "beta", "A", "B", "kappa", "lam",
               "Fn0", "Fn1", "Fn2", "Fn3", "F0", "F1", "F2", "F3", "eta", "Fe")

#: X. W. Zhou, R. A. Johnson, H. N. G. Wadley, Phys. Rev. B 69, 144113 (2004), Table III.
#: Al's A is 0.314873, the value of the authors' tabulation code (NIST Interatomic
#: Potentials Repository, LAMMPS ``tools/eam_database``); the printed 0.134873 is a typo
#: (it puts the fcc minimum at a = 3.39 Å instead of the fitted 4.05 Å). LAMMPS's revised
#: ``tools/eam_database`` gives Ni another continuation above 1.15 ρe (rhos = 27.562031,
#: eta = 0.445470, Fe = −2.7); both are C¹ at 1.15 ρe and agree below it, so every
#: near-equilibrium property is the same. Pass ``parameters={"Ni": {...}}`` for it.
ZHOU_2004 = {
    "Cu": dict(re=2.556162, fe=1.554485, rhoe=21.175871, rhos=21.175395, alpha=8.127620, beta=4.334731,
               A=0.396620, B=0.548085, kappa=0.308782, lam=0.756515,
               Fn0=-2.170269, Fn1=-0.263788, Fn2=1.088878, Fn3=-0.817603,
               F0=-2.19, F1=0.0, F2=0.561830, F3=-2.100595, eta=0.310490, Fe=-2.186568),
    "Ni": dict(re=2.488746, fe=2.007018, rhoe=27.562015, rhos=27.930410, alpha=8.383453, beta=4.471175,
               A=0.429046, B=0.633531, kappa=0.443599, lam=0.820658,
               Fn0=-2.693513, Fn1=-0.076445, Fn2=0.241442, Fn3=-2.375626,
               F0=-2.70, F1=0.0, F2=0.265390, F3=-0.152856, eta=0.469000, Fe=-2.699486),
    "Al": dict(re=2.863924, fe=1.403115, rhoe=20.418205, rhos=23.195740, alpha=6.613165, beta=3.527021,
               A=0.314873, B=0.365551, kappa=0.379846, lam=0.759692,
               Fn0=-2.807602, Fn1=-0.301435, Fn2=1.258562, Fn3=-1.247604,
               F0=-2.83, F1=0.0, F2=0.622245, F3=-2.488244, eta=0.785902, Fe=-2.824528),
}
#: Ground-state lattice of the tabulated elements (for file headers: a = √2 re in fcc).
_ZHOU_LATTICE = {"Cu": "fcc", "Ni": "fcc", "Al": "fcc"}
#: Default range, in units of the largest re: smooth cutoff between these.
ZHOU_ONSET_OVER_RE = 2.3
ZHOU_CUTOFF_OVER_RE = 2.5


class ZhouEAM(EAMPotential):
    """Analytic EAM of Zhou, Johnson & Wadley, Phys. Rev. B 69, 144113 (2004); Å and eV.

        ρ_a(r)  = f_e exp[−β(r/r_e − 1)] / (1 + (r/r_e − λ)²⁰)
        φ_aa(r) = A exp[−α(r/r_e − 1)] / (1 + (r/r_e − κ)²⁰)
                  − B exp[−β(r/r_e − 1)] / (1 + (r/r_e − λ)²⁰)
        φ_ab(r) = ½ [ρ_b/ρ_a φ_aa + ρ_a/ρ_b φ_bb]
        F(ρ)    = Σ_{i≤3} F_ni (ρ/ρ_n − 1)^i           ρ < ρ_n = 0.85 ρ_e
                  Σ_{i≤3} F_i (ρ/ρ_e − 1)^i            ρ_n ≤ ρ < ρ_0 = 1.15 ρ_e
                  F_e [1 − η ln(ρ/ρ_s)] (ρ/ρ_s)^η       ρ_0 ≤ ρ

    all per element. ``ρ`` and ``φ`` are multiplied by a C² quintic switch from 1 at
    ``r_onset`` to 0 at ``r_cutoff`` (the paper's functions have no cutoff; the default
    ``2.3–2.5 r_e`` changes the fcc cohesive energies by < 1e-6 eV/atom). ``F`` is as
    published: C¹ (C² up to the fit's rounding at ρ_n) at the branch points.

    With :data:`ZHOU_2004` the fcc minimum lies at a = √2 r_e with cohesive energy
    Cu 3.6150 Å, 3.5400 eV; Ni 3.5196 Å, 4.4500 eV; Al 4.0502 Å, 3.5800 eV (the paper's
    fitted Cu and Ni values; tests check them).

    Args:
      elements: species order, e.g. ``("Cu",)`` or ``("Cu", "Ni")``.
      parameters: ``{element: {field: value}}`` adding elements or overriding fields of
        :data:`ZHOU_2004` (fields :data:`ZHOU_FIELDS`).
      r_cutoff, r_onset: smooth cutoff (Å); defaults ``2.5`` and ``2.3`` times the
        largest ``re``. Static settings, not differentiable.

    ``params``: the 20 fields, each a float64 ``(S,)`` array in ``elements`` order.
    :meth:`tabulate` gives the equivalent :class:`EAM` (and LAMMPS/ASE files).

    Raises:
      SpeciesError: an element without published or given parameters.
      ParameterError: missing fields, non-physical values, ``r_onset >= r_cutoff``.
    """

    name = "ZhouEAM"
    ranges = {"re": (0.0, None, True), "fe": (0.0, None, True), "rhoe": (0.0, None, True),
              "rhos": (0.0, None, True), "alpha": (0.0, None, True), "beta": (0.0, None, True),
              "A": (0.0, None, False), "B": (0.0, None, False)}

    def __init__(self, elements: Sequence[str] = ("Cu",), *, parameters: Optional[dict] = None,
                 r_cutoff: Optional[float] = None, r_onset: Optional[float] = None):
        if isinstance(elements, str):
            elements = (elements,)
        self.symbols = tuple(str(e) for e in elements)
        self.n_species = len(self.symbols)
        if self.n_species == 0 or len(set(self.symbols)) < self.n_species:
            raise ParameterError(f"ZhouEAM: elements must be distinct names; got {self.symbols}.")
        parameters = parameters or {}
        table = {}
        for element in self.symbols:
            given = dict(ZHOU_2004.get(element, {}), **parameters.get(element, {}))
            if not given:
                raise SpeciesError(
                    f"ZhouEAM has published parameters for {tuple(ZHOU_2004)}; for {element!r} pass "
                    f"parameters={{{element!r}: {{...}}}} with the fields {ZHOU_FIELDS}.")
            missing = [f for f in ZHOU_FIELDS if f not in given]
            unknown = [f for f in given if f not in ZHOU_FIELDS]
            if missing or unknown:
                raise ParameterError(f"ZhouEAM: parameters of {element!r}: missing {missing}, unknown {unknown}; "
                                     f"the fields are {ZHOU_FIELDS}.")
            table[element] = given
        self.params = {f: jnp.asarray([float(table[e][f]) for e in self.symbols], jnp.float64)
                       for f in ZHOU_FIELDS}
        self._validate_params(self.params)  # before the default range uses r_e
        re_max = max(float(table[e]["re"]) for e in self.symbols)
        self.r_cutoff = float(ZHOU_CUTOFF_OVER_RE * re_max if r_cutoff is None else r_cutoff)
        if r_onset is None:
            r_onset = self.r_cutoff * ZHOU_ONSET_OVER_RE / ZHOU_CUTOFF_OVER_RE
        self.r_onset = float(r_onset)
        if not 0.0 < self.r_onset < self.r_cutoff:
            raise ParameterError(f"ZhouEAM: need 0 < r_onset < r_cutoff; got {self.r_onset}, {self.r_cutoff}.")

    def functions(self, params=None) -> EAMFunctions:
        p = self.params if params is None else params
        onset, cutoff = self.r_onset, self.r_cutoff
        species = range(self.n_species)
        # Each species' functions are evaluated on every point and selected with `where`:
        # with a handful of species this beats gathering 20 parameters per pair (and its
        # scatter-add gradient), and it compiles 3-4x faster.

        def radial(r, s):
            """``(ρ_s, φ_ss)`` without the switch: the attractive term of φ is (B/f_e) ρ."""
            x = r / p["re"][s]
            g = jnp.exp(-p["beta"][s] * (x - 1.0)) / (1.0 + (x - p["lam"][s]) ** 20)
            h = jnp.exp(-p["alpha"][s] * (x - 1.0)) / (1.0 + (x - p["kappa"][s]) ** 20)
            return p["fe"][s] * g, p["A"][s] * h - p["B"][s] * g

        def select(index, values):
            out = values[0]
            for s, value in enumerate(values[1:], start=1):
                out = jnp.where(index == s, value, out)
            return out

        def density_and_pair(r, s_host, s_neighbor):
            f, phi = zip(*(radial(r, s) for s in species))
            switch = quintic_cutoff(r, onset, cutoff)
            # φ_ab = ½ (ρ_b/ρ_a φ_aa + ρ_a/ρ_b φ_bb); for a = b it is φ_aa itself
            rows = [select(s_neighbor, [phi[a] if a == b else 0.5 * (f[b] / f[a] * phi[a] + f[a] / f[b] * phi[b])
                                        for b in species]) for a in species]
            return select(s_neighbor, f) * switch, select(s_host, rows) * switch

        def density(r, s_host, s_neighbor):
            return density_and_pair(r, s_host, s_neighbor)[0]

        def pair(r, s_a, s_b):
            return density_and_pair(r, s_a, s_b)[1]

        def embedding_of(rho, s):
            rhoe = p["rhoe"][s]
            rho_n, rho_0 = 0.85 * rhoe, 1.15 * rhoe
            x = rho / rho_n - 1.0
            low = p["Fn0"][s] + x * (p["Fn1"][s] + x * (p["Fn2"][s] + x * p["Fn3"][s]))
            x = rho / rhoe - 1.0
            mid = p["F0"][s] + x * (p["F1"][s] + x * (p["F2"][s] + x * p["F3"][s]))
            y = jnp.maximum(rho, rho_0) / p["rhos"][s]  # a safe log where the branch is unused
            high = p["Fe"][s] * (1.0 - p["eta"][s] * jnp.log(y)) * y ** p["eta"][s]
            return jnp.where(rho < rho_n, low, jnp.where(rho < rho_0, mid, high))

        def embedding(rho, s):
            return select(s, [embedding_of(rho, t) for t in species])

        return EAMFunctions(density, pair, embedding, density_and_pair)

    def tabulate(self, *, nr: int = 2000, nrho: int = 2000, rho_max: Optional[float] = None,
                 kind: str = "eam/alloy", params=None) -> EAM:
        """This potential as tables on uniform grids, an :class:`EAM` (write it with
        :meth:`EAM.write` for LAMMPS or ASE).

        ``r`` from 0 to ``r_cutoff`` in ``nr`` points; ``ρ`` from 0 to ``rho_max``
        (default ``max(2 max ρ_e, 100)``, as the authors' code) in ``nrho`` points;
        ``kind`` ``"eam/alloy"`` or ``"eam/fs"`` (then ``rho[a, b] = ρ_a`` for every host
        ``b``). The tabulated potential differs from this one by the spline's
        interpolation error, ``O(dr⁴, drho⁴)`` (larger near ρ_0, where ``F''`` jumps).
        """
        kind = _KIND_ALIASES.get(kind, kind)
        if kind not in ("eam/alloy", "eam/fs"):
            raise ParameterError(f"ZhouEAM.tabulate: kind must be 'eam/alloy' or 'eam/fs'; got {kind!r} "
                                 "(funcfl cannot hold an attractive pair term: r·φ = c Z² >= 0).")
        params = self._validate_params(self.params if params is None else params)
        S = self.n_species
        dr = self.r_cutoff / (nr - 1)
        if rho_max is None:
            rho_max = max(2.0 * float(np.max(params["rhoe"])), 100.0)
        drho = float(rho_max) / (nrho - 1)

        @jax.jit  # one program instead of hundreds of eager operations
        def tables(params):
            fns = self.functions(params)
            r = dr * jnp.arange(nr, dtype=jnp.float64)
            rho_grid = drho * jnp.arange(nrho, dtype=jnp.float64)
            r_safe = jnp.where(r > 0, r, dr)  # r·φ(r) at r = 0 is 0 (φ is finite there)
            F = jnp.stack([fns.embedding(rho_grid, a) for a in range(S)])
            dens = jnp.stack([fns.density(r, a, a) for a in range(S)])
            rphi = jnp.stack([jnp.stack([jnp.where(r > 0, r * fns.pair(r_safe, a, b), 0.0) for b in range(S)])
                              for a in range(S)])
            return F, dens, rphi

        F, dens, rphi = (np.asarray(t) for t in tables(params))
        idx = np.arange(S)
        rho_table = dens if kind == "eam/alloy" else np.repeat(dens[:, None, :], S, axis=1)
        lattice = [_ZHOU_LATTICE.get(e, "none") for e in self.symbols]
        return EAM({"F": F, "rho": rho_table, "rphi": rphi}, symbols=self.symbols, drho=drho, dr=dr,
                   cutoff=self.r_cutoff, kind=kind,
                   numbers=[atomic_numbers.get(e, 0) for e in self.symbols],
                   masses=[float(atomic_masses[atomic_numbers[e]]) if e in atomic_numbers else 0.0
                           for e in self.symbols],
                   lattice_constants=[np.sqrt(2.0) * float(params["re"][a]) if lattice[a] == "fcc" else 0.0
                                      for a in idx],
                   lattice_types=lattice,
                   comments=("Zhou, Johnson, Wadley, Phys. Rev. B 69, 144113 (2004), tabulated by mdsens",
                             f"elements {' '.join(self.symbols)}; "
                             f"smooth cutoff {self.r_onset:g}-{self.r_cutoff:g} A",
                             f"grid nrho={nrho} drho={drho:.6g} nr={nr} dr={dr:.6g}"))

    def __repr__(self):
        return f"ZhouEAM(elements={self.symbols}, r_onset={self.r_onset:g}, r_cutoff={self.r_cutoff:g})"
