"""The compilation cache behind the simple calls (``ms.relax``, ``ms.sensitivity``, ...).

Each simple call is its ``make_*`` form built and called once. Building compiles, so the
built objects are memoized here, the way ``jax.jit`` memoizes traces: keyed by the
potential's static description (:meth:`~mdsens.md.potentials.base.Potential.cache_key`,
everything but the parameter values), the system's layout (N, dimension, pbc, species)
and the options; bounded (least recently used first out); invisible in results — a hit
and a miss return the same numbers, because positions, cells and parameters are always
call-time arguments. :func:`clear` empties it (e.g. to free compiled code).

This memo is the only state mdsens keeps besides the float64 switch, with one companion:
:func:`capability`, what this process's JAX can do (probed once, e.g. whether XLA knows a
compile option of :mod:`mdsens.md.programs`), which never changes within a process.
"""

from __future__ import annotations

import collections
from typing import Callable, Hashable

import numpy as np

__all__ = ["memoized", "memoized_make", "clear", "info", "capability", "hashable", "layout_key", "MAX_ENTRIES"]

#: Largest number of built objects kept (each holds compiled programs).
MAX_ENTRIES = 16

_entries: "collections.OrderedDict[Hashable, object]" = collections.OrderedDict()
_stats = {"hits": 0, "misses": 0}
_capabilities: dict = {}


def memoized(key: Hashable, build: Callable[[], object]):
    """The object built for ``key``, building it with ``build()`` on a miss."""
    try:
        value = _entries.pop(key)
        _stats["hits"] += 1
    except KeyError:
        value = build()
        _stats["misses"] += 1
    _entries[key] = value
    while len(_entries) > MAX_ENTRIES:
        _entries.popitem(last=False)
    return value


def memoized_make(kind: str, pot, system, extra: tuple, options: dict, build: Callable[[], object]):
    """The ``make_*`` object behind a simple call (``kind``), keyed by the potential, the
    layout of ``system``, ``extra`` (hashable) and the ``options`` dict."""
    if not hasattr(system, "positions") or not hasattr(pot, "cache_key"):
        return build()  # the builder reports what is wrong with them
    key = (kind, pot.cache_key(), layout_key(system), extra,
           tuple((k, hashable(v)) for k, v in sorted(options.items())))
    return memoized(key, build)


def capability(key: Hashable, probe: Callable[[], object]):
    """``probe()``'s answer for ``key``, probed once per process: a fact about the
    installed JAX, not a built object (neither counted by :func:`info` nor dropped by
    :func:`clear`)."""
    if key not in _capabilities:
        _capabilities[key] = probe()
    return _capabilities[key]


def clear() -> None:
    """Forget every built object (their compiled programs are freed with them)."""
    _entries.clear()
    _stats.update(hits=0, misses=0)


def info() -> dict:
    """``{"entries", "hits", "misses"}`` since the last :func:`clear`."""
    return {"entries": len(_entries), **_stats}


def hashable(value):
    """A hashable stand-in for ``value``: arrays by content, containers recursively,
    anything else unhashable by identity (the cache keeps the object alive)."""
    if isinstance(value, (str, bytes, int, float, bool, complex, type(None), type)):
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        array = np.asarray(value)
        return ("array", array.shape, array.dtype.str, array.tobytes())
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(hashable(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), hashable(v)) for k, v in value.items())))
    try:
        hash(value)
        return value
    except TypeError:
        return ("id", id(value))


def layout_key(system) -> tuple:
    """What of a system a compiled program depends on: N, dimension, pbc, species."""
    return (system.n_atoms, system.dim, system.pbc, system.symbols, tuple(np.asarray(system.species).tolist()))
