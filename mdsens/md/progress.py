"""Progress display for long host-side work: one implementation for every call.

Every long-running call takes ``progress: Optional[bool] = None``: ``True`` shows a bar
on stderr (tqdm), ``False`` never does, ``None`` shows one when stderr is a terminal
(so pipes, logs and pytest stay clean).

Two kinds of bar:

* :func:`progress_bar`: a count (``ms.relax``'s steps, updated between jitted chunks);
* :class:`Stages`: named stages of a call that runs a few compiled programs in turn
  (``ms.sensitivity``: Hessian blocks, stability analysis, the batched solves). A stage
  is announced when it starts and counted when it ends. Bars are only ever updated
  *between* programs that already exist: a batched solve is one stage, never split into
  columns, so progress adds no compiled program and no device synchronization.

Under ``jit``/``vmap`` there is no host loop to report from: :func:`traced_progress`
turns ``None`` into off and refuses ``True`` with :class:`~mdsens.OptionError`, the
same answer ``ms.relax`` gives.
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO

from mdsens.errors import OptionError
from mdsens.md.layer import is_traced

__all__ = ["progress_enabled", "progress_bar", "traced_progress", "Stages", "structure_stages"]


def progress_enabled(progress: Optional[bool], stream: Optional[TextIO] = None) -> bool:
    """``progress`` as a bool: ``None`` means "when ``stream`` (default stderr) is a terminal"."""
    if progress is not None:
        return bool(progress)
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(show: bool, total: int, desc: str, unit: str = "it", stream: Optional[TextIO] = None):
    """A tqdm bar counting to ``total`` (disabled, and silent, unless ``show``); close it."""
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not show, desc=desc, unit=unit, leave=False,
                file=sys.stderr if stream is None else stream)


def traced_progress(progress: Optional[bool], inputs, what: str) -> Optional[bool]:
    """``progress`` for a call whose ``inputs`` may be traced: off under jit/vmap.

    Raises:
      OptionError: ``progress=True`` while tracing (no host loop to report from).
    """
    if not is_traced(inputs):
        return progress
    if progress:
        raise OptionError(f"progress=True needs the host loop of {what}; it is not available under jit/vmap.")
    return False


class Stages:
    """A bar over the named stages of one call; every method is a no-op when not shown.

    ``stages = Stages(progress, "sensitivity N=13", 3)``; then ``stages.start("stability
    analysis")`` before each of the 3 stages (the previous one is counted as done) and
    ``stages.close()`` at the end (a ``with`` block closes it too). The running stage's
    name is in the bar's description, so a stalled call says where it stands::

        sensitivity N=13: stability analysis:  33%|███▎      | 1/3 [00:00<00:00, 9.9stage/s]
    """

    def __init__(self, progress: Optional[bool], title: str, total: int, stream: Optional[TextIO] = None):
        self.title = title
        self._bar = None
        self._started = False
        if progress_enabled(progress, stream):
            self._bar = progress_bar(True, total, title, unit="stage", stream=stream)

    @property
    def shown(self) -> bool:
        return self._bar is not None

    def start(self, name: str) -> None:
        """Count the running stage as done and announce ``name``."""
        bar = self._bar
        if bar is None:
            return
        if self._started:
            bar.update(1)
        self._started = True
        bar.set_description_str(f"{self.title}: {name}", refresh=False)
        bar.refresh()  # now, whatever tqdm's rate limit: a stage can be shorter than it

    def describe(self, text: str) -> None:
        """Replace the running stage's description (e.g. with the item at hand)."""
        bar = self._bar
        if bar is None:
            return
        bar.set_description_str(f"{self.title}: {text}", refresh=False)
        bar.refresh()

    def close(self, completed: bool = True) -> None:
        """Count the running stage as done (unless it failed: ``completed=False``) and
        remove the bar."""
        bar = self._bar
        if bar is None:
            return
        if self._started and completed:
            bar.update(1)
            bar.refresh()
        bar.close()
        self._bar = None

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(completed=exc_type is None)


def structure_stages(progress: Optional[bool], what: str, result, params, total: int) -> Stages:
    """The stage bar of ``ms.<what>`` on a ``RelaxResult`` or ``System`` (``"sensitivity
    N=13"``), off under jit/vmap (:func:`traced_progress`)."""
    system = getattr(result, "system", result)
    progress = traced_progress(progress, (getattr(system, "positions", None), params), f"ms.{what}")
    return Stages(progress, f"{what} N={getattr(system, 'n_atoms', '?')}", total)
