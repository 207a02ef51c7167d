"""Reading and writing structures: any format ASE knows, plus 2D reduced-unit systems.

* :func:`read` goes through ``ase.io.read`` (extxyz, POSCAR, CIF, LAMMPS data, ...) and
  returns a :class:`~mdsens.md.system.System`; ``.npz`` files written by :func:`write`
  are read directly.
* :func:`write` goes through ``ase.io.write``, except for two cases ASE cannot hold
  losslessly:

  - **extxyz** (``.xyz``/``.extxyz``): ASE prints positions with ``%16.8f`` (10⁻⁸ Å), so
    mdsens writes the extended-XYZ text itself with 17 significant digits (bit-exact
    float64 round trip). The file is standard extxyz and ``ase.io.read`` reads it.
  - **2D systems and non-element labels** (e.g. a binary soft-sphere mixture with species
    ``("A", "B")`` in reduced units): ASE ``Atoms`` are 3D and need chemical symbols. In
    extxyz they are stored as dummy atoms ``X`` with a ``z = 0`` coordinate, an integer
    ``species_index`` column and the info flags ``mdsens_dim`` / ``mdsens_symbols``, which
    :func:`read` turns back into the original System (ASE still reads the file, as 3D
    dummy atoms). ``.npz`` holds the arrays as they are (``positions``, ``cell``,
    ``species``, ``symbols``, ``pbc``).

Round trips through extxyz, POSCAR and npz are lossless for positions, cell, pbc and
symbols. CIF files are read (they wrap atoms into the cell, as CIF does); a CIF with
partially occupied sites is refused (mdsens needs an ordered structure).

Every write goes to a temporary file in the target's directory, renamed into place only
when complete (:func:`write_atomically`): a failed write never truncates or replaces an
existing file.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from typing import Callable, Optional, Sequence

import numpy as np

from mdsens.errors import MissingFileError
from mdsens.md.errors import StructureError, StructureFileError
from mdsens.md.system import System

__all__ = ["read", "write", "write_atomically", "write_text_atomically"]

_EXTXYZ_FORMATS = {"extxyz", "xyz"}
_EXTXYZ_SUFFIXES = (".xyz", ".extxyz")


def _is_npz(path: str, format: Optional[str]) -> bool:
    return format == "npz" or (format is None and str(path).lower().endswith(".npz"))


def _is_extxyz(path: str, format: Optional[str]) -> bool:
    if format is not None:
        return format in _EXTXYZ_FORMATS
    return str(path).lower().endswith(_EXTXYZ_SUFFIXES)


# --------------------------------------------------------------------------- read
def read(path, index=-1, symbols: Optional[Sequence[str]] = None, format: Optional[str] = None):
    """Read a structure file into a :class:`System`.

    Args:
      path: file name. The format is guessed by ASE from the name/content unless
        ``format`` is given (any ``ase.io`` format name, or ``"npz"``).
      index: which frame of a multi-frame file: an int (default ``-1``, the last frame),
        or a slice / ASE index string such as ``":"`` to get a list of Systems.
      symbols: optional species ordering (e.g. ``("Si",)``), see ``System.from_ase``;
        default: sorted unique chemical symbols.
      format: optional explicit format.

    Returns:
      A ``System`` (Å, positions ``(N, d)``), or a list of them for a slice ``index``.

    Raises:
      MissingFileError: ``path`` does not exist (a ``FileNotFoundError``).
      StructureFileError: ASE (or numpy) could not parse the file; the message includes
        what the reader said.
      StructureError: the structure itself is unusable (e.g. mixed pbc, zero-volume cell).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"structure file '{path}' does not exist.")
    if os.path.isdir(path):
        raise StructureFileError(f"'{path}' is a directory, not a structure file.")
    if _is_npz(path, format):
        if not (isinstance(index, int) and index in (0, -1)):
            raise StructureFileError(f"'{path}' is a single-structure .npz file; use index=-1.")
        return _read_npz(path, symbols)

    import ase.io

    try:
        images = ase.io.read(path, index=index, format=format)
    except (StopIteration, IndexError):
        raise StructureFileError(
            f"'{path}' has no frame index={index!r} ({_frame_count(path, format)}); use an index "
            "within the file (-1 is the last frame, ':' reads all)."
        ) from None
    except Exception as err:  # ASE raises many types; the user needs the path and reason
        reason = f"{type(err).__name__}: {err}".strip()
        raise StructureFileError(
            f"could not read '{path}' as a structure ({reason}). ASE guesses the format from "
            "the file name and content; pass format=... (an ase.io format name) if it is "
            "unusual."
        ) from err
    if isinstance(images, list):
        return [_from_atoms(atoms, symbols, path) for atoms in images]
    return _from_atoms(images, symbols, path)


def _frame_count(path, format) -> str:
    import ase.io

    try:
        return f"it has {len(ase.io.read(path, index=':', format=format))} frame(s)"
    except Exception:  # the count is only for the message
        return "its frames could not be counted"


def _from_atoms(atoms, symbols, path) -> System:
    if len(atoms) == 0:
        raise StructureFileError(f"'{path}' contains a structure with no atoms.")
    info = atoms.info
    partial = {site: occ for site, occ in dict(info.get("occupancy") or {}).items()
               if not math.isclose(sum(occ.values()), 1.0) or len(occ) > 1}
    if partial:
        site, occ = next(iter(partial.items()))
        raise StructureFileError(
            f"'{path}' has {len(partial)} partially occupied site(s) (e.g. site {site}: {occ}); a "
            "relaxation needs an ordered structure with one atom per site. Build an ordered "
            "supercell (e.g. with pymatgen's OrderDisorderedStructureTransformation), or edit the "
            "file to the species you mean."
        )
    if "mdsens_dim" in info:
        return _from_flagged_atoms(atoms, path)
    try:
        return System.from_ase(atoms, symbols=symbols)
    except StructureError as err:
        raise type(err)(f"{path}: {err}") from err


def _from_flagged_atoms(atoms, path) -> System:
    """Undo the extxyz encoding of 2D / non-element systems (see the module docstring)."""
    dim = int(atoms.info["mdsens_dim"])
    names = str(atoms.info.get("mdsens_symbols", "")).split()
    if "species_index" not in atoms.arrays or dim not in (2, 3) or not names:
        raise StructureFileError(
            f"'{path}' has the mdsens_dim flag but lacks the 'species_index' column or "
            "mdsens_symbols; it was not written by mdsens.write."
        )
    pbc = bool(np.asarray(atoms.pbc)[:dim].all())
    cell = np.asarray(atoms.cell.array, np.float64)[:dim, :dim] if pbc else None
    return System(
        positions=np.asarray(atoms.positions, np.float64)[:, :dim],
        cell=cell,
        species=np.asarray(atoms.arrays["species_index"], np.int32),
        symbols=tuple(names),
        pbc=pbc,
    )


def _read_npz(path, symbols) -> System:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as err:
        raise StructureFileError(f"could not read '{path}' as .npz ({type(err).__name__}: {err}).") from err
    missing = {"positions", "species", "symbols", "pbc"} - set(arrays)
    if missing:
        raise StructureFileError(
            f"'{path}' lacks the arrays {sorted(missing)}; an mdsens .npz holds positions, "
            "cell (if periodic), species, symbols and pbc (see mdsens.md.io.write)."
        )
    stored = tuple(str(s) for s in arrays["symbols"].tolist())
    species = np.asarray(arrays["species"], np.int32)
    if symbols is not None:
        symbols = tuple(symbols)
        extra = sorted(set(stored[i] for i in np.unique(species)) - set(symbols))
        if extra:
            raise StructureError(f"{path}: contains symbols {extra} that are not in symbols={symbols}.")
        remap = np.array([symbols.index(s) if s in symbols else -1 for s in stored], np.int32)
        species, stored = remap[species], symbols
    cell = arrays.get("cell")
    return System(
        positions=arrays["positions"],
        cell=None if cell is None or cell.size == 0 else cell,
        species=species,
        symbols=stored,
        pbc=bool(arrays["pbc"]),
    )


# -------------------------------------------------------------------------- write
def write_atomically(path, write: Callable[[str], None]) -> None:
    """Run ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``.

    The temporary name keeps ``path``'s suffix. On any error the temporary file is
    removed and ``path`` is left as it was.

    Raises:
      StructureFileError: the directory does not exist or is not writable.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StructureFileError(f"cannot write '{path}': the directory '{directory}' does not exist.")
    if os.path.isdir(path):
        raise StructureFileError(f"cannot write '{path}': it is a directory.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".mdsens-", suffix="-" + os.path.basename(path), dir=directory)
    except OSError as err:
        raise StructureFileError(f"cannot write '{path}': {err.strerror or err}.") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _file_mode(path) -> int:
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomically(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`write_atomically`."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)

    write_atomically(path, write)


def _checked_info(info) -> dict:
    """Scalar extxyz metadata that the extxyz reader reads back as written, or an error."""
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise StructureFileError(f"info must be a dict of scalar metadata; got {type(info).__name__}.")
    for key, value in info.items():
        if not isinstance(key, str) or not key or any(c.isspace() or c in '="\'' for c in key):
            raise StructureFileError(
                f"info key {key!r} cannot be stored in an extxyz comment line: keys must be non-empty "
                "strings without spaces, '=' or quotes."
            )
        if key in ("Lattice", "Properties", "pbc", "mdsens_dim", "mdsens_symbols"):
            raise StructureFileError(f"info key {key!r} is reserved by the extxyz format; rename it.")
        ok = isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Real) and math.isfinite(value))
        ok = ok or (isinstance(value, str) and value and not any(c in value for c in '\n\r"\\'))
        if not ok:
            raise StructureFileError(
                f"info[{key!r}] = {value!r} cannot be stored so that readers get it back: values must be "
                "finite numbers, booleans, or non-empty strings without newlines, quotes or backslashes."
            )
    return dict(info)


def write(path, system: System, format: Optional[str] = None, info: Optional[dict] = None) -> None:
    """Write ``system`` to ``path``, atomically (see the module docstring).

    Args:
      path: output file name; the format is guessed from it unless ``format`` is given.
      system: the structure.
      format: any ``ase.io`` format name (``"extxyz"``, ``"vasp"``, ``"cif"``, ...), or
        ``"npz"``.
      info: optional scalar metadata (e.g. ``{"energy": -0.58}``) stored in the extxyz
        comment line; ignored by other formats.

    Raises:
      StructureFileError: the format cannot hold this system (a 2D or non-element system
        in a format other than extxyz/npz), metadata that would not read back, a missing
        directory, or ASE failed to write it. ``path`` is then untouched.
    """
    path = os.fspath(path)
    if not isinstance(system, System):
        raise StructureFileError(f"write needs an ms.System; got {type(system).__name__}.")
    if _is_npz(path, format):
        def write_npz(tmp):
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    positions=np.asarray(system.positions, np.float64),
                    cell=np.zeros((0,)) if system.cell is None else np.asarray(system.cell, np.float64),
                    species=np.asarray(system.species, np.int32),
                    symbols=np.asarray(system.symbols, dtype=str),
                    pbc=np.asarray(system.pbc),
                )

        write_atomically(path, write_npz)
        return
    if _is_extxyz(path, format):
        write_text_atomically(path, _extxyz_text(system, _checked_info(info)))
        return

    if system.dim != 3 or not _are_elements(system.symbols):
        raise StructureFileError(
            f"cannot write {system!r} to '{path}': ASE formats hold 3D structures of chemical "
            "elements only. Write it as extxyz (.xyz) or .npz, which mdsens reads back exactly."
        )
    import ase.io
    from ase.io.formats import filetype

    try:
        fmt = format or filetype(path, read=False)
    except Exception as err:
        raise StructureFileError(f"cannot tell the format of '{path}' ({err}); pass format=...") from None

    def write_ase(tmp):
        try:
            ase.io.write(tmp, system.to_ase(), format=fmt)
        except Exception as err:
            raise StructureFileError(f"could not write '{path}' ({type(err).__name__}: {err}).") from err

    write_atomically(path, write_ase)


def _are_elements(symbols) -> bool:
    from ase.data import atomic_numbers

    return all(s in atomic_numbers and s != "X" for s in symbols)


def _extxyz_text(system: System, info: dict) -> str:
    """Extended XYZ with full float64 precision (``%.17g``), readable by ``ase.io.read``."""
    from ase.io.extxyz import key_val_dict_to_str

    n, dim = system.n_atoms, system.dim
    positions = np.zeros((n, 3))
    positions[:, :dim] = np.asarray(system.positions, np.float64)
    flagged = dim != 3 or not _are_elements(system.symbols)
    header = {}
    if system.cell is not None:
        cell = np.eye(3)
        cell[:dim, :dim] = np.asarray(system.cell, np.float64)
        # extxyz's Lattice lists the lattice vectors (ASE cell rows) one after another.
        header["Lattice"] = " ".join(f"{x:.17g}" for x in cell.ravel())
    props = "species:S:1:pos:R:3"
    if flagged:
        props += ":species_index:I:1"
    pbc = [system.pbc] * dim + [False] * (3 - dim)
    comment = []
    if "Lattice" in header:
        comment.append(f'Lattice="{header["Lattice"]}"')
    comment.append(f"Properties={props}")
    extra = dict(info)
    extra["pbc"] = " ".join("T" if p else "F" for p in pbc)
    if flagged:
        extra["mdsens_dim"] = dim
        extra["mdsens_symbols"] = " ".join(system.symbols)
    kv = key_val_dict_to_str({k: v for k, v in extra.items() if k != "pbc"})
    comment.append(f'pbc="{extra["pbc"]}"')
    if kv:
        comment.append(kv)
    names = ["X"] * n if flagged else system.chemical_symbols
    species = np.asarray(system.species)
    lines = [str(n), " ".join(comment)]
    for i in range(n):
        row = f"{names[i]:<3s}" + "".join(f" {x:24.17g}" for x in positions[i])
        if flagged:
            row += f" {int(species[i]):6d}"
        lines.append(row)
    return "\n".join(lines) + "\n"
