"""mdsens.plot: each function returns a Figure with labelled axes and the right artists,
from tiny synthetic inputs (no physics, no relaxation)."""

import types

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PatchCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.quiver import Quiver  # noqa: E402

from mdsens import plot  # noqa: E402


def toy_system(periodic=True):
    R = np.array([[1.0, 1.0], [3.0, 1.5], [2.0, 3.0]])
    return types.SimpleNamespace(positions=R, cell=np.eye(2) * 4.0 if periodic else None,
                                 species=np.array([0, 1, 0]), symbols=("A", "B"), pbc=periodic)


def only_axes(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def assert_labelled(ax):
    assert ax.get_xlabel().strip() and ax.get_ylabel().strip()


def test_sensitivity_arrows_draws_discs_arrows_cell_and_legend(tmp_path):
    system = toy_system()
    D = np.array([[0.1, 0.0], [0.0, -0.2], [0.05, 0.05]])
    fig = plot.sensitivity_arrows(system, D, radii={"A": 0.5, "B": 0.7}, title="toy",
                                  length_unit="Å", label="dR/dθ")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert_labelled(ax)
    assert "Å" in ax.get_xlabel() and "Å" in ax.get_ylabel()
    assert ax.get_title() == "toy"
    quivers = [c for c in ax.collections if isinstance(c, Quiver)]
    assert len(quivers) == 1 and quivers[0].N == 3
    np.testing.assert_allclose(quivers[0].U, D[:, 0])
    (discs,) = [c for c in ax.collections if isinstance(c, PatchCollection)]
    assert len(discs.get_paths()) == 3  # all discs inside the cell: no periodic images
    assert len(ax.patches) == 1  # the cell outline
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("A (2)") for t in texts) and any(t.startswith("B (1)") for t in texts)
    assert any("dR/dθ" in t and "×" in t for t in texts), texts  # the arrow scale
    assert any("cell" in t for t in texts)
    fig.savefig(tmp_path / "arrows.png")
    assert (tmp_path / "arrows.png").stat().st_size > 0


def test_sensitivity_arrows_scale_and_periodic_images():
    system = toy_system()
    system.positions = np.array([[0.2, 2.0], [3.0, 1.5], [2.0, 3.0]])  # first disc crosses x = 0
    D = np.ones((3, 2))
    fig = plot.sensitivity_arrows(system, D, radii=0.5, scale=0.25)
    (ax,) = fig.axes
    (quiver,) = [c for c in ax.collections if isinstance(c, Quiver)]
    assert quiver.scale == pytest.approx(4.0)  # matplotlib: arrow length = |v| / scale
    (discs,) = [c for c in ax.collections if isinstance(c, PatchCollection)]
    assert len(discs.get_paths()) == 4  # one image across the left edge
    assert any("×0.25" in t.get_text() for t in ax.get_legend().get_texts())


def test_sensitivity_arrows_free_system_on_given_axes_and_errors():
    fig0 = Figure()
    ax = fig0.add_subplot()
    fig = plot.sensitivity_arrows(toy_system(periodic=False), np.zeros((3, 2)), ax=ax)
    assert fig is fig0 and len(ax.patches) == 0  # no cell outline
    with pytest.raises(ValueError, match="2D"):
        plot.sensitivity_arrows(types.SimpleNamespace(positions=np.zeros((3, 3))), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="shape"):
        plot.sensitivity_arrows(toy_system(), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="species"):
        plot.sensitivity_arrows(toy_system(), np.zeros((3, 2)), radii={"A": 0.5})


def test_error_curve_log_log_with_guide_and_estimate():
    x = np.logspace(-10, -2, 9)
    fig = plot.error_curve(x, {"implicit": 3 * x, "unrolled": np.sqrt(x)}, estimate=5 * x,
                           xlabel="‖x − x*‖ (Å)", title="Theorem 1")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_xlabel() == "‖x − x*‖ (Å)" and ax.get_ylabel()
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[:2] == ["implicit", "unrolled"]
    assert len(ax.get_lines()) == 4  # two methods, the estimate, the slope-1 guide
    guide = ax.get_lines()[-1]
    gx, gy = guide.get_data()
    assert np.log(gy[1] / gy[0]) / np.log(gx[1] / gx[0]) == pytest.approx(1.0)


def test_error_curve_drops_non_positive_points_and_takes_own_x():
    x = np.array([1e-6, 1e-4, 0.0, np.nan])
    fig = plot.error_curve(x, np.array([1e-5, 1e-3, 1e-2, 1.0]), reference_slope=None)
    (line,) = fig.axes[0].get_lines()
    assert len(line.get_xdata()) == 2
    fig = plot.error_curve(None, {"a": (np.array([1.0, 2.0]), np.array([1.0, 4.0]))})
    assert len(fig.axes[0].get_lines()) == 2


def test_scaling_plot_one_line_per_method():
    sizes = np.array([128, 1024, 8192])
    fig = plot.scaling_plot(sizes, {"relax": 1e-3 * sizes, "implicit": 1e-5 * sizes,
                                    "unrolled": np.array([0.5, 9.0, np.nan])},
                            reference_slopes=(1,), title="CPU")
    (ax,) = fig.axes
    assert_labelled(ax)
    assert "(s)" in ax.get_ylabel()
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    lines = ax.get_lines()
    assert [line.get_label() for line in lines[:3]] == ["relax", "implicit", "unrolled"]
    assert len(lines) == 4
    assert len(lines[2].get_xdata()) == 2  # the NaN (did not run) is dropped


def test_elastic_matrix_annotates_every_value():
    C = np.array([[151.4, 76.4, 0.0], [76.4, 151.4, 0.0], [0.0, 0.0, 56.4]])
    fig = plot.elastic_matrix(C, title="SW")
    assert isinstance(fig, Figure)
    (ax,) = only_axes(fig)
    assert_labelled(ax)
    assert len(ax.images) == 1
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 9
    assert texts[0] == "151.4" and texts[2] == "0" and texts[8] == "56.4"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["xx", "yy", "xy"]
    colorbar = [a for a in fig.axes if a is not ax]
    assert len(colorbar) == 1 and "GPa" in colorbar[0].get_ylabel()
    lo, hi = ax.images[0].get_clim()
    assert lo == -hi == -151.4  # symmetric about zero: the sign reads off the colour


def test_elastic_matrix_6x6_on_given_axes_without_colorbar():
    fig0 = Figure()
    ax = fig0.add_subplot()
    fig = plot.elastic_matrix(np.eye(6), ax=ax, unit="eV/Å³", colorbar=False)
    assert fig is fig0 and len(fig.axes) == 1 and len(ax.texts) == 36
    assert [t.get_text() for t in ax.get_yticklabels()][3] == "yz"
    with pytest.raises(ValueError, match="square"):
        plot.elastic_matrix(np.zeros((3, 2)))


def test_figures_touch_no_global_pyplot_state():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plot.error_curve(np.array([1e-3, 1e-2]), np.array([1e-3, 1e-2]))
    plot.elastic_matrix(np.eye(3))
    assert plt.get_fignums() == before
