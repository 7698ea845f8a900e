"""`hf_posenc.workflow.plots`: the compare plot is written and readable, checked on the matplotlib figure itself."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from matplotlib.colors import to_hex  # noqa: E402

from hf_posenc.workflow.plots import compare_figure, legend_name, plot_compare, series_styles  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "examples" / "results"
STORED = ["compare_default.json", "compare_tinyshakespeare.json"]


def synthetic() -> dict:
    """Three trained schemes (one ending at L, one with scalings, two of them equal), one recalibration arm and a
    value far past the cap; lengths as ints, as `compare` returns them before JSON."""
    lengths = [16, 32, 64]
    return {
        "config": {"arch": "toy", "train_length": 16, "eval_multiples": [1, 2, 4], "steps": 10},
        "schemes": [
            {"name": "learned", "eval": {"as trained": {16: 9.0, 32: None, 64: None}}},
            {
                "name": "rope",
                "eval": {
                    "as trained": dict(zip(lengths, [8.0, 9.0, 12.0])),
                    "NTK": dict(zip(lengths, [8.0, 8.5, 10.0])),
                    "dynamic NTK": dict(zip(lengths, [8.0, 8.5, 10.0])),
                    "PI (linear)": dict(zip(lengths, [8.0, 30.0, 5000.0])),
                },
            },
            {"name": "alibi", "eval": {"as trained": dict(zip(lengths, [8.5, 8.4, 8.3]))}},
            {
                "name": "rope -> alibi (0 steps)",
                "recalibration": {"from": "rope", "to": "alibi", "steps": 5},
                "eval": {"as trained": dict(zip(lengths, [20.0, 21.0, 22.0]))},
            },
            {
                "name": "rope -> alibi (5 steps)",
                "recalibration": {"from": "rope", "to": "alibi", "steps": 5},
                "eval": {"as trained": dict(zip(lengths, [9.0, 9.1, 9.2]))},
            },
        ],
    }


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


CASES = {name: (lambda name=name: load(name)) for name in STORED} | {"synthetic": synthetic}


@pytest.fixture(scope="module")
def figures():
    """Each case's results and its drawn figure, built once for the module."""
    drawn = {}
    for name, make in CASES.items():
        results = make()
        figure = compare_figure(results)
        figure.canvas.draw()
        drawn[name] = (results, figure)
    return drawn


def expected_names(results: dict) -> list[str]:
    return [
        row["name"] if variant == "as trained" else f"{row['name']} + {variant}"
        for row in results["schemes"]
        for variant in row["eval"]
    ]


def legend_entries(figure) -> list[tuple[object, str, object]]:
    """(axes, legend text, handle) for every legend entry of every panel."""
    entries = []
    for axes in figure.axes:
        legend = axes.get_legend()
        if legend is None:
            continue
        for text, handle in zip(legend.get_texts(), legend.legend_handles):
            entries.append((axes, text.get_text(), handle))
    return entries


def data_lines(axes) -> list:
    """The labelled series drawn on `axes` (not the training-length line, not the faint references)."""
    return [
        line
        for line in axes.get_lines()
        if not line.get_label().startswith(("_", "trained at")) and len(line.get_xdata())
    ]


@pytest.mark.parametrize("case", list(CASES))
def test_written(case, tmp_path):
    path = tmp_path / "plot.png"
    plot_compare(CASES[case](), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


@pytest.mark.parametrize("case", list(CASES))
def test_every_series_in_a_legend_exactly_once(case, figures):
    results, figure = figures[case]
    names = [legend_name(text) for _, text, _ in legend_entries(figure)]
    for name in expected_names(results):
        assert names.count(name) == 1, (name, names)
    assert len(names) == len(expected_names(results))


@pytest.mark.parametrize("case", list(CASES))
def test_no_two_series_share_a_style(case, figures):
    _, figure = figures[case]
    lines = [line for axes in figure.axes for line in data_lines(axes)]
    styles = [(to_hex(line.get_color()), line.get_marker(), str(line.get_linestyle())) for line in lines]
    assert len(set(styles)) == len(styles)
    pale = [colour for colour, _, _ in styles if sum(int(colour[i : i + 2], 16) for i in (1, 3, 5)) > 3 * 200]
    assert not pale


@pytest.mark.parametrize("case", list(CASES))
def test_training_length_marked_and_labelled(case, figures):
    results, figure = figures[case]
    length = int(results["config"]["train_length"])
    label = f"trained at L={length}"
    for axes in figure.axes:
        marks = [line for line in axes.get_lines() if set(line.get_xdata()) == {length} and line.get_label() == label]
        assert len(marks) == 1
        assert label in [text.get_text() for text in axes.texts]


@pytest.mark.parametrize("case", list(CASES))
def test_legends_outside_every_axes(case, figures):
    _, figure = figures[case]
    transform = figure.transFigure.inverted()
    boxes = [axes.get_window_extent().transformed(transform) for axes in figure.axes]
    legends = [axes.get_legend() for axes in figure.axes]
    assert all(legends)
    for legend in legends:
        box = legend.get_window_extent().transformed(transform)
        assert not any(box.overlaps(other) for other in boxes)
        assert 0 <= box.x0 and box.x1 <= 1 and 0 <= box.y0 and box.y1 <= 1  # and inside the image


@pytest.mark.parametrize("case", list(CASES))
def test_identical_series_distinguished(case, figures):
    _, figure = figures[case]
    handles = {legend_name(text): (text, handle) for _, text, handle in legend_entries(figure)}
    (ntk_text, ntk), (dynamic_text, dynamic) = handles["rope + NTK"], handles["rope + dynamic NTK"]
    assert "(= dynamic NTK)" in ntk_text and "(= NTK)" in dynamic_text
    look = [
        (line.get_marker(), to_hex(line.get_color()), line.get_markersize(), str(line.get_markerfacecolor()))
        for line in (ntk, dynamic)
    ]
    assert look[0] != look[1]
    assert look[0][0] != look[1][0]  # different markers: the copy stays visible around the original


@pytest.mark.parametrize("case", list(CASES))
def test_recalibration_in_its_own_panel(case, figures):
    results, figure = figures[case]
    recalibrated = {row["name"] for row in results["schemes"] if "recalibration" in row}
    assert len(figure.axes) == 3
    panels = [{legend_name(text) for axes_, text, _ in legend_entries(figure) if axes_ is axes} for axes in figure.axes]
    assert panels[-1] == recalibrated
    assert all(not panel & recalibrated for panel in panels[:-1])
    assert all(axes.get_shared_y_axes().joined(figure.axes[0], axes) for axes in figure.axes)
    converted = [h for a, t, h in legend_entries(figure) if legend_name(t).endswith("(0 steps)")]
    assert converted and all(str(h.get_markerfacecolor()) == "white" for h in converted)  # hollow before tuning


@pytest.mark.parametrize("case", list(CASES))
def test_single_point_series_drawn_large(case, figures):
    _, figure = figures[case]
    (line,) = [h for _, text, h in legend_entries(figure) if legend_name(text) == "learned"]
    assert line.get_markersize() >= 10
    assert "table ends at L=" in next(t for _, t, _ in legend_entries(figure) if legend_name(t) == "learned")


def test_no_empty_panels():
    results = load(STORED[0])
    results["schemes"] = [row for row in results["schemes"] if "recalibration" not in row]
    figure = compare_figure(results)
    assert len(figure.axes) == 2
    assert all(data_lines(axes) for axes in figure.axes)
    unscaled = copy.deepcopy(results)
    for row in unscaled["schemes"]:
        row["eval"] = {"as trained": row["eval"]["as trained"]}
    assert len(compare_figure(unscaled).axes) == 1
    only_arms = synthetic()
    for row in only_arms["schemes"]:
        if "recalibration" not in row:
            row["eval"] = {"as trained": row["eval"]["as trained"]}
    figure = compare_figure(only_arms)
    assert len(figure.axes) == 2
    assert figure.axes[1].get_title(loc="left").startswith("(b) recalibration")


def test_cap_and_axes(figures):
    results, figure = figures["synthetic"]
    axes = figure.axes[1]
    cap = 8 * 20.0  # the worst perplexity at L, recalibration arms included
    assert axes.get_ylim()[1] >= cap
    (pi,) = [line for line in data_lines(axes) if line.get_label() == "rope + PI (linear)"]
    assert max(pi.get_ydata()) == pytest.approx(cap)
    assert "5,000" in [text.get_text() for text in axes.texts]  # the clipped value, written at the top
    assert axes.get_xscale() == "log" and axes.get_yscale() == "log"
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["16", "32", "64"]


def test_series_styles():
    styles = series_styles(40)
    assert len({(s["color"], s["marker"], s["linestyle"]) for s in styles}) == 40
    assert len({s["color"] for s in styles[:12]}) == 12
    assert set(styles[0]) == {"color", "marker", "linestyle"}


def test_import_has_no_side_effects():
    """The module alone (not the package, which imports torch) loads without importing matplotlib."""
    module = Path(__file__).resolve().parent.parent / "hf_posenc" / "workflow" / "plots.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('plots', {str(module)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
