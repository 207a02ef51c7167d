"""The data shipped with mdsens: the demo's structures and potential files.

Read them with :func:`path` (``importlib.resources``), which works from a clone and from
an installed wheel alike; ``README.md`` in this folder gives each file's provenance.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from mdsens.errors import MissingFileError

__all__ = ["path", "names"]


def path(name: str) -> Path:
    """The file ``name`` (e.g. ``"lj13_ar.xyz"``, ``"potentials/Si.tersoff"``) on disk.

    Raises:
      MissingFileError: no such bundled file (a ``FileNotFoundError``); the message
        lists those there are.
    """
    ref = resources.files(__name__).joinpath(*str(name).split("/"))
    if not ref.is_file():
        raise MissingFileError(f"mdsens ships no data file {name!r}; it has {', '.join(names())}.")
    return Path(str(ref))


def names() -> tuple:
    """The bundled structure and potential files (paths relative to this package)."""
    root = resources.files(__name__)
    found = []
    for entry in root.iterdir():
        if entry.is_dir() and entry.name == "potentials":
            found += [f"potentials/{e.name}" for e in entry.iterdir() if e.is_file()]
        elif entry.is_file() and not entry.name.endswith((".py", ".md", ".pyc")):
            found.append(entry.name)
    return tuple(sorted(found))
