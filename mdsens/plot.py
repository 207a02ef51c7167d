"""Matplotlib figures for sensitivities, Jacobian errors, benchmarks and elastic constants.

Every function draws on ``ax`` if one is given, otherwise on a new
:class:`matplotlib.figure.Figure` created without ``pyplot`` (no global figure state is
touched, nothing is shown, nothing needs closing), and returns that ``Figure``; the axes
drawn on are ``ax`` or ``fig.axes[0]``. Axes are labelled with units. Save with
``fig.savefig(path)``; in Jupyter a returned ``Figure`` displays itself.

Only ``numpy`` and ``matplotlib`` are needed; the inputs are plain arrays (or objects with
the attributes of :class:`mdsens.System`), so the figures work on any data, e.g. results
loaded from disk.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import numpy as np

from mdsens.md.strain import voigt_labels

__all__ = ["sensitivity_arrows", "error_curve", "scaling_plot", "elastic_matrix"]

#: Species colours (colour-blind friendly, Okabe–Ito), cycled for more species.
SPECIES_COLORS = ("#56B4E9", "#E69F00", "#009E73", "#CC79A7", "#F0E442", "#0072B2", "#D55E00")
#: Line markers cycled over methods in :func:`error_curve` and :func:`scaling_plot`.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _new_axes(ax, figsize):
    """``(fig, ax)``: the given axes and their figure, or a fresh pyplot-free figure."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


# --------------------------------------------------------------------- sensitivity arrows
def _per_particle_radii(radii, species, symbols, n, positions, cell):
    """Radii ``(N,)`` from a scalar, an ``(N,)`` array, a per-species sequence or a
    ``{symbol: radius}`` dict; default: half the shortest (minimum-image) distance."""
    if radii is None:
        d = positions[:, None, :] - positions[None, :, :]
        if cell is not None:
            frac = d @ np.linalg.inv(cell)
            d = (frac - np.round(frac)) @ cell
        dist = np.sqrt(np.sum(d * d, axis=-1))
        np.fill_diagonal(dist, np.inf)
        r = 0.5 * float(np.min(dist)) if n > 1 else 0.5
        return np.full(n, r)
    if isinstance(radii, Mapping):
        missing = [s for s in symbols if s not in radii]
        if missing:
            raise ValueError(f"radii has no entry for species {missing}; got keys {list(radii)}.")
        return np.asarray([float(radii[symbols[s]]) for s in species])
    radii = np.asarray(radii, dtype=float)
    if radii.ndim == 0:
        return np.full(n, float(radii))
    if radii.shape == (n,):
        return radii
    if radii.shape == (len(symbols),):
        return radii[species]
    raise ValueError(
        f"radii must be a scalar, one radius per particle ({n}), one per species "
        f"({len(symbols)}) or a {{symbol: radius}} dict; got shape {radii.shape}."
    )


def _arrow_legend_handler():
    """A legend handler that draws a proxy ``FancyArrow`` as an arrow."""
    from matplotlib.legend_handler import HandlerPatch
    from matplotlib.patches import FancyArrow

    def make(legend, orig_handle, xdescent, ydescent, width, height, fontsize):
        return FancyArrow(0, 0.5 * height, width, 0, width=0.18 * height, head_width=0.75 * height,
                          head_length=0.35 * width, length_includes_head=True)

    return HandlerPatch(patch_func=make)


def sensitivity_arrows(
    system,
    displacement,
    *,
    ax=None,
    scale: Optional[float] = None,
    radii=None,
    title: Optional[str] = None,
    label: str = r"$\mathrm{d}R^*/\mathrm{d}\theta$",
    length_unit: str = "Å",
    displacement_unit: Optional[str] = None,
    colors: Optional[Sequence[str]] = None,
    arrow_color: str = "black",
    images: bool = True,
    clip_to_cell: bool = True,
    dcell=None,
):
    """A 2D structure as discs with one arrow per particle (e.g. ``dR*/dθ``).

    The molecular-dynamics figure of Blondel et al. (2022): each particle of a relaxed
    packing with an arrow showing how it moves when a parameter changes.

    Args:
      system: an :class:`mdsens.System` (or a ``RelaxResult``, whose ``.system`` is
        used) with 2D ``positions (N, 2)``; ``cell``, ``species``, ``symbols`` and
        ``pbc`` are used when present.
      displacement: ``(N, 2)`` arrow vectors, in ``displacement_unit``.
      ax: axes to draw on (default: a new figure).
      scale: arrow length (in length units) per unit of ``displacement``, i.e. arrows
        are drawn ``× scale``; default: the 90th-percentile arrow is 1.2 × the mean disc
        radius (the longest one if the lengths are very spread).
        Stated in the legend.
      radii: disc radius per particle: scalar, ``(N,)``, one per species, or
        ``{symbol: radius}`` (e.g. ``{"A": 0.5, "B": 0.7}`` for diameters σ = 1, 1.4);
        default half the shortest pair distance.
      title: axes title.
      label: what the arrows are (legend text), e.g. ``r"$dR^*/d\\sigma_A$"``.
      length_unit: unit of positions for the axis labels (``"Å"``, ``"σ"``...).
      displacement_unit: unit of ``displacement`` for the legend (default
        ``length_unit + " per unit θ"``; ``""`` for a dimensionless one).
      colors: one colour per species (default :data:`SPECIES_COLORS`).
      arrow_color: arrow colour.
      images: draw the periodic images of discs that cross the cell boundary (clipped to
        the cell, unless ``clip_to_cell=False``) so the packing looks periodic.
      clip_to_cell: ``False`` draws every disc whole, to scale, with the whole images of
        those that cross the boundary and an arrow on each image; the axes then extend
        beyond the cell to show them and every arrow whole. ``True`` (default) clips discs
        and images to the cell.
      dcell: ``(2, 2)`` derivative of the cell rows that goes with ``displacement`` (a
        box that follows the parameter), in ``displacement_unit``: the image of particle
        ``i`` shifted by ``n·cell`` gets the arrow ``displacement[i] + n·dcell``. Default:
        a fixed cell (images carry their particle's arrow). Used with ``clip_to_cell=False``.

    Returns:
      The ``Figure``. The discs are one ``PatchCollection`` (``N`` circles plus the
      boundary images) and the arrows one ``Quiver`` with ``N`` arrows; with
      ``clip_to_cell=False`` and images present, a second ``Quiver`` (lighter) carries
      the images' arrows.
    """
    from matplotlib.collections import PatchCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle, FancyArrow, Polygon

    system = getattr(system, "system", system)
    R = np.asarray(system.positions, dtype=float)
    D = np.asarray(displacement, dtype=float)
    if R.ndim != 2 or R.shape[1] != 2:
        raise ValueError(f"sensitivity_arrows draws 2D structures; positions have shape {R.shape}.")
    if D.shape != R.shape:
        raise ValueError(f"displacement must have the positions' shape {R.shape}; got {D.shape}.")
    n = R.shape[0]
    species = np.asarray(getattr(system, "species", None) if getattr(system, "species", None) is not None
                         else np.zeros(n, int)).astype(int)
    symbols = tuple(getattr(system, "symbols", None) or tuple(str(i) for i in range(species.max() + 1)))
    periodic = bool(getattr(system, "pbc", False)) and getattr(system, "cell", None) is not None
    cell = np.asarray(system.cell, dtype=float) if periodic else None
    if periodic:  # wrap into the cell (rows are lattice vectors)
        frac = np.linalg.solve(cell.T, R.T).T
        R = (frac - np.floor(frac)) @ cell
    r = _per_particle_radii(radii, species, symbols, n, R, cell)
    colors = tuple(colors or SPECIES_COLORS)
    if displacement_unit is None:
        displacement_unit = f"{length_unit} per unit θ"

    fig, ax = _new_axes(ax, (6.4, 6.0))

    # discs (and their periodic images across the boundary, clipped to the cell unless
    # clip_to_cell=False); `image_of` and `image_shift` say whose image and by how many cells
    centres, disc_r, disc_c = [R], [r], [species]
    image_of, image_shift = [np.zeros(0, int)], [np.zeros((0, 2))]
    if periodic and images:
        inv = np.linalg.inv(cell)
        for i in (-1, 0, 1):
            for j in (-1, 0, 1):
                if i == j == 0:
                    continue
                shifted = R + i * cell[0] + j * cell[1]
                f = shifted @ inv
                # keep images whose disc may reach into the cell (a generous margin)
                pad = r[:, None] * np.linalg.norm(inv, axis=0)[None, :]
                near = np.all((f > -pad) & (f < 1 + pad), axis=1)
                centres.append(shifted[near]); disc_r.append(r[near]); disc_c.append(species[near])
                image_of.append(np.flatnonzero(near))
                image_shift.append(np.tile([float(i), float(j)], (int(near.sum()), 1)))
    centres, disc_r, disc_c = np.concatenate(centres), np.concatenate(disc_r), np.concatenate(disc_c)
    image_of, image_shift = np.concatenate(image_of), np.concatenate(image_shift)
    patches = [Circle(tuple(c), rad) for c, rad in zip(centres, disc_r)]
    discs = PatchCollection(patches, facecolors=[colors[s % len(colors)] for s in disc_c],
                            edgecolors="0.25", linewidths=0.5, alpha=0.85, zorder=1)
    ax.add_collection(discs)

    if periodic:
        corners = np.array([[0.0, 0.0], cell[0], cell[0] + cell[1], cell[1]])
        outline = Polygon(corners, closed=True, fill=False, edgecolor="black", linewidth=1.2, zorder=3)
        ax.add_patch(outline)
        if clip_to_cell:
            discs.set_clip_path(Polygon(corners, closed=True, transform=ax.transData))
            lo, hi = corners.min(0), corners.max(0)
        else:  # whole discs: the view holds the cell and every disc drawn
            lo = np.minimum(corners.min(0), (centres - disc_r[:, None]).min(0))
            hi = np.maximum(corners.max(0), (centres + disc_r[:, None]).max(0))
    else:
        lo, hi = (R - r[:, None]).min(0), (R + r[:, None]).max(0)

    # arrows: length (data units) = scale × |displacement|
    norms = np.sqrt(np.sum(D * D, axis=1))
    dmax = float(norms.max()) if n else 0.0
    if scale is None:
        # typical arrows readable, the few largest about a diameter and a half long
        typical = float(np.percentile(norms, 90)) if n else 0.0
        ref = typical if typical > 0.2 * dmax else dmax
        scale = 1.2 * float(np.mean(r)) / ref if ref > 0 else 1.0
    arrow_style = dict(angles="xy", scale_units="xy", scale=1.0 / scale, width=0.004, headwidth=3.5,
                       headlength=4.0, headaxislength=3.5, pivot="tail")
    ax.quiver(R[:, 0], R[:, 1], D[:, 0], D[:, 1], color=arrow_color, zorder=4, **arrow_style)
    if periodic and not clip_to_cell:
        # an image n cells away moves with its particle plus n times the cell's own change
        dc = np.zeros((2, 2)) if dcell is None else np.asarray(dcell, dtype=float)
        if dc.shape != (2, 2):
            raise ValueError(f"dcell must be the (2, 2) derivative of the cell rows; got shape {dc.shape}.")
        image_D = D[image_of] + image_shift @ dc
        image_xy = centres[n:]
        if len(image_of):
            ax.quiver(image_xy[:, 0], image_xy[:, 1], image_D[:, 0], image_D[:, 1], color=arrow_color,
                      alpha=0.55, zorder=4, **arrow_style)
        # nothing cut at the edge: the view also holds every arrow's tip
        tips = np.concatenate([R + scale * D, image_xy + scale * image_D])
        lo, hi = np.minimum(lo, tips.min(0)), np.maximum(hi, tips.max(0))

    margin = 0.03 * float(np.max(hi - lo))
    ax.set_xlim(lo[0] - margin, hi[0] + margin)
    ax.set_ylim(lo[1] - margin, hi[1] + margin)
    ax.set_aspect("equal")
    ax.set_xlabel(f"x ({length_unit})")
    ax.set_ylabel(f"y ({length_unit})")
    if title:
        ax.set_title(title)

    # legend: species discs, the arrow scale, the cell
    handles = []
    for s, sym in enumerate(symbols):
        if np.any(species == s):
            rr = np.unique(np.round(r[species == s], 6))
            size = f", radius {rr[0]:g} {length_unit}" if len(rr) == 1 else ""
            handles.append(Line2D([], [], marker="o", linestyle="none", markersize=10,
                                  markerfacecolor=colors[s % len(colors)], markeredgecolor="0.25",
                                  label=f"{sym} ({int(np.sum(species == s))}){size}"))
    arrow = FancyArrow(0, 0, 1, 0, color=arrow_color,
                       label=f"{label}, arrows drawn ×{scale:.3g}\n"
                             f"(largest {dmax:.3g} {displacement_unit})".replace(" )", ")"))
    handles.append(arrow)
    if periodic:
        handles.append(Line2D([], [], color="black", linewidth=1.2, label="periodic cell"))
    ax.legend(handles=handles, handler_map={FancyArrow: _arrow_legend_handler()},
              loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2, fontsize="small", frameon=False)
    return fig


# --------------------------------------------------------------------------- error curve
def _positive(x, y):
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length; got {x.shape} and {y.shape}.")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    order = np.argsort(x[keep])
    return x[keep][order], y[keep][order]


def _as_series(x, ys) -> dict:
    """``{label: (x, y)}`` from a shared ``x`` and ``{label: y or (x_own, y)}`` / an array."""
    if not isinstance(ys, Mapping):
        ys = {"": ys}
    out = {}
    for name, y in ys.items():
        if isinstance(y, tuple) and len(y) == 2:
            out[name] = _positive(*y)
        else:
            if x is None:
                raise ValueError(f"series {name!r} has no x values.")
            out[name] = _positive(x, y)
    return out


def _guide(ax, x, y, slope, label, anchor="first"):
    """A dashed power-law guide ``y ∝ x^slope`` through one point of a series."""
    if len(x) == 0:
        return None
    i = 0 if anchor == "first" else len(x) // 2
    xs = np.array([x.min(), x.max()])
    ys = y[i] * (xs / x[i]) ** slope * 3.0
    (line,) = ax.plot(xs, ys, linestyle="--", color="0.5", linewidth=1.0, label=label, zorder=0)
    return line


def error_curve(
    solution_error,
    jacobian_error,
    *,
    ax=None,
    reference_slope: Optional[float] = 1.0,
    xlabel: str = r"solution error $\|\hat x - x^*\|$",
    ylabel: str = r"Jacobian error $\|\hat J - J^*\| / \|J^*\|$",
    title: Optional[str] = None,
    estimate=None,
    reference_label: Optional[str] = None,
):
    """Jacobian error vs inner-solver error, log–log (Theorem 1 of Blondel et al. 2022).

    Theorem 1: the implicit Jacobian evaluated at an approximate solution ``x̂`` is off
    by at most ``C ‖x̂ − x*‖``. Unrolled differentiation of the same iterates converges
    too, but not in proportion to the solution error. A dashed guide of slope
    ``reference_slope`` is drawn through the first method's smallest-error point.

    Args:
      solution_error: ``(K,)`` distances ``‖x̂_k − x*‖`` (units in ``xlabel``).
      jacobian_error: ``(K,)`` errors of one method, or ``{label: (K,) errors}`` for
        several (e.g. ``{"implicit": ..., "unrolled": ...}``); a value may also be its
        own ``(x, y)`` pair. Non-positive and non-finite points are dropped (log axes).
      ax: axes to draw on.
      reference_slope: slope of the guide line; ``None`` for no guide.
      xlabel, ylabel: axis labels (say the units: the defaults are for a solution in the
        inner problem's units and a relative, dimensionless Jacobian error).
      title: axes title.
      estimate: optional ``(K,)`` a-posteriori error estimates (e.g.
        ``Sensitivity.error_estimate / ‖J*‖``) drawn as a dotted line.
      reference_label: legend label of the guide (default: ``∝ ‖x̂ − x*‖ (Theorem 1)``
        for slope 1, else ``slope s``); say what ``x`` is when it is not the solution
        error (e.g. a force residual).

    Returns:
      The ``Figure`` (one line per method, plus the guide and the estimate if any).
    """
    series = _as_series(solution_error, jacobian_error)
    fig, ax = _new_axes(ax, (5.6, 4.4))
    for k, (name, (x, y)) in enumerate(series.items()):
        ax.plot(x, y, marker=MARKERS[k % len(MARKERS)], markersize=5, linewidth=1.4,
                label=name or "Jacobian error")
    if estimate is not None:
        x, y = _positive(solution_error, estimate)
        ax.plot(x, y, linestyle=":", color="black", linewidth=1.4, label="a-posteriori estimate")
    if reference_slope is not None and series:
        x, y = next(iter(series.values()))
        text = r"$\propto \|\hat x - x^*\|$" if reference_slope == 1 else rf"slope {reference_slope:g}"
        if reference_label is None:
            reference_label = f"{text} (Theorem 1)" if reference_slope == 1 else text
        _guide(ax, x, y, reference_slope, reference_label)
    _finish_loglog(ax, xlabel, ylabel, title)
    return fig


def _finish_loglog(ax, xlabel, ylabel, title):
    """Log–log axes with labels (units), a light grid, an optional title and a legend."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")


# -------------------------------------------------------------------------- scaling plot
def scaling_plot(
    sizes,
    times,
    *,
    ax=None,
    xlabel: str = "number of atoms N",
    ylabel: str = "time (s)",
    title: Optional[str] = None,
    reference_slopes: Sequence[float] = (),
):
    """Time vs system size for several methods, log–log (for benchmark results).

    Args:
      sizes: ``(K,)`` sizes shared by all methods (e.g. numbers of atoms).
      times: ``{method: (K,) seconds}``; NaN marks a size a method did not run (e.g.
        out of memory); a value may also be its own ``(sizes, times)`` pair.
      ax: axes to draw on.
      xlabel, ylabel: axis labels (with units).
      title: axes title.
      reference_slopes: dashed power-law guides ``∝ N^s`` through the first method.

    Returns:
      The ``Figure`` (one line per method, plus one per guide).
    """
    series = _as_series(sizes, times)
    fig, ax = _new_axes(ax, (5.6, 4.4))
    for k, (name, (x, y)) in enumerate(series.items()):
        ax.plot(x, y, marker=MARKERS[k % len(MARKERS)], markersize=5, linewidth=1.4, label=name or "time")
    if series:
        x, y = next(iter(series.values()))
        for s in reference_slopes:
            _guide(ax, x, y, s, rf"$\propto N^{{{s:g}}}$", anchor="first")
    _finish_loglog(ax, xlabel, ylabel, title)
    return fig


# ------------------------------------------------------------------------ elastic matrix
def elastic_matrix(
    C,
    *,
    ax=None,
    unit: str = "GPa",
    labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    fmt: str = "{:.1f}",
    vmax: Optional[float] = None,
    cmap: str = "RdBu_r",
    colorbar: bool = True,
):
    """Heatmap of a Voigt matrix (elastic constants) with every value written in its cell.

    Args:
      C: ``(6, 6)`` (3D) or ``(3, 3)`` (2D) matrix, in ``unit``.
      ax: axes to draw on.
      unit: unit of ``C`` for the colour-bar label (``"GPa"``, ``"eV/Å³"``...).
      labels: row/column labels (default Voigt ``xx, yy, zz, yz, xz, xy`` or
        ``xx, yy, xy``).
      title: axes title.
      fmt: format of the annotations; values below ``1e-9 × max|C|`` print as ``0``.
      vmax: colour range ``[-vmax, vmax]`` (default ``max|C|``), symmetric about zero
        so the sign reads off the colour; pass the same ``vmax`` to compare panels.
      cmap: a diverging colour map.
      colorbar: draw a colour bar labelled with the unit.

    Returns:
      The ``Figure`` (an image plus ``n × n`` text annotations).
    """
    C = np.asarray(C, dtype=float)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be a square Voigt matrix; got shape {C.shape}.")
    n = C.shape[0]
    labels = tuple(labels or voigt_labels(n))
    big = float(np.max(np.abs(C))) if C.size else 1.0
    vmax = float(vmax) if vmax is not None else (big or 1.0)
    fig, ax = _new_axes(ax, (5.2, 4.4))
    image = ax.imshow(C, cmap=cmap, vmin=-vmax, vmax=vmax)
    for i in range(n):
        for j in range(n):
            v = C[i, j]
            text = "0" if abs(v) < 1e-9 * max(big, 1e-300) else fmt.format(v)
            dark = abs(v) > 0.55 * vmax
            ax.text(j, i, text, ha="center", va="center", fontsize="small",
                    color="white" if dark else "black")
    ax.set_xticks(range(n), labels)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("Voigt index J (strain component)")
    ax.set_ylabel("Voigt index I (stress component)")
    if title:
        ax.set_title(title)
    if colorbar:
        fig.colorbar(image, ax=ax, label=f"$C_{{IJ}}$ ({unit})", shrink=0.85)
    return fig
