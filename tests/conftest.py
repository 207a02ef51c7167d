"""Shared test helpers: the bundled data, and independent references used by several files.

Tests do not depend on the working directory: bundled files come from :data:`DATA`.
"""

import os

# The command's persistent compilation cache stays off in tests: each test measures
# its own behaviour, and nothing is written to the user's cache directory.
os.environ.setdefault("MDSENS_COMPILATION_CACHE", "0")

import mdsens as ms  # noqa: E402

#: The bundled data folder (``mdsens/data``), wherever mdsens is installed.
DATA = str(ms.data.path("README.md").parent)


def data_file(name: str) -> str:
    """Path of a bundled file (``"lj13_ar.xyz"``, ``"potentials/Si.tersoff"``)."""
    return os.path.join(DATA, *name.split("/"))
