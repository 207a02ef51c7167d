"""The ``mdsens`` command.

    mdsens info FILE
    mdsens relax FILE --potential lj --param sigma=3.4 --param epsilon=0.0104 \\
                 [--fmax 1e-6] [--max-steps N] [--method lbfgs] [--relax-cell] [-o OUT [--force]]
    mdsens sensitivity FILE --potential lj --param ... [--wrt sigma,epsilon] [--csv F] [--json F] [--no-progress]
    mdsens demo [-o DIR] [--no-progress]

Every error mdsens raises on purpose prints one line ``mdsens: error: ...`` on stderr
and exits with a documented status (:data:`EXIT_CODES`): 1 a relaxation did not
converge (its honest numbers are printed), 2 a usage or input error (arguments, files,
structures, potentials, options), 3 the structure is a saddle point, 4 a numerical
failure (a linear solve, NaN). ``main(argv)`` returns the status, so tests call it.

``mdsens demo`` is a list of *sections* (:data:`DEMO_SECTIONS`), each a function
``section(ctx)`` run in order with a shared :class:`DemoContext`; the first relaxes the
bundled structures and stores the results in ``ctx.results``. Later features append a
section (e.g. sensitivities of those relaxed structures) without touching the others.
While it runs, a bar on stderr names the section and the structure at hand
(:meth:`DemoContext.stage`; shown when stderr is a terminal, never with ``--no-progress``).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, List, Optional, TextIO

#: Exit statuses of the command.
EXIT_CODES = {
    "ok": 0,
    "not converged": 1,
    "usage or input error": 2,
    "saddle point": 3,
    "numerical failure": 4,
    "interrupted": 130,
}


#: Where compiled programs are kept between runs (JAX's persistent compilation cache).
CACHE_DIR_ENV = "MDSENS_CACHE_DIR"
#: Set to 0 to run without the persistent compilation cache.
CACHE_SWITCH_ENV = "MDSENS_COMPILATION_CACHE"


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


def compilation_cache_dir() -> Optional[str]:
    """The persistent compilation cache of the command, or ``None`` when it is switched
    off (``MDSENS_COMPILATION_CACHE=0``): ``$MDSENS_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/mdsens/xla`` (``~/.cache/mdsens/xla``)."""
    if os.environ.get(CACHE_SWITCH_ENV, "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get(CACHE_DIR_ENV) or os.path.join(root, "mdsens", "xla")


def _use_compilation_cache(enabled: bool) -> None:
    """Turn on JAX's persistent compilation cache for this process (the command only: the
    library never changes JAX's configuration beyond float64). A second ``mdsens demo``
    then skips most compilation."""
    path = compilation_cache_dir() if enabled else None
    if path is None:
        return
    import jax

    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return  # an unwritable cache only costs time
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def _exit_code(error) -> int:
    """The status of an mdsens error (see :data:`EXIT_CODES`)."""
    from mdsens import errors
    from mdsens.md import errors as md_errors

    if isinstance(error, md_errors.SaddlePointError):
        return EXIT_CODES["saddle point"]
    numerical = (errors.LinearSolveError, errors.RootError, errors.NullSpaceError, errors.PrecisionError,
                 md_errors.RelaxError)
    if isinstance(error, numerical):
        return EXIT_CODES["numerical failure"]
    return EXIT_CODES["usage or input error"]


# ----------------------------------------------------------------------- potentials
@dataclasses.dataclass(frozen=True)
class PotentialSpec:
    """How the command line builds a potential: name, constructor, units, help."""

    name: str
    factory: Callable
    energy_unit: str
    length_unit: str
    help: str


def _tersoff(file=None, **kwargs):
    from mdsens.md.potentials import Tersoff

    if kwargs:
        raise TypeError(f"unexpected parameters {sorted(kwargs)}")
    return Tersoff.silicon() if file is None else Tersoff.from_lammps(file)


def _potential_specs() -> dict:
    from mdsens.md import potentials as P

    specs = [
        PotentialSpec("lj", P.LennardJones, "eV", "Å", "Lennard-Jones, ASE smooth cutoff: sigma, epsilon, r_cutoff, r_onset"),
        PotentialSpec("soft-sphere", P.SoftSphere, "", "", "soft spheres, reduced units: sigma, epsilon, alpha"),
        PotentialSpec("morse", P.Morse, "eV", "Å", "Morse, ASE conventions: epsilon, r0, rho0, rcut1, rcut2"),
        PotentialSpec("sw", P.StillingerWeber, "eV", "Å", "Stillinger-Weber, silicon defaults"),
        PotentialSpec("tersoff", _tersoff, "eV", "Å", "Tersoff Si(C), shipped (or --param file=PATH)"),
    ]
    return {s.name: s for s in specs}


POTENTIAL_ALIASES = {"lennard-jones": "lj", "softsphere": "soft-sphere", "soft_sphere": "soft-sphere",
                     "stillinger-weber": "sw"}


def parse_param(text: str):
    """``"key=value"`` -> ``(key, value)``; value is a float, or ``A:1.0,B:1.4`` (per species),
    or (for ``file``) a path.

    Raises:
      CLIError: not of the form ``key=value`` or a value that is not a number.
    """
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key or not value:
        raise CLIError(f"--param {text!r}: expected key=value, e.g. --param sigma=3.4")
    if key == "file":
        return key, value
    try:
        if ":" in value:
            out = {}
            for item in value.split(","):
                sym, _, num = item.partition(":")
                out[sym.strip()] = float(num)
            return key, out
        return key, float(value)
    except ValueError:
        raise CLIError(
            f"--param {text!r}: {value!r} is not a number (use key=1.5, or key=A:1.0,B:1.4 "
            "for per-species values)"
        ) from None


def build_potential(name: str, params: List[str]):
    """``(PotentialSpec, potential)`` from a name and ``key=value`` strings.

    Raises:
      CLIError: unknown potential, malformed or unknown parameter, invalid values.
    """
    from mdsens.md.potentials import PotentialError

    specs = _potential_specs()
    key = POTENTIAL_ALIASES.get(name.lower(), name.lower())
    if key not in specs:
        raise CLIError(f"unknown potential {name!r}; choose one of: {', '.join(specs)}")
    spec = specs[key]
    kwargs = dict(parse_param(p) for p in params)
    if any(isinstance(v, dict) for v in kwargs.values()) and key in ("lj", "soft-sphere", "morse"):
        symbols = sorted({s for v in kwargs.values() if isinstance(v, dict) for s in v})
        kwargs.setdefault("symbols", tuple(symbols))
    try:
        return spec, spec.factory(**kwargs)
    except TypeError as err:
        allowed = [p for p in inspect.signature(spec.factory).parameters if p not in ("self", "symbols", "kwargs")]
        raise CLIError(
            f"potential {key!r} does not take {sorted(set(kwargs) - set(allowed) - {'symbols'}) or err}; "
            f"its parameters are: {', '.join(allowed)}"
        ) from None
    except (PotentialError, OSError) as err:
        raise CLIError(f"potential {key!r}: {err}") from None


# ------------------------------------------------------------------------ structures
def load(path: str):
    """Read a structure, turning a missing file into :class:`CLIError`."""
    from mdsens.md.io import read

    try:
        return read(path)
    except FileNotFoundError as err:
        raise CLIError(str(err).rstrip(".") + ".") from None


def _species_summary(system) -> str:
    import numpy as np

    counts = np.bincount(np.asarray(system.species), minlength=len(system.symbols))
    return ", ".join(f"{s}: {int(c)}" for s, c in zip(system.symbols, counts) if c)


def _units(spec: Optional[PotentialSpec]):
    if spec is None or not spec.energy_unit:
        return "", "", ""
    return f" {spec.energy_unit}", f" {spec.energy_unit}/{spec.length_unit}", f" {spec.energy_unit}/{spec.length_unit}^3"


# --------------------------------------------------------------------------- commands
def cmd_info(args, out: TextIO) -> int:
    import numpy as np

    system = load(args.file)
    kind = "periodic" if system.pbc else "free (no cell)"
    lines = [
        ("file", args.file),
        ("atoms", str(system.n_atoms)),
        ("dimension", f"{system.dim}D"),
        ("species", _species_summary(system)),
        ("boundary", kind),
    ]
    if system.pbc:
        cell = np.asarray(system.cell)
        rows = ["[" + " ".join(f"{x:10.5f}" for x in row) + "]" for row in cell]
        lines.append(("cell", rows[0]))
        lines += [("", r) for r in rows[1:]]
        lengths = np.linalg.norm(cell, axis=1)
        lines.append(("lengths", " ".join(f"{x:.5f}" for x in lengths)))
        volume = float(system.volume)
        unit = "Å^3" if system.dim == 3 else "(length unit)^2"
        lines.append(("volume" if system.dim == 3 else "area", f"{volume:.6g} {unit}"))
        lines.append(("number density", f"{system.n_atoms / volume:.6g} per {unit}"))
        mass = _mass_amu(system)
        if mass is not None and system.dim == 3:
            from ase.units import kg

            grams_per_cm3 = mass / kg * 1e3 / (volume * 1e-24)
            lines.append(("mass density", f"{grams_per_cm3:.6g} g/cm^3"))
    else:
        R = np.asarray(system.positions)
        extent = R.max(axis=0) - R.min(axis=0)
        lines.append(("extent", " ".join(f"{x:.5f}" for x in extent) + " (bounding box)"))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}", file=out)
    return 0


def _mass_amu(system) -> Optional[float]:
    from ase.data import atomic_masses, atomic_numbers

    try:
        masses = [atomic_masses[atomic_numbers[s]] for s in system.chemical_symbols]
    except KeyError:
        return None  # reduced-unit labels
    return float(sum(masses))


def _relax_quietly(system, pot, **kwargs):
    """``relax`` with warnings turned into returned strings (printed as one line each)."""
    from mdsens.md.relaxation import relax

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        result = relax(system, pot, **kwargs)
        elapsed = time.perf_counter() - t0
    notes = [str(w.message) for w in caught if issubclass(w.category, Warning)
             and not issubclass(w.category, (FutureWarning, DeprecationWarning))]
    return result, elapsed, notes


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def cmd_relax(args, out: TextIO, err: TextIO) -> int:
    import numpy as np

    if args.output and not args.force and _same_file(args.output, args.file):
        raise CLIError(f"-o {args.output} is the input file; the relaxation would overwrite it. Choose "
                       "another output file, or pass --force to replace the input.")
    system = load(args.file)
    spec, pot = build_potential(args.potential, args.param)
    e_unit, f_unit, s_unit = _units(spec)
    result, elapsed, notes = _relax_quietly(
        system, pot, fmax=args.fmax, max_steps=args.max_steps, minimizer=args.method,
        relax_cell=args.relax_cell, progress=False if args.no_progress else None,
    )
    energy = float(result.energy)
    rows = [
        ("structure", f"{args.file} (N={system.n_atoms}, {'periodic' if system.pbc else 'free'}, {_species_summary(system)})"),
        ("potential", f"{type(pot).__name__} ({spec.name})"),
        ("method", args.method + (" + cell" if args.relax_cell else "")),
        ("energy", f"{energy:.10g}{e_unit}  ({energy / system.n_atoms:.10g}{e_unit}/atom)"),
        ("fmax", f"{result.fmax:.3e}{f_unit}  (target {args.fmax:g})"),
        ("steps", str(result.steps)),
        ("converged", "yes" if result.converged else "NO"),
        ("time", f"{elapsed:.2f} s (including JIT compilation)"),
    ]
    if args.relax_cell and result.stress is not None:
        rows.insert(5, ("max |stress|", f"{float(np.max(np.abs(np.asarray(result.stress)))):.3e}{s_unit}"))
        cell = np.asarray(result.system.cell)
        rows.insert(6, ("cell lengths", " ".join(f"{x:.6f}" for x in np.linalg.norm(cell, axis=1))))
    if args.output:
        from mdsens.md.io import write

        write(args.output, result.system, info={"energy": energy})
        rows.append(("written", args.output))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=out)
    for note in notes:
        print(f"mdsens: warning: {note}", file=err)
    return 0 if result.converged else 1


# ------------------------------------------------------------------------------- demo
@dataclasses.dataclass(frozen=True)
class DemoCase:
    """One bundled structure relaxed by ``mdsens demo``."""

    label: str
    file: str  # a bundled file, mdsens.data.path(file)
    potential: str  # a name for the table
    make_potential: Callable
    options: dict


def demo_cases() -> List[DemoCase]:
    from mdsens.md import potentials as P

    return [
        DemoCase("LJ13 Ar cluster", "lj13_ar.xyz", "LJ Ar (rc = 3σ)",
                 lambda: P.LennardJones(sigma=3.4, epsilon=0.0104), dict(fmax=1e-6)),
        DemoCase("fcc Ar + vacancy", "ar_fcc_vacancy.xyz", "LJ Ar (rc = 3σ)",
                 lambda: P.LennardJones(sigma=3.4, epsilon=0.0104), dict(fmax=1e-6)),
        DemoCase("diamond Si (+cell)", "si_diamond_2x2x2.vasp", "Stillinger-Weber",
                 lambda: P.StillingerWeber(), dict(fmax=1e-5, relax_cell=True)),
        DemoCase("diamond Si (+cell)", "si_diamond_2x2x2.vasp", "Tersoff Si(C)",
                 lambda: P.Tersoff.silicon(), dict(fmax=1e-5, relax_cell=True)),
        DemoCase("2D soft spheres", "soft_spheres_2d.xyz", "SoftSphere 1.0/1.4",
                 lambda: P.SoftSphere(sigma={"A": 1.0, "B": 1.4}), dict(fmax=1e-8, max_steps=50_000)),
    ]


@dataclasses.dataclass
class DemoContext:
    """What demo sections share: options, output stream, and the relaxations done.

    ``cases``: the structures to relax (default :func:`demo_cases`); ``results``: list of
    ``(DemoCase, System start, potential, RelaxResult, seconds)``; ``stages``: the
    progress bar over the sections (:class:`mdsens.md.progress.Stages`, set by
    :func:`cmd_demo`).
    """

    args: argparse.Namespace
    out: TextIO
    err: TextIO
    cases: list = dataclasses.field(default_factory=list)
    results: list = dataclasses.field(default_factory=list)
    failed: bool = False
    stages: object = None
    section: str = ""

    def stage(self, detail: str) -> None:
        """Say on the progress bar what the running section works on now (e.g. a structure)."""
        if self.stages is not None:
            self.stages.describe(f"{self.section}: {detail}")


def demo_relaxations(ctx: DemoContext) -> None:
    """Section 1: relax every bundled structure and print one table row each."""
    from mdsens.md.io import write

    print("Relaxation of the bundled structures (mdsens/data, see its README.md)", file=ctx.out)
    print("criterion: max atomic force norm < fmax (ASE's), confirmed with fresh neighbor lists; "
          "+cell: zero-stress cell too", file=ctx.out)
    headers = ["structure", "potential", "N", "E/atom", "fmax", "target", "steps", "converged", "time [s]"]
    rows = []
    from mdsens import data

    for case in ctx.cases:
        ctx.stage(f"{case.label}, {case.potential}")
        system = load(str(data.path(case.file)))
        pot = case.make_potential()
        result, elapsed, notes = _relax_quietly(system, pot, progress=False, **case.options)
        for note in notes:
            print(f"mdsens: warning: {case.label}: {note}", file=ctx.err)
        ctx.results.append((case, system, pot, result, elapsed))
        ctx.failed |= not result.converged
        rows.append([
            case.label, case.potential, system.n_atoms,
            f"{float(result.energy) / system.n_atoms:.7g}", f"{result.fmax:.1e}",
            f"{case.options['fmax']:.0e}", result.steps, "yes" if result.converged else "NO",
            f"{elapsed:.2f}",
        ])
        if ctx.args.output_dir:
            _make_dir(ctx.args.output_dir)
            stem = Path(case.file).stem
            tag = case.potential.split()[0].lower().replace("-", "_")
            write(os.path.join(ctx.args.output_dir, f"{stem}_{tag}_relaxed.xyz"), result.system,
                  info={"energy": float(result.energy)})
    print(_table(headers, rows), file=ctx.out)
    print("E/atom in eV (soft spheres: reduced units); time includes JIT compilation.", file=ctx.out)


#: What ``mdsens demo`` differentiates, by structure label: parameters of each potential.
_DEMO_SENSITIVITIES = {
    "LJ13 Ar cluster": "sigma,epsilon",
    "fcc Ar + vacancy": "sigma,epsilon",
    "2D soft spheres": "sigma",
}


def demo_sensitivities(ctx: DemoContext) -> None:
    """Section 2: implicit derivatives of the relaxed structures, and elastic constants."""
    from mdsens.md.elastic import elastic_constants
    from mdsens.md.sensitivity import sensitivity

    print("Sensitivities of the relaxed structures (implicit differentiation, forward mode)", file=ctx.out)
    print("dE/dtheta: total derivative of the relaxed energy; partial_E/dtheta: the envelope-theorem "
          "check; dR/dtheta: gauge without net translation (and rotation for clusters)", file=ctx.out)
    for case, _, pot, result, _ in ctx.results:
        wrt = _DEMO_SENSITIVITIES.get(case.label)
        if wrt is None or not result.converged:
            continue
        ctx.stage(f"{case.label}, {case.potential}")
        t0 = time.perf_counter()
        sens = sensitivity(result, pot, wrt=wrt, progress=False)
        print(f"\n{case.label} ({case.potential}), {time.perf_counter() - t0:.2f} s incl. compilation", file=ctx.out)
        print(sens.table(), file=ctx.out)
    for case, _, pot, result, _ in ctx.results:
        if case.potential == "Stillinger-Weber" and result.converged:
            ctx.stage(f"elastic constants, {case.label}, {case.potential}")
            t0 = time.perf_counter()
            constants = elastic_constants(result, pot, progress=False).to_gpa()
            print(f"\nElastic constants, {case.label} with {case.potential} "
                  f"({time.perf_counter() - t0:.2f} s): internal strain lowers C44 from clamped to relaxed",
                  file=ctx.out)
            print(constants.table(), file=ctx.out)


def demo_figure(ctx: DemoContext) -> None:
    """Section 3: the paper's arrow figure, dR*/dσ_A of the relaxed 2D packing."""
    import numpy as np

    from mdsens.md.sensitivity import sensitivity
    from mdsens.plot import sensitivity_arrows

    for case, _, pot, result, _ in ctx.results:
        if case.label != "2D soft spheres" or not result.converged:
            continue
        direction = {k: np.zeros(np.shape(v)) for k, v in pot.params.items()}
        direction["sigma"] = np.array([[1.0, 0.5], [0.5, 0.0]])  # σ_A grows by 1 (additive mixing)
        sens = sensitivity(result, pot, wrt={"sigma_A": direction}, progress=False)
        fig = sensitivity_arrows(result.system, sens.dpositions[0], radii={"A": 0.5, "B": 0.7},
                                 label=r"$\mathrm{d}R^*/\mathrm{d}\sigma_A$", length_unit=r"$\sigma_A$",
                                 displacement_unit="",
                                 title=r"2D packing: response to the small diameter $\sigma_A$")
        path = Path(ctx.args.output_dir or "out") / "packing_sensitivity.png"
        _make_dir(path.parent)
        from mdsens.md.io import write_atomically

        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        print(f"\nArrow figure (dR*/dσ_A, as in Blondel et al. 2022): {path}", file=ctx.out)


#: Sections of ``mdsens demo``, run in order. Append ``f(ctx: DemoContext) -> None``.
DEMO_SECTIONS: List[Callable[[DemoContext], None]] = [demo_relaxations, demo_sensitivities, demo_figure]


def _make_dir(path) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create the output directory '{path}': {exc.strerror or exc}.") from None


def cmd_sensitivity(args, out: TextIO, err: TextIO) -> int:
    """Relax FILE, then print dR*/dθ and dE*/dθ for the parameters in --wrt."""
    from mdsens.md.sensitivity import sensitivity

    system = load(args.file)
    _, pot = build_potential(args.potential, args.param)
    result, _, notes = _relax_quietly(system, pot, fmax=args.fmax, max_steps=args.max_steps, progress=False)
    for note in notes:
        print(f"mdsens: warning: {note}", file=err)
    sens = sensitivity(result, pot, wrt=args.wrt, strict=args.strict, progress=False if args.no_progress else None)
    print(sens.table(), file=out)
    if args.csv:
        sens.to_csv(args.csv)
        print(f"written {args.csv}", file=out)
    if args.json:
        sens.to_json(args.json, positions=True)
        print(f"written {args.json}", file=out)
    return 0 if result.converged else 1


def cmd_demo(args, out: TextIO, err: TextIO, *, cases: Optional[List[DemoCase]] = None,
             sections: Optional[List[Callable[[DemoContext], None]]] = None) -> int:
    """Run the demo's ``sections`` (default :data:`DEMO_SECTIONS`) on ``cases`` (default
    :func:`demo_cases`); returns the exit status."""
    from mdsens.md.progress import Stages

    ctx = DemoContext(args=args, out=out, err=err, cases=demo_cases() if cases is None else list(cases))
    sections = DEMO_SECTIONS if sections is None else list(sections)
    # the bar goes to the command's stderr, next to its warnings, and only to a terminal
    progress = False if getattr(args, "no_progress", False) else None
    with Stages(progress, "mdsens demo", len(sections), stream=err) as ctx.stages:
        for i, section in enumerate(sections):
            if i:
                print(file=out)
            ctx.section = _section_title(section)
            ctx.stages.start(ctx.section)
            section(ctx)
    ctx.stages = None
    return 1 if ctx.failed else 0


def _section_title(section) -> str:
    """A demo section's name on the progress bar: ``demo_relaxations`` -> ``relaxations``."""
    name = getattr(section, "__name__", "section")
    return (name[len("demo_"):] if name.startswith("demo_") else name).replace("_", " ")


def _table(headers, rows) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = ["l", "l"] + ["r"] * (len(headers) - 2)

    def line(r):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


# ----------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` controls the exit status."""

    def error(self, message):
        raise CLIError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mdsens", description="Relax atomistic structures and study their sensitivities (JAX, jax-md, ASE).")
    parser.add_argument("--no-compilation-cache", action="store_true",
                        help="do not keep compiled programs between runs (also: MDSENS_COMPILATION_CACHE=0; "
                             "the cache lives in $MDSENS_CACHE_DIR or ~/.cache/mdsens/xla)")
    sub = parser.add_subparsers(dest="command", metavar="{relax,info,sensitivity,demo}", parser_class=_Parser)

    p = sub.add_parser("relax", help="relax a structure file with a potential")
    p.add_argument("file", help="structure file (any format ASE reads: xyz, extxyz, POSCAR, cif, ...)")
    p.add_argument("--potential", "-p", required=True,
                   help="lj | soft-sphere | morse | sw | tersoff")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="potential parameter, repeatable (e.g. sigma=3.4; per species: sigma=A:1.0,B:1.4)")
    p.add_argument("--fmax", type=float, default=1e-6, help="force criterion, max atomic |F| (default 1e-6)")
    p.add_argument("--max-steps", type=int, default=20_000, help="iteration budget (default 20000)")
    p.add_argument("--method", choices=["lbfgs", "fire", "gradient_descent"], default="lbfgs")
    p.add_argument("--relax-cell", action="store_true", help="also relax the cell to zero stress")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.add_argument("-o", "--output", help="write the relaxed structure (format from the name)")
    p.add_argument("--force", action="store_true", help="allow -o to replace the input file")

    p = sub.add_parser("info", help="print a summary of a structure file")
    p.add_argument("file")

    p = sub.add_parser("sensitivity", help="relax a structure, then print dR*/dθ and dE*/dθ")
    p.add_argument("file", help="structure file (any format ASE reads)")
    p.add_argument("--potential", "-p", required=True, help="lj | soft-sphere | morse | sw | tersoff")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="potential parameter, repeatable (as for `mdsens relax`)")
    p.add_argument("--wrt", default="params",
                   help="comma-separated parameter names or elements (sigma,epsilon; sigma[0,1]), "
                        "'params' (all) or 'cell' (Voigt strain)")
    p.add_argument("--fmax", type=float, default=1e-8, help="force criterion of the relaxation (default 1e-8)")
    p.add_argument("--max-steps", type=int, default=50_000)
    p.add_argument("--strict", action="store_true", help="refuse a structure that is not relaxed tightly")
    p.add_argument("--no-progress", action="store_true", help="never show the progress bar of the sensitivity")
    p.add_argument("--csv", help="also write the table as CSV")
    p.add_argument("--json", help="also write the table (and dR*/dθ) as JSON")

    p = sub.add_parser("demo", help="the demo: relax the bundled structures, differentiate them, draw a figure")
    p.add_argument("-o", "--output-dir", help="also write the relaxed structures here")
    p.add_argument("--no-progress", action="store_true", help="never show the progress bar of the sections")
    return parser


def main(argv: Optional[List[str]] = None, out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    """Run the command line; returns the exit status (:data:`EXIT_CODES`)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(out)
            return 2
        import mdsens  # noqa: F401  (float64 before any physics)

        _use_compilation_cache(not args.no_compilation_cache)

        if args.command == "info":
            return cmd_info(args, out)
        if args.command == "relax":
            return cmd_relax(args, out, err)
        if args.command == "sensitivity":
            return cmd_sensitivity(args, out, err)
        return cmd_demo(args, out, err)
    except CLIError as exc:
        print(f"mdsens: error: {exc}", file=err)
        return EXIT_CODES["usage or input error"]
    except Exception as exc:
        from mdsens.errors import MdsensError

        if not isinstance(exc, MdsensError):
            raise
        message = " ".join(str(exc).split())
        print(f"mdsens: error: {type(exc).__name__}: {message}", file=err)
        return _exit_code(exc)
    except KeyboardInterrupt:
        print("mdsens: interrupted", file=err)
        return 130


if __name__ == "__main__":
    sys.exit(main())
