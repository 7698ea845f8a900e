"""Plots of `hf-posenc` results: perplexity against evaluation length, in a shared, readable style.

`plot_compare` draws what `hf-posenc compare` measured in up to three panels that share the y axis: (a) every trained
scheme as trained, (b) the evaluation-time scalings of each scheme (RoPE's PI, NTK, dynamic NTK and YaRN, ALiBi's
slope multipliers), with each scaled scheme's as-trained curve faint behind them, and (c) the recalibration arms,
converted (hollow markers, dotted) and after fine-tuning (filled, solid). A panel with nothing to show is left out.

`series_styles` gives the colour, marker and line style of each series, so other plots can look the same. matplotlib
is imported inside the functions only: importing this module has no side effects and does not need matplotlib.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: strong qualitative colours (Okabe-Ito, darkened where light, and a few more): no pale shades, all readable on white
PALETTE: tuple[str, ...] = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#7B3294",  # purple
    "#3A9AD9",  # sky blue
    "#C2549D",  # reddish purple
    "#000000",  # black
    "#8C510A",  # brown
    "#666666",  # grey
    "#E7298A",  # magenta
    "#5F9A1B",  # olive green
)
#: 11 markers: coprime with the 12 colours, so (colour, marker) repeats only after 132 series
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "<", "h", ">", "p")
LINESTYLES: tuple[str, ...] = ("-", "--", "-.", ":")

#: legend text appended to a series' name; stripped by `legend_name` to get the name back
_NOTE = re.compile(r" \((?:= .*|table ends at L=\d+|no values)\)$")
_VARIANT = "as trained"


def series_styles(n: int) -> list[dict[str, str]]:
    """Distinct styles for `n` series: a colour, a marker and a line style each.

    Colours cycle through `PALETTE` and markers through `MARKERS` together, so no two of the first 132 series share a
    (colour, marker) pair; the line style changes every `len(PALETTE)` series, so the triples stay distinct beyond.

    Args:
        n: how many series.

    Returns:
        One dict per series with keys "color", "marker" and "linestyle" (keyword arguments of `Axes.plot`).
    """
    return [
        {
            "color": PALETTE[i % len(PALETTE)],
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[(i // len(PALETTE)) % len(LINESTYLES)],
        }
        for i in range(n)
    ]


def legend_name(text: str) -> str:
    """The series name behind a legend entry: line breaks undone and the note ("(= ...)", "(table ends ...)") removed.

    Args:
        text: the legend entry's text.

    Returns:
        The name of the row or row + variant it stands for.
    """
    return _NOTE.sub("", " ".join(text.split()))


def _points(ppl: dict) -> list[tuple[int, float]]:
    """(length, perplexity) pairs with a value, sorted by length; keys may be ints or strings (from JSON)."""
    return sorted((int(n), float(p)) for n, p in ppl.items() if p is not None)


def _series(results: dict) -> dict[str, list[dict[str, Any]]]:
    """The series of each panel: "trained", "scaled" and "recalibrated", in the order of `results["schemes"]`."""
    panels: dict[str, list[dict[str, Any]]] = {"trained": [], "scaled": [], "recalibrated": []}
    for row in results["schemes"]:
        recalibration = "recalibration" in row
        for variant, ppl in row["eval"].items():
            trained = variant == _VARIANT
            entry = {
                "name": row["name"] if trained else f"{row['name']} + {variant}",
                "row": row["name"],
                "variant": variant,
                "points": _points(ppl),
                "lengths": sorted(int(n) for n in ppl),
            }
            panels["recalibrated" if recalibration else "trained" if trained else "scaled"].append(entry)
    return panels


def _y_range(results: dict, series: list[dict[str, Any]]) -> tuple[float, float, float]:
    """(bottom, top, cap): the cap is 8x the worst perplexity at the training length (values above it are drawn on
    the top edge); the top is the cap where something passes it, else just above the largest value."""
    train_length = int(results["config"]["train_length"])
    at_train = [p for s in series for n, p in s["points"] if n == train_length]
    values = [p for s in series for _, p in s["points"]]
    if not values:
        return 1.0, 10.0, 10.0
    cap = 8 * max(at_train) if at_train else max(values)
    top = cap if max(values) > cap else max(values)
    bottom = min(values)
    span = math.log10(top / bottom) if top > bottom else 0.3
    return bottom / 10 ** (0.04 * span), top * 10 ** (0.06 * span), cap


def _nice_ticks(bottom: float, top: float) -> list[float]:
    """Readable y ticks (1, 1.5, 2, 3, 4, 5, 6, 8 x powers of ten) inside [bottom, top], at most nine."""
    ticks: list[float] = []
    for steps in ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 8), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [
            m * 10**e
            for e in range(math.floor(math.log10(bottom)), math.ceil(math.log10(top)) + 1)
            for m in steps
            if bottom <= m * 10**e <= top
        ]
        if len(ticks) >= 5:
            break
    while len(ticks) > 9:
        ticks = ticks[::2]
    return ticks


def _wrap(text: str, width: int) -> str:
    return textwrap.fill(text, width, break_long_words=False, break_on_hyphens=False)


def _draw_series(axes: Axes, entry: dict[str, Any], style: dict[str, Any], cap: float, **extra: Any) -> Any:
    """One series on `axes`, clipped at `cap` (clipped points labelled with their value); returns the line."""
    points = entry["points"]
    lengths = [n for n, _ in points]
    values = [min(p, cap) for _, p in points]
    single = len(points) == 1
    kwargs = {"linewidth": 1.8, "markersize": 13 if single else 6, "zorder": 3} | style | extra
    (line,) = axes.plot(lengths, values, label=entry["label"], **kwargs)
    for n, p in points:
        if p > cap:
            axes.annotate(
                f"{p:.3g}" if p < 1e3 or p >= 1e6 else f"{p:,.0f}",
                (n, cap),
                textcoords="offset points",
                xytext=(4, -3),  # below right: clear of the segment coming up to the cap
                ha="left",
                va="top",
                bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
                fontsize=7,
                color=style["color"],
            )
    return line


def compare_figure(results: dict) -> Figure:
    """The figure of `plot_compare`, not saved: perplexity against evaluation length, in up to three panels.

    Args:
        results: what `hf_posenc.workflow.compare` returns (or its results.json): "config" with "train_length",
            "arch" and "steps"; "schemes", rows with "name" and "eval" ({variant: {length: perplexity or None}}),
            recalibration rows marked by a "recalibration" key.

    Returns:
        A matplotlib Figure on an Agg canvas (not registered with pyplot; nothing to close).

    Raises:
        ValueError: when no row has an evaluation.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter, NullLocator

    config = results["config"]
    train_length = int(config["train_length"])
    panels = {key: value for key, value in _series(results).items() if value}
    if not panels:
        raise ValueError("nothing to plot: results['schemes'] has no evaluations")
    everything = [s for group in panels.values() for s in group]

    # labels: the name, plus a note where a series equals another one or its table ends before the last length
    for entry in everything:
        notes = []
        twins = [
            other
            for other in everything
            if other is not entry and len(entry["points"]) > 1 and other["points"] == entry["points"]
        ]
        if twins:
            notes.append("= " + ", ".join(o["variant"] if o["row"] == entry["row"] else o["name"] for o in twins))
        if entry["points"] and entry["points"][-1][0] < max(entry["lengths"]):
            notes.append(f"table ends at L={entry['points'][-1][0]}")
        if not entry["points"]:
            notes.append("no values")
        entry["note"] = " ".join(f"({note})" for note in notes)
        entry["twin_rank"] = sum(1 for o in twins if everything.index(o) < everything.index(entry))

    # one style index per trained series and per scaled series; one per recalibration arm (converted and tuned share)
    arms: list[str] = []
    for entry in panels.get("recalibrated", []):
        arm = re.sub(r" \(\d+ steps\)$", "", entry["row"])
        entry["arm"] = arm
        if arm not in arms:
            arms.append(arm)
    count = len(panels.get("trained", [])) + len(panels.get("scaled", [])) + len(arms)
    styles = series_styles(count)
    index = 0
    for key in ("trained", "scaled"):
        for entry in panels.get(key, []):
            entry["style"] = dict(styles[index], linestyle="-" if key == "trained" else "--")
            index += 1
    for entry in panels.get("recalibrated", []):
        style = styles[index + arms.index(entry["arm"])]
        converted = re.search(r" \(0 steps\)$", entry["row"]) is not None
        entry["style"] = dict(style, linestyle=":" if converted else "-")
        entry["converted"] = converted

    bottom, top, cap = _y_range(results, everything)
    lengths = sorted({n for s in everything for n in s["lengths"]} | {train_length})
    titles = {
        "trained": "each scheme as trained",
        "scaled": "evaluation-time scaling (no retraining)",
        "recalibrated": "recalibration: converted (hollow, dotted)\nand after fine-tuning (filled, solid)",
    }

    # size: panels side by side; legends below, one column each (two for short names)
    layouts = {}
    for key, group in panels.items():
        longest = max(len(s["name"] + " " + s["note"]) for s in group)
        ncol = 2 if longest <= 34 and len(group) > 5 else 1
        width = 34 if ncol == 2 else 64
        lines = sum(_wrap(f"{s['name']} {s['note']}".strip(), width).count("\n") + 1 for s in group)
        layouts[key] = (ncol, width, math.ceil(lines / ncol))
    legend_rows = max(rows for _, _, rows in layouts.values())
    figure = Figure(figsize=(0.6 + 5.4 * len(panels), 7.0 + 0.19 * legend_rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes_list = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    by_name = {s["name"]: s for s in panels.get("trained", [])}

    for letter, axes, (key, group) in zip("abc", axes_list, panels.items()):
        ncol, width, _ = layouts[key]
        # faint references: the as-trained curve of each scheme that was scaled or recalibrated from
        references = []
        for entry in group:
            source = entry["row"] if key == "scaled" else entry.get("arm", "").split(" -> ")[0]
            if key != "trained" and source in by_name and source not in references:
                references.append(source)
        firsts = [source.split()[0] for source in references]
        for source in references:
            points = by_name[source]["points"]
            # named at its right end, in the margin right of the last length: the first word where that is unique
            short = source.split()[0] if firsts.count(source.split()[0]) == 1 else source
            axes.plot(
                [n for n, _ in points],
                [min(p, cap) for _, p in points],
                color="#999999",
                linewidth=2.5,
                alpha=0.45,
                zorder=1,
                solid_capstyle="round",
                label="_reference",
            )
            n, p = points[-1]
            axes.annotate(
                short,
                (n, min(p, cap)),
                textcoords="offset points",
                xytext=(5, 0),
                ha="left",
                va="center",
                fontsize=7,
                color="#777777",
            )
        # the best at the longest length on top: flat, low curves (ALiBi and kin) are the ones that get buried
        finals = sorted(range(len(group)), key=lambda i: -group[i]["points"][-1][1] if group[i]["points"] else 0.0)
        for rank, i in enumerate(finals):
            group[i]["zorder"] = 3 + rank * 0.01
        handles = []
        for entry in group:
            entry["label"] = _wrap(f"{entry['name']} {entry['note']}".strip(), width)
            extra: dict[str, Any] = {"zorder": entry["zorder"]}
            if entry.get("converted"):
                extra |= {"markerfacecolor": "white", "markeredgewidth": 1.4, "linewidth": 1.3}
            if entry["twin_rank"]:
                # an exact copy of an earlier series: bigger hollow markers around the earlier ones, drawn on top
                extra |= {"markerfacecolor": "none", "markeredgewidth": 1.6, "markersize": 11, "zorder": 4}
            if not entry["points"]:
                handles.append(Line2D([], [], label=entry["label"], **entry["style"]))
                continue
            handles.append(_draw_series(axes, entry, entry["style"], cap, **extra))
        axes.axvline(
            train_length,
            color="#444444",
            linewidth=1.0,
            linestyle=(0, (4, 3)),
            zorder=2,
            label=f"trained at L={train_length}",
        )
        axes.annotate(
            f"trained at L={train_length}",
            xy=(train_length, 0.02),
            xycoords=("data", "axes fraction"),
            xytext=(-9, 0),  # clear of the markers at L, in the margin left of the first length
            textcoords="offset points",
            rotation=90,
            ha="right",
            va="bottom",
            fontsize=8,
            color="#444444",
        )
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlim(lengths[0] / 2**0.45, lengths[-1] * 2**0.55)
        axes.set_xticks(lengths, [str(n) for n in lengths])
        axes.xaxis.set_minor_locator(NullLocator())
        axes.set_xlabel("evaluation length (tokens)")
        title = f"({letter}) {titles[key]}"
        if references:
            title += ("; " if "\n" in title else "\n") + "faint grey: " + ", ".join(references) + " as trained"
        axes.set_title(title, fontsize=10, loc="left")
        axes.grid(True, which="major", color="#e6e6e6", linewidth=0.8, zorder=0)
        axes.set_axisbelow(True)
        if top >= cap * 0.999 and any(p > cap for s in everything for _, p in s["points"]):
            axes.axhline(cap, color="#bbbbbb", linewidth=0.8, linestyle=":", zorder=1)
        axes.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=ncol,
            fontsize=8,
            frameon=False,
            handlelength=3.2,
            borderaxespad=4.6,  # in font sizes: below the tick labels and the x label
            columnspacing=1.2,
            labelspacing=0.45,
        )

    first = axes_list[0]
    first.set_ylim(bottom, top)
    ticks = _nice_ticks(bottom, top)
    first.set_yticks(ticks, [f"{t:g}" for t in ticks])
    first.yaxis.set_minor_locator(NullLocator())
    first.yaxis.set_minor_formatter(NullFormatter())
    first.set_ylabel("perplexity (log scale)")
    figure.suptitle(
        f"{config.get('arch', '?')}: perplexity against evaluation length, trained at L={train_length}"
        f" ({config.get('steps', '?')} steps)",
        fontsize=12,
    )
    return figure


def plot_compare(results: dict, path: str | Path) -> None:
    """Perplexity against evaluation length for `hf-posenc compare`, written to `path` (log-log, PNG at 120 dpi).

    Panels sharing the y axis: (a) the trained schemes as trained, (b) evaluation-time scalings, (c) recalibration
    arms; a panel with no rows is left out. Each series has its own colour, marker and line style; series equal to
    another are marked "(= ...)" in the legend and drawn with larger hollow markers; a series whose table ends before
    the last length says so; the training length is a labelled vertical line; legends sit below the panels. The y axis
    stops at 8x the worst perplexity at the training length: values beyond are drawn on the top edge with their value.

    Args:
        results: as for `compare_figure`.
        path: the image file to write (its suffix picks the format).
    """
    figure = compare_figure(results)
    figure.savefig(path, dpi=120)
